"""The request hot path: a plain Starlette route in front of each simple FastAPI route.

Measured through ASGI, FastAPI spends most of a small request outside the endpoint: a walk of
the router tree (with included routers, every router before the chosen one, and the chosen route
twice), a recursive dependency solve and a JSON parse followed by a separate validation pass.
For a route whose inputs are only dependencies, the request, plain path and query parameters and
one JSON body model, all of that is known at start-up.

The design: ``FastPath.include_router`` includes a router as FastAPI documents it, then puts a
``FastRoute`` (a Starlette ``Route`` with the same path, methods, endpoint and name) for each
such route of it at the front of the app's routes. Per request a ``FastRoute`` validates each
parameter and the body (once, from its bytes, in pydantic-core) by the parameter's own
annotation, calls the same dependency functions and the endpoint in FastAPI's order, and sends
the endpoint's ``Response``. Why: it is routed like any route, so the app's middlewares, its
exception handlers (what the endpoint raises becomes problem+json with the request id),
``root_path`` and include prefixes all apply, and it needs only public interfaces of FastAPI,
Starlette and pydantic. At the front because FastAPI's walk past the included routers before a
route is the costliest part left: ``FastRoute``s just before their router cost a conversion about
a sixth more; ``FastPath`` puts each after every route already in the app that could take one of
its requests, which it can tell for the routers it included, plain routes and mounts (any other
entry is taken to be such a route). Measured and dropped: the previous design, a second router
inside ``ServiceMiddleware``, about 0.1 of the minimal POST faster in bench/http.py through ASGI,
but built on FastAPI's private ``ModelField``, ``Dependant`` and one release's router tree, and it
sent errors past the app's handlers and inner middlewares; a custom ``APIRoute`` class
(``route_class``, FastAPI's documented hook), as slow as no fast path (it keeps FastAPI's router
walk), and blind to an ``include_router(dependencies=...)`` of FastAPI 0.16x.

Whatever a ``FastRoute`` is unsure of goes to FastAPI, *before* anything is called: a parameter
or body that is missing or does not validate, a body that is not ``application/json``, an app
with ``dependency_overrides``, a method other than the route's (``HEAD``: Starlette adds it to a
``GET`` route, FastAPI does not). It marks the scope and hands the request, its body replayed,
to the app's router again, which then passes every ``FastRoute`` by: so every error document is
FastAPI's own, and what the fast path answers is what FastAPI would have answered
(tests/api/test_fastpath.py checks both on generated requests, on the oldest FastAPI the project
allows and the newest). The routes, their OpenAPI document and their validation rules are
untouched.
"""

from __future__ import annotations

import copy
import inspect
import operator
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from fastapi import FastAPI, Request, Response, params
from fastapi.routing import APIRoute, APIRouter
from pydantic import BaseModel, Json, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from starlette.datastructures import QueryParams
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import Message, Receive, Scope, Send

_DECLINED = "kvm_memattr.fast_path_declined"
"""Scope key: a FastRoute handed this request back; the router's second walk passes them all by."""

_NO_MATCH: tuple[Match, Scope] = (Match.NONE, {})
"""What ``matches`` answers without trying the path's regex (the router reads no scope from it)."""
_SCALARS = (str, int, float, bool, type(None))
_REQUIRED: Any = inspect.Parameter.empty
_JSON = b"application/json"


class _Fallback(Exception):
    """This request is FastAPI's to answer (it names the error)."""


@dataclass(frozen=True)
class _Input:
    """A path or query parameter, or the body, validated by its own annotation."""

    name: str
    where: Literal["path", "query", "body"]
    validate: Callable[[Any], Any]  # the annotation's validator: of the body's bytes, or of the string
    default: Any = _REQUIRED


@dataclass(frozen=True)
class _Step:
    """One call, a dependency or last the endpoint, with its arguments (in its signature's order)
    picked from a request's values: the request, its inputs, then the results of the steps before."""

    func: Callable[..., Any]
    pick: Callable[[list[Any]], Sequence[Any]]


