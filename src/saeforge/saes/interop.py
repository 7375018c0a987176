"""Read SAEs saved by other libraries into saeforge SAEs with identical outputs.

``load_foreign(folder)`` detects the layout; or call one reader directly:

- SAELens v6 folders: ``formats.load_sae`` (our own format is SAELens v6).
- SAELens before v6 (flat cfg.json: no metadata dict; hook_name/model_name at the top level; TopK as
  architecture "standard" with activation_fn_str "topk" and activation_fn_kwargs.k): ``load_saelens_legacy``.
- sparsify (EleutherAI): one folder per hookpoint, cfg.json (activation, num_latents, k, d_in,
  transcode, skip_connection, ...) + sae.safetensors (encoder.weight [F, D], encoder.bias [F],
  W_dec [F, D], b_dec [D]). Its encoder is ReLU then top-k of encoder(x - b_dec): b_dec is always
  subtracted, except in a transcoder (``transcode``: the encoder reads the hookpoint's input and
  the decoder predicts its output; b_dec is not subtracted; ``skip_connection`` adds W_skip x with
  W_skip [D, D], SAELens's layout). TopK SAEs and TopK (skip) transcoders are read; not groupmax,
  nor a skip connection on a plain SAE.
- dictionary_learning (saprmarks): ae.pt (a state dict, loaded with weights_only=True) + config.json
  ({"trainer": {"dict_class", "activation_dim", "dict_size", "k", ...}}). Classes read: AutoEncoder
  (relu), AutoEncoderTopK (topk), BatchTopKSAE (saved as our JumpReLU with its one threshold),
  JumpReluAutoEncoder (its encoder reads x itself unless the config says apply_b_dec_to_input),
  GatedAutoEncoder (gated).
Weights are copied, so every reader returns an SAE whose encode/forward equal the library's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from saeforge.saes import formats, registry
from saeforge.saes.base import SAE
from saeforge.saes.formats import MissingSAEError, SAEFolderError
from saeforge.saes.hub import local_sae_dir


def load_foreign(folder: str | Path, device: str = "cpu") -> SAE:
    """Detect the library by its files and load the SAE; ``folder`` may be an hf:// spec (saes/hub.py)."""
    folder = local_sae_dir(folder)
    if (folder / "ae.pt").is_file():
        return load_dictionary_learning(folder, device)
    if (folder / "sae.safetensors").is_file():
        return load_sparsify(folder, device)
    if (folder / formats.CFG_FILE).is_file():
        cfg = formats.read_cfg(folder)
        if "metadata" in cfg:
            return formats.load_sae(folder, device)
        return load_saelens_legacy(folder, device)
    raise MissingSAEError(
        f"{folder}: no ae.pt (dictionary_learning), sae.safetensors (sparsify) or cfg.json (SAELens) here"
    )


def _build(arch: str, tensors: dict[str, torch.Tensor], where: Path, device: str, **fields: Any) -> SAE:
    """An SAE of ``arch`` with ``fields``, holding exactly ``tensors`` (names and shapes checked)."""
    cfg = registry.config_class(arch)(**{**fields, "device": str(device)})
    sae = registry.sae_class(arch)(cfg)
    want = sae.state_dict()
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise SAEFolderError(f"{where}: cannot map to a {arch} SAE: missing {missing}, unexpected {extra}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise SAEFolderError(
                f"{where}: {k} has shape {list(v.shape)}, expected {list(want[k].shape)} for d_in={cfg.d_in}, d_sae={cfg.d_sae}"
            )
    sae.load_state_dict({k: v.to(want[k].dtype).to(device) for k, v in tensors.items()})
    return sae


def load_saelens_legacy(folder: str | Path, device: str = "cpu") -> SAE:
    """A pre-v6 SAELens folder (flat cfg.json + sae_weights.safetensors)."""
    from safetensors.torch import load_file

    folder = local_sae_dir(folder)
    cfg = formats.read_cfg(folder)
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise SAEFolderError(
            f"{folder}: normalize_activations={cfg['normalize_activations']!r}; fold it into the weights in SAELens first"
        )
    tensors = load_file(str(folder / formats.WEIGHTS_FILE))
    scale = tensors.pop("scaling_factor", None)  # old finetuning factor: ones unless finetuned
    if scale is not None and not torch.all(scale == 1):
        raise SAEFolderError(f"{folder}: scaling_factor is not all ones; fold it into W_dec in SAELens first")
    arch = cfg.get("architecture", "standard")
    fn = cfg.get("activation_fn_str", "relu")
    common = dict(d_in=cfg["d_in"], d_sae=cfg["d_sae"], apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True))
    if arch == "standard" and fn == "topk":
        return _build("topk", tensors, folder, device, k=int((cfg.get("activation_fn_kwargs") or {})["k"]), **common)
    if arch == "standard" and fn == "relu":
        return _build("relu", tensors, folder, device, **common)
    if arch in ("gated", "jumprelu"):
        return _build(arch, tensors, folder, device, **common)
    raise SAEFolderError(f"{folder}: SAELens architecture {arch!r} with activation {fn!r} is not one saeforge reads")


