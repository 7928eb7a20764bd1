"""Connection bounds: a connection that sends nothing is closed, and past the cap new ones are
(20,250 silent connections once exhausted the fd limit and reset every new client)."""

from __future__ import annotations

import contextlib
import socket
import time

import httpx

from harness.live import live_server


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_a_silent_connection_is_closed() -> None:
    with live_server({"KVM_MEMATTR_FIRST_BYTE_TIMEOUT": "1"}) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        silent = socket.create_connection(("127.0.0.1", port))
        started = time.monotonic()
        assert _closed_within(silent, 5), "a connection that sent nothing was held"
        assert time.monotonic() - started < 3
        # A connection that talks is served as before (and kept alive between its requests).
        with httpx.Client(base_url=url) as client:
            assert client.get("/healthz").status_code == 200
            time.sleep(1.5)
            assert client.get("/healthz").status_code == 200


def test_connections_past_the_cap_are_closed() -> None:
    with live_server({"KVM_MEMATTR_MAX_CONNECTIONS": "4", "KVM_MEMATTR_LOG_LEVEL": "warning"}) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        time.sleep(0.2)  # start-up's health check connection is gone
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        extra = socket.create_connection(("127.0.0.1", port))
        assert _closed_within(extra, 3), "a connection past the cap was accepted and held"
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 5
        while True:  # the places are given back
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "closed connections did not give their places back"
            time.sleep(0.1)
