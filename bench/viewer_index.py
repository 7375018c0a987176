"""Feature-database build time on the bundled model and the demo SAE (not a test).

    python bench/viewer_index.py [--sae runs/demo-smollm2-topk/sae] [--tokens 100000] [--out /tmp/bench.db]

Reports the streaming phase (LM to the hook + SAE encode + accumulators) and the fixed write phase
(logit lens over the vocabulary, decoder neighbours, SQLite) separately, the accumulators' own cost on
synthetic latents of the same shape, peak RSS and file size, and extrapolates to 1M tokens as
stream_time * (1M / tokens) + write_time. Run it on an idle machine: the streaming phase scales with
the cores the LM gets.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch


def accumulator_cost(d_sae: int, k: int, n_passes: int = 8, S: int = 16, T: int = 128) -> float:
    """Seconds per token spent in FeatureStats.update alone (TopK-sparse random latents)."""
    from saeforge.viewer.stats import FeatureStats

    st = FeatureStats(d_sae, 16, 20, 24, 8, 64)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 49152, (S, T), generator=g)
    keep = torch.ones(S, T, dtype=torch.bool)
    keep[:, 0] = False
    batches = []
    for _ in range(n_passes):
        f = torch.zeros(S * T, d_sae)
        f.scatter_(
            1, torch.rand(S * T, d_sae, generator=g).topk(k, dim=1).indices, torch.rand(S * T, k, generator=g) * 5
        )
        batches.append(f.view(S, T, d_sae))
    st.update(tokens, batches[0], keep)  # warm-up
    t0 = time.perf_counter()
    for f in batches[1:]:
        st.update(tokens, f, keep)
    return (time.perf_counter() - t0) / ((n_passes - 1) * S * T)


def main() -> None:
    from saeforge.viewer.config import IndexConfig
    from saeforge.viewer.db import FeatureDB
    from saeforge.viewer.index import build_index

    ap = argparse.ArgumentParser()
    ap.add_argument("--sae", default="runs/demo-smollm2-topk/sae")
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--out", default="/tmp/saeforge-bench-viewer.db")
    args = ap.parse_args()

    out = Path(args.out)
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    build_index(args.sae, out, IndexConfig(tokens=args.tokens), progress=True, restart=True)
    total = time.perf_counter() - t0
    meta = FeatureDB(out).meta
    stream = meta["build_seconds"]
    write = total - stream  # includes model/SAE loading
    per_tok = accumulator_cost(meta["d_sae"], 32)
    n = meta["n_windows"] * meta["context_size"]
    print(f"threads {torch.get_num_threads()}  model dtype {meta['model_dtype']}  d_sae {meta['d_sae']}  tokens {n}")
    print(f"stream phase  {stream:8.1f} s  ({n / stream:,.0f} tok/s: LM to {meta['hook']} + SAE encode + accumulators)")
    print(f"write phase   {write:8.1f} s  (model load, logit lens, neighbours, SQLite; independent of tokens)")
    print(f"accumulators  {per_tok * 1e6:8.1f} us/token on synthetic TopK-32 latents ({1 / per_tok:,.0f} tok/s alone)")
    print(
        f"peak RSS      {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:8.0f} MiB   "
        f"database {out.stat().st_size / 2**20:.1f} MiB"
    )
    print(f"extrapolated 1M tokens: {stream * 1e6 / n + write:,.0f} s")


if __name__ == "__main__":
    main()
