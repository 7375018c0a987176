"""Activation cache: contents match a direct capture, resume after a crash, damaged shards, reading back."""

import inspect
from collections import Counter

import pytest
import torch

import saeforge.activations.cache as cache_mod
from saeforge.activations import CacheError, CacheReader, read_manifest, write_cache
from saeforge.config import ActivationsConfig, DataConfig
from saeforge.models import resolve_hook
from saeforge.models.hooks import capture

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # Real text nobody here wrote: the source of the stdlib's inspect module.
    path = tmp_path_factory.mktemp("corpus") / "inspect.txt"
    path.write_text(inspect.getsource(inspect))
    return DataConfig(corpus=str(path), context_size=32, holdout_fraction=0.1)


ACT = ActivationsConfig(lm_batch_size=4, shard_rows=300)


def all_rows(folder):
    r = CacheReader(folder, batch_size=64)
    shards = [r.load_shard(i) for i in range(len(r.manifest["shards"]))]
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


def test_cache_rows_match_direct_capture(tmp_path, lm, corpus):
    hp = resolve_hook(lm, HOOK)
    m = write_cache(lm, hp, corpus, ACT, tmp_path, n_tokens=1000, progress=False)
    assert m["complete"] and m["n_rows"] >= 1000 and len(m["shards"]) >= 3
    assert (m["model"], m["hook"], m["d_in"], m["context_size"]) == (lm.name, HOOK, 64, 32)
    rows = all_rows(tmp_path)
    assert len(rows["acts"]) == m["n_rows"] == sum(s["rows"] for s in m["shards"])
    windows_WT = rows["windows"].long()
    direct = capture(lm, [hp], windows_WT)[HOOK]
    # every row is the activation at (window, position) of the stored windows, with its token id
    torch.testing.assert_close(rows["acts"], direct[rows["window"], rows["position"].long()])
    assert torch.equal(rows["token"].long(), windows_WT[rows["window"], rows["position"].long()])
    # BOS / special positions are not cached
    assert not (rows["position"] == 0).any()
    assert len(rows["acts"]) == windows_WT.shape[0] * 31  # the tiny corpus has no other special tokens


def test_interrupted_cache_resumes_to_the_same_rows(tmp_path, lm, corpus, monkeypatch):
    hp = resolve_hook(lm, HOOK)
    write_cache(lm, hp, corpus, ACT, tmp_path / "whole", n_tokens=1000, progress=False)

    real_save, calls = cache_mod.atomic_path, []

    def dying_atomic_path(path):
        if str(path).endswith(".safetensors"):
            calls.append(path)
            if len(calls) == 3:
                raise KeyboardInterrupt  # the process dies while writing shard 3
        return real_save(path)

    monkeypatch.setattr(cache_mod, "atomic_path", dying_atomic_path)
    with pytest.raises(KeyboardInterrupt):
        write_cache(lm, hp, corpus, ACT, tmp_path / "cut", n_tokens=1000, progress=False)
    partial = read_manifest(tmp_path / "cut")
    assert len(partial["shards"]) == 2 and not partial["complete"]
    with pytest.raises(CacheError, match="unfinished"):
        CacheReader(tmp_path / "cut", batch_size=64)

    monkeypatch.setattr(cache_mod, "atomic_path", real_save)
    write_cache(lm, hp, corpus, ACT, tmp_path / "cut", n_tokens=1000, progress=False)
    a, b = all_rows(tmp_path / "whole"), all_rows(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_truncated_shard_is_refused_then_repaired(tmp_path, lm, corpus):
    hp = resolve_hook(lm, HOOK)
    write_cache(lm, hp, corpus, ACT, tmp_path, n_tokens=1000, progress=False)
    before = all_rows(tmp_path)
    shard = tmp_path / read_manifest(tmp_path)["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:1000])
    reader = CacheReader(tmp_path, batch_size=64)
    with pytest.raises(CacheError, match="damaged.*saeforge cache"):
        reader.load_shard(1)
    with pytest.raises(CacheError):
        list(reader)
    write_cache(lm, hp, corpus, ACT, tmp_path, n_tokens=1000, progress=False)  # rewrites from shard 1
    after = all_rows(tmp_path)
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_cache_of_another_model_or_hook_is_not_mixed(tmp_path, lm, corpus):
    write_cache(lm, resolve_hook(lm, HOOK), corpus, ACT, tmp_path, n_tokens=200, progress=False)
    with pytest.raises(CacheError, match="different cache"):
        write_cache(
            lm, resolve_hook(lm, "blocks.0.hook_resid_post"), corpus, ACT, tmp_path, n_tokens=200, progress=False
        )


def test_not_a_cache(tmp_path):
    with pytest.raises(CacheError, match="no manifest.json"):
        CacheReader(tmp_path, batch_size=8)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="damaged"):
        CacheReader(tmp_path, batch_size=8)


def test_reader_batches_cover_the_cache_and_cycle(tmp_path, lm, corpus):
    write_cache(lm, resolve_hook(lm, HOOK), corpus, ACT, tmp_path, n_tokens=600, progress=False)
    reader = CacheReader(tmp_path, batch_size=50, seed=0)
    n = reader.n_rows
    it = iter(reader)
    first_epoch = torch.cat([next(it) for _ in range(n // 50)])
    assert first_epoch.dtype == torch.float32 and first_epoch.shape[1] == reader.d_in == 64
    # the first pass hands out cached rows, none more often than it is cached (the remainder carries over);
    # rows are compared by value, and equal values can occur where two windows share a prefix
    cached = Counter(tuple(r.tolist()) for r in all_rows(tmp_path)["acts"])
    handed = Counter(tuple(r.tolist()) for r in first_epoch)
    assert all(cached[row] >= n for row, n in handed.items())
    more = [next(it) for _ in range(3)]  # a second pass over the shards keeps going
    assert all(b.shape == (50, 64) for b in more)
