"""A sweep of 4 SAEs from one activation stream vs 4 separate runs, same configs, same tokens.

    python bench/sweep.py                          # live from smollm2-135m (the LM pass is what a sweep shares)
    python bench/sweep.py --cache /tmp/cache_l3    # from an activation cache (only reading is shared)

Prints wall time of each and the ratio. Training only (no eval); the model is loaded once for both.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from saeforge.models import load_model
from saeforge.training.run import train
from saeforge.training.sweep import parse_sweep, point_configs, train_sweep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--d-sae", type=int, default=2304)
    p.add_argument("--sweep", default="sae.k=16,32,48,64")
    p.add_argument("--cache", default="")
    a = p.parse_args()
    out = tempfile.mkdtemp(prefix="sweep-bench-")
    base = {
        "model": {"name": "smollm2-135m", "hook": "blocks.3.hook_resid_post"},
        "activations": {"batch_size": 4096, "cache": a.cache},
        "sae": {"architecture": "topk", "d_sae": a.d_sae},
        "train": {"total_tokens": a.tokens, "out_dir": out, "checkpoint_every_steps": 10**6},
    }
    lm = load_model("smollm2-135m", dtype="auto")
    points = parse_sweep([a.sweep])
    t0 = time.perf_counter()
    train_sweep(
        {**base, "train": {**base["train"], "run_name": "sweep"}}, points, evaluate=False, progress=False, lm=lm
    )
    t_sweep = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i, cfg in enumerate(point_configs(base, points)):
        cfg.train.run_name = f"solo{i}"
        train(cfg, evaluate=False, progress=False, lm=lm)
    t_solo = time.perf_counter() - t0
    src = f"cache {a.cache}" if a.cache else "live LM"
    print(f"{len(points)} TopK SAEs x {a.tokens:,} tokens, d_sae {a.d_sae}, {src}")
    print("| setup | seconds | tokens/s per SAE |\n|---|---|---|")
    print(f"| one sweep | {t_sweep:.1f} | {len(points) * a.tokens / t_sweep:,.0f} |")
    print(f"| {len(points)} separate runs | {t_solo:.1f} | {len(points) * a.tokens / t_solo:,.0f} |")
    print(f"sweep / separate = {t_sweep / t_solo:.2f}")


if __name__ == "__main__":
    main()
