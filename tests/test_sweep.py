"""Sweeps: the --sweep syntax, and that every point of a one-pass sweep equals its own separate run."""

from __future__ import annotations

import json

import pytest
import torch

from saeforge.cli import main
from saeforge.config import ConfigError
from saeforge.saes import formats
from saeforge.training.sweep import parse_sweep, point_configs, point_name


def test_parse_sweep_is_a_cartesian_product_with_pipe_for_list_values():
    points = parse_sweep(["sae.k=16,32", "train.lr=1e-3, 1e-4"])
    assert points == [{"sae": {"k": "16"}, "train": {"lr": "1e-3"}}, {"sae": {"k": "16"}, "train": {"lr": "1e-4"}},
                      {"sae": {"k": "32"}, "train": {"lr": "1e-3"}}, {"sae": {"k": "32"}, "train": {"lr": "1e-4"}}]
    assert point_name(points[1]) == "k=16_lr=1e-4"
    assert parse_sweep(["sae.group_sizes=32,32|16,16,32"]) == [{"sae": {"group_sizes": "32,32"}}, {"sae": {"group_sizes": "16,16,32"}}]
    for bad, msg in [("sae.k", "expected SECTION.FIELD=V1"), ("model.hook=a,b", "only sae.. and train.."),
                     ("train.run_name=a,b", "only sae"), ("sae.k=", "no values")]:
        with pytest.raises(ConfigError, match=msg):
            parse_sweep([bad])


def test_point_configs_switch_architecture_and_name_bad_fields():
    base = {"sae": {"architecture": "topk", "d_sae": 256, "k": 8}}
    relu, btk = point_configs(base, parse_sweep(["sae.architecture=relu,batchtopk"]))
    assert relu.sae.architecture == "relu" and relu.sae.d_sae == 256  # k dropped: relu has none; d_sae kept
    assert btk.sae.architecture == "batchtopk" and btk.sae.k == 32  # batchtopk's own default
    with pytest.raises(ConfigError, match=r"sweep point k=0: sae.k=0"):
        point_configs(base, parse_sweep(["sae.k=4,0"]))


def test_sweep_points_equal_separate_runs_and_write_a_summary(tiny_model_dirs, text_corpus, tmp_path, capsys):
    common = ["--model", tiny_model_dirs["llama"], "--hook", "blocks.1.hook_resid_post", "--corpus", text_corpus,
              "--data.context_size", 64, "--data.holdout_fraction", 0.2, "--tokens", 4096, "--activations.batch_size", 256,
              "--activations.shuffle_sequences", 32, "--sae.d_sae", 128, "--train.out_dir", tmp_path, "--quiet"]
    args = ["train", *common, "--name", "sw", "--sweep", "sae.k=4,8", "--eval.tokens", 1024, "--eval.ce_tokens", 256]
    assert main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert "k=4" in out and "k=8" in out and "explained_variance" in out
    summary = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [r["point"] for r in summary["points"]] == ["k=4", "k=8"] and all(r["steps"] == 16 for r in summary["points"])
    assert [r["l0"] for r in summary["points"]] == [pytest.approx(4.0), pytest.approx(8.0)]
    # the same config trained alone gives the same SAE: the sweep shares batches, nothing else
    assert main([str(a) for a in ["train", *common, "--name", "solo", "--sae.k", 8, "--no-eval"]]) == 0
    swept, solo = formats.load_sae(tmp_path / "sw" / "k=8" / "sae"), formats.load_sae(tmp_path / "solo" / "sae")
    for name, p in solo.state_dict().items():
        torch.testing.assert_close(swept.state_dict()[name], p, rtol=0, atol=0, msg=name)
    assert main([str(a) for a in args]) == 2  # an existing sweep folder is refused, not overwritten
    assert "resuming a sweep is not supported" in capsys.readouterr().err
