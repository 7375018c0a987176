"""JumpReLU SAE with a straight-through L0 penalty (Rajamanoharan et al. 2024, Gemma Scope; SAELens "jumprelu").

    z = W_enc^T (x - b_dec) + b_enc          f = z * H(z - theta)   (theta > 0, one per latent)
    x_hat = W_dec^T f + b_dec
    L = mean_B ||x - x_hat||^2  +  lambda * sparsity_scale * mean_B sum_i H(z_i - theta_i)

H has zero derivative almost everywhere, so theta learns through pseudo-derivatives with a
rectangle kernel K(u) = 1[|u| < 1/2] of bandwidth eps:
    d f / d theta  = -(theta / eps) K((z - theta) / eps)
    d L0 / d theta = -(1 / eps) K((z - theta) / eps)
and no jump gradient flows into z (d f / d z = H(z - theta), d L0 / d z = 0).
``threshold`` is stored and trained directly (SAELens's inference layout); ``after_step`` keeps it
>= min_threshold, because a threshold at or below 0 would let every positive z through.
Inference is SAELens's: ReLU(z) * 1[z > theta], equal to z * H(z - theta) for theta > 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saeforge.config import ConfigError, F
from saeforge.saes.base import SAE, LossContext, SAEConfig, StepOutput
from saeforge.saes.losses import sum_sq_BD


@dataclass
class JumpReLUConfig(SAEConfig):
    architecture: str = F(
        "jumprelu", "Architecture name from the registry (set by the config class; not chosen freely)."
    )
    l0_coefficient: float = F(
        0.5,
        "lambda of the L0 penalty (mean active latents per token), for inputs scaled to E||x|| = sqrt(d_in). Larger = sparser.",
    )
    bandwidth: float = F(
        0.05, "eps, the width of the straight-through kernel for theta's gradient (SAELens's default)."
    )
    threshold_init: float = F(0.001, "Initial threshold theta of every latent.")
    min_threshold: float = F(1e-6, "Thresholds are clamped to at least this after every step (theta must stay > 0).")
    init_decoder_norm: float = F(0.1, "Norm of each decoder row at initialisation; W_enc = W_dec^T.")

    def __post_init__(self) -> None:
        SAEConfig.__post_init__(self)
        for name in ("bandwidth", "threshold_init", "min_threshold", "init_decoder_norm"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"sae.{name}={getattr(self, name)}: expected > 0")
        if self.l0_coefficient < 0:
            raise ConfigError(f"sae.l0_coefficient={self.l0_coefficient}: expected >= 0")


def _kernel(z_BF: Tensor, theta_F: Tensor, eps: float) -> Tensor:
    """K((z - theta) / eps) / eps: the rectangle kernel, as a [B, F] float tensor."""
    return ((z_BF - theta_F).abs() < eps / 2).to(z_BF.dtype) / eps


class JumpReLUFn(torch.autograd.Function):
    """f = z * H(z - theta); grads: z gets g * H(z - theta), theta gets sum_B g * -(theta/eps) K(.)."""

    @staticmethod
    def forward(ctx, z_BF, theta_F, eps):
        ctx.save_for_backward(z_BF, theta_F)
        ctx.eps = eps
        return z_BF * (z_BF > theta_F)

    @staticmethod
    def backward(ctx, g_BF):
        z_BF, theta_F = ctx.saved_tensors
        g_z = g_BF * (z_BF > theta_F)
        g_theta = -theta_F * (g_BF * _kernel(z_BF, theta_F, ctx.eps)).sum(dim=0)  # _kernel already has the 1/eps
        return g_z, g_theta, None


class StepFn(torch.autograd.Function):
    """H(z - theta); grads: z gets none, theta gets sum_B g * -(1/eps) K(.)."""

    @staticmethod
    def forward(ctx, z_BF, theta_F, eps):
        ctx.save_for_backward(z_BF, theta_F)
        ctx.eps = eps
        return (z_BF > theta_F).to(z_BF.dtype)

    @staticmethod
    def backward(ctx, g_BF):
        z_BF, theta_F = ctx.saved_tensors
        return None, -(g_BF * _kernel(z_BF, theta_F, ctx.eps)).sum(dim=0), None


class JumpReLUSAE(SAE):
    cfg: JumpReLUConfig
    transcoder_ok = True

    def __init__(self, cfg: JumpReLUConfig) -> None:
        SAE.__init__(self, cfg)  # the four shared parameters, initialised
        self.threshold = nn.Parameter(self.b_enc.new_full((cfg.d_sae,), cfg.threshold_init))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        self.init_decoder_and_transpose(generator, self.cfg.init_decoder_norm)
        self.b_enc.zero_()
        if hasattr(self, "threshold"):  # SAE.__init__ calls this before threshold exists
            self.threshold.fill_(self.cfg.threshold_init)

    def encode(self, x_BD: Tensor) -> Tensor:
        z_BF = self.pre_acts(x_BD)
        return torch.relu(z_BF) * (z_BF > self.threshold)

    def training_loss(self, x_BD: Tensor, ctx: LossContext) -> StepOutput:
        eps = self.cfg.bandwidth
        x_BD, y_BD = self.split_io(x_BD)  # a transcoder reads x and predicts y; an SAE's y is x
        z_BF = self.pre_acts(x_BD)
        f_BF = JumpReLUFn.apply(z_BF, self.threshold, eps)
        x_hat_BD = self.add_skip(self.decode(f_BF), x_BD)
        mse = sum_sq_BD(y_BD - x_hat_BD).mean()
        l0 = StepFn.apply(z_BF, self.threshold, eps).sum(dim=-1, dtype=torch.float32).mean()
        loss = mse + (self.cfg.l0_coefficient * ctx.sparsity_scale) * l0
        parts = {"mse": mse.detach(), "l0": l0.detach()}
        return StepOutput(loss, x_hat_BD, f_BF, parts)

    @torch.no_grad()
    def after_step(self) -> None:
        self.threshold.clamp_(min=self.cfg.min_threshold)
