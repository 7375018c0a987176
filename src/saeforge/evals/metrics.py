"""Streaming reconstruction metrics, accumulated in float64 (definitions: SPECS.md "Metrics").

``ReconstructionStats`` keeps O(d_in + d_sae) numbers however many tokens pass through it,
so an evaluation over millions of tokens costs no more memory than one over a thousand.

- L0 = mean over tokens of the count of nonzero latents.
- MSE = mean over tokens of ||x - x_hat||^2 (summed over d_in); ``mse_per_element`` divides by d_in.
- Explained variance = 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2) over the whole set. The
  denominator (total variance, summed over dimensions) is merged batch by batch with Chan's
  parallel formula rather than as E||x||^2 - ||E x||^2 from raw sums: residual streams carry a
  large mean offset and the raw-sum form loses digits to cancellation.
- Firing frequency per latent (f != 0); dead = never fired over ``n_tokens``; rare = fired, but on
  fewer than 1e-5 of tokens (only detectable past 1e5 tokens: ``rare_resolvable`` says whether it
  was); dense = frequency above ``dense_threshold`` (also reported above 1%), as fractions and
  counts; a histogram of log10(freq + 1e-10).
- Shrinkage gamma = E||x_hat||^2 / E[x_hat . x] (< 1 means the SAE shrinks its outputs).
"""

from __future__ import annotations

import math
from typing import Any

import torch

# log10(freq + 1e-10) spans [-10, 0]; half-decade bins keep the histogram readable in JSON.
HIST_EDGES = [e / 2 for e in range(-20, 1)]
RARE_THRESHOLD = 1e-5


class ReconstructionStats:
    """Float64 running sums for L0 / MSE / explained variance / density over many batches.

    Callers drop excluded positions (BOS, padding, special tokens) before ``update``: those rows
    would otherwise dominate MSE and variance with their outlier norms.
    """

    def __init__(self, d_in: int, d_sae: int, dense_threshold: float = 0.1) -> None:
        if d_in <= 0 or d_sae <= 0:
            raise ValueError(f"ReconstructionStats needs positive widths, got d_in={d_in}, d_sae={d_sae}")
        if not 0.0 < dense_threshold < 1.0:
            raise ValueError(f"dense_threshold={dense_threshold}: expected a fraction in (0, 1)")
        self.d_in, self.d_sae, self.dense_threshold = d_in, d_sae, dense_threshold
        self.n_tokens = 0
        self.sum_sq_err = 0.0  # sum over tokens of ||x - x_hat||^2
        self.sum_l0 = 0  # total nonzero latents (exact integer)
        self.sum_xhat_sq = 0.0  # sum ||x_hat||^2, for shrinkage
        self.sum_xhat_dot_x = 0.0  # sum x_hat . x, for shrinkage
        self.mean_x_D = torch.zeros(d_in, dtype=torch.float64)
        self.m2 = 0.0  # sum over tokens and dims of (x - mean)^2, i.e. N * total variance
        self.fire_count_F = torch.zeros(d_sae, dtype=torch.int64)

    @torch.no_grad()
    def update(self, x_BD: torch.Tensor, x_hat_BD: torch.Tensor, f_BF: torch.Tensor) -> None:
        """Add one batch of B tokens: inputs, reconstructions and latents (any dtype/device)."""
        if x_BD.ndim != 2 or x_BD.shape[1] != self.d_in or x_hat_BD.shape != x_BD.shape:
            raise ValueError(
                f"expected x and x_hat of shape [B, {self.d_in}], got x {tuple(x_BD.shape)} and "
                f"x_hat {tuple(x_hat_BD.shape)}; flatten [S, T, D] activations to [S*T, D] first"
            )
        if f_BF.shape != (x_BD.shape[0], self.d_sae):
            raise ValueError(f"expected latents of shape [{x_BD.shape[0]}, {self.d_sae}], got {tuple(f_BF.shape)}")
        n_b = x_BD.shape[0]
        if n_b == 0:
            return
        x = x_BD.detach().to("cpu", torch.float64)
        x_hat = x_hat_BD.detach().to("cpu", torch.float64)
        fires_BF = f_BF.detach() != 0
        self.fire_count_F += fires_BF.sum(0).to("cpu", torch.int64)
        self.sum_l0 += int(fires_BF.sum())

        self.sum_sq_err += float((x - x_hat).pow(2).sum())
        self.sum_xhat_sq += float(x_hat.pow(2).sum())
        self.sum_xhat_dot_x += float((x_hat * x).sum())

        # Chan et al. merge of (n, mean, M2) with the batch's own centred statistics.
        mean_b_D = x.mean(0)
        m2_b = float((x - mean_b_D).pow(2).sum())
        n_a, n = self.n_tokens, self.n_tokens + n_b
        delta_D = mean_b_D - self.mean_x_D
        self.mean_x_D += delta_D * (n_b / n)
        self.m2 += m2_b + float(delta_D.pow(2).sum()) * n_a * n_b / n
        self.n_tokens = n

    def result(self) -> dict[str, Any]:
        """Metrics as plain floats, plus ``feature_freq`` (float64 tensor [F]) and ``mean_x`` ([D])."""
        n = self.n_tokens
        if n == 0:
            raise ValueError("ReconstructionStats.result(): no tokens were added; evaluate on a non-empty held-out set")
        freq_F = self.fire_count_F.to(torch.float64) / n
        mse = self.sum_sq_err / n
        total_var = self.m2 / n
        log_freq_F = torch.log10(freq_F + 1e-10).clamp(HIST_EDGES[0], HIST_EDGES[-1])
        hist = torch.histogram(log_freq_F, bins=torch.tensor(HIST_EDGES, dtype=torch.float64)).hist
        return {
            "n_tokens": n,
            "l0": self.sum_l0 / n,
            "mse": mse,
            "mse_per_element": mse / self.d_in,
            # Zero variance (all x equal) leaves EV undefined: report NaN rather than a fake number.
            "explained_variance": 1.0 - mse / total_var if total_var > 0 else math.nan,
            "total_variance": total_var,
            "shrinkage_gamma": self.sum_xhat_sq / self.sum_xhat_dot_x if self.sum_xhat_dot_x != 0 else math.nan,
            "dead_fraction": float((self.fire_count_F == 0).double().mean()),
            "dead_count": int((self.fire_count_F == 0).sum()),
            "dense_threshold": self.dense_threshold,
            "dense_fraction": float((freq_F > self.dense_threshold).double().mean()),
            "dense_fraction_1pct": float((freq_F > 0.01).double().mean()),
            "rare_threshold": RARE_THRESHOLD,
            "rare_count": int(((self.fire_count_F > 0) & (freq_F < RARE_THRESHOLD)).sum()),
            # With fewer than 1/RARE_THRESHOLD tokens one firing already exceeds the threshold.
            "rare_resolvable": n * RARE_THRESHOLD > 1,
            "dense_count": int((freq_F > self.dense_threshold).sum()),
            "dense_count_1pct": int((freq_F > 0.01).sum()),
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "log10_freq_hist_edges": list(HIST_EDGES),
            "log10_freq_hist_counts": [int(c) for c in hist.tolist()],
            "feature_freq": freq_F,
            "mean_x": self.mean_x_D.clone(),
        }
