"""Train several SAEs from one activation stream: one LM pass, one SAE folder each, a summary table.

On a CPU the LM forward costs more than an SAE step, so a sweep feeds every batch to every
trainer instead of running the LM once per configuration. ``--sweep FIELD=V1,V2,...`` (repeatable;
several give the Cartesian product) varies sae.*, train.* or model.hook, e.g.

    saeforge train --arch topk --sweep sae.k=16,32,64 --sweep train.lr=1e-4,4e-4
    saeforge train --sweep sae.architecture=topk,batchtopk
    saeforge train --arch matryoshka --sweep "sae.group_sizes=2304,2304|1152,1152,2304"   (| separates values holding commas)
    saeforge train --sweep model.hook=blocks.0.hook_resid_post,blocks.1.hook_resid_post

Points at several hooks (or transcoders, ``model.hook_out``) share one stream whose rows
concatenate every hook any point needs (activations/stream.py); each trainer takes its hooks'
columns, so every point still equals its own separate run.

Layout: ``runs/NAME/sweep_plan.json`` (base config and points, written first), ``stream.pt`` (the
shared stream position, see below), ``sweep.json`` (the points and their metrics, written last) and
one ordinary run folder per point, ``runs/NAME/<point>/`` (config.json, metrics.jsonl, checkpoint.pt,
sae/). Model (except the hook), data and activations are shared by construction: sweeping them is
refused. Points may differ in train.total_tokens (a finished trainer just stops taking batches).

Resume (``--sweep ... --resume runs/NAME``): every trainer checkpoints at the same steps
(train.checkpoint_every_steps is shared), then the stream position after that batch is saved to
``stream.pt`` (its carried rows split by hook, so any process count can read it back). A resumed
sweep restarts the stream there; a trainer whose checkpoint is newer (killed between the two
writes) skips the batches it has already seen.

Under torchrun (``--nproc N``) train.parallel picks how the ranks split the work:
- ``data``: every rank holds every SAE and trains it on its B/N rows of each global batch
  (training/distributed.py: all-reduced gradients, global batch statistics); the LM work is split
  by windows and the full rows are all-gathered.
- ``hooks``: each SAE lives on one rank (points balanced by d_sae x width); every rank runs the LM
  on its share of the windows and receives only its SAEs' hooks' columns of the whole global batch
  (``HookParallelStream``). No gradient sync; rank r writes its SAEs' folders and checkpoints, rank 0
  the stream position and the summary. It needs a filesystem every rank sees (one machine, or
  shared storage) to resume with another process count.
- ``auto`` (default): ``hooks`` when there are at least as many points as ranks, else ``data``.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from saeforge.activations import ranks
from saeforge.config import ConfigError
from saeforge.io import atomic_write_text
from saeforge.models import load_model
from saeforge.training.config import RunConfig
from saeforge.training.run import check_heldout, default_run_name
from saeforge.training.sweep_run import SweepRun, parallel_mode

PLAN_FILE = "sweep_plan.json"
SWEEPABLE = {"sae": None, "train": None, "model": ("hook", "hook_out")}  # None: every field of the section
# one value for the whole sweep: its folder, its shared checkpoint steps, its process layout
SHARED_TRAIN = ("out_dir", "run_name", "checkpoint_every_steps", "parallel")


@dataclass
class SweepResult:
    sweep_dir: Path
    rows: list[dict]  # one per point (rank 0 or one process; empty on the other ranks)


def parse_sweep(specs: list[str]) -> list[dict[str, dict[str, str]]]:
    """["sae.k=16,32", "train.lr=1e-3,1e-4"] -> the Cartesian product as override dicts {section: {field: value}}."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        section, dot, field = key.strip().partition(".")
        if not sep or not dot or not field:
            raise ConfigError(f"--sweep {spec!r}: expected SECTION.FIELD=V1,V2,... e.g. sae.k=16,32,64")
        allowed = SWEEPABLE.get(section, ())
        if (allowed is not None and field not in allowed) or (section == "train" and field in SHARED_TRAIN):
            raise ConfigError(
                f"--sweep {spec!r}: only sae.*, train.* (not train.{'/'.join(SHARED_TRAIN)}), "
                "model.hook and model.hook_out can vary within one sweep; the rest is shared by its "
                "one LM pass"
            )
        vals = [v.strip() for v in values.split("|" if "|" in values else ",") if v.strip()]
        if not vals:
            raise ConfigError(f"--sweep {spec!r}: no values after '='")
        axes.append([(section, field, v) for v in vals])
    points = []
    for combo in itertools.product(*axes):
        point: dict[str, dict[str, str]] = {}
        for section, field, value in combo:
            point.setdefault(section, {})[field] = value
        points.append(point)
    return points


