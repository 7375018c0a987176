"""The graph JSON in circuit-tracer's layout (what its frontend and Neuronpedia's graph viewer read).

Fields as circuit-tracer's frontend models have them: ``metadata`` (slug, scan, transcoder_list,
prompt_tokens, prompt, node_threshold), ``qParams`` (empty pins and supernodes), ``nodes`` (node_id, feature,
layer as a string, ctx_idx, feature_type, token_prob, is_target_logit, run_idx, reverse_ctx_idx, jsNodeId,
clerp, influence, activation) and ``links`` ({source, target, weight}).

Node ids: a feature ``"{layer}_{feature}_{pos}"``, an embedding ``"E_{token id}_{pos}"``, a logit
``"{n_layers + 1}_{token id}_{pos}"``, as circuit-tracer. An error node is ``"{layer}_error_{pos}"``, our
choice: circuit-tracer's ``"0_{layer}_{pos}"`` is also the id of layer 0's feature number ``layer`` at that
position, so links could not tell the two apart. ``influence`` is circuit-tracer's cumulative score: the
share of total influence held by the nodes at least as influential as this one (the pruning keeps nodes
up to ``node_threshold`` of it). saeforge adds ``input_value`` to nodes (None for a feature whose row was not
computed) and ``scores``/``counts``/``batch_size``/``max_feature_nodes`` to the metadata; readers ignore keys
they do not know.
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
        out.append(_node(f"{layer}_{idx}_{pos}", idx, str(layer), pos, "cross layer transcoder",
                         f"{layer}_{idx}-0", activation=float(g.act_N[i])))  # fmt: skip
    for layer in range(L):
        for pos in range(T):
            out.append(
                _node(f"{layer}_error_{pos}", -1, str(layer), pos, "mlp reconstruction error", f"{layer}_{pos}-0")
            )
    for pos in range(T):
        tok = int(g.input_ids_T[pos])
        out.append(_node(f"E_{tok}_{pos}", pos, "E", pos, "embedding", f"E_{tok}-{pos}"))
    for k in range(g.n_logits):
        tok, prob = int(g.logit_tokens_K[k]), float(g.logit_probs_K[k])
        out.append(_node(f"{L + 1}_{tok}_{T - 1}", tok, str(L + 1), T - 1, "logit", f"L_{tok}-{T - 1}",
                         token_prob=prob, is_target_logit=k == 0, clerp=f'Output "{logit_texts[k]}" (p={prob:.3f})'))  # fmt: skip
    for i, rec in enumerate(out):
        rec["influence"] = float(p.cumulative_n[i])
        visited = i >= g.n_features or bool(g.visited_N[i])
        rec["input_value"] = float(g.value_n[i]) if _is_target(g, i) and visited else None
        rec["kept"] = bool(p.node_mask_n[i])
    return out


def _node(node_id: str, feature: int, layer: str, ctx_idx: int, feature_type: str, js_id: str, **extra) -> dict:
    rec = {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": ctx_idx, "feature_type": feature_type,
           "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": js_id,
           "clerp": "", "influence": None, "activation": None}  # fmt: skip
    rec.update(extra)
    return rec


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
    for r in kept:
        del r["kept"]
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": {"prompt_tokens": tokens, **meta}, "qParams": qparams, "nodes": kept, "links": links}


def build_graph_json(lm, transcoders, prompt: str, node_threshold: float = 0.8, edge_threshold: float = 0.98,
                     batch_size: int = 16, slug: str = "graph", folder: str = "",
                     max_feature_nodes: int | None = None) -> dict:  # fmt: skip
    """Prompt -> attribution graph -> pruned -> the JSON dict (``lm`` a LoadedModel in float32)."""
    if not prompt.strip():
        raise UsageError("--prompt is empty: give the text whose next token the graph should explain")
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0 < v <= 1:
            raise UsageError(f"--{name.replace('_', '-')} {v}: expected a fraction in (0, 1]")
    rm = ReplacementModel(lm, transcoders)
    ids_T = prompt_ids(lm.tokenizer, prompt)[0]
    g = attribute(rm, ids_T, batch_size=batch_size, max_feature_nodes=max_feature_nodes)
    w = g.logit_weights()
    p = prune(g.adjacency_nn, w, g.n_features, g.n_pos + g.n_logits, node_threshold, edge_threshold)
    replacement, completeness = scores(g.adjacency_nn, w, g.n_features, g.n_errors, g.n_pos)
    pruned_replacement, pruned_completeness = scores(
        g.adjacency_nn * p.edge_mask_nn, w, g.n_features, g.n_errors, g.n_pos
    )
    tokens = [lm.tokenizer.decode([t]) for t in g.input_ids_T.tolist()]
    logit_texts = [lm.tokenizer.decode([t]) for t in g.logit_tokens_K.tolist()]
    meta = {
        "slug": slug,
        "scan": lm.name,
        "transcoder_list": [str(folder)] if folder else [],
        "prompt": prompt,
        "node_threshold": node_threshold,
        "schema_version": SCHEMA_VERSION,
        "edge_threshold": edge_threshold,
        "batch_size": batch_size,
        "max_feature_nodes": max_feature_nodes,
        "scores": {
            "replacement": replacement,
            "completeness": completeness,
            "pruned_replacement": pruned_replacement,
            "pruned_completeness": pruned_completeness,
        },
        "counts": {
            "features": g.n_features,
            "visited_features": int(g.visited_N.sum()),
            "errors": g.n_errors,
            "embeddings": g.n_pos,
            "logits": g.n_logits,
            "kept_nodes": int(p.node_mask_n.sum()),
            "kept_links": int(p.edge_mask_nn.sum()),
        },
        "generator": "saeforge",
    }
    return graph_json(g, p, meta, tokens, logit_texts)
