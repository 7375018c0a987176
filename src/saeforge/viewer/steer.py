"""``POST /api/steer/{model}/{sae}/{index}``: the feature page's steering panel (issue 7).

Generates a prompt's continuation with and without adding ``alpha`` to one feature, through
``analysis.steering.steer_generate`` on the model and SAE the live box already holds. Greedy decoding,
so the same request always gives the same texts. Bounds keep one request to seconds on a CPU: the
runner's lock serialises generations, so a long one would stall every other live request.
"""

# No `from __future__ import annotations`: FastAPI reads the request model from real annotations.

from collections.abc import Callable
from typing import Any, Literal

from saeforge.analysis.steering import steer_generate
from saeforge.viewer.apierrors import error_responses
from saeforge.viewer.live import LiveError, LiveRunner

MAX_PROMPT_CHARS = 2000
MAX_ALPHA = 1000.0  # latent units; real SAEs' activations reach the hundreds, nothing sensible is beyond this
MAX_NEW_TOKENS = 64
DEFAULT_NEW_TOKENS = 24


def steer_router(get_feature: Callable[[str, str, int], Any], runner: LiveRunner | None):
    """An APIRouter for ``create_app``: ``get_feature`` raises its 404 for unknown SAEs/features."""
    from fastapi import APIRouter, HTTPException
    from pydantic import BaseModel, Field

    router = APIRouter()

    class SteerRequest(BaseModel):
        prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS, description="Text to continue.")
        alpha: float = Field(
            ...,
            ge=-MAX_ALPHA,
            le=MAX_ALPHA,
            description="Added to the feature's activation (latent units): + alpha x W_dec[index].",
        )
        max_new_tokens: int = Field(DEFAULT_NEW_TOKENS, ge=1, le=MAX_NEW_TOKENS, description="Tokens to generate.")
        positions: Literal["all", "last"] = Field(
            "all", description="Edit every position, or only the last (the prompt's last token, then each new one)."
        )

    class SteerResponse(BaseModel):
        clean: str = Field(..., description="Greedy continuation without the edit (prompt not included).")
        steered: str = Field(..., description="The same with the feature steered.")

    @router.post(
        "/api/steer/{model}/{sae}/{index}",
        response_model=SteerResponse,
        summary="Live: a prompt's greedy continuation without and with steering one feature",
        responses=error_responses(400, 404, 422, 503),
    )
    def steer(model: str, sae: str, index: int, req: SteerRequest):
        if runner is None:
            raise HTTPException(503, "steering needs the model, and live mode is off (server started with --no-live)")
        d, _ = get_feature(model, sae, index)
        try:
            with runner.loaded(f"{model}/{sae}", d.meta) as live:
                res = steer_generate(
                    live.lm,
                    live.sae,
                    index,
                    req.alpha,
                    req.prompt,
                    hook=d.meta["hook"],
                    positions=req.positions,
                    max_new_tokens=req.max_new_tokens,
                )
        except LiveError as e:
            raise HTTPException(503, str(e)) from e
        except ValueError as e:  # e.g. a prompt that tokenises to nothing: the user's to fix, not a crash
            raise HTTPException(422, str(e)) from e
        return {"clean": res.clean, "steered": res.steered}

    return router
