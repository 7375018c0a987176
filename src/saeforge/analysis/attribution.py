"""Attribution of a metric to every feature of one SAE: attribution patching and integrated gradients.

Sign convention (shared with ablation.py): a feature's score estimates its *contribution*,
metric(clean) - metric(feature replaced by its baseline). Baselines: "zero" (zero ablation),
"mean" (a mean activation vector [F]), or a tensor of latents [1, T, F] from another prompt
(counterfactual). Only positions ``start..T-1`` (after BOS) are replaced; scores are summed over
those positions and averaged over prompts.

- Attribution patching (AtP, grad x activation): score_i = sum_t (f_ti - b_ti) * dm/df_ti at the
  clean run. One forward + backward per prompt; a first-order estimate of the ablation effect.
- Integrated gradients: score_i = sum_t (f_ti - b_ti) * mean_k dm/df_ti at f_b + a_k (f - f_b),
  a_k = (k + 1/2) / steps (midpoint rule). Every feature moves together along the path, so the
  scores sum to metric(clean) - metric(all features at baseline) (completeness) up to the rule's
  O(1/steps^2) error. Steps run as rows of one batch (``batch`` rows per forward).
- Feature-to-feature: how much upstream features drive downstream ones, AtP-style, with the
  downstream SAE's latents as the metric.
The error terms of the spliced SAEs are held fixed at their clean values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saeforge.analysis.metrics import Metric
from saeforge.analysis.prompts import Prompt, as_prompts, forward_logits, position_mask_T11, record_latents
from saeforge.analysis.splice import Splice, check_feature
from saeforge.config import UsageError


@dataclass
class Attribution:
    """Per-feature scores [F] (contribution to the metric; see the module docstring) and context."""

    scores_F: Tensor
    method: str
    metric_clean: float  # mean over prompts
    metric_baseline: float | None = None  # all features at baseline (integrated gradients)

    def ranked(self, k: int = 20) -> list[tuple[int, float]]:
        """The ``k`` features with the largest |score|, as (feature, score), largest first."""
        k = min(k, self.scores_F.numel())
        idx = self.scores_F.abs().topk(k).indices
        return [(int(i), float(self.scores_F[i])) for i in idx]


def baseline_1TF(baseline: str | Tensor, f_1TF: Tensor) -> Tensor:
    """The baseline latents, broadcast to f's shape: "zero", a mean vector [F], or latents [1, T, F]."""
    if isinstance(baseline, str):
        if baseline != "zero":
            raise UsageError(f"baseline={baseline!r}: pass 'zero', a mean activation tensor [F], or latents [1, T, F]")
        return torch.zeros_like(f_1TF)
    baseline = baseline.to(f_1TF.device, f_1TF.dtype)
    if baseline.shape not in (f_1TF.shape[-1:], f_1TF.shape):
        raise UsageError(
            f"baseline of shape {tuple(baseline.shape)} does not fit latents {tuple(f_1TF.shape)}; "
            f"expected [{f_1TF.shape[-1]}] or {list(f_1TF.shape)}"
        )
    return baseline.expand_as(f_1TF)


def _path_edit(f_base_1TF: Tensor, mask_1T1: Tensor, alphas_S11: Tensor):
    """f' = b + a (f - b) at masked positions, one a per batch row (a = 1 is the clean run)."""

    def edit(f_STF: Tensor, state) -> Tensor:
        return torch.where(mask_1T1, f_base_1TF + alphas_S11 * (f_STF - f_base_1TF), f_STF)

    return edit


def _grads(
    lm: Any, sae: Any, hook: str, prompt: Prompt, metric: Metric, f_base_1TF: Tensor, alphas_S: Tensor
) -> tuple[Tensor, Tensor]:
    """(metric per row [S], dm/df [S, T, F]) along the path at ``alphas_S``, one row per alpha."""
    S = alphas_S.numel()
    mask_1T1 = position_mask_T11(prompt, f_base_1TF.device)
    edit = _path_edit(f_base_1TF, mask_1T1, alphas_S.view(S, 1, 1).to(f_base_1TF))
    ids_ST = prompt.ids_1T.expand(S, -1)
    with torch.enable_grad():
        logits_STV, (state,) = forward_logits(lm, ids_ST, [Splice(sae, hook, edits=[edit], track=True)])
        m_S = metric(logits_STV, ids_ST)
        (grad_STF,) = torch.autograd.grad(m_S.sum(), state.delta_STF)
    return m_S.detach(), grad_STF


def attribution_patching(
    lm: Any, sae: Any, hook: str, prompts: Sequence[str | Tensor] | str, metric: Metric, baseline: str | Tensor = "zero"
) -> Attribution:
    """Grad x (activation - baseline) for every feature: scores [F], one forward + backward per prompt."""
    total_F, m_clean = 0.0, 0.0
    prompts = as_prompts(lm, prompts)
    for p in prompts:
        f_1TF = record_latents(lm, sae, hook, p)
        f_base_1TF = baseline_1TF(baseline, f_1TF)
        m_S, grad_STF = _grads(lm, sae, hook, p, metric, f_base_1TF, torch.ones(1))
        mask_1T1 = position_mask_T11(p, f_1TF.device)
        total_F = total_F + ((f_1TF - f_base_1TF) * grad_STF * mask_1T1).sum(dim=(0, 1))
        m_clean += float(m_S[0])
    n = len(prompts)
    return Attribution(total_F / n, "attribution patching", m_clean / n)


