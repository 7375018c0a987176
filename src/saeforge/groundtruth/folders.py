"""What ``saeforge probe DIR`` probes: an SAE folder, a run folder, a sweep folder or a transcoders folder.

A sweep folder (``saeforge train --sweep``: sweep_plan.json and one run folder per point,
training/sweep.py) expands to every point's ``sae/`` in plan order; a transcoders folder
(``saeforge transcoders``: transcoders.json, circuits/transcoders.py) to its layers' SAE folders in
layer order. For such a folder ``probe`` also writes ``groundtruth_summary.json`` there (one row per
SAE; ``groundtruth_summary.<corpus-slug>.json`` on another corpus, as the per-SAE files are named).
"""

from __future__ import annotations

import json
from pathlib import Path

from saeforge.circuits.transcoders import MANIFEST
from saeforge.config import UserError
from saeforge.evals.report import _json_safe
from saeforge.io import atomic_write_text
from saeforge.training.sweep import PLAN_FILE, point_name, read_plan

SUMMARY = "groundtruth_summary"


class NothingToProbeError(UserError, FileNotFoundError):
    """A folder given to ``saeforge probe`` that holds no SAE, or a sweep whose points are not all saved yet."""


def expand(path: str | Path) -> tuple[list[Path], bool]:
    """(SAE folders under ``path``, whether ``path`` is a sweep or transcoders folder that gets a summary)."""
    path = Path(path)
    if (path / "cfg.json").exists():
        return [path], False
    if (path / MANIFEST).exists():
        layers = json.loads((path / MANIFEST).read_text())["layers"]
        return [path / rel for _, rel in sorted(layers.items(), key=lambda kv: int(kv[0]))], True
    if (path / PLAN_FILE).exists():
        saes = [path / point_name(p) / "sae" for p in read_plan(path)["points"]]
        missing = [s.parent.name for s in saes if not (s / "cfg.json").exists()]
        if missing:
            raise NothingToProbeError(
                f"{path}: {len(missing)} of {len(saes)} sweep points have no saved SAE yet ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}): finish the sweep with `saeforge train --sweep ... --resume "
                f"{path}`, or pass the finished points' sae folders"
            )
        return saes, True
    if (path / "sae" / "cfg.json").exists():  # a run folder
        return [path / "sae"], False
    raise NothingToProbeError(
        f"{path}: nothing to probe here. Pass an SAE folder (cfg.json), a run folder (runs/NAME with sae/), "
        f"a sweep folder ({PLAN_FILE}, from `saeforge train --sweep`) or a transcoders folder ({MANIFEST}, "
        "from `saeforge transcoders`)"
    )


def summary_row(folder: Path, result: dict, path: Path) -> dict:
    """The headline numbers of one probed SAE, as a row of the folder's summary."""

    def mean(kind: str, k: int | None = None):
        d = result["probing"][kind]
        return (d if k is None else d.get(k, d.get(str(k))))["mean"]

    ab = result.get("absorption", {})
    return {
        "sae": str(Path(result["sae"]).relative_to(folder)),
        "file": str(path.relative_to(folder)),
        "hook": result["hook"],
        "architecture": result.get("architecture"),
        "d_sae": result.get("d_sae"),
        "l0": result.get("l0"),
        "coverage": result["coverage"]["coverage"],
        "reconstruction": result["reconstruction"]["reconstruction"],
        "sparse_probing_k1": mean("sae", 1),
        "sparse_probing_k5": mean("sae", 5),
        "residual_k1": mean("residual", 1),
        "residual_k5": mean("residual", 5),
        "dense": mean("dense"),
        "tpp": result.get("tpp", {}).get("mean"),
        "full_absorption": ab.get("full_absorption"),
        "absorption_fraction": ab.get("absorption_fraction"),
    }


def write_summary(folder: Path, written: list[tuple[dict, Path]], tokens: int, probe_tokens: int) -> Path:
    """``folder``/groundtruth_summary[.slug].json: a row per SAE of the folder, written atomically."""
    first, first_path = written[0]
    name = first_path.name  # groundtruth.json or groundtruth.<slug>.json: the summary follows the same corpus naming
    out = folder / (SUMMARY + name[len("groundtruth") :])
    doc = {
        "folder": str(folder),
        "model": first["model"],
        "corpus": first["corpus"],
        "tokens": tokens,
        "probe_tokens": probe_tokens,
        "rows": [summary_row(folder, r, p) for r, p in written],
    }
    atomic_write_text(out, json.dumps(_json_safe(doc), indent=2) + "\n")
    return out


__all__ = ["NothingToProbeError", "expand", "summary_row", "write_summary"]
