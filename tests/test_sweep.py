"""Sweeps: the --sweep syntax, and that every point of a one-pass sweep equals its own separate run."""

from __future__ import annotations

import json

import pytest
import tiny
import torch

from saeforge.cli import main
from saeforge.config import ConfigError
from saeforge.saes import formats
from saeforge.training.sweep import parse_sweep, point_configs, point_name

pytestmark = pytest.mark.slow  # end to end through the CLI: real training runs, subprocesses, kills


def test_parse_sweep_is_a_cartesian_product_with_pipe_for_list_values():
    points = parse_sweep(["sae.k=16,32", "train.lr=1e-3, 1e-4"])
    assert points == [
        {"sae": {"k": "16"}, "train": {"lr": "1e-3"}},
        {"sae": {"k": "16"}, "train": {"lr": "1e-4"}},
        {"sae": {"k": "32"}, "train": {"lr": "1e-3"}},
        {"sae": {"k": "32"}, "train": {"lr": "1e-4"}},
    ]
    assert point_name(points[1]) == "k=16_lr=1e-4"
    assert parse_sweep(["sae.group_sizes=32,32|16,16,32"]) == [
        {"sae": {"group_sizes": "32,32"}},
        {"sae": {"group_sizes": "16,16,32"}},
    ]
    for bad, msg in [
        ("sae.k", "expected SECTION.FIELD=V1"),
        ("model.name=a,b", "only sae"),
        ("train.checkpoint_every_steps=1,2", "only sae"),
        ("train.run_name=a,b", "only sae"),
        ("sae.k=", "no values"),
    ]:
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
    options = {
        "hook": "blocks.1.hook_resid_post",
        "tokens": 4096,
        "activations.shuffle_sequences": 32,
        "sae.d_sae": 128,
    }

    def train(name, *extra):
        return tiny.train_args(tiny_model_dirs["llama"], text_corpus, tmp_path, name, options, "--quiet", *extra)

    args = train("sw", "--sweep", "sae.k=4,8", "--eval.tokens", 1024, "--eval.ce_tokens", 256)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "k=4" in out and "k=8" in out and "explained_variance" in out
    summary = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [r["point"] for r in summary["points"]] == ["k=4", "k=8"] and all(
        r["steps"] == 16 for r in summary["points"]
    )
    assert [r["l0"] for r in summary["points"]] == [pytest.approx(4.0), pytest.approx(8.0)]
    # the same config trained alone gives the same SAE: the sweep shares batches, nothing else
    assert main(train("solo", "--sae.k", 8, "--no-eval")) == 0
    swept, solo = formats.load_sae(tmp_path / "sw" / "k=8" / "sae"), formats.load_sae(tmp_path / "solo" / "sae")
    for name, p in solo.state_dict().items():
        torch.testing.assert_close(swept.state_dict()[name], p, rtol=0, atol=0, msg=name)
    assert main(args) == 2  # an existing sweep folder is refused, not overwritten
    assert "already exists: continue it with --resume" in capsys.readouterr().err


# ---- resume, multi-hook -----------------------------------------------------------------------------------
SWEEP = ["--sweep", "sae.k=4,8"]
STEPS = 32  # 8192 tokens / 256


def sweep_args(model, corpus, out, name, *extra):
    return [
        str(a)
        for a in [
            "train",
            "--model",
            model,
            "--hook",
            "blocks.1.hook_resid_post",
            "--corpus",
            corpus,
            "--data.context_size",
            64,
            "--data.holdout_fraction",
            0.2,
            "--tokens",
            8192,
            "--activations.batch_size",
            256,
            "--activations.shuffle_sequences",
            32,
            "--sae.d_sae",
            256,
            "--train.checkpoint_every_steps",
            4,
            "--train.log_every_steps",
            4,
            "--train.dead_after_tokens",
            1024,
            "--train.out_dir",
            out,
            "--name",
            name,
            "--no-eval",
            "--quiet",
            *extra,
        ]
    ]


