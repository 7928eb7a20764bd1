"""Connection bounds for ``kvm-memattr serve``: a cap on open connections and a deadline for the
first byte, so idle sockets cannot exhaust the process's file descriptors.

uvicorn closes a keep-alive connection idle between requests (``timeout_keep_alive``), but holds a
connection that never sends anything forever, and accepts as many as the fd limit allows. This
wraps uvicorn's own HTTP protocol (``Config(http=...)`` takes a protocol class) through the
``asyncio.Protocol`` interface alone: ``connection_made``, ``data_received``, ``connection_lost``.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger("kvm_memattr")


def bounded_protocol(max_connections: int, first_byte_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, refusing connections past ``max_connections`` and closing one that
    has sent nothing after ``first_byte_timeout`` seconds."""
    open_count = 0
    warned = False

    class BoundedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]  # a class chosen at import
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            nonlocal open_count, warned
            self._silent: asyncio.TimerHandle | None = None
            if open_count >= max_connections:
                if not warned:  # once: a flood must not flood the log too
                    log.warning("refusing connections past KVM_MEMATTR_MAX_CONNECTIONS=%d", max_connections)
                    warned = True
                self._counted = False
                transport.close()
                return
            open_count += 1
            self._counted = True
            warned = False
            self._silent = asyncio.get_running_loop().call_later(first_byte_timeout, transport.close)
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            if self._silent is not None:
                self._silent.cancel()
                self._silent = None
            super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            nonlocal open_count
            if self._silent is not None:
                self._silent.cancel()
            if not self._counted:
                return  # refused in connection_made: uvicorn never saw it
            open_count -= 1
            super().connection_lost(exc)

    return BoundedHTTPProtocol
