"""A map of the dictionary, computed at ``saeforge index`` time from the decoder rows alone.

- 2-D coordinates of every decoder row: UMAP (umap-learn, cosine metric, fixed random_state) or the
  first two principal components of the unit-normalised rows (PCA, no extra package, instant);
  ``auto`` picks UMAP when umap-learn is installed and the dictionary has at least ``UMAP_MIN`` rows
  (UMAP's numba JIT takes tens of seconds on first use and its layout means little for a few dozen points).
- A hierarchical clustering (scipy: average linkage on cosine distance), cut into K clusters for
  colours; the whole linkage is kept as a tree so the viewer can browse it. It needs the condensed
  distance matrix: F*(F-1)/2 float64s (16k features: ~1 GB) and O(F^2) time.

Tables (created by the index writer, absent from databases built before them):
    map(feature INTEGER PRIMARY KEY, x REAL, y REAL, cluster INTEGER)
    tree(node INTEGER PRIMARY KEY, left INTEGER, right INTEGER, distance REAL, size INTEGER)
Tree nodes follow scipy's numbering: leaves are features 0..F-1, linkage row i is node F+i, the root
is node 2F-2.
"""

from __future__ import annotations

import importlib.util
import json
import sqlite3
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from saeforge.config import ConfigError
from saeforge.viewer.db import DBError, FeatureDB, write_transaction

UMAP_MIN = 256
METHODS = ("auto", "pca", "umap", "none")

SCHEMA = """
CREATE TABLE IF NOT EXISTS map (feature INTEGER PRIMARY KEY, x REAL NOT NULL, y REAL NOT NULL,
    cluster INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tree (node INTEGER PRIMARY KEY, left INTEGER NOT NULL, right INTEGER NOT NULL,
    distance REAL NOT NULL, size INTEGER NOT NULL);
"""


def choose_method(method: str, n_features: int) -> str:
    """The layout to run: ``auto`` is umap (>= UMAP_MIN rows, umap-learn installed), else pca, or none
    without scipy (the clustering needs it); an explicit choice whose package is missing is a ConfigError."""
    have = {m: importlib.util.find_spec(m) is not None for m in ("scipy", "umap")}
    if method == "auto":
        if not have["scipy"]:
            return "none"
        return "umap" if n_features >= UMAP_MIN and have["umap"] else "pca"
    if method != "none" and not have["scipy"] or method == "umap" and not have["umap"]:
        raise ConfigError(
            f"--map-method {method} needs scipy{' and umap-learn' if method == 'umap' else ''}: "
            "pip install 'saeforge[map]', or pass --map-method none"
        )
    return method


def _unit_rows(W_FD: Tensor) -> Tensor:
    W_FD = W_FD.detach().float().cpu()
    return W_FD / W_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)


def pca_2d(rows_ND: Tensor) -> Tensor:
    """Coordinates of the rows on their first two principal components: (U S)[:, :2] of the centred rows.

    Signs fixed so each component's largest-magnitude loading is positive (SVD signs are arbitrary).
    Fewer than two components (one row, or identical rows) give zero columns.
    """
    x_ND = rows_ND.detach().double().cpu()
    x_ND = x_ND - x_ND.mean(0, keepdim=True)
    U, S, Vh = torch.linalg.svd(x_ND, full_matrices=False)
    out_N2 = torch.zeros(x_ND.shape[0], 2, dtype=torch.float64)
    for c in range(min(2, S.shape[0])):
        v = Vh[c]
        sign = 1.0 if v[v.abs().argmax()] >= 0 else -1.0
        out_N2[:, c] = U[:, c] * S[c] * sign
    return out_N2


def layout(W_dec_FD: Tensor, method: str, seed: int = 0) -> Tensor:
    """2-D coordinates [F, 2] of the decoder rows' directions (``method`` pca or umap)."""
    unit_FD = _unit_rows(W_dec_FD)
    if method == "pca" or unit_FD.shape[0] < 4:  # UMAP needs a few neighbours
        return pca_2d(unit_FD).float()
    import umap

    reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed, n_neighbors=min(15, unit_FD.shape[0] - 1))
    return torch.from_numpy(np.asarray(reducer.fit_transform(unit_FD.numpy()), dtype=np.float32))


