"""`probe_many` shares one LM pass and the residual-only probes yet gives each SAE its own numbers;
`saeforge probe` on sweep and transcoders folders (a JSON per SAE, a summary per folder)."""

from __future__ import annotations

import importlib
import inspect
import json
import math

import pytest
import torch
from test_groundtruth_cli import _save_sae

from saeforge import cli
from saeforge.evals.setup import eval_setup_for
from saeforge.groundtruth.run import probe, probe_many
from saeforge.models import load_model
from saeforge.saes.formats import load_sae

MODULES = "keyword colorsys bisect fnmatch glob stat copy abc genericpath linecache heapq"


@pytest.fixture(scope="module")
def code_corpus(tmp_path_factory):
    """Real Python nobody here wrote: standard-library modules, one document per .py file."""
    root = tmp_path_factory.mktemp("code")
    for name in MODULES.split():
        (root / f"{name}.py").write_text(inspect.getsource(importlib.import_module(name)))
    return root


def assert_same(a, b, path=""):
    """Equal structure; ints, strings and lists of them exactly, floats to 1e-6."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{path}[{i}]")
    elif isinstance(a, float) and not (isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        assert b == pytest.approx(a, abs=1e-6), path
    else:
        assert a == b, path


def _forwards(lm):
    """Count the LM's forward calls (a torch hook on the HF model, not a stand-in for our code)."""
    calls = [0]
    lm.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.slow
def test_probe_many_equals_each_sae_probed_alone_with_one_lm_pass(tiny_model_dirs, code_corpus, tmp_path):
    model = tiny_model_dirs["llama"]
    dirs = [_save_sae(tmp_path / "a" / "sae", model, code_corpus)]
    # another SAE at the same hook (other weights), and one at another hook: two hooks in the one LM pass
    other = load_sae(dirs[0])
    torch.nn.init.normal_(other.W_enc, generator=torch.Generator().manual_seed(5))
    cfg0 = eval_setup_for(dirs[0])
    deep = type(other)(other.cfg)
    deep.init_weights(torch.Generator().manual_seed(7))
    cfg_deep = eval_setup_for(dirs[0], {"model": {"hook": "blocks.0.hook_resid_post"}})
    lm = load_model(str(model), device="cpu", dtype="float32")
    items = [(load_sae(dirs[0]), cfg0), (other, cfg0), (deep, cfg_deep)]
    calls = _forwards(lm)
    together = probe_many(lm, items, tokens=500, probe_tokens=200)
    shared_calls = calls[0]
    alone = []
    for sae, cfg in items:
        calls[0] = 0
        alone.append(probe(lm, sae, cfg, 500, 200))
        single_calls = calls[0]
    for t, a in zip(together, alone):
        assert_same(a, t)
    # the first SAE's numbers are its own: the SAE with other encoder weights scores differently
    assert together[0]["coverage"]["coverage"] != together[1]["coverage"]["coverage"]
    assert together[0]["probing"]["residual"] == together[1]["probing"]["residual"]  # shared baseline, same hook
    assert together[0]["probing"]["dense"] != together[2]["probing"]["dense"]  # another hook, its own baseline
    assert together[0]["l0"] == pytest.approx(8.0)  # an untrained TopK k=8 fires exactly 8 latents per token
    # one LM pass for all three (windows + absorption prompts), as many as the last SAE alone needed
    assert shared_calls == single_calls


def _train_sweep(model, corpus, out):
    args = ["train", "--model", model, "--hook", "blocks.1.hook_resid_post", "--corpus", corpus]
    args += ["--data.context_size", 32, "--data.holdout_fraction", 0.5, "--tokens", 1024]
    args += ["--activations.batch_size", 128, "--activations.shuffle_sequences", 8, "--sae.d_sae", 64]
    args += ["--arch", "topk", "--sweep", "sae.k=4,8", "--train.out_dir", out, "--name", "sw", "--no-eval", "--quiet"]
    assert cli.main([str(a) for a in args]) == 0
    return out / "sw"


