"""Prompts as token ids, the positions an analysis may edit, and forwards with splices.

Position 0 holds BOS when the prompt was tokenised as in SAE training; the SAE never saw BOS (its
residual norm is an outlier) and its latents there are meaningless, so ablation and attribution
leave it alone: the edited positions are ``start..T-1`` with ``start = 1`` after a BOS, else 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saeforge.analysis.common import prompt_ids
from saeforge.analysis.splice import Splice, spliced
from saeforge.config import UsageError
from saeforge.models.hooks import model_device
from saeforge.models.layout import hf_model


@dataclass
class Prompt:
    ids_1T: Tensor
    start: int  # first position that edits and attributions touch

    @property
    def length(self) -> int:
        return self.ids_1T.shape[1]


def as_prompts(lm: Any, prompts: Sequence[str | Tensor] | str | Tensor) -> list[Prompt]:
    """Strings are tokenised with BOS first; id tensors ([T] or [1, T]) are taken as they are."""
    if isinstance(prompts, (str, Tensor)):
        prompts = [prompts]
    if not prompts:
        raise UsageError("no prompts given; pass at least one prompt")
    device = model_device(lm)
    bos = getattr(getattr(lm, "tokenizer", None), "bos_token_id", None)
    out = []
    for p in prompts:
        ids = prompt_ids(lm.tokenizer, p, True, device) if isinstance(p, str) else p.reshape(1, -1).to(device)
        start = 1 if bos is not None and int(ids[0, 0]) == int(bos) else 0
        if ids.shape[1] <= start:
            raise UsageError(f"prompt {p!r} has no tokens besides BOS; give some text")
        out.append(Prompt(ids, start))
    return out


def position_mask_T11(prompt: Prompt, device: torch.device) -> Tensor:
    """Bool [1, T, 1]: True at the positions an analysis edits (``start`` onwards)."""
    mask = torch.zeros(1, prompt.length, 1, dtype=torch.bool, device=device)
    mask[:, prompt.start :] = True
    return mask


def forward_logits(lm: Any, ids_ST: Tensor, splices: Sequence[Splice] = ()) -> tuple[Tensor, list]:
    """(logits STV, splice states) of one forward with ``splices`` active (grad as the caller set it)."""
    with spliced(lm, list(splices)) as states:
        logits_STV = hf_model(lm)(input_ids=ids_ST, use_cache=False).logits
    return logits_STV, states


def record_latents(lm: Any, sae: Any, hook: str, prompt: Prompt) -> Tensor:
    """The SAE's latents f [1, T, F] on a clean forward of ``prompt`` (no edits)."""
    with torch.no_grad():
        _, (state,) = forward_logits(lm, prompt.ids_1T, [Splice(sae, hook, record=True)])
    return state.f_STF.detach()
