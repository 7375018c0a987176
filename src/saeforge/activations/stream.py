"""Live activations: corpus windows -> LM forward (stopped at the last hook) -> shuffled batches.

The LM runs chunk by chunk (``shuffle_sequences`` windows at a time, fewer when their rows would
pass ``buffer_mb``: 30 layers' MLP inputs and outputs are 60 hooks, a 69 KB bf16 row); rows at excluded
positions (BOS, padding, special tokens) are dropped before shuffling. The position in the
stream is a small state dict (see batcher.py), so training resumes without replaying the LM.

Several hook points: a row is the concatenation, along the last dim, of the activations at an
ordered list of hook points (e.g. ``[x_mlp_in | x_mlp_out]`` for a transcoder), all from one LM
pass and shuffled together. ``hook_columns`` says which columns hold which hook. One hook point
gives exactly the single-hook rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from saeforge.activations.batcher import ShuffledBatcher
from saeforge.config import ActivationsConfig, DataConfig
from saeforge.data import excluded_mask, iter_documents, pack_windows, split_documents
from saeforge.models.hooks import capture


@dataclass
class WindowActivations:
    """One LM batch: its windows, the activations at the hook, and which positions count."""

    tokens_ST: torch.Tensor  # int64, cpu
    acts_STD: torch.Tensor  # model dtype, cpu
    keep_ST: torch.Tensor  # bool, cpu: False at BOS / pad / special positions


def train_windows(tokenizer, data_cfg: DataConfig, part: str = "train") -> Iterator[torch.Tensor]:
    """Packed token windows (LongTensor[T]) of one part of the corpus, in a deterministic order."""
    return pack_windows(split_documents(iter_documents(data_cfg), data_cfg, part), tokenizer, data_cfg)


def as_points(hook_points) -> list:
    """One HookPoint or a sequence of them -> a list; names must be distinct (they key the columns)."""
    points = list(hook_points) if isinstance(hook_points, (list, tuple)) else [hook_points]
    names = [p.name for p in points]
    if not points or len(set(names)) != len(names):
        raise ValueError(f"hook points {names}: expected at least one, each named once")
    return points


def hook_widths(lm, hook_points) -> list[int]:
    """Width at each hook (not always d_model: a raw module path may point inside the MLP); one probe forward."""
    points = as_points(hook_points)
    probe_ST = torch.zeros(1, 2, dtype=torch.long, device=lm.device)
    acts = capture(lm.model, points, probe_ST)
    return [acts[p.name].shape[-1] for p in points]


def hook_width(lm, hook_points) -> int:
    """Width of a row: the hook's width, or the sum over several hooks."""
    return sum(hook_widths(lm, hook_points))


def columns_of(names: Sequence[str], widths: Sequence[int]) -> dict[str, slice]:
    """name -> the slice of a row holding that hook's activations, in order."""
    out, lo = {}, 0
    for name, width in zip(names, widths, strict=True):
        out[name] = slice(lo, lo + int(width))
        lo += int(width)
    return out


def hook_columns(lm, hook_points) -> dict[str, slice]:
    """name -> the columns of a row (see the module docstring) that hold that hook point's activations."""
    points = as_points(hook_points)
    return columns_of([p.name for p in points], hook_widths(lm, points))


def window_activations(
    lm, hook_points, windows_ST: torch.Tensor, data_cfg: DataConfig, lm_batch_size: int
) -> Iterator[WindowActivations]:
    """Run the LM over ``windows_ST`` in batches and yield the activations at the hook point(s), concatenated."""
    points = as_points(hook_points)
    for tokens_ST in windows_ST.split(lm_batch_size):
        acts = capture(lm.model, points, tokens_ST.to(lm.device))
        acts_STD = acts[points[0].name] if len(points) == 1 else torch.cat([acts[p.name] for p in points], dim=-1)
        keep_ST = ~excluded_mask(tokens_ST, lm.tokenizer, data_cfg)
        yield WindowActivations(tokens_ST, acts_STD.to("cpu"), keep_ST)


