"""Stream a training run to Weights & Biases (``--log.wandb PROJECT``): an optional extra.

What goes to the wandb run: the whole RunConfig as its config; every metrics.jsonl record as one history
row at ``step=record["step"]`` (the same keys and numbers; wandb adds its own ``_step``, ``_runtime``,
``_timestamp``); at the end the eval metrics as a table (``eval/table``) and as summary values
(``eval/NAME``), and with ``--log.wandb_artifact true`` the saved ``sae/`` folder as a model artifact.

``wandb`` is imported inside ``WandbRun.__init__`` only: ``import saeforge.training.run`` and every run
without ``--log.wandb`` never import it. The wandb run id is kept in the run folder (``wandb_run_id.txt``)
so ``--resume`` continues the same wandb run; wandb drops re-logged steps at or below the last step it
holds, so the steps an interrupted run logged after its last checkpoint keep their first values there
(metrics.jsonl keeps the resumed ones). wandb's own files go under the run folder unless WANDB_DIR is set.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from saeforge.config import UserError
from saeforge.io import atomic_write_text

RUN_ID_FILE = "wandb_run_id.txt"


class WandbMissing(UserError, ImportError):
    """--log.wandb was given but the wandb package is not installed."""


def eval_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite scalar eval metrics (numbers and one-element tensors); per-latent tensors and lists stay out."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                continue
            v = v.item()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = v
    return out


class WandbRun:
    """One wandb run for one run folder: ``log`` is a Trainer sink, ``log_results`` the end, ``finish`` closes it."""

    def __init__(self, cfg, run_dir: str | Path):
        try:
            import wandb
        except ImportError:
            raise WandbMissing(
                f"--log.wandb {cfg.log.wandb} needs the wandb package: pip install 'saeforge[wandb]' "
                "(or drop --log.wandb)"
            ) from None
        self.wandb, run_dir = wandb, Path(run_dir)
        self.name = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_dir.name)
        id_file = run_dir / RUN_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:  # written before wandb starts, so a run interrupted at any point resumes into the same wandb run
            run_id = secrets.token_hex(4)
            atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(
            project=cfg.log.wandb,
            entity=cfg.log.wandb_entity or None,
            name=self.name,
            id=run_id,
            resume="allow",
            config=cfg.to_dict(),
            dir=os.environ.get("WANDB_DIR") or str(run_dir),
        )
        self.artifact = cfg.log.wandb_artifact

    def log(self, record: dict) -> None:
        """One metrics.jsonl record as one history row at its own step."""
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))

    def log_results(self, metrics: dict[str, Any] | None, sae_dir: str | Path) -> None:
        """The eval metrics (table + summary) and, if asked, the SAE folder as a ``model`` artifact."""
        if metrics is not None:
            scalars = eval_scalars(metrics)
            table = self.wandb.Table(columns=["metric", "value"], data=[[k, v] for k, v in scalars.items()])
            self.run.log({"eval/table": table})  # joins the last training row: no extra step
            self.run.summary.update({f"eval/{k}": v for k, v in scalars.items()})
        if self.artifact:
            art = self.wandb.Artifact(f"{self.name}-sae", type="model", description="saeforge SAE (SAELens format)")
            art.add_dir(str(sae_dir))
            self.run.log_artifact(art)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


@contextlib.contextmanager
def streaming(cfg, run_dir: str | Path, trainer, enabled: bool = True) -> Iterator[WandbRun | None]:
    """While the block runs, the trainer's records also go to wandb (None, and no import, without --log.wandb).

    The wandb run is finished on the way out, with exit code 1 if the block raised.
    """
    if not (enabled and cfg.log.wandb):
        yield None
        return
    wb = WandbRun(cfg, run_dir)
    trainer.sinks.append(wb.log)
    try:
        yield wb
    except BaseException:
        wb.finish(exit_code=1)
        raise
    wb.finish()
