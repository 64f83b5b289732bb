"""GET /v1/models: the presets this deployment serves, with what each can do and who serves it."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.auth import current_owner
from server.schemas import ModelList
from turbodiffusion_core.spec import get_preset

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList, summary="Models served by live workers (and TD_MODELS)")
def list_models(request: Request, owner: str = Depends(current_owner)):
    catalog = request.app.state.catalog
    live = catalog.live()
    cards = []
    for model in catalog.models():
        workers = live.get(model, [])
        cards.append(
            {
                **get_preset(model).describe(),
                "object": "model",
                "created": 0,
                "owned_by": "turbodiffusion",
                "ready": bool(workers),
                "workers": workers,
            }
        )
    return {"object": "list", "data": cards}