def integrated_gradients(
    lm: Any,
    sae: Any,
    hook: str,
    prompts: Sequence[str | Tensor] | str,
    metric: Metric,
    baseline: str | Tensor = "zero",
    steps: int = 16,
    batch: int = 16,
) -> Attribution:
    """Integrated gradients along the straight path baseline -> clean latents; scores [F] (see module doc)."""
    if steps < 1:
        raise UsageError(f"steps={steps}: integrated gradients needs at least 1 step")
    prompts = as_prompts(lm, prompts)
    total_F, m_clean, m_base = 0.0, 0.0, 0.0
    alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    for p in prompts:
        f_1TF = record_latents(lm, sae, hook, p)
        f_base_1TF = baseline_1TF(baseline, f_1TF)
        grad_sum_TF = torch.zeros_like(f_1TF[0])
        for a in range(0, steps, batch):
            _, grad_STF = _grads(lm, sae, hook, p, metric, f_base_1TF, alphas[a : a + batch])
            grad_sum_TF += grad_STF.sum(0)
        # the two ends of the path: the clean metric, and every feature at its baseline
        with torch.no_grad():
            m_ends = _ends(lm, sae, hook, p, metric, f_base_1TF)
        mask_T1 = position_mask_T11(p, f_1TF.device)[0]
        total_F = total_F + ((f_1TF[0] - f_base_1TF[0]) * grad_sum_TF / steps * mask_T1).sum(0)
        m_clean, m_base = m_clean + float(m_ends[0]), m_base + float(m_ends[1])
    n = len(prompts)
    return Attribution(total_F / n, f"integrated gradients ({steps} steps)", m_clean / n, m_base / n)


def _ends(lm, sae, hook, p: Prompt, metric: Metric, f_base_1TF: Tensor) -> Tensor:
    """[metric(clean), metric(every feature at its baseline)] for one prompt."""
    alphas_S11 = torch.tensor([1.0, 0.0]).view(2, 1, 1).to(f_base_1TF)
    edit = _path_edit(f_base_1TF, position_mask_T11(p, f_base_1TF.device), alphas_S11)
    ids_ST = p.ids_1T.expand(2, -1)
    logits_STV, _ = forward_logits(lm, ids_ST, [Splice(sae, hook, edits=[edit])])
    return metric(logits_STV, ids_ST)


def feature_to_feature(
    lm: Any,
    up: tuple[Any, str],
    down: tuple[Any, str],
    prompts: Sequence[str | Tensor] | str,
    down_features: Sequence[int] | None = None,
    top: int = 8,
) -> tuple[Tensor, Tensor]:
    """(down_features [J], scores [J, F_up]): AtP of each downstream feature's activation, summed over
    positions ``start..``, to every upstream feature (zero baseline), averaged over prompts.

    ``up`` and ``down`` are (sae, hook); the upstream hook must run before the downstream one.
    Downstream features default to the ``top`` most active ones (summed over the prompts).
    """
    (sae_u, hook_u), (sae_d, hook_d) = up, down
    prompts = as_prompts(lm, prompts)
    if down_features is None:
        act_F = sum(record_latents(lm, sae_d, hook_d, p)[0, p.start :].sum(0) for p in prompts)
        down_features = act_F.topk(min(top, act_F.numel())).indices.tolist()
    js = torch.tensor([check_feature(sae_d, int(j)) for j in down_features], dtype=torch.long)
    scores_JF = 0.0
    for p in prompts:
        mask_1T1 = position_mask_T11(p, sae_u.W_dec.device)
        splices = [Splice(sae_u, hook_u, track=True, record=True), Splice(sae_d, hook_d, record=True)]
        with torch.enable_grad():
            _, (st_u, st_d) = forward_logits(lm, p.ids_1T, splices)
            if st_d.f_STF is None or not st_d.f_STF.requires_grad:
                raise UsageError(
                    f"downstream latents at {hook_d!r} do not depend on {hook_u!r}: the upstream hook must "
                    "come earlier in the forward pass"
                )
            acts_J = (st_d.f_STF[0, p.start :][:, js.to(st_d.f_STF.device)]).sum(0)
            rows = []
            for j in range(len(js)):
                (g_1TF,) = torch.autograd.grad(acts_J[j], st_u.delta_STF, retain_graph=j + 1 < len(js))
                rows.append((st_u.f_STF.detach() * g_1TF * mask_1T1).sum(dim=(0, 1)))
        scores_JF = scores_JF + torch.stack(rows)
    return js, scores_JF / len(prompts)
