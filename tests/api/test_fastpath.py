"""The hot path (app/api/fastpath.py) answers exactly what FastAPI answers, and is taken.

Two apps, one with the fast path and one without (``KVM_MEMATTR_FAST_PATH=false``), get the same
generated requests on twin VMs; every answer (status, content type, body) and the state after it
must be the same, VM ids aside.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi import routing as fastapi_routing
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.deps import VmDep, get_engine
from app.api.fastpath import FastPath, FastRoute
from app.core import Engine
from app.core.vm import VirtualMachine
from app.main import create_app
from app.models.kvm import KvmEncRegion
from app.models.vm import VmCreate
from app.settings import Settings
from harness.live import ROOT
from tests.inprocess import TestClient

HOT = {
    ("GET", "/healthz"),
    ("POST", "/v1/vms/{vm_id}/memory-encrypt/reg-region"),
    ("POST", "/v1/vms/{vm_id}/memory-encrypt/unreg-region"),
    ("PUT", "/v1/vms/{vm_id}/memory-attributes"),
    ("POST", "/v1/vms/{vm_id}/faults"),
    ("GET", "/v1/vms/{vm_id}/memory-attributes"),
    ("GET", "/v1/vms/{vm_id}/gfns/{gfn}"),
}


@pytest.fixture(scope="module")
def twins() -> Iterator[tuple[TestClient, TestClient]]:
    with (
        TestClient(create_app(Settings(log_level="warning"))) as fast,
        TestClient(create_app(Settings(log_level="warning", fast_path=False))) as slow,
    ):
        yield fast, slow


@pytest.fixture
def solves(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times FastAPI solved a request's dependencies: once a request it answers itself."""
    count = [0]
    solve = fastapi_routing.solve_dependencies

    async def counting(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return await solve(*args, **kwargs)

    monkeypatch.setattr(fastapi_routing, "solve_dependencies", counting)
    return count


_APP = create_app(Settings())
COMPILED = sorted((m, r.path) for r in _APP.router.routes if isinstance(r, FastRoute) for m in r.api_methods)


def _examples(method: str, path: str) -> list[Any]:
    body = _APP.openapi()["paths"][path][method.lower()].get("requestBody", {})
    return [e["value"] for e in body.get("content", {}).get("application/json", {}).get("examples", {}).values()]


# Swagger UI's request examples: valid bodies, so that generated calls reach the engine too.
EXAMPLES = {path: _examples(method, path) for method, path in COMPILED if _examples(method, path)}


def test_the_hot_routes_are_compiled() -> None:
    assert set(COMPILED) >= HOT


def test_a_conversion_skips_dependency_solving_and_a_bad_body_falls_back(
    twins: tuple[TestClient, TestClient], solves: list[int]
) -> None:
    fast = twins[0]
    for client in twins:
        vm = client.post("/v1/vms", json={"type": "sw_protected", "semantics": "rfc-v9"}).json()["id"]
        client.put(
            f"/v1/vms/{vm}/memslots/0",
            json={"guest_phys_addr": 0, "memory_size": "0x200000", "userspace_addr": "0x7f0000000000"},
        )
        solves[0] = 0
        r = client.post(f"/v1/vms/{vm}/memory-encrypt/unreg-region", json={"addr": "0x0", "size": "0x1000"})
        assert r.status_code == 200, r.text
        assert solves[0] == (0 if client is fast else 1)
        solves[0] = 0
        r = client.post(f"/v1/vms/{vm}/memory-encrypt/unreg-region", json={"addr": "0x0"})
        assert r.status_code == 422 and solves[0] == 1  # FastAPI's own error document
        assert r.json()["errors"][0]["loc"] == ["body", "size"]
        solves[0] = 0
        assert client.get("/healthz").status_code == 200
        assert solves[0] == (0 if client is fast else 1)


def test_engine_errors_on_the_fast_path_are_the_same_problem(twins: tuple[TestClient, TestClient]) -> None:
    answers = []
    for client in twins:
        vm = client.post("/v1/vms", json={"type": "sw_protected", "semantics": "linux"}).json()["id"]
        r = client.post(f"/v1/vms/{vm}/memory-encrypt/reg-region", json={"addr": "0x0", "size": "0x1000"})
        answers.append(
            (r.status_code, r.headers["content-type"], r.text.replace(vm, "{vm}"), r.headers["x-request-id"])
        )
    assert answers[0][:3] == answers[1][:3]
    assert answers[0][0] == 400 and '"errno":"ENOTTY"' in answers[0][2]
    assert re.fullmatch(r"[0-9a-f]{16}", answers[0][3])  # the fast path's answer still carries its request id


def test_dependency_overrides_still_apply() -> None:
    app = create_app(Settings(log_level="warning"))
    other = Engine(app.state.engine.limits)
    vm = other.create_vm(VmCreate())
    app.dependency_overrides[get_engine] = lambda: other
    with TestClient(app) as client:
        assert client.get("/healthz").json()["vms"] == 1  # the override's engine, not the app's
        assert [v["id"] for v in client.get("/v1/vms").json()["vms"]] == [vm.id]
        assert client.get(f"/v1/vms/{vm.id}").status_code == 200  # a VM route too (it was a 404)
        assert client.get(f"/v1/vms/{vm.id}/memory-attributes").status_code == 200


def test_an_http_exception_on_the_fast_path_goes_through_the_apps_handlers(
    twins: tuple[TestClient, TestClient], monkeypatch: pytest.MonkeyPatch, solves: list[int]
) -> None:
    """It was a 500 text/plain without a request id: the fast path caught only engine errors."""

    def busy(vm: VirtualMachine, region: KvmEncRegion) -> None:
        raise HTTPException(409, "the region is busy", headers={"Retry-After": "1"})

    monkeypatch.setattr(VirtualMachine, "memory_encrypt_reg_region", busy)
    answers = []
    for client in twins:
        vm = client.post("/v1/vms", json={"semantics": "rfc-v9"}).json()["id"]
        solves[0] = 0
        r = client.post(f"/v1/vms/{vm}/memory-encrypt/reg-region", json={"addr": "0x0", "size": "0x1000"})
        assert (r.status_code, r.headers["content-type"]) == (409, "application/problem+json"), r.text
        assert re.fullmatch(r"[0-9a-f]{16}", r.headers["x-request-id"]) and r.headers["retry-after"] == "1"
        answers.append((_normal(r, vm), solves[0]))
    assert answers[0][0] == answers[1][0]
    assert answers[0][0][2]["detail"] == "the region is busy"
    assert [calls for _, calls in answers] == [0, 1]  # the fast path took it


class _Spy:
    """A middleware that notes every request it sees."""

    def __init__(self, app: ASGIApp, seen: list[str]) -> None:
        self.app, self.seen = app, seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.seen.append(f"{scope['method']} {scope['path']}")
        await self.app(scope, receive, send)


def test_a_middleware_inside_the_service_middleware_sees_hot_requests(solves: list[int]) -> None:
    """The fast path answered from inside ServiceMiddleware: a middleware added before it (so
    inside it: add_middleware puts each new one outside the others) never saw those requests."""
    app = create_app(Settings(log_level="warning"))
    seen: list[str] = []
    app.user_middleware.append(Middleware(_Spy, seen=seen))
    with TestClient(app) as client:
        vm = client.post("/v1/vms", json={"semantics": "rfc-v9"}).json()["id"]
        solves[0] = 0
        assert client.get("/healthz").status_code == 200
        r = client.post(f"/v1/vms/{vm}/memory-encrypt/unreg-region", json={"addr": "0x0", "size": "0x1000"})
        assert r.status_code == 200, r.text
        assert solves[0] == 0  # both on the fast path
    assert seen[-2:] == ["GET /healthz", f"POST /v1/vms/{vm}/memory-encrypt/unreg-region"]


def _echo_router() -> APIRouter:
    router = APIRouter(prefix="/vms/{vm_id}")

    @router.post("/echo")
    async def echo(request: Request, vm: VmDep, region: KvmEncRegion) -> Response:
        return Response(f"{vm.id} {region.size} {request.url.path}")

    return router


def test_a_router_included_with_a_prefix_answers_under_it(solves: list[int]) -> None:
    """FastAPI's own include_router(prefix=...) on an app create_app built, and FastPath's, with a
    fast twin; the old fast path refused to build an app that had one."""
    app = create_app(Settings(log_level="warning"))
    app.include_router(_echo_router(), prefix="/v2")
    FastPath(app).include_router(_echo_router(), prefix="/v3")
    assert any(isinstance(r, FastRoute) and r.path == "/v3/vms/{vm_id}/echo" for r in app.router.routes)
    with TestClient(app) as client:
        vm = client.post("/v1/vms", json={"semantics": "rfc-v9"}).json()["id"]
        for prefix, fast in (("/v2", False), ("/v3", True)):
            solves[0] = 0
            r = client.post(f"{prefix}/vms/{vm}/echo", json={"addr": "0x0", "size": "0x1000"})
            assert (r.status_code, r.text) == (200, f"{vm} 4096 {prefix}/vms/{vm}/echo")
            assert solves[0] == (0 if fast else 1)
            r = client.post(f"{prefix}/vms/{vm}/echo", json={"addr": "0x0"})  # FastAPI's own error
            assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "size"]
            r = client.post(f"{prefix}/vms/{'0' * 32}/echo", json={"addr": "0x0", "size": "0x1000"})
            assert r.status_code == 404 and r.json()["instance"] == f"{prefix}/vms/{'0' * 32}/echo"


