"""One pure-ASGI middleware: request id, Host and cross-site checks, bearer token, body limit,
security headers, access log and HTTP metrics.

Pure ASGI (not BaseHTTPMiddleware) because it sits on every request.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.auth import check_bearer
from app.api.metrics import Metrics
from app.api.problems import problem_document
from app.logs import request_id_var

log = logging.getLogger("kvm_memattr.access")
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_IMPORT_SLACK = 1024
"""Brackets of a snapshot that are no stored item (the document, its lists, its profile)."""

# Every response: no MIME sniffing, never framed, no referrer leaves, and a CSP that allows only
# this service's own files. Swagger UI starts itself with an inline script, so /docs needs it.
_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'"
)
_SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
_PAGE_HEADERS = ((b"content-security-policy", _CSP.encode()), *_SECURITY_HEADERS)
_DOCS_HEADERS = (
    (
        b"content-security-policy",
        _CSP.replace("default-src 'self';", "default-src 'self'; script-src 'self' 'unsafe-inline';").encode(),
    ),
    *_SECURITY_HEADERS,
)
"""What every response gains after its own headers and the request id: /docs's CSP differs."""


def host_name(host: str) -> str:
    """``host[:port]`` or ``[v6]:port`` -> the name alone, lower case."""
    if host.startswith("["):
        return host[1 : host.find("]")].lower() if "]" in host else host.lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


def _printable(text: str) -> str:
    """A request path as one log line: control characters escaped (a %0a would split the line)."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class _Refused(Exception):
    """A request answered here, before the app: 401/403 (EPERM) or 413 (E2BIG)."""

    def __init__(self, status: int, errno: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.errno, self.detail = status, errno, detail

    def body(self, path: str) -> bytes:
        return json.dumps(problem_document(self.status, self.errno, self.detail, path)).encode()


class ServiceMiddleware:
    _prefix = secrets.token_hex(4)

    IMPORT_PATH = "/v1/vms/import"

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body_bytes: int,
        max_import_bytes: int,
        api_token: str | None,
        allowed_hosts: frozenset[str] | None = None,
        import_room: Callable[[], int] | None = None,
    ) -> None:
        self.app, self.metrics, self.max_body, self.token = app, metrics, max_body_bytes, api_token
        self.allowed_hosts = allowed_hosts  # None: any Host
        self.import_room = import_room  # items the service budget still holds
        self.max_import = max_import_bytes  # a snapshot holds every run of a VM
        # Unique per process and cheap: a random prefix and a counter (uuid4 costs a syscall).
        self._count = itertools.count(1).__next__
        # The same few Host values (name:port) come every time: each is judged once.
        self._answers_to = functools.lru_cache(maxsize=64)(self._host_allowed)

    def _check_origin(self, method: str, headers: dict[bytes, bytes]) -> None:
        """DNS rebinding and cross-site requests: a Host this service does not answer to, and a
        state change a page of another site sent (a form POST needs no CORS preflight)."""
        host = headers.get(b"host", b"")
        if not self._answers_to(host):
            raise _Refused(
                403,
                "EPERM",
                f"Host {host.decode('latin-1')!r} is not one this service answers to (KVM_MEMATTR_ALLOWED_HOSTS)",
            )
        if method in _SAFE_METHODS:
            return
        site = headers.get(b"sec-fetch-site")
        origin = headers.get(b"origin")
        if site in (b"cross-site", b"same-site") or (origin is not None and origin.partition(b"://")[2] != host):
            raise _Refused(403, "EPERM", "a state change sent by a page of another site (Origin / Sec-Fetch-Site)")

    def _host_allowed(self, host: bytes) -> bool:
        return self.allowed_hosts is None or host_name(host.decode("latin-1")) in self.allowed_hosts

    @staticmethod
    def _check_import_size(parts: list[Message], room: int) -> None:
        """Refuse a snapshot too big for the service before parsing it: every stored item is a JSON
        array or object (a run, a slot, a mapping...), so counting brackets, at memory speed, bounds
        the items from above. Parsing one costs about a hundred times its size: refused here, an
        oversized import costs what reading it cost, and stalls no other request."""
        bodies = [p.get("body", b"") for p in parts]
        items = sum(b.count(b"[") + b.count(b"{") for b in bodies)
        if items > room + _IMPORT_SLACK:
            raise _Refused(
                507, "ENOMEM", f"snapshot: about {items} items do not fit the service-wide budget ({room} left)"
            )

    def _too_large(self, limit: int) -> _Refused:
        return _Refused(413, "E2BIG", f"request body larger than {limit} bytes")

    async def _read_body(self, receive: Receive, limit: int, room: Callable[[], int] | None) -> Receive:
        """Read a body before the app does, refusing it as soon as it passes the limit (and, given
        the room left, a snapshot too big for the service); the app then reads it from memory."""
        parts, size = [], 0
        while True:
            message = await receive()
            parts.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                raise self._too_large(limit)
            if not message.get("more_body", False):
                break
        if room is not None:
            self._check_import_size(parts, room())

        async def replay() -> Message:
            return parts.pop(0) if parts else await receive()

        return replay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        headers = dict(scope["headers"])
        incoming = headers.get(b"x-request-id")
        if incoming is not None and _REQUEST_ID.fullmatch(incoming):
            request_id, id_header = incoming.decode("latin-1"), (b"x-request-id", incoming)
        else:
            request_id = f"{self._prefix}{self._count():08x}"
            id_header = (b"x-request-id", request_id.encode())
        request_id_var.set(request_id)
        status = 0  # until the response starts

        def send_with_id(message: Message) -> Awaitable[None]:
            # A plain function handing on send's awaitable: no coroutine of its own per message.
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                page = _DOCS_HEADERS if path.startswith("/docs") else _PAGE_HEADERS
                message["headers"] = [*message.get("headers", ()), id_header, *page]
            return send(message)

        try:
            self._check_origin(scope["method"], headers)
            if self.token and path.startswith("/v1/"):
                refused = check_bearer(headers.get(b"authorization"), self.token)
                if refused is not None:
                    raise _Refused(refused[0], "EPERM", refused[1])
            is_import = path == self.IMPORT_PATH
            limit = self.max_import if is_import else self.max_body
            room = self.import_room if is_import else None  # a snapshot's items are counted first
            length = headers.get(b"content-length")
            # uvicorn holds a body to its Content-Length: a declared one is checked before anything is
            # read, and the app reads the body itself (but a snapshot to count). A body of unknown
            # length is read here, and refused as soon as it passes the limit.
            if length is not None and (not length.isdigit() or int(length) > limit):
                raise self._too_large(limit)
            if length is None or b"transfer-encoding" in headers or room is not None:
                receive = await self._read_body(receive, limit, room)
            await self.app(scope, receive, send_with_id)
        except _Refused as refused:
            if status:
                raise
            body = refused.body(path)
            extra = [(b"www-authenticate", b"Bearer")] if refused.status == 401 else []
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": refused.status,
                    "headers": [
                        (b"content-type", b"application/problem+json"),
                        (b"content-length", str(len(body)).encode()),
                        *extra,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
        finally:
            elapsed = time.perf_counter() - started
            status = status or 500  # no response: the server answers 500
            template = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe(scope["method"], template, status, elapsed)
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "%s %s %d %.2fms",
                    scope["method"],
                    _printable(path),
                    status,
                    elapsed * 1000,
                    extra={"route": template, "status": status},
                )
