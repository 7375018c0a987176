"""Steering: add a feature's decoder direction, or clamp a feature, while the LM runs or generates.

Units: ``alpha`` is in latent units. Adding alpha to feature i's activation adds alpha * W_dec[i]
to the residual (the error term keeps the rest of x), so alpha = 8 means "as if the feature fired 8
more", whatever the decoder row's norm (SAELens and Neuronpedia steer the same way). ``clamp``
sets the activation to a value, which changes x by (value - f_i) * W_dec[i].

Positions, per forward call:
- ``all``: every position;
- ``last``: the last position of each call. Generation runs with the KV cache, so this is the
  prompt's last token and then every generated token (each is the last of its decoding step);
- ``fires:N`` / ``fires:N>T``: only where feature N of the same SAE is active (> T, default 0),
  judged on the unedited latents, e.g. steer only on tokens where a "name" feature fires.
``all`` includes position 0 (BOS), whose SAE latents are meaningless; an add there is harmless
next to its huge norm, but prefer ``last`` or a condition when clamping.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saeforge.analysis.common import prompt_ids
from saeforge.analysis.splice import Edit, Splice, SpliceState, check_feature, sae_hook_name, spliced
from saeforge.config import F, UsageError
from saeforge.models import hf_model
from saeforge.models.hooks import model_device

_FIRES_RE = re.compile(r"^fires:(\d+)(?:>(-?[0-9.eE+-]+))?$")


@dataclass
class Steer:
    """One feature edit. Several ``Steer``s at once are applied together (each sees the unedited latents)."""

    feature: int = F(0, "Latent index to steer.")
    alpha: float = F(0.0, "Add alpha * W_dec[feature]: raise the feature's activation by alpha (latent units).")
    clamp: float | None = F(None, "Set the feature's activation to this value instead of adding alpha.")
    positions: str = F("all", "Where: 'all', 'last', or 'fires:N' / 'fires:N>T' (where feature N is > T).")

    def __post_init__(self) -> None:
        if self.positions not in ("all", "last") and not _FIRES_RE.match(self.positions):
            raise UsageError(
                f"positions={self.positions!r}: expected 'all', 'last', 'fires:N' or 'fires:N>T' "
                "(e.g. 'fires:123' or 'fires:123>0.5')"
            )
        if self.clamp is not None and self.alpha != 0:
            raise UsageError(
                f"feature {self.feature}: give alpha or clamp, not both (alpha={self.alpha}, clamp={self.clamp})"
            )


def positions_mask_ST(f_STF: Tensor, positions: str, sae: Any) -> Tensor:
    """Bool [S, T]: where an edit applies, from the unedited latents of this forward call."""
    S, T, _ = f_STF.shape
    if positions == "all":
        return torch.ones(S, T, dtype=torch.bool, device=f_STF.device)
    if positions == "last":
        mask = torch.zeros(S, T, dtype=torch.bool, device=f_STF.device)
        mask[:, -1] = True
        return mask
    m = _FIRES_RE.match(positions)
    cond = check_feature(sae, int(m.group(1)))
    return f_STF[:, :, cond] > float(m.group(2) or 0.0)


def steer_edit(sae: Any, steers: Sequence[Steer]) -> Edit:
    """An ``Edit`` applying every steer; feature indices and conditions are checked now, not mid-forward."""
    steers = list(steers)
    for s in steers:
        check_feature(sae, s.feature)
        positions_mask_ST(sae.W_dec.new_zeros(1, 1, sae.W_dec.shape[0]), s.positions, sae)  # validates fires:N

    def edit(f_STF: Tensor, state: SpliceState) -> Tensor:
        out_STF = f_STF.clone()
        for s in steers:
            mask_ST = positions_mask_ST(f_STF, s.positions, sae)
            col_ST = out_STF[:, :, s.feature]
            new_ST = torch.full_like(col_ST, s.clamp) if s.clamp is not None else col_ST + s.alpha
            out_STF[:, :, s.feature] = torch.where(mask_ST, new_ST, col_ST)
        return out_STF

    return edit


@dataclass
class SteerResult:
    prompt: str
    clean: str  # generated continuation (prompt not included) without the edit
    steered: str  # the same with the edit
    steers: list[Steer]


def generate(
    lm: Any,
    prompt: str,
    splices: Sequence[Splice] = (),
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    prepend_bos: bool = True,
) -> str:
    """The continuation of ``prompt`` (greedy at temperature 0, else sampled from ``seed``) with splices active."""
    tok = lm.tokenizer
    ids_1T = prompt_ids(tok, prompt, prepend_bos, model_device(lm))
    kwargs: dict[str, Any] = dict(
        do_sample=temperature > 0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    else:  # silence the model's own sampling defaults (generation_config) under greedy decoding
        kwargs.update(temperature=None, top_k=None, top_p=None)
    torch.manual_seed(seed)
    with spliced(lm, list(splices)), torch.no_grad():
        out = hf_model(lm).generate(input_ids=ids_1T, attention_mask=torch.ones_like(ids_1T), **kwargs)
    return tok.decode(out[0, ids_1T.shape[1] :], skip_special_tokens=True)


def steer_generate(
    lm: Any,
    sae: Any,
    feature: int | Sequence[Steer],
    alpha: float = 0.0,
    prompt: str = "",
    *,
    hook: str | None = None,
    clamp: float | None = None,
    positions: str = "all",
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
) -> SteerResult:
    """Generations of ``prompt`` without and with steering ``feature`` by ``alpha`` (the viewer's panel).

    ``feature`` may instead be a list of ``Steer`` to apply several at once (then alpha/clamp/positions
    are ignored). ``hook`` defaults to the SAE's own (``sae.hook_name``, set by ``load_for_analysis``).
    """
    steers = list(feature) if isinstance(feature, (list, tuple)) else [Steer(int(feature), alpha, clamp, positions)]
    hook = hook or sae_hook_name(sae)
    if hook is None:
        raise UsageError("steer_generate: pass hook= (this SAE does not know its hook; load it with load_for_analysis)")
    splice = Splice(sae, hook, edits=[steer_edit(sae, steers)])
    common = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    clean = generate(lm, prompt, (), **common)
    steered = generate(lm, prompt, [splice], **common)
    return SteerResult(prompt, clean, steered, steers)


def steered_logits(
    lm: Any, sae: Any, hook: str, steers: Sequence[Steer], input_ids_ST: Tensor
) -> tuple[Tensor, Tensor]:
    """(clean logits STV, steered logits STV) for one forward over ``input_ids_ST``."""
    model = hf_model(lm)
    input_ids_ST = input_ids_ST.to(model_device(lm))
    with torch.no_grad():
        clean_STV = model(input_ids=input_ids_ST, use_cache=False).logits
        with spliced(lm, Splice(sae, hook, edits=[steer_edit(sae, steers)])):
            steered_STV = model(input_ids=input_ids_ST, use_cache=False).logits
    return clean_STV, steered_STV
