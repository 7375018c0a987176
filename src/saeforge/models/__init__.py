"""Language models: loading (hub id, folder, .gguf, built-in) and named hook points."""

from saeforge.models.errors import HookError, ModelLoadError
from saeforge.models.hooks import HookPoint, capture, list_hooks, patched, resolve_hook
from saeforge.models.layout import hf_model
from saeforge.models.loading import LoadedModel, load_model, resolve_device, resolve_dtype

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
