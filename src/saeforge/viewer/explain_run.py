"""``saeforge explain DB``: explain and score features, writing into the feature database.

Resumable: features that already have an explanation from this explainer are skipped, results are
written one batch of features per SQLite transaction, and the LLM's answers are cached as they arrive
(llm.py), so a killed run started again asks nothing twice. A feature whose LLM answers were malformed
(or failed after every retry) is counted as failed and left unexplained, to be retried by the next run.
The local backend (local_scores.py) reads its answers from the model, so only a prompt over
``--local.max_prompt_tokens`` fails a feature; its results are cached in the same table.
"""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saeforge.config import F, check
from saeforge.viewer import explain as ex
from saeforge.viewer.db import FeatureDB
from saeforge.viewer.llm import BudgetExhausted, LLMClient, LLMConfig, MalformedAnswer, llm_feature
from saeforge.viewer.llm_local import LocalChat, LocalConfig
from saeforge.viewer.local_scores import local_feature


@dataclass
class ExplainConfig:
    explainer: str = F(
        "baseline",
        "baseline (top tokens, no LLM), llm (an OpenAI-compatible API, --llm.*) or local (an in-process LM, --local.*).",
    )
    features: str = F("all", "Features to explain: all, or N for the N most frequently firing ones.")
    n_negatives: int = F(8, "Contexts of other features (true activation 0) added to each held-out set.")
    batch: int = F(16, "Features written per database transaction.")
    seed: int = F(0, "Seed for drawing negatives and shuffling the detection contexts.")

    def __post_init__(self) -> None:
        check(
            self.explainer in ("baseline", "llm", "local"),
            f"explain.explainer={self.explainer!r}: expected baseline, llm or local",
        )
        check(
            self.features == "all" or (self.features.isdigit() and int(self.features) > 0),
            f"explain.features={self.features!r}: expected all or a positive count",
        )
        check(self.n_negatives >= 0 and self.batch > 0, "explain.n_negatives must be >= 0 and batch positive")


def open_rw(path: str | Path) -> tuple[FeatureDB, sqlite3.Connection]:
    """The reader (which checks the file is a whole database) and a writer connection with the tables made."""
    d = FeatureDB(path)
    con = sqlite3.connect(d.path, check_same_thread=False, timeout=30)
    ex.ensure_tables(con)
    return d, con


def chosen_features(d: FeatureDB, spec: str) -> list[int]:
    n = d.d_sae if spec == "all" else int(spec)
    rows = d.query("SELECT idx FROM features WHERE fire_count > 0 ORDER BY fire_count DESC, idx LIMIT ?", (n,))
    return [r[0] for r in rows]


def run_explain(
    db_path: str | Path,
    cfg: ExplainConfig,
    llm: LLMConfig | None = None,
    progress: bool = True,
    local: LocalConfig | None = None,
    lm=None,
    indices: list[int] | None = None,
) -> dict[str, Any]:
    """Explain and score the chosen features; returns counts {explainer, done, skipped, failed, requests,
    stopped}. ``lm``: an already loaded model for the local explainer (else ``local.model`` is loaded);
    ``indices``: these features instead of ``cfg.features`` (bench/explain.py draws them at random)."""
    from tqdm import tqdm

    d, con = open_rw(db_path)
    client: LLMClient | LocalChat | None = None
    if cfg.explainer == "llm":
        client = LLMClient(llm or LLMConfig(), con)
    elif cfg.explainer == "local":
        client = LocalChat(local or LocalConfig(), con, lm)
    name = client.name if client is not None else "baseline"  # another model: another explainer
    todo_all = list(indices) if indices is not None else chosen_features(d, cfg.features)
    done_before = ex.explained(con, name)
    todo = [f for f in todo_all if f not in done_before]
    pool = ex.negative_pool(con)
    bg, total = ex.background(con, d.texts) if client is None else (None, 0)

    def one(idx: int) -> tuple[int, str, dict] | None:
        f = d.feature(idx)
        explain_ctx, held = ex.split_contexts(f)
        held += ex.negatives(f, pool, d.texts, cfg.n_negatives, cfg.seed)
        if client is None:
            text = ex.baseline_explanation(explain_ctx, bg, total)
            return idx, text, ex.baseline_scores(text, held)
        try:
            if isinstance(client, LocalChat):
                text, scores = local_feature(client, explain_ctx, held, cfg.seed + idx)
            else:
                text, scores = llm_feature(client, explain_ctx, held, cfg.seed + idx)
        except MalformedAnswer:
            return None
        return idx, text, scores

    counts: dict[str, Any] = {
        "explainer": name,
        "done": 0,
        "skipped": len(todo_all) - len(todo),
        "failed": 0,
        "stopped": "",
    }
    bar = tqdm(total=len(todo), disable=not progress, desc=f"explain ({cfg.explainer})", unit="feature")
    workers = llm.concurrency if cfg.explainer == "llm" and llm is not None else 1
    with ThreadPoolExecutor(workers) as threads:
        for start in range(0, len(todo), cfg.batch):
            futures = [threads.submit(one, i) for i in todo[start : start + cfg.batch]]
            results = []
            for fut in futures:
                try:
                    r = fut.result()
                except BudgetExhausted as e:
                    counts["stopped"] = str(e)
                    continue
                if r is None:
                    counts["failed"] += 1
                else:
                    results.append(r)
            ex.write_results(con, name, results)
            counts["done"] += len(results)
            bar.update(len(futures))
            if counts["stopped"]:
                break
    bar.close()
    counts["requests"] = client.sent if client is not None else 0
    con.close()
    return counts
