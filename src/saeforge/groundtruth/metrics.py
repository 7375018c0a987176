"""Coverage and reconstruction (Karvonen et al. 2024, as for board games), streamed with bounded memory.

Latent i classifies property p as ``1[f_i > t * max_i]`` for t in THRESHOLDS, where ``max_i`` is the
latent's largest activation over the same tokens (so it must be known first: run.py makes one pass
for the maxima, then the counting passes over the same windows). A latent that never fires
(max 0) predicts nothing. Memory is the count tensors, O(P * F * T), whatever the token count.

- coverage = mean over properties of max over (latent, t) of F1; ``best_t`` is the single t whose
  mean over properties of max over latents is highest (reported with that mean).
- reconstruction: at each t, the latents whose precision for p is >= 0.95 on the selection windows
  predict p by OR on the other windows; mean F1 over properties at the best t.
Properties with no positive (valid) token are left out of the means (reported as None).
"""

from __future__ import annotations

import torch

THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(10))
PRECISION = 0.95
ROWS = 512  # rows per counting step: 512 x 16k latents x 4 bytes = 32 MB of temporaries


def _fire_NF(f_NF: torch.Tensor, max_F: torch.Tensor, t: float) -> torch.Tensor:
    """float32 0/1 [N, F] at one threshold, built one t at a time so a batch costs N * F floats, not N * F * T.

    The max_F > 0 guard: a latent that never fired must not fire at t = 0 on a negative value.
    """
    return ((f_NF > t * max_F) & (max_F > 0)).float()


def _levels(f_NF: torch.Tensor, max_F: torch.Tensor, thresholds: list[float]):
    """The firing entries (row n, latent i) and how many thresholds each passes.

    Every threshold t * max_i is >= 0 and grows with t (for max_i > 0), so only f > 0 can fire, and
    an entry that passes t_j passes every smaller t: it fires exactly at the first ``level`` thresholds.
    The comparisons are the ones ``_fire_NF`` makes (the same float32 products t * max_F).
    """
    n_E, i_E = ((f_NF > 0) & (max_F > 0)).nonzero(as_tuple=True)
    f_E, max_E = f_NF[n_E, i_E], max_F[i_E]
    level_E = torch.zeros(len(n_E), dtype=torch.long)
    for t in thresholds:
        level_E += f_E > t * max_E
    return n_E, i_E, level_E


