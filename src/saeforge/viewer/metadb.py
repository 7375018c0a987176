"""Meta-SAE latents in a feature database: table meta_latents(feature, rank, latent, activation).

Written by ``saeforge meta SAE_DIR --db DB`` (training/meta.py trains the meta-SAE) in one transaction, so
an interrupted write leaves the database as it was; a second run replaces the table. Read by the server:
each feature lists its meta-latents and, per latent, the other features that share it most strongly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from saeforge.saes.formats import load_sae, read_cfg
from saeforge.saes.hub import local_sae_dir
from saeforge.training.meta import is_meta_sae, meta_latents
from saeforge.viewer.db import DBError, FeatureDB, write_transaction

SCHEMA = """
CREATE TABLE meta_latents (feature INTEGER NOT NULL, rank INTEGER NOT NULL, latent INTEGER NOT NULL,
    activation REAL NOT NULL, PRIMARY KEY (feature, rank));
CREATE INDEX meta_latents_latent ON meta_latents(latent, activation);
"""


def add_meta_latents(db_path: str | Path, meta_dir: str | Path, top: int = 8) -> int:
    """Encode the database's SAE decoder rows with the meta-SAE at ``meta_dir`` and store the ``top``
    strongest meta-latents per feature; returns the number of rows written."""
    d = FeatureDB(db_path)  # checks that the file is a whole database
    if not is_meta_sae(meta_dir):
        raise DBError(f"{meta_dir} is not a meta-SAE folder (no metadata.meta_inputs); make one with `saeforge meta`")
    base_dir = Path(local_sae_dir(d.meta["sae_dir"])).resolve()
    trained_on = read_cfg(meta_dir)["metadata"].get("meta_base_sae")
    if trained_on != str(base_dir):
        raise DBError(
            f"{meta_dir} was trained on the decoder of {trained_on}, but {db_path} indexes {base_dir}; "
            f"train one on that SAE: `saeforge meta {base_dir} --db {db_path}`"
        )
    try:
        base = load_sae(base_dir, device="cpu")
    except OSError as e:
        raise DBError(f"cannot read the SAE folder {d.meta['sae_dir']} that {db_path} was built from ({e})") from e
    meta = load_sae(meta_dir, device="cpu")
    if meta.d_in != base.d_in or base.d_sae != d.d_sae:
        raise DBError(
            f"{meta_dir} reads {meta.d_in}-wide decoder rows but {db_path}'s SAE has d_in {base.d_in} and "
            f"{base.d_sae} features (database: {d.d_sae}); train the meta-SAE on that SAE"
        )
    rows = meta_latents(meta, base.W_dec, top)
    with write_transaction(db_path) as con:
        con.execute("DROP TABLE IF EXISTS meta_latents")
        for stmt in SCHEMA.strip().split(";"):
            if stmt.strip():
                con.execute(stmt)
        con.executemany("INSERT INTO meta_latents VALUES (?, ?, ?, ?)", rows)
        info = {"dir": str(Path(meta_dir).resolve()), "d_sae": meta.d_sae, "base": read_cfg(meta_dir)["metadata"]}
        con.execute("INSERT OR REPLACE INTO meta VALUES ('meta_sae', ?)", (json.dumps(info),))
    return len(rows)


def meta_for(d: FeatureDB, idx: int, shared: int = 10) -> list[dict[str, Any]] | None:
    """[{latent, activation, shared_with: [{index, activation}]}] for feature ``idx``: its meta-latents,
    strongest first, each with the ``shared`` other features on which that latent is strongest. None when
    the database has no meta-latents."""
    if not d.has_table("meta_latents"):
        return None
    out = []
    for latent, act in d.query("SELECT latent, activation FROM meta_latents WHERE feature = ? ORDER BY rank", (idx,)):
        others = d.query(
            "SELECT feature, activation FROM meta_latents WHERE latent = ? AND feature != ? "
            "ORDER BY activation DESC, feature LIMIT ?",
            (latent, idx, shared),
        )
        out.append(
            {"latent": latent, "activation": act, "shared_with": [{"index": f, "activation": a} for f, a in others]}
        )
    return out
