"""Attribution graphs of one prompt through the local replacement model (circuits/replacement.py).

Nodes, in this order (circuit-tracer's): active features (layer, position, index), error nodes (layer-major,
one per layer and position), token embeddings (one per position), logits (the top tokens at the last
position until their probabilities sum to 0.95, at most 10).

Edge ``A[t, s]`` (row = target, column = source) = a_s * d(input of t) / d(a_s) in the frozen linear model,
where a_s is the source's activation (1 for an embedding or error node, whose output is its vector: the
edge is then grad . vector). The input of a feature is its encoder pre-activation; of a logit node, its
logit minus the mean logit. Because the frozen model is affine, a target's input is exactly the sum of
its row plus a bias (b_enc and the transcoders' b_dec carried forward), which ``bias_N`` holds.

Each target needs one backward pass; they are batched as circuit-tracer does: ONE forward of ``batch_size``
copies of the prompt (the node values are leaves), the autograd graph kept, then per batch of targets one
``autograd.grad`` of the sum of its targets' values, target i read from copy i (grads are returned, not
accumulated, so the leaves serve every batch). A feature at layer l depends on layers < l only: autograd
walks that much, and features are numbered layer-major, so low-layer batches are cheap. The LM head runs at
the last position only.

``max_feature_nodes`` (circuit-tracer's option): rows are computed for the logits first, then for features
in order of their influence on the logits as far as the rows computed so far show it
(prune.partial_influence, recomputed every ``update_interval`` batches), until that many features have a row.
A feature without a row (``visited_N`` False) is still a node and a source: its edges into computed rows are
exact, its own row is empty and its value 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saeforge.circuits.prune import partial_influence
from saeforge.circuits.replacement import PromptState, ReplacementModel
from saeforge.config import UsageError


@dataclass
class Graph:
    """An attribution graph. n = nodes; N features, L layers, T positions, K logits."""

    input_ids_T: Tensor
    layer_N: Tensor
    pos_N: Tensor
    idx_N: Tensor
    act_N: Tensor
    n_layers: int
    logit_tokens_K: Tensor
    logit_probs_K: Tensor
    adjacency_nn: Tensor  # [target, source]
    value_n: Tensor  # each node's input in the clean linear model (features: pre-activation; logits: demeaned)
    bias_n: Tensor  # value - row sum: the part no node explains (zero for embedding and error rows)
    visited_N: Tensor  # bool per feature: its row was computed (all True unless max_feature_nodes cut it)
    max_feature_nodes: int | None = None  # the cap attribute() ran with (None: every feature)

    @property
    def n_features(self) -> int:
        return int(self.act_N.shape[0])

    @property
    def n_pos(self) -> int:
        return int(self.input_ids_T.shape[0])

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens_K.shape[0])

    def error_index(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    def embed_index(self, pos: int) -> int:
        return self.n_features + self.n_errors + pos

    def logit_index(self, k: int) -> int:
        return self.n_features + self.n_errors + self.n_pos + k

    def logit_weights(self) -> Tensor:
        """Per node: the logit's probability on logit nodes, 0 elsewhere (the weights influence starts from)."""
        w = torch.zeros(self.adjacency_nn.shape[0], dtype=self.adjacency_nn.dtype)
        w[-self.n_logits :] = self.logit_probs_K.to(w.dtype)
        return w


def salient_logits(logits_V: Tensor, max_n_logits: int = 10, desired_prob: float = 0.95) -> tuple[Tensor, Tensor]:
    """(token ids, probabilities) of the most likely tokens until their probabilities reach ``desired_prob``."""
    probs_V = torch.softmax(logits_V.float(), dim=-1)
    top_p, top_idx = probs_V.topk(min(max_n_logits, probs_V.shape[0]))
    cutoff = int((top_p.cumsum(0) < desired_prob).sum()) + 1  # the first token reaching it is kept
    return top_idx[:cutoff], top_p[:cutoff]


