"""The quality of a transcoder set as a whole (circuits/quality.py) against hand-rolled oracles on the tiny Llama.

Random (untrained) transcoders: the splice, the compounding of errors and the metrics do not depend on training.
Every oracle here runs its own forward with plain module hooks and its own CE / KL / EV arithmetic.
"""

from __future__ import annotations

import dataclasses
import json
from itertools import islice

import pytest
import torch
from test_circuits import random_transcoders
from test_circuits_clt import random_clt

from saeforge.circuits.clt import save_clt
from saeforge.circuits.formats import export_circuit_tracer
from saeforge.circuits.quality import transcoder_quality
from saeforge.circuits.transcoders import TranscoderSetError, load_transcoders
from saeforge.cli import main
from saeforge.config import DataConfig, EvalConfig
from saeforge.data import excluded_mask
from saeforge.evals.report import heldout_windows
from saeforge.evals.splice import spliced_ce_kl
from saeforge.models import load_model, resolve_hook
from saeforge.saes.formats import save_sae
from saeforge.saes.registry import config_class, sae_class


@pytest.fixture(scope="module")
def data_cfg(text_corpus):
    return DataConfig(corpus=str(text_corpus), context_size=32, holdout_fraction=0.3)


EVAL = EvalConfig(tokens=256, ce_tokens=128, batch_size=4)  # 8 windows for EV, 4 for CE / KL


