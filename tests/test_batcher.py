"""The shuffled batcher: every row once, deterministic, and resumable mid-chunk."""

import torch

from saeforge.activations.batcher import BatcherState, ShuffledBatcher


def make_chunks(sizes, d=3):
    # Row r of the whole stream holds the value r in every column, so batches can be traced back.
    chunks, start = [], 0
    for n in sizes:
        chunks.append(torch.arange(start, start + n, dtype=torch.float32)
                      .unsqueeze(1).repeat(1, d))
        start += n
    return lambda i: chunks[i] if i < len(chunks) else None


def ids(batches):
    return torch.cat([b[:, 0] for b in batches]).long().tolist()


def test_every_row_once_and_remainders_carried():
    sizes = [10, 7, 13]
    b = ShuffledBatcher(make_chunks(sizes), batch_size=4, seed=1)
    out = list(b)
    assert all(x.shape == (4, 3) and x.dtype == torch.float32 for x in out)
    got = ids(out)
    assert len(got) == len(set(got)) == (sum(sizes) // 4) * 4  # only the final remainder is unused
    assert set(got) <= set(range(sum(sizes)))
    assert got != sorted(got)  # really shuffled


def test_same_seed_same_order_other_seed_other_order():
    a = ids(ShuffledBatcher(make_chunks([12, 12]), 4, seed=3))
    b = ids(ShuffledBatcher(make_chunks([12, 12]), 4, seed=3))
    c = ids(ShuffledBatcher(make_chunks([12, 12]), 4, seed=4))
    assert a == b and a != c


def test_resume_from_any_point_equals_uninterrupted():
    load = make_chunks([10, 7, 13, 9])
    full = ids(ShuffledBatcher(load, 4, seed=0))
    for stop in range(1, len(full) // 4):
        first = ShuffledBatcher(load, 4, seed=0)
        it = iter(first)
        head = [next(it) for _ in range(stop)]
        state = BatcherState.from_dict(first.state.to_dict())  # as a checkpoint would store it
        second = ShuffledBatcher(load, 4, seed=0)
        second.state = state
        assert ids(head) + ids(second) == full, f"resume after batch {stop} diverged"
