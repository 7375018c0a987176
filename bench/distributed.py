"""Tokens/s of `saeforge train` with 1 vs N processes (torchrun, gloo on CPU / NCCL on GPU).

    .venv/bin/python bench/distributed.py [--tokens 65536] [--nproc 1 2] [--model smollm2-135m] [--mode data hooks]

data: one TopK SAE live from the LM (the hook in --hook), data-parallel, same global batch; reports
the trainer's own tokens/s (LM + SAE, load time excluded) and the wall time including start-up.
hooks: a sweep of one TopK SAE per hook in --hooks, from one stream; with N > 1 processes it runs
hook-parallel (train.parallel=hooks: each SAE on one rank, each rank sent only its hooks' columns);
reports stream tokens/s (tokens / the sweep's training seconds; every SAE sees every token).
On a 2-core CPU two processes share the same two cores (torchrun sets 1 thread each), so expect
no speed-up there: the point is that it runs, and what communication costs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(nproc: int, args, out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "saeforge.cli",
        "train",
        "--nproc",
        str(nproc),
        "--model",
        args.model,
        "--hook",
        args.hook,
        "--tokens",
        str(args.tokens),
        "--activations.batch_size",
        str(args.batch),
        "--activations.shuffle_sequences",
        "64",
        "--sae.d_sae",
        str(args.d_sae),
        "--train.log_every_steps",
        "1000000",
        "--train.out_dir",
        str(out),
        "--name",
        f"p{nproc}",
        "--no-eval",
        "--quiet",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    last = json.loads((out / f"p{nproc}" / "metrics.jsonl").read_text().splitlines()[-1])
    return {"nproc": nproc, "tokens_per_s": last["tokens_per_s"], "wall_s": wall, "loss": last["loss"]}


def run_hooks(nproc: int, args, out: Path) -> dict:
    name = f"h{nproc}"
    cmd = [
        sys.executable,
        "-m",
        "saeforge.cli",
        "train",
        "--nproc",
        str(nproc),
        "--model",
        args.model,
        "--tokens",
        str(args.tokens),
        "--activations.batch_size",
        str(args.batch),
        "--activations.shuffle_sequences",
        "64",
        "--sae.d_sae",
        str(args.d_sae),
        "--train.log_every_steps",
        "1000000",
        "--train.checkpoint_every_steps",
        "1000000",
        "--train.parallel",
        "hooks",
        "--train.out_dir",
        str(out),
        "--name",
        name,
        "--no-eval",
        "--quiet",
        "--sweep",
        "model.hook=" + ",".join(args.hooks),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    summary = json.loads((out / name / "sweep.json").read_text())
    widths = [r["row_width"] for r in summary["ranks"]]
    return {
        "nproc": nproc,
        "tokens_per_s": args.tokens / summary["sweep_seconds"],
        "wall_s": wall,
        "parallel": summary["parallel"],
        "widths": widths,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hook", default="blocks.3.hook_resid_post")
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d_sae", type=int, default=4608)
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--mode", nargs="+", choices=["data", "hooks"], default=["data", "hooks"])
    p.add_argument("--hooks", nargs="+", default=["blocks.2.hook_resid_post", "blocks.3.hook_resid_post"])
    args = p.parse_args()
    if "data" in args.mode:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [run(n, args, Path(tmp)) for n in args.nproc]
        print(
            f"data-parallel: {args.model} {args.hook}, {args.tokens} tokens, global batch {args.batch}, d_sae {args.d_sae}"
        )
        print("| processes | tokens/s (trainer) | wall s (incl. start-up) | final loss |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['nproc']} | {r['tokens_per_s']:,.0f} | {r['wall_s']:.1f} | {r['loss']:.4f} |")
    if "hooks" in args.mode:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [run_hooks(n, args, Path(tmp)) for n in args.nproc]
        print(
            f"hook-parallel sweep: {args.model} {', '.join(args.hooks)} (one TopK SAE each), {args.tokens} tokens, "
            f"global batch {args.batch}, d_sae {args.d_sae}"
        )
        print(
            "| processes | mode | stream tokens/s (every SAE sees each) | wall s (incl. start-up) | row width per rank |"
            "\n|---|---|---|---|---|"
        )
        for r in rows:
            print(f"| {r['nproc']} | {r['parallel']} | {r['tokens_per_s']:,.0f} | {r['wall_s']:.1f} | {r['widths']} |")


if __name__ == "__main__":
    main()
