"""The feature JSON the viewer serves (``GET /api/feature/{model}/{sae}/{index}``: Neuronpedia's shape plus a
saeforge block), and its precomputed form.

A feature's JSON has two parts. What ``saeforge index`` writes (statistics, contexts, logit lens, neighbours,
first-position figures, the decoder view) never changes once the database is renamed into place, so index
encodes that part for every feature and stores it zlib-compressed in table ``feature_json`` (~7 KB a feature
for ~29 KB of JSON on the demo SAE); serving it is a primary-key read and a decompression instead of a dozen
queries and ~1,000 JSON decodes. What later commands add to the database, ``explanations`` (``saeforge
explain``) and ``meta`` (``saeforge meta``), is read per request and appended as the object's last two keys.
A database without the table (built before it existed, or by hand), or whose table holds another version's
shape (meta key ``feature_json_version``), gets the same bytes built from its tables,
and so does every ``exclude_first`` request (a variant that only features peaking after BOS have).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

from saeforge.viewer import db
from saeforge.viewer.db import FeatureDB
from saeforge.viewer.jsoncache import encode
from saeforge.viewer.metadb import meta_for

TABLE = "feature_json"
# The shape of the stored part. Raise it with any change to what index_part returns: a database stored under
# another version is served from its tables (correct, slower) until `saeforge index` rebuilds it.
VERSION = 1
SCHEMA = f"CREATE TABLE {TABLE} (feature INTEGER PRIMARY KEY, body BLOB NOT NULL)"
LEVEL = 6  # zlib level: 13% fewer bytes than 1 on the demo SAE for 0.4 ms more a feature at index time
CHUNK = 256  # features encoded between commits (see precompute)


def logit_and_density_fields(f: dict[str, Any]) -> dict[str, Any]:
    """The logit-lens lists, density and activation histogram under the names Neuronpedia uses both in its
    feature JSON and in its upload batches."""
    width = f["hist_width"]
    return {
        "frac_nonzero": f["density"],
        "pos_str": [s for _, s, _ in f["pos"]],
        "pos_values": [v for _, _, v in f["pos"]],
        "neg_str": [s for _, s, _ in f["neg"]],
        "neg_values": [v for _, _, v in f["neg"]],
        "freq_hist_data_bar_heights": f["hist"],
        "freq_hist_data_bar_values": [(i + 0.5) * width for i in range(len(f["hist"]))],
    }


def neuronpedia_feature(dbx: FeatureDB, f: dict[str, Any]) -> dict[str, Any]:
    """The index-time part of a feature in the shape of Neuronpedia's /api/feature/{model}/{sae}/{index}, plus a
    saeforge block (``feature_bytes`` appends the explanations and meta-latents)."""
    m, width = dbx.meta, f["hist_width"]
    acts = []
    by_interval: dict[int, list[float]] = {}
    for c in f["contexts"]:
        if c["kind"] == "quantile":
            by_interval.setdefault(c["interval"], []).append(c["max_act"])
    n_sample = sum(len(v) for v in by_interval.values()) or 1
    for c in f["contexts"]:
        quant = c["kind"] == "quantile"
        iv = by_interval.get(c["interval"], [])
        acts.append(
            {
                "tokens": c["tokens"],
                "values": c["acts"],
                "maxValue": c["max_act"],
                "maxValueTokenIndex": c["max_pos"],
                "minValue": min(c["acts"]) if c["acts"] else 0.0,
                "binMin": min(iv) if quant else None,
                "binMax": max(iv) if quant else None,
                "binContains": len(iv) / n_sample if quant else None,
                "kind": c["kind"],
                "interval": c["interval"],
                "window": c["window"],
            }
        )
    return {
        "modelId": m["model_id"],
        "layer": m["sae_id"],
        "index": str(f["index"]),
        "maxActApprox": f["max_act"],
        **logit_and_density_fields(f),
        "topkCosSimIndices": [n["index"] for n in f["neighbours"]],
        "topkCosSimValues": [n["cosine"] for n in f["neighbours"]],
        "activations": acts,
        "saeforge": {
            "hook": m["hook"],
            "density": f["density"],
            "fire_count": f["fire_count"],
            "mean_act": f["mean_act"],
            "hist_bin_width": width,
            "n_tokens": m["n_tokens"],
            "d_sae": m["d_sae"],
            "pos_token_ids": [t for t, _, _ in f["pos"]],
            "neg_token_ids": [t for t, _, _ in f["neg"]],
        },
    }


def neuronpedia_explanation(e: dict[str, Any]) -> dict[str, Any]:
    """One stored explanation as a Neuronpedia explanation object; ``score`` is the simulation score."""
    kind, _, model = e["explainer"].partition(":")
    return {
        "description": e["text"],
        "typeName": f"saeforge-{kind}",
        "explanationModelName": model or kind,
        "score": e["scores"].get("simulation"),
        "scores": e["scores"],
        "created": e["created"],
    }


def index_part(d: FeatureDB, idx: int, exclude_first: bool = False) -> dict[str, Any] | None:
    """What ``saeforge index`` wrote about feature ``idx``, as the served object; None if there is no such feature."""
    f = d.feature(idx, exclude_first=exclude_first)
    if f is None:
        return None
    out = neuronpedia_feature(d, f)
    # null in a database built before first-position statistics
    out["saeforge"]["first_position"] = d.first_position([idx]).get(idx)
    # the decoder view: null in a database built without it
    view = d.decoder_view(idx)
    out["decoder_contexts"] = view and [
        {"tokens": c["tokens"], "values": c["acts"], "maxValue": c["max_act"], "maxValueTokenIndex": c["max_pos"]}
        | {"window": c["window"]}
        for c in view["decoder_contexts"]
    ]
    out["saeforge"]["encoder_decoder"] = view and {k: view[k] for k in ("jaccard", "n_enc", "n_dec")}
    return out


def is_stored(d: FeatureDB) -> bool:
    """Whether the database holds the index-time JSON in this version's shape."""
    return d.meta.get("feature_json_version") == VERSION and d.has_table(TABLE)


