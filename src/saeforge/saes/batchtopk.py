"""BatchTopK SAE (Bussmann et al. 2024), trained as BatchTopK and saved as a JumpReLU for inference.

Training: z = ReLU(W_enc^T (x - b_dec) + b_enc); keep the B * k largest entries of z across the
whole [B, F] batch (rows may keep more or fewer than k); x_hat = W_dec^T f + b_dec;
L = FVU(x, x_hat) + aux_coefficient * AuxK, with FVU and AuxK from losses.py, as in topk.py.

Data parallel (training/distributed.py): the B * k are chosen over the *global* batch, not B/N * k
over each rank's rows (``global_batch_topk_mask``: one all-gather of each rank's top B * k values),
so training and theta are the one-process ones, theta identical on every rank. Selecting per rank
would be cheaper by that all-gather but changes the SAE with the process count (a rank whose rows
are denser would keep fewer of them than one process keeps) and leaves each rank its own theta.

Inference cannot depend on the rest of the batch, so a single threshold theta is learned on the
side: after training step t (counting from 1) theta <- b_t * theta + (1 - b_t) * (smallest kept
positive z) with b_t = min(beta, 1 - 1/t): the plain mean of the first 1/(1 - beta) steps, an EMA
after (a bare EMA started at the first value would stay anchored to the untrained SAE's first
batch in runs shorter than ~1/(1 - beta) steps). ``encode`` is then the JumpReLU ReLU(z) * 1[z > theta], and
``inference_sae()`` returns that JumpReLU (threshold theta for every latent) with identical
outputs: ``formats.save_sae`` saves that one, so SAELens and saeforge load a plain "jumprelu".
theta is a buffer (checkpointed with the weights). Before the first training step (theta < 0)
``encode`` falls back to the batch top-k of its own input.

Decoder rows are unit norm, maintained as in TopK (remove_parallel_grads / after_step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saeforge.config import ConfigError, F
from saeforge.saes.base import (
    SAE,
    LossContext,
    Ranks,
    SAEConfig,
    StepOutput,
    remove_parallel_grad_,
    unit_norm_rows_,
)
from saeforge.saes.jumprelu import JumpReLUConfig, JumpReLUSAE
from saeforge.saes.losses import auxk_loss, fvu


@dataclass
class BatchTopKConfig(SAEConfig):
    architecture: str = F(
        "batchtopk", "Architecture name from the registry (set by the config class; not chosen freely)."
    )
    k: int = F(32, "Mean active latents per token: the batch keeps its B * k largest activations.")
    aux_k: int = F(0, "Dead latents per token used by the AuxK loss; 0 = d_in // 2.")
    aux_coefficient: float = F(1 / 32, "Weight of the AuxK dead-latent loss.")
    threshold_beta: float = F(0.999, "EMA decay of the inference threshold (smallest kept activation per batch).")

    def __post_init__(self) -> None:
        SAEConfig.__post_init__(self)
        if not 0 < self.k <= self.d_sae:
            raise ConfigError(f"sae.k={self.k}: expected 1 <= k <= d_sae ({self.d_sae})")
        if self.aux_k < 0 or self.aux_coefficient < 0:
            raise ConfigError(f"sae.aux_k={self.aux_k}, sae.aux_coefficient={self.aux_coefficient}: expected >= 0")
        if not 0 <= self.threshold_beta < 1:
            raise ConfigError(f"sae.threshold_beta={self.threshold_beta}: expected 0 <= beta < 1")


def batch_topk_mask(z_BF: Tensor, k: int) -> Tensor:
    """Bool [B, F]: True at the B * k largest entries of z across the whole batch."""
    flat = z_BF.reshape(-1)
    idx = flat.topk(min(k * z_BF.shape[0], flat.numel()), sorted=False).indices
    return torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, idx, True).view_as(z_BF)


def global_batch_topk_mask(z_BF: Tensor, k: int, ranks: Ranks) -> tuple[Tensor, Tensor | None]:
    """``batch_topk_mask`` over the data-parallel *global* batch, of which z_BF is this rank's rows.

    The global top B*k entries are the top B*k of the union of every rank's own top B*k (B = global
    rows), so one all-gather of B*k values per rank finds the global cut t exactly; this rank keeps
    its entries >= t. Returns (mask_BF, smallest kept positive value or None if none is positive),
    computed from the same gathered values on every rank, so the threshold EMA is the same everywhere.
    It equals the one-process selection except at exact ties with t (measure zero in float32; bf16
    values can tie, and then every tied entry is kept). Entries at 0 do not matter: f = z * mask.
    """
    n_keep = k * z_BF.shape[0] * ranks.world
    flat = z_BF.detach().reshape(-1)
    every = ranks.gather(flat.topk(min(n_keep, flat.numel()), sorted=False).values)
    kept = every.topk(n_keep, sorted=False).values  # every rank sent min(B*k, its B/N * F) >= its share
    cut = kept.min()
    if cut > 0:
        return z_BF >= cut, cut
    positive = kept[kept > 0]  # fewer than B*k positives: all of them are kept (and gathered)
    return z_BF > 0, (positive.min() if positive.numel() else None)


class BatchTopKSAE(SAE):
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig) -> None:
        SAE.__init__(self, cfg)
        self.register_buffer("threshold", self.b_dec.new_full((), -1.0))  # < 0: not estimated yet
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long, device=self.b_dec.device))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        self.init_decoder_and_transpose(generator, 1.0)
        self.b_enc.zero_()
        if hasattr(self, "threshold"):
            self.threshold.fill_(-1.0)
            self.threshold_updates.zero_()

    @property
    def aux_k(self) -> int:
        return self.cfg.aux_k or max(1, self.d_in // 2)

    def encode(self, x_BD: Tensor) -> Tensor:
        z_BF = self.pre_acts(x_BD)
        if self.threshold < 0:
            return torch.relu(z_BF) * batch_topk_mask(z_BF, self.cfg.k)
        return torch.relu(z_BF) * (z_BF > self.threshold)

    def train_latents(self, x_BD: Tensor, ranks: Ranks | None = None) -> tuple[Tensor, Tensor]:
        """(z_BF, f_BF) as in training, updating theta when the module is in training mode.

        With ``ranks`` (data parallel) the selection and theta's statistic are the global batch's.
        """
        z_BF = torch.relu(self.pre_acts(x_BD))
        if ranks is None:
            f_BF = z_BF * batch_topk_mask(z_BF, self.cfg.k)
            if self.training:
                self.update_threshold(f_BF.detach())
        else:
            mask_BF, smallest = global_batch_topk_mask(z_BF, self.cfg.k, ranks)
            f_BF = z_BF * mask_BF
            if self.training and smallest is not None:
                self._threshold_step(smallest)
        return z_BF, f_BF

    @torch.no_grad()
    def update_threshold(self, f_BF: Tensor) -> None:
        kept = f_BF[f_BF > 0]
        if kept.numel() > 0:
            self._threshold_step(kept.min())

    @torch.no_grad()
    def _threshold_step(self, smallest_kept: Tensor) -> None:
        self.threshold_updates += 1
        b = min(self.cfg.threshold_beta, 1 - 1 / int(self.threshold_updates))  # 0 on the first update
        self.threshold.copy_(b * self.threshold + (1 - b) * smallest_kept.float())

    def training_loss(self, x_BD: Tensor, ctx: LossContext) -> StepOutput:
        B = x_BD.shape[0]
        if B < 2:
            raise ConfigError(
                f"BatchTopK's normalised MSE needs a batch of at least 2 rows (got {B}); raise the batch size"
            )
        z_BF, f_BF = self.train_latents(x_BD, ctx.ranks)
        x_hat_BD = self.decode(f_BF)
        loss_fvu, err_B = fvu(x_BD, x_hat_BD, ctx.ranks)
        auxk = auxk_loss(z_BF, ctx.dead_mask_F, x_BD.float() - x_hat_BD.float(), self.W_dec, self.aux_k, ctx.ranks)
        loss = loss_fvu + self.cfg.aux_coefficient * auxk
        with torch.no_grad():
            parts = {
                "fvu": loss_fvu.detach(),
                "mse": err_B.mean(),
                "auxk": auxk.detach(),
                "l0": torch.count_nonzero(f_BF).float() / B,
            }
        return StepOutput(loss, x_hat_BD, f_BF, parts)

    def remove_parallel_grads(self) -> None:
        remove_parallel_grad_(self.W_dec)  # unit-norm decoder rows

    def after_step(self) -> None:
        unit_norm_rows_(self.W_dec)

    @torch.no_grad()
    def inference_sae(self):
        """The JumpReLU with theta for every latent and the same weights: identical ``encode``/``forward``.

        Needs a trained theta (>= 0); folding the input scale first is fine (it keeps pre-activations).
        """
        if self.threshold < 0:
            raise ValueError("this BatchTopK SAE has no inference threshold yet (train at least one step first)")
        cfg = self.cfg
        jr = JumpReLUSAE(
            JumpReLUConfig(
                d_in=cfg.d_in,
                d_sae=cfg.d_sae,
                dtype=cfg.dtype,
                device=cfg.device,
                apply_b_dec_to_input=cfg.apply_b_dec_to_input,
            )
        )
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(jr, name).copy_(getattr(self, name))
        jr.threshold.fill_(float(self.threshold))
        return jr
