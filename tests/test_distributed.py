"""Data-parallel training and parallel caching over real torch.distributed (gloo, 2 CPU processes).

Runs are launched as users launch them (torchrun --standalone, or `saeforge train` for one
process) on the tiny llama; a killed run is killed with SIGKILL on its whole process group.
Tolerances (relative Frobenius norm of each weight's difference vs the one-process run), 1e-5 for
every architecture, measured ~1e-7: ReLU + L1 (loss = mean over rows) by construction; TopK,
BatchTopK and Matryoshka because their FVU/AuxK denominators and BatchTopK's selection are the
global batch's (LossContext.ranks). Ranks agree with each other bit for bit (tests/dp_worker.py).
These are float32 tolerances: the module sets SAEFORGE_BF16_FAST=0, so `auto` (LM dtype, autocast) is
float32 here and in the torchrun workers, which inherit the environment, on any CPU. The bf16 path has
its own tests (tests/test_distributed_bf16.py).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

HOOK = "blocks.1.hook_resid_post"
B = 256  # global batch
TOKENS = 16384  # 64 steps


@pytest.fixture(scope="module", autouse=True)
def float32_auto():
    """auto = float32 for this module: in this process and in every subprocess it starts (they inherit os.environ)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAEFORGE_BF16_FAST", "0")
        yield


