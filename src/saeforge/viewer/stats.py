"""Per-feature accumulators over a stream of SAE latents, in memory bounded by F, not by tokens.

Each LM pass gives latents f_STF for S windows of T tokens. Per feature we keep:
- fire count, activation sum and max over kept tokens (BOS / special positions are zeroed first);
- a linear histogram of firing activations with ``H`` bins of a power-of-two width per feature; when a
  larger activation arrives the width doubles and adjacent bins merge in pairs, which is exact
  (floor(a / 2w) == floor(floor(a / w) / 2) for power-of-two w), so the streamed histogram equals
  the one computed over all activations with the final width;
- the top-k windows by the feature's maximum in that window (one context per window, so a single long
  run of activation does not fill the list), with a token snippet around the maximum;
- a uniform sample of R firing windows (bottom-R of a random key per (window, feature)), later split
  by activation into quantile intervals.
Both "keep the best k" lists use one merge: concatenate the kept and the new candidates, topk.
Payload per kept context: token ids [L] (-1 outside the window) and activations [L] of that feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NEG_INF = float("-inf")


@dataclass
class Kept:
    """Up to K contexts per feature: score_FK (-inf = empty), window id, act at the max, max position in
    the snippet, snippet tokens_FKL and acts_FKL."""

    score_FK: Tensor
    value_FK: Tensor
    window_FK: Tensor
    tokens_FKL: Tensor
    acts_FKL: Tensor

    @classmethod
    def empty(cls, F: int, K: int, L: int) -> "Kept":
        return cls(torch.full((F, K), NEG_INF), torch.zeros(F, K), torch.full((F, K), -1, dtype=torch.int64),
                   torch.full((F, K, L), -1, dtype=torch.int32), torch.zeros(F, K, L))

    def merge(self, score_FS: Tensor, value_FS: Tensor, window_FS: Tensor, tokens_FSL: Tensor, acts_FSL: Tensor) -> None:
        K = self.score_FK.shape[1]
        score = torch.cat([self.score_FK, score_FS], 1)
        best_FK = score.topk(K, dim=1).indices
        self.score_FK = score.gather(1, best_FK)
        self.value_FK = torch.cat([self.value_FK, value_FS], 1).gather(1, best_FK)
        self.window_FK = torch.cat([self.window_FK, window_FS], 1).gather(1, best_FK)
        idx_FKL = best_FK[..., None].expand(-1, -1, tokens_FSL.shape[2])
        self.tokens_FKL = torch.cat([self.tokens_FKL, tokens_FSL], 1).gather(1, idx_FKL)
        self.acts_FKL = torch.cat([self.acts_FKL, acts_FSL], 1).gather(1, idx_FKL)

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.{k}": getattr(self, k) for k in ("score_FK", "value_FK", "window_FK", "tokens_FKL", "acts_FKL")}

    @classmethod
    def from_tensors(cls, d: dict[str, Tensor], prefix: str) -> "Kept":
        return cls(*(d[f"{prefix}.{k}"] for k in ("score_FK", "value_FK", "window_FK", "tokens_FKL", "acts_FKL")))


class FeatureStats:
    """Streaming statistics for F features; ``update`` once per LM pass; ``state``/``load`` to resume."""

    def __init__(self, d_sae: int, top_k: int, sample: int, left: int, right: int, hist_bins: int, seed: int = 0):
        self.F, self.H, self.left, self.right, self.seed = d_sae, hist_bins, left, right, seed
        L = left + 1 + right
        self.n_tokens = 0  # kept (non-special) tokens seen
        self.n_windows = 0
        self.n_updates = 0
        self.fire_count_F = torch.zeros(d_sae, dtype=torch.int64)
        self.act_sum_F = torch.zeros(d_sae, dtype=torch.float64)
        self.max_F = torch.zeros(d_sae)
        self.hist_width_F = torch.zeros(d_sae)  # 0 until the feature first fires
        self.hist_FH = torch.zeros(d_sae, hist_bins, dtype=torch.int64)
        self.top = Kept.empty(d_sae, top_k, L)
        self.sample = Kept.empty(d_sae, sample, L)

    # ---- one LM pass -------------------------------------------------------------------
    def update(self, tokens_ST: Tensor, f_STF: Tensor, keep_ST: Tensor) -> None:
        """Fold in latents ``f_STF`` (float32, cpu) of windows ``tokens_ST``; ``keep_ST`` False = ignore."""
        S, T, F = f_STF.shape
        f_STF = f_STF * keep_ST[..., None].to(f_STF.dtype)
        self.n_tokens += int(keep_ST.sum())
        window_S = torch.arange(self.n_windows, self.n_windows + S)
        self.n_windows += S

        fired_NF = f_STF.reshape(-1, F) > 0
        self.fire_count_F += fired_NF.sum(0)
        self.act_sum_F += f_STF.reshape(-1, F).sum(0, dtype=torch.float64)
        self._histogram(f_STF.reshape(-1, F), fired_NF)

        wmax_SF, wpos_SF = f_STF.max(dim=1)
        self.max_F = torch.maximum(self.max_F, wmax_SF.max(0).values)
        tokens_FSL, acts_FSL = self._snippets(tokens_ST, f_STF, wpos_SF)
        fires_FS = (wmax_SF > 0).T
        value_FS = wmax_SF.T.contiguous()
        window_FS = window_S.expand(F, S)
        self.top.merge(value_FS.masked_fill(~fires_FS, NEG_INF), value_FS, window_FS, tokens_FSL, acts_FSL)
        # A fresh generator per pass, seeded by the pass number: resuming reproduces the same keys.
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.n_updates)
        key_FS = torch.rand(F, S, generator=g)
        self.sample.merge((-key_FS).masked_fill(~fires_FS, NEG_INF), value_FS, window_FS, tokens_FSL, acts_FSL)
        self.n_updates += 1

    def _snippets(self, tokens_ST: Tensor, f_STF: Tensor, wpos_SF: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids and this feature's acts at positions max-left .. max+right of every (window, feature)."""
        S, T, F = f_STF.shape
        offs_L = torch.arange(-self.left, self.right + 1)
        pos_SLF = wpos_SF[:, None, :] + offs_L[None, :, None]
        inside_SLF = (pos_SLF >= 0) & (pos_SLF < T)
        pos_SLF = pos_SLF.clamp(0, T - 1)
        acts_SLF = f_STF.gather(1, pos_SLF).masked_fill(~inside_SLF, 0.0)
        tok_SLF = tokens_ST.gather(1, pos_SLF.reshape(S, -1)).reshape(pos_SLF.shape).to(torch.int32)
        tok_SLF = tok_SLF.masked_fill(~inside_SLF, -1)
        return tok_SLF.permute(2, 0, 1), acts_SLF.permute(2, 0, 1)

    def _histogram(self, f_NF: Tensor, fired_NF: Tensor) -> None:
        chunk_max_F = f_NF.max(0).values
        fresh = (self.hist_width_F == 0) & (chunk_max_F > 0)
        if fresh.any():
            # smallest power of two with H * w > max, so the first max lands in the top half
            w = torch.exp2(torch.floor(torch.log2(chunk_max_F[fresh] / self.H)) + 1)
            self.hist_width_F[fresh] = w
        while True:
            grow = (self.hist_width_F > 0) & (chunk_max_F >= self.H * self.hist_width_F)
            if not grow.any():
                break
            c = self.hist_FH[grow]
            merged = c.view(c.shape[0], self.H // 2, 2).sum(-1)
            self.hist_FH[grow] = torch.cat([merged, torch.zeros_like(merged)], 1)
            self.hist_width_F[grow] *= 2
        n_idx, f_idx = fired_NF.nonzero(as_tuple=True)
        bins = torch.floor(f_NF[n_idx, f_idx] / self.hist_width_F[f_idx]).long()
        self.hist_FH.view(-1).index_add_(0, f_idx * self.H + bins, torch.ones_like(bins))

    # ---- resume ------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict[str, int]]:
        tensors = {"fire_count_F": self.fire_count_F, "act_sum_F": self.act_sum_F, "max_F": self.max_F,
                   "hist_width_F": self.hist_width_F, "hist_FH": self.hist_FH,
                   **self.top.tensors("top"), **self.sample.tensors("sample")}
        return tensors, {"n_tokens": self.n_tokens, "n_windows": self.n_windows, "n_updates": self.n_updates}

    def load(self, tensors: dict[str, Tensor], counters: dict[str, int]) -> None:
        for k in ("fire_count_F", "act_sum_F", "max_F", "hist_width_F", "hist_FH"):
            if tensors[k].shape != getattr(self, k).shape:
                raise ValueError(f"index checkpoint has {k} of shape {list(tensors[k].shape)}, expected "
                                 f"{list(getattr(self, k).shape)}; delete the .index-state folder to start over")
            setattr(self, k, tensors[k])
        self.top = Kept.from_tensors(tensors, "top")
        self.sample = Kept.from_tensors(tensors, "sample")
        self.n_tokens, self.n_windows, self.n_updates = counters["n_tokens"], counters["n_windows"], counters["n_updates"]
