"""`saeforge probe` end to end on a tiny model, the random-weights control, and probe's numbers in eval pages."""

from __future__ import annotations

import importlib
import inspect
import json

import pytest
import torch

from saeforge import cli
from saeforge.saes.formats import save_sae
from saeforge.saes.registry import config_class, sae_class
from saeforge.training.config import RunConfig

HOOK = "blocks.1.hook_resid_post"


def _save_sae(folder, model_dir, corpus, hook_out=""):
    """An untrained TopK SAE (a transcoder into ``hook_out`` when given) that names its run's model and corpus."""
    out = {"d_out": 64, "apply_b_dec_to_input": False} if hook_out else {}
    cfg = RunConfig.from_dict(
        {
            "model": {"name": str(model_dir), "hook": HOOK, "hook_out": hook_out, "device": "cpu", "dtype": "float32"},
            "data": {"corpus": str(corpus), "context_size": 32, "holdout_fraction": 0.5},
            "eval": {"batch_size": 8, "tokens": 512, "ce_tokens": 256},
            "sae": {"architecture": "topk", "d_in": 64, "d_sae": 128, "k": 8, **out},
        }
    )
    sae = sae_class("topk")(config_class("topk")(d_in=64, d_sae=128, k=8, **out))
    sae.init_weights(torch.Generator().manual_seed(0))
    meta = {"model_name": str(model_dir), "hook_name": HOOK, "saeforge_config": cfg.to_dict()}
    return save_sae(sae, folder, meta)


