"""TPP (targeted probe perturbation, SAEBench) on the multi-class syntax properties.

For a multi-class property (token category, bracket depth, indentation level; GROUPS), on the
probing sample's rows where the property is defined:
1. fit a one-vs-rest linear probe per class i on the residual x (training rows);
2. score latent j for class i by its attribution to probe i, the mean over class-i training rows of
   ``f_j * (W_dec[j] . w_i)`` (w_i in x's units);
3. for each class i, ablate its top ``n_ablate`` latents, ``x' = x - sum_j f_j W_dec[j]``, and
   measure every probe's test accuracy drop dAcc(i, j) = acc_j(x) - acc_j(x').
TPP = mean_i dAcc(i, i) - mean_{i != j} dAcc(i, j): high when each class's latents matter to its own
probe and not to the others. Accuracy is plain accuracy on the group's test rows (SAEBench balances
its datasets; here a rare class's drops are small). Defined for SAEs whose decoder writes the
probed hook, not for transcoders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from saeforge.groundtruth.labels import PROPERTIES
from saeforge.groundtruth.probing import fit_logistic, probe_weights

GROUPS = {
    "category": ("cat_name", "cat_keyword", "cat_string", "cat_docstring", "cat_comment", "cat_number", "cat_operator"),
    "depth": ("depth_0", "depth_1", "depth_2", "depth_3plus"),
    "indent": ("indent_0", "indent_1", "indent_2", "indent_3plus"),
}
N_ABLATE = 20


@dataclass
class ClassProbes:
    """Step 1, which depends only on the residual rows: one-vs-rest probes and their clean test accuracy."""

    keep_C: torch.Tensor
    y_CN: torch.Tensor
    train_N: torch.Tensor
    test_N: torch.Tensor
    predict: Callable[[torch.Tensor], torch.Tensor]
    w_CD: torch.Tensor  # probe weights in x's units
    clean_C: torch.Tensor

    def acc_C(self, x: torch.Tensor) -> torch.Tensor:
        test_N = self.test_N
        return (((self.predict(x) > 0) == self.y_CN) & test_N).double().sum(1) / test_N.double().sum().clamp_min(1)


def class_probes(x_ND: torch.Tensor, y_NC: torch.Tensor, valid_N: torch.Tensor, test_N: torch.Tensor):
    """Step 1 for one multi-class property: ``ClassProbes``, or a dict saying why TPP is undefined."""
    train_N, test_N = valid_N & ~test_N, valid_N & test_N
    keep_C = (y_NC & train_N[:, None]).any(0) & (~y_NC & train_N[:, None]).any(0) & (y_NC & test_N[:, None]).any(0)
    C = int(keep_C.sum())
    if C < 2:
        return {"tpp": None, "classes": int(C), "reason": "fewer than two classes with training and test rows"}
    y_CN = y_NC[:, keep_C].T
    predict = fit_logistic(x_ND, y_CN, train_N[None].expand(C, -1).double())
    probes = ClassProbes(
        keep_C, y_CN, train_N, test_N, predict, probe_weights(predict, x_ND.shape[1], C), torch.empty(0)
    )
    probes.clean_C = probes.acc_C(x_ND)
    return probes


def tpp(
    x_ND: torch.Tensor,
    encode: Callable[[torch.Tensor], torch.Tensor],
    W_dec_FD: torch.Tensor,
    y_NC: torch.Tensor,
    valid_N: torch.Tensor,
    test_N: torch.Tensor,
    n_ablate: int = N_ABLATE,
    chunk: int = 1024,
    probes: ClassProbes | dict | None = None,
) -> dict:
    """TPP of one multi-class property: ``y_NC`` one-hot-ish classes, rows used where ``valid_N``.

    ``probes``: ``class_probes`` of these rows, when several SAEs share them."""
    probes = class_probes(x_ND, y_NC, valid_N, test_N) if probes is None else probes
    if isinstance(probes, dict):
        return probes
    encode = torch.no_grad()(encode)
    W = W_dec_FD.detach().float().cpu()
    y_CN, train_N, C = probes.y_CN, probes.train_N, len(probes.y_CN)
    proj_CF = probes.w_CD.float() @ W.T  # W_dec[j] . w_c
    attr_CF = torch.zeros_like(proj_CF)
    for a in range(0, len(x_ND), chunk):
        f_NF = encode(x_ND[a : a + chunk]).float().cpu()
        pos_CN = (y_CN[:, a : a + chunk] & train_N[a : a + chunk]).float()
        attr_CF += (pos_CN @ f_NF) * proj_CF
    attr_CF /= (y_CN & train_N).float().sum(1, keepdim=True).clamp_min(1)
    top_CK = attr_CF.topk(min(n_ablate, attr_CF.shape[1]), dim=1).indices
    d_CC = torch.zeros(C, C, dtype=torch.float64)
    for i in range(C):
        cols = top_CK[i]
        removed_ND = torch.cat([encode(x_ND[a : a + chunk]).float().cpu()[:, cols] for a in range(0, len(x_ND), chunk)])
        d_CC[i] = probes.clean_C - probes.acc_C(x_ND - removed_ND @ W[cols])
    off = ~torch.eye(C, dtype=torch.bool)
    return {
        "tpp": float(d_CC.diagonal().mean() - d_CC[off].mean()),
        "classes": C,
        "self_drop": float(d_CC.diagonal().mean()),
        "other_drop": float(d_CC[off].mean()),
        "n_ablate": int(top_CK.shape[1]),
    }


def _group(y_NP: torch.Tensor, valid_NP: torch.Tensor, names: tuple[str, ...]):
    idx = [PROPERTIES.index(n) for n in names]
    y_NC = y_NP[:, idx]
    valid_N = valid_NP[:, idx].all(1) & y_NC.any(1)  # code tokens that have a class (whitespace has no category)
    return y_NC, valid_N


def tpp_probes(x_ND, y_NP, valid_NP, test_N) -> dict:
    """``class_probes`` of every group of GROUPS: the residual-only part of ``tpp_all``, to share between SAEs."""
    return {group: class_probes(x_ND, *_group(y_NP, valid_NP, names), test_N) for group, names in GROUPS.items()}


def tpp_all(x_ND, encode, W_dec_FD, y_NP, valid_NP, test_N, n_ablate: int = N_ABLATE, probes=None) -> dict:
    """TPP per group of GROUPS, and their mean; ``probes``: ``tpp_probes`` of the same rows, if already fitted."""
    probes = tpp_probes(x_ND, y_NP, valid_NP, test_N) if probes is None else probes
    out = {}
    for group, names in GROUPS.items():
        y_NC, valid_N = _group(y_NP, valid_NP, names)
        out[group] = tpp(x_ND, encode, W_dec_FD, y_NC, valid_N, test_N, n_ablate, probes=probes[group])
    vals = [g["tpp"] for g in out.values() if g["tpp"] is not None]
    return {"mean": (sum(vals) / len(vals) if vals else None), "groups": out}
