"""Language models: loading (hub id, folder, .gguf, built-in) and named hook points."""

from saeforge.models.hooks import HookError, HookPoint, capture, hf_model, list_hooks, patched, resolve_hook
from saeforge.models.loading import LoadedModel, ModelLoadError, load_model, resolve_device, resolve_dtype

__all__ = [
    "HookError",
    "HookPoint",
    "LoadedModel",
    "ModelLoadError",
    "capture",
    "hf_model",
    "list_hooks",
    "load_model",
    "patched",
    "resolve_device",
    "resolve_dtype",
    "resolve_hook",
]
