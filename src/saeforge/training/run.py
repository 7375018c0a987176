"""One training run end to end: config -> run folder -> trained SAE (SAELens format) -> eval.

Run folder layout::

    runs/NAME/config.json      the resolved RunConfig
    runs/NAME/metrics.jsonl    one line per log step
    runs/NAME/checkpoint.pt    the Trainer's whole state, replaced atomically
    runs/NAME/sae/             cfg.json, sae_weights.safetensors, sparsity.safetensors, eval.json

A transcoder (``model.hook_out`` set) trains on rows [x at model.hook | y at model.hook_out] from
one LM pass (see activations/stream.py) and is evaluated with its prediction spliced in at hook_out.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

import saeforge
from saeforge.activations import ActivationStream, CacheReader, ranks
from saeforge.activations.prefetch import close_prefetch, prefetch_chunks
from saeforge.activations.sharding import RankSlice, ShardedActivationStream
from saeforge.activations.stream import as_points
from saeforge.config import ConfigError
from saeforge.data import iter_documents, split_documents
from saeforge.evals.report import evaluate as run_eval
from saeforge.evals.report import write_eval_json
from saeforge.models import capture, compiled, load_model, patched, resolve_hook
from saeforge.models.compiled import compile_policy
from saeforge.saes.formats import save_sae
from saeforge.saes.registry import sae_class
from saeforge.training import wandb_log
from saeforge.training.config import RunConfig
from saeforge.training.distributed import DataParallelTrainer
from saeforge.training.malloc import keep_freed_memory
from saeforge.training.trainer import CHECKPOINT, Trainer

log = logging.getLogger(__name__)
CONFIG = "config.json"
SAE_DIR = "sae"


@dataclass
class RunResult:
    """What ``train`` returns: the run folder, its ``sae/`` folder, and the eval metrics (None without eval)."""

    run_dir: Path
    sae_dir: Path
    metrics: dict | None


def default_run_name(cfg: RunConfig) -> str:
    model = Path(cfg.model.name).name.removesuffix(".gguf")
    hooks = "-to-".join(cfg.model.hook_names())
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{model}-{hooks}-{cfg.sae.architecture}-{cfg.sae.d_sae}")


def sae_metadata(cfg: RunConfig, tokens: int, scale: float, scale_out: float | None = None) -> dict:
    """SAELens-style provenance plus our whole config, so `saeforge eval` can rebuild the data split.

    A transcoder adds SAELens's ``hook_name_out`` and the output scale folded into its decoder.
    """
    meta = {
        "model_name": cfg.model.name,
        "hook_name": cfg.model.hook,
        "context_size": cfg.data.context_size,
        "prepend_bos": cfg.data.prepend_bos,
        "dataset_path": cfg.data.corpus,
        "exclude_special_tokens": cfg.data.exclude_special_tokens,
        "training_tokens": tokens,
        "saeforge_version": saeforge.__version__,
        "saeforge_input_scale_folded": scale,
        "saeforge_config": cfg.to_dict(),
    }
    if cfg.model.hook_out:
        meta.update(hook_name_out=cfg.model.hook_out, saeforge_output_scale_folded=scale_out)
    return meta


def hook_points(cfg: RunConfig, lm):
    """The HookPoint a run reads, or [input, output] for a transcoder (rows are their concatenation)."""
    points = [resolve_hook(lm.model, name) for name in cfg.model.hook_names()]
    if not cfg.model.hook_out:
        return points[0]
    if forward_order(lm, points) != [p.name for p in points]:
        raise ConfigError(
            f"model.hook_out={cfg.model.hook_out!r} runs before model.hook={cfg.model.hook!r} in the "
            "forward; a transcoder predicts a later hook from an earlier one: swap them"
        )
    return points


def forward_order(lm, points) -> list[str]:
    """The names of ``points`` in the order they fire in one (probe) forward."""
    order: list[str] = []
    probe_ST = torch.zeros(1, 2, dtype=torch.long, device=lm.device)
    with patched(lm.model, {p: (lambda x, name=p.name: order.append(name)) for p in points}):
        capture(lm.model, points, probe_ST)  # registered after ours: ours see each point first
    return list(dict.fromkeys(order))


def _prepare_dir(cfg: RunConfig, resume: str | Path | None) -> tuple[RunConfig, Path]:
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / CONFIG).exists():
            raise ConfigError(
                f"cannot resume {run_dir}: no {CONFIG} there (is it a run folder made by `saeforge train`?)"
            )
        return RunConfig.load(run_dir / CONFIG), run_dir
    run_dir = Path(cfg.train.out_dir) / (cfg.train.run_name or default_run_name(cfg))
    if (run_dir / CHECKPOINT).exists() or (run_dir / SAE_DIR).exists():
        raise ConfigError(
            f"{run_dir} already holds a run: pass --resume {run_dir} to continue it, "
            "or choose another --train.run_name / --train.out_dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return cfg, run_dir


def check_heldout(cfg: RunConfig) -> None:
    """Fail before training, not after it, when the corpus has no held-out document to evaluate on."""
    next(iter(split_documents(iter_documents(cfg.data), cfg.data, "heldout")))


def build_source(cfg: RunConfig, lm, hook_point):
    """The training batches: a finished cache if ``activations.cache`` is set, else the live LM."""
    if cfg.activations.cache:
        reader = CacheReader(cfg.activations.cache, cfg.activations.batch_size, seed=cfg.train.seed)
        m, names = reader.manifest, [p.name for p in as_points(hook_point)]
        if (m["model"], reader.hooks) != (cfg.model.name, names):
            flags = " ".join(f"--model.{k} {v}" for k, v in zip(("hook", "hook_out"), reader.hooks))
            raise ConfigError(
                f"cache {cfg.activations.cache} holds {m['model']} at {reader.hooks}, but the config asks "
                f"for {cfg.model.name} at {names}: pass --model.name {m['model']} {flags}, or cache "
                "the hooks this run needs with `saeforge cache` (same --model.hook/--model.hook_out)"
            )
        return reader
    return ActivationStream(lm, hook_point, cfg.data, cfg.activations, part="train", seed=cfg.train.seed)


def build_sharded_source(cfg: RunConfig, lm, hook_point, ctx: ranks.DistContext):
    """The training batches of this rank: its slice of every global batch, from a cache or the live LM."""
    if cfg.activations.cache:
        source = build_source(cfg, lm, hook_point)
    else:
        source = ShardedActivationStream(
            lm, hook_point, cfg.data, cfg.activations, ctx, part="train", seed=cfg.train.seed
        )
    return RankSlice(source, cfg.activations.batch_size, ctx)


def build_sae(cfg: RunConfig, d_in: int, device: torch.device, d_out: int = 0):
    """The SAE to train, its widths taken from the model: d_in at model.hook, d_out at model.hook_out."""

    if cfg.sae.d_in not in (0, d_in):
        raise ConfigError(
            f"sae.d_in={cfg.sae.d_in} but the activations at {cfg.model.hook} have width {d_in}: "
            "leave sae.d_in at 0 to take it from the model"
        )
    if cfg.model.hook_out and d_out <= 0:
        raise ConfigError(
            f"model.hook_out={cfg.model.hook_out!r} (a transcoder) needs the output width: pass "
            "build_sae(..., d_out=width at hook_out), e.g. from the stream's .columns"
        )
    if cfg.sae.d_out not in (0, d_out):
        raise ConfigError(
            f"sae.d_out={cfg.sae.d_out} but the activations at {cfg.model.hook_out} have width {d_out}: "
            "leave sae.d_out at 0 to take it from the model"
        )
    sae_cfg = dataclasses.replace(cfg.sae, d_in=d_in, d_out=d_out, device=str(device))
    sae = sae_class(sae_cfg.architecture)(sae_cfg)
    sae.init_weights(torch.Generator().manual_seed(cfg.train.seed))
    return sae, sae_cfg


def train(
    cfg: RunConfig, resume: str | Path | None = None, evaluate: bool = True, progress: bool = True, lm=None
) -> RunResult:
    """Train (or resume) one SAE; save it in SAELens format; evaluate it on held-out text."""
    ctx = ranks.init()  # None in one process: no process group at all
    keep_freed_memory()  # glibc: no page faults on memory every step frees and takes again (training/malloc.py)
    cfg, run_dir = _prepare_dir(cfg, resume)
    if evaluate:
        check_heldout(cfg)
    if lm is None:
        device = cfg.model.device
        if ctx is not None and ctx.comm_device.type == "cuda" and device in ("auto", "cuda"):
            device = str(ctx.comm_device)  # one GPU per rank, not all of them on cuda:0
        lm = load_model(cfg.model.name, dtype=cfg.model.dtype, device=device, random_init=cfg.model.random_init)
    points = hook_points(cfg, lm)
    if not cfg.activations.cache and compile_policy(cfg.model.compile, lm.device, cfg.train.total_tokens):
        compiled.enable(lm)  # the live stream's LM forwards run compiled (models/compiled.py)
    if ctx is not None:
        source = build_sharded_source(cfg, lm, points, ctx)
    else:
        source = build_source(cfg, lm, points)
    widths = [source.columns[name].stop - source.columns[name].start for name in cfg.model.hook_names()]
    sae, sae_cfg = build_sae(cfg, widths[0], lm.device, d_out=widths[1] if cfg.model.hook_out else 0)
    cfg = dataclasses.replace(cfg, sae=sae_cfg)
    if resume is None and (ctx is None or ctx.is_main):
        cfg.save(run_dir / CONFIG)

    if ctx is not None:
        trainer = DataParallelTrainer(sae, cfg.train, cfg.activations.batch_size, run_dir, ctx, progress)
    else:
        trainer = Trainer(sae, cfg.train, cfg.activations.batch_size, run_dir, progress=progress)
    if trainer.resume(source):
        log.info("resumed %s at step %d of %d", run_dir, trainer.step, trainer.n_steps)
    if hasattr(source, "set_row_budget"):  # a live stream: the LM runs over only the rows training reads (batcher.py)
        source.set_row_budget(trainer.n_steps)
    if cfg.activations.prefetch and ctx is None and not cfg.activations.cache:  # LM || SAE (activations/prefetch.py)
        prefetch_chunks(source)  # the row budget set above keeps it from starting chunks past the end
    # --log.wandb: metrics.jsonl's records, the eval and (if asked) the SAE also go to wandb (rank 0 only)
    with wandb_log.streaming(cfg, run_dir, trainer, enabled=ctx is None or ctx.is_main) as wb:
        trainer.fit(source)
        close_prefetch(source)  # the LM is free again for the evaluation
        if ctx is not None:
            ranks.shutdown()  # every rank holds the same SAE; rank 0 alone saves and evaluates it
            if not ctx.is_main:
                return RunResult(run_dir, run_dir / SAE_DIR, None)
        if trainer.step < trainer.n_steps:
            log.warning("the activation source ran out after %d of %d steps", trainer.step, trainer.n_steps)

        final = trainer.export_sae()
        sae_dir = run_dir / SAE_DIR
        save_sae(
            final,
            sae_dir,
            sae_metadata(cfg, trainer.step * cfg.activations.batch_size, trainer.scale, trainer.scale_out),
            sparsity_F=torch.log10(trainer.firing_frequency_F() + 1e-10),
        )  # SAELens stores log10 frequency
        metrics = None
        if evaluate:
            hook_in, hook_out = (points[0], points[1]) if cfg.model.hook_out else (points, None)
            metrics = run_eval(
                lm,
                hook_in,
                final,
                cfg.data,
                cfg.eval,
                progress=progress,
                mean_ablation=cfg.eval.mean_ablation,
                hook_out=hook_out,
            )
            write_eval_json(metrics, sae_dir)
        if wb is not None:
            wb.log_results(metrics, sae_dir)
        return RunResult(run_dir, sae_dir, metrics)
