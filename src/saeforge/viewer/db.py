"""The feature database: one SQLite file per SAE. Schema (also in the README):

    meta(key TEXT PRIMARY KEY, value TEXT)           JSON values: format_version, model, model_id, sae_id,
                                                     sae_dir, hook, d_in, d_sae, n_tokens, n_windows, ...
    vocab(id INTEGER PRIMARY KEY, text TEXT)         display text of every token id
    features(idx INTEGER PRIMARY KEY, fire_count, density, max_act, mean_act,
             hist_width REAL, hist TEXT)             hist: JSON counts of bins [i*w, (i+1)*w)
    contexts(feature, kind TEXT, rank, interval, window, max_act, max_pos, max_token,
             tokens TEXT, acts TEXT)                 kind 'top' (interval -1) or 'quantile' (interval 0 =
                                                     lowest); tokens/acts JSON lists; max_pos indexes them
    logits(feature, sign, rank, token, value)        sign 1 = promoted, -1 = suppressed
    neighbours(feature, rank, other, cosine)
    first_position(feature, max_first, max_rest, first_share, flagged)
                                                     max at the first token after BOS and elsewhere; share
                                                     of firing windows peaking there; the artefact flag
    contexts_rest(same columns as contexts)          kind 'top' only: the top list with the first position
                                                     ignored, for features with windows peaking there
    contexts_dec(same columns as contexts)           kind 'top' only: the top windows by the projection of x on
                                                     the feature's unit decoder direction (acts = projections)
    enc_dec(feature, n_enc, n_dec, jaccard)          overlap of the encoder's and the decoder's top windows
    meta_latents(feature, rank, latent, activation)  a meta-SAE's strongest latents per feature (`saeforge meta`)
    map, tree                                        the dictionary map (dmap.py)
    feature_json(feature, body)                      each feature's index-time JSON, zlib-compressed (featurejson.py)
    explanations, scores, explanations_fts, llm_cache   added by `saeforge explain` (explain.py), on demand
Databases built before first_position / contexts_rest / contexts_dec / enc_dec / map / tree / feature_json existed lack them; readers check (``has_table``).

The writer fills a temporary file and renames it into place when whole, so a file at the final name
is always complete. The reader opens it read-only, one connection per thread.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from saeforge.config import UserError

FORMAT_VERSION = 1

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE vocab (id INTEGER PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE features (idx INTEGER PRIMARY KEY, fire_count INTEGER NOT NULL, density REAL NOT NULL,
    max_act REAL NOT NULL, mean_act REAL NOT NULL, hist_width REAL NOT NULL, hist TEXT NOT NULL);
CREATE TABLE contexts (feature INTEGER NOT NULL, kind TEXT NOT NULL, rank INTEGER NOT NULL,
    interval INTEGER NOT NULL, window INTEGER NOT NULL, max_act REAL NOT NULL, max_pos INTEGER NOT NULL,
    max_token INTEGER NOT NULL, tokens TEXT NOT NULL, acts TEXT NOT NULL, PRIMARY KEY (feature, kind, rank));
CREATE TABLE logits (feature INTEGER NOT NULL, sign INTEGER NOT NULL, rank INTEGER NOT NULL,
    token INTEGER NOT NULL, value REAL NOT NULL, PRIMARY KEY (feature, sign, rank));
CREATE TABLE neighbours (feature INTEGER NOT NULL, rank INTEGER NOT NULL, other INTEGER NOT NULL,
    cosine REAL NOT NULL, PRIMARY KEY (feature, rank));
"""
FIRST_SCHEMA = """
CREATE TABLE first_position (feature INTEGER PRIMARY KEY, max_first REAL NOT NULL, max_rest REAL NOT NULL,
    first_share REAL NOT NULL, flagged INTEGER NOT NULL);
CREATE TABLE contexts_rest (feature INTEGER NOT NULL, kind TEXT NOT NULL, rank INTEGER NOT NULL,
    interval INTEGER NOT NULL, window INTEGER NOT NULL, max_act REAL NOT NULL, max_pos INTEGER NOT NULL,
    max_token INTEGER NOT NULL, tokens TEXT NOT NULL, acts TEXT NOT NULL, PRIMARY KEY (feature, kind, rank));
"""
DECODER_SCHEMA = """
CREATE TABLE contexts_dec (feature INTEGER NOT NULL, kind TEXT NOT NULL, rank INTEGER NOT NULL,
    interval INTEGER NOT NULL, window INTEGER NOT NULL, max_act REAL NOT NULL, max_pos INTEGER NOT NULL,
    max_token INTEGER NOT NULL, tokens TEXT NOT NULL, acts TEXT NOT NULL, PRIMARY KEY (feature, kind, rank));
CREATE TABLE enc_dec (feature INTEGER PRIMARY KEY, n_enc INTEGER NOT NULL, n_dec INTEGER NOT NULL, jaccard REAL);
"""
INDEXES = """
CREATE INDEX features_density ON features(density);
CREATE INDEX contexts_token ON contexts(max_token, kind);
CREATE INDEX vocab_text ON vocab(text);
"""


