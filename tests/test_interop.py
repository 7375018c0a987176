"""Other libraries' SAE folders, built here from their documented layouts, load with identical outputs.

Each reference forward below is the library's own formula, written out directly on its tensors.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

from saeforge.saes import formats
from saeforge.saes.gated import GatedSAE
from saeforge.saes.interop import load_dictionary_learning, load_foreign, load_saelens_legacy, load_sparsify
from saeforge.saes.jumprelu import JumpReLUSAE
from saeforge.saes.relu import ReLUSAE
from saeforge.saes.topk import TopKSAE

D, F_, K = 6, 20, 3
g = torch.Generator().manual_seed(0)


def rnd(*shape):
    return torch.randn(*shape, generator=g)


X = torch.randn(32, D, generator=torch.Generator().manual_seed(1))


def topk_ref(pre_BF, k):
    vals, idx = torch.relu(pre_BF).topk(k, dim=-1)
    return torch.zeros_like(pre_BF).scatter(-1, idx, vals)


def check(sae, f_ref, x_hat_ref):
    with torch.no_grad():
        assert_close(sae.encode(X), f_ref, rtol=1e-5, atol=1e-5)
        assert_close(sae(X), x_hat_ref, rtol=1e-5, atol=1e-5)
    assert (f_ref > 0).any()


def test_sparsify_topk_folder(tmp_path):
    t = {"encoder.weight": rnd(F_, D), "encoder.bias": rnd(F_), "W_dec": rnd(F_, D), "b_dec": rnd(D)}
    save_file(t, str(tmp_path / "sae.safetensors"))
    cfg = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": F_,
        "k": K,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D,
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    f_ref = topk_ref((X - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"], K)  # b_dec always subtracted
    sae = load_foreign(tmp_path)
    assert isinstance(sae, TopKSAE) and sae.cfg.k == K
    check(sae, f_ref, f_ref @ t["W_dec"] + t["b_dec"])
    # a skip connection on a plain SAE has no saeforge form (transcoders: tests/test_transcoders.py)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "skip_connection": True}))
    with pytest.raises(ValueError, match="only TopK SAEs and TopK"):
        load_sparsify(tmp_path)


def write_dl(folder, sd, dict_class, **trainer):
    folder.mkdir()
    torch.save(sd, folder / "ae.pt")
    (folder / "config.json").write_text(
        json.dumps({"trainer": {"dict_class": dict_class, "activation_dim": D, "dict_size": F_, **trainer}})
    )
    return folder


def test_dictionary_learning_standard_topk_and_batchtopk(tmp_path):
    enc, enc_b, dec = rnd(F_, D), rnd(F_), rnd(D, F_)
    bias = rnd(D)
    folder = write_dl(
        tmp_path / "std",
        {"encoder.weight": enc, "encoder.bias": enc_b, "decoder.weight": dec, "bias": bias},
        "AutoEncoder",
    )
    f_ref = torch.relu((X - bias) @ enc.T + enc_b)
    sae = load_foreign(folder)
    assert isinstance(sae, ReLUSAE)
    check(sae, f_ref, f_ref @ dec.T + bias)

    sd = {
        "encoder.weight": enc,
        "encoder.bias": enc_b,
        "decoder.weight": dec,
        "b_dec": bias,
        "k": torch.tensor(K),
        "threshold": torch.tensor(-1.0),
    }
    sae = load_foreign(write_dl(tmp_path / "topk", sd, "AutoEncoderTopK", k=K))
    f_ref = topk_ref((X - bias) @ enc.T + enc_b, K)
    assert isinstance(sae, TopKSAE) and sae.cfg.k == K
    check(sae, f_ref, f_ref @ dec.T + bias)

    sd["threshold"] = torch.tensor(0.7)  # BatchTopK at inference: ReLU(encoder(x - b_dec)) kept above theta
    sae = load_foreign(write_dl(tmp_path / "btk", sd, "BatchTopKSAE", k=K))
    post = torch.relu((X - bias) @ enc.T + enc_b)
    f_ref = post * (post > 0.7)
    assert isinstance(sae, JumpReLUSAE)
    check(sae, f_ref, f_ref @ dec.T + bias)
    sd["threshold"] = torch.tensor(-1.0)
    with pytest.raises(ValueError, match="never estimated"):
        load_dictionary_learning(write_dl(tmp_path / "btk0", sd, "BatchTopKSAE", k=K))


def test_dictionary_learning_jumprelu_and_gated(tmp_path):
    W_enc, b_enc, W_dec, b_dec, thr = rnd(D, F_), rnd(F_), rnd(F_, D), rnd(D), rnd(F_).abs()
    sd = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": thr}
    sae = load_foreign(write_dl(tmp_path / "jr", sd, "JumpReluAutoEncoder"))
    pre = X @ W_enc + b_enc  # its encoder reads x itself (no b_dec subtraction) by default
    f_ref = torch.relu(pre * (pre > thr))
    check(sae, f_ref, f_ref @ W_dec + b_dec)
    sae = load_foreign(write_dl(tmp_path / "jr2", sd, "JumpReluAutoEncoder", apply_b_dec_to_input=True))
    pre = (X - b_dec) @ W_enc + b_enc
    check(sae, torch.relu(pre * (pre > thr)), torch.relu(pre * (pre > thr)) @ W_dec + b_dec)

    enc, gate_b, mag_b, r_mag, dec, dec_b = rnd(F_, D), rnd(F_), rnd(F_), rnd(F_) * 0.3, rnd(D, F_), rnd(D)
    sd = {
        "encoder.weight": enc,
        "gate_bias": gate_b,
        "mag_bias": mag_b,
        "r_mag": r_mag,
        "decoder.weight": dec,
        "decoder_bias": dec_b,
    }
    sae = load_foreign(write_dl(tmp_path / "gated", sd, "GatedAutoEncoder"))
    x_enc = (X - dec_b) @ enc.T
    f_ref = (x_enc + gate_b > 0) * torch.relu(torch.exp(r_mag) * x_enc + mag_b)
    assert isinstance(sae, GatedSAE)
    check(sae, f_ref, f_ref @ dec.T + dec_b)
    with pytest.raises(ValueError, match="dict_class 'CrossCoder' is not one saeforge reads"):
        load_dictionary_learning(write_dl(tmp_path / "cc", sd, "CrossCoder"))


def test_saelens_legacy_flat_cfg_topk_and_errors(tmp_path):
    W_enc, b_enc, W_dec, b_dec = rnd(D, F_), rnd(F_), rnd(F_, D), rnd(D)
    tmp_path.joinpath("old").mkdir()
    folder = tmp_path / "old"
    save_file(
        {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "scaling_factor": torch.ones(F_)},
        str(folder / "sae_weights.safetensors"),
    )
    cfg = {
        "architecture": "standard",
        "d_in": D,
        "d_sae": F_,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K},
        "apply_b_dec_to_input": True,
        "hook_name": "blocks.0.hook_resid_pre",
        "model_name": "gpt2",
        "normalize_activations": "none",
        "dtype": "float32",
        "device": "cpu",
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    sae = load_foreign(folder)
    f_ref = topk_ref((X - b_dec) @ W_enc + b_enc, K)
    assert isinstance(sae, TopKSAE)
    check(sae, f_ref, f_ref @ W_dec + b_dec)
    save_file(
        {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "scaling_factor": torch.full((F_,), 2.0)},
        str(folder / "sae_weights.safetensors"),
    )
    with pytest.raises(ValueError, match="scaling_factor is not all ones"):
        load_saelens_legacy(folder)
    save_file(
        {"W_enc": W_enc[:, :5].contiguous(), "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec},
        str(folder / "sae_weights.safetensors"),
    )
    with pytest.raises(ValueError, match=r"W_enc has shape \[6, 5\], expected \[6, 20\]"):
        load_saelens_legacy(folder)
    # a v6 folder (has metadata) goes through formats.load_sae
    v6 = formats.save_sae(sae, tmp_path / "v6", {})
    assert isinstance(load_foreign(v6), TopKSAE)
    with pytest.raises(FileNotFoundError, match="no ae.pt"):
        load_foreign(tmp_path)


def test_saelens_topk_with_decoder_norm_rescaling(tmp_path):
    """SAELens's default TopK training config saves rescale_acts_by_decoder_norm=true; we fold it exactly."""
    t = {"W_enc": rnd(D, F_), "b_enc": rnd(F_), "W_dec": rnd(F_, D) * 3, "b_dec": rnd(D)}  # rows far from unit norm
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    cfg = {
        "architecture": "topk",
        "d_in": D,
        "d_sae": F_,
        "k": K,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": True,
        "metadata": {"sae_lens_version": "6.54.12", "hook_name": "h"},
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    n_F = t["W_dec"].norm(dim=-1)
    # SAELens: scale pre-activations by the decoder norms, keep the top k, divide them out again to decode
    f_ref = topk_ref(((X - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * n_F, K)
    x_hat_ref = (f_ref / n_F) @ t["W_dec"] + t["b_dec"]
    sae = load_foreign(tmp_path)
    assert isinstance(sae, TopKSAE)
    check(sae, f_ref, x_hat_ref)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "standard"}))
    with pytest.raises(ValueError, match="only understood for topk"):
        load_foreign(tmp_path)
