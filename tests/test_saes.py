"""saeforge.saes: hand-computed forward passes and losses, invariances, fast path vs reference, format round trips."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from saeforge.config import ConfigError
from saeforge.saes import LossContext, SAEConfig, config_class, formats, losses, names, register, sae_class
from saeforge.saes.relu import ReLUConfig, ReLUSAE
from saeforge.saes.topk import FastPaths, TopKConfig, TopKSAE
from saeforge.training.config import RunConfig


def set_params(sae, W_enc, b_enc, W_dec, b_dec):
    with torch.no_grad():
        for name, value in dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec).items():
            getattr(sae, name).copy_(torch.tensor(value, dtype=torch.float32))
    return sae


def random_sae(arch, seed=0, **kw):
    cfg = config_class(arch)(d_in=8, d_sae=32, **kw)
    sae = sae_class(arch)(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # break the W_enc = W_dec^T symmetry and zero biases of the init
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return sae


def grads(sae):
    return {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- configs and registry


def test_registry_lists_and_resolves_builtin_architectures():
    assert {"relu", "topk"} <= set(names())
    assert config_class("topk") is TopKConfig and sae_class("topk") is TopKSAE
    assert config_class("relu") is ReLUConfig and sae_class("relu") is ReLUSAE
    with pytest.raises(ValueError, match=r"unknown SAE architecture 'nosuch'.*'relu'.*'topk'"):
        config_class("nosuch")


def test_register_refuses_a_config_whose_architecture_default_differs():
    with pytest.raises(ValueError, match="defaults to 'relu'"):
        register("myrelu", ReLUSAE, ReLUConfig)


def test_runconfig_builds_the_sae_config_from_the_registry():
    run = RunConfig.from_dict({"sae": {"architecture": "relu", "d_in": 16, "l1_coefficient": "2.5"}})
    assert isinstance(run.sae, ReLUConfig) and run.sae.l1_coefficient == 2.5 and run.sae.d_in == 16
    assert isinstance(RunConfig().sae, TopKConfig) and RunConfig().sae.k == 32


def test_config_validation_messages():
    with pytest.raises(ConfigError, match="does not match ReLUConfig"):
        ReLUConfig(architecture="topk")
    with pytest.raises(ConfigError, match="sae.k=0"):
        TopKConfig(d_in=4, d_sae=8, k=0)
    with pytest.raises(ConfigError, match="sae.dtype"):
        TopKConfig(dtype="float8")
    with pytest.raises(ConfigError, match="d_model"):
        TopKSAE(TopKConfig(d_in=0, d_sae=8, k=2))


# ---------------------------------------------------------------- ReLU

# d_in = 2, d_sae = 3. Row 1: x - b_dec = [1, 1], pre = [1, 0.5, 0], f = [1, 0.5, 0],
# x_hat = [1, 0] + 0.5 [0, 1] + b_dec = [1.5, 0.5], err^2 = 0.25.
# Row 2: x - b_dec = [0, -1], pre = [0, -1.5, 1], f = [0, 0, 1], x_hat = [1, 1] + b_dec = [1.5, 1],
# err = [-1, -2], err^2 = 5. mse = 2.625; decoder norms [1, 1, sqrt 2]; l1 = (1.5 + sqrt 2) / 2.
RELU_PARAMS = dict(
    W_enc=[[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]],
    b_enc=[0.0, -0.5, 0.0],
    W_dec=[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
    b_dec=[0.5, 0.0],
)
RELU_X = torch.tensor([[1.5, 1.0], [0.5, -1.0]])


def tiny_relu(**kw):
    return set_params(ReLUSAE(ReLUConfig(d_in=2, d_sae=3, **kw)), **RELU_PARAMS)


def test_relu_forward_and_loss_by_hand():
    sae = tiny_relu(l1_coefficient=2.0)
    assert_close(sae.encode(RELU_X), torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 1.0]]))
    assert_close(sae(RELU_X), torch.tensor([[1.5, 0.5], [1.5, 1.0]]))
    out = sae.training_loss(RELU_X, LossContext(sparsity_scale=0.5))
    l1 = (1.5 + math.sqrt(2)) / 2
    assert_close(out.parts["mse"], torch.tensor(2.625))
    assert_close(out.parts["l1"], torch.tensor(l1))
    assert_close(out.parts["l0"], torch.tensor(1.5))
    assert_close(out.loss, torch.tensor(2.625 + 2.0 * 0.5 * l1))
    assert out.fire_count_F().tolist() == [1, 1, 1]


def test_relu_loss_gradient_by_hand():
    # d loss / d b_dec with l1_coefficient 0: x_hat depends on b_dec directly (+I) and through
    # the encoder (-W_enc W_dec restricted to active latents). Check against float64 autograd of the formula.
    sae = tiny_relu(l1_coefficient=0.0)
    sae.training_loss(RELU_X, LossContext()).loss.backward()
    p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in RELU_PARAMS.items()}
    x = RELU_X.double()
    f = torch.relu((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
    ((x - f @ p["W_dec"] - p["b_dec"]) ** 2).sum(1).mean().backward()
    for name in p:
        assert_close(getattr(sae, name).grad, p[name].grad.float())


def test_relu_init_is_the_2024_recipe():
    sae = ReLUSAE(ReLUConfig(d_in=16, d_sae=64))
    assert_close(sae.W_dec.norm(dim=1), torch.full((64,), 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert not sae.b_enc.any() and not sae.b_dec.any()
    sae.init_weights(torch.Generator().manual_seed(1))
    assert not torch.equal(sae.W_dec, ReLUSAE(ReLUConfig(d_in=16, d_sae=64)).W_dec)


def test_relu_latent_rescaling_leaves_reconstruction_and_loss_unchanged():
    sae = random_sae("relu")
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    before = sae.training_loss(x, LossContext())
    f_before = sae.encode(x)
    s = torch.linspace(0.25, 4.0, 32)
    with torch.no_grad():
        sae.W_enc.mul_(s)
        sae.b_enc.mul_(s)
        sae.W_dec.div_(s[:, None])
    after = sae.training_loss(x, LossContext())
    assert_close(after.x_hat_BD, before.x_hat_BD, rtol=1e-5, atol=1e-5)
    assert_close(sae.encode(x), f_before * s, rtol=1e-5, atol=1e-5)
    assert_close(after.loss, before.loss, rtol=1e-5, atol=1e-5)  # the decoder-norm-weighted L1 is invariant too


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_pre_acts_fast_form_matches_reference_values_and_grads(apply_b_dec):
    sae = random_sae("relu", apply_b_dec_to_input=apply_b_dec)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    up = torch.randn(16, 32, generator=torch.Generator().manual_seed(5))
    (sae.pre_acts(x) * up).sum().backward()
    fast = grads(sae)
    sae.zero_grad()
    (sae.pre_acts_reference(x) * up).sum().backward()
    assert_close(sae.pre_acts(x), sae.pre_acts_reference(x))
    reference = grads(sae)
    assert set(fast) == set(reference) == ({"W_enc", "b_enc", "b_dec"} if apply_b_dec else {"W_enc", "b_enc"})
    for name, g in reference.items():
        assert_close(fast[name], g, msg=name)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_fold_input_scale_keeps_latents_and_scales_reconstruction(arch):
    sae = random_sae(arch, k=4) if arch == "topk" else random_sae(arch)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(6))
    c = 3.0
    with torch.no_grad():
        f_scaled, x_hat_scaled = sae.encode(c * x), sae(c * x)
        sae.fold_input_scale(c)
        assert_close(sae.encode(x), f_scaled, rtol=1e-5, atol=1e-5)
        assert_close(sae(x), x_hat_scaled / c, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="positive"):
        sae.fold_input_scale(0.0)


# ---------------------------------------------------------------- TopK

# d_in = 2, d_sae = 3, k = 1, b_dec = [1, 0], b_enc = 0, W_dec rows unit norm.
# Row 1: x - b_dec = [2, 1], pre = [2, 1, 2.5] -> latent 2 (2.5); x_hat = [1.5, 2] + b_dec = [2.5, 2]; err^2 = 1.25.
# Row 2: x - b_dec = [0, 3], pre = [0, 3, 1.5] -> latent 1 (3); x_hat = [1, 3] = x; err^2 = 0.
# Row 3: x - b_dec = [-2, -1], pre = [-2, -1, -2.5] -> latent 1 (-1), ReLU -> 0; x_hat = b_dec; err^2 = 5.
# Total variance: mean x = [1, 1], deviations [2, 0], [0, 2], [-2, -2] -> 16. FVU = 6.25 / 16.
TOPK_PARAMS = dict(
    W_enc=[[1.0, 0.0, 1.0], [0.0, 1.0, 0.5]],
    b_enc=[0.0, 0.0, 0.0],
    W_dec=[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]],
    b_dec=[1.0, 0.0],
)
TOPK_X = torch.tensor([[3.0, 1.0], [1.0, 3.0], [-1.0, -1.0]])
# AuxK with latents 0 and 2 dead, aux_k = 1. Residuals e: [0.5, -1], [0, 0], [-2, -1].
# Dead pre-acts: row 1 {0: 2, 2: 2.5} -> 2.5 W_dec[2] = [1.5, 2]; row 2 {0: 0, 2: 1.5} -> [0.9, 1.2];
# row 3 {0: -2, 2: -2.5} -> ReLU(-2) = 0. Squared errors 10 + 2.25 + 5 = 17.25.
# Residual variance: mean e = [-0.5, -2/3] -> (1 + 1/9) + (0.25 + 4/9) + (2.25 + 1/9) = 25/6. AuxK = 4.14.
TOPK_DEAD = torch.tensor([True, False, True])


def tiny_topk(sparse_decode=True, sparse_grad=True, **kw):
    sae = set_params(TopKSAE(TopKConfig(d_in=2, d_sae=3, k=1, aux_k=1, **kw)), **TOPK_PARAMS)
    return with_paths(sae, sparse_decode, sparse_grad)


def with_paths(sae, sparse_decode, sparse_grad):
    """``sae`` with TopK's decode / encoder-gradient fast paths on or off (not config: never saved)."""
    sae.fast = FastPaths(sparse_decode=sparse_decode, sparse_encoder_grad=sparse_grad)
    return sae


