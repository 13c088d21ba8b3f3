"""Datasets for dpjax: in-memory numpy train/test splits, never downloaded.

Normalization statistics come from the training split only.
"""

from dpjax.data.dataset import Dataset
from dpjax.data.normalize import NORMALIZATIONS, channel_stats, normalize_splits, standardize

__all__ = ["NORMALIZATIONS", "Dataset", "channel_stats", "normalize_splits", "standardize"]
