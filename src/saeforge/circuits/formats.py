"""circuit-tracer's per-layer transcoder folder ("transcoder_set"): write ours in it, read it back.

The layout, as we understand circuit-tracer's loaders (``load_transcoder_set`` / ``load_relu_transcoder``
in its transcoder/single_layer_transcoder.py and the ``config.yaml`` its hub repositories carry); it has
not been checked by loading our files into circuit-tracer itself:

- ``config.yaml``: ``model_name``, ``model_kind: transcoder_set``, ``scan``, ``feature_input_hook``
  (``mlp.hook_in``: the MLP's input after its pre-norm, our ``hook_mlp_in``), ``feature_output_hook``
  (``mlp.hook_out``), ``transcoders`` (one file per layer, 0..L-1, relative paths here), and for
  non-ReLU sets ``activation`` (``jumprelu`` / ``topk``) and ``k``;
- ``layer_{i}.safetensors``: ``W_enc [F, D]`` (circuit-tracer applies it with ``F.linear``: the transpose
  of our ``W_enc [D, F]``), ``b_enc [F]``, ``W_dec [F, D]``, ``b_dec [D]``, optional ``W_skip [D, D]``
  (applied as ``x @ W_skip.T``, as ours), and for JumpReLU ``activation_function.threshold [F]``.

Both directions move tensors without arithmetic (a transpose copies values), so ours -> theirs -> ours
is bit for bit. Extra keys under ``saeforge`` in config.yaml (the architecture) are ignored by
circuit-tracer.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from saeforge.circuits.transcoders import TranscoderSet, TranscoderSetError
from saeforge.saes.base import SAE
from saeforge.saes.registry import config_class, sae_class

CONFIG = "config.yaml"
INPUT_HOOKS = ("mlp.hook_in", "ln2.hook_normalized")  # the MLP's normalised input, in two naming schemes
OUTPUT_HOOKS = ("mlp.hook_out", "hook_mlp_out")
ACTIVATIONS = {"relu": "relu", "topk": "topk", "jumprelu": "jumprelu"}  # circuit-tracer's name -> ours
THRESHOLD_KEYS = ("activation_function.threshold", "threshold")


def _yaml():
    import yaml  # lazily: PyYAML comes with huggingface_hub, used only by these folders

    return yaml


def export_circuit_tracer(tset: TranscoderSet, out: str | Path) -> Path:
    """Write ``tset`` as a circuit-tracer transcoder_set folder at ``out`` (never over an existing path)."""
    out = Path(out)
    if out.exists():
        raise TranscoderSetError(f"{out} exists: an exported folder is never overwritten; pick another --out")
    layers = sorted(tset.saes)
    if layers != list(range(len(layers))):
        raise TranscoderSetError(
            f"{tset.folder} has transcoders for layers {layers}; circuit-tracer needs every layer from 0 "
            "without gaps: train the missing ones (saeforge transcoders --layers all)"
        )
    archs = {s.cfg.architecture for s in tset.saes.values()}
    if len(archs) != 1 or next(iter(archs)) not in ACTIVATIONS:
        raise TranscoderSetError(
            f"{tset.folder} holds architectures {sorted(archs)}: circuit-tracer's format takes one of "
            f"{sorted(ACTIVATIONS)} for the whole set"
        )
    arch = archs.pop()
    config = {
        "model_name": tset.model_name,
        "model_kind": "transcoder_set",
        "scan": f"{tset.model_name}/{Path(tset.folder).name}",
        "feature_input_hook": INPUT_HOOKS[0],
        "feature_output_hook": OUTPUT_HOOKS[0],
        "transcoders": [f"layer_{i}.safetensors" for i in layers],
        "saeforge": {"format_version": 1, "architecture": arch},
    }
    if arch != "relu":
        config["activation"] = arch
    if arch == "topk":
        config["k"] = int(tset.saes[0].cfg.k)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i in layers:
        save_file(_their_tensors(tset.saes[i]), str(tmp / f"layer_{i}.safetensors"))
    (tmp / CONFIG).write_text(_yaml().safe_dump(config, sort_keys=False))
    os.replace(tmp, out)  # the folder appears whole or not at all
    return out


def _their_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    if not sae.is_transcoder:
        raise TranscoderSetError("an SAE is not a transcoder: circuit-tracer's per-layer format holds transcoders")
    if sae.cfg.apply_b_dec_to_input:  # never true for our transcoders; a foreign SAE could be
        raise TranscoderSetError("apply_b_dec_to_input=True has no counterpart in circuit-tracer's format")
    t = {
        "W_enc": sae.W_enc.detach().T.contiguous().cpu(),
        "b_enc": sae.b_enc.detach().contiguous().cpu(),
        "W_dec": sae.W_dec.detach().contiguous().cpu(),
        "b_dec": sae.b_dec.detach().contiguous().cpu(),
    }
    if sae.cfg.skip:
        t["W_skip"] = sae.W_skip.detach().contiguous().cpu()
    if sae.cfg.architecture == "jumprelu":
        t["activation_function.threshold"] = sae.threshold.detach().contiguous().cpu()
    return t


def read_circuit_tracer(folder: str | Path, device: str = "cpu") -> TranscoderSet:
    """A circuit-tracer transcoder_set folder (config.yaml + one safetensors per layer) as our TranscoderSet."""
    folder = Path(folder)
    path = folder / CONFIG
    if not path.exists():
        raise TranscoderSetError(f"{folder} has no {CONFIG}: give a circuit-tracer transcoder folder")
    config = _yaml().safe_load(path.read_text()) or {}
    if config.get("model_kind", "transcoder_set") != "transcoder_set":
        raise TranscoderSetError(
            f"{path}: model_kind {config.get('model_kind')!r}; only per-layer sets (transcoder_set) are read"
        )
    hooks = (config.get("feature_input_hook"), config.get("feature_output_hook"))
    if hooks[0] not in INPUT_HOOKS or hooks[1] not in OUTPUT_HOOKS:
        raise TranscoderSetError(
            f"{path}: features read {hooks[0]!r} and write {hooks[1]!r}; saeforge's replacement model needs the "
            f"MLP's normalised input ({' or '.join(INPUT_HOOKS)}) and its output ({' or '.join(OUTPUT_HOOKS)})"
        )
    if not config.get("model_name"):
        raise TranscoderSetError(f"{path} names no model_name: add the model's hub id or folder")
    activation = config.get("activation") or (config.get("saeforge") or {}).get("architecture")
    saes = {}
    for layer, entry in enumerate(config.get("transcoders") or []):
        file = folder / Path(str(entry).split("?")[0]).name if "://" in str(entry) else folder / str(entry)
        if not file.exists():
            raise TranscoderSetError(
                f"{path} lists {entry} for layer {layer}, not found as {file}: download the layer files into {folder}"
            )
        saes[layer] = _our_sae(load_file(str(file), device=device), activation, config.get("k"), file)
    if not saes:
        raise TranscoderSetError(f"{path} lists no transcoders")
    return TranscoderSet(folder, str(config["model_name"]), saes)


def _our_sae(t: dict[str, torch.Tensor], activation: str | None, k: int | None, file: Path) -> SAE:
    threshold = next((t[key] for key in THRESHOLD_KEYS if key in t), None)
    arch = ACTIVATIONS.get(activation or ("jumprelu" if threshold is not None else "relu"))
    if arch is None:
        raise TranscoderSetError(f"{file}: activation {activation!r}; saeforge reads {sorted(ACTIVATIONS)}")
    missing = [key for key in ("W_enc", "b_enc", "W_dec", "b_dec") if key not in t]
    if missing or (arch == "jumprelu") != (threshold is not None):
        raise TranscoderSetError(f"{file}: missing {missing or 'a threshold'} for a {arch} transcoder")
    F, D = t["W_enc"].shape
    O = t["W_dec"].shape[1]
    kw = {"k": int(k)} if arch == "topk" else {}
    if arch == "topk" and not k:
        raise TranscoderSetError(f"{file}: activation topk needs k in config.yaml")
    dtype = str(t["W_enc"].dtype).removeprefix("torch.")
    cfg = config_class(arch)(
        d_in=D, d_sae=F, d_out=O, skip="W_skip" in t, apply_b_dec_to_input=False, dtype=dtype, **kw
    )
    sae = sae_class(arch)(cfg)
    ours = {"W_enc": t["W_enc"].T.contiguous(), "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if "W_skip" in t:
        ours["W_skip"] = t["W_skip"]
    if threshold is not None:
        ours["threshold"] = threshold
    sae.load_state_dict(ours, assign=True)
    return sae.requires_grad_(False)
