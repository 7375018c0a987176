"""saeforge.evals: metrics against direct float64 computations, spliced CE/KL against HF's own loss."""

from __future__ import annotations

import math

import pytest
import torch

from saeforge.evals.metrics import ReconstructionStats


# ---------------------------------------------------------------- reconstruction metrics


def _random_batch(n: int = 300, d: int = 16, f: int = 40, offset: float = 0.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3.0, d, dtype=torch.float64) + offset
    x_hat = x + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    pre = torch.randn(n, f, generator=g, dtype=torch.float64)
    f_BF = torch.relu(pre - 1.0)  # ~16% firing per latent
    return x, x_hat, f_BF


def _feed(stats: ReconstructionStats, x, x_hat, f_BF, splits=(0, 7, 100, 101, 250)):
    bounds = list(splits) + [x.shape[0]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        stats.update(x[a:b], x_hat[a:b], f_BF[a:b])


def test_stats_match_direct_float64():
    x, x_hat, f_BF = _random_batch()
    stats = ReconstructionStats(16, 40)
    _feed(stats, x, x_hat, f_BF)
    r = stats.result()

    err_N = (x - x_hat).pow(2).sum(1)
    total_var = (x.pow(2).sum(1).mean() - x.mean(0).pow(2).sum()).item()
    assert r["n_tokens"] == 300
    assert r["l0"] == pytest.approx((f_BF != 0).sum(1).double().mean().item(), abs=1e-12)
    assert r["mse"] == pytest.approx(err_N.mean().item(), rel=1e-12)
    assert r["mse_per_element"] == pytest.approx(err_N.mean().item() / 16, rel=1e-12)
    assert r["explained_variance"] == pytest.approx(1 - err_N.mean().item() / total_var, abs=1e-12)
    assert r["shrinkage_gamma"] == pytest.approx((x_hat.pow(2).sum() / (x_hat * x).sum()).item(), rel=1e-12)
    torch.testing.assert_close(r["feature_freq"], (f_BF != 0).double().mean(0), rtol=0, atol=1e-15)
    torch.testing.assert_close(r["mean_x"], x.mean(0), rtol=0, atol=1e-12)
    assert sum(r["log10_freq_hist_counts"]) == 40


def test_explained_variance_is_centred():
    """A constant offset added to x and x_hat leaves EV unchanged: the mean is not 'variance'."""
    x, x_hat, f_BF = _random_batch()
    plain, shifted = ReconstructionStats(16, 40), ReconstructionStats(16, 40)
    _feed(plain, x, x_hat, f_BF)
    _feed(shifted, x + 1e4, x_hat + 1e4, f_BF)
    ev = plain.result()["explained_variance"]
    assert 0.5 < ev < 0.999  # the noise is real but small compared with x's spread
    assert shifted.result()["explained_variance"] == pytest.approx(ev, abs=1e-9)
    # An uncentred formula (1 - mse / E||x||^2) would give nearly 1 with the offset: make sure we don't.
    assert shifted.result()["explained_variance"] < 0.999


def test_perfect_and_mean_reconstruction():
    x, _, f_BF = _random_batch()
    perfect = ReconstructionStats(16, 40)
    perfect.update(x, x.clone(), f_BF)
    assert perfect.result()["explained_variance"] == 1.0
    # Predicting the dataset mean explains exactly nothing.
    mean_only = ReconstructionStats(16, 40)
    _feed(mean_only, x, x.mean(0).expand_as(x), f_BF)
    assert mean_only.result()["explained_variance"] == pytest.approx(0.0, abs=1e-12)


def test_dead_and_dense_hand_checked():
    # 200 tokens, 5 latents: fires on 0, 1, 2 (=1%), 20 (=10%), 21 (>10%) tokens.
    n, counts = 200, [0, 1, 2, 20, 21]
    f_BF = torch.zeros(n, 5)
    for j, c in enumerate(counts):
        f_BF[:c, j] = 0.5 + j
    x = torch.randn(n, 3)
    stats = ReconstructionStats(3, 5, dense_threshold=0.1)
    _feed(stats, x, x, f_BF, splits=(0, 1, 19, 150))
    r = stats.result()
    assert r["dead_count"] == 1 and r["dead_fraction"] == pytest.approx(0.2)
    assert r["dense_fraction"] == pytest.approx(0.2)  # only 21/200 > 10%; exactly 10% is not dense
    assert r["dense_fraction_1pct"] == pytest.approx(0.4)  # 20 and 21; 2/200 = 1% is not > 1%
    assert r["l0"] == pytest.approx(sum(counts) / n)
    assert r["feature_freq"].tolist() == [c / n for c in counts]
    # Histogram: the dead latent sits in the lowest bin, 21/200 in [-1, -0.5).
    hist = r["log10_freq_hist_counts"]
    assert hist[0] == 1 and hist[-2] == 2 and sum(hist) == 5


def test_stats_memory_is_bounded_and_errors_are_clear():
    stats = ReconstructionStats(8, 12)
    state_before = {k: (v.shape if torch.is_tensor(v) else None) for k, v in vars(stats).items()}
    for seed in range(5):
        x, x_hat, f_BF = _random_batch(n=50, d=8, f=12, seed=seed)
        stats.update(x.float(), x_hat.float(), f_BF.float())
    assert {k: (v.shape if torch.is_tensor(v) else None) for k, v in vars(stats).items()} == state_before
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        stats.update(torch.zeros(4, 9), torch.zeros(4, 9), torch.zeros(4, 12))
    with pytest.raises(ValueError, match="no tokens"):
        ReconstructionStats(8, 12).result()
    assert math.isnan(_constant_ev())


def _constant_ev() -> float:
    stats = ReconstructionStats(2, 3)
    stats.update(torch.ones(4, 2), torch.ones(4, 2), torch.ones(4, 3))
    return stats.result()["explained_variance"]
