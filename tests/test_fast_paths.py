"""Fast paths outside the SAE kernels (tests/test_sparse_kernels.py), each against its plain reference."""

from __future__ import annotations

import copy

import torch
from torch.testing import assert_close

from saeforge.config import TrainConfig
from saeforge.saes.registry import config_class, sae_class
from saeforge.training.trainer import Trainer, make_adam


def test_fused_adam_is_the_default_and_matches_the_plain_update():
    sae = sae_class("topk")(config_class("topk")(d_in=16, d_sae=64, k=4))
    cfg = TrainConfig(total_tokens=1000, lr=1e-2)
    assert Trainer(sae, cfg, 100, progress=False).opt.defaults["fused"]
    saes = [sae, copy.deepcopy(sae)]
    opts = [make_adam(saes[0].parameters(), cfg), make_adam(saes[1].parameters(), cfg, fused=False)]
    assert opts[0].defaults["fused"] and not opts[1].defaults["fused"]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in sae.parameters()]
        for s, opt in zip(saes, opts):
            for p, grad in zip(s.parameters(), grads):
                p.grad = grad.clone()
            opt.step()
    moved = sum((p - q).abs().sum() for p, q in zip(saes[0].parameters(), sae_class("topk")(sae.cfg).parameters()))
    assert moved > 1.0
    for p, q in zip(*(s.parameters() for s in saes)):
        assert_close(p, q, rtol=1e-5, atol=1e-6)
    # a plain-Adam checkpoint loads into the fused one (and back)
    opts[0].load_state_dict(opts[1].state_dict())
    opts[1].load_state_dict(opts[0].state_dict())


def test_remove_parallel_grad_matches_the_projection_formula():
    from saeforge.saes.base import remove_parallel_grad_

    g = torch.Generator().manual_seed(1)
    W = torch.randn(300, 40, generator=g) * torch.rand(300, 1, generator=g) * 3  # rows of any norm
    W[7] = 0.0  # a zero row keeps its gradient
    W.grad = torch.randn(300, 40, generator=g)
    u = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    expected = W.grad - (W.grad * u).sum(dim=1, keepdim=True) * u
    remove_parallel_grad_(W)
    assert_close(W.grad, expected)
    assert (W.grad * W).sum(dim=1).abs().max() < 1e-4


def test_adam_is_not_fused_for_strided_parameters():
    # the fused CPU kernel walks memory flat: a [D, F] parameter stored as a transpose, given a contiguous
    # gradient, gets another element's update. make_adam keeps such parameters on the plain Adam.
    cfg = TrainConfig(lr=0.1)
    W = torch.nn.Parameter(torch.zeros(40, 3).T)
    assert not make_adam([W], cfg).defaults["fused"]
    W.grad = torch.arange(120.0).reshape(3, 40) - 60
    make_adam([W], cfg).step()
    assert torch.equal(torch.sign(W.detach()), -torch.sign(W.grad))


def test_keep_freed_memory_is_idempotent_and_allocation_still_works():
    import platform

    from saeforge.training.malloc import keep_freed_memory

    first = keep_freed_memory()
    assert first is (platform.libc_ver()[0] == "glibc")  # glibc tunes; elsewhere a clean False
    assert keep_freed_memory() is first
    x = torch.ones(5_000_000)  # 20 MB: now from the heap, not a fresh mapping
    assert x.sum().item() == 5_000_000
