"""The dictionary map (layout, cluster tree, PCA) and the first-position artefact, from the accumulators to
the API and the map page in headless Chromium."""

import shutil
import sqlite3

import httpx
import loopback
import pytest
import torch

from saeforge.saes.formats import save_sae
from saeforge.saes.registry import config_class, sae_class
from saeforge.viewer import db, dmap
from saeforge.viewer.config import IndexConfig
from saeforge.viewer.db import FeatureDB
from saeforge.viewer.stats import FeatureStats

D_SAE = 64


@pytest.fixture(scope="module")
def built(tiny_model_dirs, text_corpus, tmp_path_factory):
    from saeforge.viewer.index import build_index

    root = tmp_path_factory.mktemp("viewer_map")
    model = tiny_model_dirs["llama"]
    sae = sae_class("topk")(config_class("topk")(d_in=64, d_sae=D_SAE, k=6))
    meta = {"model_name": str(model), "hook_name": "blocks.1.hook_resid_post", "context_size": 32}
    save_sae(sae, root / "m", meta | {"dataset_path": str(text_corpus), "prepend_bos": True})
    cfg = IndexConfig(tokens=1500, top_k=4, per_interval=2, lm_batch_size=8, n_logits=3, n_neighbours=3, name="m")
    path = build_index(root / "m", root / "m.db", cfg, {"data": {"holdout_fraction": 0.1}}, progress=False)
    # the same database as one built before the map and first-position tables existed
    old = root / "old.db"
    shutil.copy(path, old)
    con = sqlite3.connect(old)
    con.executescript(
        "DROP TABLE map; DROP TABLE tree; DROP TABLE first_position; DROP TABLE feature_json; UPDATE meta SET value = '\"old\"' "
        "WHERE key = 'sae_id';"
    )
    con.commit()
    con.close()
    return {"db": path, "old": old, "sae": root / "m", "root": root}


@pytest.fixture(scope="module")
def server(built):
    from saeforge.viewer.server import create_app

    app = create_app([built["db"], built["old"]], live=False)
    with loopback.serve(app) as url:
        yield url


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


# ---- the map at index time ----------------------------------------------------------------
def test_map_covers_every_feature_clusters_in_range_tree_sizes_add_up(built):
    d = FeatureDB(built["db"])
    assert d.meta["map_method"] == "pca"  # auto: 64 features is below dmap.UMAP_MIN
    rows = d.query("SELECT feature, x, y, cluster FROM map ORDER BY feature")
    assert [r[0] for r in rows] == list(range(D_SAE))
    assert all(0 <= r[3] < 16 for r in rows) and len({r[3] for r in rows}) == 16
    tree = {n: (a, b, s) for n, a, b, _, s in d.query("SELECT * FROM tree")}
    assert len(tree) == D_SAE - 1 and tree[2 * D_SAE - 2][2] == D_SAE
    size = lambda n: 1 if n < D_SAE else tree[n][2]  # noqa: E731
    assert all(s == size(a) + size(b) for a, b, s in tree.values())
    # the stored layout is the PCA of the unit decoder rows
    from saeforge.saes.formats import load_sae

    W = load_sae(built["sae"]).W_dec.detach()
    want = dmap.pca_2d(W / W.norm(dim=1, keepdim=True))
    torch.testing.assert_close(torch.tensor([r[1:3] for r in rows], dtype=torch.float64), want, atol=1e-5, rtol=0)


def test_cosine_clustering_groups_planted_directions():
    # three tight bundles of 5 rows each around orthogonal axes, one bundle scaled: cosine ignores the norm
    g = torch.Generator().manual_seed(0)
    W = torch.cat([torch.eye(8)[i].expand(5, 8) + 0.01 * torch.randn(5, 8, generator=g) for i in range(3)])
    W[5:10] *= 40
    labels, Z = dmap.cluster(W, 3)
    assert [len(set(labels[i : i + 5].tolist())) for i in (0, 5, 10)] == [1, 1, 1]
    assert len(set(labels.tolist())) == 3 and Z.shape == (14, 4)


def test_pca_of_a_planted_subset_equals_torch_svd():
    W = torch.randn(40, 12, generator=torch.Generator().manual_seed(1))
    feats = [3, 7, 11, 19, 23, 31, 37]
    got = dmap.pca_of(W, feats)
    X = W[feats].double() - W[feats].double().mean(0)
    U, S, _ = torch.linalg.svd(X, full_matrices=False)
    for c, key in enumerate(("x", "y")):
        col = torch.tensor(got[key], dtype=torch.float64)
        ref = U[:, c] * S[c]
        sign = 1.0 if float(col @ ref) >= 0 else -1.0  # SVD signs are arbitrary
        torch.testing.assert_close(col, sign * ref)
    assert got["explained"] == pytest.approx((S[:2] ** 2 / (S**2).sum()).tolist())


