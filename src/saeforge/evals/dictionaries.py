"""Comparing two dictionaries: MMCS, and splitting a wider SAE's latents against a narrower one (stitching).

- MMCS(A, B) = mean over A's decoder rows of the max cosine to any of B's rows (SPECS.md). Not
  symmetric: report both directions. Two seeds that found the same features give ~1; a random
  dictionary in d dimensions gives roughly sqrt(2 ln F_B / d).
- Split (after Leask, Bussmann et al. 2024, "Stitching SAEs of different sizes"): a latent of the
  wider SAE is *reconstruction-like* when its decoder row's max cosine to the narrower SAE's rows is
  >= ``threshold`` (default 0.7, a choice; the papers use max cosine as a cheap proxy for the
  category), else *novel*.
- Stitching effect: over activation rows x, MSE (sum over d_in, mean over rows) of
  x_hat_narrow + sum_{j in group} f_wide,j(x) W_dec_wide[j] for each group, beside the narrower SAE's
  own MSE. f_wide is the wider SAE's own code (its TopK/threshold over all its latents), b_dec is the
  narrower SAE's only. Novel latents are expected to lower the MSE, reconstruction-like ones to
  raise it (they re-add what the narrower SAE already reconstructs).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from saeforge.evals.splice import run_sae, sae_dtype_device

CHUNK_ROWS = 2048  # rows of A per cosine matmul: [2048, F_B] float64 at most ~150 MB for F_B = 9216


def unit_rows(W_FD: torch.Tensor) -> torch.Tensor:
    """Decoder rows as float64 unit vectors (all-zero rows stay zero: cosine 0 with everything)."""
    W = W_FD.detach().to("cpu", torch.float64)
    return W / W.norm(dim=1, keepdim=True).clamp(min=1e-30)


def max_cosine(A_FD: torch.Tensor, B_GD: torch.Tensor) -> torch.Tensor:
    """For each row of A, the max cosine to any row of B: float64 [F]."""
    if A_FD.shape[1] != B_GD.shape[1]:
        raise ValueError(
            f"dictionaries of different widths: A rows have d={A_FD.shape[1]}, B rows d={B_GD.shape[1]}; "
            "compare SAEs trained on the same hook (or toy features of the SAE's d_in)"
        )
    a, b = unit_rows(A_FD), unit_rows(B_GD)
    return torch.cat([(a[i : i + CHUNK_ROWS] @ b.T).amax(1) for i in range(0, len(a), CHUNK_ROWS)])


def mmcs(A_FD: torch.Tensor, B_GD: torch.Tensor) -> float:
    """Mean over the rows of A of the max cosine to any row of B: decoder rows against decoder rows, or
    toy.py's true features against decoder rows. Any dtype or device; computed in float64 on the CPU."""
    return float(max_cosine(A_FD, B_GD).mean())


def split_latents(wide, narrow, threshold: float = 0.7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reconstruction-like indices, novel indices, max cosine per wide latent) of the wider SAE."""
    cos_F = max_cosine(wide.W_dec, narrow.W_dec)
    return (cos_F >= threshold).nonzero()[:, 0], (cos_F < threshold).nonzero()[:, 0], cos_F


@torch.inference_mode()
def stitching(wide, narrow, x_batches: Iterable[torch.Tensor], threshold: float = 0.7) -> dict[str, Any]:
    """Split ``wide``'s latents against ``narrow`` and measure the MSE effect of adding each group."""
    recon_idx, novel_idx, cos_F = split_latents(wide, narrow, threshold)
    dtype, device = sae_dtype_device(wide, torch.device("cpu"))
    W_dec_FD = wide.W_dec.detach()
    sse = {"narrow": 0.0, "reconstruction": 0.0, "novel": 0.0}
    n = 0
    for x_ND in x_batches:
        _, x_hat_ND = run_sae(narrow, x_ND)
        f_NF, _ = run_sae(wide, x_ND)
        x = x_ND.to("cpu", torch.float64)
        x_hat = x_hat_ND.to("cpu", torch.float64)
        sse["narrow"] += float((x - x_hat).pow(2).sum())
        for group, idx in (("reconstruction", recon_idx), ("novel", novel_idx)):
            idx_d = idx.to(f_NF.device)
            add_ND = (f_NF[:, idx_d].to(device, dtype) @ W_dec_FD[idx_d]).to("cpu", torch.float64)
            sse[group] += float((x - x_hat - add_ND).pow(2).sum())
        n += x_ND.shape[0]
    if n == 0:
        raise ValueError("stitching: no activation rows were given")
    return {
        "threshold": threshold,
        "n_reconstruction": len(recon_idx),
        "n_novel": len(novel_idx),
        "mean_max_cosine": float(cos_F.mean()),
        "mse_narrow": sse["narrow"] / n,
        "mse_plus_reconstruction": sse["reconstruction"] / n,
        "mse_plus_novel": sse["novel"] / n,
        "n_tokens": n,
    }


def compare_dictionaries(
    name_a: str, sae_a, name_b: str, sae_b, x_batches: Iterable[torch.Tensor] | None = None, threshold: float = 0.7
) -> dict[str, Any]:
    """MMCS both ways; with activation rows and different widths, the stitching split of the wider one."""
    out: dict[str, Any] = {
        "a": name_a,
        "b": name_b,
        "mmcs_a_to_b": mmcs(sae_a.W_dec, sae_b.W_dec),
        "mmcs_b_to_a": mmcs(sae_b.W_dec, sae_a.W_dec),
    }
    if x_batches is not None and sae_a.W_dec.shape[0] != sae_b.W_dec.shape[0]:
        wide, narrow = (sae_a, sae_b) if sae_a.W_dec.shape[0] > sae_b.W_dec.shape[0] else (sae_b, sae_a)
        out["stitching"] = {
            "wide": name_a if wide is sae_a else name_b,
            **stitching(wide, narrow, x_batches, threshold),
        }
    return out
