"""p-annealing of the sparsity penalty (relu, gated): lambda * sum_i |f_i|^p with p going from 1 to p_end.

Schedule (train.p_end, p_anneal_start_fraction, p_anneal_end_fraction, p_anneal_updates = n): p changes
n times, at steps s_k = start + round(k * (end - start) / n), k = 1..n, to p_k = 1 + (p_end - 1) * k / n,
where start/end are those fractions of the run's steps. So p falls linearly, in n equal steps, from 1
(before s_1) to p_end (from s_n on); an L1 run is the p_end = 1 case and takes none of this code's paths.

Lambda rule (as dictionary_learning's PAnnealTrainer, the p-annealing paper's code): |f|^p of the same
latents can be much larger or smaller than |f|^p' (values below 1 grow as p falls), so a fixed lambda
would make each change of p a jump in sparsity pressure. Between changes every batch also measures
the penalty at the coming p (LossContext.p_probe); at a change lambda_scale *= mean penalty at the old
p / mean penalty at the new p, both over the batches since the previous change. Right after the change
the penalty therefore has the size it had right before it. lambda_scale multiplies
LossContext.sparsity_scale (the warm-up factor is applied on top, unchanged).
"""

from __future__ import annotations

import torch

from saeforge.config import ConfigError, TrainConfig

P_ANNEAL_ARCHS = ("relu", "gated")


def check_p_anneal(train: TrainConfig, sae_cfg) -> None:
    arch = getattr(sae_cfg, "architecture", "")
    if train.p_end < 1 and arch not in P_ANNEAL_ARCHS:
        raise ConfigError(
            f"train.p_end={train.p_end} (p-annealing) works with an L1-style penalty: sae.architecture "
            f"relu or gated, not {arch!r}; leave train.p_end at 1 for {arch}"
        )


class PAnneal:
    """The p schedule and lambda rescale; its state (lambda_scale, the probe sums) is in the checkpoint."""

    def __init__(self, cfg: TrainConfig, n_steps: int) -> None:
        self.on = cfg.p_end < 1
        start, end = int(cfg.p_anneal_start_fraction * n_steps), int(cfg.p_anneal_end_fraction * n_steps)
        n = cfg.p_anneal_updates
        self.change_steps = [start + round(k * (end - start) / n) for k in range(1, n + 1)]
        self.p_values = [1 + (cfg.p_end - 1) * k / n for k in range(1, n + 1)]
        self.lambda_scale = 1.0
        # [sum of the penalty at p, sum of the penalty at the probe p] over the batches since the last change
        self.sums_2 = torch.zeros(2, dtype=torch.float64)

    def p_at(self, step: int) -> float:
        k = sum(s <= step for s in self.change_steps)
        return 1.0 if k == 0 else self.p_values[k - 1]

    def probe_at(self, step: int) -> float | None:
        """The p of the next change (None after the last one)."""
        later = [s for s in self.change_steps if s > step]
        return self.p_at(later[0]) if later else None

    def begin_step(self, step: int, gather_rows) -> tuple[float, float | None]:
        """(p, p_probe) for this step; at a change, rescale lambda first.

        ``gather_rows`` is the trainer's ``_gather_rows``: every rank sums all ranks' probe sums, so the
        ranks agree on lambda (ratio of sums = ratio of means: every rank sees the same number of batches).
        """
        if not self.on:
            return 1.0, None
        if step in self.change_steps and self.p_at(step) != self.p_at(step - 1):
            old_new_2 = gather_rows(self.sums_2[None].float()).double().sum(0)
            if old_new_2[0] > 0 and old_new_2[1] > 0:  # no probe batches (or no firing): keep lambda
                self.lambda_scale *= float(old_new_2[0] / old_new_2[1])
            self.sums_2 = torch.zeros_like(self.sums_2)
        return self.p_at(step), self.probe_at(step)

    def observe(self, parts: dict[str, torch.Tensor]) -> None:
        """Add this batch's penalty at p and at the probe p (the SAE's parts "l1" and "lp_probe")."""
        if self.on and "lp_probe" in parts:
            pair_2 = torch.stack([parts["l1"], parts["lp_probe"]]).double()
            self.sums_2 = self.sums_2.to(pair_2.device) + pair_2  # stays on the device: no sync per step

    def state_dict(self) -> dict:
        return {"lambda_scale": self.lambda_scale, "sums": self.sums_2.cpu()}

    def load_state_dict(self, d: dict, device: torch.device) -> None:
        self.lambda_scale = float(d["lambda_scale"])
        self.sums_2 = d["sums"].to(device)
