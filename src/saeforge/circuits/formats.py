"""circuit-tracer's transcoder folders: per-layer sets ("transcoder_set") and CLTs ("cross_layer_transcoder").

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

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from saeforge.circuits.clt import CLTConfig, CrossLayerTranscoder
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
    config = _checked_config(folder)
    if config.get("model_kind", "transcoder_set") != "transcoder_set":
        raise TranscoderSetError(
            f"{path}: model_kind {config.get('model_kind')!r}; read_circuit_tracer takes per-layer sets "
            "(transcoder_set); read_clt_circuit_tracer takes cross_layer_transcoder folders"
        )
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


# Cross-layer transcoders: circuit-tracer's lazy-loading layout (its CrossLayerTranscoder.to_safetensors /
# load_clt), as we understand it: W_enc_{i}.safetensors holds W_enc_{i} [F, D], b_enc_{i} [F], b_dec_{i} [D],
# threshold_{i} [F] for JumpReLU (ReLU without it), W_skip_{i} when skipping; W_dec_{i}.safetensors holds
# W_dec_{i} [F, L - i, D] (block m - i writes layer m: the same as ours). Its CLTs are ReLU or JumpReLU only.


def export_clt_circuit_tracer(clt: CrossLayerTranscoder, model_name: str, out: str | Path) -> Path:
    """Write a ReLU / JumpReLU CLT in circuit-tracer's layout (a TopK CLT has no counterpart there)."""
    out = Path(out)
    if out.exists():
        raise TranscoderSetError(f"{out} exists: an exported folder is never overwritten; pick another --out")
    if clt.cfg.activation == "topk":
        raise TranscoderSetError(
            "this CLT is TopK; circuit-tracer's CLTs are ReLU or JumpReLU, so its files cannot express it"
        )
    config = {"model_name": model_name, "model_kind": "cross_layer_transcoder", "scan": f"{model_name}/{out.name}",
              "feature_input_hook": INPUT_HOOKS[0], "feature_output_hook": OUTPUT_HOOKS[0]}  # fmt: skip
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i in range(clt.n_layers):
        enc = {f"W_enc_{i}": clt.W_enc[i].T, f"b_enc_{i}": clt.b_enc[i], f"b_dec_{i}": clt.b_dec[i]}
        if clt.cfg.activation == "jumprelu":
            enc[f"threshold_{i}"] = clt.threshold[i]
        save_file({k: v.detach().contiguous().cpu() for k, v in enc.items()}, str(tmp / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": clt.W_dec[i].detach().contiguous().cpu()}, str(tmp / f"W_dec_{i}.safetensors"))
    (tmp / CONFIG).write_text(_yaml().safe_dump(config, sort_keys=False))
    os.replace(tmp, out)
    return out


def read_clt_circuit_tracer(folder: str | Path, device: str = "cpu") -> tuple[CrossLayerTranscoder, str]:
    """(our CLT, model name) from circuit-tracer's CLT files (config.yaml with model_kind cross_layer_transcoder)."""
    folder = Path(folder)
    config = _checked_config(folder)
    L = sum(1 for _ in folder.glob("W_enc_*.safetensors"))
    enc = [load_file(str(folder / f"W_enc_{i}.safetensors"), device=device) for i in range(L)]
    dec = [load_file(str(folder / f"W_dec_{i}.safetensors"), device=device)[f"W_dec_{i}"] for i in range(L)]
    if not L:
        raise TranscoderSetError(f"{folder} has no W_enc_0.safetensors: not a circuit-tracer CLT folder")
    if any(f"W_skip_{i}" in e for i, e in enumerate(enc)):
        raise TranscoderSetError(f"{folder}: a CLT with skip connections (W_skip_N); saeforge's CLT has none")
    F_, D = enc[0]["W_enc_0"].shape
    activation = "jumprelu" if "threshold_0" in enc[0] else "relu"
    cfg = CLTConfig(n_layers=L, d_model=D, d_sae=F_, k=1, activation=activation)
    clt = CrossLayerTranscoder(cfg)
    state = {
        "W_enc": torch.stack([e[f"W_enc_{i}"].T for i, e in enumerate(enc)]),
        "b_enc": torch.stack([e[f"b_enc_{i}"] for i, e in enumerate(enc)]),
        "b_dec": torch.stack([e[f"b_dec_{i}"] for i, e in enumerate(enc)]),
        **{f"W_dec.{i}": w for i, w in enumerate(dec)},
    }
    if activation == "jumprelu":
        state["threshold"] = torch.stack([e[f"threshold_{i}"].reshape(-1) for i, e in enumerate(enc)])
    clt.load_state_dict(state, assign=True)
    return clt.requires_grad_(False), str(config["model_name"])


def _checked_config(folder: Path) -> dict:
    path = folder / CONFIG
    if not path.exists():
        raise TranscoderSetError(f"{folder} has no {CONFIG}: give a circuit-tracer transcoder folder")
    config = _yaml().safe_load(path.read_text()) or {}
    hooks = (config.get("feature_input_hook"), config.get("feature_output_hook"))
    if hooks[0] not in INPUT_HOOKS or hooks[1] not in OUTPUT_HOOKS:
        raise TranscoderSetError(
            f"{path}: features read {hooks[0]!r} and write {hooks[1]!r}; saeforge's replacement model needs the "
            f"MLP's normalised input ({' or '.join(INPUT_HOOKS)}) and its output ({' or '.join(OUTPUT_HOOKS)})"
        )
    if not config.get("model_name"):
        raise TranscoderSetError(f"{path} names no model_name: add the model's hub id or folder")
    return config


def read_circuit_tracer_folder(
    folder: str | Path, device: str = "cpu"
) -> tuple[TranscoderSet | CrossLayerTranscoder, str]:
    """(per-layer set or CLT, model name) for any circuit-tracer folder this module reads."""
    config = _checked_config(Path(folder))
    if config.get("model_kind") == "cross_layer_transcoder":
        return read_clt_circuit_tracer(folder, device)
    tset = read_circuit_tracer(folder, device)
    return tset, tset.model_name


def load_transcoder_folder(folder: str | Path) -> tuple[TranscoderSet | CrossLayerTranscoder, str, dict | None]:
    """(transcoders, model name, the training run's data section or None) of any transcoder folder: a
    `saeforge clt` folder (cfg.json), a circuit-tracer folder (config.yaml: it records no corpus) or a
    `saeforge transcoders` folder (transcoders.json). Loaded on the CPU; ReplacementModel and the quality
    pass move them to the model's device."""
    from saeforge.circuits.clt import load_clt
    from saeforge.circuits.transcoders import MANIFEST, load_transcoders
    from saeforge.saes.formats import read_cfg

    folder = Path(folder)
    if (folder / "cfg.json").exists():
        clt, model_name = load_clt(folder)
        return clt, model_name, json.loads((folder / "cfg.json").read_text()).get("data")
    if (folder / "config.yaml").exists():
        transcoders, model_name = read_circuit_tracer_folder(folder)
        return transcoders, model_name, None
    tset = load_transcoders(folder)
    first = folder / json.loads((folder / MANIFEST).read_text())["layers"][str(min(tset.saes))]
    data = ((read_cfg(first).get("metadata") or {}).get("saeforge_config") or {}).get("data")
    return tset, tset.model_name, data
