"""MDL description length of an SAE's code (SPECS.md "MDL"; after Ayonrinde et al. 2024, MDL-SAEs).

Bits per token to transmit the latents, when each latent sends (a) whether it fires and (b), when
it does, which of n uniform bins its value falls in:

    DL(n) = sum_i [ H_bin(p_i) + p_i * H_i(n) ]            (bits per token)

- p_i: fraction of the sample's tokens where latent i is nonzero; H_bin(p) = -p log2 p - (1-p) log2(1-p).
- H_i(n): entropy (bits) of latent i's nonzero values binned into n equal bins between its smallest
  and largest nonzero value over the sample (a latent with one distinct value has H = 0).
- The quantised code replaces each nonzero value by its bin's centre; its reconstruction MSE
  (sum over d_in, mean over tokens) must stay under epsilon. Candidates are n = 1, 2, 4, ..., 256
  (nested bins, so DL grows with n); the reported ``dl_bits`` is the smallest DL among candidates
  whose quantised MSE <= epsilon, with epsilon = (1 + ``mse_tolerance``) * the unquantised MSE
  unless given absolutely (pass the same absolute epsilon to compare SAEs). Every candidate's
  (n, DL, MSE) is reported, so any other epsilon can be applied afterwards.

The sample is a fixed set of activation rows (evaluate() keeps the first ``mdl_tokens``), so memory
is bounded by it; latents are computed in chunks of ``CHUNK_ROWS``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from saeforge.evals.splice import run_sae, sae_dtype_device

BIN_COUNTS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
CHUNK_ROWS = 1024


def _binary_entropy(p_F: torch.Tensor) -> torch.Tensor:
    q_F = 1 - p_F
    return -(torch.xlogy(p_F, p_F) + torch.xlogy(q_F, q_F)) / math.log(2)


def _bin_index(f_NF: torch.Tensor, lo_F: torch.Tensor, width_F: torch.Tensor, n: int) -> torch.Tensor:
    """Bin of every value in [0, n); values at the top edge go into the last bin."""
    safe_width_F = torch.where(width_F > 0, width_F, torch.ones_like(width_F))
    return ((f_NF - lo_F) / safe_width_F).floor().clamp(0, n - 1).long()


@torch.inference_mode()
def description_length(
    sae,
    x_ND: torch.Tensor,
    epsilon: float | None = None,
    mse_tolerance: float = 0.05,
    bin_counts: list[int] = BIN_COUNTS,
) -> dict[str, Any]:
    """DL in bits per token of ``sae``'s code on the rows ``x_ND``; see the module docstring."""
    N = x_ND.shape[0]
    if N == 0:
        raise ValueError("description_length: no activation rows; pass a non-empty sample")
    chunks = [x_ND[a : a + CHUNK_ROWS] for a in range(0, N, CHUNK_ROWS)]

    # Pass 1: firing counts, range of nonzero values, and the unquantised MSE.
    count_F = lo_F = hi_F = None
    sse = 0.0
    for x in chunks:
        f_NF, x_hat = run_sae(sae, x)
        f = f_NF.double().cpu()
        nz = f != 0
        if count_F is None:
            F = f.shape[1]
            count_F = torch.zeros(F, dtype=torch.float64)
            lo_F, hi_F = (
                torch.full((F,), math.inf, dtype=torch.float64),
                torch.full((F,), -math.inf, dtype=torch.float64),
            )
        count_F += nz.sum(0)
        lo_F = torch.minimum(lo_F, torch.where(nz, f, math.inf).amin(0))
        hi_F = torch.maximum(hi_F, torch.where(nz, f, -math.inf).amax(0))
        sse += float((x.double() - x_hat.double().cpu()).pow(2).sum())
    mse = sse / N
    eps = (1 + mse_tolerance) * mse if epsilon is None else float(epsilon)
    p_F = count_F / N
    alive_F = count_F > 0
    lo_F, hi_F = torch.where(alive_F, lo_F, 0.0), torch.where(alive_F, hi_F, 0.0)

    # Pass 2: per candidate n, bin histograms per latent and the quantised reconstruction error.
    F = count_F.shape[0]
    hist = {n: torch.zeros(F * n, dtype=torch.float64) for n in bin_counts}
    sse_q = {n: 0.0 for n in bin_counts}
    dtype, device = sae_dtype_device(sae, x_ND.device)
    for x in chunks:
        f_NF, _ = run_sae(sae, x)
        f = f_NF.double().cpu()
        nz = f != 0
        rows, cols = nz.nonzero(as_tuple=True)
        for n in bin_counts:
            width_F = (hi_F - lo_F) / n
            idx = _bin_index(f[rows, cols], lo_F[cols], width_F[cols], n)
            hist[n] += torch.bincount(cols * n + idx, minlength=F * n).double()
            f_q = torch.zeros_like(f)
            f_q[rows, cols] = lo_F[cols] + (idx + 0.5) * width_F[cols]
            x_hat_q = sae.decode(f_q.to(device, dtype))
            sse_q[n] += float((x.double() - x_hat_q.double().cpu()).pow(2).sum())

    h_bin = float(_binary_entropy(p_F).sum())
    candidates = []
    for n in bin_counts:
        c_FB = hist[n].view(F, n)
        q_FB = c_FB / c_FB.sum(1, keepdim=True).clamp(min=1)
        h_F = -(torch.xlogy(q_FB, q_FB).sum(1)) / math.log(2)
        candidates.append({"n_bins": n, "dl_bits": h_bin + float((p_F * h_F).sum()), "mse": sse_q[n] / N})
    ok = [c for c in candidates if c["mse"] <= eps]
    best = min(ok, key=lambda c: c["dl_bits"]) if ok else None
    return {
        "dl_bits": best["dl_bits"] if best else math.nan,
        "n_bins": best["n_bins"] if best else None,
        "epsilon": eps,
        "mse_unquantised": mse,
        "firing_bits": h_bin,
        "n_tokens": N,
        "candidates": candidates,
    }
