"""Save and load SAEs as SAELens v6 folders, so SAELens users can ``SAE.load_from_disk`` ours.

A folder holds:
  cfg.json                 SAELens inference fields + our own config fields + metadata
  sae_weights.safetensors  W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]
  sparsity.safetensors     optional, one tensor "sparsity" [d_sae] (SAELens stores log10 firing frequency)

Choices, so SAELens reads the folder as its own:
- ``architecture`` holds SAELens's name ("standard" for our "relu", "topk" for "topk"); our name is
  in ``metadata.saeforge_architecture``, which our loader prefers.
- A tied SAE (``tied: true``) writes W_enc = W_dec^T as its own tensor (SAELens has no tied layout);
  loading checks the two are equal and keeps one parameter.
- ``normalize_activations`` is "none": the trainer folds its input scale into the weights first.
- ``metadata.sae_lens_version`` is "6.0.0". SAELens uses it only to pick its config parser: without
  it, SAELens treats the folder as pre-v6 and drops the metadata dict. It declares the layout we
  write, not that SAELens wrote it; ``metadata.saeforge_version`` says who did.
- SAELens ignores top-level keys it does not know, so ours (k, aux_k, l1_coefficient, ...,
  format_version) sit beside its own.
- Transcoders (cfg ``d_out`` > 0) use SAELens v6's transcoder layout: W_dec [d_sae, d_out],
  b_dec [d_out], W_skip [d_out, d_in] when ``skip``, top-level ``d_out``, ``apply_b_dec_to_input``
  false, the output hook in ``metadata.hook_name_out``. Architecture names: relu -> "transcoder"
  (skip: "skip_transcoder"), jumprelu -> "jumprelu_transcoder" ("jumprelu_skip_transcoder").
  SAELens has no TopK transcoder: ours is written as "topk_transcoder" ("topk_skip_transcoder"),
  which SAELens refuses as an unknown architecture rather than misreading it.

Saving is atomic for the whole folder: files go into a hidden sibling ``.NAME.tmp-PID`` (cfg.json
last), which is renamed to NAME only when complete. A folder named NAME is therefore always whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from saeforge import __version__
from saeforge.config import UserError, from_dict
from saeforge.saes import registry
from saeforge.saes.base import SAE
from saeforge.saes.hub import local_sae_dir


class SAEFolderError(UserError, ValueError):
    """An SAE folder that cannot be read as it is (damaged, foreign in a way we do not read, mismatched)."""


class MissingSAEError(UserError, FileNotFoundError):
    """An SAE folder, or a file of one, that is not there."""


CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
FORMAT_VERSION = 1
SAELENS_LAYOUT_VERSION = "6.0.0"

# our architecture name <-> SAELens's; an architecture missing here is saved under its own name
TO_SAELENS = {"relu": "standard", "topk": "topk", "gated": "gated", "jumprelu": "jumprelu"}
FROM_SAELENS = {v: k for k, v in TO_SAELENS.items()}

# (our architecture, skip) <-> SAELens's transcoder architecture names
TO_SAELENS_TRANSCODER = {
    ("relu", False): "transcoder",
    ("relu", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder",
    ("jumprelu", True): "jumprelu_skip_transcoder",
}
FROM_SAELENS_TRANSCODER = {v: k for k, v in TO_SAELENS_TRANSCODER.items()}


def saelens_architecture(name: str, cfg: Any) -> str:
    """The "architecture" string written to cfg.json for our architecture ``name`` with config ``cfg``."""
    if getattr(cfg, "d_out", 0) > 0:
        skip = bool(getattr(cfg, "skip", False))
        return TO_SAELENS_TRANSCODER.get((name, skip), f"{name}_skip_transcoder" if skip else f"{name}_transcoder")
    return TO_SAELENS.get(name, name)


# SAELens's standard metadata keys, always written (None when the caller did not say)
METADATA_KEYS = ("model_name", "hook_name", "context_size", "prepend_bos", "dataset_path", "exclude_special_tokens")


def build_cfg(sae: SAE, metadata: dict[str, Any]) -> dict[str, Any]:
    """The cfg.json dict for ``sae`` (exposed so callers and tests can inspect it without saving)."""
    ours = dataclasses.asdict(sae.cfg)
    name = ours.pop("architecture")
    cfg: dict[str, Any] = {
        "architecture": saelens_architecture(name, sae.cfg),
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **ours,
    }
    if name == "topk":
        cfg["rescale_acts_by_decoder_norm"] = False  # pin SAELens's TopK option to our semantics
    cfg["format_version"] = FORMAT_VERSION
    cfg["sae_lens_version"] = SAELENS_LAYOUT_VERSION
    cfg["metadata"] = {
        **{k: None for k in METADATA_KEYS},
        **metadata,
        "saeforge_architecture": name,
        "saeforge_version": __version__,
        "sae_lens_version": SAELENS_LAYOUT_VERSION,
    }
    for key, value in cfg["metadata"].items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"metadata[{key!r}] = {value!r} cannot be written to JSON; pass str/int/float/bool/list/dict"
            ) from None
    return cfg


def save_sae(sae: SAE, folder: str | Path, metadata: dict[str, Any], sparsity_F: torch.Tensor | None = None) -> Path:
    """Write ``sae`` as a SAELens v6 folder, replacing an earlier SAE folder there; returns the folder.

    An SAE with an ``inference_sae()`` method (BatchTopK, Matryoshka) is saved as what that returns
    (a JumpReLU with identical outputs); its training config goes to ``metadata.saeforge_trained_as``.
    """
    folder = Path(folder)
    if hasattr(sae, "inference_sae"):
        metadata = {**metadata, "saeforge_trained_as": dataclasses.asdict(sae.cfg)}
        sae = sae.inference_sae()
    cfg = build_cfg(sae, metadata)
    if sparsity_F is not None and tuple(sparsity_F.shape) != (sae.d_sae,):
        raise ValueError(
            f"sparsity_F has shape {list(sparsity_F.shape)}; expected [{sae.d_sae}] (one value per latent)"
        )
    if folder.exists() and not (folder.is_dir() and (not any(folder.iterdir()) or (folder / CFG_FILE).exists())):
        raise FileExistsError(
            f"{folder} exists and is not an SAE folder (no {CFG_FILE}); refusing to replace it. Pick another path."
        )
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sae.state_dict().items()}
    if sae.tied:  # SAELens has no tied layout: write the encoder out as its own tensor
        tensors["W_enc"] = sae.W_enc.detach().to("cpu").contiguous()

    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if sparsity_F is not None:
            save_file({"sparsity": sparsity_F.detach().to("cpu").float().contiguous()}, str(tmp / SPARSITY_FILE))
        # cfg.json last: a temp folder that has one has everything.
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        for f in tmp.iterdir():
            _fsync(f)
        _swap_in(tmp, folder)
        _fsync(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _swap_in(tmp: Path, folder: Path) -> None:
    """Rename tmp to folder; an existing folder is moved aside first and deleted after."""
    if not folder.exists():
        os.replace(tmp, folder)
        return
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _require(path: Path, what: str) -> None:
    if path.is_file():
        return
    folder = path.parent
    if not folder.is_dir():
        leftovers = sorted(p.name for p in folder.parent.glob(f".{folder.name}.*")) if folder.parent.is_dir() else []
        hint = f"; leftovers of an interrupted save nearby: {leftovers}" if leftovers else ""
        raise MissingSAEError(f"SAE folder {folder} does not exist{hint}")
    raise MissingSAEError(
        f"{path} is missing ({what}): {folder} may be partial (an interrupted save; a complete one "
        f"writes {CFG_FILE} last and renames the whole folder) or not an SAE folder. Re-save or pick the right folder."
    )


def read_cfg(folder: str | Path) -> dict[str, Any]:
    """cfg.json as a dict (e.g. ``read_cfg(f)["metadata"]["hook_name"]``); ``folder`` may be an hf:// spec."""
    path = local_sae_dir(folder) / CFG_FILE
    _require(path, "the SAE config")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SAEFolderError(f"{path} is not valid JSON ({e}); the folder is damaged: re-save the SAE") from None


