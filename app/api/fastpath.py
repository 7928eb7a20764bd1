"""The request hot path: simple routes called without FastAPI's per-request machinery.

FastAPI pays, on every request, a walk of the router tree, a recursive dependency solve, a
JSON parse followed by a validation pass, and two more middlewares. For a route whose inputs
are only the VM in its path, the engine, the request, plain path and query parameters and one
JSON body model, all of that is known at start-up. ``FastPath`` compiles such routes once and,
per request:

- matches the path against every route in the router's own order (the first route that would
  take the request decides; if it is not a compiled one, FastAPI handles the request);
- looks the VM up once, validates each parameter with FastAPI's own field for it and the body
  once from bytes (pydantic-core), calls the endpoint and sends its ``Response`` (the endpoints
  serialize their models themselves);
- turns an engine error into problem+json through the same handler FastAPI uses.

Anything else falls back to FastAPI with the body replayed, *before* the engine is called: an
unknown VM, a parameter or body that is missing or does not validate, a body that is not
``application/json``, an app with ``dependency_overrides``. So every error document is
FastAPI's own, and what the fast path answers is what FastAPI would have answered
(tests/api/test_fastpath.py checks both on generated requests). The routes, their OpenAPI
document and their validation rules are untouched.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, get_args, get_type_hints

from fastapi import FastAPI, Request, Response
from fastapi._compat import ModelField, field_annotation_is_sequence
from fastapi.routing import APIRoute
from pydantic import BaseModel, Json, ValidationError
from starlette.datastructures import QueryParams
from starlette.routing import BaseRoute
from starlette.types import Scope, Send

from app.api.deps import FAST_DEPENDENCIES
from app.api.problems import kvm_problem
from app.core.errors import KvmError

_JSON = b"application/json"
Resolver = Callable[[FastAPI, dict[str, str]], Any]


class Fallback(Exception):
    """This request needs FastAPI: an unknown VM, a body that does not validate, a route not compiled."""


@dataclass(frozen=True)
class _Compiled:
    route: APIRoute
    endpoint: Callable[..., Awaitable[Response]]
    resolvers: tuple[tuple[str, Resolver], ...]  # keyword, resolver(app, path_params)
    params: tuple[tuple[ModelField, bool], ...]  # FastAPI's own field, in the path (else the query)
    request_name: str | None
    body: tuple[str, type[BaseModel]] | None  # keyword, model


@dataclass(frozen=True)
class _Candidate:
    regex: re.Pattern[str]
    head: str | None
    methods: frozenset[str] | None  # None: any method (a Mount)
    compiled: _Compiled | None  # None: FastAPI handles what this route matches


def _flatten(routes: Sequence[BaseRoute]) -> Iterator[BaseRoute]:
    """The routes in the order the router tries them, through included routers."""
    for route in routes:
        inner = getattr(route, "original_router", None)  # FastAPI >= 0.16x keeps included routers
        if inner is None:
            yield route
            continue
        context = route.include_context  # type: ignore[attr-defined]
        if context.prefix or context.dependencies:
            raise ValueError("included with a prefix or dependencies: not compiled")
        yield from _flatten(inner.routes)


def _compile(route: APIRoute) -> _Compiled | None:
    """A route the fast path can call, or None when it needs FastAPI's dependency solving."""
    d = route.dependant
    if route.dependencies or d.header_params or d.cookie_params:
        return None
    if not all(_scalar(f) for f in (*d.path_params, *d.query_params)):
        return None
    special = (d.websocket_param_name, d.http_connection_param_name, d.response_param_name)
    if any(special) or d.background_tasks_param_name or d.security_scopes_param_name:
        return None
    try:
        returns = get_type_hints(route.endpoint).get("return")
    except (NameError, TypeError):
        return None
    # Exactly Response: a StreamingResponse (the SSE trace) needs the live receive channel.
    if not inspect.iscoroutinefunction(route.endpoint) or returns is not Response:
        return None
    resolvers = []
    for dep in d.dependencies:
        resolver = FAST_DEPENDENCIES.get(dep.call)  # type: ignore[arg-type]
        if resolver is None or dep.name is None:
            return None
        resolvers.append((dep.name, resolver))
    body = None
    if d.body_params:
        field = d.body_params[0]
        model = field.field_info.annotation
        if len(d.body_params) > 1 or not field.field_info.is_required() or getattr(field.field_info, "embed", False):
            return None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        body = (field.name, model)
    params = tuple((f, True) for f in d.path_params) + tuple((f, False) for f in d.query_params)
    return _Compiled(route, route.endpoint, tuple(resolvers), params, d.request_param_name, body)


