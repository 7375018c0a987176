"""Circuits: the local replacement model, attribution-graph edges, pruning and scores, per-layer transcoders.

Edge and replacement tests use random (untrained) transcoders on the tiny Llama: the linear algebra
being checked does not depend on training, and random encoders give many active features.
"""

from __future__ import annotations

import json

import pytest
import torch

from saeforge.analysis.common import prompt_ids
from saeforge.circuits.graph import attribute
from saeforge.circuits.prune import cutoff, influence, influence_solve, normalize, prune, scores
from saeforge.circuits.replacement import ReplacementError, ReplacementModel
from saeforge.circuits.transcoders import TranscoderSetError, layer_points, parse_layers
from saeforge.cli import main
from saeforge.models import load_model
from saeforge.saes.registry import config_class, sae_class

PROMPT = "def add(a, b): return a"


def random_transcoders(n_layers=3, d=64, d_sae=96, k=6, skip=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(n_layers):
        cfg = config_class("topk")(d_in=d, d_sae=d_sae, k=k, d_out=d, apply_b_dec_to_input=False, skip=skip)
        sae = sae_class("topk")(cfg)
        sae.init_weights(g)
        # outputs at the scale of the tiny model's MLP outputs (~0.01): an error node much larger than
        # the residual stream would test float cancellation, not the replacement model.
        # Nonzero biases, so the bias bookkeeping is tested, not trivially zero.
        with torch.no_grad():
            sae.W_dec.mul_(0.05)
            sae.b_dec.copy_(0.002 * torch.randn(d, generator=g))
            sae.b_enc.copy_(0.05 * torch.randn(d_sae, generator=g))
            if skip:
                sae.W_skip.copy_(0.001 * torch.randn(d, d, generator=g))
        sae.requires_grad_(False)
        out[layer] = sae
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "skip"])
def rm(request, lm):
    return ReplacementModel(lm, random_transcoders(skip=request.param))


@pytest.fixture(scope="module")
def ids_T(lm):
    return prompt_ids(lm.tokenizer, PROMPT)[0]


@pytest.fixture(scope="module")
def graph(rm, ids_T):
    return attribute(rm, ids_T, batch_size=16)


def test_replacement_with_errors_gives_the_real_logits(lm, rm, ids_T):
    state = rm.prepare(ids_T)
    with torch.no_grad():
        real_TV = lm.model(ids_T[None]).logits[0]
    assert torch.equal(state.logits_TV, real_TV)  # the recording hooks change nothing
    e, a, err = rm.clean_inputs(state)
    logits_BTV, _ = rm.forward_linear(state, e, a, err)
    torch.testing.assert_close(logits_BTV[0], real_TV, atol=1e-5, rtol=0)
    # without the error nodes the replacement model is a different model: the errors are not ~0
    logits0, _ = rm.forward_linear(state, e, a, torch.zeros_like(err))
    assert (logits0[0] - real_TV).abs().max() > 1e-2
    assert state.act_N.shape[0] > 20 and (state.act_N > 0).all()


def test_frozen_model_is_affine_in_its_nodes(rm, ids_T):
    """Scaling all node values by c moves every logit on the line between the zero-input logits and the clean ones."""
    state = rm.prepare(ids_T)
    e, a, err = rm.clean_inputs(state)
    with torch.no_grad():
        l1, _ = rm.forward_linear(state, e, a, err)
        l0, _ = rm.forward_linear(state, 0 * e, 0 * a, 0 * err)
        l3, _ = rm.forward_linear(state, 3 * e, 3 * a, 3 * err)
    torch.testing.assert_close(l3 - l0, 3 * (l1 - l0), atol=2e-4, rtol=1e-4)


def perturbed_target(rm, state, graph, target, source, scale):
    """The target's input in the frozen model with the source node's value multiplied by ``scale``."""
    e, a, err = rm.clean_inputs(state)
    N, L, T = graph.n_features, graph.n_layers, graph.n_pos
    with torch.no_grad():
        if source < N:
            a[0, source] *= scale
        elif source < N + L * T:
            layer, pos = divmod(source - N, T)
            err[0, layer, pos] *= scale
        else:
            e[0, source - N - L * T] *= scale
        logits, mlp_in = rm.forward_linear(state, e, a, err)
        if target < N:
            return rm.feature_pre_acts(state, mlp_in, [(0, target)])[0]
        last = logits[0, -1]
        return last[graph.logit_tokens_K[target - (N + L * T + T)]] - last.mean()


