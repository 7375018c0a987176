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
import logging
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from saeforge.config import ConfigError, RunConfig
from saeforge.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)
SWEEP_FILE = "sweep.json"
PLAN_FILE = "sweep_plan.json"
STREAM_FILE = "stream.pt"
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
            raise ConfigError(f"--sweep {spec!r}: only sae.*, train.* (not train.{'/'.join(SHARED_TRAIN)}), "
                              "model.hook and model.hook_out can vary within one sweep; the rest is shared by its "
                              "one LM pass")
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


def read_plan(sweep_dir: str | Path) -> dict:
    path = Path(sweep_dir) / PLAN_FILE
    if not path.exists():
        raise ConfigError(f"cannot resume {sweep_dir}: no {PLAN_FILE} there (is it a folder made by "
                          "`saeforge train --sweep`? a sweep started before sweeps could resume has none: restart it)")
    return json.loads(path.read_text())


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def assign_points(costs: list[int], world: int) -> list[int]:
    """Rank of each point: largest first, each to the least-loaded rank (ties: lower point, lower rank)."""
    load, owner = [0] * world, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner[i] = min(range(world), key=lambda r: (load[r], r))
        load[owner[i]] += costs[i]
    return owner


def parallel_mode(requested: str, n_points: int, ctx) -> str:
    if ctx is None:
        return "single"
    if requested == "auto":
        return "hooks" if n_points >= ctx.world else "data"
    return requested


@dataclass
class _Member:
    """One point of the sweep held by this process."""

    index: int
    name: str
    cfg: RunConfig
    run_dir: Path
    trainer: object
    cols: list[slice] | None  # its hooks' columns in the source's rows ([x] or a transcoder's [x, y]); None = all


