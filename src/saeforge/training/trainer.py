"""The training loop: an SAE, an optimiser and an iterator of activation batches.

All mutable state (SAE, Adam, step, normalisation scale, dead-latent counters, p-annealing's lambda
scale, the source's position) lives in this one object, and ``state_dict()`` holds all of it: a checkpoint is that
dict saved atomically, and a resumed run continues bit-for-bit where the interrupted one was.
The source only has to be an iterable of float32 ``x_BD`` batches; if it also has
``state_dict``/``load_state_dict`` its position is checkpointed too (live LM stream or cache).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from saeforge.config import ConfigError, TrainConfig
from saeforge.io import atomic_path, atomic_write_text
from saeforge.models.loading import bf16_is_fast
from saeforge.saes.base import LossContext
from saeforge.saes.losses import explained_variance
from saeforge.training.anneal import PAnneal, check_p_anneal
from saeforge.training.dead import make_handler
from saeforge.training.schedules import lr_factor, sparsity_factor

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CHECKPOINT_VERSION = 1


def make_adam(params, cfg: TrainConfig, fused: bool | None = None) -> torch.optim.Adam:
    """Adam with torch's fused kernel where every parameter's device has one (CPU and CUDA), else the plain one.

    The fused kernel updates each tensor in one pass instead of ~10 elementwise ops: measured 28 vs 80 ms
    a step for a 4608-latent, 576-wide SAE on 2 CPU cores. Same update up to rounding
    (tests/test_fast_paths.py compares the two); ``fused=False`` gives the plain for-loop Adam.
    """
    params = list(params)
    if fused is None:
        # contiguous only: torch 2.13's CPU kernel mixes up elements of a strided parameter whose gradient
        # has other strides (measured; tests/test_fast_paths.py), so such parameters get the plain Adam
        fused = all(
            p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point and p.is_contiguous() for p in params
        )
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=fused or None)


class Trainer:
    def __init__(
        self, sae, cfg: TrainConfig, batch_size: int, run_dir: str | Path | None = None, progress: bool = True
    ):
        self.sae, self.cfg, self.batch_size = sae, cfg, batch_size
        self.run_dir = Path(run_dir) if run_dir else None
        self.progress = progress
        self.n_steps = math.ceil(cfg.total_tokens / batch_size)
        self.opt = make_adam(sae.parameters(), cfg)
        self.device = next(sae.parameters()).device
        self.autocast = cfg.autocast == "on" or (cfg.autocast == "auto" and bf16_is_fast(self.device))
        F = sae.cfg.d_sae
        self.step = 0
        self.scale = 0.0  # input multiplier; 0 until estimated from the first batches
        self.scale_out = 0.0  # a transcoder's output-column multiplier (its own estimate); SAEs use scale alone
        self.tokens_since_fired_F = torch.zeros(F, dtype=torch.long, device=self.device)
        # Firing counts over the last 10% of steps: the SAE's sparsity.safetensors.
        self.late_fired_F = torch.zeros(F, dtype=torch.long, device=self.device)
        self.late_tokens = 0
        self.elapsed = 0.0
        self.source_seconds: float | None = (
            None  # fit(): time spent waiting for batches (the LM, live); logged as source_s
        )
        self.source_state: dict | None = None
        self.dead = make_handler(cfg, sae, batch_size)  # train.dead_latents (training/dead.py); stateless
        check_p_anneal(cfg, sae.cfg)
        self.anneal = PAnneal(cfg, self.n_steps)
        self.ranks = None  # saes.base.Ranks when data-parallel (training/distributed.py): global batch statistics
        # Callables given each metrics record as it is logged (after its metrics.jsonl line): wandb
        # (training/wandb_log.py) and anything else that streams metrics, without the loop knowing about them.
        self.sinks: list[Callable[[dict], None]] = []
        self._t0 = time.perf_counter()

    # ---- state -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "scale": self.scale,
            "scale_out": self.scale_out,
            "sae": self.sae.state_dict(),
            "opt": self.opt.state_dict(),
            "tokens_since_fired": self.tokens_since_fired_F,
            "late_fired": self.late_fired_F,
            "late_tokens": self.late_tokens,
            "elapsed": self.elapsed,
            "source_seconds": self.source_seconds,
            "source": self.source_state,
            "anneal": self.anneal.state_dict(),
        }

    def load_state_dict(self, d: dict) -> None:
        if d.get("version") != CHECKPOINT_VERSION:
            raise ConfigError(f"checkpoint version {d.get('version')} is not {CHECKPOINT_VERSION}")
        self.sae.load_state_dict(d["sae"])
        self.opt.load_state_dict(d["opt"])
        self.step, self.scale = int(d["step"]), float(d["scale"])
        self.scale_out = float(d.get("scale_out", d["scale"]))
        self.tokens_since_fired_F = d["tokens_since_fired"].to(self.device)
        self.late_fired_F = d["late_fired"].to(self.device)
        self.late_tokens, self.elapsed = int(d["late_tokens"]), float(d["elapsed"])
        self.source_seconds = d.get("source_seconds")  # absent in older checkpoints
        self.source_state = d["source"]
        if "anneal" in d:  # checkpoints from before p-annealing have none (and never annealed)
            self.anneal.load_state_dict(d["anneal"], self.device)

    def save_checkpoint(self) -> None:
        assert self.run_dir is not None
        with atomic_path(self.run_dir / CHECKPOINT) as tmp:
            torch.save(self.state_dict(), tmp)

    def resume(self, source=None) -> bool:
        """Load ``run_dir/checkpoint.pt`` if present (and put ``source`` at its position)."""
        path = self.run_dir / CHECKPOINT if self.run_dir else None
        if path is None or not path.exists():
            return False
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
        if source is not None and self.source_state is not None and hasattr(source, "load_state_dict"):
            source.load_state_dict(self.source_state)
        self._truncate_log()
        return True

    def _truncate_log(self) -> None:
        # Lines logged after the checkpoint belong to the lost part of the run: drop them. The log is appended
        # to, so a process killed mid-write leaves a half line at the end: it too came after the checkpoint.
        log = self.run_dir / METRICS
        if not log.exists():
            return
        lines = [ln for ln in log.read_text().splitlines() if ln]
        keep = []
        for i, ln in enumerate(lines):
            try:
                step = json.loads(ln)["step"]
            except (json.JSONDecodeError, KeyError):
                if i == len(lines) - 1:
                    break
                raise ConfigError(
                    f"{log} line {i + 1} is damaged ({ln[:80]!r}); fix or delete that line to resume"
                ) from None
            if step <= self.step:
                keep.append(ln)
        atomic_write_text(log, "".join(ln + "\n" for ln in keep))

    # ---- training --------------------------------------------------------------------
    @property
    def dead_mask_F(self) -> torch.Tensor:
        return self.tokens_since_fired_F >= self.cfg.dead_after_tokens

    def _batches(self, source: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, dict | None]]:
        """Batches paired with the source position *after* each one (what a checkpoint must store)."""
        for x_BD in source:
            yield x_BD, (source.state_dict() if hasattr(source, "state_dict") else None)

    def _estimate_scale(self, batches: list[torch.Tensor]) -> float:
        if not self.cfg.normalize_activations:
            return 1.0
        mean_norm = torch.cat(batches).double().norm(dim=-1).mean().item()
        return math.sqrt(self.sae.cfg.d_in) / mean_norm

    @property
    def done(self) -> bool:
        return self.step >= self.n_steps

    def prepare(self, batches: Iterator[tuple[torch.Tensor, dict | None]]) -> list[tuple[torch.Tensor, dict | None]]:
        """On a fresh run, read the first batches to set the input scale (and data-dependent init).

        Returns the batches it consumed; they must still be trained on, first.
        """
        if self.scale != 0.0:
            return []
        head = [b for _, b in zip(range(self.cfg.norm_estimate_batches), batches)]
        if not head:
            raise ConfigError("the activation source produced no batches: is the corpus (or cache) empty?")
        self.scale = self._estimate_scale([self.sae.split_io(x)[0] for x, _ in head])
        if self.sae.is_transcoder:  # the output side gets its own scale: E||scale_out * y|| = sqrt(d_out)
            d_in, d_out = self.sae.cfg.d_in, self.sae.d_out
            self.scale_out = self._estimate_scale([self.sae.split_io(x)[1] for x, _ in head]) * math.sqrt(d_out / d_in)
        init = getattr(self.sae, "init_from_data", None)
        if init is not None:
            init(self._scale_rows(self._gather_rows(head[0][0]).to(self.device)))
        return head

    def _scale_rows(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Rows times the input scale; a transcoder's rows [x | y] as [scale * x | scale_out * y]."""
        if not self.sae.is_transcoder:
            return x_BD * self.scale
        x_BD, y_BO = self.sae.split_io(x_BD)
        return torch.cat([x_BD * self.scale, y_BO * self.scale_out], dim=-1)

    def start_clock(self) -> None:
        self._t0 = time.perf_counter() - self.elapsed

    def train_step(self, x_BD: torch.Tensor, source_state: dict | None = None) -> dict | None:
        """One optimiser step on a raw batch, then logging and checkpointing when due.

        ``source_state`` is the source's position after this batch (stored in checkpoints).
        Returns the metrics record when this step was logged.
        """
        parts = self._step(self._scale_rows(x_BD.to(self.device, non_blocking=True)))
        self.step += 1
        self.source_state = source_state
        self.elapsed = time.perf_counter() - self._t0
        rec = None
        if self.step % self.cfg.log_every_steps == 0 or self.done:
            rec = self._log(parts)
        if self.run_dir and (self.step % self.cfg.checkpoint_every_steps == 0 or self.done):
            self.save_checkpoint()
        return rec

    def fit(self, source: Iterable[torch.Tensor]) -> None:
        """Train until ``n_steps`` (or until the source runs out), with a progress bar."""
        from tqdm import tqdm

        self.start_clock()  # the time spent producing batches counts too
        self.source_seconds = self.source_seconds or 0.0
        t = time.perf_counter()
        batches = self._batches(source)
        head = self.prepare(batches)
        bar = tqdm(
            total=self.n_steps,
            initial=self.step,
            unit="step",
            desc="train",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        for x_BD, pos in _chain(head, batches):
            self.source_seconds += time.perf_counter() - t  # waiting for this batch (live: the LM's forwards)
            if self.done:
                break
            rec = self.train_step(x_BD, pos)
            if rec is not None:
                bar.set_postfix(
                    tok_s=f"{rec['tokens_per_s']:.0f}",
                    loss=f"{rec['loss']:.4g}",
                    l0=f"{rec['l0']:.1f}",
                    ev=f"{rec['explained_variance']:.3f}",
                    dead=f"{rec['dead_fraction']:.2%}",
                )
            bar.update(1)
            t = time.perf_counter()
        bar.close()

    def _step(self, x_BD: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(self.step, self.n_steps, cfg.lr_warmup_steps, cfg.lr_decay_fraction)
        p, p_probe = self.anneal.begin_step(self.step, self._gather_rows)
        dead_mask_F = self.dead_mask_F
        ctx = LossContext(
            sparsity_scale=sparsity_factor(self.step, self.n_steps, cfg.sparsity_warmup_fraction)
            * self.anneal.lambda_scale,
            dead_mask_F=self.dead.loss_dead_mask(dead_mask_F),
            p=p,
            p_probe=p_probe,
            ranks=self.ranks,
        )
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.sae.training_loss(x_BD, ctx)
        loss = out.loss
        extra = self.dead.extra_loss(self.sae, x_BD, out, dead_mask_F)  # ghost grads
        if extra is not None:
            loss = loss + extra
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self._sync_grads()
        self.sae.remove_parallel_grads()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), cfg.grad_clip)
        self.opt.step()
        self.sae.after_step()
        with torch.no_grad():
            fires_F, n_rows = self._sum_over_ranks(out.fire_count_F(), len(x_BD))
            self.tokens_since_fired_F += n_rows
            self.tokens_since_fired_F[fires_F > 0] = 0
            if self.step >= int(0.9 * self.n_steps):
                self.late_fired_F += fires_F
                self.late_tokens += n_rows
            self.anneal.observe(out.parts)
            parts = {k: v for k, v in out.parts.items() if k != "lp_probe"}
            parts["loss"] = loss.detach()
            if extra is not None:
                parts["ghost"] = extra.detach()
            if self.anneal.on:
                parts["p"], parts["lambda_scale"] = torch.tensor(p), torch.tensor(self.anneal.lambda_scale)
            if (self.step + 1) % cfg.log_every_steps == 0 or self.step + 1 == self.n_steps:
                y_BD = self.sae.split_io(x_BD)[1]  # what x_hat reconstructs (a transcoder's output columns)
                parts["explained_variance"] = explained_variance(y_BD, out.x_hat_BD, self.ranks)  # the global batch's
                parts["l0"] = fires_F.sum() / n_rows
        self.dead.after_step(self, x_BD, out)  # resampling (after the firing counts it reads)
        return parts

    # ---- data-parallel hooks: training/distributed.py overrides them; one process: identity --
    def _gather_rows(self, x_BD: torch.Tensor) -> torch.Tensor:
        return x_BD  # all ranks' rows of a batch (for data-dependent init)

    def _sync_grads(self) -> None:
        pass  # average gradients over ranks

    def _sum_over_ranks(self, fires_F: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, int]:
        return fires_F, n_rows  # firing counts and rows of the whole global batch

    def _log(self, parts: dict[str, torch.Tensor]) -> dict:
        rec = {
            "step": self.step,
            "tokens": self.step * self.batch_size,
            "lr": self.opt.param_groups[0]["lr"],
            "dead_fraction": self.dead_mask_F.float().mean().item(),
            "tokens_per_s": self.step * self.batch_size / max(self.elapsed, 1e-9),
            "elapsed_s": self.elapsed,
        }
        if self.source_seconds is not None:  # of elapsed_s, the part spent waiting for batches (the rest: SAE steps)
            rec["source_s"] = self.source_seconds
        rec.update({k: float(v) for k, v in parts.items()})
        if self.run_dir:
            with open(self.run_dir / METRICS, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        for sink in self.sinks:
            sink(rec)
        return rec

    # ---- results ---------------------------------------------------------------------
    def firing_frequency_F(self) -> torch.Tensor:
        return self.late_fired_F.double().cpu() / max(self.late_tokens, 1)

    def export_sae(self):
        """A copy of the SAE that acts on raw activations (the normalisation scale folded in)."""
        sae = copy.deepcopy(self.sae)
        sae.fold_input_scale(self.scale, self.scale_out if self.sae.is_transcoder else None)
        return sae


def _chain(head: list, rest: Iterator) -> Iterator:
    yield from head
    yield from rest