def test_edges_equal_finite_differences_in_the_frozen_model(rm, ids_T, graph):
    state = rm.prepare(ids_T)
    A = graph.adjacency_nn
    N = graph.n_features
    gen = torch.Generator().manual_seed(1)
    checked = 0
    targets = [N - 1, N // 2, A.shape[0] - 1]  # a late feature, a middle one, a logit
    for t in targets:
        nz = A[t].nonzero().flatten()
        picks = nz[torch.randperm(nz.numel(), generator=gen)[:4]].tolist()
        picks.append(int(A[t].abs().argmax()))
        base = perturbed_target(rm, state, graph, t, picks[0], 1.0)
        for s in picks:
            # removing the source (value x 0) changes the target by exactly -A[t, s] in an affine model
            delta = base - perturbed_target(rm, state, graph, t, s, 0.0)
            assert abs(float(delta) - float(A[t, s])) <= 1e-4 * max(1.0, abs(float(A[t, s]))), (t, s)
            checked += 1
    assert checked >= 10
    # a feature never feeds its own layer or an earlier one, nor a position before its own
    later = (graph.layer_N[:, None] <= graph.layer_N[None, :]) | (graph.pos_N[:, None] < graph.pos_N[None, :])
    assert (A[:N, :N][later] == 0).all()


def check_decomposition(rm, ids_T, graph):
    """Each target's incoming edges plus an independently measured bias give the real model's value."""
    state = rm.prepare(ids_T)
    N, K = graph.n_features, graph.n_logits
    # the bias, measured independently: the frozen model's target inputs with every node set to zero
    e, a, err = rm.clean_inputs(state)
    with torch.no_grad():
        logits0, mlp_in0 = rm.forward_linear(state, 0 * e, 0 * a, 0 * err)
        bias_feat = rm.feature_pre_acts(state, mlp_in0, [(0, n) for n in range(N)])
    last0 = logits0[0, -1]
    bias_logit = last0[graph.logit_tokens_K] - last0.mean()
    # the target inputs of the real model: pre-activations from its own MLP inputs, demeaned real logits
    real_pre = torch.stack(
        [rm.pre_acts(int(graph.layer_N[n]), state.mlp_in_LTD[graph.layer_N[n], graph.pos_N[n]][None])[0,
         graph.idx_N[n]] for n in range(N)]
    )  # fmt: skip
    real_last = state.logits_TV[-1]
    real_logit = real_last[graph.logit_tokens_K] - real_last.mean()
    rows = graph.adjacency_nn.sum(1)
    torch.testing.assert_close(rows[:N] + bias_feat, real_pre, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rows[-K:] + bias_logit, real_logit, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(graph.bias_n[:N], bias_feat, atol=1e-4, rtol=1e-4)
    # an active feature's pre-activation is its activation (TopK keeps pre-activations as they are)
    torch.testing.assert_close(real_pre, graph.act_N, atol=1e-5, rtol=1e-5)


def test_incoming_edges_plus_bias_sum_to_the_real_pre_activation(rm, ids_T, graph):
    check_decomposition(rm, ids_T, graph)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_other_llama_layout_families_are_exact_too(family):
    """Tiny random models of the other supported families (built here, no tokenizer): real logits, exact edges."""
    import transformers

    cls = {"mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    cfg = getattr(transformers, f"{cls}Config")(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, f"{cls}ForCausalLM")(cfg).eval()
    rm = ReplacementModel(model, random_transcoders())
    ids_T = torch.randint(3, 300, (7,), generator=torch.Generator().manual_seed(0))
    state = rm.prepare(ids_T)
    with torch.no_grad():
        real_TV = model(ids_T[None]).logits[0]
    logits_BTV, _ = rm.forward_linear(state, *rm.clean_inputs(state))
    torch.testing.assert_close(logits_BTV[0], real_TV, atol=1e-5, rtol=0)
    check_decomposition(rm, ids_T, attribute(rm, ids_T, batch_size=32))


def test_logit_nodes_are_the_top_tokens_to_095(graph, rm, ids_T):
    probs = torch.softmax(rm.prepare(ids_T).logits_TV[-1], -1)
    K = graph.n_logits
    assert 1 <= K <= 10
    top = probs.topk(K)
    assert torch.equal(graph.logit_tokens_K, top.indices)
    assert K == 10 or (top.values.sum() >= 0.95 and top.values[:-1].sum() < 0.95)


# ---- pruning and scores (pure functions) ------------------------------------------------------
def test_influence_solve_equals_the_series_and_a_hand_case():
    # chain: embedding(2) -> feature(0) -> feature(1) -> logit(3), plus embedding -> logit directly
    A = torch.zeros(4, 4)
    A[0, 2], A[1, 0], A[3, 1], A[3, 2] = 2.0, -1.0, 3.0, 1.0
    w = torch.tensor([0.0, 0.0, 0.0, 0.5])
    norm = normalize(A)
    torch.testing.assert_close(norm[3], torch.tensor([0.0, 0.75, 0.25, 0.0]))
    inf = influence(norm, w)
    # logit -> f1: 0.5*0.75; f1 -> f0: *1; f0 -> emb: *1, plus the direct 0.5*0.25
    torch.testing.assert_close(inf, torch.tensor([0.375, 0.375, 0.5, 0.0]))
    torch.testing.assert_close(influence_solve(norm, w), inf)


def test_pruning_keeps_the_stated_influence_fractions(graph):
    w = graph.logit_weights()
    p = prune(graph.adjacency_nn, w, graph.n_features, graph.n_pos + graph.n_logits, 0.8, 0.98)
    inf = p.node_influence_n
    torch.testing.assert_close(inf, influence_solve(normalize(graph.adjacency_nn), w), atol=1e-6, rtol=1e-4)
    assert inf[p.threshold_node_mask_n].sum() >= 0.8 * inf.sum() - 1e-6
    assert p.edge_scores_nn[p.threshold_edge_mask_nn].sum() >= 0.98 * p.edge_scores_nn.sum() - 1e-6
    kept = int(p.node_mask_n[: graph.n_features].sum())
    assert 0 < kept < graph.n_features  # it pruned something and kept something
    # every kept feature has a kept input and a kept output; no edge touches a dropped node
    E = p.edge_mask_nn
    nf = graph.n_features
    assert (E[:nf].any(1) | ~p.node_mask_n[:nf]).all() and (E[:, :nf].any(0) | ~p.node_mask_n[:nf]).all()
    assert not E[~p.node_mask_n].any() and not E[:, ~p.node_mask_n].any()
    assert p.node_mask_n[-(graph.n_pos + graph.n_logits) :].all()
    torch.testing.assert_close(cutoff(torch.tensor([5.0, 3.0, 2.0]), 0.8), torch.tensor(3.0))


def test_scores_by_hand_and_on_the_graph(graph):
    # f0 fed 3:1 by embedding e and error r; logit fed by f0 alone (order: f0, r, e, logit)
    A = torch.zeros(4, 4)
    A[0, 2], A[0, 1], A[3, 0] = 3.0, -1.0, 2.0
    w = torch.tensor([0.0, 0.0, 0.0, 1.0])
    rep, comp = scores(A, w, n_features=1, n_errors=1, n_embeds=1)
    assert rep == pytest.approx(0.75)  # influence: e 0.75, r 0.25
    # weights: f0 1, r 0.25, e 0.75, logit 1 -> non-error shares 0.75, 1, 1, 1
    assert comp == pytest.approx((0.75 * 1 + 0.25 + 0.75 + 1) / 3.0)
    rep, comp = scores(graph.adjacency_nn, graph.logit_weights(), graph.n_features, graph.n_errors, graph.n_pos)
    assert 0 < rep < 1 and 0 < comp < 1


# ---- errors --------------------------------------------------------------------------------
def test_refuses_a_missing_layer_a_wrong_width_and_another_family(lm, tiny_model_dirs):
    saes = random_transcoders()
    del saes[1]
    with pytest.raises(TranscoderSetError, match=r"layers \[1\] have none"):
        ReplacementModel(lm, saes)
    with pytest.raises(TranscoderSetError, match="another model"):
        ReplacementModel(lm, random_transcoders(d=32))
    gpt2 = load_model(str(tiny_model_dirs["gpt2"]), dtype="float32", device="cpu")
    with pytest.raises(ReplacementError, match="model_type 'gpt2'"):
        ReplacementModel(gpt2, random_transcoders())
    assert parse_layers("all", 3) == [0, 1, 2] and parse_layers("2,0", 3) == [0, 2]
    with pytest.raises(TranscoderSetError, match="layers 0..2"):
        parse_layers("0,3", 3)
    assert layer_points([1]) == [{"model": {"hook": "blocks.1.hook_mlp_in", "hook_out": "blocks.1.hook_mlp_out"}}]


# ---- end to end: train a set, draw a graph -----------------------------------------------------
@pytest.mark.slow
def test_transcoders_then_graph_end_to_end(tiny_model_dirs, text_corpus, tmp_path, capsys):
    model = str(tiny_model_dirs["llama"])
    args = ["transcoders", "--model", model, "--layers", "all", "--corpus", text_corpus, "--arch", "topk",
            "--sae.k", 8, "--sae.d_sae", 128, "--data.context_size", 32, "--data.holdout_fraction", 0.2,
            "--tokens", 4096, "--activations.batch_size", 256, "--activations.shuffle_sequences", 16,
            "--train.out_dir", tmp_path, "--name", "plt", "--no-eval", "--quiet"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    folder = tmp_path / "plt"
    manifest = json.loads((folder / "transcoders.json").read_text())
    assert sorted(manifest["layers"]) == ["0", "1", "2"] and manifest["model_name"] == model
    for layer, rel in manifest["layers"].items():
        cfg = json.loads((folder / rel / "cfg.json").read_text())
        assert cfg["metadata"]["hook_name"] == f"blocks.{layer}.hook_mlp_in"
        assert cfg["metadata"]["hook_name_out"] == f"blocks.{layer}.hook_mlp_out"
    capsys.readouterr()
    assert main([str(a) for a in args]) == 2  # the first set is never overwritten
    assert "already exists" in capsys.readouterr().err
    assert main([str(a) for a in args[:3]] + ["--layers", "0,1", "--resume", str(folder)]) == 2
    assert "trains layers [0, 1, 2], not [0, 1]" in capsys.readouterr().err
    # a run cut after training but before its manifest: --resume alone finishes it, with the same transcoders
    before = {rel: (folder / rel / "sae_weights.safetensors").read_bytes() for rel in manifest["layers"].values()}
    (folder / "transcoders.json").unlink()
    assert main(["transcoders", "--resume", str(folder), "--no-eval", "--quiet"]) == 0
    assert json.loads((folder / "transcoders.json").read_text()) == manifest
    assert all((folder / rel / "sae_weights.safetensors").read_bytes() == b for rel, b in before.items())
    out = tmp_path / "g.json"
    assert main(["graph", "--transcoders", str(folder), "--prompt", PROMPT, "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    meta = d["metadata"]
    assert meta["prompt"] == PROMPT and 0 < meta["scores"]["replacement"] <= 1
    ids = {n["node_id"] for n in d["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in d["links"]) and d["links"]
    kinds = {n["feature_type"] for n in d["nodes"]}
    assert {"embedding", "logit"} <= kinds and set(d) == {"metadata", "qParams", "nodes", "links"}
    fields = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit", "run_idx",
              "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation"}  # fmt: skip
    assert all(fields <= set(n) for n in d["nodes"]) and len(ids) == len(d["nodes"])
    assert meta["slug"] == "g" and meta["prompt_tokens"][0] == "<bos>" and meta["node_threshold"] == 0.8
    logits = [n for n in d["nodes"] if n["feature_type"] == "logit"]
    assert sum(n["is_target_logit"] for n in logits) == 1 and all(n["layer"] == "4" for n in logits)
    # influence is the cumulative share: kept non-token nodes sit at or under the threshold, give or take one
    inner = sorted(n["influence"] for n in d["nodes"] if n["feature_type"] not in ("embedding", "logit"))
    assert inner and inner[0] > 0 and sum(v > 0.8 for v in inner) <= 1
    capsys.readouterr()
    # a second run never overwrites; bad prompts, a wrong model, a set missing its manifest: one-line errors
    assert main(["graph", "--transcoders", str(folder), "--prompt", PROMPT, "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["graph", "--transcoders", str(folder), "--prompt", "  ", "--out", str(tmp_path / "x.json")]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    other = str(tiny_model_dirs["gpt2"])
    assert main(["graph", "--transcoders", str(folder), "--prompt", PROMPT, "--model", other]) == 2
    assert "trained on" in capsys.readouterr().err
    (folder / "transcoders.json").rename(folder / "moved.json")
    assert main(["graph", "--transcoders", str(folder), "--prompt", PROMPT, "--out", str(tmp_path / "y.json")]) == 2
    assert "no transcoders.json" in capsys.readouterr().err
