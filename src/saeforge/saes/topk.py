"""TopK SAE with the AuxK dead-latent loss (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    z = ReLU(TopK_k(W_enc^T (x - b_dec) + b_enc))          x_hat = W_dec^T z + b_dec
    L = FVU(x, x_hat) + aux_coefficient * AuxK

FVU (normalised MSE) = sum_B ||x - x_hat||^2 / sum_B ||x - mean_B x||^2, i.e. mean over the batch
of the squared error over the batch's own total variance (so 1.0 = predicting the batch mean).
AuxK: e = x - x_hat (detached). Among the latents in ctx.dead_mask_F, each row keeps its top
aux_k pre-activations (ReLU'd); e_hat = W_dec^T z_aux (no bias: it predicts a residual).
AuxK = FVU(e, e_hat) -- normalised by the residual's own variance as in OpenAI's code, so dead
latents get a signal of size ~1 however good the live ones already are. It is 0 (no graph) when
no latent is dead. Its gradient reaches only the selected dead latents' W_enc columns, b_enc
entries and W_dec rows -- and b_dec, which every latent shares through the input centring
x - b_dec (as in the reference implementations). Both formulas are losses.py's; here AuxK's
selection and decode take the fast paths below (``losses.auxk_loss`` is its plain form).

With ``tied`` the encoder is W_dec^T itself (one [F, D] parameter; see SAE.__getattr__): the fast
encoder backward's W_enc gradient flows through the transpose into W_dec.

Decoder rows are kept unit norm: the trainer calls ``remove_parallel_grads()`` after backward
(drops the gradient component along each row, which would only change its norm) and
``after_step()`` after the optimiser step (re-projects rows to norm 1).

Fast paths, each with the plain autograd reference beside it (the tests check that values and
gradients agree; ``sae.fast = FastPaths(...)`` with a flag False runs the reference -- a switch for
tests and benchmarks, not config, so it is never saved):
- sparse_decode: decoding touches only k rows per token, so it is a gather-sum,
  ``embedding_bag(idx_BK, W_dec, per_sample_weights=vals_BK, mode="sum")``, not a [B, F] x [F, D] matmul.
- sparse_encoder_grad: only the selected pre-activations get a gradient, so W_enc's gradient is a
  sparse [F, B] x [B, D] product over those entries, not x^T times a mostly-zero [B, F] matrix.
- blocked_topk: the top k of each row in two small stages (sparse.topk_blocked), not one torch.topk
  over all F; the same set of latents.
The forward encoder matmul stays dense: every pre-activation is needed to find the top k. It writes
into a reused buffer (sparse.scratch). The kernels and their references are in sparse.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saeforge.config import ConfigError, F
from saeforge.saes.base import (
    SAE,
    LossContext,
    SAEConfig,
    StepOutput,
    remove_parallel_grad_,
    unit_norm_rows_,
)
from saeforge.saes.losses import auxk, dead_topk, fvu
from saeforge.saes.sparse import latent_csr, scatter_rows, scratch, sparse_decode, topk_blocked, transpose_tiled


@dataclass
class TopKConfig(SAEConfig):
    architecture: str = F("topk", "Architecture name from the registry (set by the config class; not chosen freely).")
    k: int = F(32, "Active latents per token (the L0).")
    aux_k: int = F(0, "Dead latents per token used by the AuxK loss; 0 = d_in // 2 (the paper's heuristic).")
    aux_coefficient: float = F(1 / 32, "Weight of the AuxK dead-latent loss (the paper uses 1/32).")
    tied: bool = F(False, "Tie the encoder to the decoder: W_enc is W_dec^T, one parameter (saved as both tensors).")

    def __post_init__(self) -> None:
        SAEConfig.__post_init__(self)
        if not 0 < self.k <= self.d_sae:
            raise ConfigError(f"sae.k={self.k}: expected 1 <= k <= d_sae ({self.d_sae})")
        if self.aux_k < 0:
            raise ConfigError(f"sae.aux_k={self.aux_k}: expected >= 0 (0 = d_in // 2)")
        if self.aux_coefficient < 0:
            raise ConfigError(f"sae.aux_coefficient={self.aux_coefficient}: expected >= 0")


@dataclass(frozen=True)
class FastPaths:
    """Which TopK training fast paths run (see the module docstring). Not in TopKConfig: each gives the
    reference's results up to rounding, so users have nothing to choose; tests and benchmarks set
    ``sae.fast`` to reach the references."""

    sparse_decode: bool = True  # False: decode a dense [B, F] code with a matmul
    sparse_encoder_grad: bool = True  # False: plain autograd through the dense [B, F] pre-activations
    blocked_topk: bool = True  # False: one torch.topk over all F


REFERENCE = FastPaths(sparse_decode=False, sparse_encoder_grad=False, blocked_topk=False)


def geometric_median(x_ND: Tensor, iters: int = 50, tol: float = 1e-6) -> Tensor:
    """The point minimising the summed Euclidean distance to the rows (Weiszfeld's iteration).

    Unlike the mean it is not dragged by the few rows with outlier norms.
    """
    m_D = x_ND.mean(0)
    for _ in range(iters):
        w_N = 1.0 / (x_ND - m_D).norm(dim=1).clamp_min(1e-8)
        new_D = (w_N[:, None] * x_ND).sum(0) / w_N.sum()
        if (new_D - m_D).norm() <= tol * m_D.norm().clamp_min(1e-8):
            return new_D
        m_D = new_D
    return m_D


class TopKSAE(SAE):
    cfg: TopKConfig
    transcoder_ok = True
    fast: FastPaths = FastPaths()  # every fast path on; set on an instance (e.g. to REFERENCE) for the plain paths

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        self.init_decoder_and_transpose(generator, 1.0)  # b_dec: init_from_data sets the geometric median
        self.b_enc.zero_()

    @torch.no_grad()
    def init_from_data(self, x_BD: Tensor) -> None:
        """b_dec (b_pre) = geometric median of a sample, as in the OpenAI TopK recipe (SPECS.md)."""
        self.b_dec.copy_(geometric_median(self.split_io(x_BD)[1].float()).to(self.b_dec.dtype))  # of the target

    @property
    def aux_k(self) -> int:
        return self.cfg.aux_k or max(1, self.d_in // 2)

    def encode(self, x_BD: Tensor) -> Tensor:
        pre_BF = self.pre_acts(x_BD)
        vals_BK, idx_BK = pre_BF.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre_BF).scatter_(-1, idx_BK, torch.relu(vals_BK))

    def decode_sparse(self, vals_BK: Tensor, idx_BK: Tensor, bias: bool = True) -> Tensor:
        """sum_j vals[b, j] * W_dec[idx[b, j]] (+ b_dec): the fast path, equal to ``decode(dense f)``.

        embedding_bag needs per-sample weights in the table's dtype, and bf16 autocast hands us
        bf16 values: cast to W_dec's dtype (the gather-sum is memory-bound; fp32 costs little).
        """
        out_BD = sparse_decode(vals_BK, idx_BK, self.W_dec)
        return out_BD + self.b_dec if bias else out_BD

    def select(self, pre_BF: Tensor, dead_mask_F: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Pre-activation values and indices of the top k latents, and of the top aux_k dead latents ([B, 0] if none)."""
        if self.fast.blocked_topk:
            vals_BK, idx_BK = topk_blocked(pre_BF, self.cfg.k)
        else:
            vals_BK, idx_BK = pre_BF.topk(self.cfg.k, dim=-1, sorted=False)
        n_dead = 0 if dead_mask_F is None else int(dead_mask_F.sum())
        if n_dead == 0:
            return vals_BK, idx_BK, vals_BK[:, :0], idx_BK[:, :0]
        if self.fast.sparse_decode:
            # among the dead columns only: a [B, n_dead] slice instead of dead_topk's masked [B, F] copy
            dead_idx_N = dead_mask_F.to(pre_BF.device).nonzero().squeeze(1)
            aux_vals_BA, j_BA = pre_BF[:, dead_idx_N].topk(min(self.aux_k, n_dead), dim=-1, sorted=False)
            return vals_BK, idx_BK, aux_vals_BA, dead_idx_N[j_BA]
        return (vals_BK, idx_BK, *dead_topk(pre_BF, dead_mask_F, self.aux_k))  # the plain reference

    def training_loss(self, x_BD: Tensor, ctx: LossContext) -> StepOutput:
        B = x_BD.shape[0]
        if B < 2:
            raise ConfigError(f"TopK's normalised MSE needs a batch of at least 2 rows (got {B}); raise the batch size")
        x_BD, y_BD = self.split_io(x_BD)  # a transcoder reads x and predicts y; an SAE's y is x
        if self.fast.sparse_encoder_grad:
            x_in_BD, bias_F = self.encoder_inputs(x_BD)
            pre_vals_BK, idx_BK, pre_aux_BA, aux_idx_BA = _TopKEncoder.apply(
                x_in_BD, self.W_enc, bias_F, lambda pre_BF: self.select(pre_BF, ctx.dead_mask_F)
            )
        else:
            pre_vals_BK, idx_BK, pre_aux_BA, aux_idx_BA = self.select(self.pre_acts(x_BD), ctx.dead_mask_F)
        vals_BK, aux_vals_BA = torch.relu(pre_vals_BK), torch.relu(pre_aux_BA)

        x_hat_BD = self.add_skip(self._decode(vals_BK, idx_BK, bias=True), x_BD)
        loss_fvu, err_B = fvu(y_BD, x_hat_BD, ctx.ranks)  # over the global batch under data parallelism
        if aux_idx_BA.shape[1] == 0:
            loss_auxk = loss_fvu.new_zeros(())
        else:  # losses.auxk_loss's value, with the dead latents' selection and decode on the fast paths
            loss_auxk = auxk(y_BD.float() - x_hat_BD, self._decode(aux_vals_BA, aux_idx_BA, bias=False), ctx.ranks)
        loss = loss_fvu + self.cfg.aux_coefficient * loss_auxk
        with torch.no_grad():
            parts = {
                "fvu": loss_fvu.detach(),
                "mse": err_B.mean(),
                "auxk": loss_auxk.detach(),
                "l0": torch.count_nonzero(vals_BK).float() / B,
            }
        return StepOutput(loss, x_hat_BD, None, parts, top_vals_BK=vals_BK, top_idx_BK=idx_BK, d_sae=self.d_sae)

    def _decode(self, vals_BK: Tensor, idx_BK: Tensor, bias: bool) -> Tensor:
        if self.fast.sparse_decode:
            return self.decode_sparse(vals_BK, idx_BK, bias=bias)
        z_BF = vals_BK.new_zeros(vals_BK.shape[0], self.d_sae).scatter(-1, idx_BK, vals_BK)
        return self.decode(z_BF) if bias else z_BF @ self.W_dec

    def remove_parallel_grads(self) -> None:
        remove_parallel_grad_(self.W_dec)  # unit-norm decoder rows

    def after_step(self) -> None:
        unit_norm_rows_(self.W_dec)


class _TopKEncoder(torch.autograd.Function):
    """pre_BF = x_in @ W_enc + bias, then ``select``; the backward touches only the selected entries.

    The dense reference backpropagates a [B, F] gradient that is zero outside the B * S selected
    entries (S = k, plus aux_k while latents are dead) and multiplies it by x^T. Here the entries
    form a sparse [F, B] matrix G (CSR, sorted by latent: sparse.latent_csr) and
    grad W_enc = (G @ x_in)^T, grad bias = row sums of G. The top-k and the AuxK entries go in two
    products: a dead latent can be in both of a row's selections, and a CSR matrix must not repeat
    an entry. Rows with more than ``sparse_max_fill * F`` entries go through the dense product
    instead (the sparse one costs more per entry). x_in gets no gradient: encoder_inputs routes
    b_dec's gradient through bias.

    The forward product writes into a reused buffer (sparse.scratch) outside autocast: nothing
    keeps pre_BF once ``select`` has returned.
    """

    sparse_max_fill = 1 / 40

    @staticmethod
    def forward(ctx, x_in_BD, W_enc_DF, bias_F, select):
        if torch.is_autocast_enabled(x_in_BD.device.type):
            pre_BF = torch.addmm(bias_F, x_in_BD, W_enc_DF)
        else:
            buf = scratch((x_in_BD.shape[0], W_enc_DF.shape[1]), W_enc_DF.dtype, W_enc_DF.device)
            pre_BF = torch.addmm(bias_F, x_in_BD, W_enc_DF, out=buf)
        vals_BK, idx_BK, aux_vals_BA, aux_idx_BA = select(pre_BF)
        del pre_BF
        ctx.save_for_backward(x_in_BD, idx_BK, aux_idx_BA)
        ctx.meta = (W_enc_DF.dtype, bias_F.dtype, W_enc_DF.shape[1], W_enc_DF.is_contiguous())
        ctx.mark_non_differentiable(idx_BK, aux_idx_BA)
        return vals_BK, idx_BK, aux_vals_BA, aux_idx_BA

    @staticmethod
    def backward(ctx, g_vals_BK, _g_idx, g_aux_BA, _g_aux_idx):
        x_in_BD, idx_BK, aux_idx_BA = ctx.saved_tensors
        w_dtype, b_dtype, F_, w_contiguous = ctx.meta
        B, x_in_BD = x_in_BD.shape[0], x_in_BD.float()
        g_vals_BK = torch.zeros(idx_BK.shape, device=idx_BK.device) if g_vals_BK is None else g_vals_BK.float()
        parts = [(idx_BK, g_vals_BK)]
        if aux_idx_BA.shape[1] > 0 and g_aux_BA is not None:
            parts.append((aux_idx_BA, g_aux_BA.float()))
        if sum(idx.shape[1] for idx, _ in parts) > _TopKEncoder.sparse_max_fill * F_:
            g_BF = x_in_BD.new_zeros(B, F_)
            for idx_BS, g_BS in parts:
                g_BF.scatter_add_(1, idx_BS, g_BS)
            grad_W_DF, grad_bias_F = x_in_BD.T @ g_BF, g_BF.sum(dim=0)
        else:
            grad_FD = scatter_rows(latent_csr(idx_BK, F_), parts[0][1], x_in_BD)
            if len(parts) > 1:  # AuxK's entries (not Python's sum(): 0 + tensor would copy the whole matrix)
                grad_FD += scatter_rows(latent_csr(aux_idx_BA, F_), parts[1][1], x_in_BD)
            # in W_enc's own layout, or autograd copies it there with a slow whole-matrix transpose; a tied
            # W_enc is W_dec^T, whose [F, D] gradient this already is
            grad_W_DF = transpose_tiled(grad_FD) if w_contiguous else grad_FD.T
            grad_bias_F = x_in_BD.new_zeros(F_)
            for idx_BS, g_BS in parts:
                grad_bias_F.index_add_(0, idx_BS.reshape(-1), g_BS.reshape(-1))
        return None, grad_W_DF.to(w_dtype), grad_bias_F.to(b_dtype), None
