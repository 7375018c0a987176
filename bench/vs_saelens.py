"""saeforge vs SAELens, side by side in one run, on the same model folder, corpus and config.

For each tool: end-to-end training tokens/s (LM + SAE, live activations), peak RSS, and quality from
one shared evaluation (saeforge's evaluate() on python-stdlib's held-out documents: explained
variance, CE score, L0). saeforge is also timed training from an activation cache.

Both train TopK k=32, 4608 latents, on the SmolLM2-135M residual after layer 3 (saeforge:
blocks.3.hook_resid_post; SAELens: model.layers.3 through AutoModelForCausalLM), batch 4096 tokens,
context 128, BOS/special tokens excluded, input normalisation to E||x|| = sqrt(d_in), and the same
dtype (bf16 only where it is fast: this script uses saeforge's rule for both tools).

SAELens runs in its own venv (.bench/saelens-venv, created here with torch pinned; ~2 GB, ~1 min).

    python bench/vs_saelens.py [--tokens 1000000] [--repeats 1] [--eval-tokens 65536] [--ce-tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".bench"
VENV = WORK / "saelens-venv"
SAELENS_VERSION = "6.54.12"
HOOK = "blocks.3.hook_resid_post"
ENV = {
    **os.environ,
    "WANDB_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

SAELENS_SCRIPT = """
import json, sys, time, torch
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig, TopKTrainingSAEConfig
a = json.loads(sys.argv[1])
cfg = LanguageModelSAERunnerConfig(
    sae=TopKTrainingSAEConfig(d_in=576, d_sae=4608, k=32, normalize_activations="expected_average_only_in",
                              dtype="float32", device="cpu"),
    model_class_name="AutoModelForCausalLM", model_name=a["model"], hook_name="model.layers.3",
    dataset_path=a["corpus_dir"], streaming=False, is_dataset_tokenized=False, context_size=128,
    training_tokens=a["tokens"], train_batch_size_tokens=4096, store_batch_size_prompts=8, n_batches_in_buffer=32,
    n_batches_for_norm_estimate=8, exclude_special_tokens=True, prepend_bos=True,
    autocast=a["bf16"], autocast_lm=a["bf16"], lr=4e-4, device="cpu", seed=0,
    logger=LoggingConfig(log_to_wandb=False), output_path=a["out"], checkpoint_path=a["out"] + "/ckpt",
    n_checkpoints=0, verbose=False)
runner = LanguageModelSAETrainingRunner(cfg)
t = time.perf_counter()
runner.run()
print("SAELENS_RESULT " + json.dumps({"train_seconds": time.perf_counter() - t}))
"""


def ensure_saelens() -> Path:
    py = VENV / "bin" / "python"
    if not (py.exists() and subprocess.run([str(py), "-c", "import sae_lens"], capture_output=True).returncode == 0):
        print("creating the SAELens venv (torch pinned by constraints.txt) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [
                str(py),
                "-m",
                "pip",
                "install",
                "-q",
                "-c",
                str(ROOT / "constraints.txt"),
                "torch==2.13.0",
                f"sae-lens=={SAELENS_VERSION}",
            ],
            check=True,
        )
    return py


def timed_run(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd``; return (wall seconds, peak RSS in GiB, stdout) using GNU time for the RSS."""
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd], capture_output=True, text=True, env=ENV)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]}... failed:\n{proc.stderr[-4000:]}")
    rss_kb = int(next(ln for ln in proc.stderr.splitlines() if ln.startswith("MAXRSS_KB")).split()[1])
    return wall, rss_kb / 2**20, proc.stdout


def prepare_inputs() -> tuple[Path, Path]:
    """The converted SmolLM2 folder both tools load, and python-stdlib's train documents as jsonl."""
    from saeforge.config import DataConfig
    from saeforge.data import iter_documents, split_documents
    from saeforge.models.bundled import ensure_cached

    model_dir = Path(ensure_cached("smollm2-135m"))
    corpus_dir = WORK / "corpus"
    if not (corpus_dir / "train.jsonl").exists():
        corpus_dir.mkdir(parents=True, exist_ok=True)
        cfg = DataConfig()
        with open(corpus_dir / "train.jsonl.tmp", "w") as fh:
            for doc in split_documents(iter_documents(cfg), cfg, "train"):
                fh.write(json.dumps({"text": doc.text}) + "\n")
        os.replace(corpus_dir / "train.jsonl.tmp", corpus_dir / "train.jsonl")
    return model_dir, corpus_dir


def run_saelens(py: Path, model_dir: Path, corpus_dir: Path, tokens: int, out: Path, bf16: bool) -> dict:
    script = WORK / "run_saelens.py"
    script.write_text(SAELENS_SCRIPT)
    args = {"model": str(model_dir), "corpus_dir": str(corpus_dir), "tokens": tokens, "out": str(out), "bf16": bf16}
    wall, rss, stdout = timed_run([str(py), str(script), json.dumps(args)])
    res = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("SAELENS_RESULT")).split(" ", 1)[1])
    return {"tool": "SAELens", "tok_s": tokens / res["train_seconds"], "wall_s": wall, "rss_gib": rss, "sae": out}


