"""Ablate features one at a time and rank them by their true effect on a metric.

effect_i = metric(clean) - metric(feature i ablated at positions start..T-1), averaged over prompts
(the same sign as attribution.py's scores: positive = the feature pushes the metric up).
Zero ablation sets f_i = 0; mean ablation sets f_i to its mean activation (``mean_F``, by default
the mean over the prompts' non-BOS tokens). Either way the SAE's error term stays, so only feature i
changes. One forward per (prompt, feature); ``batch`` features share one forward as batch rows.
Zero ablation of a feature that never fires on the prompts changes nothing, so by default only
features active somewhere are run (the rest score exactly 0); mean ablation runs all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from saeforge.analysis.attribution import Attribution
from saeforge.analysis.metrics import Metric
from saeforge.analysis.prompts import Prompt, as_prompts, forward_logits, record_latents
from saeforge.analysis.splice import Splice, check_feature
from saeforge.config import UsageError


def _ablate_rows_edit(features_R: Tensor, start: int, values_R: Tensor):
    """Row r of the batch gets feature features_R[r] set to values_R[r] at positions start..T-1."""

    def edit(f_STF: Tensor, state) -> Tensor:
        S, T, _ = f_STF.shape
        out_STF = f_STF.clone()
        rows_R1 = torch.arange(S, device=f_STF.device)[:, None]
        pos_1P = torch.arange(start, T, device=f_STF.device)[None, :]
        out_STF[rows_R1, pos_1P, features_R[:, None]] = values_R[:, None].to(f_STF.dtype)
        return out_STF

    return edit


def mean_latents_F(lm: Any, sae: Any, hook: str, prompts: Sequence[Prompt]) -> Tensor:
    """Mean latent activation [F] over the prompts' positions start..T-1 (the mean-ablation values)."""
    total_F, n = 0.0, 0
    for p in prompts:
        f_1TF = record_latents(lm, sae, hook, p)
        total_F, n = total_F + f_1TF[0, p.start :].sum(0), n + p.length - p.start
    return total_F / n


@torch.no_grad()
def ablation_effects(
    lm: Any,
    sae: Any,
    hook: str,
    prompts: Sequence[str | Tensor] | str,
    metric: Metric,
    mode: str = "zero",
    features: Sequence[int] | None = None,
    mean_F: Tensor | None = None,
    batch: int = 32,
) -> Attribution:
    """True single-feature ablation effects [F] on ``metric`` (see module doc); features not run score 0."""
    if mode not in ("zero", "mean"):
        raise UsageError(f"mode={mode!r}: expected 'zero' or 'mean'")
    prompts = as_prompts(lm, prompts)
    d_sae = sae.W_dec.shape[0]
    latents = [record_latents(lm, sae, hook, p) for p in prompts]
    if mode == "mean" and mean_F is None:
        mean_F = mean_latents_F(lm, sae, hook, prompts)
    if features is None:
        if mode == "zero":
            active_F = sum((f[0, p.start :] > 0).any(0) for f, p in zip(latents, prompts))
            features = active_F.nonzero().squeeze(1).tolist()
        else:
            features = range(d_sae)
    feats = torch.tensor([check_feature(sae, int(i)) for i in features], dtype=torch.long, device=sae.W_dec.device)
    effects_F = torch.zeros(d_sae, dtype=torch.float32, device=sae.W_dec.device)
    m_clean_total = 0.0
    for p in prompts:
        logits_1TV, _ = forward_logits(lm, p.ids_1T)
        m_clean = float(metric(logits_1TV, p.ids_1T)[0])
        m_clean_total += m_clean
        for a in range(0, len(feats), batch):
            chunk_R = feats[a : a + batch]
            values_R = torch.zeros(len(chunk_R)) if mode == "zero" else mean_F[chunk_R]
            ids_ST = p.ids_1T.expand(len(chunk_R), -1)
            edit = _ablate_rows_edit(chunk_R, p.start, values_R.to(sae.W_dec.device))
            logits_STV, _ = forward_logits(lm, ids_ST, [Splice(sae, hook, edits=[edit])])
            effects_F[chunk_R] += (m_clean - metric(logits_STV, ids_ST)).to(effects_F.device)
    n = len(prompts)
    return Attribution(effects_F / n, f"{mode} ablation", m_clean_total / n)
