"""This machine's ceilings for SAE training, and how close saeforge gets to them.

Prints, for the model and hook of the demo (SmolLM2-135M, blocks.3.hook_resid_post):
- matmul GFLOP/s in float32 and bfloat16 (an SAE encoder-sized product),
- the LM-forward ceiling: tokens/s of the forward pass stopped at the hook, in the dtype saeforge picks
  (eager; with --compile also through torch.compile, and the compile's time),
- the SAE-step ceiling: tokens/s of one TopK training step (forward, backward, Adam) on random data,
- saeforge's end-to-end training tokens/s over --tokens live tokens, and its ratio to both ceilings.

    python bench/ceiling.py [--tokens 262144] [--model smollm2-135m] [--hook blocks.3.hook_resid_post] [--compile]

The end-to-end run uses saeforge's defaults (activations.prefetch off; model.compile auto: eager below
500k live tokens on CPU). --prefetch-too adds a run with the prefetch thread, which overlaps the LM with
the SAE step (on 2 cores it measured slower: both are compute-bound on the same cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: first calls allocate and pick kernels
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def matmul_gflops(dtype: torch.dtype) -> float:
    a, b = torch.randn(4096, 576, dtype=dtype), torch.randn(576, 4608, dtype=dtype)
    return 2 * 4096 * 576 * 4608 / timed(lambda: a @ b, 5) / 1e9


def lm_ceiling(
    model: str, hook: str, dtype: str, compile_too: bool, seqs: int = 16, ctx: int = 128, batches: int = 4
) -> tuple[float, float | None, float | None, str]:
    """LM-forward tokens/s eager, and (with ``compile_too``) compiled plus the compile's seconds.

    Each timing runs ``batches`` LM batches of ``seqs`` x ``ctx`` tokens (saeforge's default LM batch);
    eager and compiled alternate 6 times and the medians are reported, so both see the same machine.
    """
    import statistics

    from saeforge.models import compiled, load_model, resolve_hook
    from saeforge.models.hooks import capture

    lm = load_model(model, dtype=dtype)
    hp = resolve_hook(lm, hook)
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(100, len(lm.tokenizer) - 100, (seqs, ctx), generator=g) for _ in range(batches)]

    def run() -> float:
        t = time.perf_counter()
        for tokens_ST in tokens:
            capture(lm, [hp], tokens_ST)
        return seqs * ctx * batches / (time.perf_counter() - t)

    run()  # warm-up
    dtype_name = str(lm.dtype).removeprefix("torch.")
    if not compile_too:
        return statistics.median(run() for _ in range(3)), None, None, dtype_name
    compiled.enable(lm)
    t = time.perf_counter()
    capture(lm, [hp], tokens[0])  # compiles (inductor's on-disk cache makes later runs' compiles short)
    compile_s = time.perf_counter() - t
    eager, fast = [], []
    for _ in range(6):
        with compiled.eager(lm):
            eager.append(run())
        fast.append(run())
    return statistics.median(eager), statistics.median(fast), compile_s, dtype_name


def sae_step_ceiling(d_in: int = 576, d_sae: int = 4608, batch: int = 4096) -> float:
    from saeforge.config import TrainConfig
    from saeforge.saes.registry import config_class, sae_class
    from saeforge.training.trainer import Trainer

    sae = sae_class("topk")(config_class("topk")(d_in=d_in, d_sae=d_sae, k=32))
    tr = Trainer(sae, TrainConfig(total_tokens=batch * 100), batch, None, progress=False)
    tr.scale = 1.0
    x_BD = torch.randn(batch, d_in) * 3
    return batch / timed(lambda: tr.train_step(x_BD), 8)


def end_to_end(model: str, hook: str, tokens: int, *extra: str) -> tuple[float, float]:
    """saeforge train over ``tokens`` live tokens: tokens/s of its training loop (LM forward included), and the
    share of that loop spent waiting for batches (metrics.jsonl's source_s / elapsed_s: the LM's part)."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "saeforge.cli",
                "train",
                "--model",
                model,
                "--hook",
                hook,
                "--tokens",
                str(tokens),
                "--train.out_dir",
                out,
                "--name",
                "ceiling",
                "--no-eval",
                "--quiet",
                *extra,
            ],
            check=True,
        )
        last = json.loads((Path(out) / "ceiling" / "metrics.jsonl").read_text().splitlines()[-1])
        return last["tokens_per_s"], last["source_s"] / last["elapsed_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hook", default="blocks.3.hook_resid_post")
    ap.add_argument("--tokens", type=int, default=262_144, help="live training tokens for the end-to-end figure")
    ap.add_argument("--compile", action="store_true", help="also time the compiled LM forward (models/compiled.py)")
    ap.add_argument(
        "--prefetch-too",
        action="store_true",
        help="also run end to end with --activations.prefetch true (the LM's next chunk in a background thread)",
    )
    args = ap.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = [
        ("matmul float32 (GFLOP/s)", matmul_gflops(torch.float32)),
        ("matmul bfloat16 (GFLOP/s)", matmul_gflops(torch.bfloat16)),
    ]
    lm_tok_s, lm_compiled_tok_s, compile_s, lm_dtype = lm_ceiling(args.model, args.hook, "auto", args.compile)
    rows.append((f"LM forward to {args.hook}, {lm_dtype}, eager (tok/s)", lm_tok_s))
    if lm_compiled_tok_s is not None:
        rows.append((f"LM forward, torch.compile (tok/s; compile took {compile_s:.0f} s)", lm_compiled_tok_s))
    step_tok_s = sae_step_ceiling()
    rows.append(("TopK SAE step, 4608 latents, batch 4096 (tok/s)", step_tok_s))
    # running both back to back bounds what one process can do without overlapping them
    serial = 1 / (1 / lm_tok_s + 1 / step_tok_s)
    rows.append(("LM + SAE step in series (tok/s)", serial))
    if args.prefetch_too:
        overlap_e2e, _ = end_to_end(args.model, args.hook, args.tokens, "--activations.prefetch", "true")
        rows.append((f"saeforge train, prefetch on, {args.tokens:,} tokens (tok/s)", overlap_e2e))
    e2e, lm_share = end_to_end(args.model, args.hook, args.tokens)
    rows.append((f"saeforge train, end to end, {args.tokens:,} tokens (tok/s)", e2e))
    rows.append(("  share of it spent waiting for the LM's activations", lm_share))
    rows += [
        ("  ratio to LM-forward ceiling (eager)", e2e / lm_tok_s),
        ("  ratio to LM + step in series", e2e / serial),
    ]
    if lm_compiled_tok_s is not None:
        rows.append(("  ratio to LM-forward ceiling (compiled)", e2e / lm_compiled_tok_s))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:>10,.2f}" if value < 10 else f"{name:<{width}}  {value:>10,.0f}")


if __name__ == "__main__":
    main()