# ---- the first-position artefact ------------------------------------------------------------
def _planted_stats() -> FeatureStats:
    """Two windows of 6 tokens, BOS at position 0 (not kept). Feature 0 fires 10 at position 1 and 1 elsewhere
    (the artefact); feature 1 fires 2 at position 1 and 3 later; feature 2 fires 1.5 at position 3; 3 never."""
    S, T, F = 2, 6, 4
    f_STF = torch.zeros(S, T, F)
    f_STF[:, 1, 0], f_STF[:, 4, 0] = 10.0, 1.0
    f_STF[:, 1, 1], f_STF[0, 5, 1] = 2.0, 3.0
    f_STF[1, 3, 2] = 1.5
    f_STF[:, 0, :] = 50.0  # at BOS: ignored
    keep_ST = torch.ones(S, T, dtype=torch.bool)
    keep_ST[:, 0] = False
    stats = FeatureStats(F, top_k=2, sample=2, left=2, right=1, hist_bins=8)
    stats.update(torch.arange(S * T).view(S, T), f_STF, keep_ST)
    return stats


def test_first_position_rule_flags_only_the_planted_latent():
    from saeforge.viewer.index import _first_rows

    rows = list(_first_rows(_planted_stats(), ratio=5.0))
    assert rows == [
        (0, 10.0, 1.0, 1.0, 1),  # 10x at position 1; both windows peak there
        (1, 2.0, 3.0, 0.5, 0),  # window 1 peaks at position 1 (2 > 0), window 0 at 5 (3 > 2)
        (2, 0.0, 1.5, 0.0, 0),
        (3, 0.0, 0.0, 0.0, 0),
    ]


def test_exclude_first_ranking_differs(tiny_model_dirs, tmp_path):
    from saeforge.models import load_model
    from saeforge.viewer.index import write_database

    lm = load_model(str(tiny_model_dirs["llama"]), device="cpu")
    sae = sae_class("topk")(config_class("topk")(d_in=64, d_sae=4, k=2))
    meta = {"format_version": db.FORMAT_VERSION, "model_id": "t", "sae_id": "p", "d_sae": 4, "sae_dir": "x"}
    meta |= {"hook": "blocks.0.hook_resid_post", "n_tokens": 24}  # named by the feature JSON the index stores
    cfg = IndexConfig(top_k=2, per_interval=1, quantile_intervals=2, left=2, right=1, n_logits=2, n_neighbours=1)
    write_database(tmp_path / "p.db", _planted_stats(), lm, sae, meta, cfg)
    d = FeatureDB(tmp_path / "p.db")
    by_max = d.list_features("max_act")
    assert [f["index"] for f in by_max] == [0, 1, 2, 3]
    assert [f["first_flag"] for f in by_max] == [True, False, False, False]
    excl = d.list_features("max_act", exclude_first=True)
    assert [f["index"] for f in excl] == [1, 2, 0, 3]
    assert [f["max_act_excl_first"] for f in excl] == [3.0, 1.5, 1.0, 0.0]
    # the top contexts without the first position: feature 0's peaks move to position 4 (value 1), feature 1
    # keeps only window 0 (window 1 fires nowhere else), feature 2 never peaked there: its plain list
    top = lambda i, x: [(c["window"], c["max_act"]) for c in d.feature(i, x)["contexts"] if c["kind"] == "top"]  # noqa: E731
    assert top(0, False) == [(0, 10.0), (1, 10.0)] and top(0, True) == [(0, 1.0), (1, 1.0)]
    assert top(1, False) == [(0, 3.0), (1, 2.0)] and top(1, True) == [(0, 3.0)]
    assert top(2, True) == top(2, False) == [(1, 1.5)]
    assert [c["tokens"][c["max_pos"]] for c in d.feature(0, True)["contexts"] if c["kind"] == "top"] == [
        d.texts([4])[0],
        d.texts([10])[0],
    ]  # tokens are arange(12): window 0's position 4 is token 4, window 1's is token 10


