"""``saeforge transcoders`` (a transcoder per layer, one LM pass), ``saeforge clt`` (a cross-layer transcoder),
``saeforge graph`` (JSON + HTML view), ``saeforge intervene`` (edit feature nodes, logit changes)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
from pathlib import Path

from saeforge.circuits.clt import CLTConfig
from saeforge.config import ConfigError, UsageError, add_config_options, merged, overrides
from saeforge.saes.registry import config_class


def add_commands(sub: argparse._SubParsersAction, arch: str) -> None:
    t = sub.add_parser(
        "transcoders",
        help="train one MLP transcoder per layer (mlp_in -> mlp_out) from one LM pass, with a manifest",
        description="A sweep whose points pair blocks.L.hook_mlp_in with blocks.L.hook_mlp_out; the folder "
        "gets transcoders.json (layer -> SAE folder) for `saeforge graph`. See docs/circuits.md.",
    )
    t.add_argument(
        "--layers", help="'all' or comma-separated layers, e.g. 0,1,2 (default: all; with --resume, the folder's own)"
    )
    t.add_argument("--config", help="JSON config file (same shape as a run's config.json)")
    t.add_argument("--resume", metavar="DIR", help="continue an interrupted `saeforge transcoders` folder")
    t.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation of each transcoder")
    add_config_options(t, ["model", "data", "activations", "train", "eval"], config_class(arch))
    t.set_defaults(func=cmd_transcoders)

    c = sub.add_parser(
        "clt",
        help="train a cross-layer transcoder (every layer's MLP input -> every later MLP output) from one LM pass",
        description="TopK per layer; decoders from each layer to every later one. See docs/circuits.md.",
    )
    c.add_argument("--out", required=True, metavar="DIR", help="the CLT folder to write (never overwritten)")
    c.add_argument("--tokens", type=int, default=1_000_000, help="training tokens (default 1000000)")
    c.add_argument("--config", help="JSON config file (model, data and activations sections are read)")
    for f in dataclasses.fields(CLTConfig):
        if f.name not in ("n_layers", "d_model", "activation"):  # the model's; training is TopK only
            c.add_argument(f"--clt.{f.name}", dest=f"clt.{f.name}", default=argparse.SUPPRESS,
                           help=f"{f.metadata['help']} (default: {f.default!r})")  # fmt: skip
    add_config_options(c, ["model", "data", "activations"], None)
    c.set_defaults(func=cmd_clt)

    g = sub.add_parser("graph", help="attribution graph of one prompt through per-layer transcoders (JSON)",
                       description="--transcoders also takes a circuit-tracer folder (config.yaml).")  # fmt: skip
    g.add_argument(
        "--transcoders", required=True, metavar="DIR", help="a folder made by `saeforge transcoders` or `saeforge clt`"
    )
    g.add_argument("--prompt", required=True, help="the text whose next-token prediction the graph explains")
    g.add_argument("--out", help="graph JSON file to write (default: DIR/graphs/<prompt slug>.json); never overwritten")
    g.add_argument("--model", dest="model_name", help="the model (default: the one the transcoders were trained on)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    g.add_argument("--node-threshold", type=float, default=0.8, help="influence fraction of nodes kept (default 0.8)")
    g.add_argument("--edge-threshold", type=float, default=0.98, help="influence fraction of edges kept (default 0.98)")
    g.add_argument("--batch-size", type=int, default=16, help="targets per backward pass (default 16)")
    g.add_argument(
        "--max-feature-nodes",
        type=int,
        metavar="N",
        help="compute rows for the N features most influential on the logits only (default: every active feature)",
    )
    g.set_defaults(func=cmd_graph)

    h = sub.add_parser("graph-html", help="write the self-contained HTML view of a graph JSON (FILE.json -> FILE.html)")
    h.add_argument("graph", metavar="FILE.json", help="a graph written by `saeforge graph`")
    h.add_argument("--out", help="HTML file to write (default: FILE.html beside it); never overwritten")
    h.set_defaults(func=cmd_graph_html)

    v = sub.add_parser(
        "intervene",
        help="zero, clamp or scale feature nodes of one prompt: logit changes predicted by the graph and measured",
        description="For the graph's logit nodes: the change its direct edges predict, the frozen replacement "
        "model's (other features held; downstream features responding) and the real model's with the "
        "transcoders spliced in (errors kept). See docs/circuits.md.",
    )
    v.add_argument(
        "--transcoders", required=True, metavar="DIR", help="a folder made by `saeforge transcoders` or `saeforge clt`"
    )
    v.add_argument("--prompt", required=True, help="the text whose next-token prediction is edited")
    v.add_argument(
        "--feature",
        action="append",
        required=True,
        metavar="L:POS:IDX=OP",
        help="a feature node and its edit: =zero, =clamp:VALUE or =scale:FACTOR (POS < 0 counts from the end); repeat",
    )
    v.add_argument("--out", help="also write the result as JSON here (never overwritten)")
    v.add_argument("--model", dest="model_name", help="the model (default: the one the transcoders were trained on)")
    v.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    v.set_defaults(func=cmd_intervene)


def cmd_transcoders(ns: argparse.Namespace, base: dict) -> int:
    from saeforge.circuits.transcoders import train_layer_transcoders
    from saeforge.training.sweep import read_plan

    given = overrides(ns).get("model", {})
    if "hook" in given or "hook_out" in given:
        raise ConfigError(
            "saeforge transcoders sets model.hook/model.hook_out per layer itself: drop them (use --layers)"
        )
    config, layers = merged(base, ns), ns.layers or "all"
    if ns.resume:
        plan = read_plan(ns.resume)
        config = plan["base"]
        layers = ns.layers or ",".join(p["model"]["hook"].split(".")[1] for p in plan["points"])
    folder = train_layer_transcoders(config, layers, evaluate=not ns.no_eval, progress=not ns.quiet, resume=ns.resume)
    print(f"transcoders saved to {folder} (manifest transcoders.json)")
    return 0


def cmd_clt(ns: argparse.Namespace, base: dict) -> int:
    from saeforge.circuits.clt import save_clt, train_clt
    from saeforge.config import ActivationsConfig, DataConfig, ModelConfig, from_dict
    from saeforge.models import load_model

    d = merged(base, ns)
    if Path(ns.out).exists():
        raise UsageError(f"--out {ns.out} exists: a CLT folder is never overwritten; pick another")
    model = from_dict(ModelConfig, d.get("model", {}), "model")
    data = from_dict(DataConfig, d.get("data", {}), "data")
    act = from_dict(ActivationsConfig, d.get("activations", {}), "activations")
    lm = load_model(model.name, dtype=model.dtype, device=model.device)
    cfg = from_dict(CLTConfig, {**d.get("clt", {}), "n_layers": lm.n_layers, "d_model": lm.d_model}, "clt")
    clt = train_clt(lm, cfg, data, act, ns.tokens)
    folder = save_clt(clt, ns.out, model.name, dataclasses.asdict(data))
    print(f"CLT ({lm.n_layers} layers x {cfg.d_sae} latents, k={cfg.k}) saved to {folder}")
    return 0


def default_out(folder: str, prompt: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", prompt)[:40].strip("-") or "prompt"
    return Path(folder) / "graphs" / f"{slug}-{hashlib.sha1(prompt.encode()).hexdigest()[:8]}.json"


def cmd_graph(ns: argparse.Namespace, base: dict) -> int:
    from saeforge.circuits.export import build_graph_json
    from saeforge.circuits.html import graph_html
    from saeforge.io import atomic_write_text

    out = Path(ns.out) if ns.out else default_out(ns.transcoders, ns.prompt)
    html = out.with_suffix(".html")
    for path in (out, html):
        if path.exists():
            raise UsageError(f"{path} exists: give another --out (a graph is never overwritten)")
    if ns.batch_size < 1:
        raise UsageError(f"--batch-size {ns.batch_size}: expected at least 1")
    if ns.max_feature_nodes is not None and ns.max_feature_nodes < 0:
        raise UsageError(f"--max-feature-nodes {ns.max_feature_nodes}: expected 0 or more (omit it for every feature)")
    transcoders, lm = _load_set(ns)
    d = build_graph_json(
        lm, transcoders, ns.prompt, ns.node_threshold, ns.edge_threshold, ns.batch_size, slug=out.stem,
        folder=ns.transcoders, max_feature_nodes=ns.max_feature_nodes,
    )  # fmt: skip
    atomic_write_text(out, json.dumps(d) + "\n")
    atomic_write_text(html, graph_html(d))
    s, c = d["metadata"]["scores"], d["metadata"]["counts"]
    print(
        f"graph of {len(d['metadata']['prompt_tokens'])} tokens: {c['kept_nodes']} nodes and {c['kept_links']} links "
        f"kept (of {c['features']} features, {c['visited_features']} with rows); replacement score {s['replacement']:.3f}, completeness "
        f"{s['completeness']:.3f}; written to {out} (view: {html})"
    )
    return 0


def cmd_graph_html(ns: argparse.Namespace, base: dict) -> int:
    from saeforge.circuits.html import graph_html
    from saeforge.io import atomic_write_text

    src = Path(ns.graph)
    out = Path(ns.out) if ns.out else src.with_suffix(".html")
    if out.exists():
        raise UsageError(f"{out} exists: give another --out (a page is never overwritten)")
    try:
        d = json.loads(src.read_text())
        ok = isinstance(d, dict) and {"metadata", "nodes", "links"} <= set(d)
    except (OSError, ValueError) as e:
        raise UsageError(f"{src}: cannot read it as JSON ({e}); give a file written by `saeforge graph`") from None
    if not ok:
        raise UsageError(f"{src} is not a graph (no metadata/nodes/links); give a file written by `saeforge graph`")
    atomic_write_text(out, graph_html(d))
    print(f"{len(d['nodes'])} nodes and {len(d['links'])} links drawn in {out}")
    return 0


def _load_set(ns: argparse.Namespace):
    """(transcoders, the float32 model) from --transcoders / --model / --device."""
    from saeforge.circuits.formats import load_transcoder_folder
    from saeforge.circuits.transcoders import TranscoderSetError
    from saeforge.models import load_model

    # on the CPU first: the model's loader says clearly if --device is absent; ReplacementModel moves them
    transcoders, model_name, _ = load_transcoder_folder(ns.transcoders)
    if ns.model_name and ns.model_name != model_name:
        raise TranscoderSetError(
            f"the transcoders in {ns.transcoders} were trained on {model_name!r}, not {ns.model_name!r}: "
            "drop --model, or train a set on that model"
        )
    return transcoders, load_model(model_name, dtype="float32", device=ns.device)


def cmd_intervene(ns: argparse.Namespace, base: dict) -> int:
    from saeforge.circuits.intervene import intervene, parse_edit
    from saeforge.io import atomic_write_text

    edits = [parse_edit(spec) for spec in ns.feature]  # before loading anything: a typo fails at once
    if ns.out and Path(ns.out).exists():
        raise UsageError(f"--out {ns.out} exists: give another file (results are never overwritten)")
    transcoders, lm = _load_set(ns)
    r = intervene(lm, transcoders, ns.prompt, edits)
    for e in r["edits"]:
        print(f"feature {e['layer']}:{e['pos']}:{e['index']} {e['activation']:.4g} -> {e['new_activation']:.4g}")
    print("change of logit - mean logit per logit node:")
    print(f"{'token':>16} {'prob':>6} {'predicted':>10} {'repl.direct':>11} {'repl.total':>10} {'real':>10}")
    for row in r["logits"]:
        print(
            f"{row['token']!r:>16} {row['prob']:6.3f} {row['predicted']:10.4g} {row['replacement_direct']:11.4g} "
            f"{row['replacement_total']:10.4g} {row['real']:10.4g}"
        )
    if ns.out:
        atomic_write_text(Path(ns.out), json.dumps(r, indent=1) + "\n")
        print(f"written to {ns.out}")
    return 0