def target_values(rm: ReplacementModel, state: PromptState, logits_BTV: Tensor, mlp_in: list[Tensor],
                  rows: list[tuple[int, int]], logit_tokens_K: Tensor, n_features: int) -> Tensor:  # fmt: skip
    """Inputs of target nodes; ``rows`` = [(batch row, node)] with nodes numbered features first, then logits."""
    feat_rows = [(b, t) for b, t in rows if t < n_features]
    feats = rm.feature_pre_acts(state, mlp_in, feat_rows)
    out, fi = [], 0
    for b, t in rows:
        if t < n_features:
            out.append(feats[fi])
            fi += 1
        else:
            last_V = logits_BTV[b, -1]
            out.append(last_V[logit_tokens_K[t - n_features]] - last_V.mean())
    return torch.stack(out)


def attribute(
    rm: ReplacementModel,
    input_ids_T: Tensor,
    batch_size: int = 16,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int | None = None,
    update_interval: int = 4,
) -> Graph:
    """The attribution graph of one prompt: every feature's row, or the ``max_feature_nodes`` most influential."""
    if batch_size < 1:
        raise UsageError(f"batch_size {batch_size}: expected at least 1")
    if max_feature_nodes is not None and max_feature_nodes < 0:
        raise UsageError(f"max_feature_nodes {max_feature_nodes}: expected 0 or more (or None for every feature)")
    state = rm.prepare(input_ids_T)
    N, L, T = state.act_N.shape[0], rm.n_layers, state.n_pos
    logit_tokens_K, logit_probs_K = salient_logits(state.logits_TV[-1], max_n_logits, desired_logit_prob)
    K = logit_tokens_K.shape[0]
    n = N + L * T + T + K
    A = torch.zeros(n, n)
    value = torch.zeros(n)
    B = min(batch_size, max(N, K))
    leaves = rm.clean_inputs(state, B)
    e_BTD, a_BN, err_BLTD = leaves
    logits_B1V, mlp_in = rm.forward_linear(state, e_BTD, a_BN, err_BLTD, last_logits_only=True)

    def run(chunk: list[int]) -> None:
        """Rows of targets ``chunk`` (features 0..N-1, logits N..N+K-1), one backward over the kept forward."""
        m = len(chunk)
        v = target_values(rm, state, logits_B1V, mlp_in, list(enumerate(chunk)), logit_tokens_K, N)
        # a layer-0 target depends on no feature and no error node: those gradients are zeros
        g_e, g_a, g_err = torch.autograd.grad(
            v.sum(), leaves, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        with torch.no_grad():
            edges = torch.cat(
                [g_a[:m] * a_BN[:m], (g_err[:m] * err_BLTD[:m]).sum(-1).flatten(1), (g_e[:m] * e_BTD[:m]).sum(-1)],
                dim=1,
            )
            node = [t if t < N else t + L * T + T for t in chunk]
            A[node, : N + L * T + T] = edges.float().cpu()
            value[node] = v.detach().float().cpu()

    logit_targets = list(range(N, N + K))
    for start in range(0, K, B):
        run(logit_targets[start : start + B])
    visited = torch.zeros(N, dtype=torch.bool)
    cap = N if max_feature_nodes is None else min(max_feature_nodes, N)
    w = torch.zeros(n)
    w[-K:] = logit_probs_K.float().cpu()
    while int(visited.sum()) < cap:
        if cap == N:
            chosen = torch.arange(N)  # all of them: no ranking needed
        else:
            known = torch.cat([visited.nonzero().flatten(), torch.arange(n - K, n)])
            inf_N = partial_influence(A, known, w)[:N]
            inf_N[visited] = -1.0  # influence is >= 0: visited features rank last
            order = inf_N.sort(descending=True, stable=True).indices  # ties: the lower node first
            chosen = order[: min(B * update_interval, cap - int(visited.sum()))].sort().values
        # layer-major within the group: a batch's backward reaches only its highest layer
        for start in range(0, chosen.numel(), B):
            run(chosen[start : start + B].tolist())
        visited[chosen] = True
    bias = torch.zeros(n)
    bias[:N] = value[:N] - A[:N].sum(1)
    bias[-K:] = value[-K:] - A[-K:].sum(1)
    return Graph(
        state.input_ids_T.cpu(), state.layer_N.cpu(), state.pos_N.cpu(), state.idx_N.cpu(), state.act_N.cpu(),
        L, logit_tokens_K.cpu(), logit_probs_K.cpu(), A, value, bias, visited, max_feature_nodes,
    )  # fmt: skip
