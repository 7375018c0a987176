"""The local replacement model and an attribution graph on a real model: SmolLM2-135M (float32, sdpa).

Checks that freezing attention (q/k outputs) and RMSNorm scales with forward hooks, with transcoder MLPs
plus error nodes, reproduces the real logits on a 30-layer model, and times one graph. Transcoders are
a `saeforge transcoders` folder (--transcoders DIR) or, by default, seeded random TopK transcoders
(exactness and cost do not depend on training; the scores do, so they are printed only for a real set).
Prints the graph's time, the process's peak RSS (resource.getrusage) and the load average (shared cores).
Run: .venv/bin/python bench/circuits_smollm2.py [--transcoders DIR] [--prompt TEXT | --prompt-tokens 16]
     [--batch-size N] [--max-feature-nodes N] [--k K] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

from saeforge.analysis.common import prompt_ids
from saeforge.circuits.graph import attribute
from saeforge.circuits.prune import prune, scores
from saeforge.circuits.replacement import ReplacementModel
from saeforge.circuits.transcoders import load_transcoders
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
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--prompt-tokens", type=int, help="cut a long fixed text to this many tokens (BOS included)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's; 1 can win on busy cores)")
    ap.add_argument("--k", type=int, default=4, help="active features per token of the random transcoders")
    ap.add_argument("--max-feature-nodes", type=int, help="rows for this many features only (default: all)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tset = load_transcoders(args.transcoders) if args.transcoders else None
    lm = load_model(tset.model_name if tset else "smollm2-135m", dtype="float32", device="cpu")
    rm = ReplacementModel(lm, tset or random_set(lm.n_layers, lm.d_model, k=args.k))
    ids_T = prompt_ids(lm.tokenizer, LONG_TEXT if args.prompt_tokens else args.prompt)[0]
    if args.prompt_tokens:
        ids_T = ids_T[: args.prompt_tokens]
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
        f"{dt:.1f} s"
    )
    p = prune(g.adjacency_nn, g.logit_weights(), g.n_features, g.n_pos + g.n_logits)
    print(f"pruned: {int(p.node_mask_n.sum())} nodes, {int(p.edge_mask_nn.sum())} edges")
    if tset is not None:
        rep, comp = scores(g.adjacency_nn, g.logit_weights(), g.n_features, g.n_errors, g.n_pos)
        print(f"replacement score {rep:.3f}, completeness {comp:.3f}")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"total {time.perf_counter() - t0:.1f} s with pruning; peak RSS {peak_gb:.2f} GiB; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")  # fmt: skip


if __name__ == "__main__":
    main()
