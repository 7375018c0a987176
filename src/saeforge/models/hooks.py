"""Hook points: stable names for places in a Hugging Face causal LM, read or replaced in flight.

Canonical names, per decoder layer L (the TransformerLens spelling, mapped onto HF modules):

    blocks.L.hook_resid_pre    input of decoder layer L (the residual stream before the block)
    blocks.L.hook_resid_post   output of decoder layer L
    blocks.L.hook_attn_out     output[0] of the attention module (after its output projection)
    blocks.L.hook_mlp_in       input of the MLP module, i.e. AFTER the pre-MLP norm
    blocks.L.hook_mlp_out      output of the MLP module

Footguns, said plainly:
- ``hook_mlp_in`` differs from TransformerLens, where it is the residual stream *before* the norm.
  Here it is exactly what the MLP reads, which is what an MLP transcoder wants.
- For sequential blocks (Llama, GPT-2) and for GPT-NeoX's parallel residual,
  resid_post = resid_pre + attn_out + mlp_out. Families that norm a sublayer's output before adding it
  (Gemma 2/3 "sandwich" norms) break that identity: attn_out/mlp_out are the raw module outputs.
- Any other name is read as a raw module path (``model.layers.3``, ``transformer.h.0.mlp.c_fc``) and
  means that module's output (output[0] when it returns a tuple).

``capture`` runs the forward under ``torch.no_grad`` (not inference_mode: captured activations must stay
usable as inputs of SAE training) and stops right after the last needed hook fires.
"""

from __future__ import annotations

import difflib
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from saeforge.models.compiled import compiled_forwards
from saeforge.models.errors import HookError
from saeforge.models.layout import LAYOUTS, MODEL_TYPE_FAMILY, family_of, hf_model, n_layers_of

HOOK_KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_in", "mlp_out")

_CANONICAL_RE = re.compile(r"^blocks\.(\d+)\.hook_([a-z_]+)$")

HookFn = Callable[[torch.Tensor], "torch.Tensor | None"]


class _StopForward(Exception):
    """Raised from a hook once every requested activation is in hand; caught by capture()."""


def list_hooks(model: Any) -> list[str]:
    """Every canonical hook name of ``model`` (layer-major). Empty for families without a layout."""
    model = hf_model(model)
    if family_of(model.config) not in LAYOUTS:
        return []
    return [f"blocks.{layer}.hook_{kind}" for layer in range(n_layers_of(model)) for kind in HOOK_KINDS]


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, (tuple, list)) else x


def _check_replacement(name: str, old: torch.Tensor, new: Any) -> torch.Tensor:
    if not isinstance(new, torch.Tensor):
        raise HookError(f"hook fn for {name} returned {type(new).__name__}; return a tensor or None")
    if new.shape != old.shape:
        raise HookError(
            f"hook fn for {name} returned shape {tuple(new.shape)}; the hooked tensor has {tuple(old.shape)}"
        )
    return new


@dataclass(frozen=True)
class HookPoint:
    """One place in the model. ``io`` says whether ``module``'s input or its output is hooked."""

    name: str
    module: nn.Module
    io: str  # "input" | "output"
    layer: int | None = None

    def register(self, fn: HookFn) -> torch.utils.hooks.RemovableHandle:
        """Call ``fn(x_STD)`` each time the point is reached; a returned tensor replaces x (None keeps it).

        Works for modules returning a tensor or a tuple (element 0 is hooked) and for inputs given
        positionally or as ``hidden_states=``. Call ``.remove()`` on the result to unhook.
        """
        if self.io == "input":
            return self.module.register_forward_pre_hook(self._input_hook(fn), with_kwargs=True)
        return self.module.register_forward_hook(self._output_hook(fn))

    def _input_hook(self, fn: HookFn) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
            if args:
                new = fn(args[0])
                return None if new is None else ((_check_replacement(self.name, args[0], new), *args[1:]), kwargs)
            if "hidden_states" in kwargs:
                new = fn(kwargs["hidden_states"])
                if new is None:
                    return None
                return args, {**kwargs, "hidden_states": _check_replacement(self.name, kwargs["hidden_states"], new)}
            raise HookError(
                f"{self.name}: {type(module).__name__} was called with no positional input and no hidden_states=; "
                f"got keywords {sorted(kwargs)}. Hook its output (a raw module path) instead."
            )

        return hook

    def _output_hook(self, fn: HookFn) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            x = _first(output)
            if not isinstance(x, torch.Tensor):
                raise HookError(
                    f"{self.name}: {type(module).__name__} returned {type(output).__name__}, not a tensor or a tuple "
                    "starting with one; hook a submodule that returns the tensor you want"
                )
            new = fn(x)
            if new is None:
                return None
            new = _check_replacement(self.name, x, new)
            if isinstance(output, (tuple, list)):
                return type(output)([new, *output[1:]])
            return new

        return hook


