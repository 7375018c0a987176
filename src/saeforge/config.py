"""Typed configs, one per concern, with a JSON round trip.

Every field carries its help text in ``metadata["help"]``; the CLI turns each field into a
``--section.field`` option with that text, so the docs and the flags never drift apart.
The SAE config is polymorphic: its class is looked up in the architecture registry from the
``architecture`` string, so a new architecture brings its own config fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
DEAD_LATENTS = ("auto", "none", "resample", "ghost")
PARALLEL = ("auto", "data", "hooks")


def F(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with help text (shown by ``--help`` and in the README table)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


class UserError(Exception):
    """Something the user got wrong (a value, a path, a file): the message says what and what to do.

    The CLI prints these as one line and exits with status 2; any other exception is a bug and keeps its
    traceback. Subclasses also derive from the builtin they refine (ValueError, FileNotFoundError, ...).
    """


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message says which field and what to do."""


class UsageError(UserError, ValueError):
    """An argument that cannot work (a prompt, a token, an option of a command); the message says what to give."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class ModelConfig:
    """The language model and the hook point(s) to read (``--model.*``)."""

    name: str = F("smollm2-135m", "Hub id, local model folder, .gguf file, or built-in name (smollm2-135m).")
    hook: str = F("blocks.3.hook_resid_post", "Hook point to read, e.g. blocks.3.hook_resid_post or a raw module path.")
    hook_out: str = F(
        "",
        "Transcoder: the hook point the decoder predicts from model.hook (e.g. blocks.3.hook_mlp_in -> blocks.3.hook_mlp_out); it must come after model.hook in the forward. Empty = an ordinary SAE reconstructing model.hook.",
    )
    dtype: str = F(
        "auto",
        "dtype of the language model: auto (bf16 where bf16 matmuls are fast, else float32; SAEFORGE_BF16_FAST=1/0 forces that call), float32, bfloat16, float16.",
    )
    device: str = F("auto", "cpu, cuda, cuda:N, or auto (CUDA when present).")
    compile: str = F(
        "auto",
        "torch.compile the LM layers that activation capture runs (live training): on, off, or auto = on for CPU runs of >= 500k live tokens (~20-35% faster forward; the compile costs ~5-25 s).",
    )
    random_init: bool = F(
        False,
        "Control experiment: the same architecture and tokenizer with freshly initialised weights (the model class's own init, seed 0) instead of the trained ones. Stored in the SAE's cfg.json, so eval and probe use the same random model.",
    )

    def __post_init__(self) -> None:
        check(self.dtype in ("auto",) + DTYPES, f"model.dtype={self.dtype!r}: expected auto or one of {DTYPES}")
        check(self.compile in ("auto", "on", "off"), f"model.compile={self.compile!r}: expected auto, on or off")
        check(
            not self.hook_out or self.hook_out != self.hook,
            f"model.hook_out={self.hook_out!r} is model.hook itself: leave hook_out empty for an ordinary SAE",
        )

    def hook_names(self) -> list[str]:
        """The hooks a training row holds, in column order: [hook] or, for a transcoder, [hook, hook_out]."""
        return [self.hook, self.hook_out] if self.hook_out else [self.hook]


@dataclass
class DataConfig:
    """The corpus and how it is cut into training windows and a held-out part (``--data.*``)."""

    corpus: str = F(
        "python-stdlib", "Built-in corpus name, local .txt/.jsonl/.parquet/.py file or folder, or a HF dataset id."
    )
    text_column: str = F("text", "Column holding the text in jsonl/parquet/HF datasets.")
    dataset_split: str = F("train", "Split to stream when the corpus is a Hugging Face dataset.")
    context_size: int = F(128, "Tokens per packed window, BOS included.")
    prepend_bos: bool = F(True, "Start every window with the tokenizer's BOS token.")
    exclude_special_tokens: bool = F(True, "Drop BOS, padding and special-token positions from training and metrics.")
    holdout_fraction: float = F(
        0.05, "Fraction of documents held out for evaluation (split by document hash; python-stdlib: ~117k tokens)."
    )
    seed: int = F(0, "Seed for the document split and order.")

    def __post_init__(self) -> None:
        check(self.context_size >= 2, f"data.context_size={self.context_size}: need at least 2")
        check(0.0 < self.holdout_fraction < 1.0, f"data.holdout_fraction={self.holdout_fraction}: expected 0 < f < 1")


@dataclass
class ActivationsConfig:
    """How activations reach the trainer: batch size, shuffling, an on-disk cache (``--activations.*``)."""

    batch_size: int = F(4096, "Activation rows (tokens) per SAE training batch.")
    lm_batch_size: int = F(16, "Sequences per language-model forward pass.")
    shuffle_sequences: int = F(512, "Sequences whose tokens are shuffled together before batching (the mixing buffer).")
    buffer_mb: int = F(
        1024,
        "Most megabytes the mixing buffer may hold: with wide rows (many hooks, e.g. transcoders at every layer) fewer than shuffle_sequences sequences are mixed at a time.",
    )
    cache: str = F(
        "", "Read activations from this cache folder (made by `saeforge cache`) instead of running the model."
    )
    shard_rows: int = F(65536, "Rows per safetensors shard when writing a cache.")
    prefetch: bool = F(
        False,
        "Live training: the LM computes the next chunk in a background thread while the SAE trains on this one (same batches). Off by default: on 2 CPU cores the two compete for the same cores (measured -4% and -6%); try it where the LM and the SAE have separate resources.",
    )

    def __post_init__(self) -> None:
        for name in ("batch_size", "lm_batch_size", "shuffle_sequences", "buffer_mb", "shard_rows"):
            check(getattr(self, name) > 0, f"activations.{name} must be positive")


@dataclass
class TrainConfig:
    """The optimisation: tokens, learning rate and schedules, dead latents, checkpoints, run folder (``--train.*``)."""

    total_tokens: int = F(1_000_000, "Training tokens (activation rows) to consume.")
    lr: float = F(4e-4, "Adam learning rate.")
    adam_beta1: float = F(0.9, "Adam beta1.")
    adam_beta2: float = F(0.999, "Adam beta2.")
    lr_warmup_steps: int = F(50, "Linear LR warm-up steps.")
    lr_decay_fraction: float = F(0.2, "Fraction of steps at the end over which the LR decays linearly to 0.")
    sparsity_warmup_fraction: float = F(0.05, "Fraction of steps over which the sparsity coefficient ramps up from 0.")
    grad_clip: float = F(1.0, "Max gradient norm (0 disables clipping).")
    normalize_activations: bool = F(True, "Scale inputs so E||x|| = sqrt(d_in) while training; folded back on save.")
    norm_estimate_batches: int = F(4, "Batches used to estimate the normalisation scale.")
    dead_after_tokens: int = F(
        200_000,
        "A latent counts as dead after this many training tokens without firing (dead-latent handling acts on those).",
    )
    dead_latents: str = F(
        "auto",
        "Dead-latent handling: auto (the architecture's own: AuxK for topk/batchtopk/matryoshka, none otherwise), "
        "none, resample (2023 recipe; not with sae.tied), ghost (ghost grads; relu and gated).",
    )
    resample_every_steps: int = F(
        0, "dead_latents=resample: steps between resamplings; 0 = one dead window (dead_after_tokens / batch size)."
    )
    p_end: float = F(
        1.0, "p-annealing (relu, gated): the penalty sum |f_i|^p anneals p linearly from 1 to this; 1 = off."
    )
    p_anneal_start_fraction: float = F(0.2, "p-annealing starts after this fraction of the steps.")
    p_anneal_end_fraction: float = F(0.8, "p reaches p_end at this fraction of the steps (before the LR decay).")
    p_anneal_updates: int = F(
        10, "Times p changes in the window; each change rescales lambda to keep the penalty's size."
    )
    autocast: str = F(
        "auto",
        "bf16 autocast for the SAE matmuls (parameters stay float32): auto (on where bf16 is fast; SAEFORGE_BF16_FAST=1/0 forces that call), on, off.",
    )
    parallel: str = F(
        "auto",
        "Sweeps under torchrun: data (every rank trains every SAE on its rows of each batch), hooks (each SAE on one "
        "rank, which receives only its hook's columns of every batch), auto (hooks when there are at least as many "
        "SAEs as ranks, else data). A single run is always data-parallel.",
    )
    checkpoint_every_steps: int = F(100, "Steps between atomic checkpoints.")
    log_every_steps: int = F(10, "Steps between metric lines in metrics.jsonl.")
    seed: int = F(0, "Seed for SAE initialisation.")
    out_dir: str = F("runs", "Folder that holds run folders.")
    run_name: str = F("", "Run folder name (default: derived from model, hook and architecture).")

    def __post_init__(self) -> None:
        check(self.total_tokens > 0, "train.total_tokens must be positive")
        check(self.lr > 0, "train.lr must be positive")
        check(0 <= self.lr_decay_fraction < 1, "train.lr_decay_fraction must be in [0, 1)")
        check(0 <= self.sparsity_warmup_fraction < 1, "train.sparsity_warmup_fraction must be in [0, 1)")
        check(self.autocast in ("auto", "on", "off"), f"train.autocast={self.autocast!r}: expected auto, on or off")
        check(self.checkpoint_every_steps > 0 and self.log_every_steps > 0, "train.*_every_steps must be positive")
        check(self.parallel in PARALLEL, f"train.parallel={self.parallel!r}: expected one of {PARALLEL}")
        check(
            self.dead_latents in DEAD_LATENTS,
            f"train.dead_latents={self.dead_latents!r}: expected one of {DEAD_LATENTS}",
        )
        check(
            self.resample_every_steps >= 0,
            f"train.resample_every_steps={self.resample_every_steps}: expected >= 0 (0 = one dead window)",
        )
        check(
            0 < self.p_end <= 1,
            f"train.p_end={self.p_end}: expected 0 < p_end <= 1 (1 = no p-annealing; "
            "p = 0 would be L0, which has no gradient)",
        )
        check(
            0 <= self.p_anneal_start_fraction < self.p_anneal_end_fraction <= 1,
            f"train.p_anneal_start_fraction={self.p_anneal_start_fraction}, p_anneal_end_fraction="
            f"{self.p_anneal_end_fraction}: expected 0 <= start < end <= 1",
        )
        check(self.p_anneal_updates >= 1, f"train.p_anneal_updates={self.p_anneal_updates}: expected >= 1")


@dataclass
class EvalConfig:
    """The held-out evaluation's budgets and thresholds (``--eval.*``)."""

    tokens: int = F(65536, "Held-out tokens for reconstruction metrics (L0, MSE, explained variance, density).")
    ce_tokens: int = F(
        8192, "Held-out tokens for the spliced CE/KL passes (clean, SAE, zero and mean ablation: four full forwards)."
    )
    mean_ablation: bool = F(
        True, "Also splice in the mean activation as a CE/KL baseline (one more forward per batch)."
    )
    batch_size: int = F(8, "Sequences per forward pass during evaluation.")
    dense_threshold: float = F(0.1, "A latent firing on more than this fraction of tokens counts as dense.")

    def __post_init__(self) -> None:
        check(self.tokens > 0 and self.ce_tokens >= 0 and self.batch_size > 0, "eval sizes must be positive")