class ThresholdCounts:
    """Per (property, latent, threshold) true positives and predicted positives among valid tokens.

    ``sparse`` (default): counts only the firing entries (a TopK SAE's k of F per token: O(nnz * P)
    instead of O(N * F * T * P) work); ``sparse=False`` is the plain reference (tests compare them).
    """

    def __init__(
        self, n_props: int, max_F: torch.Tensor, thresholds: tuple[float, ...] = THRESHOLDS, sparse: bool = True
    ):
        self.sparse = sparse
        self.max_F = max_F.float().cpu()
        self.thresholds = torch.tensor(thresholds, dtype=torch.float64)
        F, T = len(max_F), len(thresholds)
        self.tp_PFT = torch.zeros(n_props, F, T, dtype=torch.float64)
        self.pp_PFT = torch.zeros(n_props, F, T, dtype=torch.float64)
        self.pos_P = torch.zeros(n_props, dtype=torch.float64)
        self.n_P = torch.zeros(n_props, dtype=torch.float64)

    def update(self, f_NF: torch.Tensor, y_NP: torch.Tensor, valid_NP: torch.Tensor) -> None:
        for a in range(0, len(f_NF), ROWS):  # bounded temporaries: ROWS x F floats per threshold
            self._update(f_NF[a : a + ROWS], y_NP[a : a + ROWS], valid_NP[a : a + ROWS])

    def _update(self, f_NF: torch.Tensor, y_NP: torch.Tensor, valid_NP: torch.Tensor) -> None:
        if not self.sparse:
            return self._update_dense(f_NF, y_NP, valid_NP)
        f_NF, y_NP, valid_NP = f_NF.float().cpu(), y_NP.cpu(), valid_NP.cpu()
        n_E, i_E, level_E = _levels(f_NF, self.max_F, self.thresholds.tolist())
        F, T = self.max_F.shape[0], len(self.thresholds)
        bucket_E = i_E * T + (level_E - 1)  # level >= 1: every firing entry passes t = 0
        for total_PFT, rows_NP in ((self.tp_PFT, y_NP & valid_NP), (self.pp_PFT, valid_NP)):
            acc = torch.zeros(F * T, rows_NP.shape[1], dtype=torch.float64)
            acc.index_add_(0, bucket_E, rows_NP[n_E].double())
            # an entry at level L counts at thresholds 0 .. L-1: a reversed cumulative sum over t
            acc_FTP = acc.view(F, T, -1).flip(1).cumsum(1).flip(1)
            total_PFT += acc_FTP.permute(2, 0, 1)
        self.pos_P += (y_NP & valid_NP).double().sum(0)
        self.n_P += valid_NP.double().sum(0)

    def _update_dense(self, f_NF: torch.Tensor, y_NP: torch.Tensor, valid_NP: torch.Tensor) -> None:
        f_NF = f_NF.float().cpu()
        yv_PN = (y_NP & valid_NP).float().cpu().T
        v_PN = valid_NP.float().cpu().T
        # float32 counts are exact per batch (< 2**24 tokens); the running sums are float64
        for j, t in enumerate(self.thresholds.tolist()):
            fire_NF = _fire_NF(f_NF, self.max_F, t)
            self.tp_PFT[:, :, j] += yv_PN @ fire_NF
            self.pp_PFT[:, :, j] += v_PN @ fire_NF
        self.pos_P += yv_PN.double().sum(1)
        self.n_P += v_PN.double().sum(1)

    def f1_PFT(self) -> torch.Tensor:
        denom = self.pp_PFT + self.pos_P[:, None, None]
        return torch.where(denom > 0, 2 * self.tp_PFT / denom.clamp_min(1), torch.zeros_like(denom))

    def precise_PFT(self, precision: float = PRECISION) -> torch.Tensor:
        """bool: latent i at threshold t fired here and was right at least ``precision`` of the time."""
        return (self.pp_PFT > 0) & (self.tp_PFT >= precision * self.pp_PFT)


