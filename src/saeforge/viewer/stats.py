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
Both "keep the best k" lists use one merge: topk over the kept and the new candidates; admitted
entries overwrite evicted slots, so only changes cost anything. The work is on nonzero latents only.
Payload per kept context: token ids [L] (-1 outside the window) and activations [L] of that feature.

The decoder view (Pearce on absorption): with ``proj_STF`` (x . W_dec[i] / ||W_dec[i]|| at every token) a
third list keeps the top-k windows by the max projection on each feature's decoder direction, with the
projections as the payload: the contexts the direction "reads" whether or not the encoder fires there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saeforge.viewer.db import DBError

NEG_INF = float("-inf")


STATE_KEYS = (
    "fire_count_F",
    "act_sum_F",
    "max_F",
    "hist_width_F",
    "hist_FH",
    "max_first_F",
    "max_rest_F",
    "peak_first_F",
    "fire_windows_F",
)
EMPTY = -3.0e38  # score of an empty slot: above -inf (a candidate that did not fire), below any real score


@dataclass
class Kept:
    """Up to K contexts per feature in unordered slots: score_FK (EMPTY = no context), window id, act at the
    max, snippet tokens_FKL (-1 outside the window) and acts_FKL. ``ordered`` sorts them best first."""

    score_FK: Tensor
    value_FK: Tensor
    window_FK: Tensor
    tokens_FKL: Tensor
    acts_FKL: Tensor

    @classmethod
    def empty(cls, F: int, K: int, L: int) -> Kept:
        return cls(
            torch.full((F, K), EMPTY),
            torch.zeros(F, K),
            torch.full((F, K), -1, dtype=torch.int64),
            torch.full((F, K, L), -1, dtype=torch.int32),
            torch.zeros(F, K, L),
        )

    def ordered(self, f: int) -> list[int]:
        """Filled slots of feature f, best score first."""
        return [
            k for k in self.score_FK[f].argsort(descending=True, stable=True).tolist() if self.score_FK[f, k] > EMPTY
        ]

    def merge(self, score_FS: Tensor, value_FS: Tensor, window_FS: Tensor, snippets) -> None:
        """Keep the K best of (kept, new) per feature; a new entry that gets in takes an evicted slot.

        Candidates that did not fire carry -inf, so they never displace even an empty slot. Payloads are
        built only for the entries that get in (``snippets(s_M, f_M) -> (tokens_ML, acts_ML)`` for window
        slot s of feature f): the cost follows the number of changes, which falls as the lists fill.
        """
        F, K = self.score_FK.shape
        best_FK = torch.cat([self.score_FK, score_FS], 1).topk(K, dim=1).indices
        chosen = torch.zeros(F, K + score_FS.shape[1], dtype=torch.bool).scatter_(1, best_FK, True)
        # nonzero() lists both in (feature, position) order and each feature evicts as many slots as it
        # admits new entries, so the i-th evicted slot pairs with the i-th admitted entry.
        f_out, k_out = (~chosen[:, :K]).nonzero(as_tuple=True)
        f_in, s_in = chosen[:, K:].nonzero(as_tuple=True)
        if f_in.numel() == 0:
            return
        self.score_FK[f_out, k_out] = score_FS[f_in, s_in]
        self.value_FK[f_out, k_out] = value_FS[f_in, s_in]
        self.window_FK[f_out, k_out] = window_FS[f_in, s_in]
        tokens_ML, acts_ML = snippets(s_in, f_in)
        self.tokens_FKL[f_out, k_out] = tokens_ML
        self.acts_FKL[f_out, k_out] = acts_ML

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        return {
            f"{prefix}.{k}": getattr(self, k) for k in ("score_FK", "value_FK", "window_FK", "tokens_FKL", "acts_FKL")
        }

    @classmethod
    def from_tensors(cls, d: dict[str, Tensor], prefix: str) -> Kept:
        return cls(*(d[f"{prefix}.{k}"] for k in ("score_FK", "value_FK", "window_FK", "tokens_FKL", "acts_FKL")))


