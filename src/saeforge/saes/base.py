"""What every SAE architecture shares: its config, the loss inputs/outputs, and the abstract SAE.

Parameters use the SAELens layout so saving is a plain state dict:
W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D]  (D = d_in, F = d_sae).
An architecture is one final subclass in its own file that defines ``init_weights``,
``encode`` and ``training_loss``; see relu.py and topk.py.

Transcoders (cfg.d_out > 0) are the same classes with the decoder in another space: the encoder
reads hook A (width D = d_in), the decoder predicts hook B (width O = d_out): W_dec [F, O],
b_dec [O], and with cfg.skip a linear skip W_skip [O, D] (SAELens's SkipTranscoder layout):
    y_hat = W_dec^T f(x) + b_dec (+ W_skip x)
``training_loss`` then receives rows [x | y] (see activations/stream.py) and takes them apart with
``split_io``; ``forward`` and ``encode`` take x alone. Architectures that support it set
``transcoder_ok`` and use ``split_io`` / ``add_skip`` in their loss (two lines each).
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor, nn

from saeforge.config import DTYPES, ConfigError, F
from saeforge.saes.registry import transcoder_architectures


@dataclass
class SAEConfig:
    """Fields every architecture has (the SAELens v6 inference fields); subclasses add their own."""

    architecture: str = F("", "Architecture name from the registry (set by the config class; not chosen freely).")
    d_in: int = F(0, "Input width; 0 = take the hooked model's d_model.")
    d_sae: int = F(4608, "Number of latents (dictionary size).")
    dtype: str = F(
        "float32", "dtype of the SAE parameters: float32, bfloat16 or float16 (use train.autocast for bf16 speed)."
    )
    device: str = F("cpu", "Device of the SAE parameters: cpu, cuda, cuda:N.")
    apply_b_dec_to_input: bool = F(
        True,
        "Subtract b_dec from the input before encoding (SAELens default; always off for transcoders, whose b_dec lives in the output space).",
    )
    d_out: int = F(
        0,
        "Transcoder output width (the width at model.hook_out); 0 = an ordinary SAE, or take it from the model when model.hook_out is set.",
    )
    skip: bool = F(
        False,
        "Transcoder only: add a linear skip W_skip x (W_skip [d_out, d_in], zero-initialised, SAELens's skip_transcoder).",
    )

    def __post_init__(self) -> None:
        # The architecture string selects this class in the registry; a config class carrying
        # another architecture's name would be saved as one thing and loaded as another.
        own = type(self).__dataclass_fields__["architecture"].default
        if own and self.architecture != own:
            raise ConfigError(
                f"sae.architecture={self.architecture!r} does not match {type(self).__name__} ({own!r}); "
                f"build the config with saeforge.saes.registry.config_class({self.architecture!r}) instead"
            )
        if self.d_in < 0:
            raise ConfigError(f"sae.d_in={self.d_in}: expected a positive width, or 0 to take it from the model")
        if self.d_sae <= 0:
            raise ConfigError(f"sae.d_sae={self.d_sae}: expected a positive number of latents")
        if self.d_out < 0:
            raise ConfigError(f"sae.d_out={self.d_out}: expected a positive width, or 0")
        if self.d_out > 0 and self.apply_b_dec_to_input:
            raise ConfigError(
                "sae.apply_b_dec_to_input=True with sae.d_out > 0: a transcoder's b_dec lives in the "
                "output space and cannot be subtracted from its input; set apply_b_dec_to_input False"
            )
        if self.d_out > 0 and getattr(self, "tied", False):
            raise ConfigError(
                "sae.tied=True with a transcoder (sae.d_out > 0): the encoder reads another space than "
                "the decoder writes, so W_enc cannot be W_dec^T; leave tied False"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"sae.dtype={self.dtype!r}: expected one of {DTYPES}")
        try:
            torch.device(self.device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"sae.device={self.device!r}: expected cpu, cuda or cuda:N") from None


@dataclass
class LossContext:
    """Per-step inputs to ``training_loss`` that come from the trainer, not the batch.

    sparsity_scale multiplies the sparsity penalty (the trainer's warm-up schedule and p-annealing's
    lambda rescale); dead_mask_F marks latents that have not fired for a while (AuxK uses it; the trainer
    passes None when train.dead_latents turns AuxK off). p is the exponent of the penalty sum_i |f_i|^p
    (relu, gated; 1 = their plain L1). When p_probe is set, those SAEs also log parts["lp_probe"], the
    penalty at p = p_probe on this batch (detached), so the trainer can rescale lambda when p changes.
    ranks is set when the batch is one rank's rows of a data-parallel global batch (see ``Ranks``).
    """

    sparsity_scale: float = 1.0
    dead_mask_F: Tensor | None = None
    p: float = 1.0
    p_probe: float | None = None
    ranks: Ranks | None = None


class Ranks(Protocol):
    """The data-parallel ranks that split one global batch (training/distributed.py); None in one process.

    A loss that needs a statistic of the whole batch (FVU's total variance, BatchTopK's selection)
    asks for it through these two collectives. Every rank then returns N times its share of the
    global loss (N = ``world``), on the one-process scale, so the trainer's gradient average over
    ranks is the one-process gradient.
    """

    world: int

    def sum(self, t: Tensor) -> Tensor:
        """t summed elementwise over ranks (every rank gets the result)."""

    def gather(self, t: Tensor) -> Tensor:
        """Every rank's t (same shape on all ranks) concatenated along dim 0 in rank order."""


