"""Metrics of one forward pass, per sequence: ``metric(logits_STV, ids_ST) -> Tensor[S]``.

Ablation and attribution score features by their effect on one of these. Per-row values (not a
batch mean) let a batch hold one variant per row (one ablated feature, one IG step) and let the
backward pass of ``sum()`` give every row its own gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from saeforge.config import UsageError

Metric = Callable[[Tensor, Tensor], Tensor]


@dataclass
class LogitDiff:
    """logit[target] - logit[other] at ``position`` (default the last): the model's preference between two tokens."""

    target: int
    other: int
    position: int = -1

    @property
    def name(self) -> str:
        return f"logit[{self.target}] - logit[{self.other}]"

    def __call__(self, logits_STV: Tensor, ids_ST: Tensor) -> Tensor:
        last_SV = logits_STV[:, self.position].float()
        return last_SV[:, self.target] - last_SV[:, self.other]


@dataclass
class TokenLogit:
    """logit[token] at ``position`` (default the last)."""

    token: int
    position: int = -1

    @property
    def name(self) -> str:
        return f"logit[{self.token}]"

    def __call__(self, logits_STV: Tensor, ids_ST: Tensor) -> Tensor:
        return logits_STV[:, self.position, self.token].float()


@dataclass
class NextTokenLoss:
    """Mean next-token cross-entropy of each sequence; logits at t predict token t+1, for t >= ``start``."""

    start: int = 0

    @property
    def name(self) -> str:
        return "next-token loss"

    def __call__(self, logits_STV: Tensor, ids_ST: Tensor) -> Tensor:
        if ids_ST.shape[1] - 1 <= self.start:
            raise UsageError(
                f"next-token loss needs prompts longer than {self.start + 1} tokens (got {ids_ST.shape[1]})"
            )
        logp_STV = torch.log_softmax(logits_STV[:, self.start : -1].float(), dim=-1)
        targets_ST1 = ids_ST[:, self.start + 1 :, None].to(logp_STV.device)
        return -logp_STV.gather(-1, targets_ST1).squeeze(-1).mean(dim=1)


def spearman(a_N: Tensor, b_N: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (average ranks for ties), in float64."""
    if a_N.shape != b_N.shape or a_N.dim() != 1 or a_N.numel() < 2:
        raise ValueError(
            f"spearman needs two 1-D tensors of one length >= 2, got {tuple(a_N.shape)} and {tuple(b_N.shape)}"
        )

    def ranks(x: Tensor) -> Tensor:
        x = x.double().cpu()
        order = x.argsort()
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        # ties get the mean of their ranks
        _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
        sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, r)
        return (sums / counts)[inverse]

    ra, rb = ranks(a_N), ranks(b_N)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / den) if den > 0 else float("nan")
