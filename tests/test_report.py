"""`saeforge eval --report` and `saeforge compare` end to end on a tiny model; pages rendered in headless Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from saeforge import cli
from saeforge.saes.formats import save_sae
from saeforge.saes.registry import config_class, sae_class
from saeforge.training.config import RunConfig

HOOK = "blocks.1.hook_resid_post"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _save(folder: Path, model_dir: Path, corpus: Path, arch: str, d_sae: int, seed: int, **kw) -> Path:
    cfg = RunConfig.from_dict(
        {
            "model": {"name": str(model_dir), "hook": HOOK, "device": "cpu", "dtype": "float32"},
            "data": {"corpus": str(corpus), "context_size": 24, "holdout_fraction": 0.5},
            "eval": {"tokens": 48 * 8, "ce_tokens": 48 * 4, "batch_size": 4},
            "sae": {"architecture": arch, "d_in": 64, "d_sae": d_sae, **kw},
        }
    )
    sae = sae_class(arch)(config_class(arch)(d_in=64, d_sae=d_sae, **kw))
    sae.init_weights(torch.Generator().manual_seed(seed))
    meta = {
        "model_name": str(model_dir),
        "hook_name": HOOK,
        "context_size": 24,
        "dataset_path": str(corpus),
        "saeforge_config": cfg.to_dict(),
    }
    return save_sae(sae, folder, meta)


@pytest.fixture(scope="module")
def saes(tiny_model_dirs, text_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("saes")
    model = tiny_model_dirs["llama"]
    return [
        _save(root / "narrow" / "sae", model, text_corpus, "topk", 64, 0, k=4),
        _save(root / "wide" / "sae", model, text_corpus, "topk", 128, 1, k=8),
        _save(root / "relu" / "sae", model, text_corpus, "relu", 64, 2),
    ]


@pytest.fixture(scope="module")
def outputs(saes, tmp_path_factory):
    """Run both commands once (48-token windows: longer than the 24 the SAEs were 'trained' on)."""
    out = tmp_path_factory.mktemp("out")
    assert (
        cli.main(
            [
                "eval",
                str(saes[0]),
                "--report",
                "--compare",
                str(saes[1]),
                str(saes[2]),
                "--data.context_size",
                "48",
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        cli.main(["compare", *map(str, saes), "--out", str(out / "cmp.html"), "--data.context_size", "48", "--quiet"])
        == 0
    )
    return {
        "report": saes[0] / "report.html",
        "eval": saes[0] / "eval.json",
        "compare": out / "cmp.html",
        "compare_json": out / "cmp.json",
    }


def test_eval_json_and_compare_json_agree(outputs):
    m = json.loads(outputs["eval"].read_text())
    c = json.loads(outputs["compare_json"].read_text())
    assert m["context_size"] == 48 and m["by_position"]["end"][-1] == 48
    assert m["mdl"]["dl_bits"] > 0 and len(m["by_position"]["ce_score"]) == len(m["by_position"]["start"])
    # Absorption ran (the tiny tokenizer may lack single-word tokens: then the page says why instead).
    assert "absorption_rate" in m["absorption"] or "single-word tokens" in m["absorption"]["error"]
    # The same SAE on the same tokens gives the same numbers from both commands.
    first = c["saes"][0]
    assert first["label"] == "narrow" and first["explained_variance"] == m["explained_variance"]
    assert first["ce_sae"] == m["ce_sae"] and first["n_tokens"] == m["n_tokens"]
    assert {s["n_tokens"] for s in c["saes"]} == {m["n_tokens"]}  # same held-out tokens for all
    pair = next(p for p in c["pairs"] if {p["a"], p["b"]} == {"narrow", "wide"})
    st = pair["stitching"]
    assert st["wide"] == "wide" and st["n_reconstruction"] + st["n_novel"] == 128
    assert [d["b"] for d in m["dictionaries"]] == ["wide", "relu"]


def test_pages_are_self_contained(outputs):
    for key in ("report", "compare"):
        html = outputs[key].read_text()
        assert "<script" not in html
        # No external resource: the only URL is the SVG namespace.
        assert set(re.findall(r'(?:src|href)="([^"]*)"', html)) == set()
        assert set(re.findall(r"https?://[^\"' ]+", html)) == {"http://www.w3.org/2000/svg"}


@pytest.mark.browser
def test_pages_render_in_chromium(outputs):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    m = json.loads(outputs["eval"].read_text())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            for key, plots in [
                ("report", ["density", "position-ev", "position-ce", "pareto-ev", "pareto-ce"]),
                ("compare", ["pareto-ev", "pareto-ce", "position-ev", "position-ce"]),
            ]:
                page = browser.new_page()
                errors: list[str] = []
                page.on("console", lambda msg: errors.append(msg.text) if msg.type in ("error", "warning") else None)
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(outputs[key].as_uri())
                page.wait_for_load_state("load")
                assert errors == [], errors
                for name in plots:
                    box = page.locator(f'svg.plot[data-plot="{name}"]').bounding_box()
                    assert box is not None and box["width"] > 300 and box["height"] > 200, (key, name)
                # Each Pareto plot draws one point per SAE, at that SAE's numbers.
                xs = page.locator('svg[data-plot="pareto-ev"] circle').evaluate_all(
                    "els => els.map(e => [e.dataset.series, +e.dataset.x, +e.dataset.y])"
                )
                assert sorted(s for s, _, _ in xs) == ["narrow", "relu", "wide"]
                narrow = next(p for p in xs if p[0] == "narrow")
                assert narrow[1] == pytest.approx(m["l0"]) and narrow[2] == pytest.approx(m["explained_variance"])
                page.screenshot(path=str(ARTIFACTS / f"{key}.png"), full_page=True)
                page.close()
            # The density histogram has one bar per bin with the eval.json counts.
            page = browser.new_page()
            page.goto(outputs["report"].as_uri())
            bars = page.locator('svg[data-plot="density"] rect.bar').evaluate_all("els => els.map(e => +e.dataset.y)")
            assert bars == m["log10_freq_hist_counts"]
            page.close()
        finally:
            browser.close()
