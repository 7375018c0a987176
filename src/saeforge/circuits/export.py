"""The graph JSON: circuit-tracer-style nodes and links (the shape Neuronpedia's graph viewer reads).

Node ids follow circuit-tracer's scheme where we know it: a feature ``"{layer}_{feature}_{pos}"``, an
embedding ``"E_{token id}_{pos}"``, a logit ``"{n_layers + 1}_{token id}_{pos}"``; error nodes are
``"{layer}_error_{pos}"`` (our choice). ``feature_type`` is "cross layer transcoder" (circuit-tracer's label
for any transcoder feature), "mlp reconstruction error", "embedding" or "logit". Links are
``{"source", "target", "weight"}``. saeforge's own fields (scores, thresholds, values) sit in
``metadata`` and in extra node keys; viewers ignore keys they do not know.
"""

from __future__ import annotations

from typing import Any

from saeforge.analysis.common import prompt_ids
from saeforge.circuits.graph import Graph, attribute
from saeforge.circuits.prune import Pruned, prune, scores
from saeforge.circuits.replacement import ReplacementModel
from saeforge.config import UsageError

SCHEMA_VERSION = 1


def node_records(g: Graph, tokens: list[str], logit_texts: list[str], p: Pruned) -> list[dict[str, Any]]:
    """One dict per node (kept or not: ``kept`` says); index i of the list is node i of the adjacency."""
    T, L = g.n_pos, g.n_layers
    out = []
    for i in range(g.n_features):
        layer, pos, idx = int(g.layer_N[i]), int(g.pos_N[i]), int(g.idx_N[i])
        out.append({"node_id": f"{layer}_{idx}_{pos}", "feature": idx, "layer": str(layer), "ctx_idx": pos,
                    "feature_type": "cross layer transcoder", "activation": float(g.act_N[i])})  # fmt: skip
    for layer in range(L):
        for pos in range(T):
            out.append({"node_id": f"{layer}_error_{pos}", "feature": None, "layer": str(layer), "ctx_idx": pos,
                        "feature_type": "mlp reconstruction error", "activation": None})  # fmt: skip
    for pos in range(T):
        tok = int(g.input_ids_T[pos])
        out.append({"node_id": f"E_{tok}_{pos}", "feature": pos, "layer": "E", "ctx_idx": pos,
                    "feature_type": "embedding", "activation": None, "clerp": f"Emb: {tokens[pos]!r}"})  # fmt: skip
    for k in range(g.n_logits):
        tok, prob = int(g.logit_tokens_K[k]), float(g.logit_probs_K[k])
        out.append({"node_id": f"{L + 1}_{tok}_{T - 1}", "feature": tok, "layer": str(L + 1), "ctx_idx": T - 1,
                    "feature_type": "logit", "token_prob": prob, "is_target_logit": k == 0,
                    "activation": None, "clerp": f"Output {logit_texts[k]!r} (p={prob:.3f})"})  # fmt: skip
    for i, rec in enumerate(out):
        rec["influence"] = float(p.node_influence_n[i])
        rec["input_value"] = float(g.value_n[i]) if _is_target(g, i) else None
        rec["kept"] = bool(p.node_mask_n[i])
    return out


def _is_target(g: Graph, i: int) -> bool:
    return i < g.n_features or i >= g.n_features + g.n_errors + g.n_pos


def graph_json(g: Graph, p: Pruned, meta: dict[str, Any], tokens: list[str], logit_texts: list[str]) -> dict:
    """The whole file: metadata, kept nodes, kept links."""
    nodes = node_records(g, tokens, logit_texts, p)
    kept = [r for r in nodes if r["kept"]]
    t_idx, s_idx = p.edge_mask_nn.nonzero(as_tuple=True)
    links = [
        {"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(g.adjacency_nn[t, s])}
        for t, s in zip(t_idx.tolist(), s_idx.tolist(), strict=True)
    ]
    return {"metadata": {"schema_version": SCHEMA_VERSION, "prompt_tokens": tokens, **meta}, "nodes": kept,
            "links": links}  # fmt: skip


def build_graph_json(lm, transcoders, prompt: str, node_threshold: float = 0.8, edge_threshold: float = 0.98,
                     batch_size: int = 16) -> dict:  # fmt: skip
    """Prompt -> attribution graph -> pruned -> the JSON dict (``lm`` a LoadedModel in float32)."""
    if not prompt.strip():
        raise UsageError("--prompt is empty: give the text whose next token the graph should explain")
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0 < v <= 1:
            raise UsageError(f"--{name.replace('_', '-')} {v}: expected a fraction in (0, 1]")
    rm = ReplacementModel(lm, transcoders)
    ids_T = prompt_ids(lm.tokenizer, prompt)[0]
    g = attribute(rm, ids_T, batch_size=batch_size)
    w = g.logit_weights()
    p = prune(g.adjacency_nn, w, g.n_features, g.n_pos + g.n_logits, node_threshold, edge_threshold)
    replacement, completeness = scores(g.adjacency_nn, w, g.n_features, g.n_errors, g.n_pos)
    pruned_replacement, pruned_completeness = scores(
        g.adjacency_nn * p.edge_mask_nn, w, g.n_features, g.n_errors, g.n_pos
    )
    tokens = [lm.tokenizer.decode([t]) for t in g.input_ids_T.tolist()]
    logit_texts = [lm.tokenizer.decode([t]) for t in g.logit_tokens_K.tolist()]
    meta = {
        "prompt": prompt,
        "scan": transcoders.model_name if hasattr(transcoders, "model_name") else lm.name,
        "transcoders": str(getattr(transcoders, "folder", "")),
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
        "scores": {
            "replacement": replacement,
            "completeness": completeness,
            "pruned_replacement": pruned_replacement,
            "pruned_completeness": pruned_completeness,
        },
        "counts": {
            "features": g.n_features,
            "errors": g.n_errors,
            "embeddings": g.n_pos,
            "logits": g.n_logits,
            "kept_nodes": int(p.node_mask_n.sum()),
            "kept_links": int(p.edge_mask_nn.sum()),
        },
        "generator": "saeforge",
    }
    return graph_json(g, p, meta, tokens, logit_texts)