def architecture_of(cfg: dict[str, Any]) -> str:
    """Our architecture name for a cfg.json dict (ours or one written by SAELens)."""
    meta = cfg.get("metadata") or {}
    arch = cfg.get("architecture", "standard")
    name = meta.get("saeforge_architecture") or FROM_SAELENS.get(arch) or FROM_SAELENS_TRANSCODER.get(arch, (arch,))[0]
    if name not in registry.names():
        raise SAEFolderError(
            f"cfg.json architecture {cfg.get('architecture')!r} is not one saeforge can load; "
            f"known: {registry.names()} (SAELens names: {sorted(FROM_SAELENS) + sorted(FROM_SAELENS_TRANSCODER)})"
        )
    return name


def trained_architecture(folder: str | Path) -> str:
    """The architecture an SAE was trained as: a BatchTopK or Matryoshka SAE is saved as (and loads as) the
    JumpReLU it equals at inference, with its training config in ``metadata.saeforge_trained_as``."""
    cfg = read_cfg(folder)
    trained = (cfg.get("metadata") or {}).get("saeforge_trained_as") or {}
    return trained.get("architecture") or architecture_of(cfg)


def _saelens_transcoder_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """skip for a folder SAELens wrote as a transcoder (its cfg.json has d_out but no "skip" of ours)."""
    arch = cfg.get("architecture")
    if arch in FROM_SAELENS_TRANSCODER and "skip" not in cfg:
        return {"skip": FROM_SAELENS_TRANSCODER[arch][1]}
    return {}


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder written by ``save_sae`` (or by SAELens, for architectures we share).

    ``folder`` may also be ``hf://OWNER/REPO[/PATH][@REVISION]`` or ``saelens://RELEASE/SAE_ID`` (saes/hub.py).
    """
    folder = local_sae_dir(folder)
    cfg = read_cfg(folder)
    name = architecture_of(cfg)
    if cfg.get("normalize_activations", "none") != "none":
        raise SAEFolderError(
            f"{folder / CFG_FILE}: normalize_activations={cfg['normalize_activations']!r}; saeforge loads only "
            "'none' (input scaling folded into the weights). Fold it in SAELens first (fold_activation_norm_scaling_factor)."
        )
    if cfg.get("reshape_activations", "none") != "none":
        raise SAEFolderError(
            f"{folder / CFG_FILE}: reshape_activations={cfg['reshape_activations']!r} (attention heads) "
            "is not supported by saeforge"
        )
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm"))
    if rescale and name != "topk":
        raise SAEFolderError(f"{folder / CFG_FILE}: rescale_acts_by_decoder_norm is only understood for topk SAEs")
    cfg_cls = registry.config_class(name)
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    fields = {k: v for k, v in cfg.items() if k in known}
    fields.update(architecture=name, device=str(device), **_saelens_transcoder_fields(cfg))
    sae = registry.sae_class(name)(from_dict(cfg_cls, fields))

    weights_path = folder / WEIGHTS_FILE
    _require(weights_path, "the SAE weights")
    tensors = load_file(str(weights_path), device=str(device))
    if sae.tied and "W_enc" in tensors and "W_dec" in tensors:
        W_enc_DF = tensors.pop("W_enc")
        if W_enc_DF.shape != tensors["W_dec"].T.shape or not torch.equal(W_enc_DF, tensors["W_dec"].T):
            raise SAEFolderError(
                f"{weights_path}: cfg.json says tied=true but W_enc is not W_dec^T; "
                'set "tied": false in cfg.json to load the two matrices separately'
            )
    expected = sae.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise SAEFolderError(
            f"{weights_path}: tensor names do not match a {name} SAE: missing {missing}, unexpected {extra}; "
            f"expected exactly {sorted(expected)}"
        )
    for key, want in expected.items():
        got = tensors[key]
        if got.shape != want.shape:
            raise SAEFolderError(
                f"{weights_path}: {key} has shape {list(got.shape)} but cfg.json (d_in={sae.d_in}, d_sae={sae.d_sae}"
                f"{f', d_out={sae.d_out}' if sae.is_transcoder else ''}) implies {list(want.shape)}; the weights "
                "and cfg.json come from different SAEs"
                + (
                    ' (a transcoder\'s W_dec/b_dec are [d_sae, d_out]/[d_out]: is "d_out" missing from cfg.json?)'
                    if key in ("W_dec", "b_dec") and not sae.is_transcoder
                    else ""
                )
            )
    if rescale:
        _fold_decoder_norm(tensors)
    sae.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    return sae


def _fold_decoder_norm(tensors: dict[str, torch.Tensor]) -> None:
    """SAELens TopK with rescale_acts_by_decoder_norm -> plain TopK with the same x_hat and selections.

    SAELens computes pre_i = (W_enc^T x' + b_enc)_i * n_i with n_i = ||W_dec[i]||, keeps the top k, and
    decodes sum_i (f_i / n_i) W_dec[i]. Scaling encoder column i and b_enc_i by n_i and decoder row i by
    1 / n_i gives the same pre-activations (so the same top-k) and the same reconstruction; the latents
    are then SAELens's (rescaled) values.
    """
    n_F = tensors["W_dec"].norm(dim=-1)
    tensors["W_enc"] = tensors["W_enc"] * n_F
    tensors["b_enc"] = tensors["b_enc"] * n_F
    tensors["W_dec"] = tensors["W_dec"] / n_F[:, None]


def load_sparsity(folder: str | Path, device: str | torch.device = "cpu") -> torch.Tensor | None:
    """The "sparsity" tensor [d_sae] of sparsity.safetensors, or None when the folder has none."""
    path = local_sae_dir(folder) / SPARSITY_FILE
    if not path.is_file():
        return None
    tensors = load_file(str(path), device=str(device))
    if set(tensors) != {"sparsity"}:
        raise SAEFolderError(f"{path}: expected one tensor named 'sparsity', found {sorted(tensors)}")
    return tensors["sparsity"]