def feature_bytes(d: FeatureDB, idx: int, exclude_first: bool = False, stored_only: bool = False) -> bytes | None:
    """The served JSON of feature ``idx``: the index-time part (stored, or built) with ``explanations`` and
    ``meta`` appended; None if there is no such feature. ``stored_only``: None rather than build the part
    (milliseconds) when it is not stored, so a caller can build it elsewhere (the server, in its thread pool)."""
    stored = (
        None if exclude_first or not is_stored(d) else d.query(f"SELECT body FROM {TABLE} WHERE feature = ?", (idx,))
    )
    if stored:
        head = zlib.decompress(stored[0][0])
    elif stored_only:
        return None
    else:
        part = index_part(d, idx, exclude_first)
        if part is None:
            return None
        head = encode(part)
    later = encode(
        {"explanations": [neuronpedia_explanation(e) for e in d.explanations(idx)], "meta": meta_for(d, idx)}
    )
    return head[:-1] + b"," + later[1:]  # both are non-empty objects: {...head...,...later...}


def precompute(path: Path) -> int:
    """Store every feature's index-time JSON in table ``feature_json`` of the finished database at ``path``
    (called by ``saeforge index`` before it renames the file into place); returns the number of features.
    Commits every CHUNK features, so that the reading connection never meets a write lock held across reads."""
    d = FeatureDB(path)
    con = db.connect_unrenamed(path)
    try:
        con.execute(SCHEMA)
        con.commit()
        for start in range(0, d.d_sae, CHUNK):
            rows = []
            for i in range(start, min(start + CHUNK, d.d_sae)):
                part = index_part(d, i)
                if part is not None:
                    rows.append((i, zlib.compress(encode(part), LEVEL)))
            con.executemany(f"INSERT INTO {TABLE} VALUES (?, ?)", rows)
            con.commit()
        db.write_meta(con, {"feature_json_version": VERSION})
        con.commit()
    finally:
        con.close()
        d.close()
    return d.d_sae
