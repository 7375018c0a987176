"""The ``saeforge`` command: one subcommand per job.

Every config field is an option ``--SECTION.FIELD VALUE`` whose help is the field's help text;
a few common ones have short forms (--model, --hook, --arch, --tokens, --corpus, --name).
Values are applied over ``--config FILE`` (JSON, same shape as a run's config.json) or the defaults.

The pipeline's own jobs (train, eval, cache, hooks, config) live here; the later stages add
theirs from their own package: each module in ``COMMAND_MODULES`` has ``add_commands(sub, arch)``
that adds subparsers with ``set_defaults(func=...)``; ``func(ns, base_config_dict) -> exit code``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

COMMAND_MODULES: list[str] = []
COMMAND_MODULES.append("saeforge.analysis.commands")  # steer, attribute
COMMAND_MODULES.append("saeforge.evals.commands")  # compare
COMMAND_MODULES.append("saeforge.viewer.commands")  # index, serve, export-neuronpedia
COMMAND_MODULES.append("saeforge.toy")  # toy

SHORTHANDS = {"model": "model.name", "hook": "model.hook", "arch": "sae.architecture",
              "tokens": "train.total_tokens", "corpus": "data.corpus", "name": "train.run_name"}


def _sections() -> dict[str, type]:
    from saeforge import config as C

    return {"model": C.ModelConfig, "data": C.DataConfig, "activations": C.ActivationsConfig,
            "train": C.TrainConfig, "eval": C.EvalConfig}


def add_config_options(p: argparse.ArgumentParser, sections: Sequence[str], sae_cls: type | None) -> None:
    classes = {k: v for k, v in _sections().items() if k in sections}
    if sae_cls is not None:
        classes["sae"] = sae_cls
    for section, cls in classes.items():
        group = p.add_argument_group(f"{section} options")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            text = f"{f.metadata.get('help', '')} (default: {default!r})"
            # argparse %-formats help (for %(default)s): a literal "~20-35%" in a field's text must be %%
            group.add_argument(f"--{section}.{f.name}", dest=f"{section}.{f.name}", default=argparse.SUPPRESS,
                               metavar=type(default).__name__.upper(), help=text.replace("%", "%%"))
    for short, target in SHORTHANDS.items():
        if target.split(".")[0] in classes:
            p.add_argument(f"--{short}", dest=target, default=argparse.SUPPRESS, help=f"same as --{target}")


def overrides(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in vars(ns).items():
        if "." in key:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
    return out


def _architecture(argv: Sequence[str]) -> tuple[str, dict]:
    """Pre-parse --config and --arch so the SAE options of that architecture can be offered."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # else `--sae DIR` reads as --sae.architecture
    pre.add_argument("--config")
    pre.add_argument("--arch", "--sae.architecture", dest="arch")
    ns, _ = pre.parse_known_args(argv)
    base = json.loads(Path(ns.config).read_text()) if ns.config else {}
    return ns.arch or base.get("sae", {}).get("architecture", "topk"), base


def run_config(base: dict, ns: argparse.Namespace):
    from saeforge.config import RunConfig

    merged = {k: dict(v) for k, v in base.items()}
    for section, values in overrides(ns).items():
        merged.setdefault(section, {}).update(values)
    return RunConfig.from_dict(merged)


# ---- subcommands ---------------------------------------------------------------------
def is_sweep_dir(folder: str) -> bool:
    """A folder made by `saeforge train --sweep` (it holds the sweep's plan), so `--resume` alone continues it."""
    from saeforge.training.sweep import PLAN_FILE

    return (Path(folder) / PLAN_FILE).exists()


def cmd_train(ns: argparse.Namespace, base: dict) -> int:
    from saeforge.evals.report import format_table
    from saeforge.training.run import train

    from saeforge.training import distributed

    if ns.nproc > 1:
        return distributed.launch(ns.nproc, ns.argv)
    if ns.sweep or (ns.resume and is_sweep_dir(ns.resume)):
        from saeforge.training.sweep import cmd_sweep

        return cmd_sweep(ns, base)
    cfg = run_config(base, ns)
    if ns.resume and (overrides(ns) or ns.config):
        raise SystemExit("--resume continues a run with its saved config.json; drop the other options")
    result = train(cfg, resume=ns.resume, evaluate=not ns.no_eval, progress=not ns.quiet)
    if not distributed.is_main_process():
        return 0  # rank 0 prints
    if result.metrics is not None:
        print(format_table(result.metrics))
    print(f"SAE saved to {result.sae_dir}")
    return 0


def cmd_eval(ns: argparse.Namespace, base: dict) -> int:
    from saeforge.evals.report import format_table
    from saeforge.evals.saved import evaluate_saved

    metrics, written = evaluate_saved(ns.sae_dir, overrides(ns), progress=not ns.quiet, report=ns.report,
                                      compare=ns.compare, out=ns.out)
    print(format_table(metrics))
    print("wrote " + " and ".join(map(str, written)))
    return 0


def cmd_cache(ns: argparse.Namespace, base: dict) -> int:
    from saeforge.activations import write_cache
    from saeforge.models import load_model
    from saeforge.training.run import hook_points

    from saeforge.training import distributed

    if ns.nproc > 1:
        return distributed.launch(ns.nproc, ns.argv)
    cfg = run_config(base, ns)
    ctx = distributed.init()  # None in one process
    device = str(ctx.comm_device) if ctx and ctx.comm_device.type == "cuda" else cfg.model.device
    lm = load_model(cfg.model.name, dtype=cfg.model.dtype, device=device)
    hook_point = hook_points(cfg, lm)  # with --model.hook_out: rows [hook | hook_out], for transcoders
    if ctx is None:
        m = write_cache(lm, hook_point, cfg.data, cfg.activations, ns.out, ns.tokens, part=ns.part,
                        progress=not ns.quiet)
    else:
        from saeforge.activations.sharding import write_cache_parallel

        m = write_cache_parallel(lm, hook_point, cfg.data, cfg.activations, ns.out, ns.tokens, ctx, part=ns.part,
                                 progress=not ns.quiet)
        distributed.shutdown()
        if not ctx.is_main:
            return 0
    print(f"cache {ns.out}: {m['n_rows']} rows of width {m['d_in']} in {len(m['shards'])} shards "
          f"({cfg.model.name} at {' + '.join(cfg.model.hook_names())})")
    return 0