@pytest.mark.slow
def test_probe_command_end_to_end(tiny_model_dirs, tmp_path, capsys):
    code = tmp_path / "code"
    code.mkdir()
    for name in "keyword colorsys bisect fnmatch glob stat copy abc genericpath linecache heapq".split():
        (code / f"{name}.py").write_text(inspect.getsource(importlib.import_module(name)))
    (code / "broken.py").write_text("def f(:\n    pass\n")
    sae_dir = _save_sae(tmp_path / "run" / "sae", tiny_model_dirs["llama"], code)
    tc_dir = _save_sae(tmp_path / "tc" / "sae", tiny_model_dirs["llama"], code, hook_out="blocks.2.hook_resid_post")
    argv = ["probe", str(sae_dir), str(tc_dir), "--tokens", "2000", "--probe-tokens", "1000", "--quiet"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("cat_docstring") == 2 and "coverage" in out and out.count("wrote") == 2
    summary = out.splitlines()[-3:]  # a sweep-style summary: one line per SAE
    assert (
        summary[0].split()[:5] == ["sae", "hook", "arch", "L0", "coverage"] and "blocks.1.hook_resid_post" in summary[2]
    )
    tc = json.loads((tc_dir / "groundtruth.json").read_text())  # a transcoder: probed through its latents
    assert 0 < tc["coverage"]["coverage"] < 1 and tc["probing"]["sae"]["1"]["mean"] is not None
    assert "error" in tc["tpp"] and "error" in tc["absorption"]
    assert "first-letter absorption (SAEBench)" in out and "full abs" in summary[0]
    # eval --report reads probe's JSON into a "Ground truth" section (evals sit below groundtruth: no import)
    capsys.readouterr()
    assert cli.main(["eval", str(sae_dir), "--report", "--quiet"]) == 0
    page = (sae_dir / "report.html").read_text()
    assert "<h2>Ground truth</h2>" in page and "groundtruth.json" in page
    probed = json.loads((sae_dir / "groundtruth.json").read_text())["coverage"]["coverage"]
    assert json.loads((sae_dir / "eval.json").read_text())["groundtruth"]["coverage"] == pytest.approx(probed)
    result = json.loads((sae_dir / "groundtruth.json").read_text())
    assert result["n_tokens"] >= 2000 and 600 < result["probing"]["tokens"] <= 1000
    cov = result["coverage"]["coverage"]
    assert 0 < cov < 1 and result["coverage"]["per_property"]["cat_name"]["positives"] > 0
    assert result["documents"]["code"] >= 1 and result["documents"]["prose"] == 0
    # the residual of a random model still carries the token's own identity: a dense probe beats chance (0.5)
    dense = result["probing"]["dense"]["per_property"]
    assert dense["cat_operator"] > 0.7
    absorption = result["absorption"]  # SAEBench's first-letter task on the tiny vocabulary's words
    assert absorption["letters_scored"] <= len(absorption["letters"]) and absorption["n_test"] >= 4
    category = result["tpp"]["groups"]["category"]
    assert category["classes"] >= 3 and category["tpp"] == pytest.approx(category["self_drop"] - category["other_drop"])

    prose = tmp_path / "prose"
    prose.mkdir()
    for i in range(6):
        (prose / f"p{i}.txt").write_text(f"Plain words, not code {i}: it does not parse as Python at all.\n")
    prose_sae = _save_sae(tmp_path / "prose_run" / "sae", tiny_model_dirs["llama"], prose)
    capsys.readouterr()
    assert cli.main(["probe", str(prose_sae), "--quiet"]) == 2  # a UserError: one line, exit 2
    err = capsys.readouterr().err
    assert "parses as Python" in err and "--data.corpus python-stdlib" in err and "Traceback" not in err


def test_random_init_control_reinitialises_weights_and_keeps_the_tokenizer(tmp_path):
    import tiny

    from saeforge.evals.setup import eval_setup_for
    from saeforge.models import load_model

    folder = tiny.save_tiny(tmp_path / "gpt2", "gpt2", seed=1)
    trained = load_model(str(folder), device="cpu")
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    rand_a = load_model(str(folder), device="cpu", random_init=True)
    assert torch.equal(torch.rand(3), before)  # the global RNG is left alone
    rand_b = load_model(str(folder), device="cpu", random_init=True)
    sd_t, sd_a, sd_b = (m.model.state_dict() for m in (trained, rand_a, rand_b))
    name = "transformer.h.0.mlp.c_fc.weight"
    assert sd_a.keys() == sd_t.keys() and sd_a[name].shape == sd_t[name].shape
    assert not torch.equal(sd_a[name], sd_t[name]) and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    # oracle: the class's own init under seed 0 is what tests/tiny.py builds with seed 0
    oracle = tiny.make_model("gpt2", len(trained.tokenizer), seed=0).state_dict()
    assert all(torch.equal(sd_a[k], oracle[k]) for k in sd_a)
    assert rand_a.tokenizer.get_vocab() == trained.tokenizer.get_vocab()
    # the flag travels in the SAE's cfg.json, so eval and probe rebuild the same random model
    cfg = RunConfig.from_dict({"model": {"name": str(folder), "hook": HOOK, "random_init": True}})
    sae = sae_class("topk")(config_class("topk")(d_in=64, d_sae=32, k=4))
    sae_dir = save_sae(sae, tmp_path / "sae", {"model_name": str(folder), "saeforge_config": cfg.to_dict()})
    assert eval_setup_for(sae_dir).model.random_init is True


def test_report_and_compare_pages_show_ground_truth():
    from saeforge.evals.html import groundtruth_section, pareto_plots

    gt = {"file": "groundtruth.json", "coverage": 0.41, "sparse_probing_k1": 0.87, "tpp": 0.12, "n_tokens": 5000}
    a = {"l0": 8.0, "explained_variance": 0.7, "groundtruth": gt}
    b = {"l0": 16.0, "explained_variance": 0.8}  # probe has not run for this one
    section = "".join(groundtruth_section(a))
    assert "<h2>Ground truth</h2>" in section and "0.41" in section and "groundtruth.json" in section
    assert "run <code>saeforge probe SAE_DIR</code>" in "".join(groundtruth_section(b))
    plots = "".join(pareto_plots([("a", a), ("b", b)]))
    assert 'data-plot="pareto-coverage"' in plots and 'data-plot="pareto-sparse-probing-k1"' in plots
    assert 'data-x="8.0" data-y="0.41"' in plots and 'data-x="8.0" data-y="0.87"' in plots
    assert 'data-x="16.0" data-y="nan"' not in plots  # no point where probe has not run
    assert "pareto-coverage" not in "".join(pareto_plots([("b", b)]))
