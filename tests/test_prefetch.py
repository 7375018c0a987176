"""activations.prefetch: the next chunk computed in a background thread changes nothing about the batches."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

from saeforge.activations import ActivationStream
from saeforge.activations.batcher import ShuffledBatcher
from saeforge.activations.prefetch import ChunkPrefetcher, prefetch_chunks
from saeforge.config import ActivationsConfig, DataConfig
from saeforge.models import load_model, resolve_hook


def synthetic(n_chunks=6, rows=50, fail_at=None):
    calls, threads = [], []

    def load_chunk(i):
        calls.append(i)
        threads.append(threading.current_thread().name)
        if i == fail_at:
            raise RuntimeError(f"chunk {i} broke")
        if i >= n_chunks:
            return None
        return torch.arange(i * rows, (i + 1) * rows, dtype=torch.float32)[:, None].expand(rows, 3) * 1.0

    return load_chunk, calls, threads


def test_prefetched_batches_and_states_equal_the_plain_ones_and_each_chunk_loads_once():
    plain = ShuffledBatcher(synthetic()[0], batch_size=16, seed=2)
    load, calls, threads = synthetic()
    fast = ShuffledBatcher(ChunkPrefetcher(load), batch_size=16, seed=2)
    n = 0
    for a, b in itertools.zip_longest(plain, fast):
        assert torch.equal(a, b)
        sa, sb = plain.state_dict(), fast.state_dict()
        assert (sa["chunk"], sa["batch_in_chunk"]) == (sb["chunk"], sb["batch_in_chunk"])
        n += 1
    assert n == 6 * 50 // 16
    assert calls == list(range(7))  # chunks 0..5 and the None that ends the stream, each once, in order
    assert any(t.startswith("saeforge-prefetch") for t in threads)  # ...most of them in the background


def test_resume_with_prefetch_continues_where_the_plain_run_would():
    whole = list(ShuffledBatcher(synthetic()[0], batch_size=16, seed=5))
    first = ShuffledBatcher(ChunkPrefetcher(synthetic()[0]), batch_size=16, seed=5)
    head = list(itertools.islice(iter(first), 7))
    resumed = ShuffledBatcher(ChunkPrefetcher(synthetic()[0]), batch_size=16, seed=5)
    resumed.load_state_dict(first.state_dict())  # a seek: the prefetcher has nothing in flight for it
    rest = list(resumed)
    assert all(torch.equal(a, b) for a, b in zip(head + rest, whole, strict=True))


def test_a_background_failure_surfaces_in_the_consumer():
    load, _, _ = synthetic(fail_at=2)
    batcher = ShuffledBatcher(ChunkPrefetcher(load), batch_size=16, seed=0)
    with pytest.raises(RuntimeError, match="chunk 2 broke"):
        list(batcher)


def test_no_chunk_is_started_past_the_row_budget():
    plain, calls, _ = synthetic()

    def load(i, rows_wanted=None):  # the synthetic chunks, whole whatever the budget
        return plain(i)

    batcher = ShuffledBatcher(ChunkPrefetcher(load), batch_size=16, seed=0, max_batches=120 // 16)
    list(itertools.islice(iter(batcher), 120 // 16))
    batcher.load_chunk.close()
    assert calls == [0, 1, 2]  # the 7 batches (112 rows) are in hand after chunk 2: chunk 3 never ran


def test_prefetch_hands_the_row_budget_to_the_background_load():
    calls = []

    def load(i, rows_wanted=None):
        calls.append((i, rows_wanted, threading.current_thread().name.startswith("saeforge-prefetch")))
        return None if i >= 6 else torch.full((50, 3), float(i))[:rows_wanted]

    plain = list(ShuffledBatcher(load, batch_size=16, seed=0, max_batches=9))
    expected, calls[:] = [c[:2] for c in calls], []
    fast = list(ShuffledBatcher(ChunkPrefetcher(load), batch_size=16, seed=0, max_batches=9))
    assert all(torch.equal(a, b) for a, b in zip(plain, fast, strict=True))
    assert [c[:2] for c in calls] == expected == [(0, 144), (1, 94), (2, 44)]  # 9 x 16 rows; chunk 3 never runs
    assert [c[2] for c in calls] == [False, True, True]


def test_live_stream_with_prefetch_gives_the_same_batches(tiny_model_dirs, text_corpus):
    lm = load_model(str(tiny_model_dirs["llama"]), dtype="float32", device="cpu")
    data = DataConfig(corpus=str(text_corpus), context_size=32, holdout_fraction=0.2)
    act = ActivationsConfig(batch_size=64, lm_batch_size=4, shuffle_sequences=8)
    point = resolve_hook(lm, "blocks.1.hook_resid_post")
    plain = ActivationStream(lm, point, data, act, seed=1)
    fast = prefetch_chunks(ActivationStream(lm, point, data, act, seed=1), lm_threads=1)
    assert prefetch_chunks(fast) is fast and isinstance(fast.batcher.load_chunk, ChunkPrefetcher)
    expected = list(itertools.islice(iter(plain), 12))
    for a, b in zip(expected, itertools.islice(iter(fast), 12), strict=True):
        assert torch.equal(a, b)
    assert fast.state_dict()["chunk"] >= 2
    fast.batcher.load_chunk.close()


def test_captures_in_two_threads_at_once_each_get_their_own_activations(tiny_model_dirs):
    from saeforge.models.hooks import capture

    lm = load_model(str(tiny_model_dirs["llama"]), dtype="float32", device="cpu")
    ids = [torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    names = ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]
    expected = [capture(lm, [n], x)[n] for n, x in zip(names, ids)]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(20):
                got = capture(lm, [names[i]], ids[i])[names[i]]
                assert torch.equal(got, expected[i])
            results[i] = True
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == {0: True, 1: True}


def test_train_with_prefetch_gives_the_same_sae_bit_for_bit(tiny_model_dirs, text_corpus, tmp_path):
    import dataclasses

    from safetensors.torch import load_file

    from saeforge.training.config import RunConfig
    from saeforge.training.run import train

    base = RunConfig()
    cfg = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, name=str(tiny_model_dirs["llama"]), hook="blocks.1.hook_resid_post"),
        data=DataConfig(corpus=str(text_corpus), context_size=32, holdout_fraction=0.2),
        sae=dataclasses.replace(base.sae, d_sae=256, k=8),
        train=dataclasses.replace(base.train, total_tokens=6000, out_dir=str(tmp_path)),
    )
    weights = []
    for prefetch in (False, True):
        run = dataclasses.replace(
            cfg,
            activations=ActivationsConfig(batch_size=128, lm_batch_size=4, shuffle_sequences=16, prefetch=prefetch),
            train=dataclasses.replace(cfg.train, run_name=f"p{prefetch}"),
        )
        result = train(run, evaluate=False, progress=False)
        weights.append(load_file(result.sae_dir / "sae_weights.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def test_prefetch_runs_the_compiled_layers_in_its_thread_with_the_same_batches(tiny_model_dirs, text_corpus):
    from saeforge.models import compiled

    lm = load_model(str(tiny_model_dirs["llama"]), dtype="float32", device="cpu")
    data = DataConfig(corpus=str(text_corpus), context_size=32, holdout_fraction=0.2)
    act = ActivationsConfig(batch_size=64, lm_batch_size=4, shuffle_sequences=8)
    point = resolve_hook(lm, "blocks.1.hook_resid_post")
    compiled.enable(lm)
    expected = list(itertools.islice(iter(ActivationStream(lm, point, data, act, seed=1)), 12))
    before = [layer.__dict__[compiled._ATTR].calls for layer in compiled.decoder_layers(lm.model)]
    fast = prefetch_chunks(ActivationStream(lm, point, data, act, seed=1))
    for a, b in zip(expected, itertools.islice(iter(fast), 12), strict=True):
        assert torch.equal(a, b)
    fast.batcher.load_chunk.close()
    after = [layer.__dict__[compiled._ATTR].calls for layer in compiled.decoder_layers(lm.model)]
    assert after[0] > before[0] > 0 and after[2] == 0  # compiled in both runs; layer 2 never ran


def test_live_chunk_with_a_row_budget_is_a_prefix_and_runs_fewer_lm_batches(tiny_model_dirs, text_corpus, monkeypatch):
    from saeforge.activations import stream

    lm = load_model(str(tiny_model_dirs["llama"]), dtype="float32", device="cpu")
    data = DataConfig(corpus=str(text_corpus), context_size=32, holdout_fraction=0.2)
    act = ActivationsConfig(batch_size=64, lm_batch_size=4, shuffle_sequences=16)
    point = resolve_hook(lm, "blocks.1.hook_resid_post")
    full = ActivationStream(lm, point, data, act, seed=1)._load_chunk(1)
    seen, original = [], stream.capture  # counts the LM passes over windows (not the 2-token width probe)

    def counting(model, points, tokens_ST, *a, **k):
        if tokens_ST.shape[1] > 2:
            seen.append(1)
        return original(model, points, tokens_ST, *a, **k)

    monkeypatch.setattr(stream, "capture", counting)
    part = ActivationStream(lm, point, data, act, seed=1)._load_chunk(1, rows_wanted=100)
    assert len(seen) == 1 and 100 <= len(part) <= 4 * 32 < len(full)  # one LM batch of 4 windows was enough
    torch.testing.assert_close(part, full[: len(part)], rtol=0, atol=0)
