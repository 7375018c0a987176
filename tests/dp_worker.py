"""Train small SAEs data-parallel and save every rank's final state (tests/test_distributed.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dp_worker.py OUT MODEL CORPUS ARCH...

Each rank writes OUT/ARCH-rank{R}.pt, so a test can check that the ranks hold the same SAE (which
a checkpoint written by rank 0 alone cannot show). ``train_one(..., ctx=None)`` is the one-process
reference, with the same components as `saeforge train`. model.dtype and train.autocast are auto: the
caller picks the precision with SAEFORGE_BF16_FAST, which torchrun passes on to the workers; each saved
state records the LM dtype and autocast flag that were used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

HOOK = "blocks.1.hook_resid_post"
B, TOKENS = 256, 16384  # 64 steps of a global batch of 256


def run_config(model: str, corpus: str, arch: str):
    from saeforge.training.config import RunConfig

    sae = {"architecture": arch, "d_sae": 512, "k": 8}
    if arch == "matryoshka":
        sae["group_sizes"] = [64, 128, 320]
    return RunConfig.from_dict(
        {
            "model": {"name": model, "hook": HOOK, "device": "cpu"},
            "data": {"corpus": corpus, "context_size": 64, "holdout_fraction": 0.2},
            "activations": {"batch_size": B, "shuffle_sequences": 32},
            "sae": sae,
            "train": {"total_tokens": TOKENS, "dead_after_tokens": 1024, "log_every_steps": 8},
        }
    )


def train_one(lm, model: str, corpus: str, arch: str, ctx=None) -> dict:
    from saeforge.models import resolve_hook
    from saeforge.training.run import build_sae, build_source
    from saeforge.training.trainer import Trainer

    cfg = run_config(model, corpus, arch)
    hook = resolve_hook(lm.model, HOOK)
    if ctx is None:
        source = build_source(cfg, lm, hook)
        trainer = Trainer(build_sae(cfg, source.d_in, lm.device)[0], cfg.train, B, None, progress=False)
    else:
        from saeforge.training.distributed import DataParallelTrainer
        from saeforge.training.run import build_sharded_source

        source = build_sharded_source(cfg, lm, hook, ctx)
        trainer = DataParallelTrainer(
            build_sae(cfg, source.d_in, lm.device)[0], cfg.train, B, None, ctx, progress=False
        )
    trainer.fit(source)
    return {
        "sae": trainer.sae.state_dict(),
        "step": trainer.step,
        "late_fired": trainer.late_fired_F,
        "tokens_since_fired": trainer.tokens_since_fired_F,
        "lm_dtype": str(lm.dtype).replace("torch.", ""),
        "autocast": trainer.autocast,
    }


def main(out: str, model: str, corpus: str, *archs: str) -> None:
    from saeforge.activations import ranks
    from saeforge.models import load_model

    ctx = ranks.init()
    lm = load_model(model, dtype="auto", device="cpu")
    for arch in archs:
        torch.save(train_one(lm, model, corpus, arch, ctx), Path(out) / f"{arch}-rank{ctx.rank}.pt")
    ranks.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
    # As saeforge.cli does for torchrun workers: the results are saved, so skip the C++ static destructors
    # (a gloo thread still joinable there can abort the process at exit on a loaded machine).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