def cluster(W_dec_FD: Tensor, n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """(cluster id per feature in 0..K-1, scipy linkage matrix [F-1, 4]): average linkage on cosine distance.

    A zero decoder row has no direction: its distance to everything is taken as 1 (orthogonal).
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    unit = _unit_rows(W_dec_FD).double().numpy()
    F = unit.shape[0]
    if F < 2:
        return np.zeros(F, dtype=np.int64), np.zeros((0, 4))
    d = np.nan_to_num(pdist(unit, "cosine"), nan=1.0).clip(0.0, 2.0)
    Z = linkage(d, method="average")
    labels = fcluster(Z, t=min(n_clusters, F), criterion="maxclust") - 1
    return labels.astype(np.int64), Z


def write_map(con: sqlite3.Connection, W_dec_FD: Tensor, method: str, n_clusters: int, seed: int = 0) -> str:
    """Fill the map and tree tables; returns the layout method used ("none" writes nothing)."""
    method = choose_method(method, W_dec_FD.shape[0])
    if method == "none":
        return method
    xy = layout(W_dec_FD, method, seed).tolist()
    labels, Z = cluster(W_dec_FD, n_clusters)
    F = len(xy)
    for stmt in SCHEMA.split(";"):  # execute, not executescript: that would commit a caller's transaction
        if stmt.strip():
            con.execute(stmt)
    con.executemany("INSERT INTO map VALUES (?, ?, ?, ?)", [(f, xy[f][0], xy[f][1], int(labels[f])) for f in range(F)])
    con.executemany(
        "INSERT INTO tree VALUES (?, ?, ?, ?, ?)",
        [(F + i, int(a), int(b), float(dist), int(n)) for i, (a, b, dist, n) in enumerate(Z.tolist())],
    )
    return method


def add_map(db_path: str | Path, method: str = "auto", n_clusters: int = 16, seed: int = 0, force: bool = False):
    """Add the map to an existing database (one built before maps, or with ``--map-method none``) from the
    SAE folder it records; one transaction, so an interrupted run leaves the file as it was. Returns the
    method used, or None when a map is already there (``force`` replaces it)."""
    from saeforge.saes.formats import load_sae
    from saeforge.saes.hub import local_sae_dir

    d = FeatureDB(db_path)  # checks that the file is a whole database
    if d.has_table("map") and not force:
        return None
    try:
        W_dec_FD = load_sae(local_sae_dir(d.meta["sae_dir"]), device="cpu").W_dec.detach()
    except OSError as e:
        raise DBError(f"cannot read the SAE folder {d.meta['sae_dir']} that {db_path} was built from ({e})") from e
    with write_transaction(db_path) as con:
        con.execute("DROP TABLE IF EXISTS map")
        con.execute("DROP TABLE IF EXISTS tree")
        used = write_map(con, W_dec_FD, method, n_clusters, seed)
        con.execute("INSERT OR REPLACE INTO meta VALUES ('map_method', ?)", (json.dumps(used),))
    return used


def tree_members(children: dict[int, tuple[int, int]], node: int, n_features: int, limit: int) -> list[int]:
    """Up to ``limit`` leaf features under ``node`` (depth-first, left first)."""
    out, stack = [], [node]
    while stack and len(out) < limit:
        n = stack.pop()
        if n < n_features:
            out.append(n)
        else:
            a, b = children[n]
            stack.extend((b, a))
    return out


# ---- reading (the server) -----------------------------------------------------------------
def _need(dbx: FeatureDB, table: str) -> None:
    if not dbx.has_table(table):
        raise DBError(
            f"{dbx.path} has no dictionary map (built before maps existed, or with --map-method none); "
            "rebuild it with `saeforge index`"
        )


def map_points(dbx: FeatureDB) -> dict:
    """Column arrays over all features: index, x, y, cluster, density, max_act, score (the best simulation
    score, null without one), explanation (null without one), first_flag (null in older databases)."""
    _need(dbx, "map")
    rows = dbx.query(
        "SELECT m.feature, m.x, m.y, m.cluster, f.density, f.max_act FROM map m JOIN features f ON f.idx = m.feature "
        "ORDER BY m.feature"
    )
    idx = [r[0] for r in rows]
    expl: dict[int, str] = {}
    score: dict[int, float] = {}
    if dbx.has_table("explanations"):
        # the last explainer in name order wins, as in the feature list (an LLM's over the baseline's)
        expl = dict(dbx.query("SELECT feature, text FROM explanations ORDER BY explainer"))
    if dbx.has_table("scores"):
        score = dict(dbx.query("SELECT feature, MAX(value) FROM scores WHERE scorer = 'simulation' GROUP BY feature"))
    first = dbx.first_position(idx) if idx else {}
    return {
        "method": dbx.meta.get("map_method"),
        "n_clusters": (max(r[3] for r in rows) + 1) if rows else 0,
        "index": idx,
        "x": [r[1] for r in rows],
        "y": [r[2] for r in rows],
        "cluster": [r[3] for r in rows],
        "density": [r[4] for r in rows],
        "max_act": [r[5] for r in rows],
        "score": [score.get(i) for i in idx],
        "explanation": [expl.get(i) for i in idx],
        "first_flag": [first[i]["first_flag"] if i in first else None for i in idx],
    }


def tree_node(dbx: FeatureDB, node: int | None, max_members: int = 50) -> dict | None:
    """A tree node (root when ``node`` is None) and its two children, each with size, merge distance and up
    to ``max_members`` member features; None for a node that does not exist."""
    _need(dbx, "tree")
    F = dbx.d_sae
    children = {n: (a, b) for n, a, b in dbx.query("SELECT node, left, right FROM tree")}
    info = {n: (d, s) for n, d, s in dbx.query("SELECT node, distance, size FROM tree")}
    root = 2 * F - 2 if F > 1 else 0
    node = root if node is None else node
    if not (0 <= node < F or node in children):
        return None

    def describe(n: int) -> dict:
        d, s = info.get(n, (0.0, 1))
        return {
            "node": n,
            "size": s,
            "distance": d,
            "leaf": n < F,
            "features": tree_members(children, n, F, max_members),
        }

    return {**describe(node), "root": root, "children": [describe(c) for c in children.get(node, ())]}


def pca_of(W_dec_FD: Tensor, features: list[int]) -> dict:
    """2-D PCA of the chosen features' decoder rows (as stored, not normalised) and each component's share of
    the subset's variance."""
    rows_ND = W_dec_FD[features].detach().double().cpu()
    xy = pca_2d(rows_ND)
    centred = rows_ND - rows_ND.mean(0, keepdim=True)
    total = float(centred.pow(2).sum())
    return {
        "features": features,
        "x": xy[:, 0].tolist(),
        "y": xy[:, 1].tolist(),
        "explained": [float(xy[:, c].pow(2).sum()) / total if total > 0 else 0.0 for c in range(2)],
    }
