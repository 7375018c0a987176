"""``saeforge export-neuronpedia``: a feature database as the batch files a Neuronpedia upload takes.

Layout follows SAEDashboard's NeuronpediaRunner output (the files Neuronpedia's importer reads):
``batch-{n}.json`` = {model_id, layer, sae_set, features: [{feature_index, pos_str, pos_values,
neg_str, neg_values, frac_nonzero, freq_hist_data_bar_heights / _values, n_prompts_total,
n_tokens_in_prompt, dataset, activations: [{bin_min, bin_max, bin_contains, tokens, values}], ...}]},
plus ``run_settings.json`` describing the run. Fields we do not compute (neuron alignment, correlated
neurons/features, logit histogram, decoder weight distribution) are written as empty lists. Checked
against that class's field names, not against a live upload.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from saeforge.io import atomic_write_text
from saeforge.viewer.db import FeatureDB
from saeforge.viewer.featurejson import logit_and_density_fields

EMPTY_FIELDS = (
    "neuron_alignment_indices",
    "neuron_alignment_values",
    "neuron_alignment_l1",
    "correlated_neurons_indices",
    "correlated_neurons_l1",
    "correlated_neurons_pearson",
    "correlated_features_indices",
    "correlated_features_l1",
    "correlated_features_pearson",
    "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values",
    "decoder_weights_dist",
)


def layer_of(hook: str) -> int:
    m = re.search(r"(?:blocks|layers|h)\.(\d+)", hook)
    return int(m.group(1)) if m else 0


def feature_record(d: FeatureDB, f: dict[str, Any]) -> dict[str, Any]:
    groups: dict[tuple[str, int], list[dict]] = {}
    for c in f["contexts"]:
        groups.setdefault((c["kind"], c["interval"]), []).append(c)
    n_sample = sum(len(v) for (kind, _), v in groups.items() if kind == "quantile") or 1
    acts = []
    for (kind, _), cs in groups.items():
        lo, hi = min(c["max_act"] for c in cs), max(c["max_act"] for c in cs)
        # top group: the interval of the k largest; quantile groups: their share of the uniform sample
        share = len(cs) / n_sample if kind == "quantile" else len(cs) / max(f["fire_count"], 1)
        acts += [
            {"bin_min": lo, "bin_max": hi, "bin_contains": share, "tokens": c["tokens"], "values": c["acts"]}
            for c in cs
        ]
    return {
        "feature_index": f["index"],
        **{k: [] for k in EMPTY_FIELDS},
        **logit_and_density_fields(f),
        "n_prompts_total": d.meta["n_windows"],
        "n_tokens_in_prompt": d.meta["context_size"],
        "dataset": d.meta["corpus"],
        "activations": acts,
        # SAEDashboard writes none; Neuronpedia's importer takes explanations as {description, ...} objects
        "explanations": [
            {"description": e["text"], "explanation_model_name": e["explainer"], "scores": e["scores"]}
            for e in d.explanations(f["index"])
        ],
    }


def export_neuronpedia(
    db_path: str | Path, out: str | Path, batch_size: int = 128, progress: bool = True
) -> list[Path]:
    from tqdm import tqdm

    d = FeatureDB(db_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = d.meta
    head = {"model_id": m["model_id"], "layer": layer_of(m["hook"]), "sae_set": m["sae_id"]}
    files = []
    for start in tqdm(range(0, d.d_sae, batch_size), disable=not progress, desc="export", unit="batch"):
        feats = [feature_record(d, d.feature(i)) for i in range(start, min(start + batch_size, d.d_sae))]
        path = out / f"batch-{start // batch_size}.json"
        atomic_write_text(path, json.dumps({**head, "features": feats}))
        files.append(path)
    settings = {
        **head,
        "model": m["model"],
        "hook": m["hook"],
        "d_sae": m["d_sae"],
        "n_tokens": m["n_tokens"],
        "n_prompts_total": m["n_windows"],
        "n_tokens_in_prompt": m["context_size"],
        "dataset": m["corpus"],
        "n_features_per_batch": batch_size,
        "source": "saeforge export-neuronpedia",
    }
    atomic_write_text(out / "run_settings.json", json.dumps(settings, indent=2))
    return files + [out / "run_settings.json"]