def point_name(point: dict[str, dict[str, str]]) -> str:
    parts = [f"{field}={value}" for values in point.values() for field, value in values.items()]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", "_".join(parts)) or "base"


def point_configs(base: dict, points: list[dict]) -> list[RunConfig]:
    """One RunConfig per point: base (a RunConfig dict without its sae fields' defaults) updated by the point."""
    cfgs = []
    for point in points:
        merged = {k: dict(v) for k, v in base.items()}
        for section, values in point.items():
            if section == "sae" and "architecture" in values:
                # another architecture: keep only what the user set for the sae (the defaults differ per class)
                merged["sae"] = {
                    k: v for k, v in merged.get("sae", {}).items() if k in ("d_in", "d_sae", "dtype", "device")
                }
            merged.setdefault(section, {}).update(values)
        try:
            cfgs.append(RunConfig.from_dict(merged))
        except ConfigError as e:
            raise ConfigError(f"sweep point {point_name(point)}: {e}") from None
    return cfgs


def read_plan(sweep_dir: str | Path) -> dict:
    path = Path(sweep_dir) / PLAN_FILE
    if not path.exists():
        raise ConfigError(
            f"cannot resume {sweep_dir}: no {PLAN_FILE} there (is it a folder made by "
            "`saeforge train --sweep`? a sweep started before sweeps could resume has none: restart it)"
        )
    return json.loads(path.read_text())


def jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def train_sweep(
    base: dict,
    points: list[dict],
    evaluate: bool = True,
    progress: bool = True,
    lm=None,
    resume: str | Path | None = None,
) -> SweepResult:
    """Train one SAE per point from the same batches; save each; evaluate each; write sweep.json.

    ``resume``: the folder of an interrupted sweep with this base and these points (see the module docstring).
    """
    cfgs = point_configs(base, points)
    if cfgs[0].log.wandb:  # one process trains every point at once; a wandb run per point is not wired up
        raise ConfigError(
            f"--log.wandb {cfgs[0].log.wandb} streams a single run, but --sweep trains {len(cfgs)} SAEs together: "
            "drop --log.wandb (each point's metrics.jsonl is in the sweep folder), or train the points as separate runs"
        )
    names = [point_name(p) for p in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep points repeat: {names}")
    first = cfgs[0]
    ctx = ranks.init()  # None in one process
    if resume is not None:
        sweep_dir = Path(resume)
        plan = read_plan(sweep_dir)
        if plan["points"] != jsonable({"p": points})["p"] or plan["base"] != jsonable(base):
            raise ConfigError(
                f"{sweep_dir} holds another sweep (points {[point_name(p) for p in plan['points']]}); "
                "resume it with its own --sweep options"
            )
    else:
        sweep_dir = Path(first.train.out_dir) / (first.train.run_name or default_run_name(first) + "-sweep")
        if sweep_dir.exists() and any(sweep_dir.iterdir()):
            raise ConfigError(
                f"{sweep_dir} already exists: continue it with --resume {sweep_dir} (same --sweep "
                "options), or pick another --name"
            )
        if ctx is not None:
            dist.barrier()  # every rank has checked before rank 0 creates the folder
        if ctx is None or ctx.is_main:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(
                sweep_dir / PLAN_FILE, json.dumps(jsonable({"base": base, "points": points}), indent=2) + "\n"
            )
    if evaluate:
        check_heldout(first)
    if lm is None:
        device = first.model.device
        if ctx is not None and ctx.comm_device.type == "cuda" and device in ("auto", "cuda"):
            device = str(ctx.comm_device)
        lm = load_model(first.model.name, dtype=first.model.dtype, device=device, random_init=first.model.random_init)
    mode = parallel_mode(first.train.parallel, len(cfgs), ctx)
    run = SweepRun(cfgs, names, points, sweep_dir, lm, ctx, mode, progress)
    run.train(resume is not None)
    rows = run.finish(evaluate)
    if ctx is not None:
        ranks.shutdown()
    return SweepResult(sweep_dir, rows)


def format_sweep_table(rows: list[dict]) -> str:
    cols = [
        c for c in ("l0", "explained_variance", "ce_score", "kl_score", "dead_fraction") if any(c in r for r in rows)
    ]
    head = ["point", "steps", *cols]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        cells = [r["point"], str(r["steps"])] + ["" if r.get(c) is None else f"{r[c]:.4g}" for c in cols]
        lines.append(" | ".join(cells))
    return "\n".join(lines)
