"""The reconstruction losses the SAEs share: squared error, FVU (normalised MSE) and AuxK.

    FVU(x, x_hat) = sum_B ||x - x_hat||^2 / sum_B ||x - mean_B x||^2      (1.0 = predicting the batch mean)
    AuxK = FVU(e, e_hat)    e = x - x_hat (detached), e_hat = W_dec^T z_aux: each row's top aux_k dead latents

AuxK is Gao et al.'s dead-latent loss (TopK, BatchTopK, Matryoshka): the residual rebuilt from dead
latents alone, normalised by the residual's own variance as in OpenAI's code, so dead latents get a
signal of size ~1 however good the live ones already are. It is 0 (no graph) when no latent is dead.

Data parallel (training/distributed.py): with ``ranks`` every denominator is the global batch's,
divided by the rank count, so each rank returns N times its share of the global loss (see
``base.Ranks``) and the gradient averaged over ranks is the one-process gradient.

``auxk_loss`` is the plain dense form; topk.py computes the same value through its sparse kernels
(tests/test_saes.py checks that the two agree).
"""

from __future__ import annotations

import torch
from torch import Tensor

from saeforge.saes.base import Ranks


def sum_sq_BD(r_BD: Tensor) -> Tensor:
    """sum over D of r^2, per row, in float32 (bf16 residuals would lose the small errors)."""
    r_BD = r_BD.float()
    return (r_BD * r_BD).sum(dim=-1)


def total_variance(x_BD: Tensor, ranks: Ranks | None = None) -> Tensor:
    """sum_B ||x - mean_B x||^2 in float32, clamped above 0: FVU's denominator (no gradient flows into it).

    With ``ranks`` the sum is over the global batch (one all-reduce of [sum x, sum ||x||^2, rows] in
    float64), divided by the rank count: this rank's share, so err_local / share, averaged over the
    ranks, is sum err / total variance, the one-process FVU.
    """
    if ranks is None:
        x_BD = x_BD.float()
        return sum_sq_BD(x_BD - x_BD.mean(dim=0)).sum().clamp_min(1e-12)
    x_BD = x_BD.detach().double()
    s = ranks.sum(torch.cat([x_BD.sum(dim=0), (x_BD * x_BD).sum().reshape(1), x_BD.new_tensor([len(x_BD)])]))
    total = s[-2] - s[:-2].pow(2).sum() / s[-1]
    return (total / ranks.world).float().clamp_min(1e-12 / ranks.world)


def fvu(
    x_BD: Tensor, x_hat_BD: Tensor, ranks: Ranks | None = None, total_var: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(FVU, per-row squared error err_B): sum_B ||x - x_hat||^2 / total_variance(x, ranks), in float32.

    ``total_var``: the denominator when already known (Matryoshka scores every prefix against one x).
    """
    x_BD = x_BD.float()
    err_B = sum_sq_BD(x_BD - x_hat_BD)
    return err_B.sum() / (total_variance(x_BD, ranks) if total_var is None else total_var), err_B


def explained_variance(x_BD: Tensor, x_hat_BD: Tensor, ranks: Ranks | None = None) -> Tensor:
    """1 - FVU of the whole (with ``ranks``: global) batch, the same on every rank (what the trainer logs)."""
    loss, _ = fvu(x_BD, x_hat_BD.detach(), ranks)
    if ranks is not None:  # each rank's FVU is N times its share of the global one
        loss = ranks.sum(loss) / ranks.world
    return 1 - loss


def dead_topk(pre_BF: Tensor, dead_mask_F: Tensor | None, aux_k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) [B, A] of each row's top min(aux_k, #dead) entries among the dead latents; [B, 0] if none.

    The plain form: live latents hidden behind -inf in a full [B, F] copy.
    """
    n_dead = 0 if dead_mask_F is None else int(dead_mask_F.sum())
    if n_dead == 0:
        empty_B0 = pre_BF.new_zeros(pre_BF.shape[0], 0)
        return empty_B0, empty_B0.long()
    masked_BF = pre_BF.masked_fill(~dead_mask_F.to(pre_BF.device), float("-inf"))
    return masked_BF.topk(min(aux_k, n_dead), dim=-1, sorted=False)


def auxk(e_BD: Tensor, e_hat_BD: Tensor, ranks: Ranks | None = None) -> Tensor:
    """AuxK from the residual e (detached here) and its rebuild e_hat from the dead latents: FVU(e, e_hat)."""
    return fvu(e_BD.detach(), e_hat_BD, ranks)[0]


def auxk_loss(
    pre_BF: Tensor, dead_mask_F: Tensor | None, e_BD: Tensor, W_dec_FD: Tensor, aux_k: int, ranks: Ranks | None = None
) -> Tensor:
    """AuxK, dense form: e rebuilt from ReLU of each row's top aux_k dead pre-activations (or post-ReLU z);
    0 without dead latents."""
    vals_BA, idx_BA = dead_topk(pre_BF, dead_mask_F, aux_k)
    if idx_BA.shape[1] == 0:
        return e_BD.new_zeros((), dtype=torch.float32)
    e_hat_BD = torch.zeros_like(pre_BF).scatter(-1, idx_BA, torch.relu(vals_BA)) @ W_dec_FD
    return auxk(e_BD, e_hat_BD, ranks)