@dataclass
class LogConfig:
    """Where a run's metrics go besides metrics.jsonl. wandb is an optional extra, imported only when asked."""

    wandb: str = F(
        "",
        "Weights & Biases project: stream each metrics.jsonl record, the config and the eval table to a wandb run "
        "(pip install 'saeforge[wandb]'; WANDB_MODE=offline keeps it local). Empty = no wandb.",
    )
    wandb_entity: str = F("", "wandb entity (user or team) that owns the project; empty = your default entity.")
    wandb_artifact: bool = F(False, "Also upload the saved SAE folder (sae/) to the wandb run as a model artifact.")

    def __post_init__(self) -> None:
        check(
            self.wandb or not (self.wandb_entity or self.wandb_artifact),
            "log.wandb_entity / log.wandb_artifact need log.wandb (the project); set --log.wandb PROJECT",
        )


# The sections every stage shares, by the name the CLI and config.json use ("sae" comes from the registry).
SECTION_CLASSES: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "activations": ActivationsConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "log": LogConfig,
}


@dataclass
class EvalSetup:
    """What evaluating a saved SAE needs of its run: the model and hook(s), the corpus split, the eval budgets."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    SECTIONS: typing.ClassVar[tuple[str, ...]] = ("model", "data", "eval")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalSetup:
        return cls(**{name: from_dict(SECTION_CLASSES[name], d.get(name, {}), name) for name in cls.SECTIONS})


def to_dict(cfg: Any) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def from_dict(cls: type, d: dict[str, Any], section: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, refusing unknown keys and coercing simple types.

    ``section`` ("train", "sae", ...) names the fields in error messages as the CLI spells them.
    """
    where = section or cls.__name__
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(names)
    check(not unknown, f"unknown {where} fields {sorted(unknown)}; valid: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: coerce(v, hints[k], f"{where}.{k}") for k, v in d.items()})


def coerce(value: Any, typ: Any, where: str) -> Any:
    """Turn a JSON or command-line value into ``typ`` (bool, int, float, str, lists of those)."""
    origin = typing.get_origin(typ)
    if origin in (list, tuple):
        (inner,) = set(typing.get_args(typ)) - {Ellipsis} or {str}
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        return origin(coerce(v, inner, where) for v in value)
    try:
        if typ is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={value!r}: expected {getattr(typ, '__name__', typ)}") from None
    return value


# ---- command-line options from the dataclasses (each stage's commands.py uses these) ----------------
SHORTHANDS = {
    "model": "model.name",
    "hook": "model.hook",
    "arch": "sae.architecture",
    "tokens": "train.total_tokens",
    "corpus": "data.corpus",
    "name": "train.run_name",
}


def add_config_options(p: argparse.ArgumentParser, sections: Sequence[str], sae_cls: type | None) -> None:
    """One ``--SECTION.FIELD`` option per field of ``sections`` (and of ``sae_cls`` as "sae"), help = field help."""
    classes = {k: v for k, v in SECTION_CLASSES.items() if k in sections}
    if sae_cls is not None:
        classes["sae"] = sae_cls
    for section, cls in classes.items():
        group = p.add_argument_group(f"{section} options")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            text = f"{f.metadata.get('help', '')} (default: {default!r})"
            # argparse %-formats help (for %(default)s): a literal "~20-35%" in a field's text must be %%
            group.add_argument(
                f"--{section}.{f.name}",
                dest=f"{section}.{f.name}",
                default=argparse.SUPPRESS,
                metavar=type(default).__name__.upper(),
                help=text.replace("%", "%%"),
            )
    for short, target in SHORTHANDS.items():
        if target.split(".")[0] in classes:
            p.add_argument(f"--{short}", dest=target, default=argparse.SUPPRESS, help=f"same as --{target}")


def overrides(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The ``--SECTION.FIELD`` values given on the command line, as {section: {field: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in vars(ns).items():
        if "." in key:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
    return out


def merged(base: dict[str, dict[str, Any]], ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``base`` (a --config file's dict) with the command line's ``--SECTION.FIELD`` values over it."""
    out = {k: dict(v) for k, v in base.items()}
    for section, values in overrides(ns).items():
        out.setdefault(section, {}).update(values)
    return out
