"""Dead-latent handling, one small class per ``train.dead_latents`` value.

The trainer asks its handler three things each step (Trainer._step):
  loss_dead_mask(dead_mask_F)   what LossContext.dead_mask_F gets; None turns the SAE's AuxK off
  extra_loss(sae, x_BD, out, dead_mask_F) -> Tensor | None   added to the loss before backward
  after_step(trainer, x_BD, out)   after the optimiser step and the firing-count update
Handlers keep no state of their own: resampling draws from a generator seeded by (train.seed, step),
and what it changes (weights, Adam moments, firing counters) is Trainer state, so Trainer.state_dict
stays the whole checkpoint.

- auto: the architecture's own (AuxK inside topk/batchtopk/matryoshka; nothing for the others).
- none: nothing, AuxK off.
- resample (Anthropic 2023, SPECS.md): every ``resample_every_steps`` steps, each dead latent gets a
  row x of the current (global) batch drawn with probability proportional to loss^2, where loss is the
  row's squared reconstruction error ||x - x_hat||^2 from this step's forward (before the update: no
  extra forward). W_dec[i] = x/||x||; W_enc[:, i] = that * 0.2 * mean ||W_enc[:, j]|| over live j (1
  when none is live); per-latent biases (b_enc; gated: b_gate, b_mag, r_mag) = 0; Adam's exp_avg and
  exp_avg_sq of exactly those entries = 0; its firing counter restarts, so it gets a full dead window.
- ghost (ghost grads, SPECS.md): for dead latents g = exp(pre_act[dead]) @ W_dec[dead], rescaled per row
  so ||g|| = ||r||/2 (r = x - x_hat, the factor detached); L_ghost = MSE(g, sg(r)) * sg(MSE_main / MSE_ghost).
  Its value equals MSE_main; its gradient reaches only the dead latents' W_enc columns, biases and
  W_dec rows (pre-activations are taken with b_dec detached, see SAE.pre_acts_of).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saeforge.config import ConfigError, TrainConfig
from saeforge.saes.losses import sum_sq_BD

GHOST_ARCHS = ("relu", "gated")
RESAMPLE_ARCHS = ("relu", "topk", "batchtopk", "matryoshka", "gated", "jumprelu")
LATENT_BIASES = ("b_enc", "b_gate", "b_mag", "r_mag")  # [F] parameters a resampled latent starts at 0


def check_dead_latents(train: TrainConfig, sae_cfg) -> None:
    arch, mode = getattr(sae_cfg, "architecture", ""), train.dead_latents
    if mode == "ghost" and arch not in GHOST_ARCHS:
        raise ConfigError(
            f"train.dead_latents=ghost needs a ReLU-style encoder (relu or gated), not {arch!r}; "
            "use auto (AuxK) or resample for it"
        )
    if mode == "resample" and arch not in RESAMPLE_ARCHS:
        raise ConfigError(f"train.dead_latents=resample supports {RESAMPLE_ARCHS}, not {arch!r}; use auto or none")
    if mode == "resample" and getattr(sae_cfg, "tied", False):
        raise ConfigError(
            "train.dead_latents=resample sets the encoder row to 0.2x a different norm than the decoder "
            "row, which a tied SAE cannot hold: use sae.tied=false, or dead_latents auto/none/ghost"
        )


class DeadLatentHandler:
    """Base: no dead-latent handling of its own and AuxK off (``none``)."""

    uses_auxk = False

    def loss_dead_mask(self, dead_mask_F: Tensor) -> Tensor | None:
        return dead_mask_F if self.uses_auxk else None

    def extra_loss(self, sae, x_BD: Tensor, out, dead_mask_F: Tensor) -> Tensor | None:
        return None

    def after_step(self, trainer, x_BD: Tensor, out) -> None:
        pass


class ArchitectureOwn(DeadLatentHandler):
    """``auto``: the SAE sees the dead mask (AuxK for the TopK family; others ignore it)."""

    uses_auxk = True


class Resample(DeadLatentHandler):
    def __init__(self, every_steps: int) -> None:
        self.every_steps = every_steps

    def after_step(self, trainer, x_BD: Tensor, out) -> None:
        if (trainer.step + 1) % self.every_steps:  # trainer.step counts this step only after _step
            return
        dead_F = trainer.dead_mask_F  # the same on every rank (firing counts are summed over ranks)
        if not bool(dead_F.any()):
            return
        err_B = sum_sq_BD(x_BD - out.x_hat_BD).detach()
        # every rank draws from the same global batch with the same generator: identical weights after
        x_ND = trainer._gather_rows(x_BD)
        err_N = trainer._gather_rows(err_B[:, None]).squeeze(1)
        gen = torch.Generator().manual_seed(trainer.cfg.seed * 1_000_003 + trainer.step)
        resample_latents(trainer.sae, trainer.opt, dead_F, x_ND, err_N, gen)
        trainer.tokens_since_fired_F[dead_F] = 0


@torch.no_grad()
def resample_latents(
    sae, opt: torch.optim.Optimizer, dead_F: Tensor, x_ND: Tensor, loss_N: Tensor, generator: torch.Generator
) -> Tensor:
    """Re-initialise the latents in ``dead_F`` from rows of x_ND (the recipe in the module docstring).

    Returns the chosen row index per dead latent (in dead_F.nonzero() order).
    """
    dead_idx_N = dead_F.nonzero().squeeze(1)
    weights_N = loss_N.detach().double().cpu().pow(2)
    if not weights_N.sum() > 0:  # a perfect reconstruction: no row is worse than another
        weights_N = torch.ones_like(weights_N)
    n = len(dead_idx_N)
    rows = torch.multinomial(weights_N, n, replacement=n > int((weights_N > 0).sum()), generator=generator)
    v_ND = x_ND[rows.to(x_ND.device)].to(sae.W_dec.device, sae.W_dec.dtype)
    u_ND = v_ND / v_ND.norm(dim=1, keepdim=True).clamp_min(1e-12)
    live_F = ~dead_F
    live_norm = sae.W_enc[:, live_F].norm(dim=0).mean() if bool(live_F.any()) else torch.tensor(1.0)
    sae.W_dec[dead_idx_N] = u_ND
    sae.W_enc[:, dead_idx_N] = (u_ND * (0.2 * live_norm)).T
    touched = [(sae.W_dec, 0), (sae.W_enc, 1)]
    for name in LATENT_BIASES:
        if name in sae._parameters:
            getattr(sae, name)[dead_idx_N] = 0
            touched.append((getattr(sae, name), 0))
    for param, dim in touched:  # Adam moments of those entries only; the shared step count stays
        state = opt.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].index_fill_(dim, dead_idx_N.to(state[key].device), 0)
    return rows


class GhostGrads(DeadLatentHandler):
    def extra_loss(self, sae, x_BD: Tensor, out, dead_mask_F: Tensor) -> Tensor:
        dead_idx_N = dead_mask_F.nonzero().squeeze(1)
        if len(dead_idx_N) == 0:
            return x_BD.new_zeros((), dtype=torch.float32)
        return ghost_loss(sae, x_BD, out.x_hat_BD, dead_idx_N)


def ghost_loss(sae, x_BD: Tensor, x_hat_BD: Tensor, dead_idx_N: Tensor) -> Tensor:
    """L_ghost of SPECS.md for latents dead_idx_N (MSE = mean over rows of the summed squares, as the SAEs')."""
    r_BD = (x_BD.float() - x_hat_BD.float()).detach()
    pre_BN = sae.pre_acts_of(x_BD, dead_idx_N).float()
    # exp(pre - m) with m the detached row max: the per-row rescale below removes any per-row factor, so
    # value and gradient are exactly those of exp(pre), without overflow for large pre-activations.
    h_BN = torch.exp(pre_BN - pre_BN.max(dim=1, keepdim=True).values.detach())
    g_BD = h_BN @ sae.W_dec[dead_idx_N].float()
    scale_B = (r_BD.norm(dim=1) / (2 * g_BD.norm(dim=1).clamp_min(1e-12))).detach()
    g_BD = g_BD * scale_B[:, None]
    mse_main = sum_sq_BD(r_BD).mean()
    mse_ghost = sum_sq_BD(g_BD - r_BD).mean()
    return mse_ghost * (mse_main / mse_ghost.detach().clamp_min(1e-12))


def make_handler(cfg: TrainConfig, sae, batch_size: int) -> DeadLatentHandler:
    check_dead_latents(cfg, sae.cfg)
    if cfg.dead_latents == "auto":
        return ArchitectureOwn()
    if cfg.dead_latents == "resample":
        return Resample(cfg.resample_every_steps or max(1, math.ceil(cfg.dead_after_tokens / batch_size)))
    if cfg.dead_latents == "ghost":
        return GhostGrads()
    return DeadLatentHandler()