def _window_max(n_M: Tensor, j_M: Tensor, v_M: Tensor, S: int, T: int, F: int) -> tuple[Tensor, Tensor]:
    """Per (window, feature) of the entries (flat row n_M = window * T + position, feature j_M, value v_M):
    the maximum (0 where none) and its first position (T - 1 where none)."""
    key_M = (n_M // T) * F + j_M
    wmax = torch.zeros(S * F).scatter_reduce_(0, key_M, v_M, "amax")
    at_max = v_M == wmax[key_M]
    wpos = torch.full((S * F,), T - 1, dtype=torch.long).scatter_reduce_(0, key_M[at_max], (n_M % T)[at_max], "amin")
    return wmax.view(S, F), wpos.view(S, F)


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
        # the first-position artefact (first kept token of a window, right after BOS): max there and elsewhere,
        # and how many firing windows peak there
        self.max_first_F = torch.zeros(d_sae)
        self.max_rest_F = torch.zeros(d_sae)
        self.peak_first_F = torch.zeros(d_sae, dtype=torch.int64)
        self.fire_windows_F = torch.zeros(d_sae, dtype=torch.int64)
        self.top = Kept.empty(d_sae, top_k, L)
        self.top_rest = Kept.empty(d_sae, top_k, L)  # the same, with the first position ignored
        self.sample = Kept.empty(d_sae, sample, L)
        self.top_dec: Kept | None = None  # decoder-projection contexts, made on the first update that has them

    # ---- one LM pass -------------------------------------------------------------------
    def update(self, tokens_ST: Tensor, f_STF: Tensor, keep_ST: Tensor, proj_STF: Tensor | None = None) -> None:
        """Fold in latents ``f_STF`` (float32, cpu, >= 0) of windows ``tokens_ST``; ``keep_ST`` False = ignore.

        Works on the nonzero entries only (latents are sparse: TopK-32 of 4608 is 0.7%); ``f_STF`` is
        zeroed in place at ignored positions. ``proj_STF`` (dense, any sign): decoder projections for the
        decoder-view list.
        """
        if proj_STF is not None:
            self._update_decoder(tokens_ST, proj_STF, keep_ST)
        S, T, F = f_STF.shape
        f_NF = f_STF.view(-1, F)
        f_NF[~keep_ST.reshape(-1)] = 0.0
        self.n_tokens += int(keep_ST.sum())
        n_M, j_M = (f_NF > 0).nonzero(as_tuple=True)
        v_M = f_NF[n_M, j_M]

        self.fire_count_F += torch.bincount(j_M, minlength=F)
        self.act_sum_F.index_add_(0, j_M, v_M.double())
        self.max_F = self.max_F.scatter_reduce(0, j_M, v_M, "amax")
        self._histogram(j_M, v_M)
        first_ST = keep_ST & (keep_ST.cumsum(1) == 1)  # the first kept position of each window
        at_first_M = first_ST.reshape(-1)[n_M]
        self.max_first_F = self.max_first_F.scatter_reduce(0, j_M[at_first_M], v_M[at_first_M], "amax")
        self.max_rest_F = self.max_rest_F.scatter_reduce(0, j_M[~at_first_M], v_M[~at_first_M], "amax")

        wmax_SF, wpos_SF = _window_max(n_M, j_M, v_M, S, T, F)
        first_pos_S1 = first_ST.float().argmax(1, keepdim=True)  # 0 for a window with no kept token: no firing
        self.fire_windows_F += (wmax_SF > 0).sum(0)
        at_first_SF = (wmax_SF > 0) & (wpos_SF == first_pos_S1)
        self.peak_first_F += at_first_SF.sum(0)
        offs_L = torch.arange(-self.left, self.right + 1)

        def snippets_at(wpos_SF: Tensor):
            def snippets(s_M: Tensor, f_M: Tensor) -> tuple[Tensor, Tensor]:
                pos_ML = wpos_SF[s_M, f_M][:, None] + offs_L
                inside = (pos_ML >= 0) & (pos_ML < T)
                row_ML = s_M[:, None] * T + pos_ML.clamp(0, T - 1)  # flat (window, position): one take() each
                toks = tokens_ST.reshape(-1).take(row_ML).to(torch.int32).masked_fill(~inside, -1)
                acts = f_NF.view(-1).take(row_ML * F + f_M[:, None]).masked_fill(~inside, 0.0)
                return toks, acts

            return snippets

        snippets = snippets_at(wpos_SF)
        window_FS = torch.arange(self.n_windows, self.n_windows + S).expand(F, S)
        # the top list without the first position: only windows whose max is there change, so only they
        # are recomputed (from the other positions) and offered again
        if at_first_SF.any():
            rest = ~at_first_M
            rmax_SF, rpos_SF = _window_max(n_M[rest], j_M[rest], v_M[rest], S, T, F)
            rmax_SF = torch.where(at_first_SF, rmax_SF, wmax_SF)
            rpos_SF = torch.where(at_first_SF, rpos_SF, wpos_SF)
            rest_snippets = snippets_at(rpos_SF)
        else:
            rmax_SF, rest_snippets = wmax_SF, snippets
        rvalue_FS = rmax_SF.T.contiguous()
        self.top_rest.merge(rvalue_FS.masked_fill(~(rmax_SF > 0).T, NEG_INF), rvalue_FS, window_FS, rest_snippets)

        fires_FS = (wmax_SF > 0).T
        value_FS = wmax_SF.T.contiguous()
        self.n_windows += S
        self.top.merge(value_FS.masked_fill(~fires_FS, NEG_INF), value_FS, window_FS, snippets)
        # A fresh generator per pass, seeded by the pass number: resuming reproduces the same keys.
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.n_updates)
        key_FS = torch.rand(F, S, generator=g)
        self.sample.merge((-key_FS).masked_fill(~fires_FS, NEG_INF), value_FS, window_FS, snippets)
        self.n_updates += 1

    def _update_decoder(self, tokens_ST: Tensor, proj_STF: Tensor, keep_ST: Tensor) -> None:
        """Top windows by max projection over kept positions (dense: projections are rarely 0)."""
        S, T, F = proj_STF.shape
        if self.top_dec is None:
            self.top_dec = Kept.empty(F, self.top.score_FK.shape[1], self.left + 1 + self.right)
        masked_STF = proj_STF.masked_fill(~keep_ST[:, :, None], NEG_INF)
        wmax_SF, wpos_SF = masked_STF.max(dim=1)  # first position of the max on ties
        offs_L = torch.arange(-self.left, self.right + 1)

        def snippets(s_M: Tensor, f_M: Tensor) -> tuple[Tensor, Tensor]:
            pos_ML = wpos_SF[s_M, f_M][:, None] + offs_L
            inside = (pos_ML >= 0) & (pos_ML < T)
            row_ML = s_M[:, None] * T + pos_ML.clamp(0, T - 1)
            toks = tokens_ST.reshape(-1).take(row_ML).to(torch.int32).masked_fill(~inside, -1)
            vals = proj_STF.reshape(-1).take(row_ML * F + f_M[:, None]).masked_fill(~inside, 0.0)
            return toks, vals

        window_FS = torch.arange(self.n_windows, self.n_windows + S).expand(F, S)
        value_FS = wmax_SF.T.contiguous()
        self.top_dec.merge(value_FS, value_FS.masked_fill(value_FS == NEG_INF, 0.0), window_FS, snippets)

    def _histogram(self, j_M: Tensor, v_M: Tensor) -> None:
        chunk_max_F = torch.zeros(self.F).scatter_reduce_(0, j_M, v_M, "amax")
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
        bins = torch.floor(v_M / self.hist_width_F[j_M]).long()
        self.hist_FH.view(-1).index_add_(0, j_M * self.H + bins, torch.ones_like(bins))

    # ---- resume ------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict[str, int]]:
        tensors = {
            **{k: getattr(self, k) for k in STATE_KEYS},
            **self.top.tensors("top"),
            **self.top_rest.tensors("top_rest"),
            **self.sample.tensors("sample"),
            **(self.top_dec.tensors("top_dec") if self.top_dec is not None else {}),
        }
        return tensors, {"n_tokens": self.n_tokens, "n_windows": self.n_windows, "n_updates": self.n_updates}

    def load(self, tensors: dict[str, Tensor], counters: dict[str, int]) -> None:
        for k in STATE_KEYS:
            if k not in tensors or tensors[k].shape != getattr(self, k).shape:
                raise DBError(
                    f"index checkpoint has {k} of shape {list(tensors[k].shape) if k in tensors else None}, expected "
                    f"{list(getattr(self, k).shape)}; delete the .index-state folder to start over"
                )
            setattr(self, k, tensors[k])
        self.top = Kept.from_tensors(tensors, "top")
        self.top_rest = Kept.from_tensors(tensors, "top_rest")
        self.sample = Kept.from_tensors(tensors, "sample")
        self.top_dec = Kept.from_tensors(tensors, "top_dec") if "top_dec.score_FK" in tensors else None
        self.n_tokens, self.n_windows, self.n_updates = (
            counters["n_tokens"],
            counters["n_windows"],
            counters["n_updates"],
        )
