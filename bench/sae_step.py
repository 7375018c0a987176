"""Tokens/s of one SAE training step (forward + backward + Adam) for each architecture and precision.

    .venv/bin/python bench/sae_step.py [--batch 4096 --d-in 576 --d-sae 4608 --steps 8]

Measures relu and topk (dense reference, embedding_bag decode, and embedding_bag plus the sparse
encoder gradient), fp32 and bf16 autocast (bf16 only pays on CPUs with avx512_bf16/AMX),
on random inputs scaled like normalised activations. The step is what the trainer does:
zero_grad, training_loss, backward, remove_parallel_grads, Adam step, after_step.
Fresh large allocations are slow on this machine (page faults), so the script re-executes
itself once with glibc's malloc tuned to keep freed memory (see docs/MEASURED); pass
--no-malloc-tune to measure the default allocator. CPU benchmarks share the cores with
whatever else runs: report the load alongside the numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

TUNE = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per setup (after 2 warm-up steps)")
    ap.add_argument("--dead-fraction", type=float, default=0.0, help="fraction of latents marked dead (exercises AuxK)")
    ap.add_argument("--precision", choices=["both", "fp32", "bf16"], default="both")
    ap.add_argument("--no-malloc-tune", action="store_true")
    args = ap.parse_args()
    if not args.no_malloc_tune and os.environ.get("GLIBC_TUNABLES") != TUNE:
        os.environ["GLIBC_TUNABLES"] = TUNE
        os.execv(sys.executable, [sys.executable, *sys.argv])

    import torch

    from saeforge.saes import LossContext
    from saeforge.saes.relu import ReLUConfig, ReLUSAE
    from saeforge.saes.topk import TopKConfig, TopKSAE

    torch.manual_seed(0)
    B, D, F = args.batch, args.d_in, args.d_sae
    x_BD = torch.randn(B, D) + 0.5  # E||x|| ~ sqrt(D), with a mean offset like residual streams
    dead_F = torch.rand(F) < args.dead_fraction
    ctx = LossContext(dead_mask_F=dead_F if dead_F.any() else None)
    def topk(sparse_decode: bool, sparse_grad: bool):
        cfg = TopKConfig(d_in=D, d_sae=F, k=args.k, sparse_decode=sparse_decode, sparse_encoder_grad=sparse_grad)
        return lambda: TopKSAE(cfg)

    setups = [
        ("relu", lambda: ReLUSAE(ReLUConfig(d_in=D, d_sae=F))),
        ("topk dense reference", topk(False, False)),
        ("topk embedding_bag", topk(True, False)),
        ("topk eb + sparse grad", topk(True, True)),
    ]
    bf16_hw = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {B}, d_in {D}, d_sae {F}, k {args.k}, "
          f"dead {int(dead_F.sum())}, malloc tuned: {os.environ.get('GLIBC_TUNABLES') == TUNE}, "
          f"load avg {os.getloadavg()[0]:.2f}, bf16 matmul hardware: {bf16_hw}")
    precisions = {"both": (False, True), "fp32": (False,), "bf16": (True,)}[args.precision]
    print(f"{'setup':<22}" + "".join(f" {'bf16' if p else 'fp32'} tok/s" for p in precisions))
    for name, make in setups:
        row = []
        for bf16 in precisions:
            sae = make()
            opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
            times = []
            for i in range(args.steps + 2):
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = sae.training_loss(x_BD, ctx)
                out.loss.backward()
                sae.remove_parallel_grads()
                opt.step()
                sae.after_step()
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            row.append(B / statistics.median(times))
        print(f"{name:<22}" + "".join(f" {r:>11,.0f}" for r in row), flush=True)


if __name__ == "__main__":
    main()
