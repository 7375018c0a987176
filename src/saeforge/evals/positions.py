"""Metrics by position in the context window, in float64, with memory bounded by T (not by tokens).

SAEs trained on T-token windows are reported to degrade past T; evaluating at a longer context
(``saeforge eval SAE_DIR --data.context_size 256``) and reading these curves shows whether this one does.

- Explained variance at position t: 1 - E_t||x - x_hat||^2 / (E_t||x||^2 - ||E_t x||^2), with
  every expectation over the windows' rows at positions in the bucket (centred on the bucket's own
  mean, merged batch by batch with Chan's formula as in ``metrics.ReconstructionStats``).
- CE score at position t: (CE_zero,t - CE_sae,t) / (CE_zero,t - CE_clean,t), CE over the predictions
  whose *source* position (the hooked activation's position) is in the bucket; sums come from
  ``splice.spliced_ce_kl`` (its ``by_position`` sums).

Positions are grouped into equal buckets (``position_buckets``) so each point averages enough rows
to be read; the raw per-position sums stay available for finer views.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def position_buckets(T: int, n_buckets: int = 16) -> list[tuple[int, int]]:
    """[start, end) position ranges covering 0..T-1 in at most ``n_buckets`` equal-width buckets."""
    width = max(1, math.ceil(T / n_buckets))
    return [(a, min(a + width, T)) for a in range(0, T, width)]


class PositionStats:
    """Per-position float64 sums for explained variance by position: O(T * D) memory."""

    def __init__(self, T: int, d_in: int) -> None:
        self.T, self.d_in = T, d_in
        self.n_T = torch.zeros(T, dtype=torch.float64)
        self.sse_T = torch.zeros(T, dtype=torch.float64)  # sum of ||x - x_hat||^2
        self.mean_TD = torch.zeros(T, d_in, dtype=torch.float64)
        self.m2_T = torch.zeros(T, dtype=torch.float64)  # sum over rows and dims of (x - mean_t)^2

    @torch.no_grad()
    def update(self, x_STD: torch.Tensor, x_hat_STD: torch.Tensor, keep_ST: torch.Tensor) -> None:
        """Add S windows; rows where ``keep_ST`` is False (BOS, padding, special tokens) are skipped."""
        if x_STD.shape[1:] != (self.T, self.d_in) or x_hat_STD.shape != x_STD.shape or keep_ST.shape != x_STD.shape[:2]:
            raise ValueError(
                f"PositionStats(T={self.T}, d_in={self.d_in}) got x {tuple(x_STD.shape)}, x_hat "
                f"{tuple(x_hat_STD.shape)}, keep {tuple(keep_ST.shape)}; expected [S, T, D] and [S, T]"
            )
        w_ST1 = keep_ST.to("cpu", torch.float64)[..., None]
        x = x_STD.detach().to("cpu", torch.float64) * w_ST1
        x_hat = x_hat_STD.detach().to("cpu", torch.float64) * w_ST1
        nb_T = w_ST1[..., 0].sum(0)
        self.sse_T += (x - x_hat).pow(2).sum((0, 2))
        mean_b_TD = x.sum(0) / nb_T.clamp(min=1)[:, None]
        m2_b_T = ((x - mean_b_TD) * w_ST1).pow(2).sum((0, 2))
        n_T = self.n_T + nb_T
        delta_TD = mean_b_TD - self.mean_TD
        frac_T = torch.where(n_T > 0, nb_T / n_T.clamp(min=1), torch.zeros_like(n_T))
        self.mean_TD += delta_TD * frac_T[:, None]
        self.m2_T += m2_b_T + delta_TD.pow(2).sum(1) * self.n_T * frac_T
        self.n_T = n_T

    def bucket_ev(self, buckets: list[tuple[int, int]]) -> tuple[list[int], list[float]]:
        """(rows, explained variance) per bucket; NaN where a bucket has no rows or no variance."""
        rows, evs = [], []
        for a, b in buckets:
            n_t, mean_tD = self.n_T[a:b], self.mean_TD[a:b]
            n = float(n_t.sum())
            if n == 0:
                rows.append(0), evs.append(math.nan)
                continue
            # Merge the bucket's positions (each with its own mean) into one centred total.
            mean_D = (n_t[:, None] * mean_tD).sum(0) / n
            m2 = float(self.m2_T[a:b].sum() + (n_t * (mean_tD - mean_D).pow(2).sum(1)).sum())
            rows.append(int(n))
            evs.append(1.0 - float(self.sse_T[a:b].sum()) / m2 if m2 > 0 else math.nan)
        return rows, evs


def ce_by_bucket(sums: dict[str, list[float]], buckets: list[tuple[int, int]]) -> dict[str, list[float]]:
    """Bucket the per-source-position CE sums from ``spliced_ce_kl``: mean CE per variant and CE scores."""
    out: dict[str, list[float]] = {"ce_predictions": []}
    variants = [k[3:] for k in sums if k.startswith("ce_") and k != "ce_n"]
    for v in variants:
        out[f"ce_{v}"] = []
    out["ce_score"] = []
    if "ce_mean" in sums:
        out["ce_score_mean"] = []
    for a, b in buckets:
        n = sum(sums["ce_n"][a:b])
        out["ce_predictions"].append(int(n))
        means = {v: (sum(sums[f"ce_{v}"][a:b]) / n if n else math.nan) for v in variants}
        for v in variants:
            out[f"ce_{v}"].append(means[v])
        den = means["zero"] - means["clean"]
        out["ce_score"].append((means["zero"] - means["sae"]) / den if n and den != 0 else math.nan)
        if "ce_score_mean" in out:
            den = means["mean"] - means["clean"]
            out["ce_score_mean"].append((means["mean"] - means["sae"]) / den if n and den != 0 else math.nan)
    return out


def by_position(pos: PositionStats, ce_sums: dict[str, list[float]] | None, n_buckets: int = 16) -> dict[str, Any]:
    """The ``by_position`` block of eval.json: bucket bounds, EV per bucket, CE per bucket when measured."""
    buckets = position_buckets(pos.T, n_buckets)
    rows, evs = pos.bucket_ev(buckets)
    out: dict[str, Any] = {
        "start": [a for a, _ in buckets],
        "end": [b for _, b in buckets],
        "rows": rows,
        "explained_variance": evs,
    }
    if ce_sums is not None:
        out.update(ce_by_bucket(ce_sums, buckets))
    return out
