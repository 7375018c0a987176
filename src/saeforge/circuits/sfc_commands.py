"""``saeforge circuit`` (a sparse feature circuit over saved SAEs, circuits/sfc.py) and ``saeforge export-transcoders``
(a per-layer transcoder folder in circuit-tracer's layout, circuits/formats.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from saeforge.config import ConfigError, UsageError


def add_commands(sub: argparse._SubParsersAction, arch: str) -> None:
    c = sub.add_parser(
        "circuit",
        help="sparse feature circuit (Marks et al.) over SAEs at several hooks: nodes, edges, faithfulness",
        description="Node and edge indirect effects on logit[target] - logit[other] at the last position, by "
        "attribution patching (atp) or integrated gradients (ig), with each SAE's error nodes; faithfulness "
        "and completeness by mean ablation. See docs/circuits.md.",
    )
    c.add_argument(
        "--sae", action="append", required=True, metavar="DIR", help="SAE or transcoder folder (repeat; one per hook)"
    )
    c.add_argument("--prompt", action="append", required=True, help="clean prompt (repeat; all of one token length)")
    c.add_argument("--patch", action="append", help="counterfactual prompt, one per --prompt (default: mean baseline)")
    c.add_argument("--target", required=True, help="completion whose logit the metric raises (one token)")
    c.add_argument("--other", help="competing completion: metric = logit[target] - logit[other] (default: logit only)")
    c.add_argument("--method", choices=("atp", "ig"), default="atp", help="atp (default) or ig")
    c.add_argument("--steps", type=int, default=10, help="integrated-gradients steps (default 10)")
    c.add_argument("--node-threshold", type=float, default=0.1, help="keep nodes with |IE| above this (default 0.1)")
    c.add_argument("--edge-threshold", type=float, default=0.01, help="keep edges with |IE| above this (default 0.01)")
    c.add_argument("--model", help="model to load (default: metadata.model_name of the SAEs)")
    c.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    c.add_argument("--top", type=int, default=20, help="nodes and edges printed (default 20; the file has all kept)")
    c.add_argument("--out", help="JSON file to write (never overwritten; default: print only)")
    c.set_defaults(func=cmd_circuit)

    e = sub.add_parser(
        "export-transcoders",
        help="write a `saeforge transcoders` folder in circuit-tracer's layout (config.yaml + layer_N.safetensors)",
        description="The folder `saeforge graph --transcoders` and circuit-tracer's load_transcoder_set read. "
        "See docs/circuits.md.",
    )
    e.add_argument("folder", metavar="DIR", help="a folder made by `saeforge transcoders`")
    e.add_argument("--format", choices=("circuit-tracer",), default="circuit-tracer", help="the layout to write")
    e.add_argument("--out", required=True, metavar="DIR2", help="the folder to write (never overwritten)")
    e.set_defaults(func=cmd_export_transcoders)


def cmd_export_transcoders(ns: argparse.Namespace, base: dict) -> int:
    from saeforge.circuits.formats import export_circuit_tracer
    from saeforge.circuits.transcoders import load_transcoders

    out = export_circuit_tracer(load_transcoders(ns.folder), ns.out)
    print(f"{ns.folder} written in circuit-tracer's layout to {out}")
    return 0


def load_sites(folders: list[str], model: str | None, device: str) -> tuple[Any, list]:
    """(lm, sites) for SAE folders that name one model and a hook each."""
    from saeforge.circuits.sfc import Site
    from saeforge.models import load_model
    from saeforge.saes.formats import load_sae, read_cfg

    names, hooks = set(), []
    for f in folders:
        meta = read_cfg(f).get("metadata") or {}
        if not meta.get("hook_name"):
            raise ConfigError(f"{f}/cfg.json names no metadata.hook_name: re-save it with the hook it was trained on")
        names.add(meta.get("model_name"))
        # a transcoder's nodes live where it writes (hook_name_out); it reads hook_name
        hooks.append(
            (meta.get("hook_name_out") or meta["hook_name"], meta["hook_name"] if meta.get("hook_name_out") else None)
        )
    if model is None:
        if len(names) != 1 or None in names:
            raise UsageError(f"the SAEs name models {sorted(map(str, names))}: pass --model, or SAEs of one model")
        model = names.pop()
    lm = load_model(model, dtype="float32", device=device)
    sites = []
    for f, (h, h_in) in zip(folders, hooks):
        sae = load_sae(f, device=lm.device).requires_grad_(False)
        sites.append(Site(sae, h, str(f), h_in))
    return lm, sites


def circuit_json(c: Any, tokens: list[str], metric: str, faith: float, compl: float, args: dict) -> dict:
    def node(n) -> dict:
        return {"hook": n.hook, "pos": n.pos, "token": tokens[n.pos], "latent": "error" if n.latent < 0 else n.latent}

    return {
        "format_version": 1,
        **args,
        "metric": metric,
        "method": c.method.split(" ")[0],
        "hooks": [{"hook": s.site.hook, "hook_in": s.site.hook_in, "sae": s.site.name} for s in c.sites],
        "metric_clean": c.metric_clean,
        "metric_baseline": c.metric_base,
        "faithfulness": faith,
        "completeness": compl,
        "counts": {
            "nodes": sum(s.ie_TF[c.start :].numel() + s.ie_err_T[c.start :].numel() for s in c.sites),
            "kept_nodes": len(c.nodes),
            "kept_edges": len(c.edges),
        },  # fmt: skip
        "nodes": [{**node(n), "ie": ie} for n, ie in sorted(c.nodes.items(), key=lambda kv: -abs(kv[1]))],
        "edges": [
            {"up": node(u), "down": node(d), "ie": ie}
            for (u, d), ie in sorted(c.edges.items(), key=lambda kv: -abs(kv[1]))
        ],
    }


def cmd_circuit(ns: argparse.Namespace, base: dict) -> int:
    from saeforge.analysis.common import single_token
    from saeforge.analysis.metrics import LogitDiff, TokenLogit
    from saeforge.circuits.sfc import faithfulness, feature_circuit
    from saeforge.io import atomic_write_text

    out = Path(ns.out) if ns.out else None
    if out is not None and out.exists():
        raise UsageError(f"{out} exists: give another --out (a circuit file is never overwritten)")
    if ns.patch and len(ns.patch) != len(ns.prompt):
        raise UsageError(f"{len(ns.patch)} --patch for {len(ns.prompt)} --prompt: give one counterfactual per prompt")
    if ns.method == "ig" and ns.steps < 1:
        raise UsageError(f"--steps {ns.steps}: integrated gradients needs at least 1 step")
    lm, sites = load_sites(ns.sae, ns.model, ns.device)
    target = single_token(lm.tokenizer, ns.target)
    metric = LogitDiff(target, single_token(lm.tokenizer, ns.other)) if ns.other else TokenLogit(target)
    c, ids = feature_circuit(
        lm, sites, ns.prompt, metric, ns.patch, ns.method, ns.steps, ns.node_threshold, ns.edge_threshold
    )
    faith = faithfulness(lm, c, ids, metric, set(c.nodes))
    compl = faithfulness(lm, c, ids, metric, set(c.all_nodes()) - set(c.nodes))
    tokens = [lm.tokenizer.decode([int(i)]) for i in ids[0]]
    args = {"prompts": ns.prompt, "patches": ns.patch, "steps": ns.steps,
            "node_threshold": ns.node_threshold, "edge_threshold": ns.edge_threshold}  # fmt: skip
    d = circuit_json(c, tokens, metric.name, faith, compl, args)
    print(f"metric {metric.name}: clean {c.metric_clean:.4f}, baseline {c.metric_base:.4f} ({c.method})")
    print(f"{len(c.nodes)} of {d['counts']['nodes']} nodes kept (|IE| > {ns.node_threshold}):")
    for n in d["nodes"][: ns.top]:
        print(f"  {n['hook']} pos {n['pos']} {n['token']!r} latent {n['latent']}: IE {n['ie']:+.4f}")
    print(f"{len(c.edges)} edges kept (|IE| > {ns.edge_threshold}):")
    for e in d["edges"][: ns.top]:
        u, v = e["up"], e["down"]
        print(f"  {u['hook']}@{u['pos']}:{u['latent']} -> {v['hook']}@{v['pos']}:{v['latent']}: IE {e['ie']:+.4f}")
    print(f"faithfulness {faith:.3f}, completeness {compl:.3f}")
    if out is not None:
        atomic_write_text(out, json.dumps(d) + "\n")
        print(f"written to {out}")
    return 0
