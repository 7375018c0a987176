"""Encoder vs decoder view: top contexts by the projection on each feature's unit decoder direction, their
overlap with the encoder's top contexts, and meta-latents in the feature database and its API."""

import itertools
import sqlite3

import loopback
import pytest
import torch

from saeforge.viewer.config import IndexConfig
from saeforge.viewer.db import FeatureDB
from saeforge.viewer.index import _enc_dec_rows, jaccard
from saeforge.viewer.stats import FeatureStats


def test_jaccard_by_hand_on_a_planted_case():
    # one feature, 4 windows of 3 tokens, keep the top 2 windows
    tokens = torch.arange(12).view(4, 3)
    keep = torch.ones(4, 3, dtype=torch.bool)
    f = torch.zeros(4, 3, 1)
    f[0, 1, 0], f[1, 2, 0] = 5.0, 3.0  # the encoder fires in windows 0 and 1 (window 3: 1.0, third)
    f[3, 0, 0] = 1.0
    proj = torch.full((4, 3, 1), -1.0)
    proj[1, 0, 0], proj[2, 1, 0] = 4.0, 6.0  # the decoder direction reads windows 2 then 1
    proj[0, 2, 0] = 0.5
    keep[2, 2] = False
    proj[2, 2, 0] = 99.0  # an excluded position never counts
    st = FeatureStats(1, 2, 2, 1, 1, 8)
    st.update(tokens[:2], f[:2].clone(), keep[:2], proj[:2])  # two passes: the merge across updates
    st.update(tokens[2:], f[2:].clone(), keep[2:], proj[2:])
    order = [int(st.top_dec.window_FK[0, k]) for k in st.top_dec.ordered(0)]
    assert order == [2, 1]
    k = st.top_dec.ordered(0)[0]
    assert float(st.top_dec.value_FK[0, k]) == 6.0
    assert st.top_dec.tokens_FKL[0, k].tolist() == [6, 7, 8] and st.top_dec.acts_FKL[0, k].tolist() == [-1, 6, 99]
    # encoder {0, 1}, decoder {2, 1}: one shared of three
    assert list(_enc_dec_rows(st)) == [(0, 2, 2, pytest.approx(1 / 3))]
    assert jaccard(set(), set()) is None and jaccard({1}, set()) == 0.0 and jaccard({1, 2}, {2, 1}) == 1.0


def test_decoder_state_round_trips_and_old_checkpoints_are_refused(tmp_path):
    g = torch.Generator().manual_seed(0)
    tokens, keep = torch.randint(0, 9, (6, 5), generator=g), torch.ones(6, 5, dtype=torch.bool)
    f, proj = torch.relu(torch.randn(6, 5, 3, generator=g)), torch.randn(6, 5, 3, generator=g)
    whole = FeatureStats(3, 2, 2, 1, 1, 8)
    for s in (0, 3):
        whole.update(tokens[s : s + 3], f[s : s + 3].clone(), keep[s : s + 3], proj[s : s + 3])
    half = FeatureStats(3, 2, 2, 1, 1, 8)
    half.update(tokens[:3], f[:3].clone(), keep[:3], proj[:3])
    tensors, counters = half.state()
    again = FeatureStats(3, 2, 2, 1, 1, 8)
    again.load(dict(tensors), counters)
    again.update(tokens[3:], f[3:].clone(), keep[3:], proj[3:])
    for k, v in whole.state()[0].items():
        assert torch.equal(v, again.state()[0][k]), k
    # a checkpoint written without projections (an older saeforge) cannot resume a build that has them
    from saeforge.viewer.index import _load_state, _save_state

    plain = FeatureStats(3, 2, 2, 1, 1, 8)
    plain.update(tokens[:3], f[:3].clone(), keep[:3])
    assert plain.top_dec is None
    _save_state(tmp_path / "state", plain, {"x": 1})
    with pytest.raises(ValueError, match="predates decoder-projection"):
        _load_state(tmp_path / "state", FeatureStats(3, 2, 2, 1, 1, 8), {"x": 1})


