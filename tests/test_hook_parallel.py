"""Sweeps over torch.distributed (gloo, 2 CPU processes, launched as users launch them): hook-parallel and data-parallel.

Reference: the same sweep in one process. Tolerance: relative Frobenius difference of each weight
1e-5 for both modes. Hook-parallel trainers see the one-process batches' columns exactly (only the
LM runs on other window batches; measured 0.0 here); data-parallel adds float rounding of the
gradient all-reduce and global-batch statistics (measured ~1e-7). Float32 tolerances: the module sets
SAEFORGE_BF16_FAST=0, so `auto` is float32 in this process and in the torchrun workers (they inherit it).
"""

from __future__ import annotations

import json
import shutil
import signal
import time

import pytest
import torch
from test_distributed import finish, kill_tree, rel_diff, torchrun

from saeforge.cli import main

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
POINTS = [f"hook={h}" for h in HOOKS]
STEPS = 64  # 16384 tokens / 256


@pytest.fixture(scope="module", autouse=True)
def float32_auto():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAEFORGE_BF16_FAST", "0")
        yield


def sweep_args(model, corpus, out, name, *extra):
    return [
        str(a)
        for a in [
            "train",
            "--model",
            model,
            "--corpus",
            corpus,
            "--data.context_size",
            64,
            "--data.holdout_fraction",
            0.2,
            "--tokens",
            16384,
            "--activations.batch_size",
            256,
            "--activations.shuffle_sequences",
            32,
            "--sae.d_sae",
            256,
            "--sae.k",
            8,
            "--train.checkpoint_every_steps",
            8,
            "--train.log_every_steps",
            8,
            "--train.dead_after_tokens",
            1024,
            "--train.out_dir",
            out,
            "--name",
            name,
            "--no-eval",
            "--quiet",
            "--sweep",
            "model.hook=" + ",".join(HOOKS),
            *extra,
        ]
    ]


def weights(sweep, point):
    from safetensors.torch import load_file

    return load_file(sweep / point / "sae" / "sae_weights.safetensors")


def assert_same_sweep(got, want, tol):
    for point in POINTS:
        diff = rel_diff(weights(want, point), weights(got, point))
        assert max(diff.values()) <= tol, (point, diff)
        a, b = (torch.load(s / point / "checkpoint.pt", weights_only=True) for s in (got, want))
        assert a["step"] == b["step"] == STEPS
        assert torch.equal(a["tokens_since_fired"], b["tokens_since_fired"])  # the same dead latents
        steps = [json.loads(ln)["step"] for ln in (got / point / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(8, STEPS + 1, 8))  # one writer per point, nothing logged twice


@pytest.fixture(scope="module")
def one_process(tiny_model_dirs, text_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    assert main(sweep_args(tiny_model_dirs["llama"], text_corpus, out, "sw")) == 0
    return out / "sw"


def test_hook_parallel_sweep_sends_each_rank_only_its_hook_and_equals_one_process(
    one_process, tiny_model_dirs, text_corpus, tmp_path
):
    args = sweep_args(tiny_model_dirs["llama"], text_corpus, tmp_path, "sw", "--train.parallel", "hooks")
    finish(torchrun("-m", "saeforge.cli", *args))
    assert_same_sweep(tmp_path / "sw", one_process, tol=1e-5)
    summary = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert summary["parallel"] == "hooks" and [r["rank"] for r in summary["points"]] == [0, 1]
    r0, r1 = summary["ranks"]
    # each rank got one SAE and, from the all_to_all, rows of exactly one hook's width (64), never both (128)
    assert (r0["points"], r0["hooks"], r0["received_widths"]) == ([POINTS[0]], [HOOKS[0]], [64])
    assert (r1["points"], r1["hooks"], r1["received_widths"]) == ([POINTS[1]], [HOOKS[1]], [64])
    one = json.loads((one_process / "sweep.json").read_text())["ranks"][0]
    assert one["row_width"] == 128  # one process reads both hooks' columns


def test_killed_hook_parallel_sweep_resumes_to_the_one_process_saes(
    one_process, tiny_model_dirs, text_corpus, tmp_path
):
    args = sweep_args(tiny_model_dirs["llama"], text_corpus, tmp_path, "cut", "--train.parallel", "hooks")
    proc = torchrun("-m", "saeforge.cli", *args)
    position = tmp_path / "cut" / "stream.pt"
    deadline = time.time() + 120
    while not position.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    kill_tree(proc.pid)  # the launcher and both ranks
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed: make it longer"
    step = torch.load(position, weights_only=True)["step"]
    assert 0 < step < STEPS and not (tmp_path / "cut" / "sweep.json").exists()

    shutil.copytree(tmp_path / "cut", tmp_path / "cut1")
    finish(torchrun("-m", "saeforge.cli", *args, "--resume", tmp_path / "cut"))  # hook-parallel again
    assert_same_sweep(tmp_path / "cut", one_process, tol=1e-5)
    # or in one process: the position's carried rows are stored per hook, not per rank
    assert (
        main(
            ["train", "--sweep", "model.hook=" + ",".join(HOOKS), "--resume", tmp_path / "cut1", "--no-eval", "--quiet"]
        )
        == 0
    )
    assert_same_sweep(tmp_path / "cut1", one_process, tol=1e-5)


def test_data_parallel_sweep_equals_one_process(one_process, tiny_model_dirs, text_corpus, tmp_path):
    # --nproc 2 runs torchrun --standalone for the user; with 2 points and 2 ranks auto would pick hooks
    cmd = sweep_args(tiny_model_dirs["llama"], text_corpus, tmp_path, "sw", "--train.parallel", "data", "--nproc", 2)
    assert main(cmd) == 0
    assert_same_sweep(tmp_path / "sw", one_process, tol=1e-5)
    summary = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert summary["parallel"] == "data" and [r["points"] for r in summary["ranks"]] == [POINTS, POINTS]


def test_points_are_balanced_over_ranks_by_size():
    from saeforge.training.sweep_run import assign_points, parallel_mode

    assert assign_points([64, 64], 2) == [0, 1]
    assert assign_points([10, 40, 20, 20, 10], 2) == [0, 0, 1, 1, 1]  # 40+10 vs 20+20+10
    assert assign_points([5], 3) == [0]
    assert parallel_mode("auto", 4, type("C", (), {"world": 2})()) == "hooks"
    assert parallel_mode("auto", 1, type("C", (), {"world": 2})()) == "data"
    assert parallel_mode("hooks", 1, None) == "single"
