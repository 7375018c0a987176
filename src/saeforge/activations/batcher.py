"""Shuffled, resumable batching of activation rows.

Rows arrive in chunks (a few hundred LM windows, or one cache shard). Each chunk's rows are
shuffled with a generator seeded by (seed, chunk index) and cut into fixed-size batches; the
rows that do not fill a last batch are carried into the next chunk. The whole position is
(chunk, batches already taken from it, carried rows), so a checkpoint can hold it and a
resumed run sees exactly the batches an uninterrupted one would have seen, without replaying
the language model over earlier chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


@dataclass
class BatcherState:
    chunk: int = 0
    batch_in_chunk: int = 0
    carry_ND: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = {"chunk": self.chunk, "batch_in_chunk": self.batch_in_chunk}
        if self.carry_ND is not None:
            d["carry"] = self.carry_ND
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BatcherState":
        return cls(int(d["chunk"]), int(d["batch_in_chunk"]), d.get("carry"))


class ShuffledBatcher:
    """Turns ``load_chunk(i) -> rows_ND | None`` (None = no more data) into shuffled batches.

    Batches are float32 whatever the stored dtype (activations are often kept in bf16).
    ``state`` always describes the position *after* the last batch handed out.
    """

    def __init__(self, load_chunk: Callable[[int], torch.Tensor | None], batch_size: int, seed: int = 0):
        self.load_chunk = load_chunk
        self.batch_size = batch_size
        self.seed = seed
        self.state = BatcherState()

    def state_dict(self) -> dict:
        return self.state.to_dict()

    def load_state_dict(self, d: dict) -> None:
        self.state = BatcherState.from_dict(d)

    def _permutation(self, chunk: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + chunk)
        return torch.randperm(n, generator=g)

    def __iter__(self) -> Iterator[torch.Tensor]:
        B = self.batch_size
        while True:
            st = self.state
            rows_ND = self.load_chunk(st.chunk)
            if rows_ND is None:
                return
            if st.carry_ND is not None:
                rows_ND = torch.cat([st.carry_ND.to(rows_ND.dtype), rows_ND])
            pool_ND = rows_ND[self._permutation(st.chunk, len(rows_ND))]
            n_batches = len(pool_ND) // B
            for b in range(st.batch_in_chunk, n_batches):
                self.state = BatcherState(st.chunk, b + 1, st.carry_ND)
                yield pool_ND[b * B : (b + 1) * B].float()
            rest_ND = pool_ND[n_batches * B :]
            self.state = BatcherState(st.chunk + 1, 0, rest_ND.clone() if len(rest_ND) else None)
