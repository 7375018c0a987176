"""torch.compile for the decoder layers that ``capture`` runs: the truncated LM forward, fused.

On CPU most of a small LM's forward outside the matmuls is short elementwise ops (RMSNorm, rotary,
SiLU-gating, residual adds) that inductor fuses: SmolLM2-135M to layer 3, 16 x 128 tokens a batch, on
2 cores, alternating in one process: 4,005 -> 5,515 tokens/s quiet (another quiet run: medians 3,748
-> 4,824), 22% faster under load. All four layers share one compiled graph. The price is the compile:
~25 s the first time on a quiet machine (~60 s busy), ~4-7 s once inductor's on-disk cache holds the
kernels. ``compile_policy`` decides; ``enable`` marks a model; ``capture`` then runs each marked
layer's compiled forward when that is safe:

- no hooks inside the layer (hooks on the layer itself run outside the compiled code, so
  resid_pre / resid_post capture and the early stop keep working; attn/mlp hooks make the layer
  run eagerly, since a compiled graph would bake in, or recompile for, every new hook);
- the batch shape the layer was compiled for (the first one it saw; other shapes, such as the
  width probe or a last short batch, run eagerly instead of recompiling);
- no attention mask (the training stream never pads) and no autograd.

The eager forward stays the reference: tests/test_compiled_lm.py checks that both give the same
activations on a tiny model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from saeforge.config import ConfigError
from saeforge.models.layout import LAYOUTS, family_of, hf_model

_ATTR = "_saeforge_compiled"
log = logging.getLogger(__name__)

# auto compiles live-LM runs on CPU from this many tokens: from ~4,000 to ~5,000+ tokens/s, 500k tokens
# save ~25-35 s against a compile of ~25 s the first time, ~4-7 s from inductor's cache. The choice
# depends on the config alone (not on the cache), so a resumed run makes the same one as the original.
AUTO_MIN_TOKENS = 500_000


def compile_policy(setting: str, device: torch.device, live_tokens: int) -> bool:
    """model.compile: "on" / "off", or "auto" = on for CPU runs reading >= AUTO_MIN_TOKENS from the live LM.

    CUDA is left eager under auto: there the LM forward is rarely the bottleneck and compiling would
    only add start-up time (measure with bench/ceiling.py --compile before turning it on).
    """
    if setting not in ("auto", "on", "off"):
        raise ConfigError(f"model.compile={setting!r}: expected auto, on or off")
    if setting != "auto":
        return setting == "on"
    return device.type == "cpu" and live_tokens >= AUTO_MIN_TOKENS


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layer modules of a model with a known layout; [] otherwise (nothing gets compiled)."""
    family = family_of(model.config)
    if family not in LAYOUTS:
        return []
    return list(model.get_submodule(LAYOUTS[family][0]))


def enable(model: Any, **compile_kwargs) -> int:
    """Mark every decoder layer of ``model`` (HF model or LoadedModel) for compiled capture; returns the count.

    Nothing compiles yet: a layer compiles on the first capture that runs it (and only layers up to
    the last hooked one ever run). ``compile_kwargs`` go to torch.compile (tests pass backend="eager").
    """
    layers = decoder_layers(hf_model(model))
    for layer in layers:
        if getattr(layer, _ATTR, None) is None:
            setattr(layer, _ATTR, _CompiledLayer(layer, compile_kwargs))
    return len(layers)


def disable(model: Any) -> None:
    """Drop the marks (and their compiled code): capture runs eagerly again."""
    for layer in decoder_layers(hf_model(model)):
        layer.__dict__.pop(_ATTR, None)


@contextmanager
def eager(model: Any) -> Iterator[None]:
    """Within the block capture runs eagerly; the marks and their compiled code come back after (for A/B timing)."""
    saved = {layer: layer.__dict__.pop(_ATTR) for layer in decoder_layers(hf_model(model)) if _ATTR in layer.__dict__}
    try:
        yield
    finally:
        for layer, mark in saved.items():
            layer.__dict__[_ATTR] = mark


class _CompiledLayer:
    def __init__(self, layer: nn.Module, compile_kwargs: dict):
        self.eager = layer.forward
        self.fn = torch.compile(layer.forward, dynamic=False, **compile_kwargs)
        self.shape: tuple[int, ...] | None = None  # the input_ids shape it compiles for (first seen)
        self.ok: bool | None = None  # None until the first call has compiled; False: it failed, stay eager
        self.calls = 0  # compiled calls, for tests and benchmarks

    def __call__(self, *args, **kwargs):
        if self.ok:
            self.calls += 1
            return self.fn(*args, **kwargs)
        try:  # the first call compiles: a machine without a working C++ toolchain fails here, not later
            out = self.fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compile failure: the eager forward is always right
            self.ok = False
            log.warning(
                "torch.compile of a decoder layer failed (%s: %s); running it eagerly. "
                "Set --model.compile off to skip the attempt.",
                type(e).__name__,
                str(e).splitlines()[0][:200],
            )
            return self.eager(*args, **kwargs)
        self.ok, self.calls = True, self.calls + 1
        return out


def _hooks_inside(layer: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for name, m in layer.named_modules() if name)


@contextmanager
def compiled_forwards(
    model: nn.Module, input_ids_ST: torch.Tensor, attention_mask_ST: torch.Tensor | None, points: Sequence[Any]
) -> Iterator[None]:
    """Within the block, marked layers that may run compiled do (see the module docstring)."""
    layers = [] if attention_mask_ST is not None or torch.is_grad_enabled() else decoder_layers(model)
    swapped: list[nn.Module] = []
    global_hooks = nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
    try:
        for layer in layers:
            compiled = layer.__dict__.get(_ATTR)
            if compiled is None or compiled.ok is False or global_hooks or _hooks_inside(layer):
                continue
            if compiled.shape is None:
                compiled.shape = tuple(input_ids_ST.shape)
            if compiled.shape != tuple(input_ids_ST.shape):
                continue
            layer.forward = compiled
            swapped.append(layer)
        yield
    finally:
        for layer in swapped:
            layer.__dict__.pop("forward", None)
