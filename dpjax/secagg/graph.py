"""Neighbour graphs for SecAgg (complete) and SecAgg+ (random k-regular).

A graph is an ``int64[num_parties, k]`` array whose row ``u`` lists ``u``'s
neighbours in increasing order; the relation is symmetric and irreflexive.
Party ``u`` masks with one pairwise seed per neighbour and Shamir-shares its
secrets among its neighbours and itself.
"""

from __future__ import annotations

import os

import numpy as np

import dpjax._validate as _validate


def complete_graph(num_parties: int) -> np.ndarray:
    """Every party is every other party's neighbour (original SecAgg): ``k = n - 1``."""
    _validate.positive_int("num_parties", num_parties)
    everyone = np.arange(num_parties)
    return np.stack([np.delete(everyone, u) for u in everyone]).reshape(num_parties, -1)


def harary_graph(num_parties: int, num_neighbours: int) -> np.ndarray:
    """The k-regular Harary graph: ``u ~ u +- 1, ..., u +- k//2 (mod n)``, plus ``u ~ u + n/2``
    when ``k`` is odd.

    Raises ``ValueError`` when no k-regular graph exists (``k >= n``, or ``k``
    and ``n`` both odd).
    """
    _validate.positive_int("num_parties", num_parties)
    _validate.positive_int("num_neighbours", num_neighbours)
    n, k = num_parties, num_neighbours
    if k >= n:
        raise ValueError(f"Expected num_neighbours={k} < num_parties={n}.")
    if k % 2 and n % 2:
        raise ValueError(
            f"Expected num_neighbours={k} or num_parties={n} to be even: "
            "no k-regular graph on n vertices exists when both are odd."
        )
    offsets = [o for h in range(1, k // 2 + 1) for o in (h, -h)]
    if k % 2:
        offsets.append(n // 2)
    rows = (np.arange(n)[:, None] + np.array(offsets)[None, :]) % n
    return np.sort(rows, axis=1)


def random_regular_graph(
    num_parties: int, num_neighbours: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """A Harary graph with parties relabelled by a uniform random permutation (SecAgg+).

    Who neighbours whom is then unpredictable to anyone who does not know
    the permutation; the permutation is public once the round starts.
    ``rng=None`` draws it from the OS.
    """
    base = harary_graph(num_parties, num_neighbours)
    if rng is None:
        rng = np.random.default_rng(np.frombuffer(os.urandom(16), np.uint32))
    perm = rng.permutation(num_parties)
    relabelled = np.empty_like(base)
    relabelled[perm] = perm[base]
    return np.sort(relabelled, axis=1)


def check_graph(graph: np.ndarray) -> None:
    """Raises ``ValueError`` unless ``graph`` is symmetric, irreflexive and sorted."""
    n = graph.shape[0]
    pairs = {(u, int(v)) for u in range(n) for v in graph[u]}
    if any(u == v for u, v in pairs) or any((v, u) not in pairs for u, v in pairs):
        raise ValueError("Expected a symmetric neighbour graph without self-loops.")
    if not np.all(np.diff(graph, axis=1) > 0):
        raise ValueError("Expected each row of the neighbour graph sorted without repeats.")