def run_saeforge(model_dir: Path, corpus_dir: Path, tokens: int, out: Path, cache: Path | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # a previous bench run's folder: saeforge refuses to overwrite a run
    cmd = [
        sys.executable,
        "-m",
        "saeforge.cli",
        "train",
        "--model",
        str(model_dir),
        "--hook",
        HOOK,
        "--corpus",
        str(corpus_dir / "train.jsonl"),
        "--data.holdout_fraction",
        "1e-9",
        "--tokens",
        str(tokens),
        "--train.out_dir",
        str(out.parent),
        "--name",
        out.name,
        "--no-eval",
        "--quiet",
    ]
    if cache is not None:
        cmd += ["--activations.cache", str(cache)]
    wall, rss, _ = timed_run(cmd)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    label = "saeforge (from cache)" if cache else "saeforge"
    return {"tool": label, "tok_s": last["tokens_per_s"], "wall_s": wall, "rss_gib": rss, "sae": out / "sae"}


def shared_eval(rows: list[dict], model_dir: Path, eval_tokens: int, ce_tokens: int) -> None:
    """One evaluation for every SAE: same held-out python-stdlib tokens, same code."""
    from saeforge.config import DataConfig, EvalConfig
    from saeforge.evals.report import evaluate
    from saeforge.models import load_model, resolve_hook
    from saeforge.saes.interop import load_foreign

    lm = load_model(str(model_dir), dtype="float32")
    hp = resolve_hook(lm, HOOK)
    data, ev = DataConfig(), EvalConfig(tokens=eval_tokens, ce_tokens=ce_tokens, mean_ablation=False)
    for row in rows:
        m = evaluate(lm, hp, load_foreign(row["sae"]), data, ev, progress=False)
        row.update(ev=m["explained_variance"], ce_score=m["ce_score"], l0=m["l0"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=1, help="alternate the tools this many times")
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--ce-tokens", type=int, default=8192)
    args = ap.parse_args()

    import torch

    from saeforge.models.loading import bf16_is_fast

    bf16 = bf16_is_fast(torch.device("cpu"))
    py = ensure_saelens()
    model_dir, corpus_dir = prepare_inputs()
    # the LM-forward ceiling (bench/ceiling.py), eager and compiled as saeforge runs it from 500k tokens, measured
    # right before and right after each live saeforge run: this VM's speed drifts by tens of percent within an hour
    sys.path.insert(0, str(ROOT / "bench"))
    from ceiling import lm_ceiling

    lm_dtype = "bfloat16" if bf16 else "float32"
    ceilings: list[tuple[float, float]] = []
    rows: list[dict] = []
    for r in range(args.repeats):
        rows.append(run_saelens(py, model_dir, corpus_dir, args.tokens, WORK / f"saelens-{r}", bf16))
        ceilings.append(lm_ceiling(str(model_dir), HOOK, lm_dtype, compile_too=True)[:2])
        rows.append(run_saeforge(model_dir, corpus_dir, args.tokens, WORK / "runs" / f"live-{r}"))
        ceilings.append(lm_ceiling(str(model_dir), HOOK, lm_dtype, compile_too=True)[:2])
        print(
            f"repeat {r}: SAELens {rows[-2]['tok_s']:,.0f} tok/s, saeforge {rows[-1]['tok_s']:,.0f} tok/s; LM ceiling "
            f"before/after it {ceilings[-2][0]:,.0f}/{ceilings[-1][0]:,.0f} eager, "
            f"{ceilings[-2][1]:,.0f}/{ceilings[-1][1]:,.0f} compiled",
            flush=True,
        )
    cache = WORK / "cache"
    t = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "saeforge.cli",
            "cache",
            "--out",
            str(cache),
            "--tokens",
            str(args.tokens),
            "--model",
            str(model_dir),
            "--hook",
            HOOK,
            "--corpus",
            str(corpus_dir / "train.jsonl"),
            "--data.holdout_fraction",
            "1e-9",
            "--quiet",
        ],
        check=True,
        env=ENV,
    )
    cache_s = time.perf_counter() - t
    rows.append(run_saeforge(model_dir, corpus_dir, args.tokens, WORK / "runs" / "from-cache", cache=cache))
    shared_eval(rows, model_dir, args.eval_tokens, args.ce_tokens)
    lm_eager = sum(c[0] for c in ceilings) / len(ceilings)
    lm_compiled = sum(c[1] for c in ceilings) / len(ceilings)

    base = sum(r["tok_s"] for r in rows if r["tool"] == "SAELens") / args.repeats
    print(
        f"\n{args.tokens:,} training tokens, TopK k=32, 4608 latents, {'bf16' if bf16 else 'float32'}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs; cache written in {cache_s:.0f} s"
    )
    print(
        f"{'tool':<24}{'tok/s':>9}{'x SAELens':>11}{'wall s':>8}{'peak RSS GiB':>14}{'EV':>8}{'CE score':>10}{'L0':>7}"
    )
    for r in rows:
        print(
            f"{r['tool']:<24}{r['tok_s']:>9,.0f}{r['tok_s'] / base:>11.2f}{r['wall_s']:>8.0f}{r['rss_gib']:>14.2f}"
            f"{r['ev']:>8.4f}{r['ce_score']:>10.4f}{r['l0']:>7.1f}"
        )
    live = sum(r["tok_s"] for r in rows if r["tool"] == "saeforge") / args.repeats
    print(
        f"LM forward to the hook alone (mean of the measurements around the live runs): {lm_eager:,.0f} tok/s eager, "
        f"{lm_compiled:,.0f} compiled; saeforge end to end "
        f"(live) is {live / lm_eager:.2f} of the eager and {live / lm_compiled:.2f} of the compiled ceiling"
    )


if __name__ == "__main__":
    main()
