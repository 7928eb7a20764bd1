"""The live trace (Server-Sent Events): streams end with their VM, are capped, and do not hold
up a SIGTERM past Docker's 10 s stop timeout."""

from __future__ import annotations

import signal
import threading
import time

import httpx

from harness.live import live_server
from tests.api.conftest import assert_problem


def _open(url: str, vm: str, seconds: int = 60) -> tuple[httpx.Client, httpx.Response]:
    client = httpx.Client(timeout=30)
    request = client.build_request("GET", f"{url}/v1/vms/{vm}/events/stream", params={"seconds": seconds})
    response = client.send(request, stream=True)
    assert response.status_code == 200
    return client, response


def test_a_stream_ends_when_its_vm_is_destroyed() -> None:
    with live_server() as (url, _):
        vm = httpx.post(f"{url}/v1/vms", json={}).json()["id"]
        client, response = _open(url, vm)
        ended = threading.Event()

        def drain() -> None:
            for _ in response.iter_bytes():
                pass
            ended.set()

        threading.Thread(target=drain, daemon=True).start()
        time.sleep(0.5)
        assert not ended.is_set()
        httpx.delete(f"{url}/v1/vms/{vm}")
        assert ended.wait(5), "the stream outlived its VM"
        client.close()


def test_streams_are_capped() -> None:
    with live_server({"KVM_MEMATTR_MAX_EVENT_STREAMS": "2"}) as (url, _):
        vm = httpx.post(f"{url}/v1/vms", json={}).json()["id"]
        opened = [_open(url, vm) for _ in range(2)]
        lines = [response.iter_lines() for _, response in opened]  # kept: dropping one closes its stream
        for line in lines:  # the first line: both generators have started
            next(line)
        assert_problem(httpx.get(f"{url}/v1/vms/{vm}/events/stream"), 409, "EAGAIN")
        client, response = opened.pop()
        response.close()
        client.close()
        deadline = time.monotonic() + 5
        while httpx.get(f"{url}/v1/vms/{vm}/events/stream", params={"seconds": 0.1}).status_code != 200:
            assert time.monotonic() < deadline, "a closed stream's place was not given back"
            time.sleep(0.2)
        for client, response in opened:
            response.close()
            client.close()


def test_sigterm_with_a_stream_open_ends_within_10_s() -> None:
    with live_server() as (url, proc):
        vm = httpx.post(f"{url}/v1/vms", json={}).json()["id"]
        client, response = _open(url, vm, seconds=3600)
        lines = response.iter_lines()
        next(lines)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        assert time.monotonic() - started < 8, "SIGTERM waited on the open stream past Docker's stop timeout"
        client.close()