class ActivationStream:
    """Iterates float32 activation batches ``x_BD`` read live from the LM.

    ``hook_points``: one HookPoint, or a list of them (rows are their concatenation; ``columns``
    says where each one is, ``d_in`` is the total width). ``state_dict()`` / ``load_state_dict()``
    capture the position; the iterator stops when the corpus part is exhausted.
    """

    def __init__(
        self, lm, hook_points, data_cfg: DataConfig, act_cfg: ActivationsConfig, part: str = "train", seed: int = 0
    ):
        # .hook_point is what was passed (one point or the list): window_activations/hook_width take either
        self.lm, self.hook_point, self.hook_points = lm, hook_points, as_points(hook_points)
        self.data_cfg, self.act_cfg, self.part = data_cfg, act_cfg, part
        self.batcher = ShuffledBatcher(self._load_chunk, act_cfg.batch_size, seed)
        self._windows: Iterator[torch.Tensor] | None = None
        self._next_window = 0
        self._columns: dict[str, slice] | None = None
        self._chunk_sequences: int | None = None

    @property
    def columns(self) -> dict[str, slice]:
        if self._columns is None:
            self._columns = hook_columns(self.lm, self.hook_points)
        return self._columns

    @property
    def d_in(self) -> int:
        return max(s.stop for s in self.columns.values())

    @property
    def chunk_sequences(self) -> int:
        """Windows per chunk: shuffle_sequences, or fewer when that many rows would pass buffer_mb.

        Sized from the width of every hook point (not a rank's share of them), so all ranks agree."""
        if self._chunk_sequences is None:
            row_bytes = sum(hook_widths(self.lm, self.hook_points)) * self.lm.dtype.itemsize
            fit = self.act_cfg.buffer_mb * 2**20 // (self.data_cfg.context_size * row_bytes)
            self._chunk_sequences = max(1, min(self.act_cfg.shuffle_sequences, fit))
        return self._chunk_sequences

    def _seek_windows(self, index: int) -> None:
        # Tokenising is cheap next to the LM, so a seek re-packs the corpus and skips ahead.
        if self._windows is None or index < self._next_window:
            self._windows = train_windows(self.lm.tokenizer, self.data_cfg, self.part)
            self._next_window = 0
        skip = index - self._next_window
        if skip:
            for _ in itertools.islice(self._windows, skip):
                self._next_window += 1

    def _chunk_windows(self, chunk: int, rows_wanted: int | None = None) -> list[torch.Tensor]:
        """The windows of ``chunk`` ([chunk * S, (chunk + 1) * S)); with ``rows_wanted`` (the batcher's row
        budget) only the shortest prefix of them that holds that many kept rows. Which positions are
        kept depends on the tokens alone, so the prefix is known before the LM runs, and it is the
        same in one process or split over ranks."""
        S = self.chunk_sequences
        self._seek_windows(chunk * S)
        windows = list(itertools.islice(self._windows, S))
        self._next_window += len(windows)
        if windows and rows_wanted is not None:
            kept = (~excluded_mask(torch.stack(windows), self.lm.tokenizer, self.data_cfg)).sum(1).cumsum(0)
            windows = windows[: int(torch.searchsorted(kept, rows_wanted)) + 1]
        return windows

    def _rows_of(self, windows: list[torch.Tensor]) -> torch.Tensor:
        """The kept rows of ``windows``, written into one tensor as the LM yields them (not a list of
        pieces and then their concatenation: a second copy of the chunk)."""
        out_ND, n = None, 0
        for wa in window_activations(
            self.lm, self.hook_points, torch.stack(windows), self.data_cfg, self.act_cfg.lm_batch_size
        ):
            kept_ND = wa.acts_STD[wa.keep_ST]
            if out_ND is None:
                out_ND = kept_ND.new_empty(len(windows) * windows[0].numel(), kept_ND.shape[-1])
            out_ND[n : n + len(kept_ND)] = kept_ND
            n += len(kept_ND)
        return out_ND[:n]

    def _load_chunk(self, chunk: int, rows_wanted: int | None = None) -> torch.Tensor | None:
        windows = self._chunk_windows(chunk, rows_wanted)
        return self._rows_of(windows) if windows else None

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.batcher)

    def set_row_budget(self, n_batches: int) -> None:
        """The consumer will take ``n_batches`` batches in all: the LM then runs over only the windows
        they need (the last chunk is cut short; see batcher.py). Set before iterating."""
        self.batcher.max_batches = n_batches

    def state_dict(self) -> dict:
        return self.batcher.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.batcher.load_state_dict(d)
