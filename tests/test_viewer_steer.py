"""The feature page's steering panel over real HTTP: ``POST /api/steer`` against a direct
``steer_generate`` call on the same tiny model and SAE, its errors, then the panel in headless Chromium."""

import shutil
import sqlite3
from pathlib import Path

import httpx
import loopback
import pytest
import torch

HOOK = "blocks.1.hook_resid_post"
PAYLOAD = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def built(tiny_model_dirs, text_corpus, tmp_path_factory):
    """An indexed tiny SAE ("s"), plus a copy of its database ("gone") whose SAE folder no longer exists."""
    from saeforge.saes.formats import save_sae
    from saeforge.saes.registry import config_class, sae_class
    from saeforge.viewer.config import IndexConfig
    from saeforge.viewer.index import build_index

    root = tmp_path_factory.mktemp("viewer_steer")
    model = tiny_model_dirs["llama"]
    sae = sae_class("topk")(config_class("topk")(d_in=64, d_sae=96, k=6))
    torch.nn.init.normal_(sae.b_enc, std=0.05, generator=torch.Generator().manual_seed(0))
    save_sae(
        sae,
        root / "s",
        {
            "model_name": str(model),
            "hook_name": HOOK,
            "context_size": 32,
            "dataset_path": str(text_corpus),
            "prepend_bos": True,
        },
    )
    cfg = IndexConfig(tokens=1500, top_k=3, per_interval=1, lm_batch_size=8, n_logits=3, n_neighbours=2, name="s")
    db = build_index(root / "s", root / "s.db", cfg, {"data": {"holdout_fraction": 0.1}}, progress=False)
    gone = root / "gone.db"
    shutil.copy(db, gone)
    with sqlite3.connect(gone) as c:
        c.execute("UPDATE meta SET value = ? WHERE key = 'sae_id'", ('"gone"',))
        c.execute("UPDATE meta SET value = ? WHERE key = 'sae_dir'", (f'"{root / "missing-sae"}"',))
    return {"dbs": [db, gone], "sae_dir": root / "s"}


@pytest.fixture(scope="module")
def server(built):
    from saeforge.viewer.server import create_app

    app = create_app(built["dbs"])
    with loopback.serve(app) as url:
        yield url


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def direct(built):
    """(lm, sae, hook) loaded independently of the server, as a Python user would, in the LM dtype the server uses.

    The live model runs in the index's dtype (auto: bf16 where bf16 is fast); greedy text from a float32 forward
    can differ from a bf16 one wherever two next-token logits are within bf16's rounding, so compare like with like.
    """
    from saeforge.analysis.common import load_for_analysis
    from saeforge.models import resolve_dtype
    from saeforge.viewer.db import FeatureDB

    dtype = FeatureDB(built["dbs"][0]).meta["model_dtype"]
    assert dtype == str(resolve_dtype("auto")).replace("torch.", "")
    return load_for_analysis(built["sae_dir"], dtype=dtype)


# ---- API -------------------------------------------------------------------------------
def test_steer_api_equals_a_direct_steer_generate(http, direct):
    from saeforge.analysis.steering import steer_generate

    lm, sae, hook = direct
    for feature, alpha, positions, n in [(5, 40.0, "all", 12), (17, -25.0, "last", 8)]:
        body = {"prompt": "def add(a, b):", "alpha": alpha, "positions": positions, "max_new_tokens": n}
        r = http.post(f"/api/steer/llama/s/{feature}", json=body)
        assert r.status_code == 200, r.text
        want = steer_generate(lm, sae, feature, alpha, body["prompt"], hook=hook, positions=positions, max_new_tokens=n)
        assert r.json() == {"clean": want.clean, "steered": want.steered}
        assert want.clean != want.steered  # the edit is strong enough to change a greedy continuation
        assert len(lm.tokenizer(want.clean, add_special_tokens=False)["input_ids"]) >= n // 2  # tokens were generated
        assert http.post(f"/api/steer/llama/s/{feature}", json=body).json() == r.json()  # greedy: same every time
    default = http.post("/api/steer/llama/s/5", json={"prompt": "import os", "alpha": 40}).json()
    want = steer_generate(lm, sae, 5, 40.0, "import os", hook=hook, max_new_tokens=24)  # defaults: 24 tokens, all
    assert default == {"clean": want.clean, "steered": want.steered}


