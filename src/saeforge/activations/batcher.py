"""Shuffled, resumable batching of activation rows.

Rows arrive in chunks (a few hundred LM windows, or one cache shard). Each chunk's rows are
shuffled with a generator seeded by (seed, chunk index) and cut into fixed-size batches; the
rows that do not fill a last batch are carried into the next chunk. The whole position is
(chunk, batches already taken from it, carried rows), so a checkpoint can hold it and a
resumed run sees exactly the batches an uninterrupted one would have seen, without replaying
the language model over earlier chunks.

Memory: a chunk is held once. The pool [carry | chunk] is never built; each batch gathers its
permuted rows from the two (a chunk of 512 x 128 SmolLM2 rows is 150 MB in float32, and a
concatenated and a permuted copy would triple that while the prefetch thread builds the next one).

A row budget (``max_batches``): when the consumer will take a known number of batches, each load
is told how many rows are still wanted (``load_chunk(i, rows_wanted=n)``), so a live stream runs
the LM over only what the last chunk must supply instead of a whole chunk of windows nobody reads
(at 262k tokens, 5 chunks for 4.03 chunks' worth of rows: 20% of the LM time). The budget is a
pure function of the position, so resumed runs load the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class BatcherState:
    chunk: int = 0
    batch_in_chunk: int = 0
    carry_ND: torch.Tensor | None = field(default=None, repr=False)
    batches_before: int | None = None  # batches handed out before this chunk began (None: not counted)

    def to_dict(self) -> dict:
        d = {"chunk": self.chunk, "batch_in_chunk": self.batch_in_chunk}
        if self.carry_ND is not None:
            d["carry"] = self.carry_ND
        if self.batches_before is not None:
            d["batches_before"] = self.batches_before
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BatcherState:
        before = d.get("batches_before")  # absent in checkpoints written before the row budget
        return cls(int(d["chunk"]), int(d["batch_in_chunk"]), d.get("carry"), None if before is None else int(before))


class ShuffledBatcher:
    """Turns ``load_chunk(i) -> rows_ND | None`` (None = no more data) into shuffled batches.

    Batches are float32 whatever the stored dtype (activations are often kept in bf16).
    ``state`` always describes the position *after* the last batch handed out.
    ``max_batches``: set it (before iterating) when the consumer will stop after that many batches
    in all; ``load_chunk`` must then accept ``rows_wanted`` and may return fewer rows than a full
    chunk as long as it returns at least that many (or all it has).
    """

    def __init__(
        self,
        load_chunk: Callable[..., torch.Tensor | None],
        batch_size: int,
        seed: int = 0,
        max_batches: int | None = None,
    ):
        self.load_chunk = load_chunk
        self.batch_size = batch_size
        self.seed = seed
        self.max_batches = max_batches
        # float32 batches by default; None keeps the chunk's dtype (a sweep over many hooks converts each
        # point's columns itself, so a 60-hook batch is not held in float32 whole)
        self.out_dtype: torch.dtype | None = torch.float32
        self.state = BatcherState(batches_before=0)

    def state_dict(self) -> dict:
        return self.state.to_dict()

    def load_state_dict(self, d: dict) -> None:
        self.state = BatcherState.from_dict(d)

    def _permutation(self, chunk: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + chunk)
        return torch.randperm(n, generator=g)

    def rows_wanted(self, st: BatcherState) -> int | None:
        """Rows the loader of ``st.chunk`` must still supply, or None when there is no budget."""
        if self.max_batches is None or st.batches_before is None:
            return None
        carried = 0 if st.carry_ND is None else len(st.carry_ND)
        return max(0, (self.max_batches - st.batches_before) * self.batch_size - carried)

    def _load(self, st: BatcherState) -> torch.Tensor | None:
        wanted = self.rows_wanted(st)
        if wanted is None:
            return self.load_chunk(st.chunk)
        if wanted == 0:
            return None
        return self.load_chunk(st.chunk, rows_wanted=wanted)

    def __iter__(self) -> Iterator[torch.Tensor]:
        B = self.batch_size
        while True:
            st = self.state
            rows_ND = self._load(st)
            if rows_ND is None:
                return
            carry_ND = None if st.carry_ND is None else st.carry_ND.to(rows_ND.dtype)
            c = 0 if carry_ND is None else len(carry_ND)
            perm = self._permutation(st.chunk, c + len(rows_ND))  # over the pool [carry | rows]
            n_batches = len(perm) // B
            for b in range(st.batch_in_chunk, n_batches):
                batch_ND = _gather(carry_ND, rows_ND, perm[b * B : (b + 1) * B])
                self.state = BatcherState(st.chunk, b + 1, st.carry_ND, st.batches_before)
                yield batch_ND if self.out_dtype is None else batch_ND.to(self.out_dtype)
                del batch_ND
            rest = perm[n_batches * B :]
            before = None if st.batches_before is None else st.batches_before + n_batches
            self.state = BatcherState(st.chunk + 1, 0, _gather(carry_ND, rows_ND, rest) if len(rest) else None, before)
            del rows_ND, carry_ND  # before the next load: a chunk is held once


def _gather(carry_ND: torch.Tensor | None, rows_ND: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of the virtual pool ``[carry | rows]`` (index < len(carry) is a carried row), in order."""
    c = 0 if carry_ND is None else len(carry_ND)
    if c == 0:
        return rows_ND.index_select(0, idx)
    out_ND = rows_ND.index_select(0, (idx - c).clamp_min_(0))
    from_carry = (idx < c).nonzero().squeeze(1)
    if len(from_carry):
        out_ND[from_carry] = carry_ND[idx[from_carry]]
    return out_ND