# ---- API ------------------------------------------------------------------------------------
def test_map_tree_and_pca_api(http, built):
    m = http.get("/api/map/llama/m").json()
    assert m["index"] == list(range(D_SAE)) and len(m["x"]) == D_SAE and m["n_clusters"] == 16
    assert all(e is None for e in m["explanation"])  # no `saeforge explain` run yet
    root = http.get("/api/tree/llama/m").json()
    assert root["node"] == root["root"] == 2 * D_SAE - 2 and root["size"] == D_SAE
    assert sum(c["size"] for c in root["children"]) == D_SAE
    kid = next(c for c in root["children"] if not c["leaf"])
    sub = http.get("/api/tree/llama/m", params={"node": kid["node"]}).json()
    assert sorted(sub["features"]) == sorted(sum((c["features"] for c in sub["children"]), []))
    assert http.get("/api/tree/llama/m", params={"node": 5000}).status_code == 404
    from saeforge.saes.formats import load_sae

    feats = [2, 9, 33, 40, 63]
    r = http.post("/api/pca/llama/m", json={"features": feats}).json()
    want = dmap.pca_of(load_sae(built["sae"]).W_dec, feats)
    assert r["x"] == pytest.approx(want["x"], abs=1e-6) and r["y"] == pytest.approx(want["y"], abs=1e-6)
    assert http.post("/api/pca/llama/m", json={"features": [1, 999]}).status_code == 422
    assert http.post("/api/pca/llama/m", json={"features": [1]}).status_code == 422


def test_older_database_says_what_is_missing(http):
    r = http.get("/api/map/llama/old")
    assert r.status_code == 422 and "rebuild it with `saeforge index`" in r.json()["error"]
    r = http.get("/api/features/llama/old", params={"sort": "max_act", "exclude_first": True})
    assert r.status_code == 422 and "first-position" in r.json()["error"]
    rows = http.get("/api/features/llama/old").json()["features"]
    assert rows and all(f["first_flag"] is None for f in rows)
    assert http.get("/api/features/llama/m").json()["features"][0]["first_flag"] in (True, False)
    assert http.get("/api/feature/llama/old/3").json()["saeforge"]["first_position"] is None
    new = http.get("/api/feature/llama/m/3", params={"exclude_first": True}).json()["saeforge"]["first_position"]
    assert set(new) == {"max_act_excl_first", "max_act_first", "first_share", "first_flag"}


# ---- the page in Chromium --------------------------------------------------------------------
@pytest.mark.browser
def test_map_page_draws_points_and_links_to_features(server, tmp_path):
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"]  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        errors, outside = [], []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        pg.on("request", lambda r: outside.append(r.url) if not r.url.startswith(server) else None)
        pg.goto(f"{server}/map")
        pg.wait_for_selector("#map[data-points='64']", timeout=15000)  # (CSP forbids wait_for_function's eval)
        pg.wait_for_selector("#tree li button")
        pg.click("#tree li button")  # expand the root
        pg.wait_for_selector("#tree li ul li")
        assert pg.locator("#tree li ul > li").count() == 2
        pg.fill("#pcafeat", "2 9 33 40")
        pg.click("#pcaform button")
        pg.wait_for_selector("#pca[data-points='4']")
        assert "of the variance" in pg.text_content("#pcastatus")
        pg.mouse.wheel(0, -300)  # zoom in about the cursor, then find feature 17 where it is now drawn
        x, y = pg.evaluate("window.saeMap.pointAt(17)")
        pg.mouse.move(x, y)
        assert pg.text_content("#tip").startswith("#17")
        pg.mouse.click(x, y)
        pg.wait_for_url(f"{server}/feature/llama/m/17")
        pg.wait_for_selector("#firstnote:has-text('elsewhere')")
        pg.click("#xfirst")  # the toggle reloads the page without the first position
        pg.wait_for_url(f"{server}/feature/llama/m/17?exclude_first=true")
        pg.wait_for_selector("#firstnote:has-text('elsewhere')")
        assert pg.is_checked("#xfirst")
        browser.close()
    assert errors == [] and outside == []


@pytest.mark.slow
def test_umap_layout_is_finite_and_reproducible():
    W = torch.randn(300, 16, generator=torch.Generator().manual_seed(2))
    a, b = dmap.layout(W, "umap", seed=3), dmap.layout(W, "umap", seed=3)
    assert a.shape == (300, 2) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)


def test_map_command_adds_the_map_to_an_older_database_once(built, tmp_path, capsys):
    from saeforge import cli

    old = tmp_path / "old.db"
    shutil.copy(built["old"], old)
    assert cli.main(["map", str(old), "--map-method", "pca"]) == 0
    got, want = dmap.map_points(FeatureDB(old)), dmap.map_points(FeatureDB(built["db"]))
    assert got["x"] == want["x"] and got["cluster"] == want["cluster"] and got["method"] == "pca"
    assert dmap.tree_node(FeatureDB(old), None)["size"] == D_SAE
    assert cli.main(["map", str(old)]) == 0
    assert "already has a map" in capsys.readouterr().out
    # a bad method is a one-line user error, exit 2, and leaves the map in place
    assert cli.main(["map", str(old), "--force", "--map-method", "tsne"]) == 2
    assert "expected auto, pca, umap or none" in capsys.readouterr().err
    assert dmap.map_points(FeatureDB(old))["x"] == want["x"]
