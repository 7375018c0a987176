"""Per-layer transcoders (PLTs) for every layer, trained together from one LM pass, and the folder holding them.

A PLT at layer L reads ``blocks.L.hook_mlp_in`` (after the pre-MLP norm) and predicts ``blocks.L.hook_mlp_out``.
Training is an ordinary sweep (training/sweep.py) whose points pair hook L with hook_out L, instead of
crossing the two axes, so one stream carries every layer's [x | y] columns and each trainer takes its own.

The sweep folder gains ``transcoders.json`` (written last, atomically):

    {"format_version": 1, "model_name": ..., "hook_in": "blocks.{layer}.hook_mlp_in",
     "hook_out": "blocks.{layer}.hook_mlp_out", "layers": {"0": "<point folder>/sae", ...}}

Paths are relative to the folder, so it can be moved as a whole.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from saeforge.config import UserError
from saeforge.io import atomic_write_text
from saeforge.models import load_model
from saeforge.saes.base import SAE
from saeforge.saes.formats import load_sae, read_cfg
from saeforge.training.config import RunConfig
from saeforge.training.sweep import read_plan, train_sweep

MANIFEST = "transcoders.json"
FORMAT_VERSION = 1
HOOK_IN, HOOK_OUT = "blocks.{layer}.hook_mlp_in", "blocks.{layer}.hook_mlp_out"


class TranscoderSetError(UserError, ValueError):
    """A transcoder folder that cannot serve as a per-layer set for this model (missing layer, other model, ...)."""


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """``"all"`` or ``"0,2,5"`` -> sorted distinct layer indices, each checked against the model's depth."""
    if spec.strip() == "all":
        return list(range(n_layers))
    try:
        layers = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise TranscoderSetError(
            f"--layers {spec!r}: expected 'all' or comma-separated layer numbers, e.g. 0,1,2"
        ) from None
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if not layers or bad:
        raise TranscoderSetError(f"--layers {spec!r}: the model has layers 0..{n_layers - 1}; got {bad or 'none'}")
    return layers


def layer_points(layers: list[int]) -> list[dict[str, dict[str, str]]]:
    """One sweep point per layer, pairing that layer's MLP input with its MLP output."""
    return [
        {"model": {"hook": HOOK_IN.format(layer=layer), "hook_out": HOOK_OUT.format(layer=layer)}} for layer in layers
    ]


def train_layer_transcoders(
    base: dict, layers: str = "all", evaluate: bool = True, progress: bool = True, lm=None, resume=None
) -> Path:
    """Train one transcoder per layer (``base`` is a RunConfig dict; its hooks are replaced) and write the manifest.

    Returns the folder. ``resume``: an interrupted folder made by this function with the same base and layers.
    """
    base = {k: dict(v) for k, v in base.items()}
    base.setdefault("model", {}).update(hook=HOOK_IN.format(layer=0), hook_out=HOOK_OUT.format(layer=0))
    cfg = RunConfig.from_dict(base)  # the defaults of every field the caller left out
    if lm is None:
        lm = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device)
    chosen = parse_layers(layers, lm.n_layers)
    base["model"].update(hook=HOOK_IN.format(layer=chosen[0]), hook_out=HOOK_OUT.format(layer=chosen[0]))
    if not base.get("train", {}).get("run_name"):  # the sweep's default name would name layer 0's hooks only
        name = f"{Path(cfg.model.name).name.removesuffix('.gguf')}-transcoders-{cfg.sae.architecture}-{cfg.sae.d_sae}"
        base.setdefault("train", {})["run_name"] = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
    if resume is not None:
        planned = read_plan(resume)["points"]
        if planned != layer_points(chosen):
            was = [int(p["model"]["hook"].split(".")[1]) for p in planned if "model" in p]
            raise TranscoderSetError(
                f"{resume} trains layers {was}, not {chosen}: resume it with --layers {','.join(map(str, was))}"
            )
    result = train_sweep(base, layer_points(chosen), evaluate=evaluate, progress=progress, lm=lm, resume=resume)
    folder = result.sweep_dir
    entries = {}
    for layer, row in zip(chosen, result.rows, strict=True):
        entries[str(layer)] = str(Path(row["sae_dir"]).resolve().relative_to(folder.resolve()))
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_name": cfg.model.name,
        "hook_in": HOOK_IN,
        "hook_out": HOOK_OUT,
        "layers": entries,
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return folder


@dataclass
class TranscoderSet:
    """Loaded per-layer transcoders: ``saes[layer]`` reads blocks.layer.hook_mlp_in, predicts hook_mlp_out."""

    folder: Path
    model_name: str
    saes: dict[int, SAE]


def load_transcoders(folder: str | Path, device: str = "cpu") -> TranscoderSet:
    """Read ``transcoders.json`` and every SAE folder it names; checks each is the transcoder it claims to be."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise TranscoderSetError(
            f"{folder} has no {MANIFEST}: give a folder written by `saeforge transcoders` (an unfinished one "
            "has none: finish it with --resume)"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TranscoderSetError(
            f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    saes = {}
    for key, rel in manifest["layers"].items():
        layer = int(key)
        meta = read_cfg(folder / rel).get("metadata") or {}
        want = (HOOK_IN.format(layer=layer), HOOK_OUT.format(layer=layer))
        got = (meta.get("hook_name"), meta.get("hook_name_out"))
        if got != want:
            raise TranscoderSetError(
                f"{folder / rel} maps {got[0]} -> {got[1]}, but the manifest lists it for layer "
                f"{layer} ({want[0]} -> {want[1]})"
            )
        if meta.get("model_name") != manifest["model_name"]:
            raise TranscoderSetError(
                f"{folder / rel} was trained on {meta.get('model_name')!r}, the rest of the set "
                f"on {manifest['model_name']!r}: a set must come from one model"
            )
        sae = load_sae(folder / rel, device=device)
        sae.requires_grad_(False)
        saes[layer] = sae
    return TranscoderSet(folder, manifest["model_name"], dict(sorted(saes.items())))
