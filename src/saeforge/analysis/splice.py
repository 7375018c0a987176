"""Run the LM with SAEs spliced in at hooks, keeping each SAE's error term.

At a spliced hook the activation becomes

    x' = x + (f' - f) @ W_dec        f = encode(x), f' = edit(f)

which is ``decode(f') + (x - decode(f))``: the SAE's reconstruction with edited latents plus the
error the SAE makes on this token. Only the edit changes the forward pass: with no edit (or an
edit that changes nothing, e.g. alpha = 0) the delta is exactly zero and the logits are bit-identical
to the clean model's. This is what steering, ablation and attribution need; evals/splice.py, which
replaces x by the bare reconstruction to score the SAE, is the other kind of splice.

Several SAEs at several hooks: pass several ``Splice`` objects. Hooks fire in forward order, so a
downstream SAE encodes the activation that upstream edits produced. Two SAEs at one hook apply in
the order given.

Gradients: ``track=True`` adds a zero tensor ``delta_STF`` (a leaf that requires grad) to the
edited latents, so after ``metric.backward()`` ``state.delta_STF.grad`` is d metric / d f. The
upstream graph is kept through x (the splice's Jacobian is the identity at f' = f), so a
downstream SAE's recorded ``f_STF`` depends on upstream ``delta_STF``: feature-to-feature
attribution. Under ``torch.no_grad`` nothing is tracked and the cost is one encode per hook call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saeforge.config import UserError
from saeforge.models.hooks import HookError, HookPoint, resolve_hook

# edit(f_STF, state) -> new f_STF. ``state`` gives the splice's SAE and hook (e.g. for conditions).
Edit = Callable[[Tensor, "SpliceState"], Tensor]


@dataclass
class Splice:
    """One SAE at one hook. ``edits`` apply in order to the latents; none = a transparent splice."""

    sae: Any  # saeforge.saes.base.SAE
    hook: str | HookPoint
    edits: Sequence[Edit] = ()
    track: bool = False  # make d metric / d f available as state.delta_STF.grad
    record: bool = False  # keep the latents f_STF of the last forward (with graph when grad is on)


@dataclass
class SpliceState:
    """What a splice saw on its most recent forward call (a generation step is one call)."""

    splice: Splice
    hook: HookPoint
    f_STF: Tensor | None = None  # latents before edits (record=True)
    delta_STF: Tensor | None = None  # zero leaf with requires_grad (track=True, grad enabled)
    calls: int = 0
    extras: dict[str, Any] = field(default_factory=dict)  # per-forward scratch for edits


class FeatureIndexError(UserError, IndexError, ValueError):
    """A feature index outside 0..d_sae-1 (a ValueError too, so the CLI reports it as a user error)."""


def sae_hook_name(sae: Any) -> str | None:
    """The hook an SAE was trained on, when it knows (``sae.hook_name``, set by ``load_for_analysis``)."""
    return getattr(sae, "hook_name", None)


def check_feature(sae: Any, feature: int) -> int:
    """``feature`` as an int in 0..d_sae-1, or an IndexError that says the valid range."""
    d_sae = sae.W_dec.shape[0]
    if not isinstance(feature, int) and not (isinstance(feature, Tensor) and feature.numel() == 1):
        raise TypeError(f"feature must be an int index, got {type(feature).__name__}")
    feature = int(feature)
    if not 0 <= feature < d_sae:
        raise FeatureIndexError(f"feature {feature} is out of range: this SAE has {d_sae} latents (0..{d_sae - 1})")
    return feature


def _check_width(state: SpliceState, x: Tensor) -> None:
    d_in = state.splice.sae.W_dec.shape[1]
    if x.dim() != 3 or x.shape[-1] != d_in:
        trained = sae_hook_name(state.splice.sae)
        hint = f"; this SAE was trained on {trained!r}" if trained else ""
        raise HookError(
            f"hook {state.hook.name!r} gives activations of shape {tuple(x.shape)} but the SAE reads vectors of "
            f"width d_in={d_in} as [S, T, D]{hint}. Splice it at a hook of that width."
        )


def _hook_fn(state: SpliceState) -> Callable[[Tensor], Tensor | None]:
    sp = state.splice

    def fn(x_STD: Tensor) -> Tensor | None:
        _check_width(state, x_STD)
        state.calls += 1
        state.extras = {}
        W_dec_FD = sp.sae.W_dec
        S, T, D = x_STD.shape
        f_STF = sp.sae.encode(x_STD.reshape(S * T, D).to(W_dec_FD.dtype)).reshape(S, T, -1)
        if sp.record:
            state.f_STF = f_STF
        if not sp.edits and not (sp.track and torch.is_grad_enabled()):
            return None  # transparent: keep x bit for bit
        # Edits act on detached latents: the splice is the identity in x, so gradients through the
        # hook stay those of the clean model (the error term absorbs the SAE's own Jacobian).
        f0_STF = f_STF.detach()
        f1_STF = f0_STF
        for edit in sp.edits:
            f1_STF = edit(f1_STF, state)
        if sp.track and torch.is_grad_enabled():
            state.delta_STF = torch.zeros_like(f0_STF, requires_grad=True)
            f1_STF = f1_STF + state.delta_STF
        delta_STD = (f1_STF - f0_STF) @ W_dec_FD
        return x_STD + delta_STD.to(x_STD.dtype)

    return fn


@contextmanager
def spliced(model: Any, splices: Sequence[Splice] | Splice) -> Iterator[list[SpliceState]]:
    """Splice SAEs in at hooks for the duration of the block; yields one ``SpliceState`` per splice.

    ``model`` is an HF causal LM or a ``LoadedModel``. Hooks are always removed on exit.
    """
    if isinstance(splices, Splice):
        splices = [splices]
    states = [SpliceState(sp, resolve_hook(model, sp.hook)) for sp in splices]
    handles = []
    try:
        for state in states:
            handles.append(state.hook.register(_hook_fn(state)))
        yield states
    finally:
        for handle in handles:
            handle.remove()