FAST_PATHS = [  # (sparse_decode, sparse_encoder_grad); (False, False) is the plain autograd reference
    (True, True),
    (True, False),
    (False, True),
    (False, False),
]


@pytest.mark.parametrize("sparse_decode,sparse_grad", FAST_PATHS)
def test_topk_forward_and_loss_by_hand(sparse_decode, sparse_grad):
    sae = tiny_topk(sparse_decode, sparse_grad, aux_coefficient=0.5)
    assert_close(sae.encode(TOPK_X), torch.tensor([[0.0, 0.0, 2.5], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0]]))
    assert_close(sae(TOPK_X), torch.tensor([[2.5, 2.0], [1.0, 3.0], [1.0, 0.0]]))
    out = sae.training_loss(TOPK_X, LossContext())
    assert_close(out.parts["fvu"], torch.tensor(6.25 / 16))
    assert_close(out.parts["mse"], torch.tensor(6.25 / 3))
    assert_close(out.parts["l0"], torch.tensor(2 / 3))
    assert out.parts["auxk"].item() == 0.0
    assert_close(out.loss, torch.tensor(6.25 / 16))
    assert_close(out.f_BF, sae.encode(TOPK_X))
    assert out.fire_count_F().tolist() == [0, 1, 1]

    out = sae.training_loss(TOPK_X, LossContext(dead_mask_F=TOPK_DEAD))
    assert_close(out.parts["auxk"], torch.tensor(4.14))
    assert_close(out.loss, torch.tensor(6.25 / 16 + 0.5 * 4.14))


