"""The tests' client onto an app in this process: httpx over the package's own in-process
transport (starlette's TestClient couples httpx in a way starlette now deprecates)."""

from __future__ import annotations

from typing import Any

import httpx

from app.client.inprocess import InProcessTransport


class TestClient(httpx.Client):
    __test__ = False  # not a test class

    def __init__(self, app: Any, **kwargs: Any) -> None:
        super().__init__(transport=InProcessTransport(app), base_url="http://localhost", **kwargs)
