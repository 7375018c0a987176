"""Every architecture on the same toy superposition data: MMCS vs the true features, L0, EV, time.

    python bench/toy_table.py                      # SPECS toy data: d 256, 512 features, width 512
    python bench/toy_table.py --tokens 4e6 --correlated --threads 1

Sparsity settings are saeforge.toy.TOY_SAE_DEFAULTS; all architectures see the same batches.
"""

from __future__ import annotations

import argparse

import torch

from saeforge.config import TrainConfig
from saeforge.saes.registry import names
from saeforge.toy import ToyConfig, train_toy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=float, default=2e6)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--features", type=int, default=512)
    p.add_argument("--width", type=int, default=0, help="latents (0 = number of features)")
    p.add_argument("--correlated", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--arch", default=",".join(names()))
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    toy = ToyConfig(d=a.d, n_features=a.features, correlated=a.correlated)
    print(
        f"toy data: d={toy.d}, {toy.n_features} features, ~{toy.mean_active} active, "
        f"{'correlated' if toy.correlated else 'uncorrelated'}; {int(a.tokens):,} tokens, batch {a.batch_size}, "
        f"lr {a.lr}, {torch.get_num_threads()} threads"
    )
    print("| arch | MMCS | L0 | EV | seconds |\n|---|---|---|---|---|")
    for arch in a.arch.split(","):
        train = TrainConfig(total_tokens=int(a.tokens), lr=a.lr, lr_warmup_steps=20)
        r = train_toy(arch, toy, {}, train, d_sae=a.width, batch_size=a.batch_size)
        print(
            f"| {arch} | {r['mmcs']:.4f} | {r['l0']:.2f} | {r['explained_variance']:.4f} | {r['seconds']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
