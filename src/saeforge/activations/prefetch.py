"""Overlap the LM with SAE training: compute the next chunk of activations in a background thread.

The live stream alternates ~16 s of LM forwards (one chunk: activations.shuffle_sequences windows)
with ~16 SAE steps on that chunk's rows. ``prefetch_chunks`` makes its batcher ask for chunk i + 1
in a background thread as soon as chunk i is handed over, so the two run at the same time. The
batches are unchanged, bit for bit (a chunk is a pure function of its index; the background thread
only runs it earlier), and so is the resume state, which lives in the batcher.

Off by default (activations.prefetch). On this project's 2-core VM, with the row budget and compiled
LM, 524k-token SmolLM2 runs measured 3,818 -> 3,657 and 3,312 -> 3,117 tokens/s with prefetch on: both
sides are compute-bound on the same two cores, and running them at once slowed the LM's chunks by
~32% and the SAE steps by ~90%, more than the overlap saved. Earlier short runs had shown gains that
came from the last chunk's wasted LM work (now gone) and from other load on the machine.

Threads: each side's torch ops use their own OpenMP team. ``lm_threads`` sets the background
thread's team size (torch.set_num_threads is per thread); the default, 0, keeps torch's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future

import torch

LoadChunk = Callable[..., "torch.Tensor | None"]  # load_chunk(i) or load_chunk(i, rows_wanted=n)


class ChunkPrefetcher:
    """Wraps ``load_chunk(i)``: returns chunk i (waiting for it if the background thread has it in
    flight) and starts computing chunk i + 1. Calls for any other index (a seek after resume) wait
    for the background work, then run in the caller's thread.

    With the batcher's row budget (``rows_wanted``), chunk i + 1 is asked for the rows still wanted
    after chunk i's (the batcher would compute the same number) and is not started when none are, so
    no LM work runs past the end of training. Without a budget the next chunk is always started.
    """

    def __init__(self, load_chunk: LoadChunk, lm_threads: int = 0):
        self.load_chunk = load_chunk
        self.lm_threads = lm_threads
        self._lock = threading.Lock()  # load_chunk is not re-entrant (the stream's window iterator)
        self._ahead: tuple[int, int | None, Future] | None = None

    def _load(self, chunk: int, rows_wanted: int | None) -> torch.Tensor | None:
        with self._lock:
            if rows_wanted is None:
                return self.load_chunk(chunk)
            return self.load_chunk(chunk, rows_wanted=rows_wanted)

    def __call__(self, chunk: int, rows_wanted: int | None = None) -> torch.Tensor | None:
        ahead, self._ahead = self._ahead, None
        rows = None
        hit = ahead is not None and ahead[:2] == (chunk, rows_wanted)
        if ahead is not None:
            result = ahead[2].result()  # re-raises the background thread's exception here
            if hit:
                rows = result
        if not hit:
            rows = self._load(chunk, rows_wanted)
        if rows is not None and (rows_wanted is None or rows_wanted > len(rows)):
            self._start(chunk + 1, None if rows_wanted is None else rows_wanted - len(rows))
        return rows

    def _start(self, chunk: int, rows_wanted: int | None) -> None:
        future: Future = Future()

        def work() -> None:
            if self.lm_threads:
                torch.set_num_threads(self.lm_threads)
            try:
                future.set_result(self._load(chunk, rows_wanted))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer by future.result()
                future.set_exception(e)

        threading.Thread(target=work, name=f"saeforge-prefetch-{chunk}", daemon=True).start()
        self._ahead = (chunk, rows_wanted, future)

    def close(self) -> None:
        """Wait for any background chunk (call before reusing the wrapped loader elsewhere)."""
        if self._ahead is not None:
            try:
                self._ahead[2].result()
            except BaseException:  # noqa: BLE001 - nobody will read that chunk
                pass
            self._ahead = None


def prefetch_chunks(source, lm_threads: int = 0):
    """Make ``source`` (anything with a ShuffledBatcher as ``.batcher``) prefetch its next chunk; returns it.

    Set the stream's row budget (``set_row_budget``) first, so no LM work is started for a chunk past
    the end of the run (it would compete with the evaluation that follows).
    """
    batcher = getattr(source, "batcher", None)
    if batcher is None or isinstance(batcher.load_chunk, ChunkPrefetcher):
        return source
    batcher.load_chunk = ChunkPrefetcher(batcher.load_chunk, lm_threads)
    return source


def close_prefetch(source) -> None:
    """Wait for ``source``'s background chunk, if any: nothing else may run the LM while it does."""
    load_chunk = getattr(getattr(source, "batcher", None), "load_chunk", None)
    if isinstance(load_chunk, ChunkPrefetcher):
        load_chunk.close()
