"""Gated SAE (Rajamanoharan et al. 2024, "Improving dictionary learning with gated sparse autoencoders"; SAELens "gated").

    x_c = x - b_dec                       (when apply_b_dec_to_input)
    pi_gate = W_enc^T x_c + b_gate         pi_mag = exp(r_mag) * (W_enc^T x_c) + b_mag
    f = 1[pi_gate > 0] * ReLU(pi_mag)      x_hat = W_dec^T f + b_dec
    L = mean_B ||x - x_hat||^2 + lambda * sparsity_scale * mean_B sum_i ReLU(pi_gate)_i^p
        + mean_B ||x - (sg(W_dec)^T ReLU(pi_gate) + sg(b_dec))||^2            (the auxiliary loss)

The gate decides which latents fire and the magnitude path how much; they share W_enc (rescaled
row-wise by exp(r_mag)). The Heaviside gate passes no gradient, so the gate path learns only from
the L1 penalty and the auxiliary loss; sg() = stop-gradient keeps that auxiliary loss from moving the
decoder (b_dec still gets its share through the input centring x - b_dec, as in the paper).
Decoder rows are kept unit norm (gradient component along each row removed before the step, rows
re-normalised after), so the L1 needs no decoder-norm weighting. The paper trains with Adam betas
(0, 0.999): pass --train.adam_beta1 0.

p = ctx.p is 1 (the paper's L1) unless the trainer anneals it (train.p_end).
Parameters follow SAELens's gated layout: W_enc, b_gate, b_mag, r_mag, W_dec, b_dec (no b_enc).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saeforge.config import ConfigError, F
from saeforge.saes.base import (
    SAE,
    LossContext,
    SAEConfig,
    StepOutput,
    remove_parallel_grad_,
    unit_norm_rows_,
)
from saeforge.saes.losses import sum_sq_BD


@dataclass
class GatedConfig(SAEConfig):
    architecture: str = F("gated", "Architecture name from the registry (set by the config class; not chosen freely).")
    l1_coefficient: float = F(
        1.0, "lambda of the L1 penalty on ReLU(pi_gate), for inputs scaled to E||x|| = sqrt(d_in). Larger = sparser."
    )

    def __post_init__(self) -> None:
        SAEConfig.__post_init__(self)
        if self.l1_coefficient < 0:
            raise ConfigError(f"sae.l1_coefficient={self.l1_coefficient}: expected >= 0")


class GatedSAE(SAE):
    cfg: GatedConfig

    def __init__(self, cfg: GatedConfig) -> None:
        SAE.__init__(self, cfg)
        del self.b_enc  # the gated layout has b_gate and b_mag in its place
        self.b_gate = nn.Parameter(self.b_dec.new_zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(self.b_dec.new_zeros(cfg.d_sae))
        self.r_mag = nn.Parameter(self.b_dec.new_zeros(cfg.d_sae))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        self.init_decoder_and_transpose(generator, 1.0)
        for name in ("b_enc", "b_gate", "b_mag", "r_mag"):  # b_enc only during SAE.__init__
            if hasattr(self, name):
                getattr(self, name).zero_()

    def gate_and_mag(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        """(pi_gate_BF, pi_mag_BF): one shared encoder matmul."""
        x_BD = x_BD.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x_BD = x_BD - self.b_dec
        xw_BF = x_BD @ self.W_enc
        return xw_BF + self.b_gate, xw_BF * torch.exp(self.r_mag) + self.b_mag

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """The gate pre-activations pi_gate (what decides firing)."""
        return self.gate_and_mag(x_BD)[0]

    def encode(self, x_BD: Tensor) -> Tensor:
        gate_BF, mag_BF = self.gate_and_mag(x_BD)
        return (gate_BF > 0) * torch.relu(mag_BF)

    def training_loss(self, x_BD: Tensor, ctx: LossContext) -> StepOutput:
        B = x_BD.shape[0]
        gate_BF, mag_BF = self.gate_and_mag(x_BD)
        f_BF = (gate_BF > 0) * torch.relu(mag_BF)
        x_hat_BD = self.decode(f_BF)
        mse = sum_sq_BD(x_BD - x_hat_BD).mean()
        gate_act_BF = torch.relu(gate_BF)
        l1 = self.penalty(gate_act_BF, ctx.p)
        aux = sum_sq_BD(x_BD - (gate_act_BF @ self.W_dec.detach() + self.b_dec.detach())).mean()
        loss = mse + (self.cfg.l1_coefficient * ctx.sparsity_scale) * l1 + aux
        with torch.no_grad():
            l0 = torch.count_nonzero(f_BF).float() / B
            parts = {"mse": mse.detach(), "l1": l1.detach(), "aux": aux.detach(), "l0": l0}
            if ctx.p_probe is not None:
                parts["lp_probe"] = self.penalty(gate_act_BF, ctx.p_probe)
        return StepOutput(loss, x_hat_BD, f_BF, parts)

    @staticmethod
    def penalty(gate_act_BF: Tensor, p: float) -> Tensor:
        """mean_B sum_i ReLU(pi_gate)_i^p; p = 1 skips the pow (exactly the L1). ReLU's backward zeroes
        the infinite pow gradient at 0 for p < 1."""
        a_BF = gate_act_BF if p == 1 else gate_act_BF.float().pow(p)
        return a_BF.sum(dim=-1, dtype=torch.float32).mean()

    def pre_acts_of(self, x_BD: Tensor, idx_N: Tensor) -> Tensor:
        """Gate pre-activations [B, N] of latents idx_N, b_dec detached (what ghost grads revive)."""
        x_BD = x_BD.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x_BD = x_BD - self.b_dec.detach()
        return x_BD @ self.W_enc[:, idx_N] + self.b_gate[idx_N]

    def remove_parallel_grads(self) -> None:
        remove_parallel_grad_(self.W_dec)  # unit-norm decoder rows

    def after_step(self) -> None:
        unit_norm_rows_(self.W_dec)
