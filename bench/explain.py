"""Explanation throughput and quality per offline backend (not a test).

    python bench/explain.py FEATURES_DB [--features 200] [--backends baseline,local] [--out result.json]
    python bench/explain.py FEATURES_DB --features 0 --backends local   # the known-feature gap only

On a copy of FEATURES_DB (the original is not written): N random live features explained and scored by
each backend through `saeforge explain`'s own code (viewer.explain_run.run_explain): explanations per
minute (model load excluded), mean scores (baseline: simulation, detection; local: simulation,
detection, fuzzing and their AUCs, read from next-token probabilities: viewer/local_scores.py) and how many features failed (malformed answers). Then the known-feature gap: on
tests/explainkit.py's database, whose latents are exact Python-syntax properties, each latent's right
explanation and a wrong one (the next latent's) are scored on the same held-out contexts; gap = right -
wrong. For the baseline both are its own explanations; for the local LM they are written by hand
(RIGHT), and what the LM itself said about each latent is reported beside them.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # explainkit: the known-feature database

from explainkit import FEATURES, build_db  # noqa: E402

from saeforge.viewer import explain as ex  # noqa: E402
from saeforge.viewer.db import FeatureDB  # noqa: E402
from saeforge.viewer.explain_run import ExplainConfig, open_rw, run_explain  # noqa: E402
from saeforge.viewer.llm import MalformedAnswer, explain_messages  # noqa: E402
from saeforge.viewer.llm_local import LocalChat, LocalConfig  # noqa: E402
from saeforge.viewer.local_scores import EXPLAIN_PREFIX, local_scores  # noqa: E402

RIGHT = {
    "def name": "the name of a function, right after the keyword def",
    "string literal": "string literals (text in quotes)",
    "number": "numbers (integer literals)",
    "return": 'the keyword "return"',
}


def random_live(db: Path, n: int, seed: int) -> list[int]:
    live = [r[0] for r in FeatureDB(db).query("SELECT idx FROM features WHERE fire_count > 0 ORDER BY idx")]
    return sorted(random.Random(seed).sample(live, min(n, len(live))))


def mean_scores(db: Path, explainer: str) -> dict[str, float]:
    rows = FeatureDB(db).query(
        "SELECT scorer, AVG(value), COUNT(value) FROM scores WHERE explainer = ? GROUP BY scorer", (explainer,)
    )
    return {scorer: round(mean, 4) for scorer, mean, n in rows if n}


def throughput(db: Path, backend: str, indices: list[int], args, lm) -> dict:
    cfg = ExplainConfig(explainer=backend, n_negatives=args.n_negatives, seed=args.seed)
    local = LocalConfig(model=args.local_model, max_new_tokens=args.max_new_tokens)
    t0 = time.perf_counter()
    c = run_explain(db, cfg, progress=False, local=local, lm=lm, indices=indices)
    dt = time.perf_counter() - t0
    return {
        "explainer": c["explainer"],
        "features": len(indices),
        "done": c["done"],
        "failed": c["failed"],
        "generations": c["requests"],
        "seconds": round(dt, 1),
        "explanations_per_minute": round(c["done"] / dt * 60, 2),
        "mean_scores": mean_scores(db, c["explainer"]),
    }


def known_gap(backend: str, args, lm, tmp: Path) -> dict:
    path = build_db(tmp / f"known-{backend}.db")
    d, con = open_rw(path)
    pool = ex.negative_pool(con)
    bg, total = ex.background(con, d.texts)
    client = LocalChat(LocalConfig(model=args.local_model, max_new_tokens=args.max_new_tokens), con, lm) if lm else None
    chosen = args.known_latents.split(",") if client is not None else list(FEATURES)  # the baseline is free
    per, texts, own = {}, {}, {}
    for i, name in enumerate(FEATURES):
        if name not in chosen and FEATURES[i - 1] not in chosen:
            continue  # neither scored nor the wrong explanation of a scored latent
        f = d.feature(i)
        explain_ctx, held = ex.split_contexts(f)
        per[name] = held + ex.negatives(f, pool, d.texts, args.n_negatives, args.seed)
        if client is None:
            texts[name] = ex.baseline_explanation(explain_ctx, bg, total)
        else:
            texts[name] = RIGHT[name]
            if name not in chosen:
                continue
            try:
                own[name] = client.complete(explain_messages([c for c in explain_ctx if c.fires]), EXPLAIN_PREFIX)
            except MalformedAnswer as e:
                own[name] = f"(malformed: {e})"

    def score(text: str, held: list) -> dict | None:
        if client is None:
            return ex.baseline_scores(text, held)
        try:
            return local_scores(client, text, held, args.seed)
        except MalformedAnswer:
            return None

    rows = []
    for i, name in enumerate(FEATURES):
        if name not in chosen:
            continue
        wrong = texts[FEATURES[(i + 1) % len(FEATURES)]]
        rows.append(
            {"latent": name, "right": texts[name], "wrong": wrong, "right_scores": score(texts[name], per[name])}
        )
        rows[-1]["wrong_scores"] = score(wrong, per[name])
        if own:
            rows[-1]["own_explanation"] = own[name]
    gaps = {}
    for scorer in ("simulation", "detection", "detection_auc", "fuzzing", "fuzzing_auc"):
        pairs = [
            (r["right_scores"][scorer], r["wrong_scores"][scorer])
            for r in rows
            if r["right_scores"]
            and r["wrong_scores"]
            and None not in (r["right_scores"].get(scorer), r["wrong_scores"].get(scorer))
        ]
        if pairs:
            gaps[scorer] = round(sum(a - b for a, b in pairs) / len(pairs), 4)
            gaps[f"{scorer}_n"] = len(pairs)
    return {"gap_right_minus_wrong": gaps, "latents": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("db", type=Path, help="feature database (saeforge index); a copy is written, not this file")
    p.add_argument("--features", type=int, default=200, help="random live features explained per backend")
    p.add_argument("--local-features", type=int, default=200, help="of those, how many the local LM explains")
    p.add_argument(
        "--known-latents",
        default=",".join(FEATURES),
        help=f"latents of the local LM's known-feature gap (the baseline scores all): {FEATURES}",
    )
    p.add_argument("--backends", default="baseline,local", help="comma-separated: baseline, local")
    p.add_argument("--local-model", default="smollm2-135m")
    p.add_argument("--device", default="cpu", help="device of the local LM (float32)")
    p.add_argument("--max-new-tokens", type=int, default=LocalConfig().max_new_tokens)
    p.add_argument("--n-negatives", type=int, default=ExplainConfig().n_negatives)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the result here (JSON)")
    args = p.parse_args()
    out: dict = {"db": str(args.db), "args": {k: str(v) for k, v in vars(args).items()}}
    indices = random_live(args.db, args.features, args.seed)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        copy = tmp / "features.db"
        shutil.copy(args.db, copy)
        for backend in args.backends.split(","):
            lm = None
            if backend == "local":
                from saeforge.models import load_model

                t0 = time.perf_counter()
                lm = load_model(args.local_model, "float32", args.device)
                out["local_load_seconds"] = round(time.perf_counter() - t0, 1)
            out[backend] = throughput(
                copy, backend, indices if backend == "baseline" else indices[: args.local_features], args, lm
            )
            print(json.dumps({backend: out[backend]}, indent=1), flush=True)
            out[backend]["known"] = known_gap(backend, args, lm, tmp)
            print(json.dumps({f"{backend} known": out[backend]["known"]}, indent=1), flush=True)
    if args.out:
        from saeforge.io import atomic_write_text

        atomic_write_text(args.out, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
