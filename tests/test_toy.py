"""Toy superposition data: rates and correlations as specified, MMCS by hand, and every architecture
recovering the true features.

The recovery test uses SPECS's sizes (d = 256, 512 unit feature directions, ~5 active per sample) at
width 512, with one change so it fits in CI: every feature fires at the same rate (decay = 1; SPECS's
0.99^i rates make the rarest features ~170x rarer, and learning those takes ~2M tokens per
architecture: bench/toy_table.py runs that full setup). 586 steps of 512 rows, one thread.
"""

from __future__ import annotations

import pytest
import torch

from saeforge.config import ConfigError, TrainConfig
from saeforge.evals.dictionaries import mmcs
from saeforge.saes import config_class, sae_class
from saeforge.toy import ToyConfig, ToyData, train_toy


@pytest.fixture
def one_thread():
    # Tiny matmuls: thread hand-offs cost more than the work, and far more on a shared machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_rates_follow_decay_and_mean_active():
    data = ToyData(ToyConfig())
    assert data.features_ND.shape == (512, 256)
    torch.testing.assert_close(data.features_ND.norm(dim=1), torch.ones(512))
    assert data.p_N.sum().item() == pytest.approx(5.0, rel=1e-5)
    assert (data.p_N[1:] / data.p_N[:-1]).sub(0.99).abs().max() < 1e-5
    active = data.active(20_000, torch.Generator().manual_seed(1))
    assert active.sum(1).float().mean().item() == pytest.approx(5.0, abs=0.05)  # sd of the mean ~0.016
    x = data.sample(4, torch.Generator().manual_seed(2))
    assert torch.equal(x, ToyData(ToyConfig()).sample(4, torch.Generator().manual_seed(2)))  # seeded


def test_correlated_keeps_each_rate_and_makes_aligned_features_co_occur():
    cfg = ToyConfig(d=16, n_features=32, mean_active=4, correlated=True, correlation=0.8, rank=2)
    data = ToyData(cfg)
    active = data.active(100_000, torch.Generator().manual_seed(3)).float()
    rate_N = active.mean(0)
    assert (rate_N - data.p_N).abs().max() < 0.006  # marginals kept (binomial sd <= 0.0016)
    # the two features whose shared factors are most aligned fire together far more often than independent ones
    cos_NN = data.shared_NR @ data.shared_NR.T / cfg.correlation
    cos_NN.fill_diagonal_(-2)
    i, j = divmod(int(cos_NN.argmax()), cfg.n_features)
    together = (active[:, i] * active[:, j]).mean().item()
    assert together > 3 * rate_N[i].item() * rate_N[j].item()
    independent = (
        ToyData(ToyConfig(d=16, n_features=32, mean_active=4)).active(100_000, torch.Generator().manual_seed(3)).float()
    )
    assert (independent[:, i] * independent[:, j]).mean().item() < 1.5 * data.p_N[i].item() * data.p_N[j].item()


def test_toy_config_errors_say_what_to_change():
    with pytest.raises(ConfigError, match="mean_active"):
        ToyConfig(mean_active=0)
    with pytest.raises(ConfigError, match="rate at 1"):
        ToyData(ToyConfig(n_features=8, mean_active=7, decay=0.5))


def test_mmcs_by_hand():
    A = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    B = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    # row [1, 0]: cos 0.7071 to [1, 1], 0 to [0, -1]; row [0, 1]: 0.7071 and -1 -> both 0.7071
    assert mmcs(A, B) == pytest.approx(2**-0.5)
    assert mmcs(A, torch.tensor([[0.0, 3.0], [2.0, 0.0], [1.0, 1.0]])) == pytest.approx(
        1.0
    )  # scaled, permuted, extra row
    # not symmetric: from B, [1, 1] has 0.7071 to either row of A, [0, -1] has 0 and -1 -> mean 0.3536
    assert mmcs(B, A) == pytest.approx(2**-0.5 / 2)


def test_an_untrained_sae_does_not_start_at_the_features():
    # The features and random_directions both draw randn(n, d): the seeds must differ, or MMCS is 1 before training.
    data = ToyData(ToyConfig(d=32, n_features=64))
    for arch in ("relu", "topk"):
        sae = sae_class(arch)(config_class(arch)(d_in=32, d_sae=64))
        sae.init_weights(torch.Generator().manual_seed(0))
        assert mmcs(data.features_ND, sae.W_dec.detach()) < 0.7


RECOVERY = {  # sae fields for SPECS's toy sizes at width 512 (toy.TOY_SAE_DEFAULTS for the rest)
    "relu": {},
    "gated": {},
    "jumprelu": {},
    "topk": {},
    "batchtopk": {},
    # the first prefix must reconstruct alone; a 384-latent first group still has room for most features
    # (a small first group learns feature mixtures, as the method intends, and lowers MMCS)
    "matryoshka": {"group_sizes": [384, 128]},
}


@pytest.mark.parametrize("arch", sorted(RECOVERY))
@pytest.mark.slow
def test_each_architecture_recovers_the_uncorrelated_features_at_width_512(arch, one_thread):
    toy = ToyConfig(d=256, n_features=512, mean_active=5.0, decay=1.0)
    train = TrainConfig(total_tokens=300_000, lr=1e-2, lr_warmup_steps=20)
    r = train_toy(arch, toy, RECOVERY[arch], train, d_sae=512, batch_size=512)
    assert r["mmcs"] >= 0.9, r
    assert 3 < r["l0"] < 9 and r["explained_variance"] > 0.75, r
