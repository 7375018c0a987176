"""The dictionary map's API (``create_app`` includes it): ``GET /api/map``, ``GET /api/tree``, ``POST /api/pca``.

The PCA reads decoder rows from the SAE folder the database names (meta ``sae_dir``), loaded once per SAE;
a database whose folder has moved answers 404 with what to do.
"""

# No `from __future__ import annotations`: FastAPI reads the request model from real annotations.

import threading
from collections.abc import Callable
from typing import Any

from saeforge.saes.formats import load_sae
from saeforge.saes.hub import local_sae_dir
from saeforge.viewer import dmap
from saeforge.viewer.apierrors import error_responses
from saeforge.viewer.db import DBError, FeatureDB

MAX_PCA_FEATURES = 2000


def map_router(get_db: Callable[[str, str], FeatureDB]):
    from fastapi import APIRouter, HTTPException, Query
    from pydantic import BaseModel, Field

    router = APIRouter()
    decoders: dict[str, Any] = {}
    lock = threading.Lock()

    def decoder(d: FeatureDB):
        key = str(d.path)
        with lock:
            if key not in decoders:
                try:
                    sae = load_sae(local_sae_dir(d.meta["sae_dir"]), device="cpu")
                except (OSError, ValueError) as e:
                    raise HTTPException(
                        404,
                        f"the SAE folder {d.meta['sae_dir']} this database was built from is not readable "
                        f"({e}); restore it there to use PCA",
                    ) from e
                decoders[key] = sae.W_dec.detach().float().cpu()
            return decoders[key]

    def checked(fn, *args):
        try:
            return fn(*args)
        except DBError as e:  # an older database without the map tables
            raise HTTPException(422, str(e)) from e

    @router.get(
        "/api/map/{model}/{sae}",
        summary="2-D map of the decoder directions with clusters and colours",
        responses=error_responses(404, 422),
    )
    def map_(model: str, sae: str):
        return checked(dmap.map_points, get_db(model, sae))

    @router.get(
        "/api/tree/{model}/{sae}",
        summary="A node of the decoder-direction cluster tree and its children",
        responses=error_responses(404, 422),
    )
    def tree(model: str, sae: str, node: int | None = Query(None, ge=0)):
        d = get_db(model, sae)
        out = checked(dmap.tree_node, d, node)
        if out is None:
            raise HTTPException(404, f"no tree node {node}: nodes are 0..{2 * d.d_sae - 2} (root {2 * d.d_sae - 2})")
        return out

    class PCARequest(BaseModel):
        features: list[int] = Field(
            ..., min_length=2, max_length=MAX_PCA_FEATURES, description="Feature indices (at least two)."
        )

    @router.post(
        "/api/pca/{model}/{sae}",
        summary="2-D PCA of the chosen features' decoder rows",
        responses=error_responses(400, 404, 422),
    )
    def pca(model: str, sae: str, req: PCARequest):
        d = get_db(model, sae)
        bad = [f for f in req.features if not 0 <= f < d.d_sae]
        if bad:
            raise HTTPException(422, f"features {bad[:5]} are outside 0..{d.d_sae - 1}")
        feats = list(dict.fromkeys(req.features))  # a repeated index would count twice in the variance
        if len(feats) < 2:
            raise HTTPException(422, "PCA needs at least two distinct features")
        return dmap.pca_of(decoder(d), feats)

    return router