def assert_same_saes(a, b, points=("k=4", "k=8")):
    for p in points:
        x, y = formats.load_sae(a / p / "sae"), formats.load_sae(b / p / "sae")
        for name, t in y.state_dict().items():
            torch.testing.assert_close(x.state_dict()[name], t, rtol=0, atol=0, msg=f"{p} {name}")
        steps = [json.loads(ln)["step"] for ln in (a / p / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(4, STEPS + 1, 4)), steps  # no step logged twice or lost


@pytest.fixture(scope="module")
def full_sweep(tiny_model_dirs, text_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert main(sweep_args(tiny_model_dirs["llama"], text_corpus, out, "full", *SWEEP)) == 0
    return out / "full"


class Interrupt(Exception):
    pass


def test_interrupted_sweep_resumes_to_the_uninterrupted_saes(
    full_sweep, tiny_model_dirs, text_corpus, tmp_path, monkeypatch, capsys
):
    from saeforge.training.trainer import Trainer

    save = Trainer.save_checkpoint

    def dies_midway(self):
        # k=4 has saved step 12, k=8 dies before it does: stream.pt stays at 8 and k=4 is ahead of it
        if self.run_dir.name == "k=8" and self.step == 12:
            raise Interrupt
        save(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", dies_midway)
    args = sweep_args(tiny_model_dirs["llama"], text_corpus, tmp_path, "cut", *SWEEP)
    with pytest.raises(Interrupt):
        main(args)
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    cut = tmp_path / "cut"
    steps = {p: torch.load(cut / p / "checkpoint.pt", weights_only=True)["step"] for p in ("k=4", "k=8")}
    assert steps == {"k=4": 12, "k=8": 8} and torch.load(cut / "stream.pt", weights_only=True)["step"] == 8
    assert not (cut / "sweep.json").exists()

    # the sweep options must be the saved ones, and so must any config option repeated with --resume
    assert main([*args[:-2], "--sweep", "sae.k=4,16", "--resume", str(cut)]) == 2
    assert "repeat its --sweep options" in capsys.readouterr().err
    assert main([*args, "--resume", str(cut), "--tokens", "99"]) == 2
    assert "['train.total_tokens'] differ from it" in capsys.readouterr().err

    assert main([*args, "--resume", str(cut)]) == 0  # the original command with --resume
    assert_same_saes(cut, full_sweep)
    assert [r["steps"] for r in json.loads((cut / "sweep.json").read_text())["points"]] == [STEPS, STEPS]


def test_sigkilled_sweep_resumes_to_the_uninterrupted_saes(full_sweep, tiny_model_dirs, text_corpus, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    args = sweep_args(tiny_model_dirs["llama"], text_corpus, tmp_path, "cut", *SWEEP)
    proc = subprocess.Popen(
        [sys.executable, "-m", "saeforge.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    position = tmp_path / "cut" / "stream.pt"
    deadline = time.time() + 120
    while not position.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.kill()  # SIGKILL: no handler runs, files are as the machine left them
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed: make it longer"
    step = torch.load(position, weights_only=True)["step"]
    assert 0 < step < STEPS and not (tmp_path / "cut" / "sweep.json").exists()

    # `--resume SWEEP_DIR` alone: the folder's sweep_plan.json says it is a sweep and which points it has
    assert main(["train", "--resume", str(tmp_path / "cut"), "--no-eval", "--quiet"]) == 0
    assert_same_saes(tmp_path / "cut", full_sweep)


def test_sweep_over_hooks_reads_one_stream_and_equals_separate_runs(tiny_model_dirs, text_corpus, tmp_path):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    model = tiny_model_dirs["llama"]
    evaluated = ["--eval.tokens", "1024", "--eval.ce_tokens", "256"]
    args = sweep_args(model, text_corpus, tmp_path, "hooks", "--sweep", "model.hook=" + ",".join(hooks))
    assert main([a for a in args if a != "--no-eval"] + evaluated) == 0
    summary = json.loads((tmp_path / "hooks" / "sweep.json").read_text())
    assert summary["hooks"] == hooks and summary["ranks"][0]["row_width"] == 2 * 64  # one stream, both hooks
    for hook in hooks:
        point = tmp_path / "hooks" / f"hook={hook}"
        assert json.loads((point / "sae" / "cfg.json").read_text())["metadata"]["hook_name"] == hook
        solo = sweep_args(model, text_corpus, tmp_path, "solo" + hook[7], "--hook", hook)
        assert main([a for a in solo if a != "--no-eval"] + evaluated) == 0
        swept, alone = formats.load_sae(point / "sae"), formats.load_sae(tmp_path / ("solo" + hook[7]) / "sae")
        for name, t in alone.state_dict().items():
            torch.testing.assert_close(swept.state_dict()[name], t, rtol=0, atol=0, msg=f"{hook} {name}")
        # evaluated at its own hook: the separate run's held-out metrics
        ev_swept, ev_alone = (
            json.loads((d / "sae" / "eval.json").read_text()) for d in (point, tmp_path / ("solo" + hook[7]))
        )
        for key in ("explained_variance", "l0", "ce_score"):
            assert ev_swept[key] == pytest.approx(ev_alone[key], rel=1e-6), key


def test_sweep_of_transcoders_equals_separate_runs(tiny_model_dirs, text_corpus, tmp_path):
    outs = ["blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"]  # two transcoders reading blocks.0.hook_mlp_in
    model = tiny_model_dirs["llama"]
    evaluated = ["--eval.tokens", "1024", "--eval.ce_tokens", "256"]
    args = sweep_args(
        model,
        text_corpus,
        tmp_path,
        "tc",
        "--model.hook",
        "blocks.0.hook_mlp_in",
        "--sweep",
        "model.hook_out=" + ",".join(outs),
    )
    assert main([a for a in args if a not in ("--hook", "blocks.1.hook_resid_post", "--no-eval")] + evaluated) == 0
    summary = json.loads((tmp_path / "tc" / "sweep.json").read_text())
    assert summary["hooks"] == ["blocks.0.hook_mlp_in", *outs]  # one stream: the input once, both outputs
    out = outs[1]
    solo = sweep_args(
        model, text_corpus, tmp_path, "solo", "--model.hook", "blocks.0.hook_mlp_in", "--model.hook_out", out
    )
    assert main([a for a in solo if a not in ("--hook", "blocks.1.hook_resid_post", "--no-eval")] + evaluated) == 0
    swept, alone = tmp_path / "tc" / f"hook_out={out}" / "sae", tmp_path / "solo" / "sae"
    a, b = formats.load_sae(swept), formats.load_sae(alone)
    assert a.cfg.d_out == 64
    for name, t in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[name], t, rtol=0, atol=0, msg=name)
    ev_swept, ev_alone = (json.loads((d / "eval.json").read_text()) for d in (swept, alone))
    for key in ("explained_variance", "ce_score"):
        assert ev_swept[key] == pytest.approx(ev_alone[key], rel=1e-6), key
