"""The viewer over real HTTP: a uvicorn server on a loopback port, two SAEs side by side, a corpus that
carries HTML/script payloads; API checks with httpx, then the pages in headless Debian Chromium."""

import json
from pathlib import Path

import httpx
import loopback
import pytest
import torch

HOOKS = {"a": "blocks.1.hook_resid_post", "b": "blocks.2.hook_resid_post"}
PAYLOAD = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def built(tiny_model_dirs, text_corpus, tmp_path_factory):
    """Two feature databases (SAEs a and b on the tiny llama) over a corpus full of payloads."""
    from saeforge.saes.formats import save_sae
    from saeforge.saes.registry import config_class, sae_class
    from saeforge.viewer.config import IndexConfig
    from saeforge.viewer.index import build_index

    root = tmp_path_factory.mktemp("viewer_server")
    corpus = root / "corpus"
    corpus.mkdir()
    for src in sorted(Path(text_corpus).iterdir()):
        lines = src.read_text().splitlines()
        # a payload every 15 lines, in every document, so top contexts are sure to contain some
        (corpus / src.name).write_text(
            "\n".join(l + (f" {PAYLOAD}" if i % 15 == 0 else "") for i, l in enumerate(lines))
        )
    model = tiny_model_dirs["llama"]
    dbs = {}
    for i, (name, hook) in enumerate(HOOKS.items()):
        sae = sae_class("topk")(config_class("topk")(d_in=64, d_sae=128 + 64 * i, k=6))
        torch.nn.init.normal_(sae.b_enc, std=0.05, generator=torch.Generator().manual_seed(i))
        save_sae(
            sae,
            root / name,
            {
                "model_name": str(model),
                "hook_name": hook,
                "context_size": 48,
                "dataset_path": str(corpus),
                "prepend_bos": True,
            },
        )
        cfg = IndexConfig(tokens=5000, top_k=6, per_interval=2, lm_batch_size=8, n_logits=5, n_neighbours=4, name=name)
        dbs[name] = build_index(
            root / name, root / f"{name}.db", cfg, {"data": {"holdout_fraction": 0.1}}, progress=False
        )
    return {"dbs": dbs, "model": model, "root": root}


@pytest.fixture(scope="module")
def server(built):
    from saeforge.viewer.server import create_app

    built["app"] = app = create_app(list(built["dbs"].values()))
    with loopback.serve(app) as url:
        yield url


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def _payload_feature(http):
    """(index, activation) of a top context in SAE a whose text holds the script payload."""
    for row in http.get("/api/features/llama/a", params={"limit": 500, "alive_only": True}).json()["features"]:
        f = http.get(f"/api/feature/llama/a/{row['index']}").json()
        for a in f["activations"]:
            if "<script>" in "".join(a["tokens"]) and a["kind"] == "top":
                return row["index"], f
    pytest.fail("no top context contains the payload")


# ---- API -------------------------------------------------------------------------------
def test_saes_listing_and_openapi(http):
    saes = http.get("/api/saes").json()["saes"]
    assert [(s["model_id"], s["sae_id"], s["hook"], s["d_sae"]) for s in saes] == [
        ("llama", "a", HOOKS["a"], 128),
        ("llama", "b", HOOKS["b"], 192),
    ]
    spec = http.get("/openapi.json").json()
    for path in (
        "/api/feature/{model}/{sae}/{index}",
        "/api/features/{model}/{sae}",
        "/api/search",
        "/api/activations",
        "/api/activation/{model}/{sae}/{index}",
        "/api/saes",
    ):
        assert path in spec["paths"], path


