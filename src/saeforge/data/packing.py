"""Tokenise documents and pack them into fixed-length windows; mark positions to leave out.

Packing follows the usual SAE recipe (SAELens, sparsify): documents are tokenised without
special tokens, joined with the EOS id *between* documents, and the stream is cut into windows
of ``context_size`` tokens; with ``prepend_bos`` every window is ``[BOS] + (context_size - 1)``
stream tokens. A window may therefore start mid-document, and one window can span documents.
The tail of the stream that does not fill a window is dropped.

Special-token text inside a document (e.g. a literal "<|im_end|>") is tokenised the way the
tokenizer does by default, i.e. as that special token; ``excluded_mask`` then leaves it out.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from saeforge.config import DataConfig, UserError
from saeforge.data.corpus import Document

# Tokenise this many documents (or characters) per batch call: big enough for the fast tokenizer
# to use both cores, small enough that the first window comes out quickly.
DOCS_PER_BATCH = 64
CHARS_PER_BATCH = 1_000_000


class PackingError(UserError, ValueError):
    """A tokenizer / data-config combination that cannot be packed; the message says what to change."""


def pack_windows(docs: Iterable[Document], tokenizer: Any, cfg: DataConfig) -> Iterator[torch.Tensor]:
    """Lazily yield LongTensor windows of shape [context_size]; see the module docstring for the layout.

    Tokenizer problems (no BOS while ``prepend_bos``) are raised at call time, not at first use.
    """
    bos_id = _bos_id(tokenizer) if cfg.prepend_bos else None
    if cfg.prepend_bos and bos_id is None:
        raise PackingError(
            f"data.prepend_bos is true but the tokenizer ({type(tokenizer).__name__}) has no BOS token. "
            "Set data.prepend_bos false (windows then start mid-text), or use a tokenizer with a BOS token."
        )
    sep_id = _separator_id(tokenizer)
    return _windows(docs, tokenizer, cfg.context_size, bos_id, sep_id)


def pack_batches(docs: Iterable[Document], tokenizer: Any, cfg: DataConfig, n_seq: int) -> Iterator[torch.Tensor]:
    """Windows stacked into LongTensor [n_seq, context_size] batches; the last batch may have fewer rows."""
    if n_seq < 1:
        raise ValueError(f"n_seq={n_seq}: need at least one sequence per batch")
    return _stack(pack_windows(docs, tokenizer, cfg), n_seq)


def excluded_mask(tokens_ST: torch.Tensor, tokenizer: Any, cfg: DataConfig) -> torch.Tensor:
    """BoolTensor like ``tokens_ST``: True where the token is special (BOS, EOS, pad, ...).

    All False when ``cfg.exclude_special_tokens`` is off. BOS is always among the special ids, so a
    BOS at position 0 is excluded; its activations are outliers (~8x the usual residual norm).
    """
    if not cfg.exclude_special_tokens:
        return torch.zeros_like(tokens_ST, dtype=torch.bool)
    ids = torch.tensor(special_ids(tokenizer), dtype=tokens_ST.dtype, device=tokens_ST.device)
    return torch.isin(tokens_ST, ids)


def special_ids(tokenizer: Any) -> list[int]:
    """Sorted ids of every special token; BOS/EOS/pad are added even if a tokenizer forgets to list them."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            ids.add(int(value))
    return sorted(ids)


def _bos_id(tokenizer: Any) -> int | None:
    return getattr(tokenizer, "bos_token_id", None)


def _separator_id(tokenizer: Any) -> int:
    # GPT-2-style tokenizers have one <|endoftext|> that serves as both; fall back to BOS if EOS is missing.
    for attr in ("eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise PackingError(
        f"the tokenizer ({type(tokenizer).__name__}) has neither an EOS nor a BOS token to put between "
        "documents; set tokenizer.eos_token (e.g. to an existing special token) before packing."
    )


def _token_batches(docs: Iterable[Document], tokenizer: Any) -> Iterator[list[list[int]]]:
    """Token id lists of the documents, tokenised a batch at a time (never the whole corpus)."""
    texts: list[str] = []
    n_chars = 0
    for doc in docs:
        texts.append(doc.text)
        n_chars += len(doc.text)
        if len(texts) >= DOCS_PER_BATCH or n_chars >= CHARS_PER_BATCH:
            yield _encode(tokenizer, texts)
            texts, n_chars = [], 0
    if texts:
        yield _encode(tokenizer, texts)


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # verbose=False: documents longer than model_max_length are expected here (they get cut into
    # windows), so the "sequence length is longer than ..." warning would only be noise.
    out = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return out["input_ids"]


def _windows(
    docs: Iterable[Document], tokenizer: Any, context_size: int, bos_id: int | None, sep_id: int
) -> Iterator[torch.Tensor]:
    prefix = [] if bos_id is None else [int(bos_id)]
    body = context_size - len(prefix)  # stream tokens per window
    stream: list[int] = []  # tokens not yet emitted
    first_doc = True
    for ids_batch in _token_batches(docs, tokenizer):
        for ids in ids_batch:
            if not first_doc:
                stream.append(sep_id)
            first_doc = False
            stream.extend(ids)
        start = 0
        while len(stream) - start >= body:
            yield torch.tensor(prefix + stream[start : start + body], dtype=torch.long)
            start += body
        del stream[:start]  # once per tokenizer batch, so the copy cost stays linear


def _stack(windows: Iterator[torch.Tensor], n_seq: int) -> Iterator[torch.Tensor]:
    rows: list[torch.Tensor] = []
    for window_T in windows:
        rows.append(window_T)
        if len(rows) == n_seq:
            yield torch.stack(rows)
            rows = []
    if rows:
        yield torch.stack(rows)
