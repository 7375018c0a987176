"""Counterfactual pairs: the fewest feature substitutions that flip the model's preference.

Given prompt A ("I'm Jane, and I'm a") and its counterfactual B ("I'm Dave, and I'm a"), of the same
token length, and two completions (" woman" / " man"): the preference is
m = logit[completion_a] - logit[completion_b] at the last position of A. Substituting feature i
means replacing f_i on A by its value on B at every position start..T-1 (the error term of A stays).

Search (greedy by attribution, not an exhaustive minimum):
1. score every feature by attribution patching with B's latents as the baseline: the estimated drop
   of m when that feature takes B's values;
2. substitute features in order of score (largest drop first), one more per step, with a true
   forward for every prefix (``batch`` prefixes per forward), until m changes sign;
3. prune: drop each chosen feature in turn (last added first) if the preference stays flipped.
The result is 1-minimal (no single feature can be removed) but a smaller set may exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saeforge.analysis.attribution import attribution_patching
from saeforge.analysis.metrics import LogitDiff
from saeforge.analysis.prompts import Prompt, as_prompts, forward_logits, position_mask_T11, record_latents
from saeforge.analysis.splice import Splice
from saeforge.config import UsageError


@dataclass
class FlipResult:
    features: list[int]  # the substituted set (empty when no flip was found)
    flipped: bool
    metric_a: float  # preference on A, clean
    metric_b: float  # preference on B, clean
    metric_all: float  # on A with every feature substituted (error term of A kept)
    metric_after: float  # on A with ``features`` substituted
    greedy_size: int  # how many features the greedy pass needed before pruning (0 if no flip)


def _substitute_edit(subst_SF: Tensor, f_b_1TF: Tensor, mask_1T1: Tensor):
    """Row s takes B's latents for the features marked in subst_SF[s], at masked positions."""

    def edit(f_STF: Tensor, state) -> Tensor:
        take_STF = mask_1T1 & subst_SF[:, None, :]
        return torch.where(take_STF, f_b_1TF, f_STF)

    return edit


@torch.no_grad()
def _prefs(lm, sae, hook, a: Prompt, metric: LogitDiff, f_b_1TF: Tensor, subst_SF: Tensor, batch: int) -> Tensor:
    out = []
    mask_1T1 = position_mask_T11(a, f_b_1TF.device)
    for i in range(0, subst_SF.shape[0], batch):
        rows_SF = subst_SF[i : i + batch]
        ids_ST = a.ids_1T.expand(rows_SF.shape[0], -1)
        edit = _substitute_edit(rows_SF, f_b_1TF, mask_1T1)
        logits_STV, _ = forward_logits(lm, ids_ST, [Splice(sae, hook, edits=[edit])])
        out.append(metric(logits_STV, ids_ST))
    return torch.cat(out)


def flip_preference(
    lm: Any,
    sae: Any,
    hook: str,
    prompt_a: str | Tensor,
    prompt_b: str | Tensor,
    completion_a: int,
    completion_b: int,
    max_features: int = 64,
    batch: int = 16,
) -> FlipResult:
    """Smallest set found (see module doc) of features whose B values flip A's preference between two token ids."""
    a, b = as_prompts(lm, [prompt_a, prompt_b])
    if a.length != b.length or a.start != b.start:
        raise UsageError(
            f"counterfactual prompts must tokenise to the same length (got {a.length} and {b.length} "
            "tokens); reword one so the tokens line up, e.g. names of one token each"
        )
    metric = LogitDiff(completion_a, completion_b)
    f_b_1TF = record_latents(lm, sae, hook, b)
    d_sae = f_b_1TF.shape[-1]
    atp = attribution_patching(lm, sae, hook, [a.ids_1T], metric, baseline=f_b_1TF)
    with torch.no_grad():
        m_b = float(metric(forward_logits(lm, b.ids_1T)[0], b.ids_1T)[0])
    sign = 1.0 if atp.metric_clean >= 0 else -1.0
    # features that differ between A and B, largest estimated drop of sign * m first
    f_a_1TF = record_latents(lm, sae, hook, a)
    differs_F = (f_a_1TF != f_b_1TF)[0, a.start :].any(0)
    order = [i for i in (sign * atp.scores_F).argsort(descending=True).tolist() if differs_F[i]][:max_features]
    everything_SF = torch.ones(1, d_sae, dtype=torch.bool, device=f_b_1TF.device)
    m_all = float(_prefs(lm, sae, hook, a, metric, f_b_1TF, everything_SF, batch)[0])
    prefixes_SF = torch.zeros(len(order), d_sae, dtype=torch.bool, device=f_b_1TF.device)
    for n in range(len(order)):
        prefixes_SF[n:, order[n]] = True
    prefs = _prefs(lm, sae, hook, a, metric, f_b_1TF, prefixes_SF, batch) if order else torch.empty(0)
    hits = (sign * prefs < 0).nonzero()
    if len(hits) == 0:
        return FlipResult([], False, atp.metric_clean, m_b, m_all, atp.metric_clean, 0)
    chosen = order[: int(hits[0]) + 1]
    greedy_size = len(chosen)
    for feat in reversed(list(chosen)):
        trial = [c for c in chosen if c != feat]
        row_SF = torch.zeros(1, d_sae, dtype=torch.bool, device=f_b_1TF.device)
        row_SF[0, trial] = True
        if trial and sign * float(_prefs(lm, sae, hook, a, metric, f_b_1TF, row_SF, batch)[0]) < 0:
            chosen = trial
    row_SF = torch.zeros(1, d_sae, dtype=torch.bool, device=f_b_1TF.device)
    row_SF[0, chosen] = True
    m_after = float(_prefs(lm, sae, hook, a, metric, f_b_1TF, row_SF, batch)[0])
    return FlipResult(chosen, True, atp.metric_clean, m_b, m_all, m_after, greedy_size)
