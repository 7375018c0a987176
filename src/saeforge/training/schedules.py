"""Learning-rate and sparsity-coefficient schedules, as plain functions of the step."""

from __future__ import annotations


def lr_factor(step: int, n_steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """Linear warm-up from ~0 to 1, flat, then linear decay to 0 over the last ``decay_fraction`` of steps."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    decay_steps = int(n_steps * decay_fraction)
    if decay_steps <= 0:
        return warm
    decay_start = n_steps - decay_steps
    decay = 1.0 if step < decay_start else max(0.0, (n_steps - step) / decay_steps)
    return min(warm, decay)


def sparsity_factor(step: int, n_steps: int, warmup_fraction: float) -> float:
    """Ramp the sparsity coefficient from 0 to 1 over the first ``warmup_fraction`` of steps."""
    warm_steps = int(n_steps * warmup_fraction)
    return 1.0 if warm_steps <= 0 else min(1.0, (step + 1) / warm_steps)