class StepOutput:
    """What ``training_loss`` returns.

    loss: the scalar to backpropagate. parts: detached scalar tensors for logging (call
    ``.item()`` only when logging: each one is a device sync). f_BF: the latents, detached,
    for statistics only. TopK passes its (values, indices) instead and the dense f_BF is built
    on first access, so a trainer that only needs ``fire_count_F()`` never pays for it.
    """

    def __init__(
        self,
        loss: Tensor,
        x_hat_BD: Tensor,
        f_BF: Tensor | None,
        parts: dict[str, Tensor],
        *,
        top_vals_BK: Tensor | None = None,
        top_idx_BK: Tensor | None = None,
        d_sae: int = 0,
    ) -> None:
        if f_BF is None and (top_vals_BK is None or top_idx_BK is None or d_sae <= 0):
            raise ValueError("StepOutput needs f_BF, or top_vals_BK + top_idx_BK + d_sae")
        self.loss = loss
        self.x_hat_BD = x_hat_BD
        self.parts = parts
        self._f_BF = None if f_BF is None else f_BF.detach()
        self._top = None if f_BF is not None else (top_vals_BK.detach(), top_idx_BK, d_sae)

    @property
    def f_BF(self) -> Tensor:
        if self._f_BF is None:
            vals_BK, idx_BK, d_sae = self._top
            f_BF = vals_BK.new_zeros(vals_BK.shape[0], d_sae)
            self._f_BF = f_BF.scatter_(1, idx_BK, vals_BK)
        return self._f_BF

    def fire_count_F(self) -> Tensor:
        """int64 [F]: in how many rows of the batch each latent was nonzero (dead-latent tracking)."""
        if self._f_BF is None:
            vals_BK, idx_BK, d_sae = self._top
            return torch.bincount(idx_BK[vals_BK > 0], minlength=d_sae)
        return torch.count_nonzero(self._f_BF, dim=0)


def random_directions(n: int, d: int, generator: torch.Generator, norm: float = 1.0) -> Tensor:
    """n random directions in R^d (rows, float32 on CPU) of the given norm: isotropic Gaussian, normalised."""
    w = torch.randn(n, d, generator=generator, dtype=torch.float32)
    return w * (norm / w.norm(dim=1, keepdim=True))


