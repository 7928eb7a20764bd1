"""The anchor for bench/http.py: the least a FastAPI app can do.

One ``GET /healthz`` returning a dict and one ``POST /items`` taking a two-field pydantic body,
served by the same uvicorn (uvloop, httptools) from the same venv as kvm-memattr. Whatever
kvm-memattr pays per request beyond this is its own cost.

    uvicorn bench.minimal_app:app
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()


class Item(BaseModel):
    addr: int
    size: int


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/items")
async def items(item: Item) -> dict[str, int]:
    return {"addr": item.addr, "size": item.size}