def _valid_names_message(model: nn.Module, name: str) -> str:
    family = family_of(model.config)
    if family not in LAYOUTS:
        return (
            f"unknown hook {name!r}: model_type {model.config.model_type!r} has no canonical hook layout "
            f"(known: {sorted(MODEL_TYPE_FAMILY)}), and {name!r} is not a module path either. "
            "Use a raw module path from model.named_modules(), e.g. the path of a decoder layer."
        )
    n = n_layers_of(model)
    layers_path = LAYOUTS[family][0]
    kinds = ", ".join(f"blocks.L.hook_{k}" for k in HOOK_KINDS)
    close = difflib.get_close_matches(name, list_hooks(model), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (
        f"unknown hook {name!r}.{hint} Valid canonical names: {kinds} for L in 0..{n - 1} "
        f"(e.g. blocks.{n - 1}.hook_resid_post). Raw module paths also work and hook that module's output, "
        f"e.g. {layers_path}.{n - 1} or {layers_path}.{n - 1}.{LAYOUTS[family][2]}."
    )


def _layer_of_path(model: nn.Module, path: str) -> int | None:
    family = family_of(model.config)
    if family not in LAYOUTS:
        return None
    m = re.match(re.escape(LAYOUTS[family][0]) + r"\.(\d+)(\.|$)", path)
    return int(m.group(1)) if m else None


def resolve_hook(model: Any, name: str | HookPoint) -> HookPoint:
    """Turn a canonical name or a raw module path into a HookPoint; HookError says what is valid."""
    if isinstance(name, HookPoint):
        return name
    model = hf_model(model)
    m = _CANONICAL_RE.match(name)
    if m:
        layer, kind = int(m.group(1)), m.group(2)
        family = family_of(model.config)
        if family not in LAYOUTS or kind not in HOOK_KINDS:
            raise HookError(_valid_names_message(model, name))
        n = n_layers_of(model)
        if layer >= n:
            raise HookError(f"hook {name!r}: layer {layer} does not exist, the model has {n} layers (0..{n - 1})")
        layers_path, attn, mlp = LAYOUTS[family]
        block = model.get_submodule(f"{layers_path}.{layer}")
        module, io = {
            "resid_pre": (block, "input"),
            "resid_post": (block, "output"),
            "attn_out": (block.get_submodule(attn), "output"),
            "mlp_in": (block.get_submodule(mlp), "input"),
            "mlp_out": (block.get_submodule(mlp), "output"),
        }[kind]
        return HookPoint(name, module, io, layer)
    if name:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            pass
        else:
            return HookPoint(name, module, "output", _layer_of_path(model, name))
    raise HookError(_valid_names_message(model, name))


@contextmanager
def patched(model: Any, fns: Mapping[str | HookPoint, HookFn]) -> Iterator[dict[str, HookPoint]]:
    """Register ``{hook point or name: fn}`` for the duration of the block; always removes them."""
    handles = []
    try:
        points = {}
        for key, fn in fns.items():
            point = resolve_hook(model, key)
            points[point.name] = point
            handles.append(point.register(fn))
        yield points
    finally:
        for handle in handles:
            handle.remove()


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU when it has none); an HF model or a ``LoadedModel``."""
    param = next(hf_model(model).parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def capture(
    model: Any,
    hook_points: Sequence[str | HookPoint],
    input_ids_ST: torch.Tensor,
    attention_mask_ST: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Run the model on ``input_ids_ST`` and return ``{hook name: activation STD}``, detached.

    The forward stops (via an exception raised from the last hook to fire) as soon as every
    requested point has been seen, so later layers and the LM head never run. Inputs are moved to
    the model's device; the tensors come back there, in the model's dtype.
    """
    model = hf_model(model)
    points = [resolve_hook(model, p) for p in hook_points]
    if not points:
        raise HookError("capture() needs at least one hook point")
    wanted = {p.name for p in points}
    got: dict[str, torch.Tensor] = {}
    me = threading.get_ident()

    def recorder(name: str) -> HookFn:
        def record(x: torch.Tensor) -> None:
            if threading.get_ident() != me:  # another thread's forward (activations/prefetch.py): not ours
                return None
            got[name] = x.detach()
            if wanted.issubset(got):
                raise _StopForward
            return None

        return record

    device = model_device(model)
    input_ids_ST = input_ids_ST.to(device)
    if attention_mask_ST is not None:
        attention_mask_ST = attention_mask_ST.to(device)

    # Registered via patched() so the hooks go away even when the forward raises. Layers marked by
    # models.compiled.enable run compiled where that is safe (entered after patched: it sees our hooks).
    with (
        patched(model, {p: recorder(p.name) for p in points}),
        torch.no_grad(),
        compiled_forwards(model, input_ids_ST, attention_mask_ST, points),
    ):
        try:
            model(input_ids=input_ids_ST, attention_mask=attention_mask_ST, use_cache=False)
        except _StopForward:
            pass
    missing = wanted - set(got)
    if missing:
        raise HookError(
            f"hook points {sorted(missing)} never fired during the forward; is the module on the forward path?"
        )
    return {p.name: got[p.name] for p in points}


# Module paths of the norm applied before the unembedding (llama-style, OPT/Phi, GPT-2, NeoX, OPT decoder).
FINAL_NORMS = (
    "model.norm",
    "model.final_layernorm",
    "transformer.ln_f",
    "gpt_neox.final_layer_norm",
    "model.decoder.final_layer_norm",
)


def final_norm(model: Any) -> nn.Module | None:
    """The model's final norm module (what the logit lens passes a residual direction through), or None."""
    model = hf_model(model)
    for path in FINAL_NORMS:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    return None