def _picker(indices: Sequence[int]) -> Callable[[list[Any]], Sequence[Any]]:
    # An itemgetter is the cheapest pick there is (a dict of keywords costs a few microseconds a
    # request, a lambda one Python call); of one index it returns the value itself, so none or one
    # is a slice.
    if len(indices) > 1:
        return operator.itemgetter(*indices)
    return operator.itemgetter(slice(indices[0], indices[0] + 1) if indices else slice(0))


# ---------------------------------------------------------------- planning, once per route


def _split(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    """``Annotated[T, *metadata]`` -> (T, metadata); anything else -> (hint, ())."""
    if get_origin(hint) is Annotated:
        base, *metadata = get_args(hint)
        return base, tuple(metadata)
    return hint, ()


def _scalar(hint: Any) -> bool:
    """One string read as one value (FastAPI reads a list, a dict or a model otherwise)."""
    base, _ = _split(hint)
    if get_origin(base) in (Union, types.UnionType):
        return all(_scalar(arg) for arg in get_args(base))
    if get_origin(base) is Literal:
        return True
    return base in _SCALARS or (isinstance(base, type) and issubclass(base, Enum))


def _plain_depends(depends: params.Depends) -> bool:
    """``Depends(f)`` with no option set (caching off, a scope, a limit...): options are FastAPI's."""
    try:
        return type(depends) is params.Depends and vars(depends) == vars(params.Depends(depends.dependency))
    except TypeError:  # nothing to compare
        return False


_Source = tuple[Literal["request", "input", "call"], int]  # what an argument is, and which


class _Planner:
    """The inputs and calls of one route, in the order FastAPI solves them."""

    def __init__(self, path_names: Iterable[str]) -> None:
        self.path_names = set(path_names)
        self.inputs: list[_Input] = []
        self.calls: list[tuple[Callable[..., Any], list[_Source]]] = []

    def steps(self) -> tuple[_Step, ...]:
        at = {"request": 0, "input": 1, "call": 1 + len(self.inputs)}
        return tuple(_Step(func, _picker([at[kind] + i for kind, i in args])) for func, args in self.calls)

    def add(self, func: Callable[..., Any]) -> int | None:
        """The call of ``func`` (a dependency is called once per request, as FastAPI caches it),
        or None when FastAPI must solve it."""
        for i, (called, _) in enumerate(self.calls):
            if called is func:
                return i
        # FastAPI runs a plain function in a thread and enters a generator: left to it.
        if not inspect.iscoroutinefunction(func):
            return None
        try:
            hints = get_type_hints(func, include_extras=True)
            signature = inspect.signature(func)
        except (NameError, TypeError, ValueError):
            return None
        args: list[_Source] = []
        for name, param in signature.parameters.items():
            source = self._source(name, param, hints.get(name, _REQUIRED))
            if source is None:
                return None
            args.append(source)
        self.calls.append((func, args))
        return len(self.calls) - 1

    def _source(self, name: str, param: inspect.Parameter, hint: Any) -> _Source | None:
        if hint is _REQUIRED or param.kind is not param.POSITIONAL_OR_KEYWORD:  # passed by position
            return None
        if isinstance(param.default, (FieldInfo, params.Depends)):  # the pre-Annotated style
            return None
        base, metadata = _split(hint)
        declared = [m for m in metadata if isinstance(m, (FieldInfo, params.Depends))]
        info = declared[-1] if declared else None  # FastAPI reads the last one
        if isinstance(info, params.Depends):
            if info.dependency is None or not _plain_depends(info):
                return None
            call = self.add(info.dependency)
            return None if call is None else ("call", call)
        if base is Request and info is None:
            return ("request", 0)
        if info is not None and (info.alias or info.validation_alias or info.validate_default):
            return None  # read under another name, or a default FastAPI validates
        if any(type(m) is Json for m in metadata):
            return None
        where: Literal["path", "query", "body"]
        if name in self.path_names and type(info) in (type(None), params.Path) and _scalar(base):
            where = "path"
        elif isinstance(base, type) and issubclass(base, BaseModel) and type(info) in (type(None), params.Body):
            # One required, unembedded model is the whole body.
            if param.default is not _REQUIRED or getattr(info, "embed", False):
                return None
            if any(i.where == "body" for i in self.inputs):
                return None
            where = "body"
        elif name not in self.path_names and type(info) in (type(None), params.Query) and _scalar(base):
            where = "query"
        else:
            return None
        validator = TypeAdapter(hint).validator
        validate = validator.validate_json if where == "body" else validator.validate_python
        self.inputs.append(_Input(name, where, validate, param.default))
        return ("input", len(self.inputs) - 1)


def _returns_response(endpoint: Callable[..., Any]) -> bool:
    # Exactly Response: FastAPI serializes anything else, and a streaming answer gains nothing.
    try:
        return get_type_hints(endpoint).get("return") is Response
    except (NameError, TypeError):
        return False


# ---------------------------------------------------------------- the route


class FastRoute(Route):
    """A FastAPI route's twin: the same path, methods, endpoint and name, in front of it."""

    def __init__(self, path: str, api_route: APIRoute, steps: Sequence[_Step], inputs: Sequence[_Input]) -> None:
        # Out of the schema: FastAPI documents the route, this one only answers it.
        super().__init__(
            path, api_route.endpoint, methods=api_route.methods, name=api_route.name, include_in_schema=False
        )
        self.api_methods = frozenset(api_route.methods or ())
        self.tail = path[path.rfind("}") + 1 :]
        """The path's end after its last parameter. A request that does not end so is turned away
        before the regex (the dearer test), and any it turns away goes on to the route's twin."""
        self.steps = tuple(steps)
        self.inputs = tuple(inputs)
        self.reads_body = any(i.where == "body" for i in inputs)
        self.reads_query = any(i.where == "query" for i in inputs)

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        # Another method (a 405, HEAD) is the router's to answer, as if this route were not here;
        # a path without the route's tail cannot match.
        if scope.get("method") not in self.api_methods or not scope["path"].endswith(self.tail) or _DECLINED in scope:
            return _NO_MATCH
        match, child_scope = super().matches(scope)
        if match is Match.FULL:
            child_scope["route"] = self  # the template the access log and the metrics name
        return match, child_scope

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        messages: list[Message] = []
        try:
            if scope["app"].dependency_overrides:  # a test swapped a dependency: only FastAPI knows it
                raise _Fallback
            body = b""
            if self.reads_body:
                while not messages or messages[-1].get("more_body", False):
                    messages.append(await receive())
                    if messages[-1]["type"] != "http.request":  # the client left: FastAPI's to say so
                        raise _Fallback
                body = (
                    messages[0].get("body", b"")
                    if len(messages) == 1
                    else b"".join(m.get("body", b"") for m in messages)
                )
            values = self._validate(scope, body)
        except _Fallback:
            scope[_DECLINED] = True
            await scope["app"].router(scope, _replay(messages, receive), send)
            return
        # The request, the inputs, then each step's result: what the later steps take.
        values[0] = Request(scope, _replay(messages, receive))
        for step in self.steps:
            values.append(await step.func(*step.pick(values)))
        response: Response = values[-1]
        await response(scope, receive, send)

    def _validate(self, scope: Scope, body: bytes) -> list[Any]:
        """Every input as FastAPI passes it, after a place for the request; or ``_Fallback`` where
        FastAPI would answer otherwise."""
        path = scope["path_params"]
        query = QueryParams(scope["query_string"]) if self.reads_query else None
        values: list[Any] = [None]
        try:
            for i in self.inputs:
                if i.where == "body":
                    # FastAPI parses other JSON types too, and names the error of a bad one.
                    if not body or _content_type(scope) != _JSON:
                        raise _Fallback
                    values.append(i.validate(body))
                    continue
                raw = path.get(i.name) if i.where == "path" else query.get(i.name)  # type: ignore[union-attr]
                if raw is None:
                    if i.default is _REQUIRED:
                        raise _Fallback
                    values.append(copy.deepcopy(i.default))  # as FastAPI does: unvalidated
                else:
                    values.append(i.validate(raw))
        except ValidationError:
            raise _Fallback from None
        return values


def _content_type(scope: Scope) -> bytes | None:
    # The first one, as Starlette's Headers.get() (and so FastAPI) reads a repeated header.
    for key, value in scope["headers"]:
        if key == b"content-type":
            return bytes(value)
    return None


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """The messages already read, once more (``messages`` is emptied), then the live channel."""
    if not messages:
        return receive

    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()

    return replay


# ---------------------------------------------------------------- installing


def _fast_routes(router: APIRouter, prefix: str = "") -> list[FastRoute]:
    """A ``FastRoute`` for each route of ``router`` that can have one, in the router's order.

    None for a route that a route before it in the router, without one, might take requests of:
    the fast one, in front, would answer them instead."""
    out: list[FastRoute] = []
    slow: list[BaseRoute] = []
    for route in router.routes:
        fast = None
        if isinstance(route, APIRoute) and not route.dependencies and _returns_response(route.endpoint):
            fast = _fast_route(route, prefix, slow)
        if fast is None:
            slow.append(route)
        else:
            out.append(fast)
    return out


def _fast_route(route: APIRoute, prefix: str, before: list[BaseRoute]) -> FastRoute | None:
    if any(_may_take(b, route.path, route.methods or ()) for b in before):
        return None
    planner = _Planner(route.param_convertors)
    if planner.add(route.endpoint) is None:
        return None
    return FastRoute(prefix + route.path, route, planner.steps(), planner.inputs)


def _overlap(a: str, b: str) -> bool:
    """Could one path match both templates? (Conservatively: a ``:path`` parameter matches anything.)"""
    if ":path}" in a or ":path}" in b:
        return True
    sa, sb = a.split("/"), b.split("/")
    return len(sa) == len(sb) and all(x == y or "{" in x or "{" in y for x, y in zip(sa, sb, strict=True))


def _may_take(route: BaseRoute, path: str, methods: Iterable[str]) -> bool:
    """Might ``route`` answer a request for ``path`` with one of ``methods``? Yes unless it is plain."""
    if isinstance(route, Mount):
        head = route.path.rstrip("/").split("/")
        return _overlap("/".join(head), "/".join(path.split("/")[: len(head)]))
    if isinstance(route, FastRoute):
        return not route.api_methods.isdisjoint(methods) and _overlap(route.path, path)
    if isinstance(route, Route):
        return (route.methods is None or not route.methods.isdisjoint(methods)) and _overlap(route.path, path)
    return True


class FastPath:
    """Includes routers into one app, with a ``FastRoute`` at the front of the app for each route
    that can have one. Only while the app is being built: a router included later, by FastAPI's
    own ``include_router``, goes after all of these, where FastAPI puts it anyway."""

    def __init__(self, app: FastAPI, enabled: bool = True) -> None:
        self.app, self.enabled = app, enabled
        self._included: dict[int, tuple[tuple[str, frozenset[str]], ...]] = {}
        """id of an entry an include added -> the (path, methods) of every route it stands for"""

    def include_router(self, router: APIRouter, prefix: str = "") -> None:
        routes = self.app.router.routes
        start = len(routes)
        self.app.include_router(router, prefix=prefix)
        if all(isinstance(r, APIRoute) for r in router.routes):  # else it stays opaque
            inner = tuple(
                (prefix + r.path, frozenset(r.methods or ())) for r in router.routes if isinstance(r, APIRoute)
            )
            self._included.update((id(entry), inner) for entry in routes[start:])
        if not self.enabled:
            return
        fast = _fast_routes(router, prefix)
        # After the FastRoutes so far and after whatever could take one of these requests first.
        at = 0
        for i, entry in enumerate(routes[:start]):
            if isinstance(entry, FastRoute) or any(self._may_take(entry, f) for f in fast):
                at = i + 1
        routes[at:at] = fast

    def _may_take(self, entry: BaseRoute, fast: FastRoute) -> bool:
        inner = self._included.get(id(entry))
        if inner is None:
            return _may_take(entry, fast.path, fast.api_methods)
        return any(not methods.isdisjoint(fast.api_methods) and _overlap(path, fast.path) for path, methods in inner)
