"""Sparse feature circuits on the tiny llama (float32) with random SAEs at several hooks."""

from __future__ import annotations

import json

import pytest
import torch
from test_analysis_splice import make_sae
from test_circuits import random_transcoders

from saeforge.analysis.metrics import LogitDiff
from saeforge.circuits.sfc import (
    ERROR,
    Node,
    Site,
    _encode,
    _forward,
    _record,
    edge_effects,
    faithfulness,
    feature_circuit,
    metric_ablated,
    node_effects,
    prepare,
)
from saeforge.cli import main
from saeforge.models import load_model
from saeforge.saes.formats import save_sae

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
BOS = 0  # "<bos>" is the tiny tokenizer's first special token


@pytest.fixture(scope="module")
def lm(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["llama"]), device="cpu")


@pytest.fixture(scope="module")
def sites():
    return [Site(make_sae("topk" if i != 1 else "relu", seed=i), h) for i, h in enumerate(HOOKS)]


def _ids(seed: int, change: int | None = None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (2, 8), generator=g)
    ids[:, 0] = BOS
    if change is not None:
        ids = ids.clone()
        ids[:, change] = (ids[:, change] + 17) % 290 + 3
    return ids


METRIC = LogitDiff(target=40, other=41)


def test_faithfulness_is_one_for_all_nodes_and_zero_for_none(lm, sites):
    assert lm.tokenizer.bos_token_id == BOS
    c, ids = feature_circuit(lm, sites, list(_ids(0)), METRIC, patch=list(_ids(0, change=5)), edges=False)
    clean = float(METRIC(lm.model(input_ids=ids, use_cache=False).logits, ids).mean())
    assert metric_ablated(lm, c.sites, ids, METRIC, c.start, None) == clean  # M is the clean model, bit for bit
    everything = set(c.all_nodes())
    assert len(everything) == 3 * 7 * (96 + 1)  # hooks x positions after BOS x (latents + error)
    assert faithfulness(lm, c, ids, METRIC, everything) == pytest.approx(1.0, abs=1e-5)
    assert abs(faithfulness(lm, c, ids, METRIC, set())) < 0.1
    # ablating everything really moves the metric: the ratio is not 0/0
    assert abs(clean - metric_ablated(lm, c.sites, ids, METRIC, c.start, set())) > 1e-3
    # keeping only the error nodes is not the full model: SAE latents matter
    errors = {n for n in everything if n.latent == ERROR}
    assert faithfulness(lm, c, ids, METRIC, errors) != pytest.approx(1.0, abs=1e-3)


def test_ig_node_effects_sum_to_the_patch_effect_and_beat_atp(lm, sites):
    """At a residual hook the nodes carry the whole state: patching them all gives m(patch)."""
    site = [sites[2]]
    clean, patch = list(_ids(3)), list(_ids(3, change=7))
    ig, ids = feature_circuit(lm, site, clean, METRIC, patch=patch, method="ig", steps=48, node_threshold=0.0)
    atp, _ = feature_circuit(lm, site, clean, METRIC, patch=patch, method="atp", node_threshold=0.0)
    truth = ig.metric_base - ig.metric_clean
    assert abs(truth) > 0.1  # a real (nonlinear) effect to estimate
    ig_sum = float(ig.sites[0].ie_TF.sum() + ig.sites[0].ie_err_T.sum())
    atp_sum = float(atp.sites[0].ie_TF.sum() + atp.sites[0].ie_err_T.sum())
    assert ig_sum == pytest.approx(truth, abs=1e-3)
    assert abs(atp_sum - truth) > 10 * abs(ig_sum - truth)
    # without a patch the baseline is every node at its mean: the same completeness holds
    mean, ids = feature_circuit(lm, site, clean, METRIC, method="ig", steps=48, node_threshold=0.0)
    m_ablated = metric_ablated(lm, mean.sites, ids, METRIC, mean.start, set())
    assert mean.metric_base == m_ablated and abs(m_ablated - mean.metric_clean) > 0.01
    mean_sum = float(mean.sites[0].ie_TF.sum() + mean.sites[0].ie_err_T.sum())
    assert mean_sum == pytest.approx(m_ablated - mean.metric_clean, abs=1e-3)


