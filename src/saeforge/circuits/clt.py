"""Cross-layer transcoder (CLT): an encoder per layer, decoders from each layer to it and every later layer.

    f_l = ReLU(TopK_k(W_enc^l x_l + b_enc^l))            x_l = layer l's MLP input (blocks.l.hook_mlp_in)
    y_hat_m = sum_{l <= m} W_dec^{l->m} f_l + b_dec^m   predicts layer m's MLP output (blocks.m.hook_mlp_out)
    loss = sum_m ||y_m - y_hat_m||^2 / ||y_m - mean(y_m)||^2   (each layer's FVU over the batch)

Sparsity is TopK per layer (SPECS allows TopK or JumpReLU); there is no AuxK, so dead latents are not revived.
The decoder has L(L+1)/2 blocks of F x D: for SmolLM2-135M (L=30, D=576) and F=8192 per layer that is
465 x 4.7M = 2.2G parameters, 8.8 GB in float32 before Adam's two moments, against 30 x 4.7M for the
per-layer transcoders' decoders: the cost that makes CLTs expensive to train.

Trained here by ``train_clt`` from one LM pass over every layer's MLP input and output (the activation
stream's multi-hook rows); inputs and outputs are scaled per layer to E||.|| = sqrt(D) while training and
the scales are folded into the saved weights, so the folder acts on raw activations. The folder holds
``cfg.json`` (architecture "clt", format_version, sizes, model and hooks) and ``clt.safetensors``; it is
written whole into a temporary folder and renamed, so an interrupted run leaves nothing to resume: run it again.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saeforge.activations.stream import ActivationStream
from saeforge.circuits.transcoders import HOOK_IN, HOOK_OUT, TranscoderSetError
from saeforge.config import ActivationsConfig, ConfigError, DataConfig, F
from saeforge.models import resolve_hook

FORMAT_VERSION = 1
WEIGHTS = "clt.safetensors"


@dataclass
class CLTConfig:
    n_layers: int = F(0, "Layers of the model (one encoder each).")
    d_model: int = F(0, "Width of the MLP inputs and outputs.")
    d_sae: int = F(256, "Latents per layer.")
    k: int = F(16, "Active latents per layer and token (TopK).")
    lr: float = F(1e-3, "Adam learning rate.")
    seed: int = F(0, "Seed of the initialisation.")
    # not a training option (`saeforge clt` trains TopK only): relu / jumprelu come from circuit-tracer's files
    activation: str = F("topk", "topk, or relu / jumprelu for CLTs read from circuit-tracer's layout.")

    def __post_init__(self) -> None:
        if not 0 < self.k <= self.d_sae:
            raise ConfigError(f"clt k={self.k}: expected 1..d_sae ({self.d_sae})")
        if self.activation not in ("topk", "relu", "jumprelu"):
            raise ConfigError(f"clt activation={self.activation!r}: expected topk, relu or jumprelu")


class CrossLayerTranscoder(nn.Module):
    """Parameters: W_enc [L, D, F], b_enc [L, F], W_dec[l] [F, L - l, D] (block m - l writes layer m), b_dec [L, D],
    and threshold [L, F] for a JumpReLU CLT (read from circuit-tracer's files; training here is TopK)."""

    def __init__(self, cfg: CLTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        L, D, F_ = cfg.n_layers, cfg.d_model, cfg.d_sae
        g = torch.Generator().manual_seed(cfg.seed)
        self.W_enc = nn.Parameter(torch.randn(L, D, F_, generator=g) / D**0.5)
        self.b_enc = nn.Parameter(torch.zeros(L, F_))
        # decoder blocks start small: L - l of them add up in each later layer's prediction
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.randn(F_, L - layer, D, generator=g) * (0.1 / (F_ * L) ** 0.5)) for layer in range(L)]
        )
        self.b_dec = nn.Parameter(torch.zeros(L, D))
        if cfg.activation == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(L, F_))

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    def encode_layer(self, layer: int, x_BD: Tensor) -> Tensor:
        """Layer ``layer``'s latents f_BF: TopK of the pre-activations, then ReLU (or ReLU / JumpReLU alone)."""
        pre_BF = x_BD @ self.W_enc[layer] + self.b_enc[layer]
        if self.cfg.activation == "relu":
            return torch.relu(pre_BF)
        if self.cfg.activation == "jumprelu":  # circuit-tracer's: z * 1[z > theta]
            return pre_BF * (pre_BF > self.threshold[layer])
        vals_BK, idx_BK = pre_BF.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre_BF).scatter(-1, idx_BK, torch.relu(vals_BK))

    def decoder(self, src: int, dst: int) -> Tensor:
        """W_dec^{src->dst} [F, D] (src <= dst)."""
        return self.W_dec[src][:, dst - src]

    def forward(self, x_BLD: Tensor) -> Tensor:
        """y_hat_BLD from every layer's MLP input."""
        y_BLD = self.b_dec.expand(x_BLD.shape[0], -1, -1)
        for layer in range(self.n_layers):
            f_BF = self.encode_layer(layer, x_BLD[:, layer])
            out_BmD = torch.einsum("bf,fmd->bmd", f_BF, self.W_dec[layer])
            y_BLD = torch.cat([y_BLD[:, :layer], y_BLD[:, layer:] + out_BmD], dim=1)
        return y_BLD

    def loss(self, x_BLD: Tensor, y_BLD: Tensor) -> Tensor:
        """Sum over layers of the fraction of variance unexplained."""
        err_L = (y_BLD - self(x_BLD)).pow(2).sum((0, 2))
        var_L = (y_BLD - y_BLD.mean(0)).pow(2).sum((0, 2)).clamp(min=1e-12)
        return (err_L / var_L).sum()


