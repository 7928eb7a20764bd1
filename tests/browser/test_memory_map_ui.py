"""The memory-map page in Debian's Chromium (headless, no internet), driven as a person would.

Run by `.ci/run` after it installs Chromium: `pytest -m browser`. It saves the screenshot the
README shows, docs/memory-map.png.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("playwright", reason="the browser tests need the dev extra (playwright)")

from playwright.sync_api import Browser as PwBrowser
from playwright.sync_api import Page, expect, sync_playwright

from harness.chromium import ARGS, CHROMIUM, launch
from harness.live import ROOT, live_server

pytestmark = pytest.mark.browser


class Browser:
    def __init__(self, page: Page, url: str) -> None:
        self.page, self.url = page, url
        self.outside: list[str] = []
        self.errors: list[str] = []
        # Everything must come from the service itself; the page must run without errors.
        page.on("request", lambda r: self.outside.append(r.url) if not r.url.startswith(url) else None)
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    def drawn(self) -> int:
        return int(self.page.locator("#map").get_attribute("data-drawn") or 0)

    def wait_redraw(self, before: int) -> None:
        # Polled from here: the page's CSP (no eval) refuses wait_for_function's string predicate.
        deadline = time.monotonic() + 10
        while self.drawn() <= before:
            assert time.monotonic() < deadline, "the map was not redrawn"
            self.page.wait_for_timeout(20)

    def mmu(self, key: str) -> str:
        return self.page.locator(f'#mmu tr[data-key="{key}"] td').nth(1).inner_text()

    def submit(self, form: str, **fields: str) -> None:
        before = self.drawn()
        for name, value in fields.items():
            self.page.locator(f"{form} [name={name}]").fill(value)
        self.page.locator(f"{form} button[type=submit]").click()
        self.wait_redraw(before)


@pytest.fixture(scope="module")
def chromium() -> Iterator[PwBrowser]:
    with sync_playwright() as p:
        launched = launch(p)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def browser(chromium: PwBrowser) -> Iterator[Browser]:
    with live_server() as (url, _):
        page = chromium.new_page(viewport={"width": 1400, "height": 1100})
        yield Browser(page, url)
        page.close()


def test_a_conversion_seen_on_the_map(browser: Browser) -> None:
    page = browser.page
    page.goto(browser.url + "/")
    expect(page).to_have_url(re.compile(r"/ui$"))
    expect(page.get_by_role("link", name="API (Swagger UI)")).to_have_attribute("href", "/docs")

    page.locator("#create-vm [name=type]").select_option("sw_protected")
    page.locator("#create-vm [name=semantics]").select_option("linux")
    page.locator("#create-vm [name=name]").fill("browser")
    expect(page.locator("#create-vm [name=profile]")).to_have_value("linux-6.18")  # the service default
    page.locator("#create-vm button").click()
    expect(page.locator("#vm-title")).to_contain_text("browser (sw_protected, linux, host linux-6.18)")
    page.wait_for_selector("#map[data-drawn]")

    page.locator("#add-slot [name=MMAP]").check()  # a gmem-only slot
    browser.submit("#add-slot", slot="10", gpa="0x100000000", size="0x400000", hva="0x7f0000000000")
    expect(page.locator('#map rect.slot-rect[data-gmem-only="1"]')).to_have_count(1)
    expect(page.locator("#last-result")).to_contain_text('change="create"')

    browser.submit("#fault", gpa="0x100000000")
    expect(page.locator("#last-result")).to_contain_text('outcome="mapped"')
    assert browser.mmu("mapped pages") == "1"
    assert browser.mmu("mmu_invalidate_seq") == "0"

    browser.submit("#convert", gpa="0x100000000", size="0x200000")
    expect(page.locator("#last-result")).to_contain_text("pages_zapped=1")
    assert browser.mmu("mmu_invalidate_seq") == "1"
    assert browser.mmu("mapped pages") == "0"
    # The trace shows the protocol, in order, highlighted as it arrives.
    page.wait_for_selector('#events li[data-type="invalidate_end"]')
    types = page.locator("#events li").evaluate_all("els => els.map(e => e.dataset.type)")
    steps = [t for t in types if t in ("invalidate_begin", "unmap", "tlb_flush", "attributes_store", "invalidate_end")]
    assert steps[-5:] == ["invalidate_begin", "unmap", "tlb_flush", "attributes_store", "invalidate_end"]
    expect(page.locator("#events li.protocol").first).to_be_visible()

    # The attributes lane now holds private (hatched) pages; hover names the gfn, its slot and attributes.
    page.evaluate("zoomTo(0x100000n, 0x100400n)")
    browser.wait_redraw(browser.drawn() - 1)
    assert page.locator('#map rect[fill="url(#pat-private)"]').count() > 0
    box = page.locator("#map").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + 140, box["y"] + 20)
    expect(page.locator("#tooltip")).to_contain_text(re.compile(r"gfn 0x1000[0-9a-f]{2}  gpa 0x1000"))
    expect(page.locator("#tooltip")).to_contain_text("attributes 8 (private)")
    expect(page.locator("#tooltip")).to_contain_text("slot 0xa")

    # Down to single pages with the wheel.
    for _ in range(12):
        before = browser.drawn()
        page.mouse.move(box["x"] + 300, box["y"] + 40)
        page.mouse.wheel(0, -100)
        browser.wait_redraw(before)
    expect(page.locator("#window")).to_contain_text(": 8 gfns")

    # An error shows its errno and detail.
    browser.submit("#convert", gpa="0x100000800", size="0x1000")
    expect(page.locator("#error")).to_contain_text("EINVAL")
    expect(page.locator("#error")).to_contain_text("4 KiB aligned")

    # The picture the README opens with.
    browser.submit("#prefault", gpa="0x100200000", size="0x100000")
    browser.submit("#notifier", hva_start="0x7f0000300000", hva_end="0x7f0000310000")
    expect(page.locator("#notifiers button")).to_have_count(1)
    browser.submit("#fallocate", fd="3", offset="0x380000", len="0x40000")
    browser.submit("#mmap", fd="3", offset="0x0", length="0x100000")
    expect(page.locator("#host-mappings tr")).to_have_count(2)
    page.evaluate("zoomTo(0xfff80n, 0x100480n)")
    page.locator("#explore button").click()
    expect(page.locator("#timeline tr")).to_have_count(8)
    page.screenshot(path=str(ROOT / "docs" / "memory-map.png"), full_page=True)

    assert browser.outside == [], "every request stays on the service"
    # Chromium logs the one provoked 422 as a failed load; nothing else may be logged as an error.
    network = [e for e in browser.errors if e.startswith("Failed to load resource")]
    assert len(network) == 1 and "422" in network[0]
    assert [e for e in browser.errors if e not in network] == []
    browser.errors.clear()


def test_the_explorer_view(browser: Browser) -> None:
    page = browser.page
    page.goto(browser.url + "/ui")
    page.locator("#explore [name=variant]").select_option("reviewer-reorder")
    page.locator("#explore [name=fail_nth]").fill("2")
    page.locator("#explore button").click()
    expect(page.locator("#explore-verdict")).to_contain_text("7 of 19 schedules violate an invariant")
    expect(page.locator("#explore-verdict")).to_contain_text("stale_mapping")
    last = page.locator("#timeline tr.last td")
    expect(last.nth(1)).to_have_text("install_spte")
    expect(last.nth(6)).to_have_text("P")
    page.locator("#explore [name=variant]").select_option("rfc-v9")
    page.locator("#explore button").click()
    expect(page.locator("#explore-verdict")).to_contain_text("0 of 32 schedules")
    # A punch-hole race: the second lane is the punch-hole's, and the file's pages show.
    page.locator("#explore [name=variant]").select_option("punch-hole-no-seq-bump")
    page.locator("#explore [name=npages]").fill("1")
    page.locator("#explore button").click()
    expect(page.locator("#explore-verdict")).to_contain_text("1 of 13 schedules violate an invariant")
    expect(page.locator("#timeline th").nth(2)).to_have_text("punch-hole")
    expect(page.locator("#timeline th").nth(7)).to_have_text("file")
    expect(page.locator("#timeline tr").nth(4).locator("td").nth(2)).to_have_text("truncate")
    last = page.locator("#timeline tr.last td")
    expect(last.nth(1)).to_have_text("install_spte")
    expect(last.nth(7)).to_have_text(".")
    # An in-place conversion that skips the reference check makes a pinned page private.
    page.locator("#explore [name=variant]").select_option("in-place-no-pin-check")
    page.locator("#explore [name=npages]").fill("2")
    page.locator("#explore [name=pinned]").fill("1")
    page.locator("#explore button").click()
    expect(page.locator("#explore-verdict")).to_contain_text("pinned_page_private")
    expect(page.locator("#timeline th").nth(2)).to_have_text("conversion")
    expect(page.locator("#timeline tr.last td").nth(5)).to_have_text("PP")
    page.locator("#explore [name=variant]").select_option("in-place")
    page.locator("#explore button").click()
    expect(page.locator("#explore-verdict")).to_contain_text("0 of")
    assert browser.errors == [], browser.errors


def test_with_a_token(chromium: PwBrowser) -> None:
    with live_server(env={"KVM_MEMATTR_API_TOKEN": "s3cret"}) as (url, _):
        page = chromium.new_page()
        page.goto(url + "/ui")
        expect(page.locator("#error")).to_contain_text("EPERM")
        expect(page.locator("#token-form")).to_be_visible()
        expect(page.locator("#token-form")).to_be_visible()
        page.locator("#token").fill("s3cret")
        page.locator("#token-form button").click()
        page.locator("#create-vm button").click()
        page.wait_for_selector("#map[data-drawn]")
        expect(page.locator("#trace-mode")).to_have_text("(polling)")
        assert page.evaluate("sessionStorage.getItem('kvm-memattr-token')") == "s3cret"
        page.close()


def _window(page: Page) -> tuple[int, int]:
    start, end = (int(x, 16) for x in re.findall(r"0x[0-9a-f]+", page.locator("#window").inner_text())[:2])
    return start, end


def test_the_map_opens_on_the_vms_memslots(chromium: PwBrowser) -> None:
    """A VM of a few MiB opens fitted to its memslots, not as a hairline in 2^40 gfns; "fit" brings
    the view back. An MMIO exit reads without "undefined"; an error clears the last result."""
    with live_server() as (url, _):
        vm = httpx.post(f"{url}/v1/vms", json={"type": "sw_protected", "semantics": "linux"}).json()["id"]
        slot = {"guest_phys_addr": "0x100000000", "memory_size": "0x400000", "userspace_addr": "0x7f0000000000"}
        assert httpx.put(f"{url}/v1/vms/{vm}/memslots/10", json=slot).status_code == 200
        page = chromium.new_page(viewport={"width": 1400, "height": 1100})
        browser = Browser(page, url)
        page.goto(f"{url}/ui?vm={vm}")
        page.wait_for_selector("#map[data-drawn]")
        start, end = _window(page)
        assert start <= 0x100000 and end >= 0x100400 and end - start <= 0x800, (hex(start), hex(end))
        before = browser.drawn()
        page.locator("#zoom-all").click()
        browser.wait_redraw(before)
        assert _window(page)[1] == 1 << 40
        before = browser.drawn()
        page.locator("#zoom-fit").click()
        browser.wait_redraw(before)
        assert _window(page) == (start, end)

        browser.submit("#fault", gpa="0x0")  # no memslot there: an MMIO exit
        expect(page.locator("#last-result")).to_contain_text("exit=mmio gpa=0x0 read")
        assert "undefined" not in page.locator("#last-result").inner_text()
        page.locator("#convert [name=size]").fill("0x1001")
        page.locator("#convert button[type=submit]").click()
        expect(page.locator("#error")).to_contain_text("EINVAL")
        expect(page.locator("#last-result")).to_have_text("")
        assert browser.errors == [e for e in browser.errors if e.startswith("Failed to load resource")]
        page.close()


def test_a_headless_screenshot_settles_and_the_trace_streams_once_touched(chromium: PwBrowser, tmp_path: Path) -> None:
    """`chromium --headless --virtual-time-budget` never settled while the live stream was open; the
    page now polls until a person touches it, then streams."""
    with live_server() as (url, _):
        vm = httpx.post(f"{url}/v1/vms", json={"semantics": "linux"}).json()["id"]
        shot = tmp_path / "shot.png"
        argv = [CHROMIUM, "--headless", *ARGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900"]
        argv += ["--virtual-time-budget=3000", f"--screenshot={shot}", f"{url}/ui?vm={vm}"]
        started = time.monotonic()
        subprocess.run(argv, capture_output=True, timeout=60, check=False)
        assert shot.stat().st_size > 10_000 and time.monotonic() - started < 30

        page = chromium.new_page()
        page.goto(f"{url}/ui?vm={vm}")
        expect(page.locator("body")).to_have_attribute("data-ready", "1")
        expect(page.locator("#trace-mode")).to_have_text("(polling)")
        page.locator("#map").click()  # a person is here: stream
        expect(page.locator("#trace-mode")).to_have_text("(live)")
        httpx.post(f"{url}/v1/vms/{vm}/faults", json={"gpa": "0x0"})
        expect(page.locator('#events li[data-type="fault"]')).to_have_count(1)
        page.close()


def test_guest_memfd_files_pages_and_host_mappings_on_the_page(chromium: PwBrowser) -> None:
    """A gmem-only slot (bound to an MMAP file) is told apart on the memslot lane with its binding;
    the file's allocated pages are drawn on a lane under it, at the gfns that bind them; the files
    and the host's mappings are listed, and fallocate, mmap, host access, munmap and close work."""
    with live_server() as (url, _):
        vm = httpx.post(f"{url}/v1/vms", json={"type": "sw_protected", "semantics": "linux"}).json()["id"]
        fd = httpx.post(f"{url}/v1/vms/{vm}/guest-memfds", json={"size": "0x400000", "flags": 1}).json()["fd"]
        slot = {
            "flags": 4,
            "guest_phys_addr": "0x100000000",
            "memory_size": "0x400000",
            "userspace_addr": "0x7f0000000000",
            "guest_memfd": fd,
        }
        assert httpx.put(f"{url}/v1/vms/{vm}/memslots/10", json=slot).status_code == 200
        fallocate = {"mode": 1, "offset": "0x100000", "len": "0x80000"}  # file pages [0x100, 0x180)
        assert httpx.post(f"{url}/v1/vms/{vm}/guest-memfds/{fd}/fallocate", json=fallocate).status_code == 200
        mapping = httpx.post(f"{url}/v1/vms/{vm}/guest-memfds/{fd}/mmap", json={"length": "0x200000"}).json()
        assert mapping["id"] == 1
        page = chromium.new_page(viewport={"width": 1400, "height": 1100})
        browser = Browser(page, url)
        page.goto(f"{url}/ui?vm={vm}")
        page.wait_for_selector("#map[data-drawn]")

        # The memslot lane: the slot is gmem-only, with its file and page offset.
        slot_rect = page.locator('#map rect.slot-rect[data-slot="10"]')
        expect(slot_rect).to_have_attribute("data-gmem-only", "1")
        expect(slot_rect).to_have_attribute("fill", "url(#pat-gmem-only)")
        expect(page.locator("#map text.slot-label")).to_have_text(f"slot 0xa gmem-only, fd {fd} pgoff 0x0")
        # The file's pages: one lane, its allocated run drawn exactly over gfns [0x100100, 0x100180).
        expect(page.locator("#map text", has_text="gmem pages as0")).to_have_count(1)
        lo, hi = page.evaluate("[xOf(0x100100n), xOf(0x100180n)]")
        bars = page.locator("#map rect.filepage").evaluate_all(
            "rs => rs.map(r => [+r.getAttribute('x'), +r.getAttribute('x') + +r.getAttribute('width')])"
        )
        edge = 3  # a bucket (about 2 px) straddling an end of the run draws part of a bar
        assert bars and all(lo - edge <= a and b <= hi + edge for a, b in bars), (lo, hi, bars)
        assert min(a for a, _ in bars) <= lo + edge and max(b for _, b in bars) >= hi - edge, "the whole run is drawn"
        # The host's mapping of file pages [0, 0x200), over the gfns bound to them.
        host = page.locator('#map rect.hostmapped[data-mapping="1"]')
        expect(host).to_have_count(1)
        x, w = float(host.get_attribute("x") or 0), float(host.get_attribute("width") or 0)
        assert abs(x - page.evaluate("xOf(0x100000n)")) < 1 and abs(x + w - page.evaluate("xOf(0x100200n)")) < 1

        # The files and the host's mappings, as listed.
        row = page.locator(f'#gmem-files tr[data-key="{fd}"] td')
        cells = [str(fd), "0x400000", "MMAP", "128", "slot 0xa: [0x0, 0x400)", "[0x100, 0x180)", "[0x0, 0x400)", "#1"]
        for i, text in enumerate(cells):
            expect(row.nth(i)).to_have_text(text)
        row = page.locator('#host-mappings tr[data-key="1"] td')
        for i, text in enumerate(["#1", str(fd), "[0x0, 0x200)", "512"]):
            expect(row.nth(i)).to_have_text(text)

        # The trace prints page indexes, lengths and slot ids in hex, as the CLI does (one rule).
        expect(page.locator("#events")).to_contain_text("length=0x200000")
        expect(page.locator("#events")).to_contain_text("start_pgoff=0x100 end_pgoff=0x180")
        expect(page.locator("#events")).to_contain_text("slot=0xa")

        # Hovering a gfn names the file page behind it.
        page.evaluate("zoomTo(0x100100n, 0x100110n)")
        browser.wait_redraw(browser.drawn() - 1)
        box = page.locator("#map").bounding_box()
        assert box is not None
        page.mouse.move(box["x"] + 140, box["y"] + 20)
        expect(page.locator("#tooltip")).to_contain_text(f"slot 0xa gmem-only, fd {fd} pgoff 0x100 allocated")

        # The actions: punch a hole, mmap, a host access that takes SIGBUS, munmap, close.
        page.locator("#fallocate [name=mode]").select_option("3")
        browser.submit("#fallocate", fd=str(fd), offset="0x100000", len="0x40000")
        expect(page.locator("#last-result")).to_contain_text("pages_freed=64")
        expect(page.locator(f'#gmem-files tr[data-key="{fd}"] td').nth(5)).to_have_text("[0x140, 0x180)")
        browser.submit("#mmap", fd=str(fd), offset="0x200000", length="0x1000")
        expect(page.locator("#last-result")).to_contain_text("id=2")
        expect(page.locator("#host-mappings tr")).to_have_count(3)
        browser.submit("#touch", mapping="2", offset="0x0", size="0x1000")
        expect(page.locator("#error")).to_contain_text("EFAULT SIGBUS")
        expect(page.locator("#error")).to_contain_text("GUEST_MEMFD_FLAG_INIT_SHARED")
        before = browser.drawn()
        page.locator('#host-mappings tr[data-key="1"] button').click()  # munmap #1
        browser.wait_redraw(before)
        expect(page.locator("#last-result")).to_contain_text("released=false")
        expect(page.locator("#host-mappings tr")).to_have_count(2)
        before = browser.drawn()
        page.locator(f'#gmem-files tr[data-key="{fd}"] button').click()  # close: mapping #2 still holds the file
        browser.wait_redraw(before)
        expect(page.locator("#last-result")).to_contain_text("released=false")
        expect(page.locator("#gmem-files")).to_be_hidden()
        expect(page.locator('#host-mappings tr[data-key="2"] td').nth(1)).to_have_text("closed")
        before = browser.drawn()
        page.locator('#host-mappings tr[data-key="2"] button').click()  # the last reference
        browser.wait_redraw(before)
        expect(page.locator("#last-result")).to_contain_text("released=true")
        expect(page.locator("#gmem-panel")).to_be_hidden()
        expect(page.locator("#map text.slot-label")).to_have_text("slot 0xa gmem-only, no file")
        expect(page.locator("#map rect.filebound")).to_have_count(0)

        network = [e for e in browser.errors if e.startswith("Failed to load resource")]
        assert len(network) == 1 and "422" in network[0], network  # the provoked SIGBUS
        assert [e for e in browser.errors if e not in network] == []
        assert browser.outside == []
        page.close()


