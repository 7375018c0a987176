"""evaluate(): reconstruction metrics and spliced CE/KL over held-out text; a table and eval.json.

Token budgets: ``eval_cfg.tokens`` and ``eval_cfg.ce_tokens`` are counted in window tokens
(ceil(budget / context_size) windows of the held-out part, BOS included). The CE pass reuses the
first windows of the reconstruction pass, so both read the same text; windows are streamed from
the packer (twice), never held in a list, so memory does not grow with the budgets. What the metrics actually
cover is reported: ``n_tokens`` (activation rows scored, excluded positions dropped),
``ce_n_predictions`` (next-token predictions scored), and the window counts. When the held-out
part runs out first, the metrics cover what exists and a warning says so.

Transcoders (``hook_out`` given): reconstruction metrics compare the prediction from the input
hook with the activation at the output hook (EV, MSE, shrinkage, the mean-ablation baseline are
all of the output hook), and CE/KL splice the prediction in at the output hook in the same
forward (evals/splice.py). MDL is skipped for them (it describes an input's own reconstruction).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from saeforge.config import ConfigError, DataConfig, EvalConfig
from saeforge.data import excluded_mask, iter_documents, pack_windows, split_documents
from saeforge.evals.mdl import description_length
from saeforge.evals.metrics import ReconstructionStats
from saeforge.evals.positions import PositionStats, by_position
from saeforge.evals.splice import run_sae, spliced_ce_kl
from saeforge.io import atomic_write_text
from saeforge.models.hooks import capture, resolve_hook


def _sae_d_in(sae: object) -> int | None:
    d_in = getattr(sae, "d_in", None)
    if d_in is None and getattr(sae, "W_enc", None) is not None:
        d_in = sae.W_enc.shape[0]
    return None if d_in is None else int(d_in)


def check_width(
    sae: object, width: int, hook_name: str, model_name: str, out_width: int | None = None, hook_out_name: str = ""
) -> None:
    """Raise a ValueError naming both widths when the SAE cannot read this hook's activations.

    ``out_width`` / ``hook_out_name``: the output hook of a transcoder (None: the SAE must be a plain SAE).
    """
    d_in = _sae_d_in(sae)
    if d_in is not None and d_in != width:
        raise ConfigError(
            f"the SAE expects activations of width d_in={d_in}, but hook {hook_name!r} of model {model_name!r} "
            f"gives width {width}. Evaluate with the model and hook the SAE was trained on (its cfg.json "
            "metadata has model_name and hook_name); `saeforge hooks` lists this model's hook points."
        )
    transcoder = bool(getattr(sae, "is_transcoder", False))
    if transcoder and out_width is None:
        raise ConfigError(
            f"this is a transcoder (d_in={d_in} at {hook_name!r} -> d_out={sae.d_out}), not an SAE of one hook: give "
            "its output hook (--model.hook_out; its cfg.json metadata has hook_name_out)"
        )
    if out_width is not None and not transcoder:
        raise ConfigError(
            f"hook_out={hook_out_name!r} was given, but this SAE reconstructs its own input "
            "(cfg.json has no d_out): drop --model.hook_out"
        )
    if out_width is not None and sae.d_out != out_width:
        raise ConfigError(
            f"the transcoder predicts width d_out={sae.d_out}, but its output hook {hook_out_name!r} of model "
            f"{model_name!r} gives width {out_width}. Use the hooks it was trained on (cfg.json metadata "
            "hook_name and hook_name_out)."
        )


def _batches(windows_T: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Stack a (lazy) stream of windows into [S, T] batches; only one batch is held at a time."""
    it = iter(windows_T)
    while chunk := list(islice(it, batch_size)):
        yield torch.stack(chunk)


def heldout_windows(lm, data_cfg: DataConfig) -> Iterator[torch.Tensor]:
    """A fresh lazy stream of held-out windows; packing is deterministic, so every call yields the same ones."""
    docs = split_documents(iter_documents(data_cfg), data_cfg, "heldout")
    return pack_windows(docs, lm.tokenizer, data_cfg)


@dataclass
class ReconstructionPass:
    stats: ReconstructionStats
    positions: PositionStats
    n_windows: int
    sample_ND: torch.Tensor | None  # the first activation rows (float32), kept for MDL; None when not asked