def test_thresholds_keep_exactly_the_nodes_and_edges_above(lm, sites):
    clean, patch = list(_ids(5)), list(_ids(5, change=7))
    c, _ = feature_circuit(lm, sites, clean, METRIC, patch=patch, node_threshold=0.002, edge_threshold=0.005)
    every = c.all_nodes()
    assert set(c.nodes) == {n for n, ie in every.items() if abs(ie) > 0.002}
    assert 0 < len(c.nodes) < len(every)
    assert {n.hook for n in c.nodes} == set(HOOKS)
    order = {h: i for i, h in enumerate(HOOKS)}
    for u, d in c.edges:
        assert u in c.nodes and d in c.nodes and order[d.hook] == order[u.hook] + 1
    loose, _ = feature_circuit(lm, sites, clean, METRIC, patch=patch, node_threshold=0.002, edge_threshold=0.0)
    assert len(loose.edges) > len(c.edges) > 0
    assert c.edges == {e: ie for e, ie in loose.edges.items() if abs(ie) > 0.005}


def test_atp_edges_into_a_node_match_a_finite_difference(lm, sites):
    """Summed over every upstream node, the AtP edges into d are g_d times d's first-order change
    when the upstream hook moves to its patched value: checked by a central finite difference."""
    up, down = sites[0], sites[1]  # resid_post 0 -> mlp_out 1 (ReLU SAE: piecewise linear)
    data, ids, _, _ = prepare(lm, [up, down], list(_ids(7)), list(_ids(7, change=7)))
    node_effects(lm, data, ids, METRIC, "atp", 1)
    sd_u, sd_d = data
    dx_u = sd_u.df @ up.sae.W_dec + sd_u.de

    def down_values(eps: float):
        got = {}
        with torch.no_grad():
            _forward(lm, ids, {up.hook: lambda x: x + eps * dx_u, down.hook: lambda x: got.update(x=x)})
        return _encode(down.sae, got["x"])

    eps = 1e-2  # central difference: O(eps^2) error, float32 rounding ~1e-7 / eps
    (f0, e0), (f1, e1) = down_values(-eps / 2), down_values(eps / 2)
    active = (f0[:, 7] > 0).all(0)  # a ReLU latent firing on both prompts: differentiable there
    d_feat = Node(down.hook, 7, int((sd_d.ie_TF[7].abs() * active).argmax()))
    d_err = Node(down.hook, 7, ERROR)
    edges = edge_effects(lm, sd_u, sd_d, [d_feat, d_err], ids, "atp", 1)
    g = sd_d.grad  # [S, T, D]
    for d in (d_feat, d_err):
        if d.latent == ERROR:
            fd = ((g[:, 7] * (e1[:, 7] - e0[:, 7])).sum(-1) / eps).mean()
        else:
            gf = g[:, 7] @ down.sae.W_dec[d.latent]
            fd = (gf * (f1[:, 7, d.latent] - f0[:, 7, d.latent]) / eps).mean()
        total = float(sum(ie for (u, dd), ie in edges.items() if dd == d))
        assert abs(float(fd)) > 1e-4
        assert total == pytest.approx(float(fd), rel=1e-2, abs=1e-6)


