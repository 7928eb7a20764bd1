"""A client command loads only what it needs, and the CLI's plain-http transport behaves like httpx's."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest

from app.client import Client, KvmMemattrError
from app.client import operations as ops
from app.client.transport import StdlibTransport
from harness.live import ROOT, free_port, live_server

# What a client command must not import: the server side, the models' pydantic, httpx's own transport.
HEAVY = ("fastapi", "starlette", "uvicorn", "pydantic", "pydantic_core", "httpcore", "h11", "app.main", "app.core")

PROBE = f"""
import sys
from app.cli import main
code = main(sys.argv[1:])
heavy = sorted({{m for m in sys.modules for h in {HEAVY!r} if m == h or m.startswith(h + ".")}})
print("LOADED", *heavy, file=sys.stderr)
raise SystemExit(code)
"""


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with live_server() as (u, _):
        yield u


def probe(*argv: str) -> tuple[int, str, list[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=ROOT, timeout=60)
    loaded = [line for line in done.stderr.splitlines() if line.startswith("LOADED")]
    assert loaded, done.stderr
    return done.returncode, done.stdout, loaded[0].split()[1:]


@pytest.mark.parametrize(
    "argv",
    [["health"], ["--json", "health"], ["vm", "list"], ["caps"], ["vm", "create", "--semantics", "linux"]],
)
def test_client_commands_load_no_server_side_and_no_models(url: str, argv: list[str]) -> None:
    code, out, heavy = probe("--url", url, *argv)
    assert code == 0, out
    assert heavy == []
    assert out.strip()


def test_health_output_is_unchanged_by_skipping_the_models(url: str) -> None:
    code, out, _ = probe("--url", url, "--json", "health")
    with Client(url) as client:
        typed = client.healthz().model_dump(mode="json")
    shown = json.loads(out)
    assert code == 0 and shown.keys() == typed.keys()
    assert {k: v for k, v in shown.items() if k != "uptime_s"} == {k: v for k, v in typed.items() if k != "uptime_s"}


def test_version_and_help_need_no_server() -> None:
    done = subprocess.run([sys.executable, "-m", "app.cli", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.startswith("kvm-memattr ")
    assert (
        "show program's version number and exit"
        in subprocess.run([sys.executable, "-m", "app.cli", "--help"], capture_output=True, text=True, cwd=ROOT).stdout
    )


# ---------------------------------------------------------------- StdlibTransport


def test_stdlib_transport_keeps_one_connection_and_reports_errno(url: str) -> None:
    transport = StdlibTransport()
    with Client(url, transport=transport) as client:
        vm = client.create_vm(semantics="linux")
        first = transport._conn
        assert client.get_vm(vm.id).id == vm.id
        assert transport._conn is first  # kept alive
        with pytest.raises(KvmMemattrError) as e:
            client.reg_region(vm.id, 0, 0x1000)
        assert e.value.errno == "ENOTTY" and e.value.status == 400
        assert client.send_json(ops.delete_vm(vm.id)) is None  # 204: no body


def test_stdlib_transport_reconnects_after_the_server_restarts() -> None:
    port = free_port()
    transport = StdlibTransport()
    with live_server(port=port) as (url, _):
        client = Client(url, transport=transport)  # not closed: its connection outlives the server
        assert client.healthz().status == "ok"
        stale = transport._conn
    with live_server(port=port):
        # The kept-alive socket is dead: the first use fails and is retried once on a fresh one.
        assert client.healthz().status == "ok"
        assert transport._conn is not None and transport._conn is not stale
    client.close()


def test_stdlib_transport_sends_the_token() -> None:
    with live_server(env={"KVM_MEMATTR_API_TOKEN": "s3cret"}) as (url, _):
        with Client(url, token="s3cret", transport=StdlibTransport()) as client:
            assert client.list_vms().vms == []
        with Client(url, token="wrong", transport=StdlibTransport()) as client, pytest.raises(KvmMemattrError) as e:
            client.list_vms()
        assert e.value.errno == "EPERM" and e.value.status == 403


def test_stdlib_transport_errors_are_httpx_transport_errors() -> None:
    transport = StdlibTransport(timeout=0.3)
    with pytest.raises(httpx.ConnectError):
        transport.handle_request(httpx.Request("GET", f"http://127.0.0.1:{free_port()}/healthz"))
    with pytest.raises(httpx.UnsupportedProtocol):
        transport.handle_request(httpx.Request("GET", "https://127.0.0.1/healthz"))
    with socket.socket() as silent:  # accepts, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        accepted: list[socket.socket] = []
        thread = threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True)
        thread.start()
        with pytest.raises(httpx.TimeoutException):
            transport.handle_request(httpx.Request("GET", f"http://127.0.0.1:{silent.getsockname()[1]}/"))
        thread.join(2)
        for conn in accepted:
            conn.close()


def test_the_cli_exits_3_on_a_dead_url(capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main

    assert main(["--url", f"http://127.0.0.1:{free_port()}", "health"]) == 3
    assert "cannot reach" in capsys.readouterr().err


def test_plain_http_skips_the_ca_bundle_and_https_keeps_verification() -> None:
    import ssl

    from app.client import _verify

    assert _verify("https://kvm.example:8443") is True  # httpx's default: verify against the CA bundle
    plain = _verify("http://127.0.0.1:8000")
    assert isinstance(plain, ssl.SSLContext)
    # Never used for http; were it used, it would verify and trust nothing: fail closed.
    assert plain.verify_mode == ssl.CERT_REQUIRED and plain.check_hostname and plain.get_ca_certs() == []
