"""Kernels of the TopK training step, built from torch library calls; each has a plain reference.

A TopK step at F latents, batch B and k active latents does one dense [B, D] x [D, F] product
(every pre-activation is needed to find the top k) and otherwise touches only B * k latents.
These are the pieces that keep that second part from costing like the first (on CPU; the same
calls run on CUDA):

- ``topk_blocked``: exact top-k of each row in two small stages instead of one over all F.
  Reference: ``torch.topk``.
- ``latent_csr`` + ``scatter_rows``: sum_{b, j} w[b, j] * rows[b] into row idx[b, j] of an [F, D]
  output (W_dec's and W_enc's gradients), as one CSR sparse x dense product whose [F, B] matrix
  is sorted by latent once (a radix sort of int32 indices). Reference: ``index_add_``.
- ``gather_dot``: <W[idx[b, j]], g[b]> for every selected entry (the gradient of the decoder's
  per-token weights), as a sampled dense x dense product. Reference: gather then sum.
- ``SparseDecode``: embedding_bag's gather-sum forward with the two kernels above as its backward.
- ``scratch``: a reused [B, F] buffer for the pre-activations. A fresh 75 MB tensor every step is
  mapped anew by malloc and costs page faults on every first touch (~20% of the matmul here).

Tests (tests/test_sparse_kernels.py) check every kernel against its reference, values and gradients.
"""

from __future__ import annotations

import threading
import warnings

import torch
import torch.nn.functional as Fn
from torch import Tensor

# Two-stage top-k: split each row's F entries into `_SLICES` interleaved slices of F // _SLICES
# columns. Column c's maximum over the slices bounds every entry in it, so the top k entries lie
# in the k columns with the largest maxima (if an entry's column were not among them, k larger
# column maxima would be k larger entries). Stage two takes the top k of those k * _SLICES
# candidates. At F = 4608, k = 32: one strided max over the row, a top-k of 288 and one of 512,
# measured ~20-30% less CPU time than one top-k of 4608 (torch's CPU top-k costs ~10 ns an entry).
_SLICES = 16


