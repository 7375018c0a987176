"""RunConfig: the whole config of a training run (what ``config.json`` in a run folder holds).

It joins the shared sections of ``saeforge.config`` with the SAE section, whose class the architecture
registry picks from the ``architecture`` string, and checks the combinations that only training knows
(dead-latent handling, p-annealing, transcoders) before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saeforge.config import (
    ActivationsConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    TrainConfig,
    check,
    from_dict,
    to_dict,
)
from saeforge.io import atomic_write_text
from saeforge.saes.registry import config_class, transcoder_architectures
from saeforge.training.anneal import check_p_anneal
from saeforge.training.dead import check_dead_latents

# TopK's fast-path switches (now saes.topk.FastPaths, not config): same latents, same losses up to rounding.
RETIRED_SAE_FIELDS = ("sparse_decode", "sparse_encoder_grad", "blocked_topk")


def _sae_config_default() -> Any:
    return config_class("topk")()


@dataclass
class RunConfig:
    """Every section of one training run: what ``saeforge train`` options set and ``config.json`` holds.

    ``sae`` is the architecture's own config class (``saes.registry.config_class(name)()``); ``from_dict``
    picks it from ``sae.architecture``. Combinations only training can judge are checked on construction.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    sae: Any = field(default_factory=_sae_config_default)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    # config.json files from before the log section have none: it takes its defaults (no wandb)
    SECTIONS: typing.ClassVar[tuple[str, ...]] = ("model", "data", "activations", "sae", "train", "eval", "log")

    def __post_init__(self) -> None:
        # train options that only some architectures support: fail before any model is loaded
        check_dead_latents(self.train, self.sae)
        check_p_anneal(self.train, self.sae)
        self._check_transcoder()

    def _check_transcoder(self) -> None:
        """model.hook_out makes the SAE a transcoder: check what it needs before any model is loaded."""
        if not self.model.hook_out:
            check(
                self.sae.d_out == 0 and not self.sae.skip,
                f"sae.d_out={self.sae.d_out}, sae.skip={self.sae.skip} describe a transcoder: set model.hook_out "
                "(the hook it predicts), or leave d_out 0 and skip False",
            )
            return
        archs = transcoder_architectures()
        check(
            self.sae.architecture in archs,
            f"sae.architecture={self.sae.architecture!r} cannot be a transcoder (model.hook_out is set); use one of {archs}",
        )
        check(
            self.train.dead_latents not in ("resample", "ghost"),
            f"train.dead_latents={self.train.dead_latents!r} is not implemented for transcoders; use auto or none",
        )
        check(
            not getattr(self.sae, "tied", False),
            "sae.tied=True with model.hook_out: a transcoder's encoder "
            "reads another space than its decoder writes; leave tied False",
        )
        # b_dec lives in the output space: it cannot be subtracted from the input (SAELens refuses it too)
        self.sae = dataclasses.replace(self.sae, apply_b_dec_to_input=False)

    def to_dict(self) -> dict[str, Any]:
        return {name: to_dict(getattr(self, name)) for name in self.SECTIONS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        unknown = set(d) - set(cls.SECTIONS)
        check(not unknown, f"unknown config sections {sorted(unknown)}; valid: {list(cls.SECTIONS)}")
        # Fields that older saeforge versions wrote and that never changed a result: an old run folder resumes.
        sae_d = {k: v for k, v in d.get("sae", {}).items() if k not in RETIRED_SAE_FIELDS}
        sae_cls = config_class(sae_d.get("architecture", "topk"))
        return cls(
            model=from_dict(ModelConfig, d.get("model", {}), "model"),
            data=from_dict(DataConfig, d.get("data", {}), "data"),
            activations=from_dict(ActivationsConfig, d.get("activations", {}), "activations"),
            sae=from_dict(sae_cls, sae_d, "sae"),
            train=from_dict(TrainConfig, d.get("train", {}), "train"),
            eval=from_dict(EvalConfig, d.get("eval", {}), "eval"),
            log=from_dict(LogConfig, d.get("log", {}), "log"),
        )

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); fix or delete it") from e
