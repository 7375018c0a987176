"""Saved attribution graphs in the viewer: ``GET /api/graphs``, ``GET /api/graph/{name}``, ``/graph.html?name=``.

Graphs are the ``*.json`` files of one folder (``saeforge serve --graphs DIR``, e.g. a transcoder folder's
``graphs/``), listed afresh on each request; a request names a graph by its file stem, and only a stem found in
that listing is ever opened, so no path from a request reaches the disk. The page is circuits/html.py's view,
served with a Content-Security-Policy that allows its own inline script and style (by a per-response nonce) and
nothing from elsewhere.

Feature links: the graph's ``metadata.transcoder_list[0]`` is its transcoder folder; a layer whose transcoder
folder (from that folder's ``transcoders.json``) is the ``sae_dir`` of a served feature database links its
features to that database's pages. Otherwise (a cross-layer transcoder, or no database built) there is no link.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any

from saeforge.circuits.html import graph_html
from saeforge.circuits.transcoders import MANIFEST
from saeforge.viewer.apierrors import error_responses

_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def list_graphs(folder: Path) -> dict[str, Path]:
    """Stem -> file of every graph JSON in ``folder`` (files that are not graph JSON are left out)."""
    out = {}
    for path in sorted(folder.glob("*.json")):
        if _NAME.match(path.stem):
            out[path.stem] = path
    return out


def feature_urls(graph: dict[str, Any], db_metas: list[dict[str, Any]]) -> dict[str, str]:
    """Layer (str) -> ``/feature/{model}/{sae}/`` for the layers whose transcoder a served database holds."""
    folders = graph.get("metadata", {}).get("transcoder_list") or []
    if not folders:
        return {}
    manifest_path = Path(folders[0]) / MANIFEST
    try:
        layers = json.loads(manifest_path.read_text())["layers"]
    except (OSError, ValueError, KeyError):
        return {}  # moved, a CLT folder (no manifest), or not ours: no links
    by_dir = {str(Path(m["sae_dir"]).resolve()): m for m in db_metas if m.get("sae_dir")}
    out = {}
    for layer, rel in layers.items():
        m = by_dir.get(str((Path(folders[0]) / rel).resolve()))
        if m is not None:
            out[str(layer)] = f"/feature/{m['model_id']}/{m['sae_id']}/"
    return out


def graphs_router(folder: str | Path | None, db_metas: list[dict[str, Any]], not_found: type[Exception]):
    """An APIRouter for ``create_app``; ``not_found(msg)`` is the app's 404. ``folder`` None: no graphs."""
    from fastapi import APIRouter
    from fastapi.responses import HTMLResponse

    router = APIRouter()
    root = Path(folder) if folder is not None else None

    def load(name: str) -> dict[str, Any]:
        files = list_graphs(root) if root is not None else {}
        if name not in files:
            raise not_found(f"no graph {name!r}; GET /api/graphs lists them")
        return json.loads(files[name].read_text())

    @router.get("/api/graphs", summary="The saved attribution graphs this server holds")
    def graphs():
        out = []
        for name, path in (list_graphs(root) if root is not None else {}).items():
            try:
                d = json.loads(path.read_text())
                meta = d["metadata"]
                out.append({"name": name, "prompt": meta.get("prompt"), "scan": meta.get("scan"),
                            "nodes": len(d["nodes"]), "links": len(d["links"]), "scores": meta.get("scores")})  # fmt: skip
            except (ValueError, KeyError, TypeError):
                continue  # some other JSON file in the folder
        return {"graphs": out}

    @router.get(
        "/api/graph/{name}", summary="One graph JSON (circuit-tracer layout)", responses=error_responses(404, 422)
    )
    def graph(name: str):
        return load(name)

    @router.get("/graph.html", include_in_schema=False)
    def graph_page(name: str):
        d = load(name)
        nonce = secrets.token_urlsafe(16)
        csp = f"default-src 'self'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'"
        return HTMLResponse(graph_html(d, feature_urls(d, db_metas), nonce), headers={"Content-Security-Policy": csp})

    return router
