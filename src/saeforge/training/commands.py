"""``saeforge train`` (one run, a sweep, or either under torchrun) and ``saeforge cache`` (see cli.COMMAND_MODULES)."""

from __future__ import annotations

import argparse
from pathlib import Path

from saeforge.activations import ranks, write_cache
from saeforge.activations.sharding import write_cache_parallel
from saeforge.config import ConfigError, add_config_options, merged, overrides
from saeforge.evals.report import format_table
from saeforge.models import load_model
from saeforge.saes.registry import config_class, names
from saeforge.training import distributed
from saeforge.training.config import RunConfig
from saeforge.training.run import hook_points, train
from saeforge.training.sweep import (
    PLAN_FILE,
    format_sweep_table,
    jsonable,
    parse_sweep,
    point_name,
    read_plan,
    train_sweep,
)
from saeforge.training.sweep_run import SWEEP_FILE


def add_commands(sub: argparse._SubParsersAction, arch: str) -> None:
    t = sub.add_parser(
        "train",
        help="train an SAE (live from the LM, or from a cache), save and evaluate it",
        description=f"Architectures: {', '.join(names())}. SAE options below are for --arch {arch}.",
    )
    t.add_argument("--config", help="JSON config file (same shape as a run's config.json)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run (or sweep) from its checkpoint")
    t.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    t.add_argument(
        "--sweep",
        action="append",
        metavar="FIELD=V1,V2",
        help="train one SAE per value from the same "
        "batches, e.g. sae.k=16,32,64 (repeat for a grid; '|' separates values that hold commas)",
    )
    t.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (runs torchrun)")
    add_config_options(t, ["model", "data", "activations", "train", "eval", "log"], config_class(arch))
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("cache", help="write activations to a sharded safetensors cache (resumable)")
    c.add_argument("--config", help="JSON config file")
    c.add_argument("--out", required=True, help="cache folder")
    c.add_argument("--tokens", type=int, default=1_000_000, help="activation rows to cache")
    c.add_argument("--part", choices=["train", "heldout"], default="train", help="corpus part to cache")
    c.add_argument("--nproc", type=int, default=1, help="processes that write the cache together (runs torchrun)")
    add_config_options(c, ["model", "data", "activations"], None)
    c.set_defaults(func=cmd_cache)


def is_sweep_dir(folder: str) -> bool:
    """A folder made by `saeforge train --sweep` (it holds the sweep's plan), so `--resume` alone continues it."""
    return (Path(folder) / PLAN_FILE).exists()


def cmd_train(ns: argparse.Namespace, base: dict) -> int:
    if ns.nproc > 1:
        return distributed.launch(ns.nproc, ns.argv)
    if ns.sweep or (ns.resume and is_sweep_dir(ns.resume)):
        return cmd_sweep(ns, base)
    cfg = RunConfig.from_dict(merged(base, ns))
    if ns.resume and (overrides(ns) or ns.config):
        raise ConfigError("--resume continues a run with its saved config.json; drop the other options")
    result = train(cfg, resume=ns.resume, evaluate=not ns.no_eval, progress=not ns.quiet)
    if not ranks.is_main_process():
        return 0  # rank 0 prints
    if result.metrics is not None:
        print(format_table(result.metrics))
    print(f"SAE saved to {result.sae_dir}")
    return 0


def cmd_sweep(ns: argparse.Namespace, base: dict) -> int:
    """`saeforge train --sweep ... [--resume SWEEP_DIR]`: the CLI's base config and options, one point per value."""
    points = parse_sweep(ns.sweep) if ns.sweep else read_plan(ns.resume)["points"]  # `--resume SWEEP_DIR` alone
    config = merged(base, ns)
    if ns.resume:
        plan = read_plan(ns.resume)
        if points != plan["points"]:
            raise ConfigError(
                f"--sweep {' '.join(ns.sweep)} is not the sweep in {ns.resume} (points "
                f"{[point_name(p) for p in plan['points']]}): repeat its --sweep options"
            )
        if overrides(ns) or ns.config:  # the original command again, with --resume: fine if nothing changed
            saved, given = plan["base"], jsonable(config)
            diff = sorted(
                f"{s}.{f}"
                for s in set(saved) | set(given)
                for f in set(saved.get(s, {})) | set(given.get(s, {}))
                if saved.get(s, {}).get(f) != given.get(s, {}).get(f)
            )
            if diff:
                raise ConfigError(
                    f"--resume continues {ns.resume} with its saved plan ({PLAN_FILE}), but {diff} "
                    "differ from it: drop those options (or all of them, keeping --sweep)"
                )
        config = plan["base"]
    result = train_sweep(config, points, evaluate=not ns.no_eval, progress=not ns.quiet, resume=ns.resume)
    if ranks.is_main_process():
        print(format_sweep_table(result.rows))
        print(f"sweep saved to {result.sweep_dir} ({len(result.rows)} SAEs, summary in {SWEEP_FILE})")
    return 0


def cmd_cache(ns: argparse.Namespace, base: dict) -> int:
    if ns.nproc > 1:
        return distributed.launch(ns.nproc, ns.argv)
    cfg = RunConfig.from_dict(merged(base, ns))
    ctx = ranks.init()  # None in one process
    device = str(ctx.comm_device) if ctx and ctx.comm_device.type == "cuda" else cfg.model.device
    lm = load_model(cfg.model.name, dtype=cfg.model.dtype, device=device, random_init=cfg.model.random_init)
    hook_point = hook_points(cfg, lm)  # with --model.hook_out: rows [hook | hook_out], for transcoders
    if ctx is None:
        m = write_cache(
            lm, hook_point, cfg.data, cfg.activations, ns.out, ns.tokens, part=ns.part, progress=not ns.quiet
        )
    else:
        m = write_cache_parallel(
            lm, hook_point, cfg.data, cfg.activations, ns.out, ns.tokens, ctx, part=ns.part, progress=not ns.quiet
        )
        ranks.shutdown()
        if not ctx.is_main:
            return 0
    print(
        f"cache {ns.out}: {m['n_rows']} rows of width {m['d_in']} in {len(m['shards'])} shards "
        f"({cfg.model.name} at {' + '.join(cfg.model.hook_names())})"
    )
    return 0