def test_auxk_is_zero_without_dead_latents():
    sae = random_sae("topk", k=4)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(7))
    for mask in (None, torch.zeros(32, dtype=torch.bool)):
        out = sae.training_loss(x, LossContext(dead_mask_F=mask))
        assert out.parts["auxk"].item() == 0.0
        assert_close(out.loss, out.parts["fvu"])


@pytest.mark.parametrize("sparse_decode,sparse_grad", FAST_PATHS)
def test_auxk_gradient_reaches_only_dead_latents(sparse_decode, sparse_grad, encoder_backward):
    # gradient of AuxK alone = gradient with the dead mask minus gradient without it (aux_coefficient 1)
    sae = tiny_topk(sparse_decode, sparse_grad, aux_coefficient=1.0)
    sae.training_loss(TOPK_X, LossContext()).loss.backward()
    without = grads(sae)
    sae.zero_grad()
    sae.training_loss(TOPK_X, LossContext(dead_mask_F=TOPK_DEAD)).loss.backward()
    aux = {name: g - without[name] for name, g in grads(sae).items()}
    zero2 = torch.zeros(2)
    # live latent 1 gets nothing; dead latent 2 (selected with a positive value) does
    assert_close(aux["W_enc"][:, 1], zero2)
    assert_close(aux["W_dec"][1], zero2)
    assert aux["b_enc"][1].abs() < 1e-6
    assert aux["W_enc"][:, 2].abs().sum() > 0.1 and aux["b_enc"][2].abs() > 0.1
    # latent 0 was picked only in row 3, with ReLU(-2) = 0: no gradient either
    assert_close(aux["W_dec"][0], zero2)
    assert_close(aux["W_enc"][:, 0], zero2)
    # W_dec[2] by hand: d/dw sum_b ||e_b - v_b w||^2 / (25/6) = -2 sum_b v_b (e_b - v_b w) / (25/6)
    e = torch.tensor([[0.5, -1.0], [0.0, 0.0], [-2.0, -1.0]])
    w = torch.tensor([0.6, 0.8])
    assert_close(aux["W_dec"][2], -2 * (2.5 * (e[0] - 2.5 * w) + 1.5 * (e[1] - 1.5 * w)) / (25 / 6))


