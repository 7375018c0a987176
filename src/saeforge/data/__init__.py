"""Text for the pipeline: document sources and their split (corpus.py), token windows (packing.py)."""

from saeforge.data.corpus import (
    STDLIB,
    CorpusError,
    Document,
    heldout_score,
    iter_documents,
    split_documents,
    stdlib_files,
)
from saeforge.data.packing import PackingError, excluded_mask, pack_batches, pack_windows, special_ids

__all__ = [
    "STDLIB",
    "CorpusError",
    "Document",
    "PackingError",
    "excluded_mask",
    "heldout_score",
    "iter_documents",
    "pack_batches",
    "pack_windows",
    "special_ids",
    "split_documents",
    "stdlib_files",
]
