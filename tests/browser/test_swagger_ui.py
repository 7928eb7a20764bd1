"""A real browser (Debian's Chromium, headless, no internet) uses Swagger UI's "Try it out".

Run by `.ci/run` after it installs Chromium: `pytest -m browser`. The default test run leaves
it out because a fresh machine has no browser.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

pytest.importorskip("playwright", reason="the browser tests need the dev extra (playwright)")

from playwright.sync_api import Page, sync_playwright

from harness.chromium import launch
from harness.live import live_server

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page() -> Iterator[tuple[Page, str, list[str]]]:
    with live_server() as (url, _), sync_playwright() as p:
        browser = launch(p)
        pg = browser.new_page(viewport={"width": 1280, "height": 2000})
        outside: list[str] = []
        # Everything must come from the service itself: note any request that leaves it.
        pg.on("request", lambda r: outside.append(r.url) if not r.url.startswith(url) else None)
        yield pg, url, outside
        browser.close()


def try_it_out(page: Page, op_id: str, params: dict[str, str], body: dict[str, object] | None) -> tuple[str, str]:
    block = page.locator(f"#operations-{op_id}")
    block.locator(".opblock-summary").first.click()
    # The app turns on tryItOutEnabled, so the form is usually editable already.
    block.locator(".body-param__text, .parameters, .execute").first.wait_for(timeout=10_000)
    try_button = block.get_by_role("button", name="Try it out")
    if try_button.count():
        try_button.click()
    for name, value in params.items():
        block.locator(f'tr[data-param-name="{name}"] input').fill(value)
    if body is not None:
        block.locator("textarea.body-param__text").fill(json.dumps(body))
    block.get_by_role("button", name="Execute").click()
    live = block.locator(".live-responses-table .response").first
    live.wait_for(timeout=15_000)
    status = live.locator(".response-col_status").inner_text().strip()
    text = live.locator(".response-col_description pre").first.inner_text()
    return status, text


def test_swagger_ui_creates_a_vm_and_converts_memory(page: tuple[Page, str, list[str]]) -> None:
    pg, url, outside = page
    pg.goto(f"{url}/docs")
    pg.wait_for_selector("#operations-vms-create_vm", timeout=20_000)
    assert "kvm-memattr" in pg.locator(".info .title").inner_text()
    assert pg.get_by_role("button", name="Authorize").count() == 0  # no token configured: no padlocks

    status, text = try_it_out(
        pg, "vms-create_vm", {}, {"type": "sw_protected", "semantics": "linux", "name": "browser"}
    )
    assert status == "201", text
    vm = json.loads(text)
    assert vm["name"] == "browser" and vm["semantics"] == "linux"

    status, text = try_it_out(
        pg,
        "memory-attributes-set_memory_attributes",
        {"vm_id": vm["id"]},
        {"address": "0x100000000", "size": "0x200000", "attributes": 8, "flags": 0},
    )
    assert status == "200", text
    update = json.loads(text)
    assert (update["start_gfn"], update["end_gfn"], update["attributes"]) == (0x100000, 0x100200, 8)

    status, text = try_it_out(
        pg,
        "memory-attributes-get_memory_attributes",
        {"vm_id": vm["id"], "start_gfn": "0x100000", "end_gfn": "0x100400"},
        None,
    )
    assert status == "200", text
    assert [r["private"] for r in json.loads(text)["runs"]] == [True, False]
    pg.screenshot(path=os.environ.get("KVM_MEMATTR_SCREENSHOT", "/tmp/kvm-memattr-swagger.png"), full_page=False)
    assert outside == [], f"requests left the service: {outside}"
