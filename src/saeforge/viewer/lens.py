"""Logit lens of decoder rows, and nearest features by decoder cosine.

Logit lens: each decoder row W_dec[i] is treated as a residual-stream vector, passed through the
model's final norm and the unembedding; the largest and smallest logits say which next tokens the
feature promotes / suppresses. The final norm rescales the row to unit RMS (RMSNorm) or also centres
it (LayerNorm, GPT-2 / NeoX), exactly as it would a residual. Only meaningful when the SAE reads the
residual stream (or a block output added to it): d_in must equal d_model, else the lens is skipped.
Computed in float32 whatever the LM's dtype (the norm and unembedding are upcast copies, a one-off
cost): the database stores these numbers, and bf16's 2^-8 rounding reorders near-tied logits.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from saeforge.models.hooks import final_norm


@torch.no_grad()
def logit_lens(
    model: nn.Module, W_dec_FD: Tensor, n: int, chunk: int = 256
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """(top_val_FN, top_idx_FN, bottom_val_FN, bottom_idx_FN), or None when d_in != the unembedding width."""
    unembed = model.get_output_embeddings()
    if unembed is None or unembed.weight.shape[1] != W_dec_FD.shape[1]:
        return None
    norm = final_norm(model)
    norm = copy.deepcopy(norm).float() if norm is not None else None  # a few d_model vectors
    W_U_VD = unembed.weight.float()  # V x D; a copy only when the LM is not float32
    bias_V = getattr(unembed, "bias", None)
    out: list[list[Tensor]] = [[], [], [], []]
    for rows_CD in W_dec_FD.split(chunk):
        h_CD = rows_CD.to(W_U_VD.device, torch.float32)
        if norm is not None:
            h_CD = norm(h_CD)
        logits_CV = h_CD @ W_U_VD.T
        if bias_V is not None:
            logits_CV += bias_V.float()
        top, bottom = logits_CV.topk(n, dim=1), logits_CV.topk(n, dim=1, largest=False)
        for lst, t in zip(out, (top.values, top.indices, bottom.values, bottom.indices)):
            lst.append(t.cpu())
    return tuple(torch.cat(t) for t in out)  # type: ignore[return-value]


@torch.no_grad()
def neighbours(W_dec_FD: Tensor, n: int, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """(cos_FN, idx_FN): the n other features with the largest decoder cosine, best first."""
    W = W_dec_FD.float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    F = W.shape[0]
    n = min(n, F - 1)
    vals, idxs = [], []
    for start in range(0, F, chunk):
        cos_CF = W[start : start + chunk] @ W.T
        rows = torch.arange(cos_CF.shape[0])
        cos_CF[rows, rows + start] = float("-inf")  # not its own neighbour
        top = cos_CF.topk(n, dim=1)
        vals.append(top.values)
        idxs.append(top.indices)
    return torch.cat(vals), torch.cat(idxs)


def token_texts(tokenizer: Any) -> list[str]:
    """Display text of every token id (decoded one at a time; a lone byte of a multi-byte char shows as U+FFFD)."""
    n = len(tokenizer)
    return [tokenizer.decode([i]) for i in range(n)]
