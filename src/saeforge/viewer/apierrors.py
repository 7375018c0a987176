"""The error responses of the viewer's API as OpenAPI declarations (``responses=`` on each route).

Every error the viewer answers is JSON ``{"error": "..."}``; declaring which codes each route can return, with
that body, keeps /openapi.json true to the server (tests/test_viewer_contract.py runs schemathesis on it).
"""

from __future__ import annotations

from typing import Any


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for a route: the error codes it can answer, each with the ``{"error": ...}`` body
    every error here has (declared so that clients and schemathesis know what to expect)."""
    what = {
        400: "A parameter out of its choices, or a request body that is not JSON",
        404: "No such SAE, feature, node or graph",
        422: "A malformed or out-of-range parameter or body",
        503: "Live model runs are off or failed",
    }
    schema = {
        "type": "object",
        "properties": {"error": {"type": "string"}},
        "required": ["error"],
    }
    return {c: {"description": what[c], "content": {"application/json": {"schema": schema}}} for c in codes}
