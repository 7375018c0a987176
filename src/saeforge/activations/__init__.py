"""Activations at a hook: live from the LM (stream.py) or from an on-disk cache (cache.py)."""

from saeforge.activations.batcher import BatcherState, ShuffledBatcher
from saeforge.activations.cache import CacheError, CacheReader, read_manifest, write_cache
from saeforge.activations.stream import ActivationStream, window_activations

__all__ = [
    "ActivationStream",
    "BatcherState",
    "CacheError",
    "CacheReader",
    "ShuffledBatcher",
    "read_manifest",
    "window_activations",
    "write_cache",
]