@torch.inference_mode()
def reconstruction_stats(
    lm,
    hook,
    sae,
    windows_T: Iterable[torch.Tensor],
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
    progress: bool = False,
    total_windows: int | None = None,
    keep_rows: int = 0,
    hook_out=None,
) -> ReconstructionPass:
    """Stream windows through the LM and the SAE: whole-set and per-position float64 sums (SAE in float32).

    Memory is one batch plus O(T * d_in + d_sae) sums, plus ``keep_rows`` activation rows when asked.
    ``hook_out``: a transcoder's output hook; the statistics then compare its prediction with that hook.
    """
    from tqdm.auto import tqdm

    stats: ReconstructionStats | None = None
    pos: PositionStats | None = None
    kept: list[torch.Tensor] = []
    n_kept = n_windows = 0
    total = None if total_windows is None else math.ceil(total_windows / eval_cfg.batch_size)
    for tokens_ST in tqdm(
        _batches(windows_T, eval_cfg.batch_size),
        total=total,
        desc="reconstruction",
        unit="batch",
        disable=None if progress else True,
    ):
        acts = capture(lm.model, [hook] if hook_out is None else [hook, hook_out], tokens_ST)
        x_in_STD = acts[hook.name]
        x_STD = x_in_STD if hook_out is None else acts[hook_out.name]  # what is reconstructed
        keep_ST = ~excluded_mask(tokens_ST, lm.tokenizer, data_cfg).to(x_STD.device)
        if stats is None:
            check_width(
                sae,
                x_in_STD.shape[-1],
                hook.name,
                lm.name,
                None if hook_out is None else x_STD.shape[-1],
                "" if hook_out is None else hook_out.name,
            )
        x_ND = x_STD[keep_ST].float()
        f_NF, x_hat_ND = run_sae(sae, x_ND if hook_out is None else x_in_STD[keep_ST].float())
        if stats is None:
            stats = ReconstructionStats(x_ND.shape[-1], f_NF.shape[-1], eval_cfg.dense_threshold)
            pos = PositionStats(x_STD.shape[1], x_STD.shape[-1])
        stats.update(x_ND, x_hat_ND, f_NF)
        x_hat_STD = torch.zeros(x_STD.shape, dtype=torch.float32)
        x_hat_STD[keep_ST.cpu()] = x_hat_ND.detach().to("cpu", torch.float32)
        pos.update(x_STD.float(), x_hat_STD, keep_ST)
        if n_kept < keep_rows:
            kept.append(x_ND[: keep_rows - n_kept].to("cpu", torch.float32))
            n_kept += len(kept[-1])
        n_windows += tokens_ST.shape[0]
    if stats is None:
        raise ValueError("reconstruction_stats: no windows to evaluate")
    return ReconstructionPass(stats, pos, n_windows, torch.cat(kept) if kept else None)


