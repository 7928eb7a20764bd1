"""A synchronous httpx transport onto an ASGI app in this process: no server, no socket.

httpx's own ``ASGITransport`` is async only, so the app runs on an event loop in a daemon thread
of its own, with its lifespan run by asgi-lifespan, as a server would run it; each request is
handed to that loop and waited for.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx
from asgi_lifespan import LifespanManager

T = TypeVar("T")


class InProcessTransport(httpx.BaseTransport):
    def __init__(self, app: Any) -> None:
        self._loop = asyncio.new_event_loop()
        # A daemon thread: a client nobody closed must not keep the interpreter from exiting.
        threading.Thread(target=self._loop.run_forever, name="kvm-memattr-in-process", daemon=True).start()
        self._lifespan = self._call(_start(app))
        self._asgi = httpx.ASGITransport(app=self._lifespan.app)
        self._closed = False

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()  # a byte stream serves the async transport as well

        async def send() -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            response = await self._asgi.handle_async_request(request)
            body = await response.aread()
            return response.status_code, response.headers.raw, body

        status, headers, body = self._call(send())
        return httpx.Response(status, headers=headers, content=body, request=request)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._call(self._lifespan.__aexit__(None, None, None))
        self._loop.call_soon_threadsafe(self._loop.stop)


async def _start(app: Any) -> LifespanManager:
    """Run the app's start-up (the manager must be made inside the event loop)."""
    manager = LifespanManager(app)
    await manager.__aenter__()
    return manager