def test_alpha_zero_steers_nothing(http):
    r = http.post("/api/steer/llama/s/5", json={"prompt": "for i in range(10):", "alpha": 0, "max_new_tokens": 10})
    assert r.status_code == 200 and r.json()["steered"] == r.json()["clean"] and r.json()["clean"]


def test_steer_errors_are_json(http):
    ok = {"prompt": "x", "alpha": 1.0}
    cases = [
        ("/api/steer/llama/nope/1", ok, 404, "no SAE llama/nope"),
        ("/api/steer/other/s/1", ok, 404, "no SAE other/s"),
        ("/api/steer/llama/s/96", ok, 404, "features 0..95"),
        ("/api/steer/llama/s/-1", ok, 404, "features 0..95"),
        ("/api/steer/llama/s/abc", ok, 422, "index"),
        ("/api/steer/llama/s/1", {"alpha": 1.0}, 422, "prompt"),
        ("/api/steer/llama/s/1", {"prompt": "", "alpha": 1.0}, 422, "prompt"),
        ("/api/steer/llama/s/1", {"prompt": "x" * 2001, "alpha": 1.0}, 422, "prompt"),
        ("/api/steer/llama/s/1", {"prompt": "x"}, 422, "alpha"),
        ("/api/steer/llama/s/1", {"prompt": "x", "alpha": 1e6}, 422, "alpha"),
        ("/api/steer/llama/s/1", {"prompt": "x", "alpha": "big"}, 422, "alpha"),
        ("/api/steer/llama/s/1", {**ok, "max_new_tokens": 0}, 422, "max_new_tokens"),
        ("/api/steer/llama/s/1", {**ok, "max_new_tokens": 65}, 422, "max_new_tokens"),
        ("/api/steer/llama/s/1", {**ok, "positions": "fires:3"}, 422, "positions"),
        ("/api/steer/llama/gone/1", ok, 503, "missing-sae"),
    ]
    for url, body, code, words in cases:
        r = http.post(url, json=body)
        assert r.status_code == code, (url, body, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json") and words in r.json()["error"], (url, r.text)
        assert "Traceback" not in r.text
    r = http.post("/api/steer/llama/s/1", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "error" in r.json()


def test_steer_in_openapi_and_off_without_live(http, built):
    from fastapi.testclient import TestClient

    from saeforge.viewer.server import create_app

    op = http.get("/openapi.json").json()["paths"]["/api/steer/{model}/{sae}/{index}"]["post"]
    assert "requestBody" in op and "200" in op["responses"]
    with TestClient(create_app(built["dbs"][:1], live=False)) as c:
        r = c.post("/api/steer/llama/s/1", json={"prompt": "x", "alpha": 1})
    assert r.status_code == 503 and "--no-live" in r.json()["error"]


# ---- the panel in Chromium -----------------------------------------------------------------
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
def test_browser_steering_panel_shows_both_generations_as_text(page, server, http):
    prompt = f"def add(a, b): {PAYLOAD}"
    want = http.post("/api/steer/llama/s/5", json={"prompt": prompt, "alpha": 40, "max_new_tokens": 12}).json()
    page.goto(f"{server}/feature/llama/s/5")
    page.wait_for_selector("#top .ctx, #top .note")  # the feature's own data has rendered
    page.fill("#sprompt", prompt)
    page.fill("#salpha", "40")
    page.fill("#snew", "12")
    page.click("#srun")
    page.wait_for_selector("#ssteered .cont")
    assert page.locator("#sclean .cont").text_content() == want["clean"]
    assert page.locator("#ssteered .cont").text_content() == want["steered"]
    assert page.locator("#sclean .prompt").text_content() == prompt  # the payload is shown as text...
    assert page.evaluate("window.__pwned") is None  # ...and never ran
    assert page.locator("#steer-slot img, #steer-slot script").count() == 0
    assert page.locator("#sstatus").text_content() == ""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "viewer-steer.png"), full_page=True)
    assert page.errors == []
    page.fill("#salpha", "5000")  # out of bounds: the API's message is shown, nothing crashes
    page.click("#srun")
    # a selector wait, not wait_for_function: that polls with eval, which the page's CSP refuses
    page.locator("#sstatus", has_text="error:").wait_for()
    assert "alpha" in page.locator("#sstatus").text_content()
    assert len(page.errors) == 1 and "422" in page.errors[0]  # Chromium logs the refused request, nothing else
