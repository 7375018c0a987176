"""k-sparse probing (SAEBench) on a bounded sample of labelled tokens, with residual baselines.

Per property p, on the training rows where p is defined: pick the k latents with the largest
|mean(f | p) - mean(f | not p)|, fit a logistic regression on them, report accuracy on the test
rows, for k in KS. Baselines on the same rows: the same selection over residual dimensions, and a
dense probe on the whole residual. Rows are a bounded sample of the labelled tokens (run.py draws
each token with probability ~probe_tokens / tokens and tests on every fifth window, so train and
test come from different windows spread over the whole stream). As in SAEBench, whose probing datasets are balanced, classes weigh the same: the
regression weights each class's training rows to half the total, and the score is balanced
accuracy (the mean of the true-positive and true-negative rates) on the test rows, so chance is 0.5
however rare the property.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

KS = (1, 2, 5, 10, 20)
TRAIN_FRACTION = 0.8
L2 = 1e-4


class ProbeSample:
    """At most ``capacity`` rows of (x, labels, valid, test): memory capacity * (D + 2P + 1), whatever streams by."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.parts: list[tuple[torch.Tensor, ...]] = []
        self.n = 0

    def add(self, x_ND: torch.Tensor, y_NP: torch.Tensor, valid_NP: torch.Tensor, test_N: torch.Tensor | None = None):
        take = min(self.capacity - self.n, len(x_ND))
        if take <= 0:
            return
        test_N = torch.zeros(len(x_ND), dtype=torch.bool) if test_N is None else test_N
        self.parts.append((x_ND[:take].float().cpu(), y_NP[:take].cpu(), valid_NP[:take].cpu(), test_N[:take].cpu()))
        self.n += take

    @property
    def full(self) -> bool:
        return self.n >= self.capacity

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(x_ND, y_NP, valid_NP, test_N), cloned (so tensors made under inference mode can enter autograd)."""
        return tuple(torch.cat(column).clone() for column in zip(*self.parts))


def fit_logistic(X: torch.Tensor, y_PN: torch.Tensor, w_PN: torch.Tensor, max_iter: int = 100):
    """Independent logistic regressions, one per property p; rows weighted by ``w_PN`` (0 = unused).

    ``X`` is [P, N, K] (each property its own features) or [N, K] (features shared, e.g. the dense
    probe: never copied P times). Returns a function X -> logits_PN.
    """
    shared = X.dim() == 2
    X = X.double()
    w = w_PN.double()
    n_P = w.sum(1).clamp_min(1)
    if shared:  # standardise over the rows any property trains on
        rows = w.amax(0) > 0
        mean, var = X[rows].mean(0), X[rows].var(0, unbiased=False)
    else:
        mean = (X * w[:, :, None]).sum(1) / n_P[:, None]
        var = ((X - mean[:, None]) ** 2 * w[:, :, None]).sum(1) / n_P[:, None]
    std = torch.where(var > 1e-12, var.sqrt(), torch.ones_like(var))

    def standardise(X_):
        X_ = X_.double()
        return (X_ - mean) / std if shared else (X_ - mean[:, None]) / std[:, None]

    Z = standardise(X)
    W = torch.zeros(len(w_PN), X.shape[-1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(w_PN), dtype=torch.float64, requires_grad=True)

    def logits(Z_, W_, b_):
        return (Z_ @ W_.T).T + b_[:, None] if shared else torch.einsum("pnk,pk->pn", Z_, W_) + b_[:, None]

    y = y_PN.double()
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits(Z, W, b), y, reduction="none")
        loss = ((bce * w).sum(1) / n_P).sum() + L2 * (W**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    W, b = W.detach(), b.detach()
    return lambda X_: logits(standardise(X_), W, b)


def probe_weights(predict, d_in: int, n_probes: int) -> torch.Tensor:
    """w_PD: each probe of ``fit_logistic``'s ``predict`` as a direction in x's units (standardisation folded
    in). The probes are linear, so a probe's weight is its logit's gradient with respect to x (taken at 0)."""
    x0 = torch.zeros(1, d_in, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        return torch.stack([torch.autograd.grad(predict(x0)[p].sum(), x0)[0][0] for p in range(n_probes)])


def _balanced_weights(y_PN: torch.Tensor, rows_PN: torch.Tensor) -> torch.Tensor:
    pos, neg = (y_PN & rows_PN).double(), (~y_PN & rows_PN).double()
    return pos / pos.sum(1, keepdim=True).clamp_min(1) + neg / neg.sum(1, keepdim=True).clamp_min(1)


def _accuracy(X, y_PN, train_PN, test_PN) -> torch.Tensor:
    """Balanced test accuracy of a probe fitted with balanced class weights (see the module docstring)."""
    predict = fit_logistic(X, y_PN, _balanced_weights(y_PN, train_PN))
    right_PN = ((predict(X) > 0) == y_PN).double()
    pos, neg = (y_PN & test_PN).double(), (~y_PN & test_PN).double()
    tpr = (right_PN * pos).sum(1) / pos.sum(1).clamp_min(1)
    tnr = (right_PN * neg).sum(1) / neg.sum(1).clamp_min(1)
    return (tpr + tnr) / 2


def _top_k_by_mean_diff(sum1_PF, n1_P, sum0_PF, n0_P, k: int) -> torch.Tensor:
    diff = (sum1_PF / n1_P.clamp_min(1)[:, None] - sum0_PF / n0_P.clamp_min(1)[:, None]).abs()
    return diff.topk(min(k, diff.shape[1]), dim=1).indices  # [P, k]


def _class_sums(feats_NF: torch.Tensor, y_NP: torch.Tensor, train_NP: torch.Tensor):
    pos = (y_NP & train_NP).double()
    neg = (~y_NP & train_NP).double()
    f = feats_NF.double()
    return pos.T @ f, pos.sum(0), neg.T @ f, neg.sum(0)


def k_sparse_probing(
    x_ND: torch.Tensor,
    encode: Callable[[torch.Tensor], torch.Tensor],
    y_NP: torch.Tensor,
    valid_NP: torch.Tensor,
    names: tuple[str, ...],
    ks: tuple[int, ...] = KS,
    test_N: torch.Tensor | None = None,
    chunk: int = 1024,
    baselines: dict | None = None,
) -> dict:
    """Balanced accuracy per property and k of SAE-latent and residual-dimension probes, and the dense probe.

    ``test_N``: which rows test (default: the last 1 - TRAIN_FRACTION of them). ``baselines``: what
    ``residual_baselines`` returns for these same rows (computed here when None), so SAEs probed on
    the same sample share them.
    """
    N = len(x_ND)
    encode = torch.no_grad()(encode)  # the SAE's parameters need no graph here
    train_NP, test_NP, usable_P = _split(N, valid_NP, y_NP, test_N)
    # latent class sums, encoding in chunks so the sample's full f (N x F) is never held
    sums = None
    for a in range(0, N, chunk):
        part = _class_sums(encode(x_ND[a : a + chunk]).float().cpu(), y_NP[a : a + chunk], train_NP[a : a + chunk])
        sums = part if sums is None else tuple(s + p for s, p in zip(sums, part))
    k_max = max(ks)
    top_PK = _top_k_by_mean_diff(*sums, k_max)
    cols = torch.unique(top_PK)
    f_NC = torch.cat([encode(x_ND[a : a + chunk]).float().cpu()[:, cols] for a in range(0, N, chunk)])
    where = {int(c): j for j, c in enumerate(cols.tolist())}
    top_local_PK = top_PK.clone().apply_(lambda c: where[c])
    if baselines is None:
        baselines = residual_baselines(x_ND, y_NP, valid_NP, names, ks, test_N)
    out: dict = {"tokens": N, "train_tokens": _n_train(N, test_N)}
    out["sae"] = _k_probes(f_NC, top_local_PK, y_NP, train_NP, test_NP, usable_P, names, ks)
    out["residual"], out["dense"] = baselines["residual"], baselines["dense"]
    out["top_latents"] = {n: top_PK[p, : min(5, k_max)].tolist() for p, n in enumerate(names) if usable_P[p]}
    return out


def residual_baselines(
    x_ND: torch.Tensor,
    y_NP: torch.Tensor,
    valid_NP: torch.Tensor,
    names: tuple[str, ...],
    ks: tuple[int, ...] = KS,
    test_N: torch.Tensor | None = None,
) -> dict:
    """The probes that depend only on the residual rows: k-sparse over residual dimensions, and dense."""
    train_NP, test_NP, usable_P = _split(len(x_ND), valid_NP, y_NP, test_N)
    top_res_PK = _top_k_by_mean_diff(*_class_sums(x_ND, y_NP, train_NP), max(ks))
    residual = _k_probes(x_ND, top_res_PK, y_NP, train_NP, test_NP, usable_P, names, ks)
    dense = _per_prop(_accuracy(x_ND, y_NP.T, train_NP.T, test_NP.T), usable_P, names)
    return {"residual": residual, "dense": dense}


def _n_train(N: int, test_N: torch.Tensor | None) -> int:
    return int(N * TRAIN_FRACTION) if test_N is None else int((~test_N).sum())


def _split(N: int, valid_NP: torch.Tensor, y_NP: torch.Tensor, test_N: torch.Tensor | None):
    split = torch.arange(N) < int(N * TRAIN_FRACTION) if test_N is None else ~test_N
    train_NP, test_NP = valid_NP & split[:, None], valid_NP & ~split[:, None]
    # both classes needed on both sides: balanced accuracy needs a positive and a negative test row
    both = (y_NP & train_NP).any(0) & (~y_NP & train_NP).any(0) & (y_NP & test_NP).any(0) & (~y_NP & test_NP).any(0)
    return train_NP, test_NP, both.tolist()


def _k_probes(feats_NC, top_PK, y_NP, train_NP, test_NP, usable_P, names, ks) -> dict:
    """Balanced accuracy per k of the probes on each property's top-k columns ``top_PK`` of ``feats_NC``."""
    # every k in one fit (fewer, larger L-BFGS calls): k < k_max pads with zero columns, which
    # standardise to 0 and keep weight 0, so each block is exactly the k-feature probe
    k_max = top_PK.shape[1]
    y_PN, train_PN, test_PN = y_NP.T, train_NP.T, test_NP.T
    blocks = []
    for k in ks:
        X_PNK = torch.stack([feats_NC[:, top_PK[p, : min(k, k_max)]] for p in range(len(names))])
        blocks.append(torch.nn.functional.pad(X_PNK, (0, k_max - X_PNK.shape[2])))
    acc = _accuracy(torch.cat(blocks), y_PN.repeat(len(ks), 1), train_PN.repeat(len(ks), 1), test_PN.repeat(len(ks), 1))
    return {k: _per_prop(acc[j * len(names) : (j + 1) * len(names)], usable_P, names) for j, k in enumerate(ks)}


def _per_prop(acc_P: torch.Tensor, usable_P: list[bool], names: tuple[str, ...]) -> dict:
    per = {n: (float(acc_P[p]) if usable_P[p] else None) for p, n in enumerate(names)}
    vals = [v for v in per.values() if v is not None]
    return {"mean": (sum(vals) / len(vals) if vals else None), "per_property": per}