def torchrun(*args, nproc=2, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def finish(proc) -> str:
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    return out


def train_args(model, corpus, out, name, arch):
    sae = ["--arch", "relu", "--sae.l1_coefficient", 3] if arch == "relu" else ["--sae.k", 8]
    return [
        "train",
        "--model",
        model,
        "--hook",
        HOOK,
        "--corpus",
        corpus,
        "--data.context_size",
        64,
        "--data.holdout_fraction",
        0.2,
        "--tokens",
        TOKENS,
        "--activations.batch_size",
        B,
        "--activations.shuffle_sequences",
        32,
        "--sae.d_sae",
        512,
        *sae,
        "--train.dead_after_tokens",
        1024,
        "--train.checkpoint_every_steps",
        8,
        "--train.log_every_steps",
        8,
        "--train.out_dir",
        out,
        "--name",
        name,
        "--no-eval",
        "--quiet",
    ]


def one_process(model, corpus, out, name, arch):
    from saeforge.cli import main

    assert "WORLD_SIZE" not in os.environ  # the default path: no process group
    assert main(train_args(model, corpus, out, name, arch)) == 0
    return out / name


def two_processes(model, corpus, out, name, arch):
    finish(torchrun("-m", "saeforge.cli", *train_args(model, corpus, out, name, arch)))
    return out / name


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and its workers (torchrun starts each worker in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def rel_diff(a: dict, b: dict) -> dict:
    assert a.keys() == b.keys()
    return {k: float((a[k] - b[k]).norm() / a[k].norm()) for k in a}


def weights(run: Path) -> dict:
    return load_file(run / "sae" / "sae_weights.safetensors")


def state(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)


@pytest.fixture(scope="module")
def relu_runs(tiny_model_dirs, text_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    model = tiny_model_dirs["llama"]
    return one_process(model, text_corpus, out, "one", "relu"), two_processes(model, text_corpus, out, "two", "relu")


def test_two_processes_train_the_one_process_sae(relu_runs):
    one, two = relu_runs
    diff = rel_diff(weights(one), weights(two))
    assert max(diff.values()) < 1e-5, diff
    s1, s2 = state(one), state(two)
    assert s1["step"] == s2["step"] == TOKENS // B
    assert s2["scale"] == pytest.approx(s1["scale"], rel=1e-12)
    # The checkpoint holds the global batcher position, so it is the same whatever the process count.
    assert s1["source"].keys() == s2["source"].keys()
    for k in s1["source"]:  # chunk, batch_in_chunk and (mid-chunk) the carried rows
        assert torch.equal(torch.as_tensor(s1["source"][k]), torch.as_tensor(s2["source"][k])), k
    # Firing counts are summed over ranks: every late row is counted once (not once per rank, not half).
    assert s1["late_tokens"] == s2["late_tokens"] > 0
    assert torch.equal(s1["tokens_since_fired"], s2["tokens_since_fired"])
    # A ReLU latent may flip on a near-zero pre-activation under float rounding: allow a handful of firings.
    late = (s1["late_fired"] - s2["late_fired"]).abs()
    assert int(late.max()) <= 2 and int((late > 0).sum()) <= 5, late.nonzero()
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(8, TOKENS // B + 1, 8))  # rank 0 logs alone
    # rank 0 logs the global batch's explained variance and L0, not its own half's
    logged = [[json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    for r1, r2 in zip(*logged):
        assert r2["explained_variance"] == pytest.approx(r1["explained_variance"], rel=1e-5, abs=1e-6)
        assert r2["l0"] == pytest.approx(r1["l0"], rel=1e-5)


BATCH_STATS = ("topk", "batchtopk", "matryoshka")  # losses that use statistics of the whole batch


@pytest.fixture(scope="module")
def batch_stat_runs(tiny_model_dirs, text_corpus, tmp_path_factory):
    """Each architecture trained by 2 ranks (every rank's final state) and by one process."""
    from dp_worker import train_one

    from saeforge.models import load_model

    out = tmp_path_factory.mktemp("dp")
    model, corpus = str(tiny_model_dirs["llama"]), str(text_corpus)
    finish(torchrun(Path(__file__).with_name("dp_worker.py"), out, model, corpus, *BATCH_STATS))
    lm = load_model(model, dtype="auto", device="cpu")
    return {
        arch: (
            train_one(lm, model, corpus, arch),
            [torch.load(out / f"{arch}-rank{r}.pt", weights_only=True) for r in (0, 1)],
        )
        for arch in BATCH_STATS
    }


@pytest.mark.parametrize("arch", BATCH_STATS)
def test_batch_statistics_are_global_so_two_processes_train_the_one_process_sae(batch_stat_runs, arch):
    one, (r0, r1) = batch_stat_runs[arch]
    assert (one["lm_dtype"], one["autocast"]) == (r0["lm_dtype"], r0["autocast"]) == ("float32", False)
    # every rank holds the same SAE, bit for bit: same averaged gradients, same global threshold statistic
    for name, t in r0["sae"].items():
        assert torch.equal(t, r1["sae"][name]), name
    for key in ("late_fired", "tokens_since_fired"):
        assert torch.equal(r0[key], r1[key]), key
    # and it is the one-process SAE up to float rounding (FVU/AuxK over the global batch's variance,
    # BatchTopK's B * k over the global batch): measured ~1e-7 for all three
    weights = {k: v for k, v in one["sae"].items() if k != "threshold_updates"}
    diff = rel_diff(weights, {k: r0["sae"][k] for k in weights})
    assert max(diff.values()) < 1e-5, diff
    assert r0["step"] == one["step"] == TOKENS // B
    if arch != "topk":  # the inference threshold: same number of EMA updates, same value
        assert int(r0["sae"]["threshold_updates"]) == int(one["sae"]["threshold_updates"]) == TOKENS // B
        assert float(r0["sae"]["threshold"]) > 0
        assert float(r0["sae"]["threshold"]) == pytest.approx(float(one["sae"]["threshold"]), rel=1e-5)
    # dead-latent statistics: the same dead set (some latents are dead, so AuxK matters) and firing counts
    dead1 = one["tokens_since_fired"] >= 1024
    assert 0 < int(dead1.sum()) < 512
    assert torch.equal(one["tokens_since_fired"], r0["tokens_since_fired"])
    assert int((one["late_fired"] - r0["late_fired"]).abs().sum()) <= 2, (
        one["late_fired"] - r0["late_fired"]
    ).nonzero()


def test_killed_two_process_run_resumes_with_one(relu_runs, tiny_model_dirs, text_corpus, tmp_path):
    _, two = relu_runs
    proc = torchrun("-m", "saeforge.cli", *train_args(tiny_model_dirs["llama"], text_corpus, tmp_path, "cut", "relu"))
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    kill_tree(proc.pid)  # the launcher and both workers, as when the machine dies
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed: make it longer"
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < step < TOKENS // B and not (tmp_path / "cut" / "sae").exists()

    from saeforge.cli import main

    assert main(["train", "--resume", tmp_path / "cut", "--no-eval", "--quiet"]) == 0
    diff = rel_diff(weights(two), weights(tmp_path / "cut"))
    assert max(diff.values()) < 1e-5, diff
    assert torch.equal(state(two)["tokens_since_fired"], state(tmp_path / "cut")["tokens_since_fired"])
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(8, TOKENS // B + 1, 8))


def test_two_process_cache_reads_back_whole_in_one_process(tiny_model_dirs, text_corpus, tmp_path):
    from saeforge.activations import CacheReader, write_cache
    from saeforge.config import ActivationsConfig, DataConfig
    from saeforge.models import load_model, resolve_hook

    model = tiny_model_dirs["llama"]
    common = [
        "--model",
        model,
        "--hook",
        HOOK,
        "--corpus",
        text_corpus,
        "--data.context_size",
        64,
        "--data.holdout_fraction",
        0.2,
        "--activations.shard_rows",
        1500,
        "--quiet",
    ]
    # `--nproc 2` re-runs the command under torchrun --standalone (what a user types)
    cmd = [
        sys.executable,
        "-m",
        "saeforge.cli",
        "cache",
        "--nproc",
        2,
        "--out",
        tmp_path / "par",
        "--tokens",
        6000,
        *common,
    ]
    out = finish(subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    assert out.count("cache ") == 1  # rank 0 reports
    lm = load_model(str(model), device="cpu")
    hook = resolve_hook(lm.model, HOOK)
    data = DataConfig(corpus=str(text_corpus), context_size=64, holdout_fraction=0.2)
    write_cache(lm, hook, data, ActivationsConfig(shard_rows=1500), tmp_path / "one", 6000, progress=False)

    par, one = CacheReader(tmp_path / "par", 512), CacheReader(tmp_path / "one", 512)
    m = par.manifest
    assert (
        m["complete"] and m["parts"] == 2 and {s["file"].split("/")[0] for s in m["shards"]} == {"part-000", "part-001"}
    )
    assert par.n_rows == one.n_rows >= 6000

    def rows(reader):
        shards = [reader.load_shard(i) for i in range(len(reader.manifest["shards"]))]
        return {k: torch.cat([s[k] for s in shards]) for k in ("acts", "window", "position", "token")}

    a, b = rows(par), rows(one)
    keys = a["window"] * 64 + a["position"]
    assert len(set(keys.tolist())) == len(keys)  # no row twice
    assert torch.equal(a["window"], b["window"]) and torch.equal(a["position"], b["position"])  # none lost, same order
    assert torch.equal(a["token"], b["token"])
    torch.testing.assert_close(a["acts"], b["acts"], rtol=1e-5, atol=1e-5)
    first = next(iter(par))  # and it trains from it: a shuffled batch of rows of the first shard
    assert first.shape == (512, 64) and first.dtype == torch.float32
