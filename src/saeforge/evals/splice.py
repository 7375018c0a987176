"""Next-token CE and KL with the SAE's reconstruction (or an ablation) spliced in at the hook.

For each batch the model runs once clean and once per variant with the hooked activation replaced
for the rest of the forward pass:

- ``sae``:  x -> decode(encode(x)), the SAE run in its own dtype (float32 normally);
- ``zero``: x -> 0 (the "zero ablation" baseline of the CE score);
- ``mean``: x -> the mean activation over the eval set (optional baseline; one more forward).

A transcoder (``hook_in`` given) is spliced with two hooks in the same forward: its input is read
at ``hook_in`` and its prediction replaces the activation at ``hook`` (the output hook), so
``sae`` is y_hat(x_in) + W_skip x_in. The input hook must fire first; if it has not when the output
hook fires, the splice raises instead of using a stale input. The zero and mean baselines act at
the output hook, as for an SAE there.

Excluded positions (BOS / padding / special tokens, from ``data.excluded_mask``) keep their clean
activation in every variant, zero and mean ablation included: the SAE was never trained on them
and their outlier norms would make every variant look broken for reasons unrelated to the SAE.

Scored predictions: the logits at position t predict token t+1. A prediction counts when neither
its source t nor its target t+1 is excluded. Excluded sources are clean in every variant (at
position 0 the output is then identical everywhere and would only dilute the CE values);
excluded targets (EOS between documents, BOS) are formatting, not language. CE and KL are means
over the scored predictions of all batches (every prediction weighs the same).

- CE score = (CE_zero - CE_sae) / (CE_zero - CE_clean)   (1 = SAE loses nothing, 0 = as bad as zeros)
- KL(p_clean || p_new) = sum_v p_clean (log p_clean - log p_new); KL score = (KL_zero - KL_sae) / KL_zero.

Log-softmax runs in float32 over chunks of scored rows, so memory stays bounded by two logits
tensors [S, T, V] in the model's dtype (the clean one and the current variant's) plus one chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

# Rows of [N, V] float32 log-probs processed at once: 2^23 elements = 32 MiB per temporary.
CHUNK_ELEMENTS = 1 << 23

Replacement = Callable[[torch.Tensor], torch.Tensor]  # x_STD -> replacement x_STD (before masking)


def sae_dtype_device(sae: object, fallback_device: torch.device) -> tuple[torch.dtype, torch.device]:
    """The dtype and device the SAE computes in (its first parameter's; float32 if it has none)."""
    params = sae.parameters() if isinstance(sae, nn.Module) else iter(())
    p = next(iter(params), None)
    return (p.dtype, p.device) if p is not None else (torch.float32, fallback_device)


def run_sae(sae: object, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_NF, x_hat_ND) with the SAE in its own dtype/device; x is cast there first (float32 normally).

    For a skip transcoder x_hat includes W_skip x (what ``forward`` returns).
    """
    dtype, device = sae_dtype_device(sae, x_ND.device)
    x_ND = x_ND.to(device, dtype)
    f_NF = sae.encode(x_ND)
    x_hat_ND = sae.decode(f_NF)
    add_skip = getattr(sae, "add_skip", None)
    return f_NF, (x_hat_ND if add_skip is None else add_skip(x_hat_ND, x_ND))


def sae_replacement(sae: object) -> Replacement:
    def replace(x_STD: torch.Tensor) -> torch.Tensor:
        _, x_hat_ND = run_sae(sae, x_STD.reshape(-1, x_STD.shape[-1]))
        return x_hat_ND.reshape(x_STD.shape).to(x_STD.device, x_STD.dtype)

    return replace


def transcoder_replacement(sae: object, box: dict, hook_in_name: str, hook_out_name: str) -> Replacement:
    """y -> the transcoder's prediction from ``box["x"]``, the input recorded earlier in this forward."""

    def replace(y_STD: torch.Tensor) -> torch.Tensor:
        x_STD = box.pop("x", None)
        if x_STD is None:
            raise ValueError(
                f"transcoder splice: the output hook {hook_out_name!r} fired before the input hook {hook_in_name!r} "
                "in this forward; the input hook must come first (e.g. blocks.L.hook_mlp_in -> blocks.L.hook_mlp_out)"
            )
        _, y_hat_ND = run_sae(sae, x_STD.reshape(-1, x_STD.shape[-1]))
        return y_hat_ND.reshape(*y_STD.shape[:-1], y_hat_ND.shape[-1]).to(y_STD.device, y_STD.dtype)

    return replace


@contextmanager
def recording(hook, box: dict) -> Iterator[None]:
    """While active, each time ``hook`` fires its activation is put in ``box["x"]`` (left unchanged)."""
    handle = hook.register(lambda x_STD: box.__setitem__("x", x_STD))
    try:
        yield
    finally:
        handle.remove()
        box.clear()


def zero_replacement(x_STD: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x_STD)


def mean_replacement(mean_x_D: torch.Tensor) -> Replacement:
    def replace(x_STD: torch.Tensor) -> torch.Tensor:
        return mean_x_D.to(x_STD.device, x_STD.dtype).expand_as(x_STD)

    return replace


@contextmanager
def replaced(hook, replacement: Replacement, excluded_ST: torch.Tensor) -> Iterator[None]:
    """While active, the hook's activation becomes ``replacement(x)`` at non-excluded positions.

    Not ``analysis.splice.spliced``, which keeps the SAE's error term: here x is replaced outright.
    """

    def fn(x_STD: torch.Tensor) -> torch.Tensor:
        if x_STD.shape[:2] != excluded_ST.shape:
            raise ValueError(
                f"hook {hook.name!r} gives an activation of shape {tuple(x_STD.shape)} but the tokens are "
                f"{tuple(excluded_ST.shape)}; splicing needs a [S, T, D] activation (pick a residual, MLP or "
                "attention-output hook)"
            )
        keep_ST1 = excluded_ST.to(x_STD.device).unsqueeze(-1)
        return torch.where(keep_ST1, x_STD, replacement(x_STD))

    handle = hook.register(fn)
    try:
        yield
    finally:
        handle.remove()


def scored_positions(excluded_ST: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_idx, t_idx) of the logits that are scored: source t and target t+1 both not excluded."""
    scored_ST1 = ~excluded_ST[:, :-1] & ~excluded_ST[:, 1:]
    return scored_ST1.nonzero(as_tuple=True)


def ce_kl_sums(
    logits_clean_STV: torch.Tensor,
    logits_new_STV: torch.Tensor,
    s_idx: torch.Tensor,
    t_idx: torch.Tensor,
    targets_N: torch.Tensor,
    ce_clean_T: torch.Tensor | None = None,
    ce_new_T: torch.Tensor | None = None,
) -> tuple[float, float, float]:
    """Sums over the scored rows of (CE clean, CE new, KL(clean || new)), float32 per chunk.

    Given float64 [T] tensors ``ce_clean_T`` / ``ce_new_T``, also adds each row's CE at its source position.
    """
    rows = max(1, CHUNK_ELEMENTS // logits_clean_STV.shape[-1])
    ce_clean = ce_new = kl = 0.0
    for a in range(0, len(s_idx), rows):
        s, t, y = s_idx[a : a + rows], t_idx[a : a + rows], targets_N[a : a + rows, None]
        lp_clean_NV = torch.log_softmax(logits_clean_STV[s, t].float(), dim=-1)
        lp_new_NV = torch.log_softmax(logits_new_STV[s, t].float(), dim=-1)
        nll_clean_N = -lp_clean_NV.gather(1, y)[:, 0].double()
        nll_new_N = -lp_new_NV.gather(1, y)[:, 0].double()
        ce_clean += float(nll_clean_N.sum())
        ce_new += float(nll_new_N.sum())
        kl += float((lp_clean_NV.exp() * (lp_clean_NV - lp_new_NV)).sum(-1).double().sum())
        if ce_new_T is not None:
            t_cpu = t.cpu()
            ce_clean_T.index_add_(0, t_cpu, nll_clean_N.cpu())
            ce_new_T.index_add_(0, t_cpu, nll_new_N.cpu())
    return ce_clean, ce_new, kl


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else math.nan


def recovery_scores(ce: float, kl: float, ce_base: float, kl_base: float, ce_clean: float) -> tuple[float, float]:
    """(CE score, KL score) of a spliced model against an ablation baseline (SPECS): (CE_base - CE) /
    (CE_base - CE_clean) and (KL_base - KL) / KL_base; NaN where the baseline equals the clean model."""
    return _ratio(ce_base - ce, ce_base - ce_clean), _ratio(kl_base - kl, kl_base)


@torch.inference_mode()
def spliced_ce_kl(
    model: nn.Module,
    hook,
    sae: object,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    mean_x_D: torch.Tensor | None = None,
    progress: bool = False,
    total: int | None = None,
    by_position: bool = False,
    hook_in=None,
) -> dict[str, Any]:
    """CE/KL clean vs SAE-spliced vs zero- (and, given ``mean_x_D``, mean-) ablated.

    ``batches`` yields (tokens_ST, excluded_ST) pairs of full windows (no padding). ``hook`` is a
    ``models.hooks.HookPoint``; for a transcoder it is the output hook and ``hook_in`` its input hook. Returns plain floats: ce_clean, ce_sae, ce_zero, kl_sae, kl_zero,
    ce_score, kl_score (+ ce_mean, kl_mean, ce_score_mean, kl_score_mean), ce_n_predictions,
    ce_n_sequences, ce_n_tokens. ``by_position`` adds ``ce_by_position``: lists over source positions
    t of summed CE per variant (``ce_clean``, ``ce_sae``, ...) and prediction counts ``ce_n`` (float64 sums,
    bucket them with ``positions.ce_by_bucket``).
    """
    from tqdm.auto import tqdm

    box: dict = {}
    if hook_in is None:
        variants: dict[str, Replacement] = {"sae": sae_replacement(sae), "zero": zero_replacement}
    else:
        variants = {"sae": transcoder_replacement(sae, box, hook_in.name, hook.name), "zero": zero_replacement}
    if mean_x_D is not None:
        variants["mean"] = mean_replacement(mean_x_D)
    device = next(model.parameters()).device
    sums = {f"{m}_{k}": 0.0 for m in ("ce", "kl") for k in ["clean", *variants]}
    n_pred = n_seq = n_tok = 0
    pos: dict[str, torch.Tensor] = {}
    # disable=None hides the bar when stderr is not a terminal (logs, CI) and shows it otherwise.
    bar = tqdm(batches, total=total, desc="CE/KL", unit="batch", disable=None if progress else True)
    for tokens_ST, excluded_ST in bar:
        tokens_ST, excluded_ST = tokens_ST.to(device), excluded_ST.to(device)
        s_idx, t_idx = scored_positions(excluded_ST)
        targets_N = tokens_ST[s_idx, t_idx + 1]
        n_seq, n_tok, n_pred = n_seq + tokens_ST.shape[0], n_tok + tokens_ST.numel(), n_pred + len(s_idx)
        if len(s_idx) == 0:
            continue
        if by_position and not pos:
            pos = {k: torch.zeros(tokens_ST.shape[1], dtype=torch.float64) for k in ["n", "clean", *variants]}
        if by_position:
            if pos["n"].shape[0] != tokens_ST.shape[1]:
                raise ValueError(
                    "spliced_ce_kl(by_position=True) needs windows of one length; got "
                    f"{pos['n'].shape[0]} then {tokens_ST.shape[1]}"
                )
            pos["n"].index_add_(0, t_idx.cpu(), torch.ones(len(t_idx), dtype=torch.float64))
        logits_clean_STV = model(input_ids=tokens_ST, use_cache=False).logits
        for i, (name, replacement) in enumerate(variants.items()):
            # the transcoder's input is recorded in the same forward; registered first, it also comes first
            # when both hooks sit on one module
            reading = recording(hook_in, box) if hook_in is not None and name == "sae" else nullcontext()
            with reading, replaced(hook, replacement, excluded_ST):
                logits_new_STV = model(input_ids=tokens_ST, use_cache=False).logits
            # The clean per-position sum is the same for every variant: collect it with the first only.
            clean_T = (pos["clean"] if i == 0 else torch.zeros_like(pos["clean"])) if by_position else None
            ce_clean, ce_new, kl = ce_kl_sums(
                logits_clean_STV, logits_new_STV, s_idx, t_idx, targets_N, clean_T, pos.get(name)
            )
            del logits_new_STV  # free before the next variant's forward: peak stays at two logits tensors
            sums[f"ce_{name}"] += ce_new
            sums[f"kl_{name}"] += kl
        sums["ce_clean"] += ce_clean  # identical for every variant: count it once per batch
    if n_pred == 0:
        raise ValueError(
            "spliced_ce_kl: no scored predictions (every position or its successor is excluded, or no "
            "batches were given); evaluate on longer windows or more text"
        )
    out: dict[str, float] = {k: v / n_pred for k, v in sums.items() if k != "kl_clean"}
    ce, kl, clean = out["ce_sae"], out["kl_sae"], out["ce_clean"]
    out["ce_score"], out["kl_score"] = recovery_scores(ce, kl, out["ce_zero"], out["kl_zero"], clean)
    if "mean" in variants:
        out["ce_score_mean"], out["kl_score_mean"] = recovery_scores(ce, kl, out["ce_mean"], out["kl_mean"], clean)
    out.update(ce_n_predictions=n_pred, ce_n_sequences=n_seq, ce_n_tokens=n_tok)
    if by_position:
        out["ce_by_position"] = {("ce_n" if k == "n" else f"ce_{k}"): v.tolist() for k, v in pos.items()}
    return out
