"""Live activations: corpus windows -> LM forward (stopped at the hook) -> shuffled batches.

The LM runs chunk by chunk (``shuffle_sequences`` windows at a time); rows at excluded
positions (BOS, padding, special tokens) are dropped before shuffling. The position in the
stream is a small state dict (see batcher.py), so training resumes without replaying the LM.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

import torch

from saeforge.activations.batcher import ShuffledBatcher
from saeforge.config import ActivationsConfig, DataConfig


@dataclass
class WindowActivations:
    """One LM batch: its windows, the activations at the hook, and which positions count."""

    tokens_ST: torch.Tensor  # int64, cpu
    acts_STD: torch.Tensor  # model dtype, cpu
    keep_ST: torch.Tensor  # bool, cpu: False at BOS / pad / special positions


def train_windows(tokenizer, data_cfg: DataConfig, part: str = "train") -> Iterator[torch.Tensor]:
    """Packed token windows (LongTensor[T]) of one part of the corpus, in a deterministic order."""
    from saeforge.data import iter_documents, pack_windows, split_documents

    return pack_windows(split_documents(iter_documents(data_cfg), data_cfg, part), tokenizer, data_cfg)


def hook_width(lm, hook_point) -> int:
    """Width at the hook (not always d_model: a raw module path may point inside the MLP)."""
    from saeforge.models.hooks import capture

    probe_ST = torch.zeros(1, 2, dtype=torch.long, device=lm.device)
    return capture(lm.model, [hook_point], probe_ST)[hook_point.name].shape[-1]


def window_activations(lm, hook_point, windows_ST: torch.Tensor, data_cfg: DataConfig, lm_batch_size: int
                       ) -> Iterator[WindowActivations]:
    """Run the LM over ``windows_ST`` in batches and yield the activations at ``hook_point``."""
    from saeforge.data import excluded_mask
    from saeforge.models.hooks import capture

    for tokens_ST in windows_ST.split(lm_batch_size):
        acts_STD = capture(lm.model, [hook_point], tokens_ST.to(lm.device))[hook_point.name]
        keep_ST = ~excluded_mask(tokens_ST, lm.tokenizer, data_cfg)
        yield WindowActivations(tokens_ST, acts_STD.to("cpu"), keep_ST)


class ActivationStream:
    """Iterates float32 activation batches ``x_BD`` read live from the LM.

    ``state_dict()`` / ``load_state_dict()`` capture the position; the iterator stops when the
    corpus part is exhausted (``tokens_out`` says how many rows were produced).
    """

    def __init__(self, lm, hook_point, data_cfg: DataConfig, act_cfg: ActivationsConfig, part: str = "train",
                 seed: int = 0):
        self.lm, self.hook_point = lm, hook_point
        self.data_cfg, self.act_cfg, self.part = data_cfg, act_cfg, part
        self.batcher = ShuffledBatcher(self._load_chunk, act_cfg.batch_size, seed)
        self._windows: Iterator[torch.Tensor] | None = None
        self._next_window = 0

    @property
    def d_in(self) -> int:
        return hook_width(self.lm, self.hook_point)

    def _seek_windows(self, index: int) -> None:
        # Tokenising is cheap next to the LM, so a seek re-packs the corpus and skips ahead.
        if self._windows is None or index < self._next_window:
            self._windows = train_windows(self.lm.tokenizer, self.data_cfg, self.part)
            self._next_window = 0
        skip = index - self._next_window
        if skip:
            for _ in itertools.islice(self._windows, skip):
                self._next_window += 1

    def _load_chunk(self, chunk: int) -> torch.Tensor | None:
        S = self.act_cfg.shuffle_sequences
        self._seek_windows(chunk * S)
        windows = list(itertools.islice(self._windows, S))
        self._next_window += len(windows)
        if not windows:
            return None
        rows = [wa.acts_STD[wa.keep_ST] for wa in window_activations(
            self.lm, self.hook_point, torch.stack(windows), self.data_cfg, self.act_cfg.lm_batch_size)]
        return torch.cat(rows)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.batcher)

    def state_dict(self) -> dict:
        return self.batcher.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.batcher.load_state_dict(d)