@pytest.mark.slow
def test_probe_of_a_sweep_folder_writes_a_json_per_point_and_a_summary(tiny_model_dirs, code_corpus, tmp_path, capsys):
    sweep = _train_sweep(tiny_model_dirs["llama"], code_corpus, tmp_path)
    capsys.readouterr()
    assert cli.main(["probe", str(sweep), "--tokens", "600", "--probe-tokens", "300", "--quiet"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((sweep / "groundtruth_summary.json").read_text())
    assert [r["sae"] for r in summary["rows"]] == ["k=4/sae", "k=8/sae"]
    for row, k in zip(summary["rows"], (4, 8)):
        point = json.loads((sweep / f"k={k}" / "sae" / "groundtruth.json").read_text())
        assert row["file"] == f"k={k}/sae/groundtruth.json" and row["architecture"] == "topk"
        assert row["coverage"] == point["coverage"]["coverage"] and 0 < row["coverage"] < 1
        assert row["l0"] <= k and row["hook"] == "blocks.1.hook_resid_post"
    assert summary["tokens"] == 600 and summary["corpus"] == str(code_corpus)
    table = out.splitlines()[-4:-1]  # the summary table, then the "wrote" line of the summary JSON
    assert table[0].split()[:5] == ["sae", "hook", "arch", "L0", "coverage"] and "topk" in table[1]
    assert out.rstrip().endswith("groundtruth_summary.json")


@pytest.mark.slow
def test_probe_of_a_transcoders_folder_and_of_a_folder_with_nothing_to_probe(
    tiny_model_dirs, code_corpus, tmp_path, capsys
):
    folder = tmp_path / "tcs"
    layers = {}
    for layer in (1, 0):  # the manifest's order is not the layer order: rows follow the layers
        hook_in = f"blocks.{layer}.hook_mlp_in"
        _save_sae(
            folder / f"L{layer}" / "sae", tiny_model_dirs["llama"], code_corpus, hook_out="blocks.2.hook_resid_post"
        )
        # _save_sae names blocks.1.hook_resid_post; a transcoders folder's SAEs read their layer's MLP input
        cfg_path = folder / f"L{layer}" / "sae" / "cfg.json"
        cfg = json.loads(cfg_path.read_text())
        run = cfg["metadata"]["saeforge_config"]["model"]
        run.update(hook=hook_in, hook_out=f"blocks.{layer}.hook_mlp_out")
        cfg_path.write_text(json.dumps(cfg))
        layers[str(layer)] = f"L{layer}/sae"
    manifest = {"format_version": 1, "model_name": "m", "hook_in": "", "hook_out": "", "layers": layers}
    (folder / "transcoders.json").write_text(json.dumps(manifest))
    assert cli.main(["probe", str(folder), "--tokens", "600", "--probe-tokens", "300", "--quiet"]) == 0
    rows = json.loads((folder / "groundtruth_summary.json").read_text())["rows"]
    assert [r["hook"] for r in rows] == ["blocks.0.hook_mlp_in", "blocks.1.hook_mlp_in"]
    assert all(r["tpp"] is None and r["full_absorption"] is None and 0 < r["coverage"] < 1 for r in rows)
    # a plain folder: one line naming what would do, exit 2
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert cli.main(["probe", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "nothing to probe" in err and "sweep folder" in err and "Traceback" not in err


def test_sparse_counts_equal_the_dense_reference():
    from saeforge.groundtruth.metrics import OrCounts, ThresholdCounts

    g = torch.Generator().manual_seed(0)
    N, F, P = 700, 50, 4
    f_NF = torch.randn(N, F, generator=g)
    f_NF[torch.rand(N, F, generator=g) < 0.8] = 0  # sparse, with negative values left in
    f_NF[:, 3] = -torch.rand(N, generator=g)  # a latent that never fires (max < 0)
    f_NF[:5, 7] = torch.tensor([0.1, 0.2, 0.3, 0.25, 1.0])  # values exactly on thresholds t * max
    y_NP = torch.rand(N, P, generator=g) < 0.3
    v_NP = torch.rand(N, P, generator=g) < 0.9
    max_F = f_NF.amax(0)
    fast, ref = ThresholdCounts(P, max_F), ThresholdCounts(P, max_F, sparse=False)
    for c in (fast, ref):
        c.update(f_NF, y_NP, v_NP)
    assert torch.equal(fast.tp_PFT, ref.tp_PFT) and torch.equal(fast.pp_PFT, ref.pp_PFT)
    assert torch.equal(fast.pos_P, ref.pos_P) and torch.equal(fast.n_P, ref.n_P)
    assert fast.pp_PFT[:, 3].sum() == 0 and fast.tp_PFT.sum() > 0
    # hand check: latent 7 over rows 0..4 (max 1.0): a value equal to t * max does not fire
    small = ThresholdCounts(1, torch.tensor([1.0]))
    small.update(f_NF[:5, 7:8], torch.ones(5, 1, dtype=torch.bool), torch.ones(5, 1, dtype=torch.bool))
    assert small.pp_PFT[0, 0, :4].tolist() == [5, 4, 3, 1]  # t = 0.3: only 1.0 (0.3 is not above 0.3)
    chosen_PFT = fast.precise_PFT(0.3)
    fast_or, ref_or = OrCounts(chosen_PFT, max_F), OrCounts(chosen_PFT, max_F, sparse=False)
    for c in (fast_or, ref_or):
        c.update(f_NF, y_NP, v_NP)
    assert torch.equal(fast_or.tp_PT, ref_or.tp_PT) and torch.equal(fast_or.pp_PT, ref_or.pp_PT)
    assert fast_or.pp_PT.sum() > 0


def test_unfinished_sweeps_and_mixed_models_are_refused_before_any_work(tiny_model_dirs, code_corpus, tmp_path):
    from saeforge.config import UserError
    from saeforge.groundtruth.folders import NothingToProbeError, expand
    from saeforge.groundtruth.run import probe_saved_many
    from saeforge.training.sweep import PLAN_FILE

    sweep = tmp_path / "sw"
    _save_sae(sweep / "k=4" / "sae", tiny_model_dirs["llama"], code_corpus)
    points = [{"sae": {"k": "4"}}, {"sae": {"k": "8"}}]
    (sweep / PLAN_FILE).write_text(json.dumps({"base": {}, "points": points}))
    with pytest.raises(NothingToProbeError, match=r"1 of 2 sweep points have no saved SAE yet \(k=8\).*--resume"):
        expand(sweep)
    assert expand(sweep / "k=4") == ([sweep / "k=4" / "sae"], False)  # a run folder: its sae/, no summary
    other = _save_sae(tmp_path / "g" / "sae", tiny_model_dirs["gpt2"], code_corpus)
    with pytest.raises(UserError, match="several models"):
        probe_saved_many([sweep / "k=4" / "sae", other])