class OrCounts:
    """F1 of the OR of a chosen latent set per (property, threshold): reconstruction's test side.

    ``sparse`` as for ThresholdCounts: only the firing entries (default), or the plain reference."""

    def __init__(
        self,
        chosen_PFT: torch.Tensor,
        max_F: torch.Tensor,
        thresholds: tuple[float, ...] = THRESHOLDS,
        sparse: bool = True,
    ):
        self.sparse = sparse
        self.chosen_PFT = chosen_PFT.float()
        self.max_F = max_F.float().cpu()
        self.thresholds = torch.tensor(thresholds, dtype=torch.float64)
        P, _, T = chosen_PFT.shape
        self.tp_PT = torch.zeros(P, T, dtype=torch.float64)
        self.pp_PT = torch.zeros(P, T, dtype=torch.float64)
        self.pos_P = torch.zeros(P, dtype=torch.float64)

    def update(self, f_NF: torch.Tensor, y_NP: torch.Tensor, valid_NP: torch.Tensor) -> None:
        for a in range(0, len(f_NF), ROWS):
            self._update(f_NF[a : a + ROWS], y_NP[a : a + ROWS], valid_NP[a : a + ROWS])

    def _update(self, f_NF: torch.Tensor, y_NP: torch.Tensor, valid_NP: torch.Tensor) -> None:
        if not self.sparse:
            return self._update_dense(f_NF, y_NP, valid_NP)
        f_NF, v_NP, y_NP = f_NF.float().cpu(), valid_NP.cpu(), y_NP.cpu()
        n_E, i_E, level_E = _levels(f_NF, self.max_F, self.thresholds.tolist())
        T = len(self.thresholds)
        fires_ET = torch.arange(T)[None] < level_E[:, None]
        # row n predicts p at t_j when any latent firing there at t_j is chosen for (p, t_j)
        hits_NTP = torch.zeros(len(f_NF), T, self.chosen_PFT.shape[0])
        hits_NTP.index_add_(0, n_E, self.chosen_PFT.permute(1, 2, 0)[i_E] * fires_ET[:, :, None])
        pred_NTP = hits_NTP > 0
        self.tp_PT += (pred_NTP & (y_NP & v_NP)[:, None]).double().sum(0).T
        self.pp_PT += (pred_NTP & v_NP[:, None]).double().sum(0).T
        self.pos_P += (y_NP & v_NP).double().sum(0)

    def _update_dense(self, f_NF: torch.Tensor, y_NP: torch.Tensor, valid_NP: torch.Tensor) -> None:
        f_NF = f_NF.float().cpu()
        v_NP, y_NP = valid_NP.cpu(), y_NP.cpu()
        for j, t in enumerate(self.thresholds.tolist()):
            pred_NP = (_fire_NF(f_NF, self.max_F, t) @ self.chosen_PFT[:, :, j].T) > 0
            self.tp_PT[:, j] += (pred_NP & y_NP & v_NP).double().sum(0)
            self.pp_PT[:, j] += (pred_NP & v_NP).double().sum(0)
        self.pos_P += (y_NP & v_NP).double().sum(0)

    def f1_PT(self) -> torch.Tensor:
        denom = self.pp_PT + self.pos_P[:, None]
        return torch.where(denom > 0, 2 * self.tp_PT / denom.clamp_min(1), torch.zeros_like(denom))


def coverage(counts: ThresholdCounts, names: tuple[str, ...]) -> dict:
    """Coverage, best threshold and per-property best latent (see the module docstring)."""
    f1_PFT = counts.f1_PFT()
    has_P = counts.pos_P > 0
    best_PT = f1_PFT.max(dim=1).values  # best latent per (p, t)
    per_prop = {}
    for p, name in enumerate(names):
        if not has_P[p]:
            per_prop[name] = None
            continue
        flat = int(f1_PFT[p].argmax())
        i, t = divmod(flat, f1_PFT.shape[2])
        per_prop[name] = {
            "f1": float(f1_PFT[p, i, t]),
            "latent": i,
            "t": THRESHOLDS[t] if len(counts.thresholds) == len(THRESHOLDS) else float(counts.thresholds[t]),
            "positives": int(counts.pos_P[p]),
            "tokens": int(counts.n_P[p]),
        }
    if not has_P.any():
        return {"coverage": None, "best_t": None, "coverage_at_best_t": None, "per_property": per_prop}
    mean_T = best_PT[has_P].mean(0)
    t = int(mean_T.argmax())
    return {
        "coverage": float(best_PT[has_P].max(dim=1).values.mean()),
        "best_t": float(counts.thresholds[t]),
        "coverage_at_best_t": float(mean_T[t]),
        "per_property": per_prop,
    }


def reconstruction(ors: OrCounts, names: tuple[str, ...]) -> dict:
    """Mean OR-F1 over properties at the best threshold, and each property's F1 there."""
    f1_PT = ors.f1_PT()
    has_P = ors.pos_P > 0
    if not has_P.any():
        return {"reconstruction": None, "t": None, "per_property": dict.fromkeys(names)}
    mean_T = f1_PT[has_P].mean(0)
    t = int(mean_T.argmax())
    return {
        "reconstruction": float(mean_T[t]),
        "t": float(ors.thresholds[t]),
        "per_property": {n: (float(f1_PT[p, t]) if has_P[p] else None) for p, n in enumerate(names)},
        "n_latents": {n: int(ors.chosen_PFT[p, :, t].sum()) for p, n in enumerate(names)},
    }