@pytest.fixture(scope="module")
def built(tiny_model_dirs, text_corpus, tmp_path_factory):
    from saeforge.saes.formats import save_sae
    from saeforge.saes.registry import config_class, sae_class
    from saeforge.viewer.index import build_index

    sae = sae_class("topk")(config_class("topk")(d_in=64, d_sae=48, k=6))
    root = tmp_path_factory.mktemp("decoder_view")
    meta = {
        "model_name": str(tiny_model_dirs["llama"]),
        "hook_name": "blocks.1.hook_resid_post",
        "context_size": 32,
        "dataset_path": str(text_corpus),
        "prepend_bos": True,
    }
    save_sae(sae, root / "sae", meta)
    cfg = IndexConfig(tokens=2048, top_k=4, per_interval=1, lm_batch_size=16, n_logits=2, n_neighbours=2)
    ovr = {"data": {"holdout_fraction": 0.2}, "model": {"dtype": "float32"}}
    return {"root": root, "db": build_index(root / "sae", root / "f.db", cfg, ovr, progress=False), "ovr": ovr}


def test_decoder_contexts_equal_a_direct_computation(built):
    from saeforge.activations.stream import train_windows, window_activations
    from saeforge.evals.setup import eval_setup_for
    from saeforge.models import load_model, resolve_hook
    from saeforge.saes.formats import load_sae

    run = eval_setup_for(built["root"] / "sae", built["ovr"])
    lm = load_model(run.model.name, dtype="float32")
    windows = torch.stack(list(itertools.islice(train_windows(lm.tokenizer, run.data, "train"), 2048 // 32)))
    acts, keeps = [], []
    for wa in window_activations(lm, resolve_hook(lm.model, run.model.hook), windows, run.data, 16):
        acts.append(wa.acts_STD)
        keeps.append(wa.keep_ST)
    x_STD, keep_ST = torch.cat(acts).double(), torch.cat(keeps)
    W = load_sae(built["root"] / "sae").W_dec.detach().double()
    proj_STF = (x_STD @ (W / W.norm(dim=1, keepdim=True)).T).masked_fill(~keep_ST[..., None], float("-inf"))
    wmax_SF, wpos_SF = proj_STF.max(1)
    db = FeatureDB(built["db"])
    for i in range(48):
        view = db.decoder_view(i)
        want = wmax_SF[:, i].topk(4).indices.tolist()
        got = view["decoder_contexts"]
        # the same values best first; windows equal up to exact ties (the tiny corpus repeats some windows)
        assert [c["max_act"] for c in got] == pytest.approx(wmax_SF[want, i].tolist(), rel=1e-4, abs=1e-5)
        for c in got:
            w = c["window"]
            assert c["max_act"] == pytest.approx(float(wmax_SF[w, i]), rel=1e-4, abs=1e-5)
            centre = int(wpos_SF[w, i])
            assert c["token_ids"][c["max_pos"]] == int(windows[w, centre])
            assert c["acts"][c["max_pos"]] == pytest.approx(c["max_act"], rel=1e-5)
        want = [c["window"] for c in got]
        enc = {c["window"] for c in db.feature(i)["contexts"] if c["kind"] == "top"}
        assert view["jaccard"] == (pytest.approx(jaccard(enc, set(want))) if enc else 0.0)
    listed = db.list_features(sort="index", desc=False, limit=48)
    assert [r["enc_dec_jaccard"] for r in listed] == [db.decoder_view(i)["jaccard"] for i in range(48)]


@pytest.fixture(scope="module")
def with_meta(built):
    """A copy of the database with meta-latents added by the CLI (a quick, untuned meta-SAE)."""
    from saeforge.cli import main

    db_path = built["root"] / "m.db"
    db_path.write_bytes(built["db"].read_bytes())
    args = ["meta", str(built["root"] / "sae"), "--out", str(built["root"] / "meta"), "--db", str(db_path)]
    assert main([*args, "--top", "3", "--sae.d_sae", "8", "--sae.k", "2", "--tokens", "960", "--quiet"]) == 0
    return db_path


def test_api_shows_both_lists_meta_latents_and_handles_old_databases(built, with_meta, tmp_path):
    from fastapi.testclient import TestClient

    from saeforge.saes.formats import load_sae
    from saeforge.training.meta import meta_latents
    from saeforge.viewer.server import create_app

    db_path, sae_dir = with_meta, built["root"] / "sae"
    rows = sqlite3.connect(db_path).execute("SELECT * FROM meta_latents ORDER BY feature, rank").fetchall()
    want = meta_latents(load_sae(built["root"] / "meta"), load_sae(sae_dir).W_dec, 3)
    assert [r[:3] for r in rows] == [r[:3] for r in want] and len(rows) > 48
    assert [r[3] for r in rows] == pytest.approx([r[3] for r in want])

    # a meta-SAE trained on another SAE's decoder is refused, the table left as it was
    import json
    import shutil

    from saeforge.viewer.metadb import add_meta_latents

    other = tmp_path / "other_meta"
    shutil.copytree(built["root"] / "meta", other)
    cfg = json.loads((other / "cfg.json").read_text())
    cfg["metadata"]["meta_base_sae"] = str(tmp_path / "another_sae")
    (other / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="trained on the decoder of"):
        add_meta_latents(db_path, other)
    assert sqlite3.connect(db_path).execute("SELECT COUNT(*) FROM meta_latents").fetchone()[0] == len(rows)

    d = FeatureDB(db_path)
    client = TestClient(create_app([db_path], live=False))
    model, sae = d.meta["model_id"], d.meta["sae_id"]
    j = client.get(f"/api/feature/{model}/{sae}/5").json()
    assert [c["window"] for c in j["decoder_contexts"]] == [c["window"] for c in d.decoder_view(5)["decoder_contexts"]]
    assert j["saeforge"]["encoder_decoder"]["jaccard"] == d.decoder_view(5)["jaccard"]
    mine = [r for r in rows if r[0] == 5]
    assert [m["latent"] for m in j["meta"]] == [r[2] for r in mine]
    for m in j["meta"]:
        sharing = sorted(((-a, f) for f, _, lat, a in rows if lat == m["latent"] and f != 5))[:10]
        assert [s["index"] for s in m["shared_with"]] == [f for _, f in sharing]
    page = client.get(f"/feature/{model}/{sae}/5").text
    assert 'id="dectop"' in page and 'id="meta"' in page and 'id="top"' in page
    listed = client.get(f"/api/features/{model}/{sae}?sort=index&order=asc&limit=3").json()["features"]
    assert [f["enc_dec_jaccard"] for f in listed] == [d.decoder_view(i)["jaccard"] for i in range(3)]

    # a database built before the decoder view and meta-latents: the fields are null, nothing fails
    old = tmp_path / "old.db"
    old.write_bytes(built["db"].read_bytes())
    con = sqlite3.connect(old)
    con.executescript("DROP TABLE contexts_dec; DROP TABLE enc_dec; DROP TABLE feature_json;")
    con.commit()
    con.close()
    client = TestClient(create_app([old], live=False))
    j = client.get(f"/api/feature/{model}/{sae}/5").json()
    assert j["decoder_contexts"] is None and j["meta"] is None and j["saeforge"]["encoder_decoder"] is None
    listed = client.get(f"/api/features/{model}/{sae}?limit=2").json()["features"]
    assert [f["enc_dec_jaccard"] for f in listed] == [None, None]


@pytest.mark.browser
def test_browser_feature_page_shows_both_lists_and_meta_links(with_meta, tmp_path):

    from playwright.sync_api import sync_playwright

    from saeforge.viewer.server import create_app

    d = FeatureDB(with_meta)
    app = create_app([with_meta], live=False)
    i = next(i for i in range(d.d_sae) if d.decoder_view(i)["n_enc"] > 0)
    errors = []
    with loopback.serve(app) as url:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"])
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/feature/{d.meta['model_id']}/{d.meta['sae_id']}/{i}")
            page.wait_for_selector("#dectop .ctx")
            view = d.decoder_view(i)
            assert page.locator("#top .ctx").count() == view["n_enc"]
            assert page.locator("#dectop .ctx").count() == len(view["decoder_contexts"])
            assert f"Jaccard {view['jaccard']:.3g}"[:12] in page.locator("#encdec").text_content()
            shared = sum(len(m["shared_with"]) for m in meta_for_feature(d, i))
            assert page.locator("#meta tbody tr").count() == len(meta_for_feature(d, i))
            assert page.locator("#meta a").count() == shared
            browser.close()
    assert errors == []


def meta_for_feature(d, i):
    from saeforge.viewer.metadb import meta_for

    return meta_for(d, i)
