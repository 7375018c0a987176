"""Logit lens of decoder directions: which tokens a feature's direction pushes up if read out directly.

logits_V ~ (gamma * u) @ W_U^T, where u is the decoder row (centred first when the final norm is a
LayerNorm, which subtracts the mean) and gamma the final norm's weight. The norm's 1/rms scale is
positive and shared by all tokens, so it changes no ranking and is left out; so are biases, which
do not depend on the direction. For a feature far from the last layer this is only a hint of what
it does after the remaining layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from saeforge.analysis.splice import check_feature
from saeforge.models.hooks import final_norm
from saeforge.models.layout import hf_model


@torch.no_grad()
def direction_logits_V(model: Any, direction_D: Tensor) -> Tensor:
    """Logit-lens scores [V] of one residual-stream direction (see module doc)."""
    model = hf_model(model)
    W_U_VD = model.get_output_embeddings().weight
    u_D = direction_D.to(W_U_VD.device, torch.float32)
    norm = final_norm(model)
    if isinstance(norm, nn.LayerNorm):
        u_D = u_D - u_D.mean()
    weight = getattr(norm, "weight", None)
    if weight is not None and weight.shape == u_D.shape:
        u_D = u_D * weight.float()
    return W_U_VD.float() @ u_D


def top_tokens(lm: Any, sae: Any, feature: int, k: int = 10) -> tuple[Tensor, list[str]]:
    """(token ids [k], decoded strings) the feature's decoder direction promotes most."""
    feature = check_feature(sae, feature)
    ids_K = direction_logits_V(lm, sae.W_dec[feature].detach()).topk(k).indices
    return ids_K, [lm.tokenizer.decode([int(i)]) for i in ids_K]
