"""Train several SAEs from one activation stream: one LM pass, one SAE folder each, a summary table.

On a CPU the LM forward costs more than an SAE step, so a sweep feeds every batch to every
trainer instead of running the LM once per configuration. ``--sweep FIELD=V1,V2,...`` (repeatable;
several give the Cartesian product) varies sae.* or train.* fields, e.g.

    saeforge train --arch topk --sweep sae.k=16,32,64 --sweep train.lr=1e-4,4e-4
    saeforge train --sweep sae.architecture=topk,batchtopk
    saeforge train --arch matryoshka --sweep "sae.group_sizes=2304,2304|1152,1152,2304"   (| separates values holding commas)

Layout: ``runs/NAME/sweep.json`` (the points and their metrics) and one ordinary run folder per
point, ``runs/NAME/<point>/`` (config.json, metrics.jsonl, checkpoint.pt, sae/). Model, data and
activations sections are shared by construction: sweeping them is refused. Points may differ in
train.total_tokens (a finished trainer just stops taking batches). Resuming a sweep is not
supported yet: an interrupted sweep must be restarted (each point's folder is a normal run folder).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from saeforge.config import ConfigError, RunConfig
from saeforge.io import atomic_write_text

log = logging.getLogger(__name__)
SWEEP_FILE = "sweep.json"
SWEEPABLE = ("sae", "train")
PER_POINT_TRAIN = ("out_dir", "run_name")  # derived from the sweep folder, not swept


@dataclass
class SweepResult:
    sweep_dir: Path
    rows: list[dict]


def parse_sweep(specs: list[str]) -> list[dict[str, dict[str, str]]]:
    """["sae.k=16,32", "train.lr=1e-3,1e-4"] -> the Cartesian product as override dicts {section: {field: value}}."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        section, dot, field = key.strip().partition(".")
        if not sep or not dot or not field:
            raise ConfigError(f"--sweep {spec!r}: expected SECTION.FIELD=V1,V2,... e.g. sae.k=16,32,64")
        if section not in SWEEPABLE or (section == "train" and field in PER_POINT_TRAIN):
            raise ConfigError(f"--sweep {spec!r}: only sae.* and train.* fields (not train.{'/'.join(PER_POINT_TRAIN)}) "
                              "can vary within one sweep; model/data/activations are shared by its one LM pass")
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
                merged["sae"] = {k: v for k, v in merged.get("sae", {}).items() if k in ("d_in", "d_sae", "dtype", "device")}
            merged.setdefault(section, {}).update(values)
        try:
            cfgs.append(RunConfig.from_dict(merged))
        except ConfigError as e:
            raise ConfigError(f"sweep point {point_name(point)}: {e}") from None
    return cfgs


def train_sweep(base: dict, points: list[dict], evaluate: bool = True, progress: bool = True, lm=None) -> SweepResult:
    """Train one SAE per point from the same batches; save each; evaluate each; write sweep.json."""
    from tqdm import tqdm

    from saeforge.models import load_model, resolve_hook
    from saeforge.saes.formats import save_sae
    from saeforge.training.run import CONFIG, SAE_DIR, _check_heldout, build_sae, build_source, default_run_name, sae_metadata
    from saeforge.training.trainer import Trainer

    cfgs = point_configs(base, points)
    names = [point_name(p) for p in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep points repeat: {names}")
    first = cfgs[0]
    sweep_dir = Path(first.train.out_dir) / (first.train.run_name or default_run_name(first) + "-sweep")
    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise ConfigError(f"{sweep_dir} already exists: resuming a sweep is not supported; pick another --name")
    if evaluate:
        _check_heldout(first)
    if lm is None:
        lm = load_model(first.model.name, dtype=first.model.dtype, device=first.model.device)
    hook_point = resolve_hook(lm.model, first.model.hook)
    source = build_source(first, lm, hook_point)
    batch_size = first.activations.batch_size

    trainers = []
    for i, (cfg, name) in enumerate(zip(cfgs, names)):
        run_dir = sweep_dir / name
        run_dir.mkdir(parents=True, exist_ok=True)
        sae, sae_cfg = build_sae(cfg, source.d_in, lm.device)
        cfgs[i] = cfg = replace(cfg, sae=sae_cfg, train=replace(cfg.train, out_dir=str(sweep_dir), run_name=name))
        cfg.save(run_dir / CONFIG)
        trainers.append(Trainer(sae, cfg.train, batch_size, run_dir, progress=False))

    batches = ((x, source.state_dict() if hasattr(source, "state_dict") else None) for x in source)
    head = [b for _, b in zip(range(max(t.cfg.norm_estimate_batches for t in trainers)), batches)]
    for t in trainers:
        t.prepare(iter(head))  # same first batches -> same input scale for every point
        t.start_clock()
    t0 = time.perf_counter()
    bar = tqdm(total=max(t.n_steps for t in trainers), unit="step", desc=f"sweep x{len(trainers)}", disable=not progress)
    for x_BD, pos in itertools.chain(head, batches):
        live = [t for t in trainers if not t.done]
        if not live:
            break
        for t in live:
            t.train_step(x_BD, pos)
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0

    rows = []
    for cfg, name, point, t in zip(cfgs, names, points, trainers):
        final = t.export_sae()
        sae_dir = save_sae(final, sweep_dir / name / SAE_DIR, sae_metadata(cfg, t.step * batch_size, t.scale),
                           sparsity_F=torch.log10(t.firing_frequency_F() + 1e-10))
        row = {"point": name, "values": {f"{s}.{f}": v for s, vs in point.items() for f, v in vs.items()},
               "steps": t.step, "sae_dir": str(sae_dir), "dead_fraction_train": t.dead_mask_F.float().mean().item()}
        if evaluate:
            from saeforge.evals.report import evaluate as run_eval, write_eval_json

            metrics = run_eval(lm, hook_point, final, cfg.data, cfg.eval, progress=progress, mean_ablation=cfg.eval.mean_ablation)
            write_eval_json(metrics, sae_dir)
            row.update({k: metrics.get(k) for k in ("l0", "explained_variance", "ce_score", "kl_score", "dead_fraction")})
        rows.append(row)
    summary = {"sweep_seconds": seconds, "batch_size": batch_size, "points": rows}
    atomic_write_text(sweep_dir / SWEEP_FILE, json.dumps(summary, indent=2) + "\n")
    return SweepResult(sweep_dir, rows)


def format_sweep_table(rows: list[dict]) -> str:
    cols = [c for c in ("l0", "explained_variance", "ce_score", "kl_score", "dead_fraction") if any(c in r for r in rows)]
    head = ["point", "steps", *cols]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        cells = [r["point"], str(r["steps"])] + ["" if r.get(c) is None else f"{r[c]:.4g}" for c in cols]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def cmd_sweep(ns, base: dict) -> int:
    """`saeforge train --sweep ...`: the CLI's base config and options, one point per sweep value."""
    from saeforge.cli import overrides

    if ns.resume:
        raise ConfigError("--resume cannot be combined with --sweep (resuming a sweep is not supported yet)")
    merged = {k: dict(v) for k, v in base.items()}
    for section, values in overrides(ns).items():
        merged.setdefault(section, {}).update(values)
    result = train_sweep(merged, parse_sweep(ns.sweep), evaluate=not ns.no_eval, progress=not ns.quiet)
    print(format_sweep_table(result.rows))
    print(f"sweep saved to {result.sweep_dir} ({len(result.rows)} SAEs, summary in {SWEEP_FILE})")
    return 0