def test_a_head_request_and_a_root_path_are_answered_as_fastapi_answers(solves: list[int]) -> None:
    """HEAD is no method of a GET route in FastAPI (Starlette adds it); a root_path (a proxy's
    prefix) is routed past, as FastAPI routes it."""

    def under_a_proxy(app: ASGIApp) -> ASGIApp:
        async def proxied(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                scope = {**scope, "root_path": "/api", "path": "/api" + scope["path"]}
            await app(scope, receive, send)

        return proxied

    answers = []
    for fast in (True, False):
        with TestClient(under_a_proxy(create_app(Settings(log_level="warning", fast_path=fast)))) as client:
            vm = client.post("/v1/vms", json={"semantics": "linux"}).json()["id"]
            solves[0] = 0
            runs = client.get(f"/v1/vms/{vm}/memory-attributes?limit=2")
            assert solves[0] == (0 if fast else 1)  # the fast path takes it under the proxy's prefix too
            calls = [
                client.head("/healthz"),
                client.head(f"/v1/vms/{vm}/memory-attributes"),
                runs,
                client.put(f"/v1/vms/{vm}/memory-attributes", json={"address": "0x0", "size": "0x1000"}),
                client.get(f"/v1/vms/{vm}/gfns/zz"),
            ]
            answers.append(
                [
                    (r.status_code, r.headers.get("content-type"), r.headers.get("allow"), r.text.replace(vm, "{vm}"))
                    for r in calls
                ]
            )
    assert answers[0] == answers[1]
    assert [a[0] for a in answers[0]] == [405, 405, 200, 422, 422]
    assert '"runs":[' in answers[0][2][3]  # the proxy's prefix was routed past


def test_a_repeated_content_type_is_read_as_fastapi_reads_it(twins: tuple[TestClient, TestClient]) -> None:
    answers = []
    for client in twins:
        vm = client.post("/v1/vms", json={"semantics": "rfc-v9"}).json()["id"]
        headers = [("content-type", "text/plain"), ("content-type", "application/json")]
        body = b'{"addr": "0x0", "size": "0x1000"}'
        r = client.post(f"/v1/vms/{vm}/memory-encrypt/reg-region", content=body, headers=headers)
        answers.append(_normal(r, vm))
    assert answers[0] == answers[1]
    assert answers[0][0] == 422  # the first one counts: not JSON


@pytest.mark.parametrize(
    "tail",
    [
        "/memory-attributes?limit=1&limit=10001",
        "/memory-attributes?limit=10001&limit=1",
        "/memory-attributes?start_gfn=0x100000&start_gfn=x",
        "/memory-attributes?end_gfn=&end_gfn=0x100400",
        "/mappings?as_id=0&as_id=2",
        "/events?after=1&after=-1",
        "/memory-map?buckets=4&buckets=0",
    ],
)
def test_a_repeated_query_parameter_is_read_as_fastapi_reads_it(
    twins: tuple[TestClient, TestClient], tail: str
) -> None:
    answers = []
    for client in twins:
        vm = client.post("/v1/vms", json={"semantics": "linux"}).json()["id"]
        answers.append(_normal(client.get(f"/v1/vms/{vm}{tail}"), vm))
    assert answers[0] == answers[1]


# ---------------------------------------------------------------- generated requests

_VALUES = st.one_of(
    st.integers(min_value=-1, max_value=2**65),
    st.sampled_from([0, 1, 8, 0x1000, 0x200000, 0x100000000, 2**52, 2**64 - 1]),
    st.sampled_from(["0x1000", "0x0", "4096", "0x", "1e3", " 1", "0X200000", "-1", "", "abc"]),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(), max_size=2),
)
_KEYS = [
    "addr", "size", "address", "attributes", "flags", "gpa", "as_id", "write", "exec", "kind", "nth",
    "start", "end", "type", "semantics", "name", "slot", "fd", "extra",
]  # fmt: skip
_JSON_BODY = st.one_of(
    st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=5),
    st.sampled_from([[], None, 1, "x", {}]),
)
_RAW_BODY = st.sampled_from(
    [b"", b"{", b'{"addr": NaN, "size": 4096}', b"\xff\xfe", b"[" * 3000, b'{"addr":1,"addr":2}']
)
_CONTENT_TYPES = st.sampled_from(
    [None, "application/json", "application/json; charset=utf-8", "text/plain", "APPLICATION/JSON", "a/b+json"]
)


