"""Cross-layer transcoders: the forward against a plain loop, training, the folder, and graphs through a CLT."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from test_circuits import check_decomposition, perturbed_target

from saeforge.activations.stream import ActivationStream
from saeforge.circuits.clt import CLTConfig, CrossLayerTranscoder, load_clt, save_clt, train_clt
from saeforge.circuits.graph import attribute
from saeforge.circuits.replacement import ReplacementModel
from saeforge.circuits.transcoders import TranscoderSetError
from saeforge.cli import main
from saeforge.config import ActivationsConfig, ConfigError, DataConfig
from saeforge.models import resolve_hook


def random_clt(n_layers=3, d=64, d_sae=64, k=5, scale=1.0):
    clt = CrossLayerTranscoder(CLTConfig(n_layers=n_layers, d_model=d, d_sae=d_sae, k=k, seed=3))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # nonzero biases; outputs at the tiny model's MLP scale (see test_circuits.py)
        clt.b_enc.copy_(0.05 * torch.randn(n_layers, d_sae, generator=g))
        clt.b_dec.copy_(0.002 * torch.randn(n_layers, d, generator=g))
        for w in clt.W_dec:
            w.mul_(scale)
    clt.requires_grad_(False)
    return clt


def test_forward_equals_a_plain_loop_over_layer_pairs():
    clt = random_clt(n_layers=4, d=8, d_sae=12, k=3)
    x_BLD = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(0))
    y = clt(x_BLD)
    for m in range(4):
        want = clt.b_dec[m].expand(5, 8).clone()
        for source in range(m + 1):
            pre = x_BLD[:, source] @ clt.W_enc[source] + clt.b_enc[source]
            kth = pre.topk(3, dim=-1).values[:, -1:]
            f = torch.where(pre >= kth, pre.clamp(min=0), torch.zeros_like(pre))
            assert ((f > 0).sum(-1) <= 3).all()
            want += f @ clt.W_dec[source][:, m - source]
        torch.testing.assert_close(y[:, m], want)
    assert [tuple(w.shape) for w in clt.W_dec] == [(12, 4 - s, 8) for s in range(4)]  # L(L+1)/2 blocks


def test_graph_through_a_clt_is_exact_and_has_cross_layer_edges(lm):
    rm = ReplacementModel(lm, random_clt(scale=0.05))
    ids_T = torch.tensor([0, 5, 40, 77, 123, 9, 200, 31])
    state = rm.prepare(ids_T)
    with torch.no_grad():
        real_TV = lm.model(ids_T[None]).logits[0]
    logits_BTV, _ = rm.forward_linear(state, *rm.clean_inputs(state))
    torch.testing.assert_close(logits_BTV[0], real_TV, atol=1e-5, rtol=0)
    graph = attribute(rm, ids_T, batch_size=32)
    check_decomposition(rm, ids_T, graph)
    # a layer-0 feature reaches a layer-2 feature at a later position through W_dec^{0->2} and attention:
    # the edge is what removing the source changes, in the frozen model
    A, N = graph.adjacency_nn, graph.n_features
    t = int((graph.layer_N == 2).nonzero()[-1])
    sources = [s for s in A[t, :N].nonzero().flatten().tolist() if graph.layer_N[s] == 0]
    assert sources
    base = perturbed_target(rm, state, graph, t, sources[0], 1.0)
    for s in sources[:5]:
        delta = base - perturbed_target(rm, state, graph, t, s, 0.0)
        assert abs(float(delta) - float(A[t, s])) <= 1e-4 * max(1.0, abs(float(A[t, s])))


@pytest.mark.slow
def test_train_clt_predicts_every_layer_and_round_trips(lm, text_corpus, tmp_path):
    data = DataConfig(corpus=str(text_corpus), context_size=32, holdout_fraction=0.2)
    act = ActivationsConfig(batch_size=256, lm_batch_size=8, shuffle_sequences=16)
    cfg = CLTConfig(n_layers=3, d_model=64, d_sae=128, k=8, lr=3e-3)
    clt = train_clt(lm, cfg, data, act, n_tokens=8192)
    points = [resolve_hook(lm.model, f"blocks.{m}.hook_mlp_{io}") for io in ("in", "out") for m in range(3)]
    (row,) = itertools.islice(ActivationStream(lm, points, data, act, part="heldout"), 1)
    x_BLD, y_BLD = row[:, :192].view(-1, 3, 64), row[:, 192:].view(-1, 3, 64)
    fvu_L = (y_BLD - clt(x_BLD)).pow(2).sum((0, 2)) / (y_BLD - y_BLD.mean(0)).pow(2).sum((0, 2))
    assert (fvu_L < 0.7).all(), fvu_L  # raw activations in, raw out: the training scales are folded in
    folder = save_clt(clt, tmp_path / "clt", model_name="tiny")
    again, model_name = load_clt(folder)
    assert model_name == "tiny" and torch.equal(again(x_BLD), clt(x_BLD))
    with pytest.raises(ConfigError, match="never overwritten"):
        save_clt(clt, folder, model_name="tiny")
    with pytest.raises(TranscoderSetError, match="another model"):
        ReplacementModel(lm, random_clt(n_layers=2))


@pytest.mark.slow
def test_clt_command_then_graph(tiny_model_dirs, text_corpus, tmp_path, capsys):
    model = str(tiny_model_dirs["llama"])
    args = ["clt", "--model", model, "--corpus", text_corpus, "--out", tmp_path / "clt", "--tokens", 2048,
            "--clt.d_sae", 64, "--clt.k", 4, "--data.context_size", 32, "--activations.batch_size", 256,
            "--activations.shuffle_sequences", 16, "--quiet"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    clt, name = load_clt(tmp_path / "clt")
    assert name == model and (clt.cfg.n_layers, clt.cfg.d_model, clt.cfg.d_sae, clt.cfg.k) == (3, 64, 64, 4)
    assert main([str(a) for a in args]) == 2  # never overwritten
    assert "never overwritten" in capsys.readouterr().err
    out = tmp_path / "g.json"
    assert main(["graph", "--transcoders", str(tmp_path / "clt"), "--prompt", "def add(a, b):", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["metadata"]["transcoder_list"] == [str(tmp_path / "clt")] and d["links"]
