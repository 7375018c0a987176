"""Time the dictionary map that `saeforge index` computes (not a test).

    python bench/viewer_map.py SAE_DIR [--clusters 16] [--seed 0]

From the SAE's decoder alone: the PCA layout, the UMAP layout twice (the first call includes numba's
compilation, which a long-lived process pays once), and scipy's average-linkage clustering; each one's wall
time, and the process's peak RSS at the end.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

from saeforge.saes.formats import load_sae
from saeforge.viewer.dmap import cluster, layout


def timed(label: str, fn) -> None:
    t0 = time.perf_counter()
    fn()
    print(f"{label}: {time.perf_counter() - t0:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sae_dir")
    ap.add_argument("--clusters", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    W_dec_FD = load_sae(args.sae_dir).W_dec.detach().float()
    print(f"{W_dec_FD.shape[0]} features x {W_dec_FD.shape[1]} dims")
    timed("PCA layout", lambda: layout(W_dec_FD, "pca", args.seed))
    timed("UMAP layout, first call (with numba compilation)", lambda: layout(W_dec_FD, "umap", args.seed))
    timed("UMAP layout, second call", lambda: layout(W_dec_FD, "umap", args.seed))
    timed(f"clustering into {args.clusters} (average linkage, cosine)", lambda: cluster(W_dec_FD, args.clusters))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"peak RSS {peak_gb:.2f} GiB; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
