"""Evaluate an SAE folder on the held-out text of the corpus it was trained on.

A saeforge SAE carries its whole run config in ``cfg.json`` metadata, so the same
document split is rebuilt and evaluation never sees training text. For SAEs from other
tools only the SAELens metadata is there (model_name, hook_name, context_size, dataset_path, and
hook_name_out for a transcoder); options given on the command line override either.
"""

from __future__ import annotations

import json
from pathlib import Path

from saeforge.config import ConfigError, RunConfig


def run_config_for(sae_dir: str | Path, overrides: dict[str, dict] | None = None) -> RunConfig:
    path = Path(sae_dir) / "cfg.json"
    if not path.exists():
        raise ConfigError(f"{sae_dir} is not an SAE folder (no cfg.json); pass the folder that `saeforge train` "
                          "printed (runs/NAME/sae)")
    meta = json.loads(path.read_text()).get("metadata", {}) or {}
    base = meta.get("saeforge_config")
    if base is None:
        model = {"name": meta.get("model_name", ""), "hook": meta.get("hook_name", "")}
        if meta.get("hook_name_out"):  # a SAELens transcoder
            model["hook_out"] = meta["hook_name_out"]
        base = {"model": model,
                "data": {k: v for k, v in {"context_size": meta.get("context_size"), "corpus": meta.get("dataset_path"),
                                            "prepend_bos": meta.get("prepend_bos")}.items() if v is not None}}
    d = {k: dict(v) for k, v in base.items() if k in ("model", "data", "eval")}
    for section, values in (overrides or {}).items():
        d.setdefault(section, {}).update(values)
    cfg = RunConfig.from_dict(d)
    if not cfg.model.name or not cfg.model.hook:
        raise ConfigError(f"{path} does not say which model and hook it belongs to: pass --model and --hook")
    return cfg


def evaluate_saved(sae_dir: str | Path, overrides: dict[str, dict] | None = None, progress: bool = True,
                   lm=None, report: bool = False, compare: list[str | Path] | None = None,
                   mdl_tokens: int = 8192) -> tuple[dict, Path]:
    """Load the SAE and its model, evaluate on held-out text, write eval.json into the SAE folder.

    ``report`` also runs first-letter absorption and writes ``report.html`` there (self-contained:
    metrics, density, per-position curves). ``compare`` folders are scored on the same tokens and placed beside it on the page
    (and MMCS / stitching against each that reads the same hook).
    """
    from saeforge.evals.report import evaluate, write_eval_json
    from saeforge.models import load_model, resolve_hook
    from saeforge.saes.formats import load_sae

    cfg = run_config_for(sae_dir, overrides)
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
        from saeforge.evals.html import render_report, write_html

        write_html(render_report(sae_label(sae_dir), metrics, others, trained_context(sae_dir)),
                   Path(sae_dir) / "report.html")
    return metrics, Path(sae_dir)


def _absorption(lm, cfg: RunConfig, sae_dir: str | Path) -> dict:
    """First-letter absorption, or {"error": why} when the vocabulary has too few single-word tokens."""
    from saeforge.evals.absorption import first_letter_absorption
    from saeforge.models import resolve_hook
    from saeforge.saes.formats import load_sae

    try:
        return first_letter_absorption(lm, resolve_hook(lm.model, cfg.model.hook), load_sae(sae_dir, device=str(lm.device)))
    except ValueError as e:
        return {"error": str(e)}