def topk_blocked(pre_BF: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k largest entries of each row, unsorted; the same set as ``torch.topk``.

    Ties may resolve to other indices of equal value. Falls back to ``torch.topk`` where the two
    stages would not be smaller than the row (F < 64 k) or on non-contiguous input.
    """
    B, F = pre_BF.shape
    n_cols = F // _SLICES
    if n_cols < 4 * k or not pre_BF.is_contiguous():
        return pre_BF.topk(k, dim=-1, sorted=False)
    main = _SLICES * n_cols
    slices_BSC = pre_BF[:, :main].view(B, _SLICES, n_cols)  # entry (s, c) is column s * n_cols + c
    _, col_BK = slices_BSC.amax(dim=1).topk(k, dim=-1, sorted=False)
    cand_BN = slices_BSC.gather(2, col_BK[:, None, :].expand(B, _SLICES, k)).reshape(B, _SLICES * k)
    if main < F:  # the F % _SLICES tail columns are always candidates
        cand_BN = torch.cat([cand_BN, pre_BF[:, main:]], dim=1)
    vals_BK, j_BK = cand_BN.topk(k, dim=-1, sorted=False)
    in_main = j_BK < _SLICES * k
    jm_BK = j_BK.clamp_max(_SLICES * k - 1)
    idx_BK = (jm_BK // k) * n_cols + col_BK.gather(1, jm_BK % k)
    if main < F:
        idx_BK = torch.where(in_main, idx_BK, j_BK - _SLICES * k + main)
    return vals_BK, idx_BK


_last_csr = threading.local()


def latent_csr(idx_BS: Tensor, n_latents: int) -> tuple[Tensor, Tensor, Tensor]:
    """The [F, B] selection matrix in CSR form, sorted by latent: (crow [F + 1], col [N], order [N]).

    Entry n of latent row f is the flat selection order[n]: row ``col[n]`` of the batch. Values
    for a given [B, S] weight tensor w are ``w.reshape(-1)[order]``. One stable int32 radix sort.
    The decoder's and the encoder's backward both ask for the top-k indices' matrix: the last one
    is kept (with a reference to its index tensor, so the storage cannot be reused under the key).
    """
    key = (idx_BS.data_ptr(), idx_BS.shape, idx_BS.stride(), idx_BS._version, idx_BS.device, n_latents)
    last = getattr(_last_csr, "entry", None)
    if last is not None and last[0] == key:
        return last[2]
    csr = _latent_csr(idx_BS, n_latents)
    _last_csr.entry = (key, idx_BS, csr)
    return csr


def _latent_csr(idx_BS: Tensor, n_latents: int) -> tuple[Tensor, Tensor, Tensor]:
    B, S = idx_BS.shape
    flat_N = idx_BS.reshape(-1)
    _, order_N = torch.sort(flat_N.to(torch.int32), stable=True)  # stable: batch rows ascend per latent
    crow = torch.zeros(n_latents + 1, dtype=torch.long, device=idx_BS.device)
    torch.cumsum(torch.bincount(flat_N, minlength=n_latents), 0, out=crow[1:])
    return crow, order_N // S, order_N


def scatter_rows(csr: tuple[Tensor, Tensor, Tensor], w_BS: Tensor, rows_BD: Tensor) -> Tensor:
    """out[f] = sum over selections (b, j) of latent f of w[b, j] * rows[b]; shape [F, D], rows' dtype.

    Duplicate (b, f) pairs within one csr are not allowed (top-k never repeats a latent in a row).
    """
    crow, col_N, order_N = csr
    values_N = w_BS.reshape(-1)[order_N].to(rows_BD.dtype)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": it is what we measured and test
        warnings.simplefilter("ignore", UserWarning)
        G_FB = torch.sparse_csr_tensor(crow, col_N, values_N, (len(crow) - 1, rows_BD.shape[0]))
        # addmm with beta=0 into an empty tensor: `G @ rows` zero-fills a result and copies it once more
        out_FD = rows_BD.new_empty(len(crow) - 1, rows_BD.shape[1])
        return torch.addmm(out_FD, G_FB, rows_BD.contiguous(), beta=0, out=out_FD)


def scatter_rows_reference(idx_BS: Tensor, w_BS: Tensor, rows_BD: Tensor, n_latents: int) -> Tensor:
    src_ND = (w_BS[:, :, None].to(rows_BD.dtype) * rows_BD[:, None, :]).reshape(-1, rows_BD.shape[1])
    return rows_BD.new_zeros(n_latents, rows_BD.shape[1]).index_add_(0, idx_BS.reshape(-1), src_ND)


def transpose_tiled(a_FD: Tensor, rows: int = 256) -> Tensor:
    """``a.T.contiguous()`` in blocks of ``rows`` rows: 3.6 vs 10.5 ms at [4608, 576] here (a strided copy
    of the whole matrix at once misses the cache on every write)."""
    out_DF = a_FD.new_empty(a_FD.shape[1], a_FD.shape[0])
    for start in range(0, a_FD.shape[0], rows):
        out_DF[:, start : start + rows].copy_(a_FD[start : start + rows].T)
    return out_DF


def gather_dot(idx_BS: Tensor, W_FD: Tensor, g_BD: Tensor) -> Tensor:
    """out[b, j] = <W[idx[b, j]], g[b]>, shape [B, S], as (g @ W^T) sampled at the selected entries only."""
    B, S = idx_BS.shape
    crow = torch.arange(0, B * S + 1, S, device=idx_BS.device)
    g_BD = g_BD.to(W_FD.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, idx_BS.reshape(-1), g_BD.new_zeros(B * S), (B, W_FD.shape[0]))
        return torch.sparse.sampled_addmm(pattern, g_BD, W_FD.T, beta=0.0).values().view(B, S)


def gather_dot_reference(idx_BS: Tensor, W_FD: Tensor, g_BD: Tensor) -> Tensor:
    return (W_FD[idx_BS] * g_BD[:, None, :].to(W_FD.dtype)).sum(-1)


# Below this many selections the sparse kernels' fixed costs (CSR construction) outweigh their
# gain and plain embedding_bag autograd is as fast; it also covers dtypes the CSR kernels lack.
_MIN_ENTRIES = 4096


def sparse_decode(vals_BK: Tensor, idx_BK: Tensor, W_dec_FD: Tensor) -> Tensor:
    """sum_j vals[b, j] * W_dec[idx[b, j]]: embedding_bag forward, CSR kernels backward."""
    vals_BK = vals_BK.to(W_dec_FD.dtype)  # embedding_bag wants weights in the table's dtype
    if idx_BK.numel() < _MIN_ENTRIES or W_dec_FD.dtype != torch.float32 or W_dec_FD.device.type != "cpu":
        return Fn.embedding_bag(idx_BK, W_dec_FD, per_sample_weights=vals_BK, mode="sum")
    return SparseDecode.apply(vals_BK, idx_BK, W_dec_FD)


class SparseDecode(torch.autograd.Function):
    """x_hat_BD = sum_j vals[b, j] W_dec[idx[b, j]]. Backward: d vals = gather_dot, d W_dec = scatter_rows.

    embedding_bag's own backward does the same work but sorts with a comparison sort and walks
    the output one segment at a time; measured ~2x slower in CPU time at B = 4096, k = 32, D = 576.
    """

    @staticmethod
    def forward(ctx, vals_BK, idx_BK, W_dec_FD):
        ctx.save_for_backward(vals_BK, idx_BK, W_dec_FD)
        ctx.mark_non_differentiable(idx_BK)
        return Fn.embedding_bag(idx_BK, W_dec_FD, per_sample_weights=vals_BK, mode="sum")

    @staticmethod
    def backward(ctx, g_BD):
        vals_BK, idx_BK, W_dec_FD = ctx.saved_tensors
        g_BD = g_BD.contiguous()
        d_vals = gather_dot(idx_BK, W_dec_FD, g_BD) if ctx.needs_input_grad[0] else None
        d_W = None
        if ctx.needs_input_grad[2]:
            d_W = scatter_rows(latent_csr(idx_BK, W_dec_FD.shape[0]), vals_BK, g_BD.to(W_dec_FD.dtype))
        return d_vals, None, d_W


_local = threading.local()


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised tensor that the same thread gets back on its next call with the same key.

    For a result that is consumed before the next call (the pre-activations, read by the top-k
    and dropped). Up to 4 keys per thread, so sweeps of a few SAE shapes each keep theirs.
    """
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    key = (tuple(shape), dtype, torch.device(device))
    buf = cache.pop(key, None)
    if buf is None:
        buf = torch.empty(shape, dtype=dtype, device=device)
        while len(cache) >= 4:
            cache.pop(next(iter(cache)))
    cache[key] = buf  # most recently used last
    return buf
