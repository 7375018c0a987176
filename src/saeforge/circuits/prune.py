"""Influence, pruning and the graph scores: small pure functions of one adjacency matrix (circuit-tracer's graph.py).

``A[t, s]`` is the edge from source s to target t. Nodes are ordered features, errors, embeddings, logits
(circuits/graph.py), so A is strictly lower-triangular up to that order's ties and A's powers vanish.

- normalise: |A| with each row divided by its sum (rows without inputs stay zero);
- influence of node s = sum over logits of probability x (A + A^2 + A^3 + ...)[logit, s], summed until a
  term is exactly zero (A is nilpotent, so the series is finite); ``influence_solve`` gets the same from
  the inverse, w (I - A)^{-1} - w, and is the reference the tests compare with;
- prune: keep the nodes holding ``node_threshold`` of the total influence (embeddings and logits always),
  then the edges holding ``edge_threshold`` of the edge influence among them, then repeatedly drop
  feature and error nodes left without an outgoing edge and features without an incoming one;
- replacement score = embedding influence / (embedding + error influence);
- completeness score = mean over nodes, weighted by (influence + logit weight), of the non-error share of
  each node's normalised inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def normalize(A_nn: Tensor) -> Tensor:
    """|A| with rows summing to 1 (rows of zeros stay zero)."""
    a = A_nn.abs()
    return a / a.sum(dim=1, keepdim=True).clamp(min=1e-10)


def influence(A_nn: Tensor, weights_n: Tensor, max_terms: int = 10_000) -> Tensor:
    """w (A + A^2 + ...) for a nilpotent A, summed term by term until a term is exactly zero.

    A graph's A is strictly triangular in its node order, so the terms vanish exactly after the longest
    path (a few times the layer count): O(depth x n^2), cheaper than the O(n^3) solve for big graphs.
    """
    term = weights_n @ A_nn
    total = term.clone()
    for _ in range(max_terms):
        term = term @ A_nn
        if not term.any():
            return total
        total += term
    raise ValueError("A is not nilpotent: the influence series did not end (is the graph acyclic?)")


def partial_influence(A_nn: Tensor, rows: Tensor, weights_n: Tensor, max_terms: int = 10_000) -> Tensor:
    """``influence(normalize(A'), w)`` where A' keeps only the rows ``rows`` of A (the others taken as empty).

    What the rows computed so far say of each node's influence on the logits (circuit-tracer's
    compute_partial_influences): attribute() ranks the features still without a row by it. Works on the
    [rows, n] block only, so it costs O(depth x rows x n), not n^2. ``rows`` must hold every node with a weight.
    """
    M_rn = normalize(A_nn[rows])
    term = weights_n
    total = torch.zeros_like(weights_n)
    for _ in range(max_terms):
        term = term[rows] @ M_rn
        if not term.any():
            return total
        total += term
    raise ValueError("A is not nilpotent: the influence series did not end (is the graph acyclic?)")


def influence_solve(A_nn: Tensor, weights_n: Tensor) -> Tensor:
    """The same as a matrix inverse, the reference: solve x (I - A) = w A in float64."""
    A = A_nn.double()
    eye = torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
    rhs = weights_n.double() @ A
    return torch.linalg.solve(eye - A, rhs[None], left=False)[0].to(A_nn.dtype)


def cutoff(scores: Tensor, fraction: float) -> Tensor:
    """The smallest score among the highest ones whose sum first reaches ``fraction`` of the total."""
    s = scores.flatten().sort(descending=True).values
    cum = s.cumsum(0) / s.sum().clamp(min=1e-30)
    i = min(int((cum < fraction).sum()), s.numel() - 1)  # searchsorted's left index, on any device
    return s[i]


@dataclass
class Pruned:
    node_mask_n: Tensor  # after the influence threshold and the clean-up
    edge_mask_nn: Tensor
    node_influence_n: Tensor  # on the full normalised graph
    threshold_node_mask_n: Tensor  # the influence threshold alone (before dropping dangling nodes)
    threshold_edge_mask_nn: Tensor  # the edge threshold alone
    edge_scores_nn: Tensor
    cumulative_n: Tensor  # share of total influence held by the nodes at least as influential (circuit-tracer's)


def prune(A_nn: Tensor, weights_n: Tensor, n_features: int, n_always: int,
          node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:  # fmt: skip
    """Prune as circuit-tracer does. ``n_always``: the trailing nodes (embeddings + logits) that are always kept."""
    node_inf = influence(normalize(A_nn), weights_n)
    node_mask = node_inf >= cutoff(node_inf, node_threshold)
    node_mask[-n_always:] = True
    threshold_nodes = node_mask.clone()
    pruned = A_nn.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    norm = normalize(pruned)
    edge_scores = norm * (influence(norm, weights_n) + weights_n)[:, None]
    edge_mask = edge_scores >= cutoff(edge_scores, edge_threshold)
    edge_mask &= edge_scores > 0
    threshold_edges = edge_mask.clone()
    inner = slice(0, A_nn.shape[0] - n_always)  # features and errors
    while True:
        old = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[inner] &= edge_mask[:, inner].any(0)  # it feeds something kept
        node_mask[:n_features] &= edge_mask[:n_features].any(1)  # a feature is fed by something kept
        if torch.equal(old, node_mask):
            break
    sorted_inf, order = node_inf.sort(descending=True)
    cumulative = torch.empty_like(node_inf)
    cumulative[order] = sorted_inf.cumsum(0) / sorted_inf.sum().clamp(min=1e-30)
    return Pruned(node_mask, edge_mask, node_inf, threshold_nodes, threshold_edges, edge_scores, cumulative)


def scores(A_nn: Tensor, weights_n: Tensor, n_features: int, n_errors: int, n_embeds: int) -> tuple[float, float]:
    """(replacement score, completeness score) of a graph ordered features, errors, embeddings, logits."""
    norm = normalize(A_nn)
    node_inf = influence(norm, weights_n)
    errors = slice(n_features, n_features + n_errors)
    embeds = slice(n_features + n_errors, n_features + n_errors + n_embeds)
    tok, err = node_inf[embeds].sum(), node_inf[errors].sum()
    replacement = tok / (tok + err)
    non_error = 1 - norm[:, errors].sum(1)  # rows without inputs (embeddings, errors) count as 1
    w = node_inf + weights_n
    completeness = (non_error * w).sum() / w.sum()
    return float(replacement), float(completeness)
