"""CLI: ``saeforge index``, ``serve``, ``export-neuronpedia``, ``explain``, ``map``, ``meta`` (listed in cli.COMMAND_MODULES)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from saeforge.config import UsageError, add_config_options, from_dict, overrides
from saeforge.saes.batchtopk import BatchTopKConfig
from saeforge.saes.hub import output_dir
from saeforge.training.meta import train_meta_sae
from saeforge.viewer.config import IndexConfig
from saeforge.viewer.dmap import add_map
from saeforge.viewer.explain_run import ExplainConfig, run_explain
from saeforge.viewer.export import export_neuronpedia
from saeforge.viewer.index import build_index
from saeforge.viewer.llm import LLMConfig
from saeforge.viewer.llm_local import LocalConfig
from saeforge.viewer.metadb import add_meta_latents
from saeforge.viewer.server import serve


def _index_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("index options")
    for f in dataclasses.fields(IndexConfig):
        g.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f"index_{f.name}",
            type=type(f.default),
            default=f.default,
            metavar=type(f.default).__name__.upper(),
            help=f"{f.metadata['help']} (default: {f.default!r})",
        )


def cmd_index(ns: argparse.Namespace, base: dict) -> int:
    cfg = IndexConfig(**{f.name: getattr(ns, f"index_{f.name}") for f in dataclasses.fields(IndexConfig)})
    out = Path(ns.out) if ns.out else output_dir(ns.sae_dir) / "features.db"  # hf:// -> hf/OWNER/REPO/PATH/
    build_index(ns.sae_dir, out, cfg, overrides(ns), progress=not ns.quiet, restart=ns.restart)
    print(f"feature database written to {out}; view it with `saeforge serve {out}`")
    return 0


def cmd_serve(ns: argparse.Namespace, base: dict) -> int:
    if ns.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"saeforge serve: listening on {ns.host}: anyone who can reach it can run text through the model")
    if not ns.db and not ns.graphs:
        raise UsageError("nothing to serve: give feature database files, --graphs DIR, or both")
    if ns.graphs and not Path(ns.graphs).is_dir():
        raise UsageError(f"--graphs {ns.graphs}: not a folder; give the folder of graph JSON files (e.g. DIR/graphs)")
    serve(ns.db, host=ns.host, port=ns.port, live=not ns.no_live, graphs=ns.graphs)
    return 0


def cmd_export(ns: argparse.Namespace, base: dict) -> int:
    files = export_neuronpedia(ns.db, ns.out, batch_size=ns.batch_size, progress=not ns.quiet)
    print(f"wrote {len(files)} files to {ns.out}")
    return 0


def _section_options(p: argparse.ArgumentParser, section: str, cls: type) -> None:
    """--SECTION.FIELD options of a viewer config (these sections are not in config.SECTION_CLASSES)."""
    g = p.add_argument_group(f"{section} options")
    for f in dataclasses.fields(cls):
        g.add_argument(
            f"--{section}.{f.name}",
            dest=f"{section}.{f.name}",
            default=argparse.SUPPRESS,
            metavar=type(f.default).__name__.upper(),
            help=f"{f.metadata['help']} (default: {f.default!r})".replace("%", "%%"),
        )


def cmd_explain(ns: argparse.Namespace, base: dict) -> int:
    given = overrides(ns)
    if ns.explainer:
        given.setdefault("explain", {})["explainer"] = ns.explainer
    if ns.features:
        given.setdefault("explain", {})["features"] = ns.features
    cfg = from_dict(ExplainConfig, given.get("explain", {}), "explain")
    llm = from_dict(LLMConfig, given.get("llm", {}), "llm")
    local = from_dict(LocalConfig, given.get("local", {}), "local")
    c = run_explain(ns.db, cfg, llm, progress=not ns.quiet, local=local)
    print(
        f"{c['explainer']}: {c['done']} features explained, {c['skipped']} already were, {c['failed']} failed "
        f"(retried by the next run), {c['requests']} LLM requests / local model calls"
    )
    if c["stopped"]:
        print(f"stopped early: {c['stopped']}; run the same command again to continue (answers are cached)")
    return 0


def cmd_map(ns: argparse.Namespace, base: dict) -> int:
    # validated by IndexConfig, whose fields these are
    cfg = IndexConfig(map_method=ns.map_method, map_clusters=ns.map_clusters, seed=ns.seed)
    used = add_map(ns.db, cfg.map_method, cfg.map_clusters, cfg.seed, force=ns.force)
    if used is None:
        print(f"{ns.db} already has a map; --force recomputes it")
    elif used == "none":
        print("no map written: the clustering needs scipy (pip install 'saeforge[map]')")
    else:
        print(f"map ({used} layout, {cfg.map_clusters} clusters) added to {ns.db}")
    return 0


def cmd_meta(ns: argparse.Namespace, base: dict) -> int:
    if ns.top < 1 or ns.batch_size < 2:
        raise UsageError(f"--top {ns.top} / --batch-size {ns.batch_size}: expected --top >= 1, --batch-size >= 2")
    if ns.db and not Path(ns.db).is_file():
        raise UsageError(f"--db {ns.db}: no such file; build it first with `saeforge index {ns.sae_dir} --out {ns.db}`")
    out = Path(ns.out) if ns.out else Path(ns.sae_dir) / "meta"
    given = overrides(ns)
    if out.exists() and ns.db and not ns.force and not given.get("sae") and not given.get("train"):
        print(f"{out} exists: using it (--force retrains)")  # `--db` alone adds an existing meta-SAE to a database
    else:
        train_meta_sae(
            ns.sae_dir, out, given.get("sae"), given.get("train"), ns.batch_size, ns.force, progress=not ns.quiet
        )
        print(f"meta-SAE saved to {out}")
    if ns.db:
        n = add_meta_latents(ns.db, out, ns.top)
        print(f"{n} (feature, meta-latent) rows written to {ns.db}; `saeforge serve {ns.db}` lists them per feature")
    return 0


def add_commands(sub: argparse._SubParsersAction, arch: str) -> None:
    mt = sub.add_parser(
        "meta",
        help="train a meta-SAE on an SAE's decoder rows (Pearce et al.); --db adds its latents to the viewer",
        description="A BatchTopK SAE with small k (default d_sae = F/16, k = 4) trained on the unit decoder rows "
        "of SAE_DIR for many epochs (--tokens = rows seen; default 2000 epochs). Saved as an SAE folder whose "
        "metadata names the base SAE. --db DB writes each feature's meta-latents into a feature database.",
    )
    mt.add_argument("sae_dir", help="the base SAE folder (cfg.json + sae_weights.safetensors)")
    mt.add_argument("--out", help="meta-SAE folder (default: SAE_DIR/meta)")
    mt.add_argument("--db", help="feature database of SAE_DIR (from `saeforge index`) to add the meta-latents to")
    mt.add_argument("--top", type=int, default=8, help="meta-latents kept per feature in the database (default 8)")
    mt.add_argument("--batch-size", type=int, default=4096, help="decoder rows per step (at most F; default 4096)")
    mt.add_argument("--force", action="store_true", help="replace an existing meta-SAE folder at --out")
    add_config_options(mt, ["train"], BatchTopKConfig)
    mt.set_defaults(func=cmd_meta)

    i = sub.add_parser(
        "index",
        help="build a feature database (SQLite) for an SAE: contexts, histograms, logit lens",
        description="Streams --tokens corpus tokens through the SAE's model and SAE. Resumable: run the "
        "same command again after an interruption. Model, hook and corpus default to the "
        "SAE's own (cfg.json metadata); --model.* / --data.* override them.",
    )
    i.add_argument("sae_dir", help="SAE folder (cfg.json + sae_weights.safetensors) or hf://OWNER/REPO[/PATH][@REV]")

    i.add_argument(
        "--out", help="database file (default: SAE_DIR/features.db; hf/OWNER/REPO/PATH/features.db for hf://)"
    )
    i.add_argument("--restart", action="store_true", help="discard a partial build instead of resuming it")
    _index_options(i)
    add_config_options(i, ["model", "data"], None)
    i.set_defaults(func=cmd_index)

    s = sub.add_parser("serve", help="serve feature pages, a JSON API and the live box over HTTP")
    s.add_argument("db", nargs="*", help="feature database files (from `saeforge index`); several SAEs side by side")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    s.add_argument("--no-live", action="store_true", help="do not load models: no live box / activation endpoints")
    s.add_argument(
        "--graphs",
        metavar="DIR",
        help="serve the attribution graphs (*.json from `saeforge graph`) in DIR at /graph.html",
    )
    s.set_defaults(func=cmd_serve)

    e = sub.add_parser("export-neuronpedia", help="write a feature database as Neuronpedia upload batches (JSON)")
    e.add_argument("db", help="feature database file")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--batch-size", type=int, default=128, help="features per batch file")
    e.set_defaults(func=cmd_export)

    m = sub.add_parser(
        "map",
        help="add the dictionary map (layout + cluster tree) to a feature database built without one",
        description="`saeforge index` computes the map itself; this adds it to an older database (or one built "
        "with --map-method none) from the SAE folder the database records. Skipped when a map is there.",
    )
    m.add_argument("db", help="feature database file (from `saeforge index`)")
    d = IndexConfig()
    for name in ("map_method", "map_clusters", "seed"):
        f = next(f for f in dataclasses.fields(IndexConfig) if f.name == name)
        m.add_argument(
            f"--{name.replace('_', '-')}",
            type=type(getattr(d, name)),
            default=getattr(d, name),
            help=f"{f.metadata['help']} (default: {getattr(d, name)!r})",
        )
    m.add_argument("--force", action="store_true", help="recompute a map the database already has")
    m.set_defaults(func=cmd_map)

    x = sub.add_parser(
        "explain",
        help="explain features (baseline, an LLM API or an in-process LM) and score the explanations into the feature database",
        description="Writes explanations and simulation / detection scores into DB (shown by `saeforge serve`). "
        "Resumable: features already explained by the same explainer are skipped, LLM answers are cached.",
    )
    x.add_argument("db", help="feature database file (from `saeforge index`)")
    x.add_argument("--explainer", choices=("baseline", "llm", "local"), help="same as --explain.explainer")
    x.add_argument("--features", help="same as --explain.features: all, or N most frequently firing")
    _section_options(x, "explain", ExplainConfig)
    _section_options(x, "llm", LLMConfig)
    _section_options(x, "local", LocalConfig)
    x.set_defaults(func=cmd_explain)
