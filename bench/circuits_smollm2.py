"""The local replacement model and an attribution graph on a real model: SmolLM2-135M (float32, sdpa).

Checks that freezing attention (q/k outputs) and RMSNorm scales with forward hooks, with transcoder MLPs
plus error nodes, reproduces the real logits on a 30-layer model, and times one graph. Transcoders are
a `saeforge transcoders` or `saeforge clt` folder (--transcoders DIR) or, by default, seeded random TopK transcoders
(exactness and cost do not depend on training; the scores do, so they are printed only for a real set).
Prints the graph's time, the process's peak RSS (resource.getrusage) and the load average (shared cores).
With trained transcoders it also prints the replacement and completeness scores and the graph's top paths:
from the most likely next token, the strongest kept incoming edge, node by node, until a token embedding,
an error node or a node with no kept input; "reaches the prompt" when it ends at an embedding. The second
path skips error nodes (the strongest edge from a feature or an embedding at each step).
Several --prompt options make several graphs in one run (the model and transcoders load once).
Run: .venv/bin/python bench/circuits_smollm2.py [--transcoders DIR] [--prompt TEXT ...| --prompt-tokens 16]
     [--batch-size N] [--max-feature-nodes N] [--k K] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

from saeforge.analysis.common import prompt_ids
from saeforge.circuits.formats import load_transcoder_folder
from saeforge.circuits.graph import attribute
from saeforge.circuits.prune import prune, scores
from saeforge.circuits.replacement import ReplacementModel
from saeforge.models import load_model
from saeforge.saes.registry import config_class, sae_class

LONG_TEXT = (
    "The capital of France is Paris, and the capital of Germany is Berlin. In the morning the market opens "
    "early, and the bakers bring bread, cheese and fruit from the villages around the city."
)


def random_set(n_layers: int, d: int, d_sae: int = 2048, k: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    saes = {}
    for layer in range(n_layers):
        cfg = config_class("topk")(d_in=d, d_sae=d_sae, k=k, d_out=d, apply_b_dec_to_input=False)
        sae = sae_class("topk")(cfg)
        sae.init_weights(g)
        sae.requires_grad_(False)
        saes[layer] = sae
    return saes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transcoders")
    ap.add_argument("--prompt", action="append", help="repeat for several graphs (default: the capital of France)")
    ap.add_argument("--prompt-tokens", type=int, help="cut a long fixed text to this many tokens (BOS included)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's; 1 can win on busy cores)")
    ap.add_argument("--k", type=int, default=4, help="active features per token of the random transcoders")
    ap.add_argument("--max-feature-nodes", type=int, help="rows for this many features only (default: all)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tset, model_name = None, "smollm2-135m"
    if args.transcoders:  # a `saeforge transcoders`, `saeforge clt` or circuit-tracer folder
        tset, model_name, _ = load_transcoder_folder(args.transcoders)
    lm = load_model(model_name, dtype="float32", device="cpu")
    rm = ReplacementModel(lm, tset or random_set(lm.n_layers, lm.d_model, k=args.k))
    prompts = [LONG_TEXT] if args.prompt_tokens else (args.prompt or ["The capital of France is"])
    for text in prompts:
        ids_T = prompt_ids(lm.tokenizer, text)[0]
        if args.prompt_tokens:
            ids_T = ids_T[: args.prompt_tokens]
        print(f"\n== {lm.tokenizer.decode(ids_T)!r}")
        one_graph(lm, rm, ids_T, args, tset is not None)


def node_label(g, n: int, tokenizer) -> str:
    if n < g.n_features:
        return f"feature L{int(g.layer_N[n])}@{int(g.pos_N[n])}#{int(g.idx_N[n])}"
    n -= g.n_features
    if n < g.n_errors:
        return f"error L{n // g.n_pos}@{n % g.n_pos}"
    n -= g.n_errors
    if n < g.n_pos:
        return f"embedding {tokenizer.decode(g.input_ids_T[n : n + 1])!r}@{n}"
    return f"logit {tokenizer.decode(g.logit_tokens_K[n - g.n_pos : n - g.n_pos + 1])!r}"


def top_path(g, edge_mask_nn, tokenizer, skip_errors: bool = False) -> tuple[list[str], bool]:
    """From the top logit, follow the strongest kept incoming edge until an embedding, error or dead end
    (``skip_errors``: the strongest edge from a feature or an embedding, so the path ends at an embedding
    or where no such edge is left)."""
    A = g.adjacency_nn * edge_mask_nn
    if skip_errors:
        A[:, g.n_features : g.n_features + g.n_errors] = 0.0
    n, path, seen = g.logit_index(0), [], set()
    while n not in seen:
        seen.add(n)
        path.append(
            f"{node_label(g, n, tokenizer)} ({float(g.value_n[n]):.3g})"
            if n < g.n_features
            else node_label(g, n, tokenizer)
        )
        if g.n_features <= n < g.embed_index(0) + g.n_pos:  # an error or embedding node has no inputs
            break
        row = A[n]
        if not bool((row > 0).any()):
            break
        n = int(row.argmax())
    return path, g.embed_index(0) <= n < g.embed_index(0) + g.n_pos


def one_graph(lm, rm, ids_T, args, trained: bool) -> None:
    state = rm.prepare(ids_T)
    e, a, err = rm.clean_inputs(state)
    with torch.no_grad():
        logits_BTV, _ = rm.forward_linear(state, e, a, err)
    diff = (logits_BTV[0] - state.logits_TV).abs().max().item()
    print(f"{lm.model.config._attn_implementation} attention, {rm.n_layers} layers, {ids_T.numel()} tokens")
    print(
        f"max |logit(replacement + errors) - logit(real)| = {diff:.3g} (logits up to {state.logits_TV.abs().max():.3g})"
    )
    t0 = time.perf_counter()
    g = attribute(rm, ids_T, batch_size=args.batch_size, max_feature_nodes=args.max_feature_nodes)
    dt = time.perf_counter() - t0
    print(
        f"graph: {int(g.visited_N.sum())} of {g.n_features} features + {g.n_logits} logits as targets "
        f"(batch {args.batch_size}, max_feature_nodes {args.max_feature_nodes}), {g.adjacency_nn.shape[0]} nodes, "
        f"{int((g.adjacency_nn != 0).sum())} non-zero edges, {dt:.1f} s"
    )
    p = prune(g.adjacency_nn, g.logit_weights(), g.n_features, g.n_pos + g.n_logits)
    print(f"pruned: {int(p.node_mask_n.sum())} nodes, {int(p.edge_mask_nn.sum())} edges")
    if trained:
        rep, comp = scores(g.adjacency_nn, g.logit_weights(), g.n_features, g.n_errors, g.n_pos)
        print(f"replacement score {rep:.3f}, completeness {comp:.3f}")
        top = lm.tokenizer.decode(g.logit_tokens_K[:1])
        print(f"top logit {top!r} (p = {float(g.logit_probs_K[0]):.3f})")
        for skip in (False, True):
            path, reaches = top_path(g, p.edge_mask_nn, lm.tokenizer, skip_errors=skip)
            print(f"  top path{' without error nodes' if skip else ''} "
                  f"{'reaches the prompt' if reaches else 'does not reach the prompt'}: " + " <- ".join(path))  # fmt: skip
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"total {time.perf_counter() - t0:.1f} s with pruning; peak RSS so far {peak_gb:.2f} GiB; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")  # fmt: skip


if __name__ == "__main__":
    main()
