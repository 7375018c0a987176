"""``saeforge serve``: the feature viewer's HTTP app (FastAPI), pages and a JSON API.

Pages are static HTML + one script that fetches the API and builds the DOM with textContent only,
so token text (untrusted corpus content) is never parsed as HTML. Databases are the ones named on the
command line, looked up by (model id, SAE id); a request can name only those, never a file.
Errors are JSON ``{"error": ...}`` with a 4xx code (422 for a malformed or out-of-range parameter: a list's
``offset`` must be >= 0 and ``limit`` within 1..500); anything unexpected is a 500 with no traceback.

Saved attribution graphs (``--graphs DIR``) live in ``graphs.py``. Steering (issue 7) lives in ``steer.py``: ``POST /api/steer/...`` as its own router, and the feature
page's ``#steer-slot`` panel.
"""

# No `from __future__ import annotations` here: FastAPI resolves the request models (classes local to
# create_app) from real annotations.

import logging
from importlib import resources
from pathlib import Path
from typing import Any

from saeforge.viewer.apierrors import error_responses
from saeforge.viewer.db import DBError, FeatureDB
from saeforge.viewer.featurejson import feature_bytes
from saeforge.viewer.graphs import graphs_router
from saeforge.viewer.jsoncache import FeatureHits, JSONCache
from saeforge.viewer.live import LiveError, LiveRunner
from saeforge.viewer.maproutes import map_router
from saeforge.viewer.steer import steer_router

log = logging.getLogger(__name__)
ASSETS = {"app.js": "text/javascript", "map.js": "text/javascript", "style.css": "text/css"}
MAX_LIMIT = 500  # rows per list request; a larger limit is a 422 like any other bad input, not silently cut
PAGES = ("index.html", "feature.html", "live.html", "map.html")


def _read_assets() -> dict[str, str]:
    root = resources.files("saeforge.viewer") / "static"
    return {name: (root / name).read_text(encoding="utf-8") for name in (*ASSETS, *PAGES)}


