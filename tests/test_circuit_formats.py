"""circuit-tracer's per-layer and CLT layouts: round trips bit for bit, and the same graph from either folder."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_circuits import random_transcoders

from saeforge.circuits.clt import CLTConfig, CrossLayerTranscoder, save_clt
from saeforge.circuits.formats import (
    export_circuit_tracer,
    export_clt_circuit_tracer,
    read_circuit_tracer,
    read_clt_circuit_tracer,
)
from saeforge.circuits.transcoders import HOOK_IN, HOOK_OUT, MANIFEST, TranscoderSetError, load_transcoders
from saeforge.cli import main
from saeforge.saes.formats import save_sae
from saeforge.saes.registry import config_class, sae_class


def write_set(folder, saes, model_name):
    """A `saeforge transcoders`-style folder: SAELens-format transcoders + transcoders.json."""
    layers = {}
    for layer, sae in saes.items():
        rel = f"layer{layer}/sae"
        meta = {"model_name": model_name, "hook_name": HOOK_IN.format(layer=layer)}
        save_sae(sae, folder / rel, {**meta, "hook_name_out": HOOK_OUT.format(layer=layer)})
        layers[str(layer)] = rel
    manifest = {"format_version": 1, "model_name": model_name, "hook_in": HOOK_IN, "hook_out": HOOK_OUT}
    (folder / MANIFEST).write_text(json.dumps({**manifest, "layers": layers}))
    return folder


def jumprelu_transcoders(n_layers=2, d=64, d_sae=32):
    out = {}
    for layer in range(n_layers):
        cfg = config_class("jumprelu")(d_in=d, d_sae=d_sae, d_out=d, apply_b_dec_to_input=False, skip=True)
        sae = sae_class("jumprelu")(cfg)
        sae.init_weights(torch.Generator().manual_seed(layer))
        with torch.no_grad():
            sae.threshold.copy_(torch.rand(d_sae, generator=torch.Generator().manual_seed(9)))
            sae.W_skip.copy_(torch.randn(d, d, generator=torch.Generator().manual_seed(7)))
            sae.b_dec.copy_(torch.randn(d))
        out[layer] = sae
    return out


@pytest.mark.parametrize("kind", ["topk", "jumprelu-skip"])
def test_ours_to_circuit_tracer_to_ours_is_bit_for_bit(tmp_path, kind):
    saes = random_transcoders(n_layers=3) if kind == "topk" else jumprelu_transcoders()
    tset = load_transcoders(write_set(tmp_path / "ours", saes, "tiny-model"))
    out = export_circuit_tracer(tset, tmp_path / "theirs")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set" and config["model_name"] == "tiny-model"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("mlp.hook_in", "mlp.hook_out")
    assert config["transcoders"] == [f"layer_{i}.safetensors" for i in range(len(saes))]
    # their orientation: W_enc [F, D] applied with F.linear; W_dec [F, D]
    raw = load_file(str(out / "layer_1.safetensors"))
    assert torch.equal(raw["W_enc"], saes[1].W_enc.T) and raw["W_enc"].shape == (saes[1].d_sae, 64)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    linear = torch.nn.functional.linear(x, raw["W_enc"], raw["b_enc"])  # another summation order: not bitwise
    torch.testing.assert_close(linear, x @ saes[1].W_enc + saes[1].b_enc, rtol=1e-5, atol=1e-6)
    if kind == "topk":
        assert config["activation"] == "topk" and config["k"] == 6 and set(raw) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    else:
        assert config["activation"] == "jumprelu" and torch.equal(
            raw["activation_function.threshold"], saes[1].threshold
        )
        assert torch.equal(raw["W_skip"], saes[1].W_skip)
    back = read_circuit_tracer(out)
    assert back.model_name == "tiny-model" and sorted(back.saes) == sorted(saes)
    for layer, sae in saes.items():
        got = back.saes[layer]
        assert type(got) is type(sae) and got.cfg.skip == sae.cfg.skip and got.is_transcoder
        sd_a, sd_b = sae.state_dict(), got.state_dict()
        assert sd_a.keys() == sd_b.keys()
        for key in sd_a:
            assert sd_a[key].dtype == sd_b[key].dtype and torch.equal(sd_a[key], sd_b[key]), key
        assert torch.equal(got(x), sae(x))
    with pytest.raises(TranscoderSetError, match="never overwritten"):
        export_circuit_tracer(tset, out)


def test_reads_a_relu_set_written_as_circuit_tracer_writes_it(tmp_path):
    """A hand-written folder in their layout (hf:// entries, no activation key: ReLU)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    W_enc_FD, W_dec_FD = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    b_enc, b_dec = torch.randn(16, generator=g), torch.randn(8, generator=g)
    save_file(
        {"W_enc": W_enc_FD, "W_dec": W_dec_FD, "b_enc": b_enc, "b_dec": b_dec}, str(tmp_path / "layer_0.safetensors")
    )
    config = {"model_name": "m", "model_kind": "transcoder_set", "scan": "s", "feature_input_hook": "ln2.hook_normalized",
              "feature_output_hook": "hook_mlp_out", "transcoders": ["hf://org/repo/layer_0.safetensors"]}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    sae = read_circuit_tracer(tmp_path).saes[0]
    x = torch.randn(3, 8, generator=g)
    assert sae.cfg.architecture == "relu"
    assert torch.allclose(sae.decode(sae.encode(x)), torch.relu(x @ W_enc_FD.T + b_enc) @ W_dec_FD + b_dec)
    config["feature_input_hook"] = "hook_resid_mid"  # before the norm: not what our replacement model feeds
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(TranscoderSetError, match="normalised input"):
        read_circuit_tracer(tmp_path)


def test_graph_from_the_exported_folder_equals_the_original(tiny_model_dirs, tmp_path, capsys):
    model = str(tiny_model_dirs["llama"])
    ours = write_set(tmp_path / "ours", random_transcoders(n_layers=3), model)
    assert main(["export-transcoders", str(ours), "--format", "circuit-tracer", "--out", str(tmp_path / "ct")]) == 0
    assert main(["export-transcoders", str(ours), "--out", str(tmp_path / "ct")]) == 2
    assert "never overwritten" in capsys.readouterr().err
    graphs = []
    for folder in (ours, tmp_path / "ct"):
        out = tmp_path / f"{folder.name}.json"
        assert main(["graph", "--transcoders", str(folder), "--prompt", "def add(a, b):", "--out", str(out)]) == 0
        d = json.loads(out.read_text())
        d["metadata"].pop("transcoder_list"), d["metadata"].pop("slug")
        graphs.append(d)
    assert graphs[0]["nodes"] and graphs[0] == graphs[1]


def their_clt_folder(folder, model_name, activation, L=3, D=64, F=12):
    """CLT files as circuit-tracer's CrossLayerTranscoder.to_safetensors writes them (hand-built here)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    folder.mkdir(parents=True)
    for i in range(L):
        enc = {f"W_enc_{i}": torch.randn(F, D, generator=g) / 8, f"b_enc_{i}": 0.05 * torch.randn(F, generator=g),
               f"b_dec_{i}": 0.002 * torch.randn(D, generator=g)}  # fmt: skip
        if activation == "jumprelu":
            enc[f"threshold_{i}"] = 0.05 * torch.rand(F, generator=g)
        save_file(enc, str(folder / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": 0.01 * torch.randn(F, L - i, D, generator=g)}, str(folder / f"W_dec_{i}.safetensors"))
    config = {"model_name": model_name, "model_kind": "cross_layer_transcoder", "scan": "s",
              "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out"}  # fmt: skip
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_circuit_tracer_clt_to_ours_to_theirs_is_bit_for_bit(tmp_path, activation):
    theirs = their_clt_folder(tmp_path / "theirs", "m", activation)
    clt, name = read_clt_circuit_tracer(theirs)
    assert name == "m" and clt.cfg.activation == activation and clt.W_enc.shape == (3, 64, 12)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    raw = load_file(str(theirs / "W_enc_1.safetensors"))
    pre = x @ raw["W_enc_1"].T + raw["b_enc_1"]
    want = torch.relu(pre) if activation == "relu" else pre * (pre > raw["threshold_1"])
    torch.testing.assert_close(clt.encode_layer(1, x), want, rtol=1e-5, atol=1e-6)  # a transposed operand
    back = export_clt_circuit_tracer(clt, name, tmp_path / "back")
    for i in range(3):
        for kind in ("W_enc", "W_dec"):
            a, b = load_file(str(theirs / f"{kind}_{i}.safetensors")), load_file(str(back / f"{kind}_{i}.safetensors"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert yaml.safe_load((back / "config.yaml").read_text())["model_kind"] == "cross_layer_transcoder"
    topk = CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=8, d_sae=4, k=2))
    with pytest.raises(TranscoderSetError, match="TopK"):
        export_clt_circuit_tracer(topk, "m", tmp_path / "topk")


def test_graph_from_a_circuit_tracer_clt_equals_the_graph_from_our_clt_folder(tiny_model_dirs, tmp_path):
    model = str(tiny_model_dirs["llama"])
    theirs = their_clt_folder(tmp_path / "theirs", model, "jumprelu")
    clt, _ = read_clt_circuit_tracer(theirs)
    ours = save_clt(clt, tmp_path / "ours", model)
    graphs = []
    for folder in (theirs, ours):
        out = tmp_path / f"{folder.name}.json"
        assert main(["graph", "--transcoders", str(folder), "--prompt", "def add(a, b):", "--out", str(out)]) == 0
        d = json.loads(out.read_text())
        d["metadata"].pop("transcoder_list"), d["metadata"].pop("slug")
        graphs.append(d)
    assert graphs[0]["metadata"]["counts"]["features"] > 0 and graphs[0] == graphs[1]