def load_sparsify(folder: str | Path, device: str = "cpu") -> SAE:
    """A sparsify hookpoint folder (cfg.json + sae.safetensors) as a TopK SAE."""
    from safetensors.torch import load_file

    folder = local_sae_dir(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    transcode, skip = bool(cfg.get("transcode")), bool(cfg.get("skip_connection"))
    if cfg.get("activation", "topk") != "topk" or (skip and not transcode):
        raise SAEFolderError(
            f"{folder}: sparsify activation={cfg.get('activation')!r}, transcode={transcode}, "
            f"skip_connection={skip}: only TopK SAEs and TopK (skip) transcoders are read"
        )
    t = load_file(str(folder / "sae.safetensors"))
    d_sae, d_in = t["encoder.weight"].shape
    tensors = {
        "W_enc": t["encoder.weight"].T.contiguous(),
        "b_enc": t["encoder.bias"],
        "W_dec": t["W_dec"],
        "b_dec": t["b_dec"],
    }
    if not transcode:
        return _build(
            "topk", tensors, folder, device, d_in=d_in, d_sae=d_sae, k=int(cfg["k"]), apply_b_dec_to_input=True
        )
    if skip:
        tensors["W_skip"] = t["W_skip"]
    return _build(
        "topk",
        tensors,
        folder,
        device,
        d_in=d_in,
        d_sae=d_sae,
        k=int(cfg["k"]),
        apply_b_dec_to_input=False,
        d_out=int(t["W_dec"].shape[1]),
        skip=skip,
    )


def load_dictionary_learning(folder: str | Path, device: str = "cpu") -> SAE:
    """A dictionary_learning folder (ae.pt + config.json)."""
    folder = local_sae_dir(folder)
    trainer = json.loads((folder / "config.json").read_text()).get("trainer", {})
    sd = torch.load(folder / "ae.pt", map_location="cpu", weights_only=True)
    kind = trainer.get("dict_class", "AutoEncoder")
    if kind == "AutoEncoder":
        D, F_ = sd["encoder.weight"].shape[1], sd["encoder.weight"].shape[0]
        tensors = {
            "W_enc": sd["encoder.weight"].T,
            "b_enc": sd["encoder.bias"],
            "W_dec": sd["decoder.weight"].T,
            "b_dec": sd["bias"],
        }
        return _build("relu", _contig(tensors), folder, device, d_in=D, d_sae=F_)
    if kind in ("AutoEncoderTopK", "BatchTopKSAE"):
        D, F_ = sd["encoder.weight"].shape[1], sd["encoder.weight"].shape[0]
        tensors = {
            "W_enc": sd["encoder.weight"].T,
            "b_enc": sd["encoder.bias"],
            "W_dec": sd["decoder.weight"].T,
            "b_dec": sd["b_dec"],
        }
        if kind == "AutoEncoderTopK":
            return _build(
                "topk", _contig(tensors), folder, device, d_in=D, d_sae=F_, k=int(sd.get("k", trainer.get("k")))
            )
        theta = float(sd["threshold"])
        if theta < 0:
            raise SAEFolderError(
                f"{folder}: BatchTopKSAE threshold {theta} < 0: it was never estimated, so it has no inference form"
            )
        tensors["threshold"] = torch.full((F_,), theta)
        return _build("jumprelu", _contig(tensors), folder, device, d_in=D, d_sae=F_)
    if kind == "JumpReluAutoEncoder":
        D, F_ = sd["W_enc"].shape
        tensors = {k: sd[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
        return _build(
            "jumprelu",
            tensors,
            folder,
            device,
            d_in=D,
            d_sae=F_,
            apply_b_dec_to_input=bool(trainer.get("apply_b_dec_to_input", False)),
        )
    if kind == "GatedAutoEncoder":
        F_, D = sd["encoder.weight"].shape
        tensors = {
            "W_enc": sd["encoder.weight"].T,
            "b_gate": sd["gate_bias"],
            "b_mag": sd["mag_bias"],
            "r_mag": sd["r_mag"],
            "W_dec": sd["decoder.weight"].T,
            "b_dec": sd["decoder_bias"],
        }
        return _build("gated", _contig(tensors), folder, device, d_in=D, d_sae=F_)
    raise SAEFolderError(
        f"{folder}: dictionary_learning dict_class {kind!r} is not one saeforge reads "
        "(AutoEncoder, AutoEncoderTopK, BatchTopKSAE, JumpReluAutoEncoder, GatedAutoEncoder)"
    )


def _contig(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tensors.items()}
