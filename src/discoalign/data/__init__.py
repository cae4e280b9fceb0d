"""Preference data: reading, format conversion, bad-row checks, tokenisation, batching, synthetic task."""

from .collator import PairwiseCollator
from .pipeline import DatasetBundle, get_dataset

__all__ = ["DatasetBundle", "PairwiseCollator", "get_dataset"]