def _scalar(field: ModelField) -> bool:
    """A path or query parameter read as FastAPI reads it: the one string under its own name.
    (Lists, parameter models, aliases and Json fields are left to FastAPI.)"""
    info = field.field_info
    annotation = info.annotation
    if field.alias != field.name or info.validation_alias is not None:
        return False
    if any(type(item) is Json for item in info.metadata) or field_annotation_is_sequence(annotation):
        return False
    return not any(isinstance(a, type) and issubclass(a, BaseModel) for a in (annotation, *get_args(annotation)))


class FastPath:
    """The compiled routes of one app, tried in the router's order."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.candidates: list[_Candidate] = []
        for route in _flatten(app.router.routes):
            regex = getattr(route, "path_regex", None)
            if regex is None:
                continue
            methods = getattr(route, "methods", None)
            compiled = _compile(route) if isinstance(route, APIRoute) else None
            head = _head(str(getattr(route, "path", "{}")))
            self.candidates.append(_Candidate(regex, head, frozenset(methods) if methods else None, compiled))
        # A request's first path segment narrows the routes that could take it.
        heads = {c.head for c in self.candidates if c.head is not None}
        self._by_head = {h: [c for c in self.candidates if c.head in (h, None)] for h in heads}
        self._wild = [c for c in self.candidates if c.head is None]

    @property
    def compiled(self) -> list[APIRoute]:
        return [c.compiled.route for c in self.candidates if c.compiled is not None]

    def match(self, method: str, path: str) -> tuple[_Compiled, dict[str, Any]] | None:
        """The compiled route that the router would pick for this request, with its path params."""
        for c in self._by_head.get(path.split("/", 2)[1] if path[:1] == "/" else "", self._wild):
            m = c.regex.match(path)
            if m is not None and (c.methods is None or method in c.methods):
                if c.compiled is None:
                    return None
                convert = c.compiled.route.param_convertors  # as Starlette's Route.matches() does
                return c.compiled, {k: convert[k].convert(v) for k, v in m.groupdict().items()}
        return None

    async def __call__(
        self, compiled: _Compiled, params: dict[str, Any], scope: Scope, body: bytes, send: Send
    ) -> None:
        """Answer the request, or raise ``Fallback`` before anything has been sent or changed."""
        if self.app.dependency_overrides:  # a test swapped a dependency: only FastAPI knows it
            raise Fallback
        kwargs: dict[str, Any] = {}
        for name, resolver in compiled.resolvers:
            value = resolver(self.app, params)
            if value is None:
                raise Fallback
            kwargs[name] = value
        if compiled.params:
            query = QueryParams(scope["query_string"]) if any(not p for _, p in compiled.params) else None
            for field, in_path in compiled.params:
                raw = params.get(field.name) if in_path else query.get(field.name)  # type: ignore[union-attr]
                if raw is None:
                    if field.field_info.is_required() or field.field_info.validate_default:
                        raise Fallback
                    kwargs[field.name] = copy.deepcopy(field.default)
                    continue
                value, errors = field.validate(raw, {}, loc=())
                if errors:
                    raise Fallback
                kwargs[field.name] = value
        if compiled.body is not None:
            name, model = compiled.body
            if not body or _content_type(scope) != _JSON:
                raise Fallback
            try:
                kwargs[name] = model.__pydantic_validator__.validate_json(body)
            except ValidationError:
                raise Fallback from None
        scope["route"], scope["endpoint"], scope["path_params"] = compiled.route, compiled.endpoint, params
        receive = _no_body
        if compiled.request_name is not None:
            kwargs[compiled.request_name] = Request(scope, receive)
        try:
            response = await compiled.endpoint(**kwargs)
        except KvmError as exc:
            response = kvm_problem(Request(scope, receive), exc)
        await response(scope, receive, send)


def _head(path: str) -> str | None:
    """A route template's first segment, or None when it is a parameter (any request may match)."""
    first = path.split("/", 2)[1] if path[:1] == "/" else ""
    return None if "{" in first else first


def _content_type(scope: Scope) -> bytes | None:
    # The first one, as Starlette's Headers.get() (and so FastAPI) reads a repeated header.
    for key, value in scope["headers"]:
        if key == b"content-type":
            return bytes(value)
    return None


async def _no_body() -> dict[str, Any]:
    # The body was read before the route ran; a route that waits for more sees a disconnect.
    return {"type": "http.disconnect"}
