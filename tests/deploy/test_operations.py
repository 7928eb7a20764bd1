"""Operator features: metrics, access control, limits, logs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from app.logs import JsonFormatter
from app.main import create_app
from app.settings import Settings
from harness.live import ROOT
from tests.api.conftest import assert_problem
from tests.inprocess import TestClient


def client_for(**settings: object) -> TestClient:
    return TestClient(create_app(Settings(log_level="warning", **settings)))  # type: ignore[arg-type]


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert m, f"{name}{labels} missing"
    return float(m.group(1))


def test_metrics_count_requests_and_engine_state() -> None:
    with client_for() as c:
        vm = c.post("/v1/vms", json={"semantics": "linux"}).json()["id"]
        c.post(f"/v1/vms/{vm}/guest-memfds", json={"size": 0x400000})
        c.put(
            f"/v1/vms/{vm}/memslots/0",
            json={
                "flags": 4,
                "guest_phys_addr": 0,
                "memory_size": 0x400000,
                "userspace_addr": 0x10000000,
                "guest_memfd": 3,
            },
        )
        c.post(f"/v1/vms/{vm}/faults", json={"gpa": 0})
        c.post(f"/v1/vms/{vm}/faults", json={"gpa": 0, "mmu_seq": 7})
        c.put(f"/v1/vms/{vm}/memory-attributes", json={"address": 0, "size": 0x2000, "attributes": 8})
        c.post(f"/v1/vms/{vm}/mmu-notifier/invalidations", json={"hva_start": 0x10000000, "hva_end": 0x10001000})
        c.get("/v1/vms/nope")
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
        assert (
            metric(
                text, "kvm_memattr_http_requests_total", '{method="POST",route="/v1/vms/{vm_id}/faults",status="200"}'
            )
            == 2
        )
        assert (
            metric(text, "kvm_memattr_http_requests_total", '{method="GET",route="/v1/vms/{vm_id}",status="404"}') == 1
        )
        assert (
            metric(
                text,
                "kvm_memattr_http_request_duration_seconds_count",
                '{method="POST",route="/v1/vms/{vm_id}/faults"}',
            )
            == 2
        )
        assert metric(text, "kvm_memattr_vms") == 1
        assert metric(text, "kvm_memattr_memslots") == 1
        assert metric(text, "kvm_memattr_attribute_runs") == 2
        assert metric(text, "kvm_memattr_attribute_updates_total") == 1
        assert metric(text, "kvm_memattr_invalidations_total") == 1
        assert metric(text, "kvm_memattr_tlb_flushes_total") == 1
        assert metric(text, "kvm_memattr_pages_zapped_total") == 1
        assert metric(text, "kvm_memattr_faults_total", '{outcome="mapped"}') == 1
        assert metric(text, "kvm_memattr_faults_total", '{outcome="retry"}') == 1
        assert metric(text, "kvm_memattr_open_notifier_invalidations") == 1
        assert metric(text, "kvm_memattr_mmu_invalidate_in_progress") == 1
    # A second app has its own registry.
    with client_for() as other:
        assert metric(other.get("/metrics").text, "kvm_memattr_vms") == 0


def test_api_token() -> None:
    with client_for(api_token="s3cret") as c:
        assert c.get("/healthz").status_code == 200
        missing = assert_problem(c.get("/v1/vms"), 401, "EPERM")
        assert "Bearer" in missing["detail"]
        assert c.get("/v1/vms").headers["www-authenticate"] == "Bearer"
        assert_problem(c.get("/v1/vms", headers={"Authorization": "Bearer wrong"}), 403, "EPERM")
        assert_problem(c.get("/v1/vms", headers={"Authorization": "Basic czNjcmV0"}), 401, "EPERM")
        assert_problem(c.post("/v1/vms", json={}, headers={"Authorization": "Bearer nope"}), 403, "EPERM")
        assert c.get("/v1/vms", headers={"Authorization": "Bearer wrong"}).headers["x-request-id"]
        ok = c.post("/v1/vms", json={}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 201
        assert len(c.get("/v1/vms", headers={"Authorization": "bearer s3cret"}).json()["vms"]) == 1
    with client_for() as open_:
        assert open_.get("/v1/vms").status_code == 200


def test_body_limit_is_413_and_changes_nothing() -> None:
    with client_for(max_body_bytes=1024) as c:
        big = {"name": "x" * 2000}
        r = c.post("/v1/vms", json=big)
        assert_problem(r, 413, "E2BIG")
        assert c.get("/v1/vms").json()["vms"] == []

        # Without Content-Length (chunked), the stream is cut too.
        def chunks():  # type: ignore[no-untyped-def]
            yield b'{"name": "'
            yield b"y" * 4096
            yield b'"}'

        r = c.post("/v1/vms", content=chunks(), headers={"content-type": "application/json"})
        assert_problem(r, 413, "E2BIG")
        assert c.get("/v1/vms").json()["vms"] == []


def test_vm_limit() -> None:
    with client_for(max_vms=2) as c:
        assert c.post("/v1/vms").status_code == 201
        assert c.post("/v1/vms").status_code == 201
        assert_problem(c.post("/v1/vms"), 507, "ENOMEM")
        assert len(c.get("/v1/vms").json()["vms"]) == 2


def test_run_budget_over_http() -> None:
    with client_for(max_attribute_runs=3) as c:
        vm = c.post("/v1/vms", json={"semantics": "linux"}).json()["id"]
        assert (
            c.put(f"/v1/vms/{vm}/memory-attributes", json={"address": 0, "size": 4096, "attributes": 8}).status_code
            == 200
        )
        before = c.get(f"/v1/vms/{vm}/memory-attributes").json()
        assert_problem(
            c.put(f"/v1/vms/{vm}/memory-attributes", json={"address": 0x10000, "size": 4096, "attributes": 8}),
            507,
            "ENOMEM",
        )
        assert c.get(f"/v1/vms/{vm}/memory-attributes").json() == before


def test_event_limit() -> None:
    with client_for(max_events=5) as c:
        vm = c.post("/v1/vms", json={"semantics": "linux"}).json()["id"]
        for _ in range(10):
            c.post(f"/v1/vms/{vm}/faults", json={"gpa": 0})
        events = c.get(f"/v1/vms/{vm}/events").json()["events"]
        assert [e["id"] for e in events] == [7, 8, 9, 10, 11]


@contextlib.contextmanager
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[TestClient]:
    """A client of a service logging at info, whose log records caplog collects."""
    logger = logging.getLogger("kvm_memattr")
    app = create_app(Settings(log_level="info"))  # configures the logger: the handler comes after
    logger.addHandler(caplog.handler)
    try:
        with TestClient(app) as c:
            yield c
    finally:
        logger.removeHandler(caplog.handler)


def test_logs_carry_request_id_and_errno(caplog: pytest.LogCaptureFixture) -> None:
    with logged(caplog) as c:
        c.get("/v1/vms/nope", headers={"X-Request-ID": "req-42"})
    lines = [r for r in caplog.records if getattr(r, "request_id", None) == "req-42"]
    assert any("ENOENT" in r.getMessage() and r.levelno == logging.INFO for r in lines)
    assert any(r.name == "kvm_memattr.access" and "404" in r.getMessage() for r in lines)
    assert not any(r.exc_info for r in caplog.records), "engine errors are not stack traces"


def test_json_log_format() -> None:
    record = logging.LogRecord("kvm_memattr.access", logging.INFO, __file__, 1, "GET %s %d", ("/x", 200), None)
    record.request_id, record.route, record.status = "abc", "/x", 200
    line = json.loads(JsonFormatter().format(record))
    assert (line["message"], line["request_id"], line["status"], line["level"]) == ("GET /x 200", "abc", 200, "info")


def test_readme_settings_table_matches_the_code() -> None:
    from harness.live import ROOT

    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `KVM_MEMATTR_(\w+)` \|", readme, re.M))
    assert documented == {name.upper() for name in Settings.model_fields}
    for name, field in Settings.model_fields.items():
        assert field.description, name
        row = re.search(rf"^\| `KVM_MEMATTR_{name.upper()}` \|[^|]*\| (.*) \|$", readme, re.M)
        assert row and row.group(1) == field.description, name


def test_an_empty_token_is_refused_at_start_up() -> None:
    with pytest.raises(ValidationError, match="is empty"):
        Settings(api_token="")
    env = {**os.environ, "KVM_MEMATTR_API_TOKEN": ""}
    argv = [sys.executable, "-m", "app.cli", "serve", "--port", "0"]
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "KVM_MEMATTR_API_TOKEN" in result.stderr and "is empty" in result.stderr


def test_security_headers_on_every_page() -> None:
    with client_for() as c:
        for path in ("/ui", "/docs", "/v1/vms", "/openapi.json", "/nowhere"):
            r = c.get(path)
            assert r.headers["x-content-type-options"] == "nosniff", path
            assert r.headers["x-frame-options"] == "DENY" and r.headers["referrer-policy"] == "no-referrer"
            csp = r.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, (path, csp)
            # Only Swagger UI, which starts itself inline, may run an inline script.
            assert ("script-src 'self' 'unsafe-inline'" in csp) == (path == "/docs"), (path, csp)


def test_dns_rebinding_and_cross_site_state_changes_are_refused() -> None:
    with client_for() as c:  # bound to 127.0.0.1: loopback names only
        assert c.get("/healthz", headers={"host": "127.0.0.1:8000"}).status_code == 200
        assert c.get("/healthz", headers={"host": "[::1]:8000"}).status_code == 200
        assert c.get("/healthz", headers={"host": f"{socket.gethostname()}:8000"}).status_code == 200
        assert_problem(c.get("/v1/vms", headers={"host": "evil.example:8000"}), 403, "EPERM")
        before = c.get("/v1/vms").json()
        # What a form on another site sends: no preflight, a body-less POST would create a VM.
        assert_problem(c.post("/v1/vms", headers={"origin": "http://evil.example"}), 403, "EPERM")
        assert_problem(c.post("/v1/vms", headers={"sec-fetch-site": "cross-site"}), 403, "EPERM")
        assert c.get("/v1/vms").json() == before
        # The service's own pages (same origin) still change state.
        same = {"origin": "http://localhost", "sec-fetch-site": "same-origin"}
        assert c.post("/v1/vms", headers=same).status_code == 201
    with client_for(allowed_hosts="*") as c:
        assert c.get("/healthz", headers={"host": "kvm-memattr.internal"}).status_code == 200
    assert Settings(host="0.0.0.0").host_names() is None  # the container: any Host


def test_the_access_log_escapes_control_characters(caplog: pytest.LogCaptureFixture) -> None:
    with logged(caplog) as c:
        c.get("/v1/vms/x%0aGET%20/forged%20200")
    lines = [r.getMessage() for r in caplog.records if r.name == "kvm_memattr.access"]
    assert lines and all("\n" not in line for line in lines)
    assert any("\\nGET /forged" in line for line in lines), lines


def test_the_openapi_document_asks_for_a_token_only_when_one_is_set() -> None:
    """Swagger UI shows padlocks and "Authorize" only where the service wants a token."""
    for token, wanted in ((None, False), ("s3cret", True)):
        with client_for(api_token=token) as c:
            spec = c.get("/openapi.json").json()
        ops = [op for path, item in spec["paths"].items() if path.startswith("/v1/") for op in item.values()]
        assert all(("security" in op) == wanted for op in ops)
        assert all(("401" in op["responses"]) == wanted for op in ops)
        assert ("securitySchemes" in spec["components"]) == wanted
