"""Empirical privacy audits (epsilon lower bounds, canaries, exposure)."""
