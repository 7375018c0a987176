"""Metric suite beyond the spine: shrinkage gamma, density counts, per-position EV, MDL; each vs float64."""

from __future__ import annotations

import math

import pytest
import torch

from saeforge.evals.mdl import description_length
from saeforge.evals.metrics import ReconstructionStats
from saeforge.evals.positions import PositionStats, ce_by_bucket, position_buckets


def _xs(n=400, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 0.5
    x_hat = 0.8 * x + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, x_hat, torch.ones(n, 3)


def _gamma(x, x_hat):
    s = ReconstructionStats(x.shape[1], 3)
    for a in range(0, len(x), 97):
        s.update(x[a : a + 97], x_hat[a : a + 97], torch.ones(len(x[a : a + 97]), 3))
    return s.result()["shrinkage_gamma"]


def test_gamma_is_the_numerical_argmin_of_its_definition():
    x, x_hat, _ = _xs()

    def objective(g: float) -> float:  # E||x_hat / g - x||^2, straight from SPECS.md
        return float((x_hat / g - x).pow(2).sum(1).mean())

    lo, hi = 0.05, 20.0  # the objective is unimodal in g > 0: golden-section search to 1e-12
    r = (math.sqrt(5) - 1) / 2
    while hi - lo > 1e-12:
        a, b = hi - r * (hi - lo), lo + r * (hi - lo)
        lo, hi = (lo, b) if objective(a) < objective(b) else (a, hi)
    gamma = _gamma(x, x_hat)
    assert gamma == pytest.approx((lo + hi) / 2, abs=1e-8)
    assert gamma < 0.9  # this x_hat is shrunk (0.8 x + noise): gamma must say so
    assert objective(gamma) < objective(gamma * 1.001) and objective(gamma) < objective(gamma / 1.001)


@pytest.mark.parametrize("s", [0.5, 0.97, 1.0, 1.6])
def test_scaled_reconstruction_gives_gamma_s(s):
    x, _, _ = _xs(seed=3)
    assert _gamma(x, s * x) == pytest.approx(s, rel=1e-13)


def test_density_counts_dead_rare_dense():
    # 300k tokens so that 1e-5 is resolvable; fire counts chosen on both sides of each threshold.
    n, counts = 300_000, [0, 2, 3, 30, 3_000, 3_001, 30_000, 30_001, 290_000]
    f_BF = torch.zeros(n, len(counts))
    for j, c in enumerate(counts):
        f_BF[:c, j] = 1.0
    x = torch.zeros(n, 2)
    x[::2, 0] = 1.0
    stats = ReconstructionStats(2, len(counts))
    for a in range(0, n, 70_000):
        stats.update(x[a : a + 70_000], x[a : a + 70_000], f_BF[a : a + 70_000])
    r = stats.result()
    freq = [c / n for c in counts]
    assert r["dead_count"] == 1
    assert r["rare_count"] == sum(0 < f < 1e-5 for f in freq) == 1  # 2 firings; 3/300k is exactly 1e-5
    assert r["rare_resolvable"] is True
    assert r["dense_count_1pct"] == sum(f > 0.01 for f in freq) == 4  # 3000/300k is exactly 1%: not dense
    assert r["dense_count"] == sum(f > 0.1 for f in freq) == 2
    # Histogram of log10(freq + 1e-10) in half-decade bins, against torch.histogram directly.
    direct = torch.histogram(
        torch.log10(torch.tensor(freq, dtype=torch.float64) + 1e-10),
        bins=torch.tensor(r["log10_freq_hist_edges"], dtype=torch.float64),
    ).hist
    assert r["log10_freq_hist_counts"] == [int(c) for c in direct.tolist()]
    few = ReconstructionStats(2, 1)
    few.update(x[:1000], x[:1000], f_BF[:1000, 1:2])
    assert few.result()["rare_resolvable"] is False  # one firing in 1000 tokens is already 1e-3


def test_position_ev_matches_direct_float64():
    S, T, D = 10, 12, 5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(S, T, D, generator=g, dtype=torch.float64) * torch.arange(1, T + 1)[None, :, None] + 3.0
    x_hat = x + torch.randn(S, T, D, generator=g, dtype=torch.float64) * 0.5
    keep = torch.rand(S, T, generator=g) > 0.2
    keep[:, 0] = False  # BOS
    pos = PositionStats(T, D)
    for a, b in [(0, 3), (3, 4), (4, 10)]:
        pos.update(x[a:b].float(), x_hat[a:b].float(), keep[a:b])
    buckets = position_buckets(T, 5)
    assert buckets == [(0, 3), (3, 6), (6, 9), (9, 12)]
    rows, evs = pos.bucket_ev(buckets)
    assert math.isnan(pos.bucket_ev([(0, 1)])[1][0]) and pos.bucket_ev([(0, 1)])[0] == [0]
    for (a, b), n, ev in zip(buckets, rows, evs):
        m = keep[:, a:b]
        xs, xh = x[:, a:b][m].double(), x_hat[:, a:b][m].double()
        xs, xh = xs.float().double(), xh.float().double()  # the stats saw float32 inputs
        direct = 1 - (xs - xh).pow(2).sum(1).mean() / (xs.pow(2).sum(1).mean() - xs.mean(0).pow(2).sum())
        assert n == int(m.sum())
        assert ev == pytest.approx(direct.item(), abs=1e-10)


def test_ce_by_bucket_hand_checked():
    sums = {
        "ce_n": [0, 2, 2, 4],
        "ce_clean": [0, 2.0, 2.0, 4.0],
        "ce_sae": [0, 3.0, 2.0, 6.0],
        "ce_zero": [0, 10.0, 6.0, 12.0],
    }
    out = ce_by_bucket(sums, [(0, 2), (2, 4)])
    assert out["ce_predictions"] == [2, 6]
    assert out["ce_clean"] == [1.0, 1.0] and out["ce_sae"] == [1.5, 8 / 6]
    assert out["ce_score"][0] == pytest.approx((5 - 1.5) / (5 - 1))
    assert out["ce_score"][1] == pytest.approx((3 - 8 / 6) / (3 - 1))


class ReluSAE(torch.nn.Module):
    def __init__(self, d_in=6, d_sae=10, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, d_sae, generator=g))
        self.b_enc = torch.nn.Parameter(torch.randn(d_sae, generator=g) - 1.0)
        self.W_dec = torch.nn.Parameter(torch.randn(d_sae, d_in, generator=g) / 3)

    def encode(self, x):
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec


