"""Feature database: streamed statistics vs brute force over all tokens, and a build that survives a kill."""

import copy
import json
import sqlite3

import pytest
import torch

from saeforge.viewer.config import IndexConfig
from saeforge.viewer.db import DBError, FeatureDB
from saeforge.viewer.stats import FeatureStats

W, T, F, LEFT, RIGHT, K, R, H = 23, 12, 7, 3, 2, 4, 5, 8


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (W, T), generator=g)
    # sparse, positive, wide range (so the histogram has to double its width several times)
    f = torch.relu(torch.randn(W, T, F, generator=g) - 1.2) * torch.logspace(-2, 2, W)[:, None, None]
    keep = torch.rand(W, T, generator=g) > 0.1
    keep[:, 0] = False  # BOS
    return tokens, f, keep


def _stream(tokens, f, keep, chunk):
    st = FeatureStats(F, K, R, LEFT, RIGHT, H, seed=3)
    for s in range(0, W, chunk):
        st.update(tokens[s : s + chunk], f[s : s + chunk], keep[s : s + chunk])
    return st


def _snippet(tokens, f_masked, w, p, j):
    toks, acts = [], []
    for q in range(p - LEFT, p + RIGHT + 1):
        inside = 0 <= q < T
        toks.append(int(tokens[w, q]) if inside else -1)
        acts.append(float(f_masked[w, q, j]) if inside else 0.0)
    return toks, acts


@pytest.mark.parametrize("chunk", [1, 5, W])
def test_streamed_stats_equal_brute_force(chunk):
    tokens, f, keep = _data()
    st = _stream(tokens, f, keep, chunk)
    fm = f * keep[..., None]
    assert st.n_tokens == int(keep.sum()) and st.n_windows == W
    assert torch.equal(st.fire_count_F, (fm > 0).sum((0, 1)))
    torch.testing.assert_close(st.act_sum_F, fm.double().sum((0, 1)))
    assert torch.equal(st.max_F, fm.amax((0, 1)))

    for j in range(F):
        # top-k windows by the window maximum, one per window
        wmax, wpos = fm[:, :, j].max(1)
        order = sorted((w for w in range(W) if wmax[w] > 0), key=lambda w: -float(wmax[w]))[:K]
        slots = st.top.ordered(j)
        got = [int(st.top.window_FK[j, k]) for k in slots]
        assert got == order, (j, got, order)
        for slot, w in zip(slots, order):
            assert float(st.top.value_FK[j, slot]) == float(wmax[w])
            toks, acts = _snippet(tokens, fm, w, int(wpos[w]), j)
            assert st.top.tokens_FKL[j, slot].tolist() == toks
            assert st.top.acts_FKL[j, slot].tolist() == acts
        # histogram: exactly the counts of floor(a / w_final) over every firing activation
        a = fm[:, :, j][fm[:, :, j] > 0]
        width = float(st.hist_width_F[j])
        assert a.max() < H * width <= 2 * a.max()  # the range is tight: the max lies in the upper half
        brute = torch.bincount(torch.floor(a / width).long(), minlength=H)
        assert torch.equal(st.hist_FH[j], brute)


def test_uniform_sample_is_bottom_r_of_the_pass_seeded_keys():
    tokens, f, keep = _data(1)
    chunk = 4
    st = _stream(tokens, f, keep, chunk)
    fm = f * keep[..., None]
    keys = torch.cat(
        [
            torch.rand(F, min(chunk, W - s), generator=torch.Generator().manual_seed(3 * 1_000_003 + u))
            for u, s in enumerate(range(0, W, chunk))
        ],
        1,
    )  # [F, W]
    fires = fm.amax(1).T > 0  # [F, W]
    for j in range(F):
        cand = sorted((float(keys[j, w]), w) for w in range(W) if fires[j, w])[:R]
        got = sorted(int(st.sample.window_FK[j, k]) for k in st.sample.ordered(j))
        assert got == sorted(w for _, w in cand)


