"""A small httpx transport on the standard library's ``http.client``, for short-lived processes.

httpx's own transport imports httpcore (and h11) on the first ``httpx.Client()``: about 30 ms,
a fifth of a ``kvm-memattr health`` call. ``http.client`` is already loaded by ``import httpx``.
This transport speaks plain HTTP/1.1 over one kept-alive connection, which is all a CLI call
needs; https URLs and proxies stay with httpx's transport (the CLI uses this one only for
``http://`` URLs with no proxy configured). Not thread-safe: one connection, one caller.
"""

from __future__ import annotations

import http.client

import httpx


class StdlibTransport(httpx.BaseTransport):
    """Plain-http requests over one ``http.client.HTTPConnection`` per origin, reopened when needed."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self._origin: tuple[str, int] | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"StdlibTransport speaks plain http, not {url.scheme!r}", request=request)
        origin = (url.host, url.port or 80)
        body = request.read()
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers.raw}
        target = url.raw_path.decode("ascii")
        # A kept-alive connection the server has since closed fails on first use: retry once, fresh.
        for attempt in (1, 2):
            reused = self._conn is not None and self._origin == origin
            if not reused:
                self.close()
                self._conn, self._origin = http.client.HTTPConnection(*origin, timeout=self.timeout), origin
            assert self._conn is not None
            try:
                self._conn.request(request.method, target, body=body, headers=headers)
                answer = self._conn.getresponse()
                content = answer.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.close()
                if reused and attempt == 1:
                    continue
                raise httpx.RemoteProtocolError(str(e), request=request) from e
            except TimeoutError as e:  # socket.timeout
                self.close()
                raise httpx.TimeoutException(str(e) or "timed out", request=request) from e
            except (OSError, http.client.HTTPException) as e:
                self.close()
                raise httpx.ConnectError(str(e) or type(e).__name__, request=request) from e
            if answer.will_close:
                self.close()
            return httpx.Response(answer.status, headers=answer.getheaders(), content=content, request=request)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._origin = None