def train_sweep(base: dict, points: list[dict], evaluate: bool = True, progress: bool = True, lm=None,
                resume: str | Path | None = None) -> SweepResult:
    """Train one SAE per point from the same batches; save each; evaluate each; write sweep.json.

    ``resume``: the folder of an interrupted sweep with this base and these points (see the module docstring).
    """
    from saeforge.training import distributed
    from saeforge.training.run import _check_heldout, default_run_name

    cfgs = point_configs(base, points)
    names = [point_name(p) for p in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep points repeat: {names}")
    first = cfgs[0]
    ctx = distributed.init()  # None in one process
    if resume is not None:
        sweep_dir = Path(resume)
        plan = read_plan(sweep_dir)
        if plan["points"] != _jsonable({"p": points})["p"] or plan["base"] != _jsonable(base):
            raise ConfigError(f"{sweep_dir} holds another sweep (points {[point_name(p) for p in plan['points']]}); "
                              "resume it with its own --sweep options")
    else:
        sweep_dir = Path(first.train.out_dir) / (first.train.run_name or default_run_name(first) + "-sweep")
        if sweep_dir.exists() and any(sweep_dir.iterdir()):
            raise ConfigError(f"{sweep_dir} already exists: continue it with --resume {sweep_dir} (same --sweep "
                              "options), or pick another --name")
        if ctx is not None:
            ctx_barrier()  # every rank has checked before rank 0 creates the folder
        if ctx is None or ctx.is_main:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(sweep_dir / PLAN_FILE, json.dumps(_jsonable({"base": base, "points": points}), indent=2) + "\n")
    if evaluate:
        _check_heldout(first)
    if lm is None:
        from saeforge.models import load_model

        device = first.model.device
        if ctx is not None and ctx.comm_device.type == "cuda" and device in ("auto", "cuda"):
            device = str(ctx.comm_device)
        lm = load_model(first.model.name, dtype=first.model.dtype, device=device)
    mode = parallel_mode(first.train.parallel, len(cfgs), ctx)
    run = _SweepRun(cfgs, names, points, sweep_dir, lm, ctx, mode, progress)
    run.train(resume is not None)
    rows = run.finish(evaluate)
    if ctx is not None:
        distributed.shutdown()
    return SweepResult(sweep_dir, rows)


def ctx_barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


class _SweepRun:
    """The stream, this process's trainers, and the loop that feeds one to the other."""

    def __init__(self, cfgs, names, points, sweep_dir: Path, lm, ctx, mode: str, progress: bool):
        from saeforge.activations.stream import hook_widths
        from saeforge.models import resolve_hook

        self.cfgs, self.names, self.points, self.sweep_dir = cfgs, names, points, sweep_dir
        self.lm, self.ctx, self.mode, self.progress = lm, ctx, mode, progress
        self.main = ctx is None or ctx.is_main
        self.B = cfgs[0].activations.batch_size
        self.hooks = list(dict.fromkeys(h for c in cfgs for h in c.model.hook_names()))  # in order of first use
        self.hook_points = {h: resolve_hook(lm.model, h) for h in self.hooks}
        widths = dict(zip(self.hooks, hook_widths(lm, list(self.hook_points.values()))))
        world = 1 if ctx is None else ctx.world
        costs = [c.sae.d_sae * sum(widths[h] for h in c.model.hook_names()) for c in cfgs]
        self.owner = assign_points(costs, world) if mode == "hooks" else [0] * len(cfgs)
        self.mine = [i for i in range(len(cfgs)) if mode != "hooks" or self.owner[i] == ctx.rank]
        self.keep = [h for h in self.hooks if any(h in cfgs[i].model.hook_names() for i in self.mine)]
        self.source = self._build_source()
        self.rows = None
        if mode == "data":
            from saeforge.training.distributed import rank_rows

            self.rows = rank_rows(self.B, ctx)
        self.members = [self._member(i) for i in self.mine]

    def _build_source(self):
        from saeforge.training.run import build_source

        first, union = self.cfgs[0], [self.hook_points[h] for h in self.hooks]
        stream_points = union[0] if len(union) == 1 else union
        if self.mode in ("single", "data") and (self.mode == "single" or first.activations.cache):
            return build_source(first, self.lm, stream_points)  # a cache is read whole by every rank
        from saeforge.activations import sharding

        if self.mode == "data":
            return sharding.ShardedActivationStream(self.lm, stream_points, first.data, first.activations, self.ctx,
                                                    seed=first.train.seed)
        if first.activations.cache:
            return sharding.KeepColumns(build_source(first, self.lm, stream_points), self.keep, self.B, first.train.seed)
        return sharding.HookParallelStream(self.lm, union, self.keep, first.data, first.activations, self.ctx,
                                           seed=first.train.seed)

    def _member(self, i: int) -> _Member:
        from saeforge.training.distributed import DataParallelTrainer
        from saeforge.training.run import CONFIG, build_sae
        from saeforge.training.trainer import Trainer

        cfg, name = self.cfgs[i], self.names[i]
        cols = [self.source.columns[h] for h in cfg.model.hook_names()]
        widths = [s.stop - s.start for s in cols]
        run_dir = self.sweep_dir / name
        sae, sae_cfg = build_sae(cfg, widths[0], self.lm.device, d_out=widths[1] if cfg.model.hook_out else 0)
        cfg = replace(cfg, sae=sae_cfg, train=replace(cfg.train, out_dir=str(self.sweep_dir), run_name=name))
        self.cfgs[i] = cfg
        if self.mode == "hooks" or self.main:  # the process that writes this point's folder
            run_dir.mkdir(parents=True, exist_ok=True)
            if not (run_dir / CONFIG).exists():
                cfg.save(run_dir / CONFIG)
        if self.mode == "data":
            trainer = DataParallelTrainer(sae, cfg.train, self.B, run_dir, self.ctx, progress=False)
        else:
            trainer = Trainer(sae, cfg.train, self.B, run_dir, progress=False)
        whole = len(cols) == 1 and cols[0].start == 0 and cols[0].stop == self.source.d_in
        return _Member(i, name, cfg, run_dir, trainer, None if whole else cols)

    # ---- the shared stream position ---------------------------------------------------
    def _save_position(self, step: int, state: dict | None) -> None:
        """stream.pt: the position after ``step`` batches, carried rows split by hook (after every trainer saved)."""
        state = dict(state or {})
        carry = state.pop("carry", None)
        by_hook = None if carry is None else {h: carry[:, s].clone() for h, s in self.source.columns.items()}
        if self.mode == "hooks":  # each rank holds its hooks' columns of the carried rows
            import torch.distributed as dist

            parts = [None] * self.ctx.world if self.main else None
            dist.gather_object(by_hook, parts, dst=0)
            if self.main:
                by_hook = None if all(p is None for p in parts) else {h: t for p in parts if p for h, t in p.items()}
        if self.main:
            with atomic_path(self.sweep_dir / STREAM_FILE) as tmp:
                torch.save({"step": step, "position": state, "carry": by_hook}, tmp)

    def _load_position(self) -> int:
        box = [None]
        if self.main and (self.sweep_dir / STREAM_FILE).exists():
            box[0] = torch.load(self.sweep_dir / STREAM_FILE, map_location="cpu", weights_only=True)
        if self.ctx is not None:
            import torch.distributed as dist

            dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return 0
        saved, state = box[0], dict(box[0]["position"])
        if saved["carry"] is not None:
            missing = set(self.source.columns) - set(saved["carry"])
            if missing:
                raise ConfigError(f"{self.sweep_dir / STREAM_FILE} has no carried rows for hooks {sorted(missing)}")
            n = len(next(iter(saved["carry"].values())))
            state["carry"] = torch.cat([saved["carry"][h] for h in self.source.columns] or [torch.zeros(n, 0)], dim=1)
        self.source.load_state_dict(state)
        return int(saved["step"])

    @staticmethod
    def _columns(x_ND: torch.Tensor, m: _Member) -> torch.Tensor:
        if m.cols is None:
            return x_ND
        return torch.cat([x_ND[:, s] for s in m.cols], dim=1) if len(m.cols) > 1 else x_ND[:, m.cols[0]].contiguous()

    def _view(self, x_BD: torch.Tensor, m: _Member) -> torch.Tensor:
        return self._columns(x_BD if self.rows is None else x_BD[self.rows], m)

    def _own_position(self, state: dict | None, m: _Member) -> dict | None:
        """The position a separate run of this point would be at (its hooks' columns of the carried rows)."""
        if state is None or m.cols is None or state.get("carry") is None:
            return state
        return {**state, "carry": self._columns(state["carry"], m)}

    # ---- training ----------------------------------------------------------------------
    def train(self, resume: bool) -> None:
        from tqdm import tqdm

        step = 0
        if resume:
            for m in self.members:
                m.trainer.resume()
            step = self._load_position()
            for m in self.members:
                t = m.trainer
                if t.step < min(step, t.n_steps):
                    raise ConfigError(f"{m.run_dir}: its checkpoint (step {t.step}) is older than the sweep's stream "
                                      f"position (step {step}); was the folder replaced? restart the sweep")
        end = max(math.ceil(c.train.total_tokens / self.B) for c in self.cfgs)
        every = self.cfgs[0].train.checkpoint_every_steps
        trainers = [m.trainer for m in self.members]
        batches = ((x, self.source.state_dict() if hasattr(self.source, "state_dict") else None) for x in self.source)
        head = []
        if step == 0:
            head = list(itertools.islice(batches, max(c.train.norm_estimate_batches for c in self.cfgs)))
            for m in self.members:  # same first batches -> the input scale of a separate run, for every point
                m.trainer.prepare(iter([(self._view(x, m), None) for x, _ in head]))
        for t in trainers:
            t.start_clock()
        self.t0 = time.perf_counter()
        bar = tqdm(total=end, initial=step, unit="step", desc=f"sweep x{len(self.cfgs)}",
                   disable=not (self.progress and self.main))
        for x_BD, state in itertools.chain(head, batches) if step < end else ():
            for m in self.members:
                if m.trainer.step == step and not m.trainer.done:  # a trainer ahead of the stream skips
                    m.trainer.train_step(self._view(x_BD, m), self._own_position(state, m))
            step += 1
            bar.update(1)
            if step % every == 0 or step == end:
                self._save_position(step, state)
            if step >= end:
                break
        bar.close()
        self.seconds = time.perf_counter() - self.t0
        for m in self.members:
            if not m.trainer.done:
                log.warning("%s: the activation source ran out after %d of %d steps", m.name, m.trainer.step,
                            m.trainer.n_steps)

    # ---- results -----------------------------------------------------------------------
    def finish(self, evaluate: bool) -> list[dict]:
        """Save (and evaluate) this process's SAEs; rank 0 gathers every row and writes sweep.json."""
        from saeforge.saes.formats import save_sae
        from saeforge.training.run import SAE_DIR, sae_metadata

        rows = []
        for m in self.members if (self.mode == "hooks" or self.main) else []:
            t, cfg, point = m.trainer, m.cfg, self.points[m.index]
            final = t.export_sae()
            sae_dir = save_sae(final, m.run_dir / SAE_DIR, sae_metadata(cfg, t.step * self.B, t.scale, t.scale_out),
                               sparsity_F=torch.log10(t.firing_frequency_F() + 1e-10))
            row = {"point": m.name, "values": {f"{s}.{f}": v for s, vs in point.items() for f, v in vs.items()},
                   "steps": t.step, "sae_dir": str(sae_dir), "dead_fraction_train": t.dead_mask_F.float().mean().item()}
            if self.mode == "hooks":
                row["rank"] = self.ctx.rank
            if evaluate:
                from saeforge.evals.report import evaluate as run_eval, write_eval_json

                hook_out = self.hook_points[cfg.model.hook_out] if cfg.model.hook_out else None
                metrics = run_eval(self.lm, self.hook_points[cfg.model.hook], final, cfg.data, cfg.eval,
                                   progress=self.progress and self.main, mean_ablation=cfg.eval.mean_ablation,
                                   hook_out=hook_out)
                write_eval_json(metrics, sae_dir)
                row.update({k: metrics.get(k) for k in ("l0", "explained_variance", "ce_score", "kl_score", "dead_fraction")})
            rows.append((m.index, row))
        me = {"rank": 0 if self.ctx is None else self.ctx.rank, "points": [self.names[i] for i in self.mine],
              "hooks": self.keep, "row_width": self.source.d_in,
              "received_widths": sorted(getattr(self.source, "received_widths", ()))}
        ranks = [me]
        if self.ctx is not None:
            import torch.distributed as dist

            gathered = [None] * self.ctx.world if self.main else None
            dist.gather_object((rows, me), gathered, dst=0)
            if self.main:
                rows = [r for part, _ in gathered for r in part]
                ranks = [info for _, info in gathered]
        if not self.main:
            return []
        rows = [r for _, r in sorted(rows, key=lambda ir: ir[0])]
        summary = {"sweep_seconds": self.seconds, "batch_size": self.B, "parallel": self.mode,
                   "hooks": self.hooks, "ranks": ranks, "points": rows}
        atomic_write_text(self.sweep_dir / SWEEP_FILE, json.dumps(summary, indent=2) + "\n")
        return rows


def format_sweep_table(rows: list[dict]) -> str:
    cols = [c for c in ("l0", "explained_variance", "ce_score", "kl_score", "dead_fraction") if any(c in r for r in rows)]
    head = ["point", "steps", *cols]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        cells = [r["point"], str(r["steps"])] + ["" if r.get(c) is None else f"{r[c]:.4g}" for c in cols]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def cmd_sweep(ns, base: dict) -> int:
    """`saeforge train --sweep ... [--resume SWEEP_DIR]`: the CLI's base config and options, one point per value."""
    from saeforge.cli import overrides
    from saeforge.training.distributed import is_main_process

    points = parse_sweep(ns.sweep)
    merged = {k: dict(v) for k, v in base.items()}
    for section, values in overrides(ns).items():
        merged.setdefault(section, {}).update(values)
    if ns.resume:
        plan = read_plan(ns.resume)
        if points != plan["points"]:
            raise ConfigError(f"--sweep {' '.join(ns.sweep)} is not the sweep in {ns.resume} (points "
                              f"{[point_name(p) for p in plan['points']]}): repeat its --sweep options")
        if overrides(ns) or ns.config:  # the original command again, with --resume: fine if nothing changed
            saved, given = plan["base"], _jsonable(merged)
            diff = sorted(f"{s}.{f}" for s in set(saved) | set(given)
                          for f in set(saved.get(s, {})) | set(given.get(s, {}))
                          if saved.get(s, {}).get(f) != given.get(s, {}).get(f))
            if diff:
                raise ConfigError(f"--resume continues {ns.resume} with its saved plan ({PLAN_FILE}), but {diff} "
                                  "differ from it: drop those options (or all of them, keeping --sweep)")
        merged = plan["base"]
    result = train_sweep(merged, points, evaluate=not ns.no_eval, progress=not ns.quiet, resume=ns.resume)
    if is_main_process():
        print(format_sweep_table(result.rows))
        print(f"sweep saved to {result.sweep_dir} ({len(result.rows)} SAEs, summary in {SWEEP_FILE})")
    return 0
