"""Which model, hook, corpus split and budgets evaluate a saved SAE.

A saeforge SAE carries its whole run config in ``cfg.json`` metadata, so the same
document split is rebuilt and evaluation never sees training text. For SAEs from other
tools only the SAELens metadata is there (model_name, hook_name, context_size, dataset_path, and
hook_name_out for a transcoder); options given on the command line override either.
"""

from __future__ import annotations

import json
from pathlib import Path

from saeforge.config import ConfigError, EvalSetup
from saeforge.saes.hub import local_sae_dir


def eval_setup_for(sae_dir: str | Path, overrides: dict[str, dict] | None = None) -> EvalSetup:
    """The model, corpus split and eval budgets of the run that made ``sae_dir``, with ``overrides`` over them."""
    path = local_sae_dir(sae_dir) / "cfg.json"
    if not path.exists():
        raise ConfigError(
            f"{sae_dir} is not an SAE folder (no cfg.json); pass the folder that `saeforge train` "
            "printed (runs/NAME/sae)"
        )
    meta = json.loads(path.read_text()).get("metadata", {}) or {}
    base = meta.get("saeforge_config")
    if base is None:
        model = {"name": meta.get("model_name", ""), "hook": meta.get("hook_name", "")}
        if meta.get("hook_name_out"):  # a SAELens transcoder
            model["hook_out"] = meta["hook_name_out"]
        base = {
            "model": model,
            "data": {
                k: v
                for k, v in {
                    "context_size": meta.get("context_size"),
                    "corpus": meta.get("dataset_path"),
                    "prepend_bos": meta.get("prepend_bos"),
                }.items()
                if v is not None
            },
        }
    d = {k: dict(v) for k, v in base.items() if k in EvalSetup.SECTIONS}
    for section, values in (overrides or {}).items():
        d.setdefault(section, {}).update(values)
    cfg = EvalSetup.from_dict(d)
    if not cfg.model.name or not cfg.model.hook:
        raise ConfigError(f"{path} does not say which model and hook it belongs to: pass --model and --hook")
    return cfg