def test_feature_json_is_neuronpedia_shaped_and_consistent(http, built):
    from saeforge.viewer.db import FeatureDB

    db = FeatureDB(built["dbs"]["a"])
    idx = db.list_features(limit=1)[0]["index"]
    f = http.get(f"/api/feature/llama/a/{idx}").json()
    for key in (
        "modelId",
        "layer",
        "index",
        "maxActApprox",
        "frac_nonzero",
        "pos_str",
        "pos_values",
        "neg_str",
        "neg_values",
        "freq_hist_data_bar_heights",
        "freq_hist_data_bar_values",
        "topkCosSimIndices",
        "topkCosSimValues",
        "activations",
        "explanations",
    ):
        assert key in f, key
    assert (f["modelId"], f["layer"], f["index"]) == ("llama", "a", str(idx))
    row = db.query("SELECT density, max_act, fire_count FROM features WHERE idx = ?", (idx,))[0]
    assert (
        f["frac_nonzero"] == row[0] and f["maxActApprox"] == row[1] and sum(f["freq_hist_data_bar_heights"]) == row[2]
    )
    assert len(f["pos_str"]) == 5 and f["pos_values"] == sorted(f["pos_values"], reverse=True)
    assert f["neg_values"] == sorted(f["neg_values"]) and len(f["topkCosSimIndices"]) == 4
    top = [a for a in f["activations"] if a["kind"] == "top"]
    assert top[0]["maxValue"] == pytest.approx(f["maxActApprox"])
    for a in f["activations"]:
        assert len(a["tokens"]) == len(a["values"]) and a["values"][a["maxValueTokenIndex"]] == pytest.approx(
            a["maxValue"], rel=1e-5
        )
    quant = [a for a in f["activations"] if a["kind"] == "quantile"]
    assert quant and all(a["binMin"] <= a["maxValue"] <= a["binMax"] for a in quant)


def test_a_repeated_feature_request_is_the_cached_bytes_with_the_same_headers(http, built):
    cache = built["app"].state.json_cache
    idx = http.get("/api/features/llama/a", params={"sort": "index", "limit": 1}).json()["features"][0]["index"]
    hits, misses, peeked = cache.hits, cache.misses, cache.peeked
    first, again = (http.get(f"/api/feature/llama/a/{idx}") for _ in range(2))
    # built once by the app, then answered by the middleware from the cache
    assert (cache.hits, cache.misses, cache.peeked) == (hits + 1, misses + 1, peeked + 1)
    assert first.status_code == again.status_code == 200 and again.content == first.content
    for h in ("content-type", "content-length"):
        assert again.headers[h] == first.headers[h]
    assert first.headers["content-type"] == "application/json"
    # a query string, an unknown SAE, a non-numeric index and a trailing slash all reach the app's own routes
    assert http.get(f"/api/feature/llama/a/{idx}", params={"exclude_first": "false"}).content == first.content
    assert http.get(f"/api/feature/llama/nope/{idx}").status_code == 404
    assert http.get("/api/feature/llama/a/x1").status_code == 422
    assert http.get(f"/api/feature/llama/a/{idx}/").status_code in (307, 404)


def test_stored_feature_json_is_the_json_built_from_the_tables(built, http, tmp_path):
    """`saeforge index` stores each feature's index-time JSON (table feature_json): the bytes served from it equal
    the bytes built from the tables without it, for every feature, before and after explanations and
    meta-latents are added to the database."""
    import shutil
    import zlib

    from saeforge.viewer import explain, metadb
    from saeforge.viewer.db import FeatureDB, write_transaction
    from saeforge.viewer.explain_run import open_rw
    from saeforge.viewer.featurejson import feature_bytes

    stored, plain = tmp_path / "stored.db", tmp_path / "plain.db"
    shutil.copy(built["dbs"]["a"], stored)
    shutil.copy(stored, plain)
    with write_transaction(plain) as con:
        con.execute("DROP TABLE feature_json")
    a, b = FeatureDB(stored), FeatureDB(plain)
    assert not b.has_table("feature_json") and a.query("SELECT COUNT(*) FROM feature_json") == [(a.d_sae,)]
    for i in range(a.d_sae):
        assert feature_bytes(a, i) == feature_bytes(b, i), i
    f, g = (r["index"] for r in a.list_features(limit=2))  # the two densest features
    assert feature_bytes(a, f) == http.get(f"/api/feature/llama/a/{f}").content
    older = tmp_path / "older.db"  # stored by a saeforge whose JSON had another shape: built from the tables
    shutil.copy(stored, older)
    with write_transaction(older) as con:
        con.execute("UPDATE feature_json SET body = ?", (zlib.compress(b'{"old":1}'),))
        con.execute("UPDATE meta SET value = '0' WHERE key = 'feature_json_version'")
    assert feature_bytes(FeatureDB(older), f) == feature_bytes(b, f)
    assert feature_bytes(a, a.d_sae) is None and feature_bytes(b, a.d_sae) is None
    for path in (stored, plain):  # what `saeforge explain` and `saeforge meta` add later
        _, con = open_rw(path)
        explain.write_results(con, "baseline", [(f, 'tokens: "<b>x"', {"simulation": 0.5})])
        con.close()
        with write_transaction(path) as con:
            for stmt in filter(str.strip, metadb.SCHEMA.split(";")):
                con.execute(stmt)
            con.executemany("INSERT INTO meta_latents VALUES (?, ?, ?, ?)", [(f, 0, 2, 0.9), (g, 0, 2, 0.4)])
    assert feature_bytes(a, f) == feature_bytes(b, f)
    got = json.loads(feature_bytes(a, f))
    assert [(e["description"], e["score"]) for e in got["explanations"]] == [('tokens: "<b>x"', 0.5)]
    assert got["meta"] == [{"latent": 2, "activation": 0.9, "shared_with": [{"index": g, "activation": 0.4}]}]
    assert got["activations"] == json.loads(feature_bytes(b, f))["activations"] != []