@pytest.fixture(params=["sparse product", "dense product"])
def encoder_backward(request, monkeypatch):
    """Run the sparse-encoder-gradient backward through each of its two kernels."""
    from saeforge.saes import topk

    monkeypatch.setattr(topk._TopKEncoder, "sparse_max_fill", 1.0 if request.param == "sparse product" else 0.0)
    return request.param


@pytest.mark.parametrize("sparse_decode,sparse_grad", FAST_PATHS[:3])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_topk_fast_paths_match_dense_reference_values_and_grads(
    sparse_decode, sparse_grad, apply_b_dec, encoder_backward
):
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(8))
    dead = torch.rand(32, generator=torch.Generator().manual_seed(9)) < 0.5
    results = []
    for fast in ((sparse_decode, sparse_grad), (False, False)):
        sae = with_paths(random_sae("topk", k=4, aux_k=3, apply_b_dec_to_input=apply_b_dec), *fast)
        out = sae.training_loss(x, LossContext(dead_mask_F=dead))
        out.loss.backward()
        results.append((sae, out, grads(sae)))
    (sae, o1, g1), (_, o2, g2) = results
    assert o1.parts["auxk"] > 0
    assert_close(o1.x_hat_BD, o2.x_hat_BD)
    assert_close(o1.loss, o2.loss)
    assert set(g1) == set(g2) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in g1:
        assert g1[name].abs().sum() > 0, name
        assert_close(g1[name], g2[name], msg=name)
    # the lazily built dense f_BF is the inference encoding, and decodes to the same x_hat
    assert_close(o1.f_BF, sae.encode(x))
    assert_close(sae.decode(o1.f_BF), o1.x_hat_BD)
    assert torch.equal(o1.fire_count_F(), (sae.encode(x) > 0).sum(0))


