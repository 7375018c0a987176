"""One sweep's training: the shared stream, this process's trainers, the loop, the saved position, the summary.

training/sweep.py parses the sweep and calls ``SweepRun(...).train(resume)`` then ``.finish(evaluate)``;
its module docstring describes the layout, resume and the parallel modes implemented here.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from saeforge.activations import ranks, sharding
from saeforge.activations.stream import hook_widths
from saeforge.config import ConfigError
from saeforge.evals.report import evaluate as run_eval
from saeforge.evals.report import write_eval_json
from saeforge.io import atomic_path, atomic_write_text
from saeforge.models import resolve_hook
from saeforge.saes.formats import save_sae
from saeforge.training.config import RunConfig
from saeforge.training.distributed import DataParallelTrainer
from saeforge.training.run import CONFIG, SAE_DIR, build_sae, build_source, sae_metadata
from saeforge.training.trainer import Trainer

log = logging.getLogger(__name__)
STREAM_FILE = "stream.pt"
SWEEP_FILE = "sweep.json"  # the summary: one row of metrics per point


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


class SweepRun:
    """The stream, this process's trainers, and the loop that feeds one to the other."""

    def __init__(self, cfgs, names, points, sweep_dir: Path, lm, ctx, mode: str, progress: bool):
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
        batcher = getattr(self.source, "batcher", None)
        if batcher is not None:  # batches stay in the LM's dtype; _view gives each point float32 columns
            batcher.out_dtype = None
        self.rows = None
        if mode == "data":
            self.rows = ranks.rank_rows(self.B, ctx)
        self.members = [self._member(i) for i in self.mine]

    def _build_source(self):
        first, union = self.cfgs[0], [self.hook_points[h] for h in self.hooks]
        stream_points = union[0] if len(union) == 1 else union
        if self.mode in ("single", "data") and (self.mode == "single" or first.activations.cache):
            return build_source(first, self.lm, stream_points)  # a cache is read whole by every rank
        if self.mode == "data":
            return sharding.ShardedActivationStream(
                self.lm, stream_points, first.data, first.activations, self.ctx, seed=first.train.seed
            )
        if first.activations.cache:
            return sharding.KeepColumns(
                build_source(first, self.lm, stream_points), self.keep, self.B, first.train.seed
            )
        return sharding.HookParallelStream(
            self.lm, union, self.keep, first.data, first.activations, self.ctx, seed=first.train.seed
        )

    def _member(self, i: int) -> _Member:
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
        return self._columns(x_BD if self.rows is None else x_BD[self.rows], m).float()

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
                    raise ConfigError(
                        f"{m.run_dir}: its checkpoint (step {t.step}) is older than the sweep's stream "
                        f"position (step {step}); was the folder replaced? restart the sweep"
                    )
        end = max(math.ceil(c.train.total_tokens / self.B) for c in self.cfgs)
        every = self.cfgs[0].train.checkpoint_every_steps
        trainers = [m.trainer for m in self.members]
        if hasattr(self.source, "set_row_budget"):  # a live stream: the LM runs over only the rows the sweep reads
            self.source.set_row_budget(end)
        batches = ((x, self.source.state_dict() if hasattr(self.source, "state_dict") else None) for x in self.source)
        for t in trainers:
            t.start_clock()  # the LM time behind the first batches counts too
        self.t0 = time.perf_counter()
        head = []
        if step == 0:
            head = list(itertools.islice(batches, max(c.train.norm_estimate_batches for c in self.cfgs)))
            for m in self.members:  # same first batches -> the input scale of a separate run, for every point
                m.trainer.prepare(iter([(self._view(x, m), None) for x, _ in head]))
        bar = tqdm(
            total=end,
            initial=step,
            unit="step",
            desc=f"sweep x{len(self.cfgs)}",
            disable=not (self.progress and self.main),
        )
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
                log.warning(
                    "%s: the activation source ran out after %d of %d steps", m.name, m.trainer.step, m.trainer.n_steps
                )

    # ---- results -----------------------------------------------------------------------
    def finish(self, evaluate: bool) -> list[dict]:
        """Save (and evaluate) this process's SAEs; rank 0 gathers every row and writes sweep.json."""
        rows = []
        for m in self.members if (self.mode == "hooks" or self.main) else []:
            t, cfg, point = m.trainer, m.cfg, self.points[m.index]
            final = t.export_sae()
            sae_dir = save_sae(
                final,
                m.run_dir / SAE_DIR,
                sae_metadata(cfg, t.step * self.B, t.scale, t.scale_out),
                sparsity_F=torch.log10(t.firing_frequency_F() + 1e-10),
            )
            row = {
                "point": m.name,
                "values": {f"{s}.{f}": v for s, vs in point.items() for f, v in vs.items()},
                "steps": t.step,
                "sae_dir": str(sae_dir),
                "dead_fraction_train": t.dead_mask_F.float().mean().item(),
            }
            if self.mode == "hooks":
                row["rank"] = self.ctx.rank
            if evaluate:
                hook_out = self.hook_points[cfg.model.hook_out] if cfg.model.hook_out else None
                metrics = run_eval(
                    self.lm,
                    self.hook_points[cfg.model.hook],
                    final,
                    cfg.data,
                    cfg.eval,
                    progress=self.progress and self.main,
                    mean_ablation=cfg.eval.mean_ablation,
                    hook_out=hook_out,
                )
                write_eval_json(metrics, sae_dir)
                row.update(
                    {k: metrics.get(k) for k in ("l0", "explained_variance", "ce_score", "kl_score", "dead_fraction")}
                )
            rows.append((m.index, row))
        me = {
            "rank": 0 if self.ctx is None else self.ctx.rank,
            "points": [self.names[i] for i in self.mine],
            "hooks": self.keep,
            "row_width": self.source.d_in,
            "received_widths": sorted(getattr(self.source, "received_widths", ())),
        }
        ranks = [me]
        if self.ctx is not None:
            gathered = [None] * self.ctx.world if self.main else None
            dist.gather_object((rows, me), gathered, dst=0)
            if self.main:
                rows = [r for part, _ in gathered for r in part]
                ranks = [info for _, info in gathered]
        if not self.main:
            return []
        rows = [r for _, r in sorted(rows, key=lambda ir: ir[0])]
        summary = {
            "sweep_seconds": self.seconds,
            "batch_size": self.B,
            "parallel": self.mode,
            "hooks": self.hooks,
            "ranks": ranks,
            "points": rows,
        }
        atomic_write_text(self.sweep_dir / SWEEP_FILE, json.dumps(summary, indent=2) + "\n")
        return rows
