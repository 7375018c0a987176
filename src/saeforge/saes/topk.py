"""TopK SAE with the AuxK dead-latent loss (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    z = ReLU(TopK_k(W_enc^T (x - b_dec) + b_enc))          x_hat = W_dec^T z + b_dec
    L = FVU(x, x_hat) + aux_coefficient * AuxK

FVU (normalised MSE) = sum_B ||x - x_hat||^2 / sum_B ||x - mean_B x||^2, i.e. mean over the batch
of the squared error over the batch's own total variance (so 1.0 = predicting the batch mean).
AuxK: e = x - x_hat (detached). Among the latents in ctx.dead_mask_F, each row keeps its top
aux_k pre-activations (ReLU'd); e_hat = W_dec^T z_aux (no bias: it predicts a residual).
AuxK = sum_B ||e - e_hat||^2 / sum_B ||e - mean_B e||^2 -- normalised by the residual's own
variance as in OpenAI's code, so dead latents get a signal of size ~1 however good the live
ones already are. It is 0 (no graph) when no latent is dead. Its gradient reaches only the
selected dead latents' W_enc columns, b_enc entries and W_dec rows -- and b_dec, which every
latent shares through the input centring x - b_dec (as in the reference implementations).

Decoder rows are kept unit norm: the trainer calls ``remove_parallel_grads()`` after backward
(drops the gradient component along each row, which would only change its norm) and
``after_step()`` after the optimiser step (re-projects rows to norm 1).

Fast path: decoding touches only k rows per token, so training decodes with a gather-sum,
``embedding_bag(idx_BK, W_dec, per_sample_weights=vals_BK, mode="sum")``; the dense
scatter-then-matmul reference (``sparse_decode=False``) must agree with it (see the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as Fn
from torch import Tensor

from saeforge.config import ConfigError, F
from saeforge.saes.base import SAE, LossContext, SAEConfig, StepOutput, random_directions, sum_sq_BD


@dataclass
class TopKConfig(SAEConfig):
    architecture: str = F("topk", "Architecture name from the registry (set by the config class; not chosen freely).")
    k: int = F(32, "Active latents per token (the L0).")
    aux_k: int = F(0, "Dead latents per token used by the AuxK loss; 0 = d_in // 2 (the paper's heuristic).")
    aux_coefficient: float = F(1 / 32, "Weight of the AuxK dead-latent loss (the paper uses 1/32).")
    sparse_decode: bool = F(True, "Decode with embedding_bag over the k active rows while training (False = dense reference).")

    def __post_init__(self) -> None:
        SAEConfig.__post_init__(self)
        if not 0 < self.k <= self.d_sae:
            raise ConfigError(f"sae.k={self.k}: expected 1 <= k <= d_sae ({self.d_sae})")
        if self.aux_k < 0:
            raise ConfigError(f"sae.aux_k={self.aux_k}: expected >= 0 (0 = d_in // 2)")
        if self.aux_coefficient < 0:
            raise ConfigError(f"sae.aux_coefficient={self.aux_coefficient}: expected >= 0")


class TopKSAE(SAE):
    cfg: TopKConfig

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        W_dec_FD = random_directions(self.d_sae, self.d_in, generator, norm=1.0)
        self.W_dec.copy_(W_dec_FD)
        self.W_enc.copy_(W_dec_FD.T)
        self.b_enc.zero_()
        self.b_dec.zero_()  # the trainer may set it to the data's geometric median or mean

    @property
    def aux_k(self) -> int:
        return self.cfg.aux_k or max(1, self.d_in // 2)

    def topk(self, pre_BF: Tensor) -> tuple[Tensor, Tensor]:
        """(vals_BK, idx_BK): the k largest pre-activations per row, ReLU'd (a kept negative becomes 0)."""
        vals_BK, idx_BK = pre_BF.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.relu(vals_BK), idx_BK

    def encode(self, x_BD: Tensor) -> Tensor:
        pre_BF = self.pre_acts(x_BD)
        vals_BK, idx_BK = self.topk(pre_BF)
        return torch.zeros_like(pre_BF).scatter_(-1, idx_BK, vals_BK)

    def decode_sparse(self, vals_BK: Tensor, idx_BK: Tensor, bias: bool = True) -> Tensor:
        """sum_j vals[b, j] * W_dec[idx[b, j]] (+ b_dec): the fast path, equal to ``decode(dense f)``.

        embedding_bag needs per-sample weights in the table's dtype, and bf16 autocast hands us
        bf16 values: cast to W_dec's dtype (the gather-sum is memory-bound; fp32 costs little).
        """
        out_BD = Fn.embedding_bag(idx_BK, self.W_dec, per_sample_weights=vals_BK.to(self.W_dec.dtype), mode="sum")
        return out_BD + self.b_dec if bias else out_BD

    def training_loss(self, x_BD: Tensor, ctx: LossContext) -> StepOutput:
        B = x_BD.shape[0]
        if B < 2:
            raise ValueError(f"TopK's normalised MSE needs a batch of at least 2 rows (got {B}); raise the batch size")
        pre_BF = self.pre_acts(x_BD)
        vals_BK, idx_BK = self.topk(pre_BF)
        if self.cfg.sparse_decode:
            x_hat_BD = self.decode_sparse(vals_BK, idx_BK)
        else:
            x_hat_BD = self.decode(torch.zeros_like(pre_BF).scatter(-1, idx_BK, vals_BK))
        x_BD = x_BD.float()
        err_B = sum_sq_BD(x_BD - x_hat_BD)
        total_var = sum_sq_BD(x_BD - x_BD.mean(dim=0)).sum().clamp_min(1e-12)
        fvu = err_B.sum() / total_var
        auxk = self._auxk(pre_BF, (x_BD - x_hat_BD).detach(), ctx.dead_mask_F)
        loss = fvu + self.cfg.aux_coefficient * auxk
        with torch.no_grad():
            parts = {
                "fvu": fvu.detach(),
                "mse": err_B.mean(),
                "auxk": auxk.detach(),
                "l0": torch.count_nonzero(vals_BK).float() / B,
            }
        return StepOutput(loss, x_hat_BD, None, parts, top_vals_BK=vals_BK, top_idx_BK=idx_BK, d_sae=self.d_sae)

    def _auxk(self, pre_BF: Tensor, e_BD: Tensor, dead_mask_F: Tensor | None) -> Tensor:
        if dead_mask_F is None:
            return e_BD.new_zeros(())
        dead_idx_N = dead_mask_F.to(pre_BF.device).nonzero().squeeze(1)
        n_dead = dead_idx_N.numel()
        if n_dead == 0:
            return e_BD.new_zeros(())
        k_aux = min(self.aux_k, n_dead)
        if self.cfg.sparse_decode:
            # Pick among the dead columns only: a [B, n_dead] slice instead of a masked [B, F] copy.
            vals_BA, j_BA = pre_BF[:, dead_idx_N].topk(k_aux, dim=-1, sorted=False)
            e_hat_BD = self.decode_sparse(torch.relu(vals_BA), dead_idx_N[j_BA], bias=False)
        else:
            masked_BF = pre_BF.masked_fill(~dead_mask_F.to(pre_BF.device), float("-inf"))
            vals_BA, idx_BA = masked_BF.topk(k_aux, dim=-1, sorted=False)
            z_BF = torch.zeros_like(pre_BF).scatter(-1, idx_BA, torch.relu(vals_BA))
            e_hat_BD = z_BF @ self.W_dec
        e_var = sum_sq_BD(e_BD - e_BD.mean(dim=0)).sum().clamp_min(1e-12)
        return sum_sq_BD(e_BD - e_hat_BD).sum() / e_var

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the part of each decoder row's gradient that points along the row (it only changes the norm)."""
        g_FD = self.W_dec.grad
        if g_FD is None:
            return
        u_FD = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        g_FD.sub_((g_FD * u_FD).sum(dim=1, keepdim=True) * u_FD)

    @torch.no_grad()
    def after_step(self) -> None:
        """Re-project decoder rows to unit norm after the optimiser step."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