def test_feature_list_sorts_and_pages(http, built):
    from saeforge.viewer.db import FeatureDB

    dens = [r[0] for r in FeatureDB(built["dbs"]["b"]).query("SELECT density FROM features")]
    down = http.get("/api/features/llama/b", params={"limit": 500}).json()["features"]
    assert [r["density"] for r in down] == sorted(dens, reverse=True) and len(down) == 192
    up = http.get("/api/features/llama/b", params={"order": "asc", "limit": 20, "offset": 10}).json()["features"]
    assert [r["density"] for r in up] == sorted(dens)[10:30]
    assert http.get("/api/features/llama/b", params={"sort": "nonsense"}).status_code == 400


def _common_peak_text(db):
    """The text of the token most top contexts peak on (something a search must find)."""
    ((tok, _),) = db.query(
        "SELECT max_token, COUNT(*) AS n FROM contexts c JOIN vocab v ON v.id = c.max_token "
        "WHERE kind = 'top' AND trim(v.text) != '' GROUP BY max_token ORDER BY n DESC LIMIT 1"
    )
    return db.texts([tok])[0].strip()


def test_search_by_token_text_matches_the_database(http, built):
    from saeforge.viewer.db import FeatureDB

    db = FeatureDB(built["dbs"]["a"])
    q = _common_peak_text(db)
    brute = {}
    for f, tok in db.query("SELECT feature, max_token FROM contexts WHERE kind = 'top'"):
        if q.lower() in db.texts([tok])[0].lower():
            brute[f] = brute.get(f, 0) + 1
    res = http.get("/api/search", params={"q": q, "model": "llama", "sae": "a"}).json()["results"]
    assert brute and {r["index"]: r["matching_contexts"] for r in res} == brute
    counts = [r["matching_contexts"] for r in res]
    assert counts == sorted(counts, reverse=True)
    both = http.get("/api/search", params={"q": q}).json()["results"]
    assert {r["sae"] for r in both} <= {"a", "b"} and len(both) >= len(res)
    assert http.get("/api/search", params={"q": "%"}).json()["results"] == []  # LIKE wildcards are literal