def test_state_round_trip_resumes_exactly():
    tokens, f, keep = _data(2)
    whole = _stream(tokens, f, keep, 4)
    first = FeatureStats(F, K, R, LEFT, RIGHT, H, seed=3)
    for s in range(0, 12, 4):
        first.update(tokens[s : s + 4], f[s : s + 4], keep[s : s + 4])
    tensors, counters = first.state()
    second = FeatureStats(F, K, R, LEFT, RIGHT, H, seed=3)
    second.load({k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(counters)))
    for s in range(12, W, 4):
        second.update(tokens[s : s + 4], f[s : s + 4], keep[s : s + 4])
    a, b = whole.state()[0], second.state()[0]
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- a real build on a tiny model ---------------------------------------------------------
@pytest.fixture(scope="module")
def sae_dir(tiny_model_dirs, text_corpus, tmp_path_factory):
    from saeforge.saes.formats import save_sae
    from saeforge.saes.registry import config_class, sae_class

    sae = sae_class("topk")(config_class("topk")(d_in=64, d_sae=96, k=6))
    folder = tmp_path_factory.mktemp("viewer_index") / "run" / "sae"
    save_sae(
        sae,
        folder,
        {
            "model_name": str(tiny_model_dirs["llama"]),
            "hook_name": "blocks.1.hook_resid_post",
            "context_size": 32,
            "dataset_path": str(text_corpus),
            "prepend_bos": True,
        },
    )
    return folder


CFG = dict(tokens=6000, top_k=5, per_interval=2, lm_batch_size=8, checkpoint_every=2, n_logits=4, n_neighbours=3)
OVR = {"data": {"holdout_fraction": 0.2}}


def _dump(path):
    con = sqlite3.connect(path)
    out = {
        t: con.execute(f"SELECT * FROM {t} ORDER BY 1, 2, 3").fetchall()
        for t in ("features", "contexts", "logits", "neighbours")
    }
    con.close()
    return out


