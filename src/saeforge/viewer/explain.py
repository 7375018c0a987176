"""Explanations of features and their scores, stored in the feature database (SPECS "Explanations").

Tables, created on demand so a database built before them still opens (``ensure_tables``):

    explanations(feature, explainer, text, created)       one per (feature, explainer)
    scores(feature, explainer, scorer, value)             value NULL when the scorer failed
    explanations_fts(text, feature, explainer)            FTS5 index over the explanation text
    llm_cache(key, answer, created)                       answered prompts (llm.py), keyed by sha256

Contexts are split so a feature is never scored on what explained it: top and quantile contexts of
even rank explain, those of odd rank are held out, plus ``n_negatives`` contexts of other features
from windows where this feature kept no context, whose true activation is taken as 0 (exact when the
feature's kept contexts cover all windows it fires in, an approximation for dense features).

The baseline explainer (no LLM) writes ``tokens: "a", "b"; after: "c"`` (JSON strings):
- for each even-rank top context take the token at its maximum (clause ``tokens``) and the token
  just before it (clause ``after``);
- rank the distinct tokens of a clause by p_f * log(p_f / p_bg), where p_f is the share of those
  contexts with that token and p_bg its share of all tokens stored in the database (add-one smoothed);
  keep at most 5 seen in at least 2 contexts with a positive score, best first (a token seen once says
  nothing general);
- a clause is written only if its kept tokens cover at least half of those contexts; when neither does,
  the ``tokens`` clause is written anyway.
Its simulator predicts 1 on a token when every written clause matches (the token is one of ``tokens``;
the token before it is one of ``after``), else 0. The simulation score is the Pearson correlation of
the prediction with the true activations over all held-out tokens (0 when either is constant); the
detection score is the balanced accuracy of "the context fires" (any predicted token) against "the
context's true maximum is > 0".
"""

from __future__ import annotations

import json
import math
import random
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from saeforge.config import UsageError

TABLES = """
CREATE TABLE IF NOT EXISTS explanations (feature INTEGER NOT NULL, explainer TEXT NOT NULL, text TEXT NOT NULL,
    created TEXT NOT NULL, PRIMARY KEY (feature, explainer));
CREATE TABLE IF NOT EXISTS scores (feature INTEGER NOT NULL, explainer TEXT NOT NULL, scorer TEXT NOT NULL,
    value REAL, PRIMARY KEY (feature, explainer, scorer));
CREATE VIRTUAL TABLE IF NOT EXISTS explanations_fts USING fts5(text, feature UNINDEXED, explainer UNINDEXED);
CREATE TABLE IF NOT EXISTS llm_cache (key TEXT PRIMARY KEY, answer TEXT NOT NULL, created TEXT NOT NULL);
"""
MAX_TOKENS = 5
MIN_COVER = 0.5
MIN_COUNT = 2


class ExplanationFormatError(UsageError):
    """An explanation the baseline simulator cannot read; the message shows the expected form."""


def ensure_tables(con: sqlite3.Connection) -> None:
    con.executescript(TABLES)
    con.commit()


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def cached_answers(con: sqlite3.Connection, keys: Sequence[str]) -> list[str | None]:
    """The stored answer of each key of ``llm_cache``, None where there is none."""
    out = []
    for k in keys:
        row = con.execute("SELECT answer FROM llm_cache WHERE key = ?", (k,)).fetchone()
        out.append(None if row is None else row[0])
    return out


def cache_answers(con: sqlite3.Connection, items: Sequence[tuple[str, str]]) -> None:
    """Store (key, answer) pairs in ``llm_cache`` in one committed transaction, so a killed run keeps them."""
    with con:
        con.executemany("INSERT OR REPLACE INTO llm_cache VALUES (?, ?, ?)", [(k, a, now()) for k, a in items])


@dataclass
class Context:
    """One context of a feature: token texts, true activations of that feature, whether it is a negative."""

    tokens: list[str]
    acts: list[float]
    max_pos: int
    kind: str  # top, quantile or negative

    @property
    def fires(self) -> bool:
        return max(self.acts, default=0.0) > 0


def split_contexts(feature: dict[str, Any]) -> tuple[list[Context], list[Context]]:
    """(explain, held-out) contexts of a feature dict from ``FeatureDB.feature``: even ranks vs odd ranks."""
    explain, held = [], []
    for c in feature["contexts"]:
        ctx = Context(c["tokens"], c["acts"], c["max_pos"], c["kind"])
        (explain if c["rank"] % 2 == 0 else held).append(ctx)
    return explain, held


def negative_pool(con: sqlite3.Connection) -> list[tuple[int, int, list[int]]]:
    """(feature, window, token ids) of every feature's strongest context: where negatives are drawn from."""
    rows = con.execute("SELECT feature, window, tokens FROM contexts WHERE kind = 'top' AND rank = 0").fetchall()
    return [(f, w, json.loads(t)) for f, w, t in rows]


def negatives(
    feature: dict[str, Any], pool: list[tuple[int, int, list[int]]], texts, n: int, seed: int
) -> list[Context]:
    """Up to n contexts of other features from windows this feature kept no context of (true acts 0)."""
    own = {c["window"] for c in feature["contexts"]}
    seen: set[int] = set()
    cands = []
    for f, w, ids in pool:
        if f != feature["index"] and w not in own and w not in seen:
            seen.add(w)
            cands.append(ids)
    picked = random.Random(seed * 1_000_003 + feature["index"]).sample(cands, min(n, len(cands)))
    return [Context(texts(ids), [0.0] * len(ids), 0, "negative") for ids in picked]


