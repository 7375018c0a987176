"""The shuffled batcher: every row once, deterministic, and resumable mid-chunk."""

import torch

from saeforge.activations.batcher import BatcherState, ShuffledBatcher


def make_chunks(sizes, d=3):
    # Row r of the whole stream holds the value r in every column, so batches can be traced back.
    chunks, start = [], 0
    for n in sizes:
        chunks.append(torch.arange(start, start + n, dtype=torch.float32).unsqueeze(1).repeat(1, d))
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


def budgeted(sizes, d=3):
    """Chunks that honour rows_wanted (a prefix of at least that many rows, in steps of 3) and log each call."""
    full, calls = make_chunks(sizes, d), []

    def load(i, rows_wanted=None):
        calls.append((i, rows_wanted))
        rows = full(i)
        if rows is None or rows_wanted is None:
            return rows
        return rows[: min(len(rows), -(-rows_wanted // 3) * 3)]

    return load, calls


def test_row_budget_loads_only_what_the_batches_need_and_resumes_to_the_same_rows():
    load, calls = budgeted([10, 7, 13, 9])
    b = ShuffledBatcher(load, 4, seed=0, max_batches=5)  # 20 rows: chunks 0 and 1 (17 rows) and 3 of chunk 2
    got = list(b)
    assert len(got) == 5 and len(set(ids(got))) == 20
    assert calls == [(0, 20), (1, 10), (2, 3)]  # 20 - 10, then 20 - 17; nothing asked once 20 are in hand
    assert b.state.batches_before == 5
    # each chunk holds the rows asked for, so chunk 2 is a 3-row prefix (unlike an unbudgeted run's chunk 2)
    assert set(ids(got)) <= set(range(20))
    for stop in range(1, 5):  # a resume mid-run asks for the same rows and continues identically
        load2, _ = budgeted([10, 7, 13, 9])
        first = ShuffledBatcher(load2, 4, seed=0, max_batches=5)
        head = [x for _, x in zip(range(stop), first)]
        second = ShuffledBatcher(load2, 4, seed=0, max_batches=5)
        second.load_state_dict(first.state_dict())
        assert ids(head) + ids(second) == ids(got), f"resume after batch {stop} diverged"


def test_checkpoints_without_a_batch_count_read_as_unbudgeted():
    load, calls = budgeted([10, 7])
    b = ShuffledBatcher(load, 4, seed=0, max_batches=3)
    b.load_state_dict({"chunk": 1, "batch_in_chunk": 0})  # written before the row budget existed
    list(b)
    assert calls[0] == (1, None)  # the whole chunk, as the run that wrote it would have loaded
