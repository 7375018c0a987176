"""`saeforge report RUN_DIR` and the Training section of `eval --report`: every drawn point is a metrics.jsonl value."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import tiny

from saeforge.cli import main

pytestmark = pytest.mark.slow

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
NOT_CURVES = {"step", "tokens", "elapsed_s", "source_s"}  # the x axis and the clocks; every other number is drawn


def train(model, corpus, out, name, *extra):
    options = {"hook": HOOK, "tokens": 3072, "activations.shuffle_sequences": 32, "sae.d_sae": 128, "sae.k": 4}
    options |= {"train.log_every_steps": 2, "train.checkpoint_every_steps": 4}
    args = tiny.train_args(model, corpus, out, name, options, "--no-eval", "--quiet", *extra)
    assert main([str(a) for a in args]) == 0


@pytest.fixture(scope="module")
def runs(tiny_model_dirs, text_corpus, tmp_path_factory):
    """One run and a two-point sweep (3072 tokens, batches of 256, a log line every 2 steps: 6 lines each)."""
    out = tmp_path_factory.mktemp("runs")
    train(tiny_model_dirs["llama"], text_corpus, out, "run")
    train(tiny_model_dirs["llama"], text_corpus, out, "sw", "--sweep", "sae.k=4,8")
    return {"run": out / "run", "sweep": out / "sw"}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected_points(recs: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """chart name -> (tokens, value) of every record, straight from the JSONL."""
    keys = {k for r in recs for k, v in r.items() if isinstance(v, (int, float))} - NOT_CURVES
    return {f"train-{k}": [(r["tokens"], r[k]) for r in recs if k in r and math.isfinite(r[k])] for k in keys}


def drawn(html: str) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """chart name -> series -> [(data-x, data-y)] of its circles, for the training charts of a page."""
    out = {}
    for name, body in re.findall(r'<svg class="plot" data-plot="(train-[^"]+)"(.*?)</svg>', html, re.S):
        series: dict[str, list] = {}
        for s, x, y in re.findall(r'<circle [^>]*data-series="([^"]*)" data-x="([^"]+)" data-y="([^"]+)"', body):
            series.setdefault(s, []).append((float(x), float(y)))
        out[name] = series
    return out


def report(folder: Path, *extra) -> str:
    assert main(["report", str(folder), *map(str, extra)]) == 0
    return (Path(extra[1]) if extra else folder / "training.html").read_text()


def test_run_page_draws_every_logged_value_against_tokens(runs, capsys):
    recs = records(runs["run"])
    assert len(recs) >= 5 and recs[-1]["tokens"] == 3072
    html = report(runs["run"])
    assert f"wrote {runs['run'] / 'training.html'}" in capsys.readouterr().out
    want = expected_points(recs)
    # topk logs fvu, mse and auxk beside the loss; tokens/s is drawn from the log's own number
    assert {
        "train-loss",
        "train-fvu",
        "train-mse",
        "train-auxk",
        "train-explained_variance",
        "train-l0",
        "train-dead_fraction",
        "train-lr",
        "train-tokens_per_s",
    } <= set(want)
    got = drawn(html)
    assert set(got) == set(want)
    for name, points in want.items():
        assert got[name] == {"run": points}, name
    # tokens/s is tokens over elapsed seconds
    assert [r["tokens_per_s"] for r in recs] == pytest.approx([r["tokens"] / r["elapsed_s"] for r in recs])
    assert "<script" not in html and set(re.findall(r"https?://[^\"' ]+", html)) == {"http://www.w3.org/2000/svg"}


def test_sweep_page_has_one_series_per_point_on_shared_axes(runs, tmp_path):
    html = report(runs["sweep"], "--out", tmp_path / "sweep.html")
    per_point = {p: expected_points(records(runs["sweep"] / p)) for p in ("k=4", "k=8")}
    got = drawn(html)
    assert set(got) == set(per_point["k=4"]) == set(per_point["k=8"])
    for name, series in got.items():
        assert series == {p: per_point[p][name] for p in ("k=4", "k=8")}, name
    assert ">k=4</text>" in html and ">k=8</text>" in html  # the legend names each point
    l0 = {s: [y for _, y in pts] for s, pts in got["train-l0"].items()}
    assert l0["k=4"][-1] == pytest.approx(4.0) and l0["k=8"][-1] == pytest.approx(8.0)


def test_half_written_last_line_is_skipped(runs, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(runs["run"], cut, ignore=shutil.ignore_patterns("sae", "*.pt", "*.html"))
    whole = (cut / "metrics.jsonl").read_text()
    (cut / "metrics.jsonl").write_text(whole + '{"step": 14, "tokens": 35')  # killed mid-write
    got = drawn(report(cut))
    assert got == {k: {"cut": v} for k, v in expected_points(records(runs["run"])).items()}
    # damage anywhere else is not papered over
    lines = whole.splitlines()
    (cut / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    assert main(["report", str(cut)]) == 2


def test_folder_without_metrics_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path) in err and "metrics.jsonl" in err
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path) in err and "no complete line" in err
    assert not (tmp_path / "training.html").exists()


def test_eval_report_has_a_training_section(runs):
    sae = runs["run"] / "sae"
    assert main(["eval", str(sae), "--report", "--eval.tokens", 512, "--eval.ce_tokens", 128, "--quiet"]) == 0
    html = (sae / "report.html").read_text()
    assert "<h2>Training</h2>" in html and 'data-plot="density"' in html
    assert drawn(html) == {k: {"run": v} for k, v in expected_points(records(runs["run"])).items()}


def test_constants_match_the_training_layer():
    from saeforge.evals import curves
    from saeforge.training import sweep, sweep_run, trainer

    assert curves.METRICS == trainer.METRICS
    assert set(curves.SWEEP_MARKERS) == {sweep.PLAN_FILE, sweep_run.SWEEP_FILE}


def watched_page(browser):
    """A page that records console errors and warnings, page errors, and requests for anything but local files."""
    page, errors, elsewhere = browser.new_page(), [], []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type in ("error", "warning") else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda req: None if req.url.startswith("file:") else elsewhere.append(req.url))
    return page, errors, elsewhere


@pytest.mark.browser
def test_training_pages_render_in_chromium(runs):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    for folder in runs.values():
        report(folder)  # -> folder/training.html
    want = {"run": {k: {"run": v} for k, v in expected_points(records(runs["run"])).items()}}
    per_point = {p: expected_points(records(runs["sweep"] / p)) for p in ("k=4", "k=8")}
    want["sweep"] = {k: {p: per_point[p][k] for p in per_point} for k in per_point["k=4"]}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            for key in ("run", "sweep"):
                page, errors, elsewhere = watched_page(browser)
                page.goto((runs[key] / "training.html").as_uri())
                page.wait_for_load_state("load")
                assert errors == [] and elsewhere == [], (errors, elsewhere)
                for name in want[key]:
                    box = page.locator(f'svg.plot[data-plot="{name}"]').bounding_box()
                    assert box is not None and box["width"] > 300 and box["height"] > 200, (key, name)
                # what the browser holds in its DOM is the JSONL's numbers
                marks = page.locator('svg.plot[data-plot^="train-"] circle').evaluate_all(
                    "els => els.map(e => [e.closest('svg').dataset.plot, e.dataset.series, +e.dataset.x, +e.dataset.y])"
                )
                got: dict = {}
                for plot, series, x, y in marks:
                    got.setdefault(plot, {}).setdefault(series, []).append((x, y))
                assert got == want[key]
                page.screenshot(path=str(ARTIFACTS / f"training-{key}.png"), full_page=True)
                page.close()
        finally:
            browser.close()