@pytest.mark.parametrize("sparse_decode,sparse_grad", FAST_PATHS)
def test_topk_fvu_and_auxk_are_the_shared_losses(sparse_decode, sparse_grad):
    """TopK's fused FVU/AuxK (dead columns sliced, sparse decode) against saes.losses' plain forms and float64."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(8))
    dead = torch.rand(32, generator=torch.Generator().manual_seed(9)) < 0.5
    sae = with_paths(random_sae("topk", k=4, aux_k=3), sparse_decode, sparse_grad)
    out = sae.training_loss(x, LossContext(dead_mask_F=dead))
    with torch.no_grad():
        e = x - out.x_hat_BD
        want_auxk = losses.auxk_loss(sae.pre_acts_reference(x), dead, e, sae.W_dec, sae.aux_k)
        assert out.parts["auxk"] > 0
        assert_close(out.parts["auxk"], want_auxk)
        assert_close(out.parts["fvu"], losses.fvu(x, out.x_hat_BD)[0])
        x64, e64 = x.double(), e.double()
        fvu64 = e64.pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum()
        assert_close(out.parts["fvu"], fvu64.float())
        assert_close(losses.explained_variance(x, out.x_hat_BD), (1 - fvu64).float())


def test_topk_trains_under_bf16_autocast_close_to_fp32():
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(10))
    dead = torch.arange(32) % 3 == 0
    outs = {}
    for sparse in (True, False):
        for bf16 in (True, False):
            sae = with_paths(random_sae("topk", k=4), sparse, sparse)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = sae.training_loss(x, LossContext(dead_mask_F=dead))
            out.loss.backward()
            assert out.x_hat_BD.dtype == torch.float32 and sae.W_dec.grad.dtype == torch.float32
            outs[sparse, bf16] = out.loss.item()
    assert outs[True, True] == pytest.approx(outs[True, False], rel=0.03)
    assert outs[True, True] == pytest.approx(outs[False, True], rel=0.03)


def test_topk_init_and_unit_norm_decoder_constraint():
    sae = TopKSAE(TopKConfig(d_in=16, d_sae=64, k=4))
    assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    assert torch.equal(sae.W_enc, sae.W_dec.T) and not sae.b_dec.any()
    assert sae.aux_k == 8  # d_in // 2
    # W_dec[0] = [0.6, 0.8], grad [1, 0]: parallel part 0.6 [0.6, 0.8] is removed -> [0.64, -0.48]
    sae = tiny_topk()
    sae.W_dec.grad = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    sae.remove_parallel_grads()
    assert_close(sae.W_dec.grad[2], torch.tensor([0.64, -0.48]))
    assert_close(sae.W_dec.grad[0], torch.tensor([0.0, 0.0]))
    with torch.no_grad():
        sae.W_dec.mul_(torch.tensor([[2.0], [0.5], [3.0]]))
    sae.after_step()
    assert_close(sae.W_dec, torch.tensor(TOPK_PARAMS["W_dec"]))


def test_topk_rejects_single_row_batches():
    with pytest.raises(ValueError, match="at least 2 rows"):
        tiny_topk().training_loss(TOPK_X[:1], LossContext())


# ---------------------------------------------------------------- SAELens folders

META = {"model_name": "tiny-llama", "hook_name": "blocks.1.hook_resid_post", "context_size": 32, "run": "abc"}


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_save_load_round_trip_is_exact_with_saelens_keys(tmp_path, arch):
    sae = random_sae(arch, k=4) if arch == "topk" else random_sae(arch, l1_coefficient=3.0)
    folder = formats.save_sae(sae, tmp_path / "sae", META)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk"}[arch]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["apply_b_dec_to_input"]) == (8, 32, "float32", True)
    assert cfg["normalize_activations"] == "none" and cfg["format_version"] == 1
    assert cfg["metadata"]["saeforge_architecture"] == arch and cfg["metadata"]["sae_lens_version"] == "6.0.0"
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and cfg["metadata"]["run"] == "abc"
    assert cfg["metadata"]["dataset_path"] is None and "prepend_bos" in cfg["metadata"]
    if arch == "topk":
        assert (cfg["k"], cfg["aux_k"], cfg["rescale_acts_by_decoder_norm"]) == (4, 0, False)
    else:
        assert cfg["l1_coefficient"] == 3.0
    assert sorted(load_file(str(folder / "sae_weights.safetensors"))) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    loaded = formats.load_sae(folder)
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    for name, p in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    assert formats.load_sparsity(folder) is None


def test_topk_cfg_json_with_the_retired_fast_path_switches_still_loads(tmp_path):
    # sparse_decode / sparse_encoder_grad / blocked_topk were TopKConfig fields (saved in every cfg.json)
    # until they became FastPaths, which is not config: an old folder loads, the switches ignored.
    sae = random_sae("topk", k=4)
    folder = formats.save_sae(sae, tmp_path / "sae", META)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert not {"sparse_decode", "sparse_encoder_grad", "blocked_topk"} & set(cfg)
    cfg.update(sparse_decode=False, sparse_encoder_grad=True, blocked_topk=False)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    loaded = formats.load_sae(folder)
    assert loaded.cfg == sae.cfg and loaded.fast == FastPaths()
    assert torch.equal(loaded.W_dec, sae.W_dec) and torch.equal(loaded.W_enc, sae.W_enc)


def test_an_old_run_config_with_the_retired_switches_still_resumes(tmp_path):
    # A run folder's config.json from before FastPaths holds the three switches in its sae section.
    cfg = RunConfig.from_dict({"sae": {"architecture": "topk", "k": 8}})
    old = cfg.to_dict()
    old["sae"].update(sparse_decode=True, sparse_encoder_grad=False, blocked_topk=True)
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert RunConfig.load(tmp_path / "config.json") == cfg
    with pytest.raises(ConfigError, match="unknown sae fields"):
        RunConfig.from_dict({"sae": {"architecture": "topk", "sparse_decoder": True}})


def test_sparsity_file_written_and_read(tmp_path):
    sae = random_sae("topk", k=4)
    log_freq = torch.linspace(-10, 0, 32)
    folder = formats.save_sae(sae, tmp_path / "s", META, sparsity_F=log_freq)
    assert list(load_file(str(folder / "sparsity.safetensors"))) == ["sparsity"]
    assert torch.equal(formats.load_sparsity(folder), log_freq)
    with pytest.raises(ValueError, match=r"shape \[31\]; expected \[32\]"):
        formats.save_sae(sae, tmp_path / "t", META, sparsity_F=log_freq[:31])


def test_load_reports_wrong_shapes_names_architecture_and_missing_files(tmp_path):
    folder = formats.save_sae(random_sae("relu"), tmp_path / "sae", META)
    weights = folder / "sae_weights.safetensors"
    tensors = load_file(str(weights))
    save_file({**tensors, "W_enc": torch.zeros(8, 31)}, str(weights))
    with pytest.raises(ValueError, match=r"W_enc has shape \[8, 31\].*implies \[8, 32\]"):
        formats.load_sae(folder)
    save_file({k: v for k, v in tensors.items() if k != "b_enc"}, str(weights))
    with pytest.raises(ValueError, match=r"missing \['b_enc'\]"):
        formats.load_sae(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors is missing.*partial"):
        formats.load_sae(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["metadata"]["saeforge_architecture"]
    cfg["architecture"] = "nosuch"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'nosuch'.*known: \[.*'relu'.*'topk'\]"):
        formats.load_sae(folder)


def test_saelens_written_standard_folder_loads_as_relu(tmp_path):
    sae = random_sae("relu")
    folder = formats.save_sae(sae, tmp_path / "sae", {})
    cfg = json.loads((folder / "cfg.json").read_text())
    saelens_cfg = {
        k: cfg[k]
        for k in ("architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations")
    }
    saelens_cfg["metadata"] = {"hook_name": "blocks.0.hook_resid_pre"}
    (folder / "cfg.json").write_text(json.dumps(saelens_cfg))
    loaded = formats.load_sae(folder)
    assert isinstance(loaded, ReLUSAE) and torch.equal(loaded.W_dec, sae.W_dec)
    saelens_cfg["normalize_activations"] = "expected_average_only_in"
    (folder / "cfg.json").write_text(json.dumps(saelens_cfg))
    with pytest.raises(ValueError, match="fold_activation_norm_scaling_factor"):
        formats.load_sae(folder)


def test_interrupted_save_never_leaves_a_loadable_partial_folder(tmp_path, monkeypatch):
    old, new = random_sae("relu", seed=1), random_sae("relu", seed=2)
    folder = formats.save_sae(old, tmp_path / "sae", META)
    real_save_file = formats.save_file

    def crash_after_weights(tensors, path, **kw):
        real_save_file(tensors, path, **kw)
        if path.endswith("sparsity.safetensors"):
            raise OSError("disk full")

    monkeypatch.setattr(formats, "save_file", crash_after_weights)
    with pytest.raises(OSError, match="disk full"):
        formats.save_sae(new, folder, META, sparsity_F=torch.zeros(32))
    with pytest.raises(OSError, match="disk full"):
        formats.save_sae(new, tmp_path / "fresh", META, sparsity_F=torch.zeros(32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temp folder, no half-written "fresh"
    assert torch.equal(formats.load_sae(folder).W_dec, old.W_dec)  # the old SAE is intact
    monkeypatch.undo()
    formats.save_sae(new, folder, META)  # a successful overwrite replaces it
    assert torch.equal(formats.load_sae(folder).W_dec, new.W_dec)
    # what a process killed mid-save leaves behind (weights, no cfg.json, temp name) is refused
    partial = tmp_path / ".gone.tmp-999"
    partial.mkdir()
    save_file(load_file(str(folder / "sae_weights.safetensors")), str(partial / "sae_weights.safetensors"))
    with pytest.raises(FileNotFoundError, match="cfg.json is missing.*partial"):
        formats.load_sae(partial)
    with pytest.raises(FileNotFoundError, match=r"gone does not exist; leftovers.*\.gone\.tmp-999"):
        formats.load_sae(tmp_path / "gone")


def test_save_refuses_to_replace_a_folder_that_is_not_an_sae(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an SAE folder"):
        formats.save_sae(random_sae("relu"), tmp_path / "runs", META)
    assert (tmp_path / "runs" / "notes.txt").read_text() == "keep me"


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(ValueError, match=r"metadata\['when'\]"):
        formats.save_sae(random_sae("relu"), tmp_path / "x", {"when": object()})


def test_every_registered_config_carries_its_own_name():
    # SAEConfig alone has no architecture; each registered config class sets its own by default.
    assert SAEConfig().architecture == ""
    for name in names():
        assert config_class(name)().architecture == name
