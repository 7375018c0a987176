"""Training curves from metrics.jsonl: one run, or every point of a sweep on shared axes, as an inline-SVG page.

``saeforge report RUN_DIR`` writes the page; ``eval --report`` adds the same charts as a "Training" section
when the SAE folder sits in a run folder (``runs/NAME/sae``). evals sits below training in the layers, so
the JSONL is read here directly: each line is the dict ``training.trainer.Trainer._log`` writes (step,
tokens, lr, dead_fraction, tokens_per_s, elapsed_s, source_s, loss and the architecture's loss parts,
explained_variance and l0 on the logged step's batch).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from saeforge.config import UsageError
from saeforge.evals import svg
from saeforge.evals.html import html_page, write_html

METRICS = "metrics.jsonl"  # training.trainer.METRICS (not importable from here: training is a layer above)
SWEEP_MARKERS = ("sweep_plan.json", "sweep.json")  # training.sweep.PLAN_FILE, training.sweep_run.SWEEP_FILE
TRAINING_PAGE = "training.html"

Run = tuple[str, list[dict[str, Any]]]  # (label, records in log order)

# Logged keys that are not curves: the x axis and the clocks (tokens/s is derived from them).
_NOT_CURVES = {"step", "tokens", "elapsed_s", "source_s", "tokens_per_s"}
# Curves after the loss parts, in this order, with (title, y label).
_TAIL = {
    "explained_variance": ("Explained variance (training batch)", "explained variance"),
    "l0": ("L0 (training batch)", "latents per token"),
    "dead_fraction": ("Dead fraction", "fraction of latents"),
    "lr": ("Learning rate", "learning rate"),
    "tokens_per_s": ("Throughput (mean since the start)", "tokens/s"),
    "p": ("p-annealing: p", "p"),
    "lambda_scale": ("p-annealing: sparsity scale", "lambda scale"),
}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of one metrics.jsonl, in order. A half-written last line (a killed run) is skipped.

    Any other unreadable line is an error naming the file and line: a log that is damaged in the middle
    should not be drawn as if it were whole.
    """
    path = Path(path)
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "tokens" not in rec:
                raise ValueError("not a record with 'tokens'")
        except ValueError as e:
            if i == len(lines) - 1:
                break  # the writer died mid-line
            raise UsageError(
                f"{path}: line {i + 1} is not a metrics record ({e}); is this a saeforge run's log?"
            ) from None
        records.append(rec)
    return records


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def load_runs(folder: str | Path) -> list[Run]:
    """[(label, records)]: the run in ``folder``, or each sub-folder's run (a sweep's points), names in natural order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder (expected a run folder runs/NAME or a sweep folder)")
    if (folder / METRICS).exists():
        files = [(folder.name, folder / METRICS)]
    else:
        files = [
            (d.name, d / METRICS)
            for d in sorted(folder.iterdir(), key=lambda d: _natural(d.name))
            if (d / METRICS).is_file()
        ]
        if not files:
            raise UsageError(
                f"{folder} holds no {METRICS} (nor do its sub-folders): expected a run folder made by "
                "`saeforge train` (runs/NAME) or a sweep folder made by `saeforge train --sweep`"
            )
    runs = [(label, read_metrics(path)) for label, path in files]
    runs = [(label, recs) for label, recs in runs if recs]
    if not runs:
        raise UsageError(
            f"{folder}: {METRICS} has no complete line yet: the run has not logged a step (see train.log_every_steps)"
        )
    return runs


def curve_keys(runs: Sequence[Run]) -> list[str]:
    """Every quantity to draw: loss, the loss parts (as logged), then the _TAIL ones; each only if logged."""
    logged = {k for _, recs in runs for r in recs for k, v in r.items() if isinstance(v, (int, float))}
    if "elapsed_s" in logged:
        logged.add("tokens_per_s")  # derived when an older log lacks it
    parts = sorted((logged - _NOT_CURVES - set(_TAIL) - {"loss"}), key=_natural)
    return ["loss"] * ("loss" in logged) + parts + [k for k in _TAIL if k in logged]


def value(rec: dict[str, Any], key: str) -> float:
    """``rec[key]`` as drawn (NaN when absent); tokens/s is tokens / elapsed_s when the record lacks it."""
    if key == "tokens_per_s" and key not in rec and rec.get("elapsed_s"):
        return rec["tokens"] / rec["elapsed_s"]
    v = rec.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def training_charts(runs: Sequence[Run]) -> list[str]:
    """One line chart per quantity against tokens; every run is a series (the same colour in every chart)."""
    charts = []
    for key in curve_keys(runs):
        title, ylabel = _TAIL.get(key, ("Loss" if key == "loss" else f"Loss part: {key}", key))
        series = [(label, [r["tokens"] for r in recs], [value(r, key) for r in recs]) for label, recs in runs]
        charts.append(svg.line_chart(f"train-{key}", title, "tokens", ylabel, series))
    return charts


NOTE = (
    "Each point is one logged step (train.log_every_steps) of metrics.jsonl, against the tokens trained on so "
    "far. Loss is what was backpropagated (ghost grads included when on); the parts are the architecture's "
    "own terms; explained variance and L0 are measured on that step's training batch (eval.json has the "
    "held-out numbers); a latent is dead once it has not fired for train.dead_after_tokens tokens; "
    "throughput is tokens / elapsed seconds since the run started, the LM's forward passes included."
)


def training_section(runs: Sequence[Run]) -> list[str]:
    """The "Training" block of a page: a note and the charts."""
    last = ", ".join(
        f"{escape(label)}: {recs[-1]['tokens']:,} tokens, step {recs[-1].get('step', '?')}" for label, recs in runs
    )
    return [
        "<h2>Training</h2>",
        f'<p class="note">{NOTE} Last logged: {last}.</p>',
        '<div class="plots">',
        *training_charts(runs),
        "</div>",
    ]


def sae_training_section(sae_dir: str | Path) -> list[str]:
    """The Training section for an SAE saved by ``saeforge train`` (its run's log is ../metrics.jsonl), else []."""
    run_dir = Path(sae_dir).resolve().parent
    if not (run_dir / METRICS).exists():
        return []
    try:
        return training_section(load_runs(run_dir))
    except UsageError as e:  # the eval itself is fine: say why the curves are missing instead of failing it
        return ["<h2>Training</h2>", f'<p class="note">No training curves: {escape(str(e))}</p>']


def render_training(folder: str | Path) -> str:
    """The whole page for ``saeforge report``: a run's curves, or a sweep's points on shared axes."""
    folder = Path(folder)
    runs = load_runs(folder)
    several = len(runs) > 1 or not (folder / METRICS).exists()
    kind = "sweep" if any((folder / m).exists() for m in SWEEP_MARKERS) else "runs"
    title = f"Training: {folder.resolve().name}" + (f" ({kind} of {len(runs)})" if several else "")
    return html_page(title, [f"<h1>{escape(title)}</h1>", *training_section(runs)])


def write_training_report(folder: str | Path, out: str | Path | None = None) -> Path:
    """Render and write atomically (default ``folder/training.html``); returns the path written."""
    return write_html(render_training(folder), Path(out) if out else Path(folder) / TRAINING_PAGE)
