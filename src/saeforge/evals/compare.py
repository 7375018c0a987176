"""Score several saved SAEs on the same held-out tokens; dictionary comparisons between pairs.

The first SAE's run config decides the model, corpus, split, context size and token budgets (command
line options override it); every other SAE is evaluated on exactly those windows, so differences in
the table are the SAEs', not the text's. SAEs of different models cannot share tokens and are refused.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from saeforge.config import ConfigError
from saeforge.data import excluded_mask
from saeforge.evals.dictionaries import compare_dictionaries
from saeforge.evals.html import COMPARE_KEYS
from saeforge.evals.report import _batches, evaluate, heldout_windows
from saeforge.evals.setup import eval_setup_for
from saeforge.models import load_model, resolve_hook
from saeforge.models.hooks import capture
from saeforge.saes.formats import load_sae
from saeforge.saes.hub import is_remote, local_sae_dir, output_dir

MDL_TOKENS = 8192  # activation rows kept for MDL (and stitching): ~19 MB at d_in 576


def sae_label(sae_dir: str | Path) -> str:
    """A short name for an SAE folder: runs/NAME/sae -> NAME; hf://OWNER/REPO/PATH -> its last part."""
    p = output_dir(sae_dir) if is_remote(sae_dir) else Path(sae_dir).resolve()
    return p.parent.name if p.name == "sae" else p.name


def trained_context(sae_dir: str | Path) -> int | None:
    import json

    meta = json.loads((local_sae_dir(sae_dir) / "cfg.json").read_text()).get("metadata") or {}
    ctx = meta.get("context_size")
    return int(ctx) if ctx else None


@torch.inference_mode()
def activation_batches(lm, hook, data_cfg, n_rows: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Non-excluded held-out activation rows x_ND (float32), ``n_rows`` in all, one LM batch at a time."""
    left = n_rows
    for tokens_ST in _batches(heldout_windows(lm, data_cfg), batch_size):
        x_STD = capture(lm.model, [hook], tokens_ST)[hook.name]
        x_ND = x_STD[~excluded_mask(tokens_ST, lm.tokenizer, data_cfg).to(x_STD.device)].float()[:left]
        left -= len(x_ND)
        yield x_ND
        if left <= 0:
            return


def compare_saved(
    sae_dirs: list[str | Path],
    overrides: dict[str, dict] | None = None,
    progress: bool = True,
    lm=None,
    threshold: float = 0.7,
    mdl_tokens: int = MDL_TOKENS,
) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, Any]]]:
    """(entries, pairs): [(label, metrics)] per SAE on shared tokens; MMCS/stitching per same-hook pair."""
    if not sae_dirs:
        raise ConfigError("compare needs at least one SAE folder")
    base = eval_setup_for(sae_dirs[0], overrides)
    cfgs = [eval_setup_for(d, {"model": (overrides or {}).get("model", {})}) for d in sae_dirs]
    for d, cfg in zip(sae_dirs, cfgs):
        if cfg.model.name != base.model.name:
            raise ConfigError(
                f"{d} belongs to model {cfg.model.name!r} but {sae_dirs[0]} to {base.model.name!r}: "
                "only SAEs of one model can be scored on the same tokens; compare them separately"
            )
    if lm is None:
        lm = load_model(
            base.model.name, dtype=base.model.dtype, device=base.model.device, random_init=base.model.random_init
        )
    labels = [sae_label(d) for d in sae_dirs]
    if len(set(labels)) < len(labels):  # two runs/*/sae of the same name elsewhere: fall back to full paths
        labels = [str(d) for d in sae_dirs]
    saes, entries = [], []
    for label, d, cfg in zip(labels, sae_dirs, cfgs):
        sae = load_sae(d, device=str(lm.device))
        hook = resolve_hook(lm.model, cfg.model.hook)
        m = evaluate(
            lm,
            hook,
            sae,
            base.data,
            base.eval,
            progress=progress,
            mean_ablation=base.eval.mean_ablation,
            mdl_tokens=mdl_tokens,
        )
        saes.append((label, sae, hook))
        entries.append((label, m))
    pairs = []
    for (la, sa, ha), (lb, sb, hb) in itertools.combinations(saes, 2):
        if ha.name != hb.name or sa.W_dec.shape[1] != sb.W_dec.shape[1]:
            continue  # dictionaries of different hooks live in different spaces
        rows = min(mdl_tokens, base.eval.tokens)
        batches = activation_batches(lm, ha, base.data, rows, base.eval.batch_size)
        pairs.append(compare_dictionaries(la, sa, lb, sb, batches, threshold))
    return entries, pairs


def load_eval_json(sae_dir: str | Path) -> dict[str, Any] | None:
    import json

    path = local_sae_dir(sae_dir) / "eval.json"
    return json.loads(path.read_text()) if path.exists() else None


def format_compare_table(entries: list[tuple[str, dict[str, Any]]]) -> str:
    """Plain-text side-by-side table for the terminal."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return "n/a" if not math.isfinite(v) else f"{v:.4g}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    rows = [["metric", *[n for n, _ in entries]]]
    rows += [
        [label, *[cell(m.get(key)) for _, m in entries]]
        for key, label in COMPARE_KEYS
        if any(key in m for _, m in entries)
    ]
    rows.append(["MDL (bits/token)", *[cell((m.get("mdl") or {}).get("dl_bits")) for _, m in entries]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows) + "\n"
