"""Evaluate an SAE folder on the held-out text of the corpus it was trained on (see evals/setup.py).

An SAE from the Hub (``hf://OWNER/REPO/PATH``) is read from the HF cache, and its results go to
``hf/OWNER/REPO/PATH/`` under the working directory instead (saes/hub.py ``output_dir``).

One result per corpus: the held-out part of the SAE's own corpus (what training evaluates) goes to
``eval.json`` / ``report.html``; another corpus (``--data.corpus``) to ``eval.<slug>.json`` /
``report.<slug>.html`` beside it, so evaluating elsewhere never replaces the training result.
Every eval JSON names its corpus (``"corpus"``).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from saeforge.config import ConfigError, DataConfig, EvalSetup
from saeforge.evals.absorption import first_letter_absorption
from saeforge.evals.compare import compare_saved, sae_label, trained_context
from saeforge.evals.curves import sae_training_section
from saeforge.evals.html import render_report, write_html
from saeforge.evals.report import evaluate, write_eval_json
from saeforge.evals.setup import eval_setup_for
from saeforge.models import load_model, resolve_hook
from saeforge.saes.formats import load_sae
from saeforge.saes.hub import local_sae_dir, output_dir


def trained_corpus(sae_dir: str | Path) -> str:
    """The corpus the SAE was trained on, as its cfg.json says (DataConfig's default when it names none)."""
    meta = json.loads((local_sae_dir(sae_dir) / "cfg.json").read_text()).get("metadata", {}) or {}
    data = (meta.get("saeforge_config") or {}).get("data") or {}
    return str(data.get("corpus") or meta.get("dataset_path") or DataConfig().corpus)


def _same_corpus(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()  # one folder, spelled two ways


def corpus_slug(corpus: str) -> str:
    """Short, filesystem-safe and stable: the corpus's last path component (or hub id part), at most 32 of
    [A-Za-z0-9_-], then 8 hex digits of a hash of its full name (two folders both called data differ)."""
    path = Path(corpus).expanduser()
    full = str(path.resolve()) if path.exists() else corpus
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(corpus.rstrip("/")).name).strip("-")[:32].strip("-") or "corpus"
    return f"{stem}-{hashlib.sha1(full.encode()).hexdigest()[:8]}"


def eval_paths(sae_dir: str | Path, corpus: str, out: str | Path | None = None) -> tuple[Path, Path]:
    """(eval JSON, report page) for an eval of ``sae_dir`` on ``corpus``: see the module docstring.

    ``out`` (``saeforge eval --out FILE``) puts the JSON at FILE and the page beside it as FILE's stem + .html.
    """
    if out is not None:
        out = Path(out)
        if out.suffix == ".html":
            raise ConfigError(
                f"--out {out}: name the JSON file (e.g. {out.with_suffix('.json')}); "
                "the --report page is written beside it with the .html suffix"
            )
        return out, out.with_suffix(".html")
    same = _same_corpus(corpus, trained_corpus(sae_dir))
    sae_dir = output_dir(sae_dir)  # an hf:// SAE's results go to hf/OWNER/REPO/PATH here, not into the HF cache
    if same:
        return sae_dir / "eval.json", sae_dir / "report.html"
    slug = corpus_slug(corpus)
    return sae_dir / f"eval.{slug}.json", sae_dir / f"report.{slug}.html"


def groundtruth_path(sae_dir: str | Path, corpus: str) -> Path:
    """Where `saeforge probe` writes: SAE_DIR/groundtruth.json on the SAE's own corpus, groundtruth.<slug>.json
    on another. Defined here so that eval and compare can read it without importing the groundtruth layer."""
    json_path, _ = eval_paths(sae_dir, corpus)
    return json_path.with_name("groundtruth" + json_path.name[len("eval") :])


def groundtruth_summary(sae_dir: str | Path, corpus: str) -> dict | None:
    """The headline numbers of `saeforge probe`'s JSON for this SAE and corpus; None when probe has not run."""
    path = groundtruth_path(sae_dir, corpus)
    if not path.exists():
        return None
    g = json.loads(path.read_text())
    probing = g.get("probing", {})

    def mean(kind: str, k: int | None = None):
        d = probing.get(kind) or {}
        d = d if k is None else d.get(str(k)) or {}
        return d.get("mean")

    return {
        "file": path.name,
        "n_tokens": g.get("n_tokens"),
        "coverage": (g.get("coverage") or {}).get("coverage"),
        "reconstruction": (g.get("reconstruction") or {}).get("reconstruction"),
        "sparse_probing_k1": mean("sae", 1),
        "sparse_probing_k5": mean("sae", 5),
        "residual_probing_k1": mean("residual", 1),
        "dense_probing": mean("dense"),
        "tpp": (g.get("tpp") or {}).get("mean"),
    }


def evaluate_saved(
    sae_dir: str | Path,
    overrides: dict[str, dict] | None = None,
    progress: bool = True,
    lm=None,
    report: bool = False,
    compare: list[str | Path] | None = None,
    mdl_tokens: int = 8192,
    out: str | Path | None = None,
) -> tuple[dict, list[Path]]:
    """Load the SAE and its model, evaluate on held-out text, write the eval JSON; returns (metrics, files written).

    The JSON is SAE_DIR/eval.json on the SAE's own corpus, SAE_DIR/eval.<slug>.json on another, or ``out``
    (see eval_paths). ``report`` also runs first-letter absorption, adds `saeforge probe`'s numbers when its
    JSON is there (groundtruth_summary), and writes the matching report page
    (self-contained: metrics, density, per-position curves, and the training curves when the SAE sits in its
    run folder). ``compare`` folders are scored on the same tokens and placed beside it on the page (and
    MMCS / stitching against each that reads the same hook).
    """
    cfg = eval_setup_for(sae_dir, overrides)
    json_path, html_path = eval_paths(sae_dir, cfg.data.corpus, out)  # before the work: a bad --out fails fast
    if lm is None:
        lm = load_model(
            cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device, random_init=cfg.model.random_init
        )
    others: list = []
    if compare:
        entries, pairs = compare_saved([sae_dir, *compare], overrides, progress=progress, lm=lm, mdl_tokens=mdl_tokens)
        (_, metrics), others = entries[0], entries[1:]
        for (_, m), d in zip(others, compare):
            gt = groundtruth_summary(d, cfg.data.corpus)
            if gt is not None:
                m["groundtruth"] = gt
        metrics["dictionaries"] = [p for p in pairs if entries[0][0] in (p["a"], p["b"])]
    else:
        sae = load_sae(sae_dir, device=str(lm.device))
        hook_point = resolve_hook(lm.model, cfg.model.hook)
        hook_out = resolve_hook(lm.model, cfg.model.hook_out) if cfg.model.hook_out else None
        metrics = evaluate(
            lm,
            hook_point,
            sae,
            cfg.data,
            cfg.eval,
            progress=progress,
            mean_ablation=cfg.eval.mean_ablation,
            mdl_tokens=mdl_tokens,
            hook_out=hook_out,
        )
    if report:
        gt = groundtruth_summary(sae_dir, cfg.data.corpus)
        if gt is not None:
            metrics["groundtruth"] = gt
        metrics["absorption"] = (
            _absorption(lm, cfg, sae_dir)
            if not cfg.model.hook_out
            else {"error": "first-letter absorption is defined for SAEs of one hook, not transcoders"}
        )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    written = [write_eval_json(metrics, json_path.parent, json_path.name)]
    if report:
        write_html(
            render_report(sae_label(sae_dir), metrics, others, trained_context(sae_dir), sae_training_section(sae_dir)),
            html_path,
        )
        written.append(html_path)
    return metrics, written


def _absorption(lm, cfg: EvalSetup, sae_dir: str | Path) -> dict:
    """First-letter absorption, or {"error": why} when the vocabulary has too few single-word tokens."""
    try:
        return first_letter_absorption(
            lm, resolve_hook(lm.model, cfg.model.hook), load_sae(sae_dir, device=str(lm.device))
        )
    except ValueError as e:
        return {"error": str(e)}