def test_a_transcoder_site_is_exact_with_its_error_node(lm, sites):
    """A skip transcoder mlp_in 1 -> mlp_out 1 between two SAEs: its nodes (latents, and an error node
    holding skip + what the latents miss) reproduce the model, and IG's IEs sum to the effect of
    patching its output."""
    tc = Site(random_transcoders(n_layers=2, skip=True)[1], "blocks.1.hook_mlp_out", "tc", "blocks.1.hook_mlp_in")
    three = [sites[0], tc, sites[2]]
    clean, patch = list(_ids(11)), list(_ids(11, change=7))
    c, ids = feature_circuit(lm, three, clean, METRIC, patch=patch, method="ig", steps=32, edges=False)
    assert [sd.site.hook for sd in c.sites] == [sites[0].hook, tc.hook, sites[2].hook]
    everything = set(c.all_nodes())
    assert faithfulness(lm, c, ids, METRIC, everything) == pytest.approx(1.0, abs=1e-5)
    # ablating only the transcoder's nodes moves the metric: the ablation really goes through it
    others = {n for n in everything if n.hook != tc.hook}
    assert abs(faithfulness(lm, c, ids, METRIC, others) - 1.0) > 1e-3
    sd = c.sites[1]
    y_patch = _record(lm, [tc], ids_ST=torch.stack([torch.as_tensor(p) for p in patch]))[1][tc.hook]
    with torch.no_grad():
        truth = float(METRIC(_forward(lm, ids, {tc.hook: lambda x: y_patch}), ids).mean()) - c.metric_clean
    assert abs(truth) > 1e-3  # MLP outputs of the tiny model are small
    assert float(sd.ie_TF.sum() + sd.ie_err_T.sum()) == pytest.approx(truth, rel=1e-2, abs=1e-5)
    # the latents come from the input hook: df = encode(mlp_in of patch) - encode(mlp_in of clean)
    xc, xp = _record(lm, [tc], ids)[1], _record(lm, [tc], torch.stack([torch.as_tensor(p) for p in patch]))[1]
    want = tc.sae.encode(xp[tc.hook_in].reshape(-1, 64)) - tc.sae.encode(xc[tc.hook_in].reshape(-1, 64))
    assert torch.equal(sd.df[:, 1:], want.reshape(2, 8, -1)[:, 1:]) and sd.df.abs().sum() > 0


def test_patch_of_another_length_is_refused(lm, sites):
    with pytest.raises(ValueError, match="same token length"):
        prepare(lm, sites, list(_ids(0)), [_ids(0)[0, :5]])


@pytest.fixture(scope="module")
def sae_dirs(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("sfc")
    out = []
    for i, h in enumerate(HOOKS[::2]):
        folder = root / f"sae{i}"
        save_sae(make_sae(seed=10 + i), folder, {"model_name": str(tiny_model_dirs["llama"]), "hook_name": h})
        out.append(str(folder))
    return out


def test_cli_writes_the_circuit_and_refuses_bad_specs(lm, sae_dirs, tmp_path, capsys):
    tok = lm.tokenizer
    target, other = tok.decode([40]), tok.decode([41])
    base = ["circuit", "--sae", sae_dirs[0], "--sae", sae_dirs[1], "--target", target, "--other", other, "--quiet"]
    prompt = tok.decode(_ids(0)[0, 1:].tolist())
    out = tmp_path / "c.json"
    args = [*base, "--prompt", prompt, "--node-threshold", "0.01", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    d = json.loads(out.read_text())
    assert d["format_version"] == 1 and d["method"] == "atp" and len(d["hooks"]) == 2
    assert all(abs(n["ie"]) > 0.01 for n in d["nodes"]) and d["nodes"]
    assert f"faithfulness {d['faithfulness']:.3f}" in printed
    assert 0.0 <= d["counts"]["kept_nodes"] == len(d["nodes"])
    assert main(args) == 2  # never overwritten
    assert "exists" in capsys.readouterr().err
    assert main([*base, "--prompt", prompt, "--patch", prompt + prompt, "--out", str(tmp_path / "x.json")]) == 2
    assert "same token length" in capsys.readouterr().err
    assert main([*base, "--prompt", prompt, "--method", "ig", "--steps", "0", "--out", str(tmp_path / "y.json")]) == 2
    assert "at least 1 step" in capsys.readouterr().err
