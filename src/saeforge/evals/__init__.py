"""Evaluation: float64 reconstruction metrics, spliced CE/KL, and the evaluate() report."""

from saeforge.evals.metrics import ReconstructionStats
from saeforge.evals.report import evaluate, format_table, write_eval_json
from saeforge.evals.splice import spliced_ce_kl

__all__ = ["ReconstructionStats", "evaluate", "format_table", "spliced_ce_kl", "write_eval_json"]
