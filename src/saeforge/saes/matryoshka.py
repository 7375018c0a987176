"""Matryoshka SAE on a BatchTopK base (Bussmann et al. 2025; Nabeshima 2024).

Latents are split into nested prefixes m_1 < m_2 < ... < m_G = d_sae (the cumulative sums of
``group_sizes``). Each prefix must reconstruct x on its own:

    x_hat_g = b_dec + sum_{i < m_g} f_i W_dec[i]
    L = sum_g w_g FVU(x, x_hat_g) + aux_coefficient * AuxK

with f the BatchTopK latents of the whole dictionary (so the full x_hat is x_hat_G). The first
groups are pushed towards general features, later ones refine them; this counters feature
absorption. FVU (normalised MSE) per prefix and AuxK are losses.py's, as in batchtopk.py / topk.py. The weights
w_g default to 1/G each (so the loss is on BatchTopK's scale); the paper's sum is w_g = 1.

Everything else -- init, inference threshold, unit-norm decoder, saving as a JumpReLU -- is
BatchTopK's: this class only changes the loss. Data parallel, the selection and the denominators are
the global batch's, as in batchtopk.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saeforge.config import ConfigError, F
from saeforge.saes.base import LossContext, StepOutput
from saeforge.saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from saeforge.saes.losses import auxk_loss, fvu, total_variance


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    architecture: str = F(
        "matryoshka", "Architecture name from the registry (set by the config class; not chosen freely)."
    )
    group_sizes: list[int] = F(
        [],
        "Latents per nested group, summing to d_sae, e.g. 512,512,1024,2048. Empty = halving: "
        "d_sae/16, d_sae/16, d_sae/8, d_sae/4, d_sae/2 (the rest goes to the last group).",
    )
    group_weights: list[float] = F([], "Weight w_g of each prefix's reconstruction loss; empty = 1/G each.")

    def __post_init__(self) -> None:
        BatchTopKConfig.__post_init__(self)
        sizes = self.sizes()
        if any(s <= 0 for s in sizes) or sum(sizes) != self.d_sae:
            raise ConfigError(
                f"sae.group_sizes={self.group_sizes}: expected positive sizes summing to d_sae={self.d_sae}"
            )
        if self.group_weights and (len(self.group_weights) != len(sizes) or min(self.group_weights) < 0):
            raise ConfigError(
                f"sae.group_weights={self.group_weights}: expected {len(sizes)} weights >= 0 (one per group)"
            )

    def sizes(self) -> list[int]:
        if self.group_sizes:
            return list(self.group_sizes)
        sizes = [max(1, self.d_sae // d) for d in (16, 16, 8, 4)]
        if sum(sizes) >= self.d_sae:  # too small to halve: one group
            return [self.d_sae]
        return sizes + [self.d_sae - sum(sizes)]

    def weights(self) -> list[float]:
        G = len(self.sizes())
        return list(self.group_weights) if self.group_weights else [1.0 / G] * G


class MatryoshkaSAE(BatchTopKSAE):
    cfg: MatryoshkaConfig

    def training_loss(self, x_BD: Tensor, ctx: LossContext) -> StepOutput:
        B = x_BD.shape[0]
        if B < 2:
            raise ConfigError(
                f"Matryoshka's normalised MSE needs a batch of at least 2 rows (got {B}); raise the batch size"
            )
        z_BF, f_BF = self.train_latents(x_BD, ctx.ranks)
        total_var = total_variance(x_BD, ctx.ranks)  # every prefix's FVU has the same denominator
        x_hat_BD = self.b_dec.float().expand(B, -1)
        loss = x_BD.new_zeros((), dtype=torch.float32)
        parts: dict[str, Tensor] = {}
        start = 0
        for g, (size, w) in enumerate(zip(self.cfg.sizes(), self.cfg.weights())):
            # each prefix adds its group's rows to the previous prefix's reconstruction
            x_hat_BD = x_hat_BD + (f_BF[:, start : start + size] @ self.W_dec[start : start + size]).float()
            start += size
            fvu_g, err_B = fvu(x_BD, x_hat_BD, total_var=total_var)
            loss = loss + w * fvu_g
            parts[f"fvu_{g}"] = fvu_g.detach()
        auxk = auxk_loss(z_BF, ctx.dead_mask_F, x_BD.float() - x_hat_BD, self.W_dec, self.aux_k, ctx.ranks)
        loss = loss + self.cfg.aux_coefficient * auxk
        with torch.no_grad():
            parts.update(
                fvu=fvu_g.detach(), mse=err_B.mean(), auxk=auxk.detach(), l0=torch.count_nonzero(f_BF).float() / B
            )
        return StepOutput(loss, x_hat_BD, f_BF, parts)