@pytest.mark.slow
def test_cli_build_then_killed_build_resumes_to_the_same_database(sae_dir, tmp_path, monkeypatch, capsys):
    from saeforge.cli import main
    from saeforge.viewer import index as index_mod

    full = tmp_path / "full.db"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in CFG.items()]
    assert main(["index", str(sae_dir), "--out", str(full), *args, "--data.holdout_fraction", "0.2", "--quiet"]) == 0
    assert "saeforge serve" in capsys.readouterr().out
    db = FeatureDB(full)
    assert db.meta["sae_id"] == "run" and db.meta["model_id"] == "llama" and db.meta["d_sae"] == 96
    assert db.meta["n_windows"] == 6000 // 32 and db.meta["logit_lens"] is True
    assert not index_mod.state_dir(full).exists()

    # Kill the build after 5 LM passes (checkpoints every 2): no database appears, the state does.
    cut = tmp_path / "cut.db"
    real_update = index_mod.FeatureStats.update
    calls = {"n": 0}

    def dying_update(self, *a):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real_update(self, *a)

    monkeypatch.setattr(index_mod.FeatureStats, "update", dying_update)
    with pytest.raises(KeyboardInterrupt):
        index_mod.build_index(sae_dir, cut, IndexConfig(**CFG), OVR, progress=False)
    assert not cut.exists()
    state = json.loads((index_mod.state_dir(cut) / "state.json").read_text())
    assert state["counters"]["n_updates"] == 4
    monkeypatch.setattr(index_mod.FeatureStats, "update", real_update)

    passes = {"n": 0}
    monkeypatch.setattr(
        index_mod.FeatureStats,
        "update",
        lambda self, *a: (passes.__setitem__("n", passes["n"] + 1), real_update(self, *a)),
    )
    index_mod.build_index(sae_dir, cut, IndexConfig(**CFG), OVR, progress=False)
    assert passes["n"] == len(range(0, 6000 // 32, 8)) - 4  # resumed after the 4 checkpointed passes
    assert _dump(cut) == _dump(full)

    # A crash while writing the database leaves no file under the final name either.
    monkeypatch.setattr(index_mod.FeatureStats, "update", real_update)
    crash = tmp_path / "crash.db"
    monkeypatch.setattr(index_mod.db, "finish", lambda con: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        index_mod.build_index(sae_dir, crash, IndexConfig(**CFG), OVR, progress=False)
    assert not crash.exists() and not list(tmp_path.glob("crash.db.tmp-*"))

    # different settings refuse to mix with a leftover state
    index_mod.state_dir(cut).mkdir()
    (index_mod.state_dir(cut) / "state.json").write_text(json.dumps({"fingerprint": {}, "counters": {}}))
    with pytest.raises(ValueError, match="--restart"):
        index_mod.build_index(sae_dir, cut, IndexConfig(**CFG), OVR, progress=False)


@pytest.mark.parametrize("bf16_fast", ["0", "1"], ids=["auto=float32", "auto=bf16"])
def test_database_contents_match_the_sae(sae_dir, tiny_model_dirs, tmp_path, monkeypatch, bf16_fast):
    from saeforge.models import load_model, resolve_dtype
    from saeforge.saes.formats import load_sae
    from saeforge.viewer import lens
    from saeforge.viewer.index import build_index

    # model.dtype stays auto, run both ways on any CPU: the logit lens is float32 arithmetic whatever the LM's dtype
    monkeypatch.setenv("SAEFORGE_BF16_FAST", bf16_fast)
    out = build_index(sae_dir, tmp_path / "f.db", IndexConfig(**CFG), OVR, progress=False)
    db = FeatureDB(out)
    lm = load_model(str(tiny_model_dirs["llama"]), dtype="float32")
    sae = load_sae(sae_dir)
    W = sae.W_dec.detach()
    logits = lm.model.model.norm(W) @ lm.model.lm_head.weight.T  # llama: final RMSNorm, then the unembedding
    # The values: float32 arithmetic on the weights the index's LM holds (bf16-rounded when auto picked bf16).
    # float32 reassociation moves them by ~1e-7 relative; bf16 arithmetic (unit roundoff 2^-8) by ~1e-3.
    used = load_model(str(tiny_model_dirs["llama"]), dtype=db.meta["model_dtype"])
    assert used.dtype == resolve_dtype("auto") == {"0": torch.float32, "1": torch.bfloat16}[bf16_fast]
    logits_used = copy.deepcopy(used.model.model.norm).float()(W) @ used.model.lm_head.weight.float().T
    Wn = W / W.norm(dim=1, keepdim=True)
    cos = Wn @ Wn.T
    alive = [r["index"] for r in db.list_features(limit=500, alive_only=True)]
    assert len(alive) > 10
    for i in alive[:10]:
        f = db.feature(i)
        assert [t for t, _, _ in f["pos"]] == logits[i].topk(4).indices.tolist()
        assert [t for t, _, _ in f["neg"]] == logits[i].topk(4, largest=False).indices.tolist()
        for t, _, v in f["pos"] + f["neg"]:
            assert v == pytest.approx(float(logits_used[i, t]), rel=1e-5, abs=1e-6), (i, t)
        cos[i, i] = -2
        assert [n["index"] for n in f["neighbours"]] == cos[i].topk(3).indices.tolist()
        top = [c for c in f["contexts"] if c["kind"] == "top"]
        assert top and top[0]["max_act"] == pytest.approx(f["max_act"])
        assert [c["max_act"] for c in top] == sorted((c["max_act"] for c in top), reverse=True)
        for c in f["contexts"]:
            assert c["acts"][c["max_pos"]] == pytest.approx(c["max_act"], rel=1e-5)
            assert c["tokens"] == db.texts(c["token_ids"]) and len(c["tokens"]) == len(c["acts"]) <= 24 + 1 + 8
        assert sum(f["hist"]) == f["fire_count"]
        assert f["density"] == pytest.approx(f["fire_count"] / db.meta["n_tokens"])
    assert db.texts([5]) == [lm.tokenizer.decode([5])] and len(lens.token_texts(lm.tokenizer)) == len(lm.tokenizer)


def test_incomplete_or_foreign_files_are_refused(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(DBError, match="saeforge index"):
        FeatureDB(junk)
    half = tmp_path / "half.db"
    con = sqlite3.connect(half)
    con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    con.execute("INSERT INTO meta VALUES ('format_version', '1')")
    con.commit()
    con.close()
    with pytest.raises(DBError, match="incomplete"):
        FeatureDB(half)
    with pytest.raises(DBError, match="does not exist"):
        FeatureDB(tmp_path / "nope.db")