def test_bad_requests_get_json_errors_never_tracebacks(http):
    cases = [
        ("GET", "/api/feature/llama/zzz/1", 404),
        ("GET", "/api/feature/nomodel/a/1", 404),
        ("GET", "/api/feature/llama/a/128", 404),
        ("GET", "/api/feature/llama/a/-1", 404),
        ("GET", "/api/feature/llama/a/abc", 422),
        ("GET", "/feature/llama/a/99999", 404),
        ("GET", "/api/features/llama/nope", 404),
        ("GET", "/no/such/route", 404),
        ("GET", "/static/..%2f..%2fpyproject.toml", 404),
        ("GET", "/static/db.py", 404),
        ("POST", "/api/activations", 422),
        ("POST", "/api/activation/llama/a/100000", 422),
        ("POST", "/api/activation/llama/a/100000", 404),
    ]
    for i, (method, url, code) in enumerate(cases):
        r = http.request(method, url, json={"text": "x"} if i == len(cases) - 1 else None)
        assert r.status_code == code, (url, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json") and "error" in r.json(), url
        assert "Traceback" not in r.text and 'File "' not in r.text
    r = http.post("/api/activations", json={"text": "hi", "saes": ["llama/nope"]})
    assert r.status_code == 404 and "llama/nope" in r.json()["error"]


def test_negative_or_out_of_range_paging_is_a_422(http):
    cases = [
        ("/api/features/llama/a", {"offset": -5}, "offset"),
        ("/api/features/llama/a", {"limit": -1}, "limit"),
        ("/api/features/llama/a", {"limit": 0}, "limit"),
        ("/api/features/llama/a", {"limit": 501}, "limit"),
        ("/api/search", {"q": "a", "limit": 0}, "limit"),
        ("/api/search", {"q": "a", "limit": -3}, "limit"),
        ("/api/search", {"q": "a", "limit": 501}, "limit"),
    ]
    for url, params, name in cases:
        r = http.get(url, params=params)
        assert r.status_code == 422, (url, params, r.status_code, r.text)
        assert name in r.json()["error"] and "Traceback" not in r.text, r.text
    # the bounds themselves are accepted, and they page exactly
    all_ = http.get("/api/features/llama/a", params={"limit": 500, "sort": "index", "order": "asc"}).json()
    assert [f["index"] for f in all_["features"]] == list(range(128))
    last = http.get("/api/features/llama/a", params={"limit": 1, "offset": 127, "sort": "index"}).json()
    assert last["offset"] == 127 and [f["index"] for f in last["features"]] == [0]  # desc: the smallest comes last
    assert http.get("/api/features/llama/a", params={"offset": 0, "limit": 1}).status_code == 200
    one, many = (
        http.get("/api/search", params={"q": "e", "model": "llama", "sae": "a", "limit": n}).json()["results"]
        for n in (1, 500)
    )
    assert len(many) > 1 and one == many[:1]


def test_payload_is_data_in_json_and_absent_from_html(http):
    idx, f = _payload_feature(http)
    page = http.get(f"/feature/llama/a/{idx}")
    assert page.status_code == 200 and "__pwned" not in page.text  # pages are static; data arrives as JSON
    assert (
        "script-src" in page.headers["content-security-policy"]
        or "default-src 'self'" in page.headers["content-security-policy"]
    )
    assert any("<script>" in "".join(a["tokens"]) for a in f["activations"])


def test_live_activations_equal_a_direct_forward(http, built):
    from saeforge.data import excluded_mask
    from saeforge.evals.setup import eval_setup_for
    from saeforge.models import load_model, resolve_dtype, resolve_hook
    from saeforge.models.hooks import capture
    from saeforge.saes.formats import load_sae
    from saeforge.viewer.db import FeatureDB

    text = "def add(a, b):\n    return a + b"
    res = http.post("/api/activations", json={"text": text, "top": 3}).json()["results"]
    assert [(r["model"], r["sae"]) for r in res] == [("llama", "a"), ("llama", "b")]
    # The live box runs the LM in the index's dtype (auto: bf16 where bf16 is fast), so the direct forward does too:
    # the same weights, shapes and kernels give the same numbers, in either dtype.
    dtype = FeatureDB(built["dbs"]["a"]).meta["model_dtype"]
    assert dtype == str(resolve_dtype("auto")).replace("torch.", "")
    lm = load_model(str(built["model"]), dtype=dtype)
    for r in res:
        sae = load_sae(built["root"] / r["sae"])
        ids = [lm.tokenizer.bos_token_id] + lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert r["token_ids"] == ids and r["tokens"][1:] == [lm.tokenizer.decode([i]) for i in ids[1:]]
        tokens = torch.tensor([ids])
        acts = capture(lm.model, [resolve_hook(lm.model, HOOKS[r["sae"]])], tokens)[HOOKS[r["sae"]]][0]
        with torch.no_grad():
            f = (
                sae.encode(acts)
                * ~excluded_mask(tokens, lm.tokenizer, eval_setup_for(built["root"] / r["sae"]).data)[0, :, None]
            )
        for t, feats in enumerate(r["features"]):
            vals, idx = f[t].topk(3)
            want = [(int(i), float(v)) for v, i in zip(vals, idx) if v > 0]
            assert [(x["index"], pytest.approx(x["value"], rel=1e-4)) for x in feats] == [(i, v) for i, v in want]
        one = http.post(f"/api/activation/llama/{r['sae']}/{r['features'][2][0]['index']}", json={"text": text}).json()
        assert one["values"][2] == pytest.approx(r["features"][2][0]["value"], rel=1e-5) and one["values"][0] == 0.0


def test_export_neuronpedia_writes_batches_matching_the_api(http, built, tmp_path):
    from saeforge.cli import main

    out = tmp_path / "np"
    assert main(["export-neuronpedia", str(built["dbs"]["a"]), "--out", str(out), "--batch-size", "50", "--quiet"]) == 0
    batches = sorted(out.glob("batch-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    assert len(batches) == 3 and (out / "run_settings.json").exists()
    first = json.loads(batches[0].read_text())
    assert (first["model_id"], first["layer"], first["sae_set"]) == ("llama", 1, "a")
    feats = [f for b in batches for f in json.loads(b.read_text())["features"]]
    assert [f["feature_index"] for f in feats] == list(range(128))
    api = http.get("/api/feature/llama/a/7").json()
    mine = feats[7]
    assert mine["pos_str"] == api["pos_str"] and mine["frac_nonzero"] == api["frac_nonzero"]
    assert [a["values"] for a in mine["activations"]] == [a["values"] for a in api["activations"]]
    assert all({"bin_min", "bin_max", "bin_contains", "tokens", "values"} <= set(a) for a in mine["activations"])


# ---- the pages in Chromium ---------------------------------------------------------------
@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium")),
            executable_path="/usr/bin/chromium",
            headless=True,
            viewport={"width": 1280, "height": 900},
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        pg = browser.new_page()
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        pg.errors = errors
        yield pg
        browser.close()


@pytest.mark.browser
def test_browser_feature_page_renders_escaped_contexts_and_tables(page, server, http):
    ARTIFACTS.mkdir(exist_ok=True)
    idx, f = _payload_feature(http)
    page.goto(f"{server}/feature/llama/a/{idx}")
    page.wait_for_selector("#top .ctx")
    n_top = sum(a["kind"] == "top" for a in f["activations"])
    assert page.locator("#top .ctx").count() == n_top
    assert page.locator("#quantiles .ctx").count() == len(f["activations"]) - n_top
    assert page.locator("#pos tbody tr").count() == 5 and page.locator("#neg tbody tr").count() == 5
    assert page.locator("#hist rect").count() == len(f["freq_hist_data_bar_heights"])
    assert page.locator("#neighbours a").count() == 4
    highlighted = page.eval_on_selector_all("#top .ctx .tok", "els => els.filter(e => e.style.backgroundColor).length")
    assert highlighted >= n_top
    # the payload is shown as text and never ran
    assert any("<script>" in t for t in page.locator("#top .ctx").all_text_contents())
    assert page.evaluate("window.__pwned") is None and page.locator("#top img, #quantiles img").count() == 0
    assert page.locator("#steer-slot").count() == 1
    page.screenshot(path=str(ARTIFACTS / "viewer-feature.png"), full_page=True)
    assert page.errors == []


@pytest.mark.browser
def test_browser_feature_list_and_search(page, server, built):
    from saeforge.viewer.db import FeatureDB

    q = _common_peak_text(FeatureDB(built["dbs"]["b"]))
    page.goto(f"{server}/")
    page.wait_for_selector("#features tbody tr")
    assert page.locator("#features tbody tr").count() == 50
    page.select_option("#sae", "llama/b")
    page.fill("#q", q)
    page.click("#go")
    # a selector wait, not wait_for_function: that polls with eval, which the page's CSP refuses
    page.locator("#status", has_text="peak on tokens").wait_for()
    rows = page.locator("#features tbody tr")
    assert rows.count() > 0 and all(t.startswith("llama/b") for t in rows.locator("td:first-child").all_text_contents())
    assert page.errors == []


@pytest.mark.browser
def test_browser_live_box_shows_activations_for_both_saes(page, server, http):
    text = "for i in range(10): print(i)"
    want = http.post("/api/activations", json={"text": text, "top": 3}).json()["results"]
    page.goto(f"{server}/live")
    page.fill("#text", text)
    page.click("#run")
    page.wait_for_selector("#live tbody tr.livetok")
    assert page.locator("#live thead th").all_text_contents() == ["token", "llama / a", "llama / b"]
    assert page.locator("#live tbody tr.livetok").count() == len(want[0]["tokens"])
    second = page.locator("#live tbody tr.livetok").nth(1).locator("td")
    assert second.nth(1).locator("a").all_text_contents() == [f"#{x['index']}" for x in want[0]["features"][1]]
    assert second.nth(2).locator("a").all_text_contents() == [f"#{x['index']}" for x in want[1]["features"][1]]
    page.screenshot(path=str(ARTIFACTS / "viewer-live.png"), full_page=True)
    assert page.errors == []
