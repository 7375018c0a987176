"""ReLU SAE with the decoder-norm-weighted L1 penalty (Anthropic's April 2024 recipe; SAELens "standard").

    f = ReLU(W_enc^T (x - b_dec) + b_enc)        x_hat = W_dec^T f + b_dec
    L = mean_B ||x - x_hat||^2  +  lambda * sparsity_scale * mean_B sum_i f_i^p ||W_dec[i]||

p = ctx.p is 1 (the plain decoder-norm-weighted L1) unless the trainer anneals it (train.p_end).
With ``tied`` the encoder is W_dec^T itself (one [F, D] parameter; see SAE.__getattr__).

No unit-norm constraint: weighting each f_i by its decoder row norm makes the penalty
invariant to moving scale between a latent's encoder and decoder, so the norm constraint is
not needed. Init: decoder rows are random directions of norm 0.1, W_enc = W_dec^T, biases 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saeforge.config import ConfigError, F
from saeforge.saes.base import SAE, LossContext, SAEConfig, StepOutput
from saeforge.saes.losses import sum_sq_BD


@dataclass
class ReLUConfig(SAEConfig):
    architecture: str = F("relu", "Architecture name from the registry (set by the config class; not chosen freely).")
    l1_coefficient: float = F(
        5.0,
        "lambda of the decoder-norm-weighted L1 penalty, for inputs scaled to E||x|| = sqrt(d_in) "
        "(train.normalize_activations). Larger = sparser.",
    )
    # Why 5: with inputs scaled so ||x||^2 ~ d_in, the squared error of the summed-over-D MSE is
    # on the same scale for every model width, and a latent whose contribution f_i W_dec[i] has
    # length a is worth keeping only if it removes more than ~lambda * a of squared error. lambda = 5
    # is the value Anthropic report for this normalisation and SAELens's suggestion for the
    # standard SAE; it gives L0 in the tens on small LMs. Sweep it: it is the sparsity knob.
    init_decoder_norm: float = F(0.1, "Norm of each decoder row at initialisation (the 2024 recipe uses 0.1).")
    tied: bool = F(False, "Tie the encoder to the decoder: W_enc is W_dec^T, one parameter (saved as both tensors).")

    def __post_init__(self) -> None:
        SAEConfig.__post_init__(self)
        if self.l1_coefficient < 0:
            raise ConfigError(f"sae.l1_coefficient={self.l1_coefficient}: expected >= 0")
        if self.init_decoder_norm <= 0:
            raise ConfigError(f"sae.init_decoder_norm={self.init_decoder_norm}: expected > 0")


class ReLUSAE(SAE):
    cfg: ReLUConfig
    transcoder_ok = True

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        self.init_decoder_and_transpose(generator, self.cfg.init_decoder_norm)
        self.b_enc.zero_()

    def encode(self, x_BD: Tensor) -> Tensor:
        return torch.relu(self.pre_acts(x_BD))

    def training_loss(self, x_BD: Tensor, ctx: LossContext) -> StepOutput:
        B = x_BD.shape[0]
        x_BD, y_BD = self.split_io(x_BD)  # a transcoder reads x and predicts y; an SAE's y is x
        f_BF = torch.relu(self.pre_acts(x_BD))
        x_hat_BD = self.add_skip(self.decode(f_BF), x_BD)
        mse = sum_sq_BD(y_BD - x_hat_BD).mean()
        dec_norm_F = self.W_dec.norm(dim=1)
        l1 = self.penalty(f_BF, dec_norm_F, ctx.p)
        loss = mse + (self.cfg.l1_coefficient * ctx.sparsity_scale) * l1
        with torch.no_grad():
            l0 = torch.count_nonzero(f_BF).float() / B
            parts = {"mse": mse.detach(), "l1": l1.detach(), "l0": l0}
            if ctx.p_probe is not None:
                parts["lp_probe"] = self.penalty(f_BF, dec_norm_F, ctx.p_probe)
        return StepOutput(loss, x_hat_BD, f_BF, parts)

    @staticmethod
    def penalty(f_BF: Tensor, dec_norm_F: Tensor, p: float) -> Tensor:
        """mean_B sum_i f_i^p ||W_dec[i]|| (f >= 0). p = 1 skips the pow: the loss is exactly the L1 one."""
        # sum_b first (an [F] vector accumulated in fp32), then weight by the row norms: the same
        # number as mean_b sum_i f_bi^p ||W_dec[i]|| without a second [B, F] tensor. For p < 1 the
        # pow's gradient is infinite at f = 0, but ReLU's backward selects 0 there (no NaN).
        f_BF = f_BF if p == 1 else f_BF.float().pow(p)
        return (f_BF.sum(dim=0, dtype=torch.float32) * dec_norm_F.float()).sum() / f_BF.shape[0]
