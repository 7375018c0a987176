"""Tokens/s of one SAE training step (forward + backward + Adam), before and after the fast paths, in one run.

    .venv/bin/python bench/sae_step.py [--batch 4096 --d-in 576 --d-sae 4608 --reps 7 --breakdown]

Setups (fp32; bf16 autocast with --bf16, which only pays on CPUs with avx512_bf16/AMX):
  relu                    the ReLU SAE (dense encoder and decoder)
  topk dense reference    every TopK fast path off (plain autograd through [B, F] tensors)
  topk before             the session-1 defaults, rebuilt here: torch.topk, embedding_bag autograd,
                          COO encoder gradient, a fresh [B, F] buffer each step, for-loop Adam
  topk now                the current defaults (saes/sparse.py kernels, fused Adam)
The step is what the trainer does: zero_grad, training_loss, backward, remove_parallel_grads, Adam
step, after_step, firing counts. Setups run interleaved (one rep of each in turn) and the median is
reported, wall time and process CPU time: on a shared machine the CPU time is the steadier figure
(wall ~ CPU / threads when the cores are free). --breakdown adds, for "before" and "now", the time
per phase and the ops that cost most (torch.profiler, self time per op and input shape).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as Fn


def before_defaults(monkeypatch: dict) -> None:
    """Swap the session-1 kernels into saeforge.saes.topk (restored by ``restore``)."""
    from saeforge.saes import topk

    class COOEncoder(torch.autograd.Function):  # topk._TopKEncoder as of commit 832d3f6
        @staticmethod
        def forward(ctx, x_in_BD, W_enc_DF, bias_F, select):
            pre_BF = torch.addmm(bias_F, x_in_BD, W_enc_DF)
            vals_BK, idx_BK, aux_vals_BA, aux_idx_BA = select(pre_BF)
            ctx.save_for_backward(x_in_BD, idx_BK, aux_idx_BA)
            ctx.meta = (W_enc_DF.dtype, bias_F.dtype, pre_BF.shape[1])
            ctx.mark_non_differentiable(idx_BK, aux_idx_BA)
            return vals_BK, idx_BK, aux_vals_BA, aux_idx_BA

        @staticmethod
        def backward(ctx, g_vals_BK, _g_idx, g_aux_BA, _g_aux_idx):
            x_in_BD, idx_BK, aux_idx_BA = ctx.saved_tensors
            w_dtype, b_dtype, F_ = ctx.meta
            B, x_in_BD = x_in_BD.shape[0], x_in_BD.float()
            idx_BS, g_BS = idx_BK, g_vals_BK.float()
            if aux_idx_BA.shape[1] > 0 and g_aux_BA is not None:
                idx_BS, g_BS = torch.cat([idx_BK, aux_idx_BA], dim=1), torch.cat([g_BS, g_aux_BA.float()], dim=1)
            if idx_BS.shape[1] > F_ / 40:
                g_BF = x_in_BD.new_zeros(B, F_).scatter_add_(1, idx_BS, g_BS)
                return None, (x_in_BD.T @ g_BF).to(w_dtype), g_BF.sum(dim=0).to(b_dtype), None
            cols = idx_BS.reshape(-1)
            rows = torch.arange(B, device=cols.device).repeat_interleave(idx_BS.shape[1])
            G_FB = torch.sparse_coo_tensor(torch.stack([cols, rows]), g_BS.reshape(-1), (F_, B), check_invariants=False)
            grad_W_DF = torch.sparse.mm(G_FB, x_in_BD).T
            grad_bias_F = x_in_BD.new_zeros(F_).index_add_(0, cols, g_BS.reshape(-1))
            return None, grad_W_DF.to(w_dtype), grad_bias_F.to(b_dtype), None

    def embedding_bag(vals_BK, idx_BK, W_dec_FD):
        return Fn.embedding_bag(idx_BK, W_dec_FD, per_sample_weights=vals_BK.to(W_dec_FD.dtype), mode="sum")

    monkeypatch.update(_TopKEncoder=topk._TopKEncoder, sparse_decode=topk.sparse_decode)
    topk._TopKEncoder, topk.sparse_decode = COOEncoder, embedding_bag


def restore(monkeypatch: dict) -> None:
    from saeforge.saes import topk

    for name, value in monkeypatch.items():
        setattr(topk, name, value)
    monkeypatch.clear()


class Setup:
    def __init__(self, name: str, sae, fused_adam: bool, before: bool = False):
        from saeforge.config import TrainConfig
        from saeforge.training.trainer import make_adam

        self.name, self.sae, self.before = name, sae, before
        self.opt = make_adam(sae.parameters(), TrainConfig(lr=1e-4), fused=fused_adam)
        self.patched: dict = {}

    def step(self, x_BD, ctx, bf16: bool, phases: dict | None = None) -> None:
        if self.before:
            before_defaults(self.patched)
        try:
            t0 = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = self.sae.training_loss(x_BD, ctx)
            t1 = time.perf_counter()
            out.loss.backward()
            t2 = time.perf_counter()
            self.sae.remove_parallel_grads()
            self.opt.step()
            self.sae.after_step()
            out.fire_count_F()
            t3 = time.perf_counter()
        finally:
            restore(self.patched)
        if phases is not None:
            for key, dt in (("forward", t1 - t0), ("backward", t2 - t1), ("constraint + Adam", t3 - t2)):
                phases.setdefault(key, []).append(dt)


def breakdown(setup: Setup, x_BD, ctx, bf16: bool, reps: int, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    phases: dict = {}
    for _ in range(reps):
        setup.step(x_BD, ctx, bf16, phases)
    print(
        f"\n== {setup.name}: median ms per phase: "
        + ", ".join(f"{k} {statistics.median(v) * 1e3:.0f}" for k, v in phases.items())
    )
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            setup.step(x_BD, ctx, bf16)
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) / 3e3
    print(f"   profiler self time {total:.0f} ms per step; top ops:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        shapes = ", ".join(str(s) for s in e.input_shapes if s)[:70]
        print(f"   {e.self_cpu_time_total / 3e3:7.1f} ms  {e.count // 3:3d}x  {e.key[:44]:<44} {shapes}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7, help="timed steps per setup, interleaved (after 2 warm-up steps)")
    ap.add_argument("--dead-fraction", type=float, default=0.0, help="fraction of latents marked dead (exercises AuxK)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast instead of fp32")
    ap.add_argument("--breakdown", action="store_true", help="per-phase times and the costliest ops, before and now")
    ap.add_argument("--top", type=int, default=18, help="ops listed per setup with --breakdown")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0 = torch's default). On a loaded machine "
        "--threads 1 measures the work itself: 2 threads then also wait for each other at every op",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from saeforge.saes import LossContext
    from saeforge.saes.relu import ReLUConfig, ReLUSAE
    from saeforge.saes.topk import REFERENCE, FastPaths, TopKConfig, TopKSAE

    torch.manual_seed(0)
    B, D, F = args.batch, args.d_in, args.d_sae
    x_BD = torch.randn(B, D) + 0.5  # E||x|| ~ sqrt(D), with a mean offset like residual streams
    dead_F = torch.rand(F) < args.dead_fraction
    ctx = LossContext(dead_mask_F=dead_F if dead_F.any() else None)

    def topk(fast=FastPaths()):  # noqa: B008 (FastPaths is frozen: one shared default is fine)
        sae = TopKSAE(TopKConfig(d_in=D, d_sae=F, k=args.k))
        sae.fast = fast
        return sae

    setups = [
        Setup("relu", ReLUSAE(ReLUConfig(d_in=D, d_sae=F)), fused_adam=True),
        Setup("topk dense reference", topk(REFERENCE), fused_adam=False),
        Setup("topk before", topk(FastPaths(blocked_topk=False)), fused_adam=False, before=True),
        Setup("topk now", topk(), fused_adam=True),
    ]
    bf16_hw = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {B}, d_in {D}, d_sae {F}, k {args.k}, "
        f"dead {int(dead_F.sum())}, {'bf16 autocast' if args.bf16 else 'fp32'} (bf16 matmul hardware: {bf16_hw}), "
        f"load avg {os.getloadavg()[0]:.2f}"
    )
    wall: dict = {s.name: [] for s in setups}
    cpu: dict = {s.name: [] for s in setups}
    for rep in range(args.reps + 2):
        for s in setups:
            t, c = time.perf_counter(), time.process_time()
            s.step(x_BD, ctx, args.bf16)
            if rep >= 2:
                wall[s.name].append(time.perf_counter() - t)
                cpu[s.name].append(time.process_time() - c)
    print(f"{'setup':<22} {'tok/s':>9} {'ms/step':>8} {'CPU ms':>8}")
    for s in setups:
        w, c = statistics.median(wall[s.name]), statistics.median(cpu[s.name])
        print(f"{s.name:<22} {B / w:>9,.0f} {w * 1e3:>8.0f} {c * 1e3:>8.0f}")
    b, n = statistics.median(cpu["topk before"]), statistics.median(cpu["topk now"])
    print(
        f"topk now vs before: {statistics.median(wall['topk before']) / statistics.median(wall['topk now']):.2f}x "
        f"wall, {b / n:.2f}x CPU time (load avg {os.getloadavg()[0]:.2f})"
    )
    if args.breakdown:
        for s in setups[2:]:
            breakdown(s, x_BD, ctx, args.bf16, args.reps, args.top)


if __name__ == "__main__":
    main()
