"""Held-out windows carrying per-token labels: the packing of data/packing.py, with offsets kept.

Documents are labelled (labels.document_labels), tokenised with character offsets, joined with the
EOS id between documents and cut into ``context_size`` windows, ``[BOS] + body`` when
``prepend_bos``, exactly as ``data.pack_windows`` lays them out, but over the labelled documents
only: a document that does not parse is skipped (and counted in ``WindowStats.n_unparseable``),
so these windows are not the same token stream ``saeforge eval`` sees.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from saeforge.config import DataConfig
from saeforge.data import Document
from saeforge.groundtruth.labels import PROPERTIES, check_offsets, document_labels, token_labels

DOCS_PER_BATCH = 32


@dataclass
class WindowStats:
    """Documents whose tokens entered the stream (code, prose), and unparseable ones met on the way."""

    n_code: int = 0
    n_prose: int = 0
    n_unparseable: int = 0
    unparseable_ids: list[str] = field(default_factory=list)  # the first few, for the message


@dataclass
class LabelledWindow:
    tokens_T: torch.Tensor  # long [T]
    labels_TP: torch.Tensor  # bool [T, P]: property holds
    valid_TP: torch.Tensor  # bool [T, P]: property defined here (code properties only on code tokens)


def labelled_windows(
    docs: Iterable[Document], tokenizer, cfg: DataConfig, stats: WindowStats, model_name: str = ""
) -> Iterator[LabelledWindow]:
    """Lazily yield labelled windows of the documents (see the module docstring); ``stats`` is filled as it goes."""
    check_offsets(tokenizer, model_name)
    bos = getattr(tokenizer, "bos_token_id", None) if cfg.prepend_bos else None
    sep = getattr(tokenizer, "eos_token_id", None)
    sep = sep if sep is not None else getattr(tokenizer, "bos_token_id", None)
    body = cfg.context_size - (bos is not None)
    P = len(PROPERTIES)
    ids: list[int] = []
    labs: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    first = True
    for doc_ids, doc_labs, doc_vals in _labelled_documents(docs, tokenizer, stats):
        if not first and sep is not None:
            ids.append(int(sep))
            labs.append(np.zeros((1, P), dtype=bool))
            vals.append(np.zeros((1, P), dtype=bool))
        first = False
        ids.extend(doc_ids)
        labs.append(doc_labs)
        vals.append(doc_vals)
        if len(ids) < body:
            continue
        lab, val = np.concatenate(labs), np.concatenate(vals)
        n_full = len(ids) // body * body
        for a in range(0, n_full, body):
            yield _window(ids[a : a + body], lab[a : a + body], val[a : a + body], bos)
        ids, labs, vals = ids[n_full:], [lab[n_full:]], [val[n_full:]]


def _window(ids: list[int], lab: np.ndarray, val: np.ndarray, bos: int | None) -> LabelledWindow:
    if bos is not None:
        ids = [int(bos), *ids]
        lab = np.concatenate([np.zeros((1, lab.shape[1]), bool), lab])
        val = np.concatenate([np.zeros((1, val.shape[1]), bool), val])
    return LabelledWindow(torch.tensor(ids, dtype=torch.long), torch.from_numpy(lab), torch.from_numpy(val))


def _labelled_documents(docs: Iterable[Document], tokenizer, stats: WindowStats):
    batch: list[tuple[Document, object]] = []
    for doc in docs:
        labels = document_labels(doc.id, doc.text)
        if labels is None:
            stats.n_unparseable += 1
            if len(stats.unparseable_ids) < 5:
                stats.unparseable_ids.append(doc.id)
            continue
        batch.append((doc, labels))
        if len(batch) >= DOCS_PER_BATCH:
            yield from _encode(batch, tokenizer, stats)
            batch = []
    if batch:
        yield from _encode(batch, tokenizer, stats)


def _encode(batch, tokenizer, stats: WindowStats):
    texts = [doc.text for doc, _ in batch]
    enc = tokenizer(
        texts, add_special_tokens=False, return_attention_mask=False, return_offsets_mapping=True, verbose=False
    )
    prose = PROPERTIES.index("prose")
    for (doc, labels), ids, offsets in zip(batch, enc["input_ids"], enc["offset_mapping"]):
        lab = token_labels(labels, offsets, doc.text)
        val = np.zeros_like(lab)
        val[:, prose] = True
        if labels.code:
            val[:, :] = True
        # counted as their tokens enter the stream, so a document labelled ahead but never reached is not
        stats.n_code += labels.code
        stats.n_prose += not labels.code
        yield ids, lab, val
