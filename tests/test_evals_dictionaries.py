"""MMCS and the wider-vs-narrower stitching split, against direct float64 computations."""

from __future__ import annotations

import pytest
import torch

from saeforge.evals.dictionaries import compare_dictionaries, max_cosine, mmcs, split_latents, stitching
from saeforge.evals.svg import nice_ticks, pareto_front


class DictSAE(torch.nn.Module):
    """ReLU SAE with given decoder rows; encoder = decoder^T (enough for a code that depends on x)."""

    def __init__(self, W_dec_FD: torch.Tensor):
        super().__init__()
        self.W_dec = torch.nn.Parameter(W_dec_FD.float().clone())
        self.W_enc = torch.nn.Parameter(W_dec_FD.float().T.clone())

    def encode(self, x):
        return torch.relu(x @ self.W_enc - 0.2)

    def decode(self, f):
        return f @ self.W_dec


def _rows(F, D, seed):
    return torch.randn(F, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_mmcs_self_is_one_and_random_is_low(monkeypatch):
    import saeforge.evals.dictionaries as dictionaries

    monkeypatch.setattr(dictionaries, "CHUNK_ROWS", 37)  # ragged chunks of A
    A = _rows(200, 64, 0)
    assert mmcs(A, A) == pytest.approx(1.0, abs=1e-12)
    # Same dictionary, rows permuted and rescaled (SAE symmetries): still 1.
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(1))
    assert mmcs(A, A[perm] * torch.rand(200, 1, dtype=torch.float64).add(0.1)) == pytest.approx(1.0, abs=1e-12)
    B = _rows(300, 64, 2)
    direct = (A / A.norm(dim=1, keepdim=True)) @ (B / B.norm(dim=1, keepdim=True)).T
    assert mmcs(A, B) == pytest.approx(direct.amax(1).mean().item(), abs=1e-12)
    assert mmcs(A, B) < 0.5  # ~sqrt(2 ln 300 / 64) = 0.42 for random directions
    with pytest.raises(ValueError, match="same hook"):
        max_cosine(A, _rows(5, 32, 0))


def test_split_and_stitching_match_direct_computation():
    D = 32
    narrow_rows = _rows(40, D, 0)
    # The wider SAE: 30 of the narrower's rows (slightly perturbed), plus 50 fresh random directions.
    copied = narrow_rows[:30] + 0.05 * _rows(30, D, 1)
    wide_rows = torch.cat([copied, _rows(50, D, 2)])
    narrow, wide = (
        DictSAE(narrow_rows / narrow_rows.norm(dim=1, keepdim=True)),
        DictSAE(wide_rows / wide_rows.norm(dim=1, keepdim=True)),
    )
    recon, novel, cos = split_latents(wide, narrow, threshold=0.7)
    assert recon.tolist() == list(range(30)) and novel.tolist() == list(range(30, 80))
    assert cos[:30].min() > 0.95 and cos[30:].max() < 0.7

    x = torch.randn(500, D, generator=torch.Generator().manual_seed(3))
    r = stitching(wide, narrow, [x[:123], x[123:400], x[400:]], threshold=0.7)
    xd = x.double()
    with torch.no_grad():
        x_hat = narrow.decode(narrow.encode(x)).double()
        f = wide.encode(x).double()
    Wd = wide.W_dec.detach().double()
    mse = lambda y: (xd - y).pow(2).sum(1).mean().item()  # noqa: E731
    assert r["n_reconstruction"] == 30 and r["n_novel"] == 50 and r["n_tokens"] == 500
    assert r["mse_narrow"] == pytest.approx(mse(x_hat), rel=1e-6)
    assert r["mse_plus_reconstruction"] == pytest.approx(mse(x_hat + f[:, :30] @ Wd[:30]), rel=1e-6)
    assert r["mse_plus_novel"] == pytest.approx(mse(x_hat + f[:, 30:] @ Wd[30:]), rel=1e-6)
    # Re-adding directions the narrower SAE already reconstructs makes it worse.
    assert r["mse_plus_reconstruction"] > r["mse_narrow"]

    both = compare_dictionaries("w", wide, "n", narrow, [x])
    assert both["stitching"]["wide"] == "w" and both["mmcs_b_to_a"] == pytest.approx(mmcs(narrow.W_dec, wide.W_dec))
    assert "stitching" not in compare_dictionaries("n", narrow, "n2", DictSAE(narrow_rows), [x])


def test_pareto_front_and_ticks():
    pts = [(4.0, 0.6), (8.0, 0.8), (8.0, 0.7), (16.0, 0.75), (2.0, float("nan")), (32.0, 0.9)]
    assert pareto_front(pts) == [0, 1, 5]  # (8, 0.7) and (16, 0.75) are beaten by (8, 0.8); NaN is skipped
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(-10.0, 0.0)[0] == -10.0 and nice_ticks(-10.0, 0.0)[-1] == 0.0