def evaluate(
    lm,
    hook_point,
    sae,
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
    progress: bool = True,
    mean_ablation: bool = True,
    mdl_tokens: int = 0,
    position_buckets: int = 16,
    hook_out=None,
) -> dict[str, Any]:
    """All eval metrics for ``sae`` at ``hook_point`` (a name or HookPoint) of ``lm`` (a LoadedModel).

    A transcoder reads ``hook_point`` and predicts ``hook_out`` (a name or HookPoint): its metrics are
    against ``hook_out`` and its CE/KL splice replaces ``hook_out`` (see the module docstring).

    Returns plain numbers plus ``feature_freq`` (float64 tensor [d_sae], e.g. for a sparsity file)
    and ``by_position`` (EV and CE score per bucket of context positions, see ``positions``).
    ``mean_ablation`` adds a mean-activation baseline to the CE/KL pass (one more forward per batch).
    ``mdl_tokens`` > 0 adds MDL description length (``evals.mdl``) over the first that many rows.
    Windows stream twice from the packer (reconstruction, then CE on the first ``ce_tokens``), so
    memory does not grow with the token budget.
    """
    hook = resolve_hook(lm.model, hook_point)
    out = None if hook_out is None else resolve_hook(lm.model, hook_out)
    if out is not None:
        mdl_tokens = 0  # MDL describes an input's own reconstruction; not defined here
    T = data_cfg.context_size
    n_recon, n_ce = math.ceil(eval_cfg.tokens / T), math.ceil(eval_cfg.ce_tokens / T)
    first_T = next(iter(heldout_windows(lm, data_cfg)), None)
    if first_T is None:
        raise ConfigError(
            f"the held-out part of {data_cfg.corpus!r} holds no complete window of {T} tokens; use a larger "
            "corpus, a larger data.holdout_fraction, or a smaller data.context_size"
        )

    rp = reconstruction_stats(
        lm,
        hook,
        sae,
        islice(heldout_windows(lm, data_cfg), n_recon),
        data_cfg,
        eval_cfg,
        progress,
        total_windows=n_recon,
        keep_rows=mdl_tokens,
        hook_out=out,
    )
    recon = rp.stats.result()
    metrics: dict[str, Any] = {
        "model": lm.name,
        "hook": hook.name,
        **({} if out is None else {"hook_out": out.name}),
        "corpus": data_cfg.corpus,
        "context_size": T,
        "tokens_requested": eval_cfg.tokens,
        "ce_tokens_requested": eval_cfg.ce_tokens,
        "n_windows": rp.n_windows,
    }
    metrics.update({k: v for k, v in recon.items() if k != "mean_x"})

    ce_sums = None
    n_available = rp.n_windows
    if n_ce > 0:
        pairs = (
            (tok_ST, excluded_mask(tok_ST, lm.tokenizer, data_cfg))
            for tok_ST in _batches(islice(heldout_windows(lm, data_cfg), n_ce), eval_cfg.batch_size)
        )
        # The mean over the scored eval tokens: the standard "mean ablation" baseline.
        mean_x_D = recon["mean_x"].float() if mean_ablation else None
        ce = spliced_ce_kl(
            lm.model,
            hook if out is None else out,
            sae,
            pairs,
            mean_x_D=mean_x_D,
            progress=progress,
            total=math.ceil(n_ce / eval_cfg.batch_size),
            by_position=True,
            hook_in=None if out is None else hook,
        )
        ce_sums = ce.pop("ce_by_position")
        metrics.update(ce)
        n_available = max(n_available, ce["ce_n_sequences"])
    if n_available < max(n_recon, n_ce):
        warnings.warn(
            f"held-out text of {data_cfg.corpus!r} ran out after {n_available} windows ({n_available * T} "
            f"tokens); asked for {eval_cfg.tokens} reconstruction and {eval_cfg.ce_tokens} CE tokens. Metrics "
            "cover what exists; raise data.holdout_fraction or use a larger corpus for more.",
            stacklevel=2,
        )
    metrics["by_position"] = by_position(rp.positions, ce_sums, position_buckets)
    if mdl_tokens > 0 and rp.sample_ND is not None:
        metrics["mdl"] = description_length(sae, rp.sample_ND)
    return metrics


# ---------------------------------------------------------------- presentation


def _pct(m: dict[str, Any], key: str) -> str:
    return f"{m[key]:.2%}"