def save_clt(clt: CrossLayerTranscoder, folder: str | Path, model_name: str, data: dict | None = None) -> Path:
    """Write the folder whole (tmp folder + rename); refuse to replace an existing one.

    ``data``: the training run's data section (a DataConfig as a dict), so `saeforge transcoder-eval` finds the
    same held-out split."""
    folder = Path(folder)
    if folder.exists():
        raise ConfigError(f"{folder} exists: a CLT folder is never overwritten; pick another")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {"W_enc": clt.W_enc, "b_enc": clt.b_enc, "b_dec": clt.b_dec}
    tensors.update({f"W_dec.{layer}": w for layer, w in enumerate(clt.W_dec)})
    if clt.cfg.activation == "jumprelu":
        tensors["threshold"] = clt.threshold
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS))
    cfg = {"architecture": "clt", "format_version": FORMAT_VERSION, **asdict(clt.cfg), "model_name": model_name,
           "hook_in": HOOK_IN, "hook_out": HOOK_OUT, **({} if data is None else {"data": data})}  # fmt: skip
    (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tmp.rename(folder)
    return folder


def load_clt(folder: str | Path, device: str = "cpu") -> tuple[CrossLayerTranscoder, str]:
    """(the CLT, the model it was trained on)."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "cfg.json").read_text())
    except FileNotFoundError:
        raise TranscoderSetError(f"{folder} has no cfg.json: give a folder written by train_clt") from None
    if cfg.get("architecture") != "clt" or cfg.get("format_version") != FORMAT_VERSION:
        raise TranscoderSetError(f"{folder} is not a CLT folder (format_version {FORMAT_VERSION})")
    fields = {k: cfg[k] for k in ("n_layers", "d_model", "d_sae", "k", "lr", "seed")}
    fields["activation"] = cfg.get("activation", "topk")  # folders written before the field existed
    clt = CrossLayerTranscoder(CLTConfig(**fields))
    tensors = load_file(str(folder / WEIGHTS))
    with torch.no_grad():
        clt.W_enc.copy_(tensors["W_enc"])
        clt.b_enc.copy_(tensors["b_enc"])
        clt.b_dec.copy_(tensors["b_dec"])
        for layer, w in enumerate(clt.W_dec):
            w.copy_(tensors[f"W_dec.{layer}"])
        if fields["activation"] == "jumprelu":
            clt.threshold.copy_(tensors["threshold"])
    clt.requires_grad_(False)
    return clt.to(device), cfg["model_name"]


def train_clt(
    lm, cfg: CLTConfig, data_cfg: DataConfig, act_cfg: ActivationsConfig, n_tokens: int
) -> CrossLayerTranscoder:
    """Train a CLT on ``n_tokens`` rows of every layer's [MLP input | MLP output], from one LM pass each batch."""
    L, D = lm.n_layers, lm.d_model
    if (cfg.n_layers, cfg.d_model) != (L, D):
        raise ConfigError(f"CLT n_layers/d_model {cfg.n_layers}/{cfg.d_model}; the model has {L}/{D}")
    if cfg.activation != "topk":
        raise ConfigError(f"clt activation={cfg.activation!r}: train_clt trains TopK CLTs only")
    points = [resolve_hook(lm.model, HOOK_IN.format(layer=m)) for m in range(L)]
    points += [resolve_hook(lm.model, HOOK_OUT.format(layer=m)) for m in range(L)]
    clt = CrossLayerTranscoder(cfg).to(lm.device)
    opt = torch.optim.Adam(clt.parameters(), lr=cfg.lr)
    c_in = c_out = None
    seen = 0
    for row_BR in ActivationStream(lm, points, data_cfg, act_cfg, part="train", seed=cfg.seed):
        row_BR = row_BR.float().to(lm.device)
        x_BLD, y_BLD = row_BR[:, : L * D].view(-1, L, D), row_BR[:, L * D :].view(-1, L, D)
        if c_in is None:  # per-layer scales from the first batch: E||c x_l|| = sqrt(D)
            c_in = D**0.5 / x_BLD.norm(dim=-1).mean(0).clamp(min=1e-12)
            c_out = D**0.5 / y_BLD.norm(dim=-1).mean(0).clamp(min=1e-12)
        loss = clt.loss(x_BLD * c_in[:, None], y_BLD * c_out[:, None])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += row_BR.shape[0]
        if seen >= n_tokens:
            break
    with torch.no_grad():  # fold the scales: raw x in, raw y out
        clt.W_enc.mul_(c_in[:, None, None])
        for layer, w in enumerate(clt.W_dec):
            w.div_(c_out[layer:, None])
        clt.b_dec.div_(c_out[:, None])
    clt.requires_grad_(False)
    return clt
