"""The local replacement model of one prompt: transcoders for the MLPs, error nodes, frozen attention and norms.

For a prompt, every MLP output y_{l,t} is replaced by its transcoder's prediction y_hat_{l,t} plus an error
node e_{l,t} = y_{l,t} - y_hat_{l,t}, a constant for this prompt. Attention patterns and normalisation
denominators are frozen at their values on the prompt. What is left is linear in the token embeddings,
the active features' activations (gates frozen: a feature is a fixed decoder row times its activation)
and the error nodes, plus constant biases (transcoder b_dec, the transcoder encoders' b_enc).

How the freezing is done, with forward hooks on the Hugging Face modules and nothing patched in the
library's code:

- attention: the outputs of ``q_proj`` and ``k_proj`` are replaced by their values on the prompt, so the
  pattern softmax(q k^T) is a constant whatever the attention implementation (eager, sdpa); values and
  the output projection stay live, and that path is linear;
- RMSNorm: its output is replaced by ``weight * x * s`` with s = 1/rms(x) recorded on the prompt
  (the same float32 arithmetic as LlamaRMSNorm, so the clean pass is unchanged);
- MLP: its output is replaced by ``sum_i a_i W_dec[i] + b_dec (+ W_skip x) + e`` with the activations a_i
  given as an input, not recomputed from x.

Supported: model_type llama, mistral, qwen2, qwen3 (each tested on a tiny random model). Refused: families with
another norm (Gemma's (1 + w), OLMo's LayerNorm), a fused qkv projection (Phi-3), a nonlinear logit softcap
(Gemma 2), LayerNorm and biases (GPT-2, GPT-NeoX). The model must be float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saeforge.circuits.clt import CrossLayerTranscoder
from saeforge.circuits.transcoders import TranscoderSet, TranscoderSetError
from saeforge.config import UserError
from saeforge.models import hf_model
from saeforge.saes.base import SAE

# Llama-layout families whose norms are RMSNorm(x) * weight and whose attention has q_proj / k_proj (Qwen3 adds
# q_norm / k_norm after them: a norm of a frozen tensor is frozen too). Each has a test on a tiny random model.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class ReplacementError(UserError, ValueError):
    """A model (or dtype) the replacement model cannot freeze exactly."""


@dataclass
class PromptState:
    """Everything the clean forward of one prompt fixes. N = active features, L layers, T positions."""

    input_ids_T: Tensor
    embeds_TD: Tensor
    logits_TV: Tensor  # the real model's logits
    mlp_in_LTD: Tensor
    mlp_out_LTD: Tensor
    errors_LTD: Tensor  # y - y_hat per layer and position
    layer_N: Tensor  # active features, sorted by (layer, position, index)
    pos_N: Tensor
    idx_N: Tensor
    act_N: Tensor
    frozen_qk: dict[nn.Module, Tensor]  # q_proj / k_proj -> its output [1, T, *]
    norm_scale: dict[nn.Module, Tensor]  # RMSNorm -> 1/rms of its input [1, T, 1]

    @property
    def n_pos(self) -> int:
        return int(self.input_ids_T.shape[0])


class ReplacementModel:
    """A Llama-family LM with one transcoder per layer; ``prepare`` freezes a prompt, ``forward_linear`` runs it."""

    def __init__(self, lm, transcoders: TranscoderSet | dict[int, SAE]) -> None:
        model = hf_model(lm)
        model_type = getattr(model.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ReplacementError(
                f"model_type {model_type!r}: the replacement model freezes attention and norms of "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} models only (RMSNorm, q/k projections); use a Llama-family LM"
            )
        self.model = model
        self.layers = model.model.layers
        self.n_layers = len(self.layers)
        d_model = model.config.hidden_size
        if isinstance(transcoders, CrossLayerTranscoder):
            self.mlps: PerLayer | CrossLayer = CrossLayer(transcoders, self.n_layers, d_model)
        else:
            self.mlps = PerLayer(transcoders, self.n_layers, d_model)
        param = next(model.parameters())
        if param.dtype != torch.float32:
            raise ReplacementError(f"the model is {param.dtype}; load it in float32 for attribution graphs")
        self.device = param.device
        self.mlps.to(self.device)  # in place: the transcoders now live where the model does
        self.norms = [m for layer in self.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
        self.norms.append(model.model.norm)
        self.qk = [m for layer in self.layers for m in (layer.self_attn.q_proj, layer.self_attn.k_proj)]

    # ---- the clean pass ------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, input_ids_T: Tensor) -> PromptState:
        """Run the real model on one prompt; record what the linear model freezes; find active features."""
        input_ids_T = input_ids_T.reshape(-1).to(self.device)
        frozen_qk, norm_scale, mlp_in, mlp_out = {}, {}, {}, {}

        def record_qk(module, args, out):
            frozen_qk[module] = out.detach().clone()

        def record_norm(module, args, out):
            x = args[0].float()
            norm_scale[module] = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)

        def record_mlp(layer):
            def hook(module, args, out):
                mlp_in[layer], mlp_out[layer] = args[0][0].detach().clone(), out[0].detach().clone()

            return hook

        hooks = [(m, record_qk) for m in self.qk] + [(m, record_norm) for m in self.norms]
        hooks += [(layer.mlp, record_mlp(i)) for i, layer in enumerate(self.layers)]
        with _forward_hooks(hooks):
            embeds_1TD = self.model.get_input_embeddings()(input_ids_T[None])
            logits_1TV = self.model(inputs_embeds=embeds_1TD, use_cache=False).logits
        mlp_in_LTD = torch.stack([mlp_in[i] for i in range(self.n_layers)])
        mlp_out_LTD = torch.stack([mlp_out[i] for i in range(self.n_layers)])
        feats, f_LTF = [], []
        for layer in range(self.n_layers):
            f_TF = self.mlps.encode(layer, mlp_in_LTD[layer])
            f_LTF.append(f_TF)
            pos, idx = f_TF.nonzero(as_tuple=True)  # row-major: sorted by position, then index
            feats.append((torch.full_like(pos, layer), pos, idx, f_TF[pos, idx]))
        errors = []
        for dst in range(self.n_layers):
            y_hat_TD = self.mlps.b_dec(dst).expand_as(mlp_out_LTD[dst])
            for src in range(dst + 1):
                W_FD = self.mlps.decoder(src, dst)
                if W_FD is not None:
                    y_hat_TD = y_hat_TD + f_LTF[src] @ W_FD
            errors.append(mlp_out_LTD[dst] - self.mlps.skip(dst, y_hat_TD, mlp_in_LTD[dst]))
        layer_N, pos_N, idx_N, act_N = (torch.cat(parts) for parts in zip(*feats, strict=True))
        return PromptState(
            input_ids_T, embeds_1TD[0], logits_1TV[0], mlp_in_LTD, mlp_out_LTD, torch.stack(errors),
            layer_N, pos_N, idx_N, act_N, frozen_qk, norm_scale,
        )  # fmt: skip

    # ---- the frozen linear model ---------------------------------------------------------
    def forward_linear(
        self,
        state: PromptState,
        embeds_BTD: Tensor,
        acts_BN: Tensor,
        errors_BLTD: Tensor,
        last_logits_only: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """(logits_BTV, [mlp_in_BTD per layer]) of the frozen model, differentiable in its three inputs.

        Row b of the batch is one copy of the prompt with its own node values, so one backward through a
        sum of per-row targets gives each target's gradient in its own row. ``last_logits_only``: logits [B, 1, V] of the last
        position alone (the LM head is D x V: at every position it would dominate a small model's cost).
        """
        B = embeds_BTD.shape[0]
        mlp_in: list[Tensor | None] = [None] * self.n_layers
        # one unbind, not a select per layer: each select's backward zero-fills a whole [B, L, T, D] gradient
        errors_L_BTD = errors_BLTD.unbind(1)

        def frozen_qk(module, args, out):
            return state.frozen_qk[module].expand(B, *out.shape[1:])

        def frozen_norm(module, args, out):
            x = args[0]
            return module.weight * (x.float() * state.norm_scale[module]).to(x.dtype)

        def replace_mlp(layer: int):
            # every earlier-or-same layer writing here: (one-hot positions [T, n], decoder rows [n, D], the
            # features' span of the layer-major node list). A matmul through the one-hot, not an index_add of
            # a [B, n, D] product: its backward is then a [B*T, D] x [D, n] matmul, not a gather of B*n*D
            writers = []
            for src in range(layer + 1):
                W_FD = self.mlps.decoder(src, layer)
                sel = (state.layer_N == src).nonzero().flatten()
                if W_FD is not None and sel.numel():
                    lo, hi = int(sel[0]), int(sel[-1]) + 1  # contiguous: prepare() sorts features by layer
                    onehot_Tn = torch.zeros(state.n_pos, hi - lo, device=self.device)
                    onehot_Tn[state.pos_N[lo:hi], torch.arange(hi - lo, device=self.device)] = 1.0
                    writers.append((onehot_Tn, W_FD[state.idx_N[lo:hi]], lo, hi))

            def hook(module, args, out):
                x_BTD = args[0]
                mlp_in[layer] = x_BTD
                y_BTD = errors_L_BTD[layer] + self.mlps.b_dec(layer)
                for onehot_Tn, W_nD, lo, hi in writers:
                    y_BTD = y_BTD + (acts_BN[:, None, lo:hi] * onehot_Tn) @ W_nD
                return self.mlps.skip(layer, y_BTD, x_BTD)

            return hook

        hooks = [(m, frozen_qk) for m in self.qk] + [(m, frozen_norm) for m in self.norms]
        hooks += [(layer.mlp, replace_mlp(i)) for i, layer in enumerate(self.layers)]
        keep = 1 if last_logits_only else 0  # transformers' logits_to_keep: 0 = all positions
        with _forward_hooks(hooks):
            logits_BTV = self.model(inputs_embeds=embeds_BTD, use_cache=False, logits_to_keep=keep).logits
        return logits_BTV, mlp_in

    def clean_inputs(self, state: PromptState, batch: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """The prompt's own node values (embeddings, activations, errors), ``batch`` fresh leaf copies."""

        def leaf(t: Tensor) -> Tensor:
            return t.expand(batch, *t.shape).clone().requires_grad_(True)

        return leaf(state.embeds_TD), leaf(state.act_N), leaf(state.errors_LTD)

    def pre_acts(self, layer: int, x_TD: Tensor) -> Tensor:
        """Encoder pre-activations [T, F] of layer ``layer``'s transcoder (tests compare graphs with them)."""
        W_DF, b_F = self.mlps.encoder(layer)
        return x_TD @ W_DF + b_F

    def feature_pre_acts(self, state: PromptState, mlp_in: list[Tensor], rows: list[tuple[int, int]]) -> Tensor:
        """Encoder pre-activations: ``rows`` = [(batch row, feature node n)] -> tensor [len(rows)].

        One gather per layer (the rows' MLP inputs, the features' encoder columns) rather than a dot
        product per row, which was several tiny ops per target: tens of thousands for a 7,680-feature graph.
        """
        if not rows:
            return torch.zeros(0, device=self.device)
        b_R = torch.tensor([b for b, _ in rows], device=self.device)
        n_R = torch.tensor([n for _, n in rows], device=self.device)
        layer_R = state.layer_N[n_R]
        parts, order = [], []
        for layer in layer_R.unique().tolist():
            sel = (layer_R == layer).nonzero().flatten()
            W_DF, b_F = self.mlps.encoder(layer)
            idx = state.idx_N[n_R[sel]]
            x_RD = mlp_in[layer][b_R[sel], state.pos_N[n_R[sel]]]
            parts.append((x_RD * W_DF[:, idx].T).sum(-1) + b_F[idx])
            order.append(sel)
        out = torch.cat(parts)
        return out[torch.cat(order).argsort()]  # back to the order of ``rows``


class PerLayer:
    """One transcoder per layer (SAE classes): layer l's features write layer l only (plus its skip)."""

    def __init__(self, transcoders: TranscoderSet | dict[int, SAE], n_layers: int, d_model: int) -> None:
        saes = transcoders.saes if isinstance(transcoders, TranscoderSet) else dict(transcoders)
        missing = sorted(set(range(n_layers)) - set(saes))
        if missing:
            raise TranscoderSetError(
                f"the transcoder set has layers {sorted(saes)}, the model {n_layers} (0..{n_layers - 1}): "
                f"layers {missing} have none; the replacement model needs one per layer "
                "(train them with `saeforge transcoders --layers all`)"
            )
        extra = sorted(set(saes) - set(range(n_layers)))
        if extra:
            raise TranscoderSetError(f"transcoders for layers {extra}, but the model has {n_layers} layers")
        for layer, sae in saes.items():
            if not sae.is_transcoder or (sae.d_in, sae.d_out) != (d_model, d_model):
                raise TranscoderSetError(
                    f"layer {layer}: a transcoder {d_model} -> {d_model} is needed (MLP input -> MLP output of "
                    f"this model), got d_in={sae.d_in}, d_out={sae.d_out}: was it trained on another model?"
                )
        self.saes = [saes[layer] for layer in range(n_layers)]

    def to(self, device: torch.device) -> None:
        for sae in self.saes:
            sae.to(device)

    def encode(self, layer: int, x_TD: Tensor) -> Tensor:
        return self.saes[layer].encode(x_TD)

    def encoder(self, layer: int) -> tuple[Tensor, Tensor]:
        return self.saes[layer].W_enc, self.saes[layer].b_enc

    def decoder(self, src: int, dst: int) -> Tensor | None:
        return self.saes[dst].W_dec if src == dst else None

    def b_dec(self, dst: int) -> Tensor:
        return self.saes[dst].b_dec

    def skip(self, dst: int, y_BTD: Tensor, x_BTD: Tensor) -> Tensor:
        return self.saes[dst].add_skip(y_BTD, x_BTD)


class CrossLayer:
    """A cross-layer transcoder: layer l's features write every layer m >= l through W_dec^{l->m}."""

    def __init__(self, clt: CrossLayerTranscoder, n_layers: int, d_model: int) -> None:
        if (clt.n_layers, clt.cfg.d_model) != (n_layers, d_model):
            raise TranscoderSetError(
                f"the CLT has {clt.n_layers} layers of width {clt.cfg.d_model}, the model {n_layers} of "
                f"{d_model}: was it trained on another model?"
            )
        self.clt = clt

    def to(self, device: torch.device) -> None:
        self.clt.to(device)

    def encode(self, layer: int, x_TD: Tensor) -> Tensor:
        return self.clt.encode_layer(layer, x_TD)

    def encoder(self, layer: int) -> tuple[Tensor, Tensor]:
        return self.clt.W_enc[layer], self.clt.b_enc[layer]

    def decoder(self, src: int, dst: int) -> Tensor | None:
        return self.clt.decoder(src, dst)

    def b_dec(self, dst: int) -> Tensor:
        return self.clt.b_dec[dst]

    def skip(self, dst: int, y_BTD: Tensor, x_BTD: Tensor) -> Tensor:
        return y_BTD


@contextmanager
def _forward_hooks(pairs: list[tuple[nn.Module, object]]) -> Iterator[None]:
    handles = [module.register_forward_hook(fn) for module, fn in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