def create_app(db_paths: list[str | Path], live: bool = True, graphs: str | Path | None = None):
    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException

    dbs: dict[tuple[str, str], FeatureDB] = {}
    for p in db_paths:
        d = FeatureDB(p)
        key = (d.meta["model_id"], d.meta["sae_id"])
        if key in dbs:
            raise DBError(f"{p} and {dbs[key].path} both hold {key[0]}/{key[1]}; rebuild one with --name")
        dbs[key] = d
    assets = _read_assets()
    runner = LiveRunner() if live else None
    json_cache = JSONCache()

    app = FastAPI(
        title="saeforge feature viewer",
        version="1",
        description="Feature dashboards, search and live activations for sparse autoencoders.",
        docs_url=None,
        redoc_url=None,
    )  # the Swagger/ReDoc pages load scripts from a CDN; /openapi.json stays

    class NotFound(Exception):
        def __init__(self, msg: str):
            self.msg = msg

    @app.exception_handler(NotFound)
    async def _nf(request: Request, e: NotFound):
        return JSONResponse({"error": e.msg}, status_code=404)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException and the router's own 404/405
    async def _http(request: Request, e: StarletteHTTPException):
        # keep the exception's headers: a 405 carries the route's `Allow` list there
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        msgs = [f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors()]
        return JSONResponse({"error": "invalid request: " + "; ".join(msgs)}, status_code=422)

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.exception("viewer: %s %s failed", request.method, request.url.path)
        return JSONResponse({"error": "internal error (see the server log)"}, status_code=500)

    def get_db(model: str, sae: str) -> FeatureDB:
        d = dbs.get((model, sae))
        if d is None:
            raise NotFound(f"no SAE {model}/{sae} here; GET /api/saes lists the loaded ones")
        return d

    def get_feature(model: str, sae: str, index: int) -> tuple[FeatureDB, dict[str, Any]]:
        d = get_db(model, sae)
        f = d.feature(index) if 0 <= index < d.d_sae else None
        if f is None:
            raise no_feature(d, index)
        return d, f

    def no_feature(d: FeatureDB, index: int) -> NotFound:
        return NotFound(
            f"{d.meta['model_id']}/{d.meta['sae_id']} has features 0..{d.d_sae - 1}; there is no feature {index}"
        )

    # ---- pages -------------------------------------------------------------------------
    def page(name: str) -> HTMLResponse:
        return HTMLResponse(assets[name], headers={"Content-Security-Policy": "default-src 'self'; style-src 'self'"})

    @app.get("/", include_in_schema=False)
    def home():
        return page("index.html")

    @app.get("/feature/{model}/{sae}/{index}", include_in_schema=False)
    def feature_page(model: str, sae: str, index: int):
        d = get_db(model, sae)  # a 404 for a feature that is not there, without reading the feature
        if not (0 <= index < d.d_sae and d.has_feature(index)):
            raise no_feature(d, index)
        return page("feature.html")

    @app.get("/live", include_in_schema=False)
    def live_page():
        return page("live.html")

    @app.get("/map", include_in_schema=False)
    def map_page():
        return page("map.html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():  # browsers ask for it on every page; "no content" keeps their consoles clean
        return Response(status_code=204)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        if name not in ASSETS:  # a fixed set of in-memory assets: no path from the request reaches the disk
            raise NotFound(f"no asset {name!r}")
        return Response(assets[name], media_type=ASSETS[name], headers={"Cache-Control": "max-age=300"})

    # ---- API ---------------------------------------------------------------------------
    @app.get("/api/saes", summary="The SAEs this server holds")
    def saes():
        keys = (
            "model",
            "model_id",
            "sae_id",
            "hook",
            "architecture",
            "d_in",
            "d_sae",
            "n_tokens",
            "corpus",
            "logit_lens",
        )
        return {"saes": [{k: d.meta.get(k) for k in keys} | {"live": live} for d in dbs.values()]}

    @app.get("/api/features/{model}/{sae}", summary="Feature list, sorted", responses=error_responses(400, 404, 422))
    def features(
        model: str,
        sae: str,
        sort: str = "density",
        order: str = "desc",
        offset: int = Query(0, ge=0),
        limit: int = Query(50, ge=1, le=MAX_LIMIT),
        alive_only: bool = False,
        exclude_first: bool = False,
    ):
        d = get_db(model, sae)
        if sort not in ("density", "max_act", "index") or order not in ("asc", "desc"):
            raise HTTPException(400, "sort must be density, max_act or index; order asc or desc")
        try:
            rows = d.list_features(sort, order == "desc", offset, limit, alive_only, exclude_first)
        except DBError as e:  # exclude_first on a database built before the first-position table
            raise HTTPException(422, str(e)) from e
        return {"total": d.d_sae, "offset": offset, "features": rows}

    @app.get(
        "/api/feature/{model}/{sae}/{index}",
        summary="One feature, shaped like Neuronpedia's feature JSON",
        responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}}} | error_responses(404, 422),
    )
    async def feature(model: str, sae: str, index: int, exclude_first: bool = False):
        # The hot path of the viewer: encoded JSON bytes from the cache (see jsoncache.py for when they are
        # rebuilt); async so that a hit never waits for the thread pool. A miss whose index-time part is stored
        # (featurejson.py) costs a few indexed reads and a decompression, less than a trip through the thread
        # pool, so it runs here; building the JSON from the tables takes milliseconds, so that runs in the pool.
        d = get_db(model, sae)
        full, body = json_cache.lookup(d.path, ("feature", index, exclude_first))
        if body is None:
            if not 0 <= index < d.d_sae:
                raise no_feature(d, index)
            body = feature_bytes(d, index, exclude_first, stored_only=True)
            if body is None:
                body = await run_in_threadpool(feature_bytes, d, index, exclude_first)
            if body is None:
                raise no_feature(d, index)
            json_cache.store(full, body)
        return Response(body, media_type="application/json")

    @app.get(
        "/api/search",
        summary="Features whose top contexts peak on a token containing q, or explained by q's words",
        responses=error_responses(404, 422),
    )
    def search(q: str, model: str | None = None, sae: str | None = None, limit: int = Query(50, ge=1, le=MAX_LIMIT)):
        if not q.strip():  # nothing to look for: no results (the schema allows an empty q, so no error)
            return {"q": q, "results": []}
        targets = [get_db(model, sae)] if model and sae else list(dbs.values())
        return {
            "q": q,
            "results": [
                {"model": d.meta["model_id"], "sae": d.meta["sae_id"], **r} for d in targets for r in d.search(q, limit)
            ],
        }

    class ActivationsRequest(BaseModel):
        text: str = Field(..., min_length=1, max_length=4000, description="Text to run (at most 256 tokens are used).")
        saes: list[str] | None = Field(None, description="'model/sae' ids; all loaded SAEs when omitted.")
        top: int = Field(5, ge=1, le=50, description="Features listed per token.")

    class FeatureActivationRequest(BaseModel):
        text: str = Field(..., min_length=1, max_length=4000)

    def need_live():
        if runner is None:
            raise HTTPException(503, "live activations are off (server started with --no-live)")
        return runner

    def run_live(fn, *args):
        try:
            return fn(*args)
        except LiveError as e:
            raise HTTPException(503, str(e)) from e

    @app.post(
        "/api/activations",
        summary="Live: top features per token for each SAE",
        responses=error_responses(400, 404, 422, 503),
    )
    def activations(req: ActivationsRequest):
        r = need_live()
        chosen = [tuple(s.split("/", 1)) for s in req.saes] if req.saes else list(dbs)
        out = []
        for key in chosen:
            d = get_db(*key) if len(key) == 2 else get_db(key[0], "")
            res = run_live(r.top_features, "/".join(key), d.meta, req.text, req.top)
            out.append({"model": key[0], "sae": key[1], "tokens": d.texts(res["token_ids"]), **res})
        return {"results": out}

    @app.post(
        "/api/activation/{model}/{sae}/{index}",
        summary="Live: one feature's activation on each token",
        responses=error_responses(400, 404, 422, 503),
    )
    def activation(model: str, sae: str, index: int, req: FeatureActivationRequest):
        r = need_live()
        d, _ = get_feature(model, sae, index)
        ids, f_TF, _ = run_live(r.latents, f"{model}/{sae}", d.meta, req.text)
        values = f_TF[:, index].tolist()
        top = max(range(len(values)), key=values.__getitem__)
        return {
            "tokens": d.texts(ids),
            "values": values,
            "maxValue": values[top],
            "maxValueTokenIndex": top,
            "minValue": min(values),
        }

    def cached_feature(model: str, sae: str, index: int) -> bytes | None:
        d = dbs.get((model, sae))
        return None if d is None else json_cache.peek(d.path, ("feature", index, False))

    app.add_middleware(FeatureHits, lookup=cached_feature)
    app.state.json_cache = json_cache  # read by tests and benchmarks (hits, misses)
    app.include_router(steer_router(get_feature, runner))
    app.include_router(graphs_router(graphs, [d.meta for d in dbs.values()], NotFound))
    app.include_router(map_router(get_db))
    return app


def serve(
    db_paths: list[str | Path], host: str = "127.0.0.1", port: int = 8000, live: bool = True, graphs=None
) -> None:
    import uvicorn

    # No access log: formatting and writing a line per request is work on the hot path nobody asked for.
    uvicorn.run(
        create_app(db_paths, live=live, graphs=graphs), host=host, port=port, log_level="info", access_log=False
    )