# Path parameters beyond vm_id: the first value of each is one the twins' VMs have.
_PATH_VALUES = {
    "slot": ["0", "10", "0x10000", "1", "-1", "abc", "65536", "4294967296", "00"],
    "fd": ["3", "4", "0", "x", "2147483648", "+3"],
    "inv_id": ["1", "0", "2", "x", "9223372036854775808"],
    "mapping": ["1", "0", "2", "x", "9223372036854775808"],
    "pin": ["1", "0", "2", "x", "9223372036854775808"],
    "gfn": ["0x100000", "1048576", "0x100200", "0", "4503599627370496", "zz", "0x"],
    "name": ["linux-6.18", "pvm-6.18", "nope", "linux-6.18-custom", "a" * 65],
}
_QUERY = st.lists(
    st.tuples(
        st.sampled_from(["start_gfn", "end_gfn", "limit", "as_id", "buckets", "after", "other"]),
        st.sampled_from(["0", "0x100000", "0x100400", "1", "2", "10", "1000", "10001", "-1", "", "x", "2.5",
                         "4503599627370496", "4503599627370497", "0x10000000000000"]),
    ),
    max_size=4,
)  # fmt: skip


def _call(client: TestClient, call: dict[str, Any], vm: str) -> Any:
    headers = {"content-type": call["ctype"]} if call["ctype"] else {}
    body, raw = call["body"], call["raw"]
    content = raw if raw is not None else (None if body is ... else json.dumps(body).encode())
    values = {"vm_id": {"own": vm, "unknown": "0" * 32, "long": "a" * 65}[call["which"]], **call["path"]}
    path = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], call["template"])
    return client.request(call["method"], path, content=content, headers=headers, params=call["query"])


