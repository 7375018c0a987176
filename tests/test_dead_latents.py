"""Dead-latent handling (train.dead_latents), p-annealing and tied weights, against hand computations."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from saeforge.config import ConfigError, TrainConfig
from saeforge.saes.base import LossContext
from saeforge.saes.formats import WEIGHTS_FILE, load_sae, save_sae
from saeforge.saes.registry import config_class, sae_class
from saeforge.training.anneal import PAnneal
from saeforge.training.config import RunConfig
from saeforge.training.dead import ghost_loss, resample_latents
from saeforge.training.trainer import Trainer
from tests.test_training import synthetic_source, train_cfg

D, F_ = 16, 64


def sae_of(arch, d_in=D, d_sae=F_, **kw):
    sae = sae_class(arch)(config_class(arch)(d_in=d_in, d_sae=d_sae, **kw))
    sae.init_weights(torch.Generator().manual_seed(0))
    return sae


# ---- resampling ----------------------------------------------------------------------
def test_resample_recipe_exact():
    sae = sae_of("relu", d_in=4, d_sae=6)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x_ND = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [3.0, 0, 4.0, 0]])
    sae.training_loss(x_ND, LossContext()).loss.backward()
    opt.step()  # Adam moments now exist and are nonzero
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    moments = {id(p): {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for p in sae.parameters()}
    dead_F = torch.tensor([False, True, False, True, False, False])
    # only row 2 has a nonzero loss, so both dead latents must take it (probability ~ loss^2)
    rows = resample_latents(sae, opt, dead_F, x_ND, torch.tensor([0.0, 0.0, 5.0]), torch.Generator().manual_seed(0))
    assert rows.tolist() == [2, 2]
    u = torch.tensor([0.6, 0, 0.8, 0])  # x / ||x|| for x = (3, 0, 4, 0)
    live_norm = before["W_enc"][:, [0, 2, 4, 5]].norm(dim=0).mean()
    for i in (1, 3):
        torch.testing.assert_close(sae.W_dec[i], u, rtol=0, atol=1e-7)
        torch.testing.assert_close(sae.W_enc[:, i], u * 0.2 * live_norm, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(sae.W_enc[:, i].norm(), 0.2 * live_norm, rtol=1e-6, atol=0)
        assert sae.b_enc[i] == 0
    live = [0, 2, 4, 5]
    assert torch.equal(sae.W_dec[live], before["W_dec"][live]) and torch.equal(
        sae.W_enc[:, live], before["W_enc"][:, live]
    )
    assert torch.equal(sae.b_enc[live], before["b_enc"][live]) and torch.equal(sae.b_dec, before["b_dec"])
    for p, dim in ((sae.W_dec, 0), (sae.W_enc, 1), (sae.b_enc, 0)):
        for key in ("exp_avg", "exp_avg_sq"):
            got, old = opt.state[p][key], moments[id(p)][key]
            assert got.index_select(dim, torch.tensor([1, 3])).eq(0).all(), key
            keep = torch.tensor(live)
            assert torch.equal(got.index_select(dim, keep), old.index_select(dim, keep)), key
            assert old.index_select(dim, keep).ne(0).any()  # the test would be vacuous otherwise
    assert torch.equal(opt.state[sae.b_dec]["exp_avg"], moments[id(sae.b_dec)]["exp_avg"])


def test_resample_draws_rows_in_proportion_to_loss_squared():
    sae = sae_of("relu", d_in=2, d_sae=2)
    opt = torch.optim.Adam(sae.parameters())
    x_ND = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    picks = [
        int(
            resample_latents(
                sae, opt, torch.tensor([True, False]), x_ND, torch.tensor([1.0, 2.0]), torch.Generator().manual_seed(s)
            )[0]
        )
        for s in range(4000)
    ]
    # P(row 1) = 2^2 / (1^2 + 2^2) = 0.8 (proportional to loss, it would be 2/3); 4000 draws: sd 0.0063
    assert abs(sum(picks) / len(picks) - 0.8) < 0.025


def test_resampling_in_training_revives_forced_dead_latents():
    sae = sae_of("relu", l1_coefficient=0.5)
    with torch.no_grad():
        sae.b_enc[:8] = -1e6  # can never fire unless resampled
    cfg = train_cfg(total_tokens=128 * 30, dead_after_tokens=128 * 5, dead_latents="resample", resample_every_steps=8)
    tr = Trainer(sae, cfg, 128, None, progress=False)
    tr.fit(synthetic_source())
    assert sae.b_enc[:8].abs().max() < 10  # reset to 0 at step 8, then trained
    assert (tr.tokens_since_fired_F[:8] < 128 * 22).all()  # each fired after its resampling


# ---- ghost grads ---------------------------------------------------------------------
def tiny_relu_for_ghost():
    sae = sae_of("relu", d_in=2, d_sae=2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.5], [0.0, -0.5]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [3.0, 4.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.3]))
        sae.b_dec.zero_()
    return sae


def test_ghost_loss_matches_hand_computation_and_touches_only_dead_latents():
    sae = tiny_relu_for_ghost()
    x, x_hat = torch.tensor([[1.0, 1.0]]), torch.tensor([[-1.0, 1.0]])  # r = (2, 0), ||r|| = 2
    loss = ghost_loss(sae, x, x_hat, torch.tensor([1]))
    # pre = 1*0.5 + 1*(-0.5) + 0.3 = 0.3; g = exp(0.3) (3, 4) rescaled to norm ||r||/2 = 1: (0.6, 0.8)
    mse_main, mse_ghost = 4.0, (0.6 - 2) ** 2 + 0.8**2  # 4 and 2.6
    c = mse_main / mse_ghost  # sg(MSE_main / MSE_ghost): the value equals MSE_main
    assert loss.item() == pytest.approx(mse_main, rel=1e-6)
    loss.backward()
    # the rescale factor s = ||r|| / (2 exp(pre) ||w||) is detached, so dg/dw = s exp(pre) I = (||r|| / 2||w||) I
    # and dg/dpre = g:  dL/dw = c * 2 (g - r) * 2/(2*5),  dL/dpre = c * 2 (g - r).g
    g_minus_r = torch.tensor([0.6 - 2, 0.8])
    torch.testing.assert_close(sae.W_dec.grad[1], c * 2 * g_minus_r / 5, rtol=1e-5, atol=1e-6)
    d_pre = c * 2 * (g_minus_r @ torch.tensor([0.6, 0.8]))  # c * -0.4
    torch.testing.assert_close(sae.b_enc.grad[1], d_pre, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae.W_enc.grad[:, 1], d_pre * x[0], rtol=1e-5, atol=1e-6)
    # the live latent 0 and the shared b_dec get nothing
    assert sae.W_dec.grad[0].eq(0).all() and sae.W_enc.grad[:, 0].eq(0).all() and sae.b_enc.grad[0] == 0
    assert sae.b_dec.grad is None or sae.b_dec.grad.eq(0).all()


def test_ghost_rescale_makes_g_half_the_residual_on_random_rows():
    # exp of large pre-activations would overflow; the row-max shift must not change the loss
    sae = sae_of("relu", d_in=8, d_sae=12)
    g = torch.Generator().manual_seed(1)
    x, x_hat = torch.randn(5, 8, generator=g) * 30, torch.randn(5, 8, generator=g)
    dead = torch.tensor([2, 7, 9])
    r = x - x_hat
    pre = sae.pre_acts_of(x, dead).double()
    assert pre.abs().max() > 1  # nontrivial pre-activations
    gg = torch.exp(pre) @ sae.W_dec[dead].double()
    gg = gg * (r.double().norm(dim=1) / (2 * gg.norm(dim=1)))[:, None]
    torch.testing.assert_close(gg.norm(dim=1), r.double().norm(dim=1) / 2)
    mse_main = r.double().pow(2).sum(1).mean()
    assert ghost_loss(sae, x, x_hat, dead).item() == pytest.approx(mse_main.item(), rel=1e-5)


def test_gated_ghost_uses_the_gate_pre_activations():
    sae = sae_of("gated", d_in=8, d_sae=12)
    with torch.no_grad():
        sae.b_gate.copy_(torch.linspace(-1, 1, 12))
        sae.b_dec.fill_(0.1)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    idx = torch.tensor([0, 5])
    torch.testing.assert_close(sae.pre_acts_of(x, idx), sae.pre_acts(x)[:, idx])


def test_ghost_in_training_logs_and_adds_the_term(tmp_path):
    sae = sae_of("relu", l1_coefficient=0.5)
    with torch.no_grad():
        sae.b_enc[:8] = -5.0
    cfg = train_cfg(total_tokens=128 * 20, dead_after_tokens=128 * 3, dead_latents="ghost")
    tr = Trainer(sae, cfg, 128, None, progress=False)
    tr.scale = 1.0  # train_step without prepare(): raw inputs
    recs = [r for r in (tr.train_step(x) for _, x in zip(range(20), synthetic_source())) if r]
    assert all("ghost" in r for r in recs) and recs[-1]["ghost"] > 0
    assert recs[-1]["loss"] > recs[-1]["ghost"]


# ---- none / auto ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["none", "auto"])
def test_none_turns_auxk_off(mode):
    sae = sae_of("topk", k=4)
    cfg = train_cfg(total_tokens=128 * 10, dead_after_tokens=128, dead_latents=mode, log_every_steps=1)
    tr = Trainer(sae, cfg, 128, None, progress=False)
    tr.scale = 1.0
    auxk = [tr.train_step(x)["auxk"] for _, x in zip(range(6), synthetic_source())]
    assert tr.dead_mask_F.any()
    if mode == "none":
        assert auxk == [0.0] * 6
    else:
        assert auxk[0] == 0.0 and all(a > 0 for a in auxk[2:])  # nothing is dead at step 0


# ---- config validation ---------------------------------------------------------------
def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match=r"train.dead_latents='grad'.*auto.*none.*resample.*ghost"):
        TrainConfig(dead_latents="grad")
    with pytest.raises(ConfigError, match=r"ghost needs a ReLU-style encoder \(relu or gated\), not 'topk'"):
        RunConfig.from_dict({"sae": {"architecture": "topk"}, "train": {"dead_latents": "ghost"}})
    with pytest.raises(ConfigError, match="sae.tied=false"):
        RunConfig.from_dict({"sae": {"architecture": "relu", "tied": True}, "train": {"dead_latents": "resample"}})
    with pytest.raises(ConfigError, match=r"train.p_end=0.5 .*relu or gated, not 'topk'"):
        RunConfig.from_dict({"sae": {"architecture": "topk"}, "train": {"p_end": 0.5}})
    with pytest.raises(ConfigError, match="p = 0 would be L0"):
        TrainConfig(p_end=0.0)
    with pytest.raises(ConfigError, match="0 <= start < end <= 1"):
        TrainConfig(p_anneal_start_fraction=0.8, p_anneal_end_fraction=0.5)
    with pytest.raises(ConfigError, match="resample_every_steps"):
        TrainConfig(resample_every_steps=-1)
    with pytest.raises(ConfigError, match="ghost"):  # the Trainer checks too (it can be built without RunConfig)
        Trainer(sae_of("topk", k=4), train_cfg(dead_latents="ghost"), 128, None, progress=False)
    RunConfig.from_dict({"sae": {"architecture": "gated"}, "train": {"dead_latents": "ghost", "p_end": 0.3}})


# ---- p-annealing ---------------------------------------------------------------------
def test_p_one_is_the_l1_loss_and_p_half_the_lp_loss():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, D, generator=g)
    relu = sae_of("relu", l1_coefficient=0.7)
    with torch.no_grad():
        relu.b_enc.normal_(generator=g)
        relu.W_dec.mul_(torch.rand(F_, 1, generator=g) + 0.5)
    f = torch.relu((x - relu.b_dec) @ relu.W_enc + relu.b_enc)
    mse = (x - (f @ relu.W_dec + relu.b_dec)).pow(2).sum(1).mean()
    norms = relu.W_dec.norm(dim=1)
    for p in (1.0, 0.5):
        want = mse + 0.7 * 0.3 * (f.pow(p) * norms).sum(1).mean()
        got = relu.training_loss(x, LossContext(sparsity_scale=0.3, p=p)).loss
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(relu.training_loss(x, LossContext(p=1.0)).loss, relu.training_loss(x, LossContext()).loss)

    gated = sae_of("gated", l1_coefficient=0.7)
    with torch.no_grad():
        gated.b_gate.normal_(generator=g)
    gate, _ = gated.gate_and_mag(x)
    base = gated.training_loss(x, LossContext(p=1.0))
    half = gated.training_loss(x, LossContext(p=0.5, p_probe=0.25))
    a = torch.relu(gate)
    torch.testing.assert_close(
        half.loss - base.loss, 0.7 * (a.pow(0.5).sum(1).mean() - a.sum(1).mean()), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(half.parts["lp_probe"], a.pow(0.25).sum(1).mean(), rtol=1e-6, atol=1e-6)
    half.loss.backward()  # |f|^p has an infinite slope at 0; ReLU must keep it out of the gradients
    assert all(torch.isfinite(p.grad).all() for p in gated.parameters() if p.grad is not None)


def test_p_schedule_and_lambda_rescale_rule():
    an = PAnneal(
        TrainConfig(p_end=0.5, p_anneal_start_fraction=0.2, p_anneal_end_fraction=0.8, p_anneal_updates=4), n_steps=100
    )
    assert an.change_steps == [35, 50, 65, 80]
    assert [an.p_at(s) for s in (0, 34, 35, 50, 79, 80, 99)] == [1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.5]
    assert [an.probe_at(s) for s in (0, 34, 35, 79, 80)] == [0.875, 0.875, 0.75, 0.5, None]
    ident = lambda t: t  # noqa: E731  (one process: _gather_rows is the identity)
    for pen, probe in ((2.0, 3.0), (4.0, 5.0)):  # means 3 at p = 1 and 4 at p = 0.875
        assert an.begin_step(33, ident) == (1.0, 0.875)
        an.observe({"l1": torch.tensor(pen), "lp_probe": torch.tensor(probe)})
    assert an.begin_step(35, ident) == (0.875, 0.75)
    assert an.lambda_scale == pytest.approx(3 / 4)  # lambda * 4 after the change == lambda * 3 before it
    assert an.sums_2.eq(0).all()
    assert PAnneal(TrainConfig(), 100).begin_step(50, ident) == (1.0, None)


def test_p_annealing_in_training_keeps_the_penalty_size(tmp_path):
    cfg = train_cfg(
        total_tokens=128 * 40, p_end=0.5, p_anneal_updates=2, log_every_steps=1, sparsity_warmup_fraction=0.0
    )
    tr = Trainer(sae_of("relu", l1_coefficient=0.5), cfg, 128, None, progress=False)
    tr.scale = 1.0
    recs = [tr.train_step(x) for _, x in zip(range(40), synthetic_source())]
    assert tr.anneal.change_steps == [20, 32]
    before, after = recs[19], recs[20]  # step 20 (logged as 21) is the first with p = 0.75
    assert before["p"] == 1.0 and after["p"] == 0.75 and after["lambda_scale"] != 1.0
    # scaled penalty right after the change ~ right before it (one batch apart: measured 1.7%)
    assert after["l1"] * after["lambda_scale"] == pytest.approx(before["l1"], rel=0.05)
    assert recs[-1]["p"] == 0.5


# ---- tied weights --------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_tied_gradient_flows_into_the_one_matrix(arch):
    extra = {"k": 4} if arch == "topk" else {"l1_coefficient": 0.5}
    tied = sae_of(arch, tied=True, **extra)
    untied = sae_of(arch, **extra)
    untied.load_state_dict({**tied.state_dict(), "W_enc": tied.W_dec.detach().T.clone()})
    assert "W_enc" not in dict(tied.named_parameters()) and tied.W_enc.data_ptr() == tied.W_dec.data_ptr()
    x = next(iter(synthetic_source())) * 0.3
    ctx = LossContext(dead_mask_F=torch.arange(F_) >= F_ - 8)
    lt, lu = tied.training_loss(x, ctx).loss, untied.training_loss(x, ctx).loss
    torch.testing.assert_close(lt, lu)
    lt.backward()
    lu.backward()
    # d/dW of L(W_enc = W^T, W_dec = W) = dL/dW_dec + (dL/dW_enc)^T
    torch.testing.assert_close(tied.W_dec.grad, untied.W_dec.grad + untied.W_enc.grad.T, rtol=1e-5, atol=1e-6)
    assert untied.W_enc.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_tied_save_load_round_trip(tmp_path, arch):
    sae = sae_of(arch, tied=True, **({"k": 4} if arch == "topk" else {}))
    with torch.no_grad():
        sae.b_enc.normal_(generator=torch.Generator().manual_seed(4))
    folder = save_sae(sae, tmp_path / "s", {})
    t = load_file(str(folder / WEIGHTS_FILE))
    assert set(t) == {"W_enc", "b_enc", "W_dec", "b_dec"} and torch.equal(t["W_enc"], t["W_dec"].T)
    back = load_sae(folder)
    assert back.tied and "W_enc" not in dict(back.named_parameters())
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(back(x), sae(x), rtol=0, atol=0)
    t["W_enc"] = t["W_enc"] + 1e-3
    save_file(t, str(folder / WEIGHTS_FILE))
    with pytest.raises(ValueError, match='tied=true but W_enc is not W_dec\\^T; set "tied": false'):
        load_sae(folder)


def test_tied_export_unties_when_the_input_scale_is_folded():
    sae = sae_of("relu", tied=True)
    tr = Trainer(sae, train_cfg(), 128, None, progress=False)
    tr.scale = 2.0
    raw = tr.export_sae()
    assert not raw.tied and raw.cfg.tied is False and sae.tied
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(raw.encode(x), sae.encode(x * 2.0), rtol=1e-5, atol=1e-6)
    tr.scale = 1.0
    assert tr.export_sae().tied  # nothing to fold: the tie survives
    assert dataclasses.asdict(tr.export_sae().cfg)["tied"] is True