def background(con: sqlite3.Connection, texts) -> tuple[Counter, int]:
    """Counts of token texts over every stored context (the corpus sample the index kept), and their total."""
    counts: Counter = Counter()
    for (tokens,) in con.execute("SELECT tokens FROM contexts"):
        counts.update(json.loads(tokens))
    by_text: Counter = Counter()
    for tid, c in counts.items():
        by_text[texts([tid])[0]] += c
    return by_text, sum(counts.values())


def _clause(picked: list[str], bg: Counter, total: int) -> tuple[list[str], float]:
    """Tokens kept for one clause (rule in the module docstring) and the share of contexts they cover."""
    n = len(picked)
    if n == 0:
        return [], 0.0
    share = {t: c / n for t, c in Counter(picked).items() if c >= MIN_COUNT}
    vocab = len(bg) + 1
    score = {t: p * math.log(p / ((bg.get(t, 0) + 1) / (total + vocab))) for t, p in share.items()}
    kept = [t for t in sorted(score, key=lambda t: (-score[t], t)) if score[t] > 0][:MAX_TOKENS]
    return kept, sum(share[t] for t in kept)


def baseline_explanation(contexts: Sequence[Context], bg: Counter, total: int) -> str:
    """The baseline explanation of a feature from its (even-rank top) contexts; rule in the module docstring."""
    top = [c for c in contexts if c.kind == "top" and c.fires]
    at, at_cover = _clause([c.tokens[c.max_pos] for c in top], bg, total)
    before, b_cover = _clause([c.tokens[c.max_pos - 1] for c in top if c.max_pos > 0], bg, total)
    parts = []
    if at and (at_cover >= MIN_COVER or b_cover < MIN_COVER):
        parts.append("tokens: " + ", ".join(json.dumps(t) for t in at))
    if before and b_cover >= MIN_COVER:
        parts.append("after: " + ", ".join(json.dumps(t) for t in before))
    return "; ".join(parts) if parts else "never fires"


# one clause and the ";" after it (or the end); a ";" inside a JSON string belongs to the string
_CLAUSE = re.compile(r'\s*(tokens|after)\s*:\s*((?:"(?:[^"\\]|\\.)*"\s*,?\s*)+)(?:;|$)')
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def parse_baseline(text: str) -> dict[str, set[str]]:
    """{'tokens': {...}, 'after': {...}} from a baseline explanation; 'never fires' gives {}."""
    if text.strip() == "never fires":
        return {}
    out: dict[str, set[str]] = {}
    pos = 0
    while pos < len(text) or not out:
        m = _CLAUSE.match(text, pos)
        if not m:
            raise ExplanationFormatError(
                f"cannot read {text[pos:]!r} of explanation {text!r}: the baseline simulator reads clauses like "
                '`tokens: " def", " class"; after: "("` (JSON strings) separated by ";"'
            )
        out[m.group(1)] = {json.loads(s) for s in _STRING.findall(m.group(2))}
        pos = m.end()
    return out


def simulate_baseline(text: str, ctx: Context) -> list[float]:
    """Deterministic simulator of a baseline explanation: 1 where every clause matches, else 0."""
    clauses = parse_baseline(text)
    if not clauses:
        return [0.0] * len(ctx.tokens)
    out = []
    for i, t in enumerate(ctx.tokens):
        ok = "tokens" not in clauses or t in clauses["tokens"]
        if "after" in clauses:
            ok = ok and i > 0 and ctx.tokens[i - 1] in clauses["after"]
        out.append(1.0 if ok else 0.0)
    return out


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation in float64; 0 when either side is constant (the prediction carries nothing)."""
    n = len(a)
    if n != len(b):
        raise ValueError(f"pearson of {n} against {len(b)} values")
    if n == 0:
        return 0.0
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else 0.0


def balanced_accuracy(truth: Sequence[bool], pred: Sequence[bool]) -> float:
    """(TPR + TNR) / 2; with one class absent, the rate of the class present."""
    pos = [p for t, p in zip(truth, pred) if t]
    neg = [not p for t, p in zip(truth, pred) if not t]
    rates = [sum(x) / len(x) for x in (pos, neg) if x]
    return sum(rates) / len(rates) if rates else 0.0


def simulation_score(predictions: Sequence[Sequence[float]], contexts: Sequence[Context]) -> float:
    """Correlation of predicted with true activations over every token of the held-out contexts."""
    pred = [v for p in predictions for v in p]
    true = [v for c in contexts for v in c.acts]
    return pearson(pred, true)


def detection_score(said_fires: Sequence[bool], contexts: Sequence[Context]) -> float:
    return balanced_accuracy([c.fires for c in contexts], said_fires)


def baseline_scores(text: str, contexts: Sequence[Context]) -> dict[str, float]:
    preds = [simulate_baseline(text, c) for c in contexts]
    return {
        "simulation": simulation_score(preds, contexts),
        "detection": detection_score([max(p, default=0) > 0 for p in preds], contexts),
    }


def write_results(con: sqlite3.Connection, explainer: str, results: Sequence[tuple[int, str, dict]]) -> None:
    """Explanations and scores of a batch of features in one transaction (all or none land)."""
    with con:
        for feature, text, scores in results:
            con.execute("INSERT OR REPLACE INTO explanations VALUES (?, ?, ?, ?)", (feature, explainer, text, now()))
            con.execute("DELETE FROM explanations_fts WHERE feature = ? AND explainer = ?", (feature, explainer))
            con.execute("INSERT INTO explanations_fts VALUES (?, ?, ?)", (text, feature, explainer))
            for scorer, value in scores.items():
                con.execute("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)", (feature, explainer, scorer, value))


def explained(con: sqlite3.Connection, explainer: str) -> set[int]:
    return {f for (f,) in con.execute("SELECT feature FROM explanations WHERE explainer = ?", (explainer,))}
