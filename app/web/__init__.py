"""The memory map: a web page of VMs, their memory and the protocol, served by the app itself.

Jinja2 renders one page; its own small JavaScript draws SVG from the JSON API (``/ui/static``),
so nothing is fetched from outside the service.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from app.models.names import HEX_KEYS

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(include_in_schema=False)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui", response_class=HTMLResponse)
async def ui(request: Request) -> HTMLResponse:
    return templates.TemplateResponse(
        request,
        "index.html",
        {"version": request.app.version, "max_gfn": request.app.state.engine.host.max_gfn, "hex_keys": HEX_KEYS},
    )


def install(app: FastAPI, include: Callable[[APIRouter], None]) -> None:
    """Mount the page (through ``include``, the app's router inclusion) and its static files."""
    include(router)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