class DBError(UserError, ValueError):
    """A file that is not a whole saeforge feature database; the message says how to rebuild it."""


def connect_unrenamed(path: Path) -> sqlite3.Connection:
    """A writer for a database still under its temporary name: no journal, no syncs (a crash leaves a
    temporary file that is discarded, never one at the final name)."""
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("PRAGMA synchronous=OFF")
    return con


def create(path: Path) -> sqlite3.Connection:
    con = connect_unrenamed(path)
    con.executescript(SCHEMA)
    return con


def create_first_position(con: sqlite3.Connection) -> None:
    con.executescript(FIRST_SCHEMA)


def create_decoder_view(con: sqlite3.Connection) -> None:
    con.executescript(DECODER_SCHEMA)


def write_meta(con: sqlite3.Connection, meta: dict[str, Any]) -> None:
    con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])


def insert(con: sqlite3.Connection, table: str, rows: Iterable[tuple]) -> None:
    rows = list(rows)
    if rows:
        con.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(rows[0]))})", rows)


def finish(con: sqlite3.Connection) -> None:
    con.executescript(INDEXES)
    write_meta(con, {"complete": True})
    con.commit()
    con.close()


def _like(q: str) -> str:
    return "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


@contextmanager
def write_transaction(db_path: str | Path) -> Iterator[sqlite3.Connection]:
    """A connection to a finished database holding one write transaction (BEGIN IMMEDIATE): committed when
    the block ends, rolled back if it raises, so a table added later (map, meta-latents) is there whole or
    not at all."""
    con = sqlite3.connect(db_path, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
    finally:
        con.close()


class FeatureDB:
    """Read-only access to one database file (safe to share between server threads)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DBError(f"{self.path} does not exist; build it with `saeforge index SAE_DIR --out {self.path}`")
        self._local = threading.local()
        self._vocab: dict[int, str] | None = None
        try:
            self.meta = {k: json.loads(v) for k, v in self._con().execute("SELECT key, value FROM meta")}
        except sqlite3.DatabaseError as e:
            raise DBError(
                f"{self.path} is not a saeforge feature database ({e}); rebuild it with `saeforge index`"
            ) from e
        if not self.meta.get("complete") or self.meta.get("format_version") != FORMAT_VERSION:
            raise DBError(f"{self.path} is incomplete or of another format version; rebuild it with `saeforge index`")

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            self._local.con = con
        return con

    def close(self) -> None:
        """Close this thread's connection (a server never needs to; a writer that renames the file does)."""
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self._con().execute(sql, args).fetchall()

    def has_feature(self, idx: int) -> bool:
        return bool(self.query("SELECT 1 FROM features WHERE idx = ?", (idx,)))

    def has_table(self, name: str) -> bool:
        return bool(self.query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)))

    @property
    def d_sae(self) -> int:
        return int(self.meta["d_sae"])

    def texts(self, ids: Iterable[int]) -> list[str]:
        # The vocabulary is read once (~50k short strings): a feature page needs ~1000 token texts, and one
        # SQL query per context made each page cost dozens of round trips.
        if self._vocab is None:
            self._vocab = dict(self.query("SELECT id, text FROM vocab"))
        return [self._vocab.get(i, "") for i in ids]

    def feature(self, idx: int, exclude_first: bool = False) -> dict[str, Any] | None:
        """One feature's record. ``exclude_first``: top contexts ranked with the first position after BOS
        ignored (contexts_rest, stored for features that peak there; the plain top list otherwise)."""
        row = self.query(
            "SELECT fire_count, density, max_act, mean_act, hist_width, hist FROM features WHERE idx = ?", (idx,)
        )
        if not row:
            return None
        fire_count, density, max_act, mean_act, width, hist = row[0]
        rest = exclude_first and bool(
            self.has_table("contexts_rest") and self.query("SELECT 1 FROM contexts_rest WHERE feature = ?", (idx,))
        )
        cols = "kind, rank, interval, window, max_act, max_pos, tokens, acts"
        rows = self.query(
            f"SELECT {cols} FROM {'contexts_rest' if rest else 'contexts'} WHERE feature = ? AND kind = 'top' "
            "ORDER BY rank",
            (idx,),
        ) + self.query(
            f"SELECT {cols} FROM contexts WHERE feature = ? AND kind = 'quantile' ORDER BY interval DESC, rank", (idx,)
        )
        contexts = self._contexts(rows)
        logits = {1: [], -1: []}
        for sign, token, value in self.query(
            "SELECT sign, token, value FROM logits WHERE feature = ? ORDER BY sign DESC, rank", (idx,)
        ):
            logits[sign].append((token, value))
        nbrs = self.query("SELECT other, cosine FROM neighbours WHERE feature = ? ORDER BY rank", (idx,))
        return {
            "index": idx,
            "fire_count": fire_count,
            "density": density,
            "max_act": max_act,
            "mean_act": mean_act,
            "hist_width": width,
            "hist": json.loads(hist),
            "contexts": contexts,
            "pos": [(t, s, v) for (t, v), s in zip(logits[1], self.texts(t for t, _ in logits[1]))],
            "neg": [(t, s, v) for (t, v), s in zip(logits[-1], self.texts(t for t, _ in logits[-1]))],
            "neighbours": [{"index": o, "cosine": c} for o, c in nbrs],
        }

    def _contexts(self, rows: list[tuple]) -> list[dict[str, Any]]:
        out = []
        for kind, rank, interval, window, mact, pos, tokens, acts in rows:
            ids = json.loads(tokens)
            out.append(
                {
                    "kind": kind,
                    "rank": rank,
                    "interval": interval,
                    "window": window,
                    "max_act": mact,
                    "max_pos": pos,
                    "token_ids": ids,
                    "tokens": self.texts(ids),
                    "acts": json.loads(acts),
                }
            )
        return out

    def decoder_view(self, idx: int) -> dict[str, Any] | None:
        """{decoder_contexts (max_act / acts are projections on the unit decoder direction), jaccard, n_enc,
        n_dec}; None for a database built before decoder-projection contexts."""
        if not self.has_table("contexts_dec"):
            return None
        rows = self.query(
            "SELECT kind, rank, interval, window, max_act, max_pos, tokens, acts FROM contexts_dec "
            "WHERE feature = ? ORDER BY rank",
            (idx,),
        )
        stat = self.query("SELECT n_enc, n_dec, jaccard FROM enc_dec WHERE feature = ?", (idx,))
        n_enc, n_dec, jac = stat[0] if stat else (0, 0, None)
        return {"decoder_contexts": self._contexts(rows), "jaccard": jac, "n_enc": n_enc, "n_dec": n_dec}

    def enc_dec_jaccard(self, idxs: list[int]) -> dict[int, float | None]:
        """{feature: encoder/decoder top-context Jaccard}; {} for an older database."""
        if not idxs or not self.has_table("enc_dec"):
            return {}
        q = f"SELECT feature, jaccard FROM enc_dec WHERE feature IN ({','.join('?' * len(idxs))})"
        return dict(self.query(q, tuple(idxs)))

    def list_features(
        self,
        sort: str = "density",
        desc: bool = True,
        offset: int = 0,
        limit: int = 50,
        alive_only: bool = False,
        exclude_first: bool = False,
    ) -> list[dict[str, Any]]:
        """``exclude_first`` ranks by the max activation outside the first position after BOS (the artefact)."""
        col = {"density": "density", "max_act": "max_act", "index": "idx"}[sort]
        join = ""
        if exclude_first:
            if not self.has_table("first_position"):
                raise DBError(
                    f"{self.path} was built before first-position statistics existed; rebuild it with "
                    "`saeforge index` to rank without the first position"
                )
            join = "JOIN first_position p ON p.feature = idx"
            col = "p.max_rest" if sort == "max_act" else col
        where = "WHERE fire_count > 0" if alive_only else ""
        rows = self.query(
            f"SELECT idx, density, max_act, fire_count FROM features {join} {where} "
            f"ORDER BY {col} {'DESC' if desc else 'ASC'}, idx LIMIT ? OFFSET ?",
            (limit, offset),
        )
        return self._summaries(rows)

    def explanations(self, idx: int) -> list[dict[str, Any]]:
        """Explanations of a feature with their scores ({explainer, text, created, scores}); [] before any
        `saeforge explain` run (the tables do not exist yet)."""
        try:
            rows = self.query(
                "SELECT explainer, text, created FROM explanations WHERE feature = ? ORDER BY explainer", (idx,)
            )
            scores = self.query("SELECT explainer, scorer, value FROM scores WHERE feature = ?", (idx,))
        except sqlite3.OperationalError:
            return []
        return [
            {"explainer": e, "text": t, "created": c, "scores": {s: v for x, s, v in scores if x == e}}
            for e, t, c in rows
        ]

    def search_explanations(self, q: str, limit: int = 50) -> dict[int, list[str]]:
        """{feature: matching explanation texts} for features whose explanation holds every word of ``q``
        (FTS5, words quoted so the user's text is never query syntax); {} without explanation tables."""
        words = q.split()
        if not words:
            return {}
        match = " ".join('"' + w.replace('"', '""') + '"' for w in words)
        try:
            rows = self.query(
                "SELECT feature, text FROM explanations_fts WHERE explanations_fts MATCH ? ORDER BY rank LIMIT ?",
                (match, limit),
            )
        except sqlite3.OperationalError:
            return {}
        out: dict[int, list[str]] = {}
        for f, t in rows:
            out.setdefault(int(f), []).append(t)
        return out

    def search(self, q: str, limit: int = 50) -> list[dict[str, Any]]:
        """Features whose top contexts peak on a token containing ``q`` (case-insensitive), most such contexts
        first, then features found only by their explanation text; each lists its matching explanations."""
        rows = self.query(
            "SELECT c.feature, COUNT(*) AS hits, MAX(c.max_act) FROM contexts c JOIN vocab v ON v.id = c.max_token "
            "WHERE c.kind = 'top' AND v.text LIKE ? ESCAPE '\\' GROUP BY c.feature ORDER BY hits DESC, 3 DESC LIMIT ?",
            (_like(q), limit),
        )
        hits = {f: h for f, h, _ in rows}
        by_text = self.search_explanations(q, limit)
        text_only = [f for f in by_text if f not in hits]
        hits.update({f: 0 for f in text_only})
        found = (
            self.query(
                f"SELECT idx, density, max_act, fire_count FROM features WHERE idx IN ({','.join('?' * len(hits))})",
                tuple(hits),
            )
            if hits
            else []
        )
        out = self._summaries(found)
        for s in out:
            s["matching_contexts"] = hits[s["index"]]
            s["matching_explanations"] = by_text.get(s["index"], [])
        rank = {f: i for i, f in enumerate(text_only)}
        return sorted(out, key=lambda s: (-s["matching_contexts"], rank.get(s["index"], 0), -s["max_act"]))[:limit]

    def _summaries(self, rows: list[tuple]) -> list[dict[str, Any]]:
        """Index, density, max and the token each feature's strongest context peaks on."""
        idxs = [r[0] for r in rows]
        peak = (
            dict(
                self.query(
                    f"SELECT feature, max_token FROM contexts WHERE kind = 'top' AND rank = 0 AND feature IN "
                    f"({','.join('?' * len(idxs))})",
                    tuple(idxs),
                )
            )
            if idxs
            else {}
        )
        texts = dict(zip(peak.values(), self.texts(peak.values())))
        expl: dict[int, str] = {}
        if idxs:
            # one explanation per feature for the list: the last in name order, so an LLM's ("llm:...") wins
            # over the baseline's; none before `saeforge explain` made the table
            try:
                for f, t in self.query(
                    f"SELECT feature, text FROM explanations WHERE feature IN ({','.join('?' * len(idxs))}) "
                    "ORDER BY explainer",
                    tuple(idxs),
                ):
                    expl[f] = t
            except sqlite3.OperationalError:
                pass
        first = self.first_position(idxs)
        jac = self.enc_dec_jaccard(idxs)
        return [
            {
                "index": i,
                "density": d,
                "max_act": m,
                "fire_count": c,
                "peak_token": texts.get(peak[i]) if i in peak else None,
                "explanation": expl.get(i),
                "enc_dec_jaccard": jac.get(i),
                **first.get(i, {"max_act_excl_first": None, "first_share": None, "first_flag": None}),
            }
            for i, d, m, c in rows
        ]

    def first_position(self, idxs: list[int]) -> dict[int, dict[str, Any]]:
        """{feature: max_act_excl_first, max_act_first, first_share, first_flag}; {} for an older database."""
        if not idxs or not self.has_table("first_position"):
            return {}
        rows = self.query(
            "SELECT feature, max_rest, max_first, first_share, flagged FROM first_position WHERE feature IN "
            f"({','.join('?' * len(idxs))})",
            tuple(idxs),
        )
        return {
            f: {"max_act_excl_first": r, "max_act_first": m, "first_share": s, "first_flag": bool(g)}
            for f, r, m, s, g in rows
        }