# (label, key that must be present, formatter)
METRIC_ROWS: list[tuple[str, str, Any]] = [
    ("model", "model", str),
    ("hook", "hook", str),
    ("output hook (transcoder)", "hook_out", str),
    ("corpus (held-out part)", "corpus", str),
    (
        "tokens scored (reconstruction)",
        "n_tokens",
        lambda m: f"{m['n_tokens']:,} in {m['n_windows']} windows (excluded positions dropped)",
    ),
    ("explained variance", "explained_variance", lambda m: f"{m['explained_variance']:.4f}"),
    ("L0", "l0", lambda m: f"{m['l0']:.2f}"),
    ("MSE (sum over d_in)", "mse", lambda m: f"{m['mse']:.6g}"),
    ("MSE per element", "mse_per_element", lambda m: f"{m['mse_per_element']:.6g}"),
    ("shrinkage gamma", "shrinkage_gamma", lambda m: f"{m['shrinkage_gamma']:.4f}"),
    (
        "dead latents",
        "dead_fraction",
        lambda m: f"{m['dead_fraction']:.2%} ({m['dead_count']}/{m['d_sae']}, never fired in {m['n_tokens']:,} tokens)",
    ),
    (
        "dense latents (> threshold)",
        "dense_fraction",
        lambda m: f"{m['dense_fraction']:.2%} (fire on > {m['dense_threshold']:.0%} of tokens)",
    ),
    ("dense latents (> 1%)", "dense_fraction_1pct", lambda m: _pct(m, "dense_fraction_1pct")),
    (
        "latent counts",
        "rare_count",
        lambda m: (
            f"dead {m['dead_count']}, rare (< 1e-5, fired) {m['rare_count']}"
            + ("" if m["rare_resolvable"] else " [needs > 1e5 tokens]")
            + f", dense > 1% {m['dense_count_1pct']}, dense > {m['dense_threshold']:.0%} {m['dense_count']}"
        ),
    ),
    (
        "first-letter absorption",
        "absorption",
        lambda m: (
            m["absorption"].get("error")
            or (
                f"{m['absorption']['absorption_rate']:.4f} (miss rate {m['absorption']['miss_rate']:.4f}, probe accuracy "
                f"{m['absorption']['probe_test_accuracy']:.3f}, {m['absorption']['n_tokens']} tokens)"
            )
        ),
    ),
    (
        "MDL description length",
        "mdl",
        lambda m: f"{m['mdl']['dl_bits']:.4g} bits/token ({m['mdl']['n_bins']} bins, {m['mdl']['n_tokens']:,} tokens)",
    ),
    (
        "predictions scored (CE/KL)",
        "ce_n_predictions",
        lambda m: f"{m['ce_n_predictions']:,} in {m['ce_n_sequences']} windows",
    ),
    ("CE clean", "ce_clean", lambda m: f"{m['ce_clean']:.4f}"),
    ("CE with SAE", "ce_sae", lambda m: f"{m['ce_sae']:.4f}"),
    ("CE zero-ablated", "ce_zero", lambda m: f"{m['ce_zero']:.4f}"),
    ("CE mean-ablated", "ce_mean", lambda m: f"{m['ce_mean']:.4f}"),
    ("CE score (vs zero)", "ce_score", lambda m: f"{m['ce_score']:.4f}"),
    ("CE score (vs mean)", "ce_score_mean", lambda m: f"{m['ce_score_mean']:.4f}"),
    ("KL with SAE", "kl_sae", lambda m: f"{m['kl_sae']:.6g}"),
    ("KL zero-ablated", "kl_zero", lambda m: f"{m['kl_zero']:.6g}"),
    ("KL mean-ablated", "kl_mean", lambda m: f"{m['kl_mean']:.6g}"),
    ("KL score (vs zero)", "kl_score", lambda m: f"{m['kl_score']:.4f}"),
    ("KL score (vs mean)", "kl_score_mean", lambda m: f"{m['kl_score_mean']:.4f}"),
]


def metrics_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of whatever ``metrics`` holds: the text table's and the HTML report's, so they agree."""
    return [
        (label, fmt(metrics) if fmt is not str else str(metrics[key]))
        for label, key, fmt in METRIC_ROWS
        if key in metrics
    ]


def format_table(metrics: dict[str, Any]) -> str:
    """A plain two-column text table (metric, value) of whatever ``metrics`` holds."""
    rows = metrics_rows(metrics)
    width = max(len("metric"), *(len(label) for label, _ in rows))
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 5}"]
    lines += [f"{label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines) + "\n"


def _json_safe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else None  # per-latent tensors stay out of the JSON
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN/inf are not JSON; null says "undefined" (e.g. EV of constant activations)
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def write_eval_json(metrics: dict[str, Any], folder: str | Path, name: str = "eval.json") -> Path:
    """Write ``folder/name`` atomically: every scalar and the frequency histogram, no per-latent tensors.

    ``name`` stays eval.json for the SAE's own corpus; evals/saved.py names results on other corpora.
    """
    safe = {k: _json_safe(v) for k, v in metrics.items() if not (isinstance(v, torch.Tensor) and v.numel() != 1)}
    path = Path(folder) / name
    atomic_write_text(path, json.dumps(safe, indent=2) + "\n")
    return path
