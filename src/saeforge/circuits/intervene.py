"""Interventions on feature nodes of one prompt's graph: zero, clamp or scale them, measure and predict the logits.

For each edit, the change of each of the graph's logit nodes (input = logit minus the mean logit, as in the graph)
is given four ways:

- ``predicted``: from the graph's direct edges. An edge is A[t, s] = a_s * dt/da_s in the frozen linear model,
  and t is affine in a_s with every other node held, so setting a_s to a_s' changes t by exactly
  A[t, s] * (a_s' - a_s) / a_s (summed over the edited features: the model is affine in all of them at once);
- ``replacement_direct``: the frozen replacement model (errors, attention patterns, norm scales and every other
  feature's activation held at their values on the prompt) run with the new activations. It equals
  ``predicted`` up to float rounding: the test checks it;
- ``replacement_total``: the same frozen model, but downstream features respond: gates frozen (the active set
  is the prompt's), each unedited active feature's activation moves by the change of its encoder
  pre-activation (slope 1, as ReLU / TopK / JumpReLU have on their active side). Errors stay frozen. This is
  the sum over all paths, (A + A^2 + ...) in the graph's terms, not only the direct edges;
- ``real``: the real model, its transcoders spliced in at the MLPs keeping their error term (as
  analysis/splice.py does for SAEs): at layer l the MLP's output gains (f' - f) @ W_dec for the edited
  features (for a cross-layer transcoder, every later layer's output gains its block's share), where f is
  the live encoding of that layer's real MLP input. Attention, norms, MLPs and every other feature respond.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saeforge.analysis.common import prompt_ids
from saeforge.circuits.graph import salient_logits
from saeforge.circuits.replacement import PromptState, ReplacementModel, _forward_hooks
from saeforge.config import UsageError

_SPEC = re.compile(r"^(\d+):(-?\d+):(\d+)=(zero|clamp:([-+0-9.eE]+)|scale:([-+0-9.eE]+))$")


class InterventionError(UsageError):
    """A feature spec that does not parse or names no active feature of the prompt."""


@dataclass(frozen=True)
class FeatureEdit:
    """Set feature ``index`` of layer ``layer`` at position ``pos`` to 0 (zero), ``value`` (clamp) or value * a (scale)."""

    layer: int
    pos: int
    index: int
    op: str
    value: float = 0.0

    def apply(self, a: Tensor | float) -> Tensor | float:
        if self.op == "zero":
            return a * 0.0
        if self.op == "clamp":
            return a * 0.0 + self.value
        return a * self.value


def parse_edit(spec: str) -> FeatureEdit:
    """``"L:POS:IDX=zero"``, ``"L:POS:IDX=clamp:V"`` or ``"L:POS:IDX=scale:S"`` (POS may be negative: from the end)."""
    m = _SPEC.match(spec.strip())
    try:
        if m:
            value = float(m[5] or m[6] or 0.0)
            return FeatureEdit(int(m[1]), int(m[2]), int(m[3]), m[4].split(":")[0], value)
    except ValueError:
        pass
    raise InterventionError(
        f"--feature {spec!r}: expected LAYER:POS:INDEX=zero, =clamp:VALUE or =scale:FACTOR, e.g. 1:3:17=zero"
    )


def _nodes(state: PromptState, edits: list[FeatureEdit]) -> list[int]:
    """The feature node of each edit; an inactive feature is refused (its edges are all zero: nothing to edit)."""
    T, out = state.n_pos, []
    for e in edits:
        pos = e.pos + T if e.pos < 0 else e.pos
        hit = ((state.layer_N == e.layer) & (state.pos_N == pos) & (state.idx_N == e.index)).nonzero().flatten()
        if not 0 <= pos < T or hit.numel() == 0:
            here = (state.layer_N == e.layer) & (state.pos_N == pos)
            active = state.idx_N[here].tolist()[:20]
            raise InterventionError(
                f"feature {e.layer}:{e.pos}:{e.index} is not active on this prompt ({T} positions); active there: "
                f"{active or 'none'}: pick a feature node of the graph"
            )
        out.append(int(hit[0]))
    return out


def _demeaned(logits_BV: Tensor, tokens_K: Tensor) -> Tensor:
    return logits_BV[:, tokens_K] - logits_BV.mean(-1, keepdim=True)


def _frozen_logits(rm: ReplacementModel, state: PromptState, acts_N: Tensor) -> tuple[Tensor, list[Tensor]]:
    e, _, err = rm.clean_inputs(state)
    with torch.no_grad():
        logits, mlp_in = rm.forward_linear(state, e.detach(), acts_N[None], err.detach())
    return logits[0, -1], mlp_in


def _all_pre(rm: ReplacementModel, state: PromptState, mlp_in: list[Tensor]) -> Tensor:
    return rm.feature_pre_acts(state, mlp_in, [(0, n) for n in range(state.act_N.shape[0])])


def _real_logits(rm: ReplacementModel, state: PromptState, edits: list[FeatureEdit]) -> Tensor:
    """Last-position logits of the real model with the edits spliced in at the MLP outputs, errors kept."""
    T = state.n_pos
    pending: dict[int, list[tuple[int, int, Tensor]]] = {}  # src layer -> [(pos, index, f' - f)]

    def hook(layer: int):
        def fn(module, args, out):
            x_TD = args[0][0]
            mine = [e for e in edits if e.layer == layer]
            if mine:
                f_TF = rm.mlps.encode(layer, x_TD)
                pending[layer] = []
                for e in mine:
                    pos = e.pos % T
                    a = f_TF[pos, e.index]
                    pending[layer].append((pos, e.index, e.apply(a) - a))
            y_1TD = out
            for src, items in pending.items():
                W_FD = rm.mlps.decoder(src, layer)
                if W_FD is None:
                    continue
                for pos, idx, d in items:
                    y_1TD = y_1TD.index_add(1, torch.tensor([pos], device=y_1TD.device), (d * W_FD[idx])[None, None])
            return y_1TD

        return fn

    with torch.no_grad(), _forward_hooks([(layer.mlp, hook(i)) for i, layer in enumerate(rm.layers)]):
        return rm.model(state.input_ids_T[None], use_cache=False).logits[0, -1]


def intervene(lm, transcoders, prompt: str, edits: list[FeatureEdit], max_n_logits: int = 10) -> dict[str, Any]:
    """Apply ``edits`` to one prompt; the graph's logit nodes' changes, predicted and measured (see the module)."""
    if not prompt.strip():
        raise UsageError("--prompt is empty: give the text whose next token the graph explains")
    if not edits:
        raise InterventionError("no --feature given: name at least one feature node to edit, e.g. 1:3:17=zero")
    rm = ReplacementModel(lm, transcoders)
    state = rm.prepare(prompt_ids(lm.tokenizer, prompt)[0])
    nodes = _nodes(state, edits)
    if len(set(nodes)) != len(nodes):
        raise InterventionError("a feature is named twice: give each feature node one edit")
    tokens_K, probs_K = salient_logits(state.logits_TV[-1], max_n_logits)
    K = tokens_K.shape[0]
    act_N = state.act_N
    new_N = act_N.clone()
    for e, n in zip(edits, nodes, strict=True):
        new_N[n] = e.apply(act_N[n])

    # the graph's logit rows: A[k, s] = a_s * d(logit k input)/d(a_s), one copy of the prompt per logit node
    emb, a_KN, err = rm.clean_inputs(state, K)
    logits_KTV, _ = rm.forward_linear(state, emb, a_KN, err)
    v_K = _demeaned(logits_KTV[:, -1], tokens_K).diagonal()
    (grad_KN,) = torch.autograd.grad(v_K.sum(), [a_KN])
    A_KN = grad_KN * act_N
    sel = torch.tensor(nodes, device=act_N.device)
    predicted_K = (A_KN[:, sel] * ((new_N - act_N)[sel] / act_N[sel])).sum(1)

    clean_last, mlp_in0 = _frozen_logits(rm, state, act_N)
    clean_K = _demeaned(clean_last[None], tokens_K)[0]
    direct_last, _ = _frozen_logits(rm, state, new_N)
    # downstream features respond with gates frozen: iterate to the fixed point (one pass per layer suffices,
    # since a feature reads only earlier layers' outputs)
    pre0_N, acts = _all_pre(rm, state, mlp_in0), new_N
    for _ in range(rm.n_layers):
        total_last, mlp_in = _frozen_logits(rm, state, acts)
        acts = act_N + (_all_pre(rm, state, mlp_in) - pre0_N)
        acts[sel] = new_N[sel]
    total_last, _ = _frozen_logits(rm, state, acts)
    real_last = _real_logits(rm, state, edits)

    def change(last_V: Tensor) -> list[float]:
        return (_demeaned(last_V[None], tokens_K)[0] - clean_K).tolist()

    real_clean_K = _demeaned(state.logits_TV[-1][None], tokens_K)[0]
    real_change = (_demeaned(real_last[None], tokens_K)[0] - real_clean_K).tolist()
    cols = {
        "predicted": predicted_K.detach().tolist(),
        "replacement_direct": change(direct_last),
        "replacement_total": change(total_last),
        "real": real_change,
    }
    decode = lm.tokenizer.decode
    return {
        "prompt": prompt,
        "tokens": [decode([t]) for t in state.input_ids_T.tolist()],
        "edits": [
            {
                "layer": e.layer,
                "pos": int(state.pos_N[n]),
                "index": e.index,
                "op": e.op,
                "value": e.value,
                "activation": float(act_N[n]),
                "new_activation": float(new_N[n]),
            }
            for e, n in zip(edits, nodes, strict=True)
        ],  # fmt: skip
        "logits": [
            {
                "token_id": int(t),
                "token": decode([int(t)]),
                "prob": float(p),
                "value": float(clean_K[k]),
                **{name: col[k] for name, col in cols.items()},
            }
            for k, (t, p) in enumerate(zip(tokens_K.tolist(), probs_K.tolist(), strict=True))
        ],  # fmt: skip
    }