def _normal(response: Any, vm: str) -> tuple[int, str | None, Any]:
    text = response.text.replace(vm, "{vm}")
    ctype = response.headers.get("content-type")
    if ctype and "json" in ctype:
        return response.status_code, ctype, _timeless(json.loads(text))
    return response.status_code, ctype, text


def _timeless(doc: Any) -> Any:
    """Without the wall-clock fields (event times, uptime), which differ between the twins."""
    if isinstance(doc, dict):
        return {k: _timeless(v) for k, v in doc.items() if k not in ("time", "uptime_s")}
    if isinstance(doc, list):
        return [_timeless(v) for v in doc]
    return doc


@st.composite
def _example(draw: st.DrawFn, template: str) -> Any:
    """A valid body of the route, often with one key dropped, changed or added."""
    body = dict(draw(st.sampled_from(EXAMPLES[template])))
    change = draw(st.sampled_from(["drop", "set", "add"]))
    if change == "drop" and body:
        body.pop(draw(st.sampled_from(sorted(body))))
    elif change == "set" and body:
        body[draw(st.sampled_from(sorted(body)))] = draw(_VALUES)
    elif change == "add":
        body[draw(st.sampled_from(_KEYS))] = draw(_VALUES)
    return body


# Every compiled route (metrics count requests, so the twins' differ), the hot ones four times over.
ROUTES = [r for r in COMPILED if r[1] != "/metrics"] + sorted(HOT) * 4


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """Half of them well-formed (so they reach the engine), the rest broken in one way or many."""
    method, template = draw(st.sampled_from(ROUTES))
    names = re.findall(r"\{(\w+)\}", template)
    call = {"method": method, "template": template, "which": "own", "raw": None, "ctype": "application/json"}
    call["path"] = {n: _PATH_VALUES[n][0] for n in names if n != "vm_id"}
    call["query"] = []
    kind = draw(st.sampled_from(["valid", "valid", "changed", "random"]))
    if kind != "valid":
        call["path"] = {n: draw(st.sampled_from(_PATH_VALUES[n])) for n in call["path"]}
        call["query"] = draw(_QUERY) if method == "GET" else []
    if template in EXAMPLES and kind != "random":
        call["body"] = draw(st.sampled_from(EXAMPLES[template]))
        if kind == "changed":  # one thing wrong: the body, its content type or the VM
            what = draw(st.sampled_from(["body", "ctype", "which"]))
            if what == "body":
                call["body"] = draw(_example(template))
            elif what == "ctype":
                call["ctype"] = draw(_CONTENT_TYPES)
            else:
                call["which"] = draw(st.sampled_from(["unknown", "long"]))
        return call
    if template not in EXAMPLES and kind == "valid":
        call["body"] = ...
        return call
    call["body"] = draw(st.just(...) | _JSON_BODY)
    call["which"] = draw(st.sampled_from(["own", "own", "unknown", "long"]))
    call["raw"] = draw(st.none() | _RAW_BODY)
    call["ctype"] = draw(_CONTENT_TYPES)
    return call


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(semantics=st.sampled_from(["rfc-v9", "linux"]), calls=st.lists(requests(), min_size=1, max_size=6))
def test_fast_and_slow_answer_alike(
    twins: tuple[TestClient, TestClient], semantics: str, calls: list[dict[str, Any]]
) -> None:
    vms = []
    for client in twins:
        vm = client.post("/v1/vms", json={"type": "sw_protected", "semantics": semantics}).json()["id"]
        slot = {"guest_phys_addr": "0x100000000", "memory_size": "0x400000", "userspace_addr": "0x7f0000000000"}
        assert client.put(f"/v1/vms/{vm}/memslots/0", json=slot).status_code == 200
        assert client.post(f"/v1/vms/{vm}/guest-memfds", json={"size": "0x200000"}).json()["fd"] == 3
        client.post(f"/v1/vms/{vm}/prefault", json={"gpa": "0x100000000", "size": "0x200000"})  # EOPNOTSUPP where it is
        client.post(
            f"/v1/vms/{vm}/mmu-notifier/invalidations",
            json={"hva_start": "0x7f0000300000", "hva_end": "0x7f0000301000"},
        )
        vms.append(vm)
    try:
        for call in calls:
            answers = []
            for client, vm in zip(twins, vms, strict=True):
                answers.append(_normal(_call(client, call, vm), vm))
            assert answers[0] == answers[1], call
            event(f"{call['method']} {call['template']} {answers[0][0]}")
            states = [c.get(f"/v1/vms/{vm}/snapshot") for c, vm in zip(twins, vms, strict=True)]
            assert _normal(states[0], vms[0]) == _normal(states[1], vms[1])
    finally:
        for client in twins:
            client.delete("/v1/vms")


def test_the_openapi_document_is_the_same_bytes_in_every_process() -> None:
    """The fast path leaves the document alone; and the document no longer follows the hash seed
    (the links' parameters were once a set)."""
    script = (
        "import hashlib, json; from app.main import create_app; from app.settings import Settings; "
        "print(hashlib.sha256(json.dumps(create_app(Settings()).openapi()).encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": seed, "KVM_MEMATTR_FAST_PATH": fast},
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        ).stdout.strip()
        for seed, fast in (("1", "true"), ("2", "true"), ("3", "false"), ("4", "false"))
    }
    assert len(digests) == 1
    doc = json.dumps(create_app(Settings()).openapi()).encode()
    assert digests == {hashlib.sha256(doc).hexdigest()}