def test_in_place_conversion_on_the_page(chromium: PwBrowser) -> None:
    """On a 7.4 host converting in place, "convert" goes through the slot's guest_memfd
    (KVM_SET_MEMORY_ATTRIBUTES2); a pin made on the page refuses it with EAGAIN at its offset, and
    once unpinned the file's private pages are listed and drawn."""
    with live_server() as (url, _):
        body = {"type": "sw_protected", "semantics": "linux", "profile": "linux-7.4-in-place"}
        vm = httpx.post(f"{url}/v1/vms", json=body).json()["id"]
        fd = httpx.post(f"{url}/v1/vms/{vm}/guest-memfds", json={"size": "0x400000", "flags": 3}).json()["fd"]
        slot = {"flags": 4, "guest_phys_addr": "0x100000000", "memory_size": "0x400000"}
        slot |= {"userspace_addr": "0x7f0000000000", "guest_memfd": fd}
        assert httpx.put(f"{url}/v1/vms/{vm}/memslots/10", json=slot).status_code == 200
        assert httpx.post(f"{url}/v1/vms/{vm}/guest-memfds/{fd}/mmap", json={"length": "0x400000"}).status_code == 201
        page = chromium.new_page(viewport={"width": 1400, "height": 1100})
        browser = Browser(page, url)
        page.goto(f"{url}/ui?vm={vm}")
        page.wait_for_selector("#map[data-drawn]")
        expect(page.locator("#convert-api")).to_have_text("KVM_SET_MEMORY_ATTRIBUTES2 on the slot's guest_memfd")

        browser.submit("#pin", mapping="1", offset="0x3000", size="0x1000")
        expect(page.locator('#host-pins tr[data-key="1"] td').nth(2)).to_have_text("[0x3, 0x4)")
        pinned = page.locator('#map rect.pinned[data-pin="1"]')  # drawn on the file's lane, at its gfn
        expect(pinned).to_have_count(1)
        x = float(pinned.get_attribute("x") or 0)
        assert abs(x - page.evaluate("xOf(0x100003n)")) < 1
        browser.submit("#convert", gpa="0x100000000", size="0x10000")
        expect(page.locator("#error")).to_contain_text("EAGAIN")
        expect(page.locator("#error")).to_contain_text("error_offset 0x3000")
        before = browser.drawn()
        page.locator('#host-pins tr[data-key="1"] button').click()  # unpin
        browser.wait_redraw(before)
        browser.submit("#convert", gpa="0x100000000", size="0x10000")
        expect(page.locator("#last-result")).to_contain_text("invalidated=true  pages_zapped=0")  # bound, unmapped
        expect(page.locator(f'#gmem-files tr[data-key="{fd}"] td').nth(6)).to_have_text("[0x0, 0x10)")
        private = page.locator("#map rect[fill='url(#pat-private)']")
        expect(private.first).to_be_visible()
        browser.submit("#touch", mapping="1", offset="0x0", size="0x1000")
        expect(page.locator("#error")).to_contain_text("EFAULT SIGBUS")

        network = [e for e in browser.errors if e.startswith("Failed to load resource")]
        assert len(network) == 2, network  # the provoked EAGAIN and SIGBUS
        assert [e for e in browser.errors if e not in network] == []
        page.screenshot(path="/tmp/in-place-page.png", full_page=True)
        page.close()
