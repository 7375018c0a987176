"""saeforge.saes.sparse: every TopK kernel against its plain torch reference, values and gradients,
at sizes where the fast paths actually run (the small SAEs of test_saes.py fall back to the references)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn
from torch.testing import assert_close

from saeforge.saes import LossContext, sparse
from saeforge.saes.topk import REFERENCE, FastPaths, TopKConfig, TopKSAE


def unique_indices(B, S, F, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(F, generator=g)[:S] for _ in range(B)])


@pytest.mark.parametrize("F,k", [(4608, 32), (4600, 32), (1031, 4), (2048, 16), (300, 32)])
def test_topk_blocked_selects_the_same_entries_as_torch_topk(F, k):
    pre = torch.randn(64, F, generator=torch.Generator().manual_seed(F + k))
    vals, idx = sparse.topk_blocked(pre, k)
    ref_vals, ref_idx = pre.topk(k, dim=-1)
    assert vals.shape == idx.shape == (64, k)
    assert torch.equal(vals.sort(dim=-1).values, ref_vals.sort(dim=-1).values)
    assert torch.equal(idx.sort(dim=-1).values, ref_idx.sort(dim=-1).values)
    assert torch.equal(pre.gather(1, idx), vals)


def test_topk_blocked_with_ties_and_the_maximum_in_the_tail_columns():
    # integer values: many ties; the values (a multiset) must match and each index must point at its value
    g = torch.Generator().manual_seed(3)
    pre = torch.randint(0, 20, (128, 4100), generator=g).float()
    pre[:, -1] = 100.0  # 4100 = 16 * 256 + 4: the last 4 columns are the tail candidates
    vals, idx = sparse.topk_blocked(pre, 32)
    assert torch.equal(vals.sort(dim=-1).values, pre.topk(32, dim=-1).values.sort(dim=-1).values)
    assert torch.equal(pre.gather(1, idx), vals)
    assert (idx == 4099).any(dim=1).all()
    assert all(len(set(row.tolist())) == 32 for row in idx)


def test_scatter_rows_and_gather_dot_match_their_references():
    B, S, F, D = 96, 7, 300, 24
    g = torch.Generator().manual_seed(4)
    idx = unique_indices(B, S, F, 5)
    w = torch.randn(B, S, generator=g)
    rows = torch.randn(B, D, generator=g)
    W = torch.randn(F, D, generator=g)
    csr = sparse.latent_csr(idx, F)
    assert_close(sparse.scatter_rows(csr, w, rows), sparse.scatter_rows_reference(idx, w, rows, F))
    assert_close(sparse.gather_dot(idx, W, rows), sparse.gather_dot_reference(idx, W, rows))
    # latents nobody selected get exact zeros
    unused = torch.ones(F, dtype=torch.bool)
    unused[idx.reshape(-1)] = False
    assert unused.any() and sparse.scatter_rows(csr, w, rows)[unused].abs().sum() == 0


def test_latent_csr_is_rebuilt_when_the_indices_change_in_place():
    idx = unique_indices(8, 3, 50, 6)
    a = sparse.latent_csr(idx, 50)
    assert sparse.latent_csr(idx, 50) is a  # the encoder and the decoder share one sort
    idx[0, 0] = (idx[0, 0] + 1) % 50 if (idx[0, 0] + 1) % 50 not in idx[0] else (idx[0, 0] + 2) % 50
    b = sparse.latent_csr(idx, 50)
    assert b is not a
    w, rows = torch.ones(8, 3), torch.eye(8)
    assert_close(sparse.scatter_rows(b, w, rows), sparse.scatter_rows_reference(idx, w, rows, 50))


def test_sparse_decode_matches_embedding_bag_values_and_gradients():
    B, k, F, D = 256, 16, 500, 32  # 4096 selections: the SparseDecode path
    g = torch.Generator().manual_seed(7)
    idx = unique_indices(B, k, F, 8)
    vals0, W0, gout = torch.rand(B, k, generator=g), torch.randn(F, D, generator=g), torch.randn(B, D, generator=g)
    results = []
    for fn in (sparse.sparse_decode, lambda v, i, W: Fn.embedding_bag(i, W, per_sample_weights=v, mode="sum")):
        vals, W = vals0.clone().requires_grad_(), W0.clone().requires_grad_()
        out = fn(vals, idx, W)
        out.backward(gout)
        results.append((out, vals.grad, W.grad))
    assert results[0][0].grad_fn.name().startswith("SparseDecode")
    for a, b in zip(*results):
        assert_close(a, b)


def test_scratch_hands_back_the_same_buffer_per_key():
    a = sparse.scratch((3, 4), torch.float32, torch.device("cpu"))
    assert sparse.scratch((3, 4), torch.float32, torch.device("cpu")) is a
    assert sparse.scratch((3, 5), torch.float32, torch.device("cpu")) is not a
    for n in range(6, 12):  # more keys than it keeps: the oldest go
        sparse.scratch((n,), torch.float32, torch.device("cpu"))
    assert sparse.scratch((3, 4), torch.float32, torch.device("cpu")) is not a


def sae_grads(sae):
    return {n: p.grad.clone() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("dead_fraction,tied", [(0.0, False), (0.3, False), (0.3, True)])
def test_topk_training_step_fast_defaults_match_the_plain_reference(dead_fraction, tied):
    """The defaults (blocked top-k, CSR backward, sparse decode, scratch buffer) against the dense
    autograd reference, at a size where each fast path runs: B * k = 4096 selections, F = 2048 >= 64 k."""
    B, D, F, k = 512, 48, 2048, 8
    g = torch.Generator().manual_seed(11)
    x = torch.randn(B, D, generator=g) + 0.3
    dead = torch.rand(F, generator=g) < dead_fraction
    ctx = LossContext(dead_mask_F=dead if dead.any() else None)
    runs = []
    for fast in (True, False):
        sae = TopKSAE(TopKConfig(d_in=D, d_sae=F, k=k, aux_k=24, tied=tied))
        sae.fast = FastPaths() if fast else REFERENCE
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
        for _ in range(2):  # twice: the second step reuses the scratch buffer and the cached CSR
            sae.zero_grad()
            out = sae.training_loss(x, ctx)
            out.loss.backward()
        runs.append((out, sae_grads(sae)))
    (o1, g1), (o2, g2) = runs
    assert (o1.parts["auxk"] > 0) == (dead_fraction > 0)
    assert_close(o1.loss, o2.loss)
    assert_close(o1.x_hat_BD, o2.x_hat_BD)
    assert torch.equal(o1.fire_count_F(), o2.fire_count_F())
    for name in g1:
        assert g1[name].abs().sum() > 0, name
        assert_close(g1[name], g2[name], msg=name)


@pytest.mark.parametrize("shape", [(4608, 576), (300, 7), (1, 5)])
def test_transpose_tiled_is_the_transpose(shape):
    a = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    out = sparse.transpose_tiled(a)
    assert out.is_contiguous() and torch.equal(out, a.T)