class SAE(nn.Module, abc.ABC):
    """Abstract SAE. Subclasses implement init_weights, encode and training_loss.

    The constructor builds the four SAELens parameters and calls ``init_weights`` with a
    generator seeded 0, so the same config always gives the same SAE; the trainer re-initialises
    with its own seed. ``cfg.d_in`` must be filled in (the trainer copies d_model into it).
    """

    cfg: SAEConfig
    transcoder_ok: ClassVar[bool] = False  # True where training_loss uses split_io and add_skip

    def __init__(self, cfg: SAEConfig) -> None:
        nn.Module.__init__(self)
        if cfg.d_in <= 0:
            raise ConfigError(
                f"{type(self).__name__} needs cfg.d_in > 0 (got {cfg.d_in}); set it to the hooked model's d_model "
                "(the trainer does this when d_in is 0)"
            )
        if cfg.d_out > 0 and not self.transcoder_ok:
            raise ConfigError(
                f"sae.architecture={cfg.architecture!r} cannot be a transcoder (sae.d_out / model.hook_out); "
                f"architectures that can: {transcoder_architectures()}"
            )
        if cfg.skip and cfg.d_out <= 0:
            raise ConfigError(
                "sae.skip=True needs a transcoder: set model.hook_out (or sae.d_out), or leave skip False"
            )
        self.cfg = cfg
        D, F_, O = cfg.d_in, cfg.d_sae, cfg.d_out or cfg.d_in
        kw = dict(dtype=getattr(torch, cfg.dtype), device=torch.device(cfg.device))
        # Tied (cfg.tied, relu/topk): no W_enc parameter; __getattr__ hands out W_dec.T, a view, so every
        # encoder use (and its gradient) goes through the one [F, D] matrix.
        self._tied = bool(getattr(cfg, "tied", False))
        if not self._tied:
            self.W_enc = nn.Parameter(torch.empty(D, F_, **kw))
        self.b_enc = nn.Parameter(torch.empty(F_, **kw))
        self.W_dec = nn.Parameter(torch.empty(F_, O, **kw))
        self.b_dec = nn.Parameter(torch.empty(O, **kw))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(O, D, **kw))
        self.init_weights(torch.Generator().manual_seed(0))

    def __getattr__(self, name: str):
        if name == "W_enc" and self.__dict__.get("_tied", False):
            return self._parameters["W_dec"].T
        return nn.Module.__getattr__(self, name)

    @property
    def tied(self) -> bool:
        return self._tied

    @torch.no_grad()
    def untie(self) -> None:
        """Give a tied SAE its own W_enc (a copy of W_dec.T); cfg.tied becomes False. A no-op when untied."""
        if not self._tied:
            return
        self._tied = False
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone())
        self.cfg = dataclasses.replace(self.cfg, tied=False)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        """Width of the reconstruction: d_in for an SAE, the output hook's width for a transcoder."""
        return self.W_dec.shape[1]

    @property
    def is_transcoder(self) -> bool:
        return self.cfg.d_out > 0

    def split_io(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        """(encoder input, target) of a training row: (x, x) for an SAE; a transcoder's row is [x | y]."""
        if not self.is_transcoder:
            return x_BD, x_BD
        D, O = self.d_in, self.d_out
        if x_BD.shape[-1] != D + O:
            raise ValueError(
                f"transcoder rows must be [input | output] of width {D} + {O} = {D + O}; got width "
                f"{x_BD.shape[-1]} (read them from a stream or cache of both hooks, input first)"
            )
        return x_BD[..., :D], x_BD[..., D:]

    def add_skip(self, y_hat_BO: Tensor, x_BD: Tensor) -> Tensor:
        """y_hat + W_skip x for a skip transcoder; y_hat itself (no extra op) otherwise."""
        if not self.cfg.skip:
            return y_hat_BO
        return y_hat_BO + x_BD.to(self.W_skip.dtype) @ self.W_skip.T

    @abc.abstractmethod
    def init_weights(self, generator: torch.Generator) -> None:
        """(Re)initialise all parameters in place from ``generator`` (a CPU generator)."""

    @torch.no_grad()
    def init_decoder_and_transpose(self, generator: torch.Generator, decoder_norm: float) -> None:
        """The init every architecture here shares: decoder rows are random directions of norm
        ``decoder_norm``, W_enc = W_dec^T, b_dec = 0. Architectures then set their own biases."""
        W_dec_FD = random_directions(self.d_sae, self.d_out, generator, norm=decoder_norm)
        self.W_dec.copy_(W_dec_FD)
        if self.is_transcoder:  # input and output are different spaces: an encoder of its own, W_skip = 0
            self.W_enc.copy_(random_directions(self.d_sae, self.d_in, generator, norm=decoder_norm).T)
            if self.cfg.skip:
                self.W_skip.zero_()
        else:
            self.W_enc.copy_(W_dec_FD.T)
        self.b_dec.zero_()

    @abc.abstractmethod
    def encode(self, x_BD: Tensor) -> Tensor:
        """Dense latents f_BF for inference."""

    @abc.abstractmethod
    def training_loss(self, x_BD: Tensor, ctx: LossContext) -> StepOutput:
        """The architecture's loss on one batch, with x_hat, latents and logged parts."""

    def decode(self, f_BF: Tensor) -> Tensor:
        """The reconstruction x_hat_BD = f_BF @ W_dec + b_dec (a transcoder's output-space prediction, without skip)."""
        # matmul then add: under bf16 autocast the big product is bf16 and b_dec (fp32) promotes
        # the small [B, D] result back to fp32, so the residual x - x_hat is taken in fp32.
        return f_BF @ self.W_dec + self.b_dec

    def forward(self, x_BD: Tensor) -> Tensor:
        """The reconstruction of x; a transcoder's prediction of its output hook from x (its input hook)."""
        return self.add_skip(self.decode(self.encode(x_BD)), x_BD)

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """Encoder pre-activations W_enc^T (x - b_dec) + b_enc, shape [B, F]."""
        x_in_BD, bias_F = self.encoder_inputs(x_BD)
        return torch.addmm(bias_F, x_in_BD, self.W_enc)

    def encoder_inputs(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        """(x_in_BD, bias_F) with pre_acts = x_in_BD @ W_enc + bias_F, arranged so backward stays cheap.

        The plain form (x - b_dec) @ W_enc makes autograd compute d/d(x - b_dec), a [B, F] x [F, D]
        matmul as large as the forward one, only to sum it into b_dec's [D] gradient. Here x_in is
        detached from b_dec and b_dec's gradient enters through the exactly-zero [F] term
        (b_dec.detach() - b_dec) @ W_enc.detach(), whose gradient is -W_enc @ colsum(grad):
        same values, same gradients, one big matmul fewer.
        """
        x_BD = x_BD.to(self.W_enc.dtype)
        if not self.cfg.apply_b_dec_to_input:
            return x_BD, self.b_enc
        b_dec = self.b_dec.detach()
        return x_BD - b_dec, self.b_enc + (b_dec - self.b_dec) @ self.W_enc.detach()

    def pre_acts_of(self, x_BD: Tensor, idx_N: Tensor) -> Tensor:
        """Pre-activations [B, N] of latents idx_N only, with b_dec detached (ghost grads: only those latents learn)."""
        x_BD = x_BD.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x_BD = x_BD - self.b_dec.detach()
        return x_BD @ self.W_enc[:, idx_N] + self.b_enc[idx_N]

    def pre_acts_reference(self, x_BD: Tensor) -> Tensor:
        """The plain formula for ``pre_acts`` (tests compare the two)."""
        x_BD = x_BD.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x_BD = x_BD - self.b_dec
        return x_BD @ self.W_enc + self.b_enc

    def remove_parallel_grads(self) -> None:
        """Called by the trainer after backward, before the optimiser step. Default: nothing."""

    def after_step(self) -> None:
        """Called by the trainer after the optimiser step (parameter constraints). Default: nothing."""

    @torch.no_grad()
    def fold_input_scale(self, c: float, c_out: float | None = None) -> None:
        """Make an SAE trained on c * x act on raw x with identical latents; x_hat becomes x_hat(c x) / c.

        W_enc^T (x - b_dec/c) * c = W_enc^T (c x - b_dec), so scaling W_enc by c and b_dec by 1/c keeps
        every pre-activation; dividing W_dec by c scales the reconstruction back. Call it once, after
        training: TopK's unit-norm decoder constraint no longer holds afterwards (rows have norm 1/c).
        A tied SAE cannot hold c * W and W / c in one matrix: for c != 1 it is untied first (cfg.tied False).

        A transcoder trained to map c * x to c_out * y (its own scale per side): W_enc * c keeps the
        latents, W_dec / c_out and b_dec / c_out give y_hat(c x) / c_out, and W_skip (c x) / c_out =
        (W_skip * c / c_out) x. Exact up to rounding; c_out defaults to c (one scale for the row).
        """
        c_out = c if c_out is None else c_out
        if not (c > 0 and c_out > 0):
            raise ValueError(f"fold_input_scale(c={c}, c_out={c_out}): the scales must be positive numbers")
        if c_out != c and self.cfg.apply_b_dec_to_input:
            raise ValueError(
                "fold_input_scale: separate input and output scales need apply_b_dec_to_input False "
                "(b_dec would have to be c * b and c_out * b at once)"
            )
        if self._tied and c == 1.0:
            return
        self.untie()
        self.W_enc.mul_(c)
        self.W_dec.div_(c_out)
        self.b_dec.div_(c_out)
        if self.cfg.skip:
            self.W_skip.mul_(c / c_out)


@torch.no_grad()
def remove_parallel_grad_(W_FD: Tensor) -> None:
    """Drop the part of each row's gradient that points along the row.

    Under a unit-norm row constraint that part would only change the norm, which ``unit_norm_rows_``
    undoes after the step; removing it first keeps Adam's moments for what can actually change.
    """
    g_FD = W_FD.grad
    if g_FD is not None:
        # (g . u) u with u = w / |w|, written as (g . w / |w|^2) w: no [F, D] temporaries but the row dots
        sq_norm_F = torch.linalg.vector_norm(W_FD, dim=1).square_().clamp_min_(1e-24)
        g_FD.addcmul_((torch.linalg.vecdot(g_FD, W_FD, dim=1) / sq_norm_F)[:, None], W_FD, value=-1)


@torch.no_grad()
def unit_norm_rows_(W_FD: Tensor) -> None:
    """Re-project every row to unit norm, in place (after the optimiser step)."""
    W_FD.div_(W_FD.norm(dim=1, keepdim=True).clamp_min(1e-12))