def cmd_hooks(ns: argparse.Namespace, base: dict) -> int:
    from saeforge.models import load_model
    from saeforge.models.hooks import list_hooks

    lm = load_model(ns.model_name, dtype="float32", device="cpu")
    for name in list_hooks(lm.model):
        print(name)
    return 0


def cmd_config(ns: argparse.Namespace, base: dict) -> int:
    if ns.markdown:
        print(config_markdown())
        return 0
    print(json.dumps(run_config(base, ns).to_dict(), indent=2))
    return 0


def config_markdown() -> str:
    """Every config field as a Markdown table (the README's "Config fields" section is this output)."""
    from saeforge.saes.base import SAEConfig
    from saeforge.saes.registry import config_class, names

    def rows(section: str, cls: type, skip: set[str] = frozenset()) -> list[str]:
        out = []
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(f"| `--{section}.{f.name}` | `{default!r}` | {f.metadata.get('help', '')} |")
        return out

    lines = ["| option | default | meaning |", "|---|---|---|"]
    for section, cls in _sections().items():
        lines += rows(section, cls)
    lines += rows("sae", SAEConfig)
    base_fields = {f.name for f in dataclasses.fields(SAEConfig)}
    for arch in names():
        extra = rows("sae", config_class(arch), skip=base_fields)
        if extra:
            lines += [f"| *{arch} only* | | |", *extra]
    return "\n".join(lines)


def build_parser(arch: str = "topk") -> argparse.ArgumentParser:
    from saeforge.saes.registry import config_class, names

    sae_cls = config_class(arch)
    p = argparse.ArgumentParser(prog="saeforge", description="Sparse autoencoders for Hugging Face causal LMs.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an SAE (live from the LM, or from a cache), save and evaluate it",
                       description=f"Architectures: {', '.join(names())}. SAE options below are for --arch {arch}.")
    t.add_argument("--config", help="JSON config file (same shape as a run's config.json)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoint")
    t.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    t.add_argument("--sweep", action="append", metavar="FIELD=V1,V2", help="train one SAE per value from the same "
                   "batches, e.g. sae.k=16,32,64 (repeat for a grid; '|' separates values that hold commas)")
    t.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (runs torchrun)")
    add_config_options(t, ["model", "data", "activations", "train", "eval"], sae_cls)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a saved SAE on held-out text; prints a table, writes eval.json",
                       description="On the SAE's own corpus the result is SAE_DIR/eval.json (what training wrote); "
                                   "on another --data.corpus it is SAE_DIR/eval.<corpus-slug>.json, so each corpus "
                                   "keeps its own result.")
    e.add_argument("sae_dir", help="SAE folder (cfg.json + sae_weights.safetensors)")
    e.add_argument("--report", action="store_true", help="also write SAE_DIR/report.html (report.<corpus-slug>.html "
                   "on another corpus; beside --out FILE with its stem): a self-contained page with plots")
    e.add_argument("--out", metavar="FILE", help="write the eval JSON here instead of into SAE_DIR")
    e.add_argument("--compare", nargs="+", default=None, metavar="OTHER_SAE_DIR",
                   help="score these SAEs on the same tokens and show where this one sits among them")
    add_config_options(e, ["model", "data", "eval"], None)
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("cache", help="write activations to a sharded safetensors cache (resumable)")
    c.add_argument("--config", help="JSON config file")
    c.add_argument("--out", required=True, help="cache folder")
    c.add_argument("--tokens", type=int, default=1_000_000, help="activation rows to cache")
    c.add_argument("--part", choices=["train", "heldout"], default="train", help="corpus part to cache")
    c.add_argument("--nproc", type=int, default=1, help="processes that write the cache together (runs torchrun)")
    add_config_options(c, ["model", "data", "activations"], None)
    c.set_defaults(func=cmd_cache)

    h = sub.add_parser("hooks", help="list a model's hook points")
    h.add_argument("model_name", metavar="MODEL", help="hub id, local folder, .gguf file or built-in name")
    h.set_defaults(func=cmd_hooks)

    g = sub.add_parser("config", help="print the resolved config as JSON (a starting point for --config)")
    g.add_argument("--config", help="JSON config file")
    g.add_argument("--markdown", action="store_true", help="print every field as a Markdown table instead")
    add_config_options(g, ["model", "data", "activations", "train", "eval"], sae_cls)
    g.set_defaults(func=cmd_config)

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub, arch)
    for sp in sub.choices.values():
        if not any(a.dest == "quiet" for a in sp._actions):
            sp.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from saeforge.config import ConfigError

    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        arch, base = _architecture(argv)
        ns = build_parser(arch).parse_args(argv)
        ns.argv = argv  # --nproc re-runs the same command under torchrun
        if getattr(ns, "quiet", False):
            import transformers

            transformers.utils.logging.disable_progress_bar()
        return ns.func(ns, base)
    except (ConfigError, FileNotFoundError) as e:
        print(f"saeforge: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # our modules raise ValueError subclasses with user-facing messages
        print(f"saeforge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