def _direct_dl(sae, x, n):
    """DL(n) and quantised MSE per the SPECS definition, per latent with torch.histc as the binning oracle."""
    f = sae.encode(x).double()
    dl, f_q = 0.0, torch.zeros_like(f)
    for i in range(f.shape[1]):
        v = f[:, i][f[:, i] != 0]
        p = len(v) / len(x)
        if p == 0:
            continue
        dl += -(p * math.log2(p) + ((1 - p) * math.log2(1 - p) if p < 1 else 0.0))
        lo, hi = v.min().item(), v.max().item()
        if hi > lo:
            q = torch.histc(v, bins=n, min=lo, max=hi) / len(v)
            dl += p * float(-(q[q > 0] * q[q > 0].log2()).sum())
            w = (hi - lo) / n
            idx = ((v - lo) / w).floor().clamp(max=n - 1)
            f_q[f[:, i] != 0, i] = lo + (idx + 0.5) * w
        else:
            f_q[f[:, i] != 0, i] = lo
    mse = float((x.double() - f_q @ sae.W_dec.double()).pow(2).sum(1).mean())
    return dl, mse


def test_mdl_matches_direct_computation(monkeypatch):
    import saeforge.evals.mdl as mdl

    monkeypatch.setattr(mdl, "CHUNK_ROWS", 70)  # several chunks, one ragged
    sae = ReluSAE()
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        r = description_length(sae, x, mse_tolerance=0.05)
        base_mse = float((x.double() - sae.decode(sae.encode(x)).double()).pow(2).sum(1).mean())
        for c in r["candidates"]:
            dl, mse = _direct_dl(sae, x, c["n_bins"])
            assert c["dl_bits"] == pytest.approx(dl, rel=1e-9), c
            assert c["mse"] == pytest.approx(mse, rel=1e-5), c
    assert r["mse_unquantised"] == pytest.approx(base_mse, rel=1e-6)
    ok = [c for c in r["candidates"] if c["mse"] <= 1.05 * base_mse]
    assert r["dl_bits"] == min(c["dl_bits"] for c in ok) and r["n_bins"] == ok[0]["n_bins"] > 1
    dls = [c["dl_bits"] for c in r["candidates"]]
    assert dls == sorted(dls)  # nested bins: finer never costs fewer bits
    assert math.isnan(description_length(sae, x, epsilon=0.0)["dl_bits"])  # nothing reaches MSE 0
