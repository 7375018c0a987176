"""gated, jumprelu, batchtopk, matryoshka: hand-computed forwards and losses, straight-through gradients,
stop-gradients, rescaling invariances, BatchTopK -> JumpReLU, SAELens-format round trips, training."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from saeforge.config import ConfigError, TrainConfig
from saeforge.saes import LossContext, config_class, formats, sae_class
from saeforge.saes.batchtopk import BatchTopKConfig, BatchTopKSAE, batch_topk_mask
from saeforge.saes.gated import GatedConfig, GatedSAE
from saeforge.saes.jumprelu import JumpReLUConfig, JumpReLUFn, JumpReLUSAE, StepFn
from saeforge.saes.matryoshka import MatryoshkaConfig, MatryoshkaSAE
from saeforge.training.trainer import Trainer

NEW = ["gated", "jumprelu", "batchtopk", "matryoshka"]
META = {"model_name": "tiny", "hook_name": "blocks.0.hook_resid_post"}


def set_params(sae, **values):
    with torch.no_grad():
        for name, value in values.items():
            getattr(sae, name).copy_(torch.tensor(value, dtype=torch.float32))
    return sae


def random_sae(arch, seed=0, **kw):
    sae = sae_class(arch)(config_class(arch)(d_in=8, d_sae=32, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(32, generator=g) * 0.5)
    return sae


# ---------------------------------------------------------------- JumpReLU

# d_in 2, d_sae 3, b_dec 0, theta [0.5, 1.5, 0.2].
# x1 = [1, 1]: z = [1, 1, 0.5] -> f = [1, 0, 0.5]; x_hat = [1.5, 0.5]; err^2 = 0.5; L0 = 2.
# x2 = [2, -1]: z = [2, -1, 3.5] -> f = [2, 0, 3.5]; x_hat = [5.5, 3.5]; err^2 = 32.5; L0 = 2.
# mse = 16.5, l0 = 2, loss = 16.5 + 0.5 * 2 = 17.5.
JUMP = dict(
    W_enc=[[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]],
    b_enc=[0.0, 0.0, 0.5],
    W_dec=[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
    b_dec=[0.0, 0.0],
    threshold=[0.5, 1.5, 0.2],
)


def test_jumprelu_forward_and_loss_by_hand():
    sae = set_params(JumpReLUSAE(JumpReLUConfig(d_in=2, d_sae=3, l0_coefficient=0.5)), **JUMP)
    x = torch.tensor([[1.0, 1.0], [2.0, -1.0]])
    assert_close(sae.encode(x), torch.tensor([[1.0, 0.0, 0.5], [2.0, 0.0, 3.5]]))
    out = sae.training_loss(x, LossContext())
    assert_close(out.x_hat_BD, torch.tensor([[1.5, 0.5], [5.5, 3.5]]))
    assert out.parts["mse"].item() == pytest.approx(16.5) and out.parts["l0"].item() == 2.0
    assert out.loss.item() == pytest.approx(17.5)
    assert_close(out.f_BF, sae.encode(x))


def test_jumprelu_straight_through_gradients_by_hand():
    # eps 0.5: the kernel is 1 where |z - theta| < 0.25. z - theta = [[-0.1, 0.2], [0.4, -0.05]] -> K = [[1, 1], [0, 1]].
    z = torch.tensor([[0.9, 0.3], [1.4, 0.05]], requires_grad=True)
    theta = torch.tensor([1.0, 0.1], requires_grad=True)
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    f = JumpReLUFn.apply(z, theta, 0.5)
    assert_close(f, torch.tensor([[0.0, 0.3], [1.4, 0.0]]))
    f.backward(g)
    assert_close(z.grad, torch.tensor([[0.0, 2.0], [3.0, 0.0]]))  # g * H(z - theta): no jump gradient
    # d f / d theta = -(theta / eps) K: column 0 -> -(1 / 0.5) * 1 = -2; column 1 -> -(0.1 / 0.5) * (2 + 4) = -1.2
    assert_close(theta.grad, torch.tensor([-2.0, -1.2]))
    z.grad, theta.grad = None, None
    step = StepFn.apply(z, theta, 0.5)
    assert_close(step, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    step.backward(g)
    assert z.grad is None  # L0 sends nothing into z
    assert_close(theta.grad, torch.tensor([-2.0, -12.0]))  # -(1 / eps) * sum g K


def test_jumprelu_threshold_learns_from_the_l0_penalty_and_stays_positive():
    sae = random_sae("jumprelu", l0_coefficient=10.0, bandwidth=2.0)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    before = sae.threshold.detach().clone()
    sae.training_loss(x, LossContext()).loss.backward()
    assert sae.threshold.grad is not None and sae.threshold.grad.abs().sum() > 0
    with torch.no_grad():
        sae.threshold.sub_(100.0 * sae.threshold.grad).sub_(1e3)  # a wild step below zero
    sae.after_step()
    assert (sae.threshold >= sae.cfg.min_threshold).all() and not torch.equal(before, sae.threshold)


# ---------------------------------------------------------------- Gated

# d_in 2, d_sae 2, b_dec [1, 0], W_dec = I, lambda 0.5.
# x1 = [2, 1]: x_c = [1, 1], W_enc^T x_c = [2, 1]; gate = [2, 0]; mag = [2 + 0.5, 2 * 1] = [2.5, 2];
#   f = [2.5, 0]; x_hat = [3.5, 0]; err^2 = 3.25; ReLU(gate) = [2, 0]; aux residual [2,1] - [3,0] -> 2.
# x2 = [1, 2]: x_c = [0, 2], W_enc^T x_c = [2, 4]; gate = [2, 3]; mag = [2.5, 8]; f = [2.5, 8];
#   x_hat = [3.5, 8]; err^2 = 42.25; l1 = 5; aux residual [1, 2] - [3, 3] -> 5.
# mse 22.75, l1 3.5, aux 3.5: loss = 22.75 + 0.5 * 3.5 + 3.5 = 28.
GATED = dict(
    W_enc=[[1.0, -1.0], [1.0, 2.0]],
    b_gate=[0.0, -1.0],
    r_mag=[0.0, math.log(2.0)],
    b_mag=[0.5, 0.0],
    W_dec=[[1.0, 0.0], [0.0, 1.0]],
    b_dec=[1.0, 0.0],
)
GATED_X = torch.tensor([[2.0, 1.0], [1.0, 2.0]])


def test_gated_forward_and_loss_by_hand():
    sae = set_params(GatedSAE(GatedConfig(d_in=2, d_sae=2, l1_coefficient=0.5)), **GATED)
    assert sorted(sae.state_dict()) == ["W_dec", "W_enc", "b_dec", "b_gate", "b_mag", "r_mag"]  # SAELens's names
    assert_close(sae.encode(GATED_X), torch.tensor([[2.5, 0.0], [2.5, 8.0]]))
    out = sae.training_loss(GATED_X, LossContext())
    assert out.parts["mse"].item() == pytest.approx(22.75) and out.parts["l1"].item() == pytest.approx(3.5)
    assert out.parts["aux"].item() == pytest.approx(3.5) and out.loss.item() == pytest.approx(28.0)
    assert out.parts["l0"].item() == 1.5


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_gated_aux_loss_sends_no_gradient_into_the_decoder(apply_b_dec):
    sae = random_sae("gated", apply_b_dec_to_input=apply_b_dec)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    out = sae.training_loss(x, LossContext())
    out.loss.backward()
    # Only the reconstruction term may move W_dec: d/dW_dec mean_B ||x - f W_dec - b_dec||^2 = -(2/B) f^T r.
    r_BD = (x - out.x_hat_BD).detach()
    assert_close(sae.W_dec.grad, -2 / 16 * out.f_BF.T @ r_BD)
    assert out.parts["aux"] > 0  # the aux term is there, and non-trivial
    if not apply_b_dec:  # then b_dec sits only in the decoder: the aux loss's sg(b_dec) adds nothing
        assert_close(sae.b_dec.grad, -2 / 16 * r_BD.sum(dim=0))
    assert sae.W_enc.grad.abs().sum() > 0 and sae.b_gate.grad.abs().sum() > 0


def test_gated_unit_norm_decoder_after_step():
    sae = random_sae("gated")
    sae.after_step()
    assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


@pytest.mark.parametrize("arch", ["gated", "jumprelu"])
def test_rescaling_a_latent_and_its_decoder_row_leaves_x_hat_unchanged(arch):
    sae = random_sae(arch)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        f_before, x_hat_before = sae.encode(x), sae(x)
        c_F = torch.rand(32, generator=torch.Generator().manual_seed(4)) * 3 + 0.2
        sae.W_enc.mul_(c_F)
        sae.W_dec.div_(c_F[:, None])
        for name in ("b_enc", "threshold") if arch == "jumprelu" else ("b_gate", "b_mag"):
            getattr(sae, name).mul_(c_F)
        assert_close(sae.encode(x), f_before * c_F, rtol=1e-5, atol=1e-5)
        assert_close(sae(x), x_hat_before, rtol=1e-5, atol=1e-5)
    assert (f_before > 0).float().mean() > 0.1  # the check above was not on all-zero latents


# ---------------------------------------------------------------- BatchTopK and Matryoshka

# d_in 2, d_sae 3, k 1, B 2: the batch keeps its 2 largest. W_dec rows [1, 0], [0, 1], [0.6, 0.8]; biases 0.
# x1 = [3, 1]: z = [3, 1, 4]; x2 = [1, 0.5]: z = [1, 0.5, 1.5]. Kept: 4 and 3, both in row 1; row 2 gets none.
# f1 = [3, 0, 4] -> x_hat1 = [5.4, 3.2], err^2 = 10.6; x_hat2 = 0, err^2 = 1.25. Total variance 2.125.
# Matryoshka groups [1, 2]: prefix 1 gives x_hat1 = [3, 0] (err^2 1) and x_hat2 = 0 (1.25).
BTK = dict(
    W_enc=[[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]],
    b_enc=[0.0, 0.0, 0.0],
    W_dec=[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]],
    b_dec=[0.0, 0.0],
)
BTK_X = torch.tensor([[3.0, 1.0], [1.0, 0.5]])


def test_batchtopk_forward_loss_and_threshold_by_hand():
    sae = set_params(BatchTopKSAE(BatchTopKConfig(d_in=2, d_sae=3, k=1, threshold_beta=0.9)), **BTK)
    assert sae.threshold.item() == -1.0
    assert_close(sae.encode(BTK_X), torch.tensor([[3.0, 0.0, 4.0], [0.0, 0.0, 0.0]]))  # no theta yet: batch top-k
    out = sae.training_loss(BTK_X, LossContext())
    assert_close(out.f_BF, torch.tensor([[3.0, 0.0, 4.0], [0.0, 0.0, 0.0]]))
    assert out.loss.item() == pytest.approx(11.85 / 2.125, rel=1e-6) and out.parts["l0"].item() == 1.0
    assert sae.threshold.item() == 3.0  # the first step sets theta to the smallest kept activation
    sae.training_loss(BTK_X * 0.5, LossContext())  # kept 2 and 1.5; b_2 = min(0.9, 1/2): the mean, 2.25
    assert sae.threshold.item() == pytest.approx(2.25)
    assert_close(sae.encode(BTK_X), torch.tensor([[3.0, 0.0, 4.0], [0.0, 0.0, 0.0]]))  # z > 2.25
    for t in range(3, 12):  # b_t = min(0.9, 1 - 1/t): a mean up to t = 10, then the EMA
        expected = min(0.9, 1 - 1 / t) * sae.threshold.item() + (1 - min(0.9, 1 - 1 / t)) * 1.5
        sae.training_loss(BTK_X * 0.5, LossContext())
        assert sae.threshold.item() == pytest.approx(expected)


def test_batch_topk_mask_keeps_exactly_b_times_k():
    z = torch.randn(16, 40, generator=torch.Generator().manual_seed(5))
    mask = batch_topk_mask(z, 3)
    assert mask.sum() == 48 and z[mask].min() > z[~mask].max()


def test_matryoshka_loss_sums_prefix_fvus_by_hand():
    cfg = MatryoshkaConfig(d_in=2, d_sae=3, k=1, group_sizes=[1, 2])
    sae = set_params(MatryoshkaSAE(cfg), **BTK)
    out = sae.training_loss(BTK_X, LossContext())
    assert out.parts["fvu_0"].item() == pytest.approx(2.25 / 2.125) and out.parts["fvu_1"].item() == pytest.approx(
        11.85 / 2.125
    )
    assert out.loss.item() == pytest.approx((2.25 + 11.85) / 2 / 2.125, rel=1e-6)
    assert_close(out.x_hat_BD, torch.tensor([[5.4, 3.2], [0.0, 0.0]]))
    weighted = set_params(
        MatryoshkaSAE(MatryoshkaConfig(d_in=2, d_sae=3, k=1, group_sizes=[1, 2], group_weights=[1, 3])), **BTK
    )
    assert weighted.training_loss(BTK_X, LossContext()).loss.item() == pytest.approx(
        (2.25 + 3 * 11.85) / 2.125, rel=1e-6
    )


def test_matryoshka_group_sizes_default_and_validation():
    assert MatryoshkaConfig(d_sae=4608).sizes() == [288, 288, 576, 1152, 2304]
    assert MatryoshkaConfig(d_sae=3, k=1).sizes() == [3]
    with pytest.raises(ConfigError, match="summing to d_sae=64"):
        MatryoshkaConfig(d_sae=64, k=4, group_sizes=[16, 16])
    with pytest.raises(ConfigError, match="expected 2 weights"):
        MatryoshkaConfig(d_sae=64, k=4, group_sizes=[32, 32], group_weights=[1.0])


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_to_jumprelu_keeps_outputs_and_is_what_gets_saved(tmp_path, arch):
    sae = random_sae(arch, k=4)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(6))
    sae.training_loss(x, LossContext())  # sets theta
    sae.fold_input_scale(2.0)  # what export does; pre-activations and so theta are kept
    jr = sae.inference_sae()
    assert isinstance(jr, JumpReLUSAE) and torch.equal(jr.threshold, torch.full((32,), sae.threshold.item()))
    with torch.no_grad():
        assert torch.equal(jr.encode(x), sae.encode(x)) and torch.equal(jr(x), sae(x))
        assert 0 < (sae.encode(x) > 0).sum() < x.shape[0] * 32
    folder = formats.save_sae(sae, tmp_path / "s", META)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["metadata"]["saeforge_trained_as"]["architecture"] == arch
    assert cfg["metadata"]["saeforge_trained_as"]["k"] == 4
    assert formats.trained_architecture(folder) == arch  # tables name what was trained, not the saved JumpReLU
    loaded = formats.load_sae(folder)
    with torch.no_grad():
        assert isinstance(loaded, JumpReLUSAE) and torch.equal(loaded(x), sae(x))
    fresh = random_sae(arch, k=4)
    with pytest.raises(ValueError, match="no inference threshold yet"):
        fresh.inference_sae()


# ---------------------------------------------------------------- formats and training


@pytest.mark.parametrize("arch", ["gated", "jumprelu"])
def test_round_trip_exact_with_saelens_names_and_tensors(tmp_path, arch):
    sae = random_sae(arch)
    folder = formats.save_sae(sae, tmp_path / "sae", META)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == arch  # SAELens uses the same names for these two
    want = {
        "gated": ["W_dec", "W_enc", "b_dec", "b_gate", "b_mag", "r_mag"],
        "jumprelu": ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"],
    }[arch]
    assert sorted(load_file(str(folder / "sae_weights.safetensors"))) == want
    loaded = formats.load_sae(folder)
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    for name, p in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    # a folder SAELens wrote (no saeforge metadata) loads by its architecture name
    cfg["metadata"] = {"hook_name": "x"}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    assert type(formats.load_sae(folder)) is type(sae)


def test_wrong_architecture_or_shape_is_a_clear_error(tmp_path):
    folder = formats.save_sae(random_sae("jumprelu"), tmp_path / "sae", META)
    weights = folder / "sae_weights.safetensors"
    tensors = load_file(str(weights))
    save_file({**tensors, "threshold": torch.zeros(31)}, str(weights))
    with pytest.raises(ValueError, match=r"threshold has shape \[31\].*implies \[32\]"):
        formats.load_sae(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["architecture"], cfg["metadata"]["saeforge_architecture"] = "gated", "gated"  # jumprelu tensors, gated cfg
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(weights))
    with pytest.raises(
        ValueError,
        match=r"do not match a gated SAE: missing \['b_gate', 'b_mag', 'r_mag'\], unexpected \['b_enc', 'threshold'\]",
    ):
        formats.load_sae(folder)


def sparse_source(n_batches, seed=0, D=8, B=128):
    """Sparse non-negative mixes of 16 fixed unit directions in R^8 (the directions do not depend on seed)."""
    dirs_ND = torch.nn.functional.normalize(torch.randn(16, D, generator=torch.Generator().manual_seed(0)), dim=1)
    g = torch.Generator().manual_seed(1000 + seed)
    for _ in range(n_batches):
        coef = torch.rand(B, 16, generator=g) * (torch.rand(B, 16, generator=g) < 0.15)
        yield coef @ dirs_ND * 3.0


@pytest.mark.parametrize("arch", NEW)
@pytest.mark.slow
def test_each_architecture_trains_through_the_trainer(arch):
    extra = {
        "gated": dict(l1_coefficient=0.3),
        "jumprelu": dict(l0_coefficient=0.05),
        "batchtopk": dict(k=3),
        "matryoshka": dict(k=3, group_sizes=[8, 8, 16]),
    }[arch]
    sae = sae_class(arch)(config_class(arch)(d_in=8, d_sae=32, **extra))
    cfg = TrainConfig(total_tokens=128 * 150, lr=1e-2, lr_warmup_steps=5, log_every_steps=150, dead_after_tokens=5000)
    tr = Trainer(sae, cfg, batch_size=128, progress=False)
    tr.fit(sparse_source(150))
    x = next(sparse_source(1, seed=9))  # unseen rows, through the exported (inference) SAE
    with torch.no_grad():
        final = tr.export_sae()
        ev = 1 - (x - final(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        l0 = (final.encode(x) > 0).sum().item() / len(x)
    assert ev > 0.8 and 0.5 < l0 < 12, (ev, l0)


@pytest.mark.slow
def test_cli_trains_batchtopk_and_evaluates_the_saved_jumprelu(tiny_model_dirs, text_corpus, tmp_path, capsys):
    from saeforge.cli import main

    args = [
        "train",
        "--model",
        tiny_model_dirs["llama"],
        "--hook",
        "blocks.1.hook_resid_post",
        "--corpus",
        text_corpus,
        "--data.context_size",
        64,
        "--data.holdout_fraction",
        0.2,
        "--tokens",
        6000,
        "--activations.batch_size",
        256,
        "--activations.shuffle_sequences",
        32,
        "--arch",
        "batchtopk",
        "--sae.d_sae",
        128,
        "--sae.k",
        8,
        "--train.out_dir",
        tmp_path,
        "--name",
        "b",
        "--eval.tokens",
        1024,
        "--eval.ce_tokens",
        256,
        "--quiet",
    ]
    assert main([str(a) for a in args]) == 0
    assert "explained variance" in capsys.readouterr().out
    sae = formats.load_sae(tmp_path / "b" / "sae")
    ev = json.loads((tmp_path / "b" / "sae" / "eval.json").read_text())
    assert isinstance(sae, JumpReLUSAE) and sae.threshold.min() == sae.threshold.max() > 0
    assert 4 < ev["l0"] < 16 and ev["explained_variance"] > 0.1, ev  # the threshold gives about k = 8 per token
