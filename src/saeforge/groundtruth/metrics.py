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


class ThresholdCounts:
    """Per (property, latent, threshold) true positives and predicted positives among valid tokens."""

    def __init__(self, n_props: int, max_F: torch.Tensor, thresholds: tuple[float, ...] = THRESHOLDS):
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
    """F1 of the OR of a chosen latent set per (property, threshold): reconstruction's test side."""

    def __init__(self, chosen_PFT: torch.Tensor, max_F: torch.Tensor, thresholds: tuple[float, ...] = THRESHOLDS):
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
