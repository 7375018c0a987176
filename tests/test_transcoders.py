"""Transcoders (issue 3): multi-hook activation rows, training, saving, evaluation, interop."""

import itertools
import json

import pytest
import torch

from saeforge.activations import CacheReader, read_manifest, write_cache
from saeforge.activations.stream import ActivationStream, hook_columns
from saeforge.config import ActivationsConfig, DataConfig
from saeforge.models import load_model, resolve_hook
from saeforge.models.hooks import capture

HOOK_IN, HOOK_OUT = "blocks.0.hook_mlp_in", "blocks.0.hook_mlp_out"
ACT = ActivationsConfig(batch_size=64, lm_batch_size=4, shuffle_sequences=8, shard_rows=300)


@pytest.fixture(scope="module")
def lm(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["llama"]), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def corpus(text_corpus):
    return DataConfig(corpus=str(text_corpus), context_size=32, holdout_fraction=0.2)


def batches(stream, n):
    return list(itertools.islice(iter(stream), n))


# ---- multi-hook rows -----------------------------------------------------------------------
def test_two_hook_stream_columns_equal_single_hook_streams(lm, corpus):
    p_in, p_out = resolve_hook(lm, HOOK_IN), resolve_hook(lm, HOOK_OUT)
    both = ActivationStream(lm, [p_in, p_out], corpus, ACT, seed=3)
    assert both.columns == {HOOK_IN: slice(0, 64), HOOK_OUT: slice(64, 128)} == hook_columns(lm, [p_in, p_out])
    assert both.d_in == 128
    rows = batches(both, 12)  # more than one chunk: 8 windows x 31 rows < 12 x 64
    assert both.state_dict()["chunk"] >= 2
    for point, cols in ((p_in, slice(0, 64)), (p_out, slice(64, 128))):
        alone = ActivationStream(lm, point, corpus, ACT, seed=3)
        assert alone.d_in == 64 and alone.columns == {point.name: slice(0, 64)}
        for a, b in zip(batches(alone, 12), rows, strict=True):
            assert torch.equal(a, b[:, cols])  # same LM pass values, same shuffle


def test_one_hook_in_a_list_is_the_single_hook_stream(lm, corpus):
    p = resolve_hook(lm, HOOK_OUT)
    a, b = ActivationStream(lm, p, corpus, ACT, seed=1), ActivationStream(lm, [p], corpus, ACT, seed=1)
    for x, y in zip(batches(a, 5), batches(b, 5), strict=True):
        assert torch.equal(x, y)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k]
                                          for k in sa)


def test_two_hook_stream_resumes_where_it_stopped(lm, corpus):
    points = [resolve_hook(lm, HOOK_IN), resolve_hook(lm, HOOK_OUT)]
    whole = batches(ActivationStream(lm, points, corpus, ACT, seed=0), 10)
    first = ActivationStream(lm, points, corpus, ACT, seed=0)
    batches(first, 6)
    state = first.state_dict()
    again = ActivationStream(lm, points, corpus, ACT, seed=0)
    again.load_state_dict(state)
    for a, b in zip(batches(again, 4), whole[6:], strict=True):
        assert torch.equal(a, b)


def test_two_hook_cache_round_trip(tmp_path, lm, corpus):
    p_in, p_out = resolve_hook(lm, HOOK_IN), resolve_hook(lm, HOOK_OUT)
    m = write_cache(lm, [p_in, p_out], corpus, ACT, tmp_path / "two", n_tokens=600, progress=False)
    assert (m["hooks"], m["widths"], m["d_in"]) == ([HOOK_IN, HOOK_OUT], [64, 64], 128) and "hook" not in m
    reader = CacheReader(tmp_path / "two", batch_size=64)
    assert reader.columns == {HOOK_IN: slice(0, 64), HOOK_OUT: slice(64, 128)} and reader.d_in == 128
    shard = reader.load_shard(0)
    direct = capture(lm, [p_in, p_out], shard["windows"].long())
    w, pos = shard["window"] - shard["window"].min(), shard["position"].long()
    assert torch.equal(shard["acts"][:, :64], direct[HOOK_IN][w, pos])
    assert torch.equal(shard["acts"][:, 64:], direct[HOOK_OUT][w, pos])
    # the single-hook cache of the output hook holds exactly the output columns
    single = write_cache(lm, p_out, corpus, ACT, tmp_path / "one", n_tokens=600, progress=False)
    assert (single["hook"], single["hooks"], single["widths"]) == (HOOK_OUT, [HOOK_OUT], [64])
    one = CacheReader(tmp_path / "one", batch_size=64)
    for a, b in zip(batches(one, 8), batches(reader, 8), strict=True):
        assert torch.equal(a, b[:, 64:])


def test_cache_without_hooks_field_reads_and_resumes_as_single_hook(tmp_path, lm, corpus):
    p = resolve_hook(lm, HOOK_OUT)
    write_cache(lm, p, corpus, ACT, tmp_path, n_tokens=300, progress=False)
    m = read_manifest(tmp_path)
    old = {k: v for k, v in m.items() if k not in ("hooks", "widths")}  # as saeforge wrote it before "hooks"
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    reader = CacheReader(tmp_path, batch_size=64)
    assert reader.hooks == [HOOK_OUT] and reader.columns == {HOOK_OUT: slice(0, 64)}
    more = write_cache(lm, p, corpus, ACT, tmp_path, n_tokens=600, progress=False)  # resumes, not "different"
    assert more["n_rows"] >= 600 and more["shards"][: len(m["shards"])] == m["shards"]