def windows(lm, data_cfg, tokens):
    return torch.stack(list(islice(heldout_windows(lm, data_cfg), tokens // data_cfg.context_size)))


def oracle_ce_kl(lm, data_cfg, predict):
    """(CE, KL to clean) with every MLP output at kept positions replaced by ``predict(m, xs)`` (xs: this forward's
    MLP inputs so far; None keeps layer m), and the clean CE, by plain forward hooks and torch's own cross-entropy."""
    tokens_ST = windows(lm, data_cfg, EVAL.ce_tokens)
    excl_ST = excluded_mask(tokens_ST, lm.tokenizer, data_cfg)
    keep_ST1 = ~excl_ST[..., None]
    layers = lm.model.model.layers
    xs = {}

    def hook(m):
        def fn(module, args, out):
            xs[m] = args[0]
            new = predict(m, xs)  # None: this layer stays clean
            return out if new is None else torch.where(keep_ST1, new, out)

        return fn

    with torch.no_grad():
        clean_STV = lm.model(input_ids=tokens_ST).logits
        handles = [layer.mlp.register_forward_hook(hook(m)) for m, layer in enumerate(layers)]
        try:
            new_STV = lm.model(input_ids=tokens_ST).logits
        finally:
            for h in handles:
                h.remove()
    scored_ST = ~excl_ST[:, :-1] & ~excl_ST[:, 1:]
    y_N = tokens_ST[:, 1:][scored_ST]
    lp_clean_NV = clean_STV[:, :-1][scored_ST].double().log_softmax(-1)
    lp_new_NV = new_STV[:, :-1][scored_ST].double().log_softmax(-1)
    ce_new = torch.nn.functional.nll_loss(lp_new_NV, y_N).item()
    ce_clean = torch.nn.functional.nll_loss(lp_clean_NV, y_N).item()
    kl = (lp_clean_NV.exp() * (lp_clean_NV - lp_new_NV)).sum(-1).mean().item()
    return ce_new, kl, ce_clean


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "skip"])
def plt_case(request, lm, data_cfg):
    saes = random_transcoders(skip=request.param)
    return saes, transcoder_quality(lm, saes, data_cfg, EVAL, with_errors=True)


def test_errors_added_back_give_the_clean_model(plt_case):
    _, r = plt_case
    assert r["with_errors"]["kl"] < 1e-6  # float32 rounding of the sums e + y_hat
    assert r["with_errors"]["ce"] == pytest.approx(r["ce_clean"], abs=1e-5)
    assert r["full"]["kl"] > 1e-3  # without them the random transcoders do change the model


def test_full_replacement_equals_a_hand_rolled_loop(lm, data_cfg, plt_case):
    saes, r = plt_case

    def flat(sae, x_STD):
        return sae(x_STD.reshape(-1, x_STD.shape[-1])).reshape(x_STD.shape)

    ce, kl, ce_clean = oracle_ce_kl(lm, data_cfg, lambda m, xs: flat(saes[m], xs[m]))
    assert r["full"]["ce"] == pytest.approx(ce, abs=1e-5) and r["full"]["kl"] == pytest.approx(kl, abs=1e-5)
    assert r["ce_clean"] == pytest.approx(ce_clean, abs=1e-5)
    ce_zero, kl_zero, _ = oracle_ce_kl(lm, data_cfg, lambda m, xs: torch.zeros_like(xs[m]))
    assert r["full"]["ce_zero"] == pytest.approx(ce_zero, abs=1e-5)
    assert r["full"]["ce_score"] == pytest.approx((ce_zero - ce) / (ce_zero - ce_clean), abs=1e-4)
    assert r["full"]["kl_score"] == pytest.approx((kl_zero - kl) / kl_zero, rel=1e-4)  # random: far below 0
    # mean ablation of every MLP: the means over the per-layer pass's kept tokens, taken by hand
    ins, outs = mlp_io(lm, data_cfg)
    means = {m: y.mean(0) for m, y in outs.items()}
    ce_mean, kl_mean, _ = oracle_ce_kl(lm, data_cfg, lambda m, xs: means[m].expand_as(xs[m]))
    assert r["full"]["ce_mean"] == pytest.approx(ce_mean, abs=1e-5) and r["full"]["kl_mean"] == pytest.approx(
        kl_mean, abs=1e-5
    )
    assert r["full"]["ce_score_mean"] == pytest.approx((ce_mean - ce) / (ce_mean - ce_clean), rel=1e-4)
    # one layer alone: layer 1 replaced, the others clean
    ce1, kl1, _ = oracle_ce_kl(lm, data_cfg, lambda m, xs: flat(saes[m], xs[m]) if m == 1 else None)
    assert r["alone"][1]["ce"] == pytest.approx(ce1, abs=1e-5) and r["alone"][1]["kl"] == pytest.approx(kl1, abs=1e-5)
    # ... and what `saeforge eval` gives that layer's transcoder alone (evals.splice on the same windows)
    tokens_ST = windows(lm, data_cfg, EVAL.ce_tokens)
    pairs = [(tokens_ST, excluded_mask(tokens_ST, lm.tokenizer, data_cfg))]
    hook_in, hook_out = resolve_hook(lm.model, "blocks.1.hook_mlp_in"), resolve_hook(lm.model, "blocks.1.hook_mlp_out")
    ev = spliced_ce_kl(lm.model, hook_out, saes[1], pairs, hook_in=hook_in)
    for ours, theirs in (("ce", "ce_sae"), ("kl", "kl_sae"), ("ce_zero", "ce_zero"), ("ce_score", "ce_score")):
        assert r["alone"][1][ours] == pytest.approx(ev[theirs], abs=1e-5)


def mlp_io(lm, data_cfg):
    """Every layer's MLP input and output at the kept positions of the per-layer pass's windows, by plain hooks."""
    tokens_ST = windows(lm, data_cfg, EVAL.tokens)
    keep_ST = ~excluded_mask(tokens_ST, lm.tokenizer, data_cfg)
    ins, outs = {}, {}

    def rec(m):
        def fn(module, args, out):
            ins[m], outs[m] = args[0][keep_ST], out[keep_ST]

        return fn

    handles = [layer.mlp.register_forward_hook(rec(m)) for m, layer in enumerate(lm.model.model.layers)]
    with torch.no_grad():
        lm.model(input_ids=tokens_ST)
    for h in handles:
        h.remove()
    return ins, outs


def test_per_layer_ev_by_hand(lm, data_cfg, plt_case):
    saes, r = plt_case
    ins, outs = mlp_io(lm, data_cfg)
    keep_ST = ~excluded_mask(windows(lm, data_cfg, EVAL.tokens), lm.tokenizer, data_cfg)
    for m, row in enumerate(r["layers"]):
        with torch.no_grad():
            y_hat, f = saes[m](ins[m]).double(), saes[m].encode(ins[m])
        y = outs[m].double()
        ev = 1 - (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
        assert row["explained_variance"] == pytest.approx(ev.item(), abs=1e-6)
        assert row["fvu"] == pytest.approx(1 - ev.item(), abs=1e-6)
        assert row["l0"] == pytest.approx((f != 0).sum(-1).double().mean().item())
        assert row["n_tokens"] == int(keep_ST.sum())


def test_clt_equals_a_hand_rolled_loop_with_compounding_errors(lm, data_cfg):
    clt = random_clt(scale=0.05)
    r = transcoder_quality(lm, clt, data_cfg, EVAL, layers_alone=False, with_errors=True)

    def predict(m, xs):  # layer m sums the decoders of every l <= m, fed this forward's own layer-l inputs
        y = clt.b_dec[m].expand(*xs[m].shape[:-1], -1)
        return y + sum(clt.encode_layer(src, xs[src]) @ clt.decoder(src, m) for src in range(m + 1))

    ce, kl, _ = oracle_ce_kl(lm, data_cfg, predict)
    assert r["kind"] == "clt" and "alone" not in r
    assert r["full"]["ce"] == pytest.approx(ce, abs=1e-5) and r["full"]["kl"] == pytest.approx(kl, abs=1e-5)
    assert r["with_errors"]["kl"] < 1e-6  # float32 rounding of the sums e + y_hat


def test_clt_without_cross_layer_decoders_equals_its_diagonal_plts(lm, data_cfg):
    clt = random_clt(scale=0.05)
    saes = {}
    with torch.no_grad():
        for layer, w in enumerate(clt.W_dec):
            w[:, 1:] = 0
            cfg = config_class("topk")(d_in=64, d_sae=64, k=clt.cfg.k, d_out=64, apply_b_dec_to_input=False)
            sae = sae_class("topk")(cfg)
            sae.W_enc.copy_(clt.W_enc[layer])
            sae.b_enc.copy_(clt.b_enc[layer])
            sae.W_dec.copy_(w[:, 0])
            sae.b_dec.copy_(clt.b_dec[layer])
            saes[layer] = sae.requires_grad_(False)
    small = dataclasses.replace(EVAL, ce_tokens=64, mean_ablation=False)  # 2 windows: this test runs twice
    a = transcoder_quality(lm, clt, data_cfg, small)
    b = transcoder_quality(lm, saes, data_cfg, small)
    for ra, rb in zip(a["layers"], b["layers"], strict=True):
        assert ra["l0"] == rb["l0"] and ra["explained_variance"] == pytest.approx(rb["explained_variance"], abs=1e-6)
    for key in ("ce", "kl", "ce_zero", "ce_score"):
        assert a["full"][key] == pytest.approx(b["full"][key], abs=1e-5)
        assert [x[key] for x in a["alone"]] == pytest.approx([x[key] for x in b["alone"]], abs=1e-5)


def test_refuses_a_missing_layer_and_another_models_transcoders(lm, data_cfg):
    saes = random_transcoders()
    del saes[2]
    with pytest.raises(TranscoderSetError, match=r"layers \[2\] have none"):
        transcoder_quality(lm, saes, data_cfg, EVAL)
    with pytest.raises(TranscoderSetError, match="another model"):
        transcoder_quality(lm, random_transcoders(d=32), data_cfg, EVAL)
    with pytest.raises(TranscoderSetError, match="another model"):
        transcoder_quality(lm, random_clt(n_layers=2), data_cfg, EVAL)


def test_command_writes_replacement_json_once(tiny_model_dirs, data_cfg, tmp_path, capsys):
    folder = save_clt(random_clt(scale=0.05), tmp_path / "clt", str(tiny_model_dirs["llama"]),
                      {"corpus": data_cfg.corpus, "context_size": 32, "holdout_fraction": 0.3})  # fmt: skip
    args = ["transcoder-eval", "--transcoders", str(folder), "--eval.tokens", "128", "--eval.ce_tokens", "64",
            "--device", "cpu", "--no-layers-alone"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    r = json.loads((folder / "replacement.json").read_text())
    assert r["kind"] == "clt" and len(r["layers"]) == 3 and r["context_size"] == 32 and r["n_sequences"] == 2
    assert "full replacement" in printed and f"{r['full']['ce_score']:.4f}" in printed
    assert main(args) == 2  # a first result is never replaced silently
    assert "--force" in capsys.readouterr().err
    assert main([*args, "--force", "--eval.ce_tokens", "128"]) == 0
    assert json.loads((folder / "replacement.json").read_text())["n_sequences"] == 4
    assert main(["transcoder-eval", "--transcoders", str(tmp_path), "--device", "cpu"]) == 2
    assert "no transcoders.json" in capsys.readouterr().err


def test_a_gpt2_set_with_its_errors_added_back_is_the_clean_model(tiny_model_dirs, data_cfg):
    # no frozen attention or norms here, so any family with MLP hook points works (GPT-2: LayerNorm, biases)
    gpt2 = load_model(str(tiny_model_dirs["gpt2"]), dtype="float32", device="cpu")
    r = transcoder_quality(gpt2, random_transcoders(), data_cfg, EVAL, layers_alone=False, with_errors=True)
    assert r["with_errors"]["kl"] < 1e-6 and r["with_errors"]["ce"] == pytest.approx(r["ce_clean"], abs=1e-5)
    assert r["full"]["kl"] > 1e-3


def test_command_on_a_per_layer_folder_uses_its_runs_split(tiny_model_dirs, data_cfg, tmp_path, capsys):
    model = str(tiny_model_dirs["llama"])
    folder, layers = tmp_path / "plt", {}
    data = {"corpus": data_cfg.corpus, "context_size": 32, "holdout_fraction": 0.3}
    for layer, sae in random_transcoders().items():
        hooks = {"hook_name": f"blocks.{layer}.hook_mlp_in", "hook_name_out": f"blocks.{layer}.hook_mlp_out"}
        save_sae(sae, folder / f"l{layer}" / "sae", {"model_name": model, **hooks, "saeforge_config": {"data": data}})
        layers[str(layer)] = f"l{layer}/sae"
    manifest = {"format_version": 1, "model_name": model, "hook_in": "blocks.{layer}.hook_mlp_in",
                "hook_out": "blocks.{layer}.hook_mlp_out", "layers": layers}  # fmt: skip
    (folder / "transcoders.json").write_text(json.dumps(manifest))
    out = tmp_path / "q.json"
    args = ["transcoder-eval", "--transcoders", str(folder), "--eval.tokens", "64", "--eval.ce_tokens", "64",
            "--eval.batch_size", "2", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert r["kind"] == "plt" and r["context_size"] == 32 and r["n_sequences"] == 2 and len(r["alone"]) == 3
    assert not (folder / "replacement.json").exists()
    # the same set in circuit-tracer's layout (bit for bit) gives the same numbers; it records no corpus
    export_circuit_tracer(load_transcoders(folder), tmp_path / "ct")
    ct_args = [*args[:2], str(tmp_path / "ct"), *args[3:-1], str(tmp_path / "ct.json")]
    assert main([*ct_args, "--data.corpus", data_cfg.corpus, "--data.context_size", "32",
                 "--data.holdout_fraction", "0.3", "--no-layers-alone"]) == 0  # fmt: skip
    ct = json.loads((tmp_path / "ct.json").read_text())
    assert ct["full"] == r["full"] and ct["layers"] == r["layers"]
    del manifest["layers"]["1"]
    (folder / "transcoders.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main([*args[:-1], str(tmp_path / "q2.json")]) == 2
    assert "layers [1] have none" in capsys.readouterr().err
