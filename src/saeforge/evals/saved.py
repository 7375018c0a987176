"""Evaluate an SAE folder on the held-out text of the corpus it was trained on (see evals/setup.py)."""

from __future__ import annotations

from pathlib import Path

from saeforge.config import EvalSetup
from saeforge.evals.setup import eval_setup_for


def evaluate_saved(sae_dir: str | Path, overrides: dict[str, dict] | None = None, progress: bool = True,
                   lm=None, report: bool = False, compare: list[str | Path] | None = None,
                   mdl_tokens: int = 8192) -> tuple[dict, Path]:
    """Load the SAE and its model, evaluate on held-out text, write eval.json into the SAE folder.

    ``report`` also runs first-letter absorption and writes ``report.html`` there (self-contained:
    metrics, density, per-position curves, and the training curves when the SAE sits in its run folder).
    ``compare`` folders are scored on the same tokens and placed beside it on the page
    (and MMCS / stitching against each that reads the same hook).
    """
    from saeforge.evals.report import evaluate, write_eval_json
    from saeforge.models import load_model, resolve_hook
    from saeforge.saes.formats import load_sae

    cfg = eval_setup_for(sae_dir, overrides)
    if lm is None:
        lm = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device)
    others: list = []
    if compare:
        from saeforge.evals.compare import compare_saved

        entries, pairs = compare_saved([sae_dir, *compare], overrides, progress=progress, lm=lm, mdl_tokens=mdl_tokens)
        (_, metrics), others = entries[0], entries[1:]
        metrics["dictionaries"] = [p for p in pairs if entries[0][0] in (p["a"], p["b"])]
    else:
        sae = load_sae(sae_dir, device=str(lm.device))
        hook_point = resolve_hook(lm.model, cfg.model.hook)
        hook_out = resolve_hook(lm.model, cfg.model.hook_out) if cfg.model.hook_out else None
        metrics = evaluate(lm, hook_point, sae, cfg.data, cfg.eval, progress=progress,
                           mean_ablation=cfg.eval.mean_ablation, mdl_tokens=mdl_tokens, hook_out=hook_out)
    if report:
        metrics["absorption"] = (_absorption(lm, cfg, sae_dir) if not cfg.model.hook_out else
                                 {"error": "first-letter absorption is defined for SAEs of one hook, not transcoders"})
    write_eval_json(metrics, sae_dir)
    if report:
        from saeforge.evals.compare import sae_label, trained_context
        from saeforge.evals.curves import sae_training_section
        from saeforge.evals.html import render_report, write_html

        write_html(render_report(sae_label(sae_dir), metrics, others, trained_context(sae_dir),
                                 sae_training_section(sae_dir)), Path(sae_dir) / "report.html")
    return metrics, Path(sae_dir)


def _absorption(lm, cfg: EvalSetup, sae_dir: str | Path) -> dict:
    """First-letter absorption, or {"error": why} when the vocabulary has too few single-word tokens."""
    from saeforge.evals.absorption import first_letter_absorption
    from saeforge.models import resolve_hook
    from saeforge.saes.formats import load_sae

    try:
        return first_letter_absorption(lm, resolve_hook(lm.model, cfg.model.hook), load_sae(sae_dir, device=str(lm.device)))
    except ValueError as e:
        return {"error": str(e)}
