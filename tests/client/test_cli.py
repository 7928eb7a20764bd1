"""The CLI against a real server (subprocess), plus the demo in-process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.cli import main
from app.cli.args import number
from harness.live import ROOT, live_server


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with live_server() as (u, _):
        yield u


def run(url: str, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["--url", url, *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), ("0x1000", 4096), ("4K", 4096), ("2M", 2 << 20), ("1G", 1 << 30), ("0X10", 16), ("2MiB", 2 << 20)],
)
def test_number(text: str, value: int) -> None:
    assert number(text) == value


def test_cli_story(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(url, capsys, "--json", "vm", "create", "--semantics", "linux", "--name", "cli")
    assert code == 0
    vm = json.loads(out)["id"]
    assert run(url, capsys, "--json", "gmem", "create", vm, "--size", "4M")[0] == 0
    code, out, _ = run(
        url,
        capsys,
        "--json",
        "memslot",
        "set",
        vm,
        "10",
        "--gpa",
        "4G",
        "--size",
        "4M",
        "--hva",
        "0x7f0000000000",
        "--flags",
        "4",
        "--gmem",
        "3",
    )
    assert json.loads(out)["change"] == "create"
    code, out, _ = run(url, capsys, "--json", "fault", vm, "4G", "--write")
    assert json.loads(out)["outcome"] == "mapped"
    code, out, _ = run(url, capsys, "--json", "attrs", "set", vm, "4G", "2M", "--private")
    up = json.loads(out)
    assert (up["pages_zapped"], up["tlb_flushed"]) == (1, True)
    code, out, _ = run(url, capsys, "attrs", "get", vm, "--start-gfn", "0x100000", "--end-gfn", "0x100400")
    assert code == 0 and "runs" in out and "0x100200" in out  # a human table
    assert run(url, capsys, "mmu", vm)[1].count("mmu_invalidate_seq") == 1
    code, out, _ = run(url, capsys, "--json", "notifier", "start", vm, "0x7f0000200000", "0x7f0000201000")
    inv = json.loads(out)["id"]
    assert (
        json.loads(run(url, capsys, "--json", "fault", vm, "0x100200000")[1])["retry_reason"]
        == "invalidation_in_progress"
    )
    assert run(url, capsys, "-q", "notifier", "end", vm, str(inv)) == (0, "", "")
    assert run(url, capsys, "--json", "inject", vm, "1")[0] == 0
    code, _, err = run(url, capsys, "attrs", "set", vm, "4G", "4K", "--shared")
    assert code == 1 and "ENOMEM" in err and "507" in err
    assert json.loads(run(url, capsys, "--json", "inject", vm)[1])["fail_nth"] is None
    for argv in (
        ["gfn", vm, "0x100000"],
        ["mappings", vm],
        ["events", vm, "--limit", "3"],
        ["memslot", "list", vm],
        ["gmem", "list", vm],
        ["regions", vm],
        ["caps"],
        ["caps", "--vm", vm],
        ["vm", "list"],
        ["health"],
        ["prefault", vm, "4G", "64K"],
        ["notifier", "list", vm],
        ["vm", "get", vm],
    ):
        assert run(url, capsys, *argv)[0] == 0, argv
    assert run(url, capsys, "memslot", "delete", vm, "10")[0] == 0
    assert run(url, capsys, "vm", "delete", vm)[0] == 0


def test_cli_errors(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(url, capsys, "vm", "get", "nope")
    assert code == 1 and "ENOENT" in err
    code, _, err = run(
        url,
        capsys,
        "reg-region",
        json.loads(run(url, capsys, "--json", "vm", "create", "--type", "default")[1])["id"],
        "0",
        "4K",
    )
    assert code == 1 and "ENOTTY" in err
    code, _, err = run("http://127.0.0.1:9", capsys, "health")
    assert code == 3 and "cannot reach" in err
    with pytest.raises(SystemExit) as exc:
        main(["attrs", "set", "x", "4G", "2Q", "--private"])
    assert exc.value.code == 2


def test_serve_refuses_workers() -> None:
    assert main(["serve", "--workers", "2"]) == 2


def test_demo_tells_the_story_in_process() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "demo", "--in-process"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for needle in (
        "pages_zapped=4 tlb_flushed=True",
        "outcome=retry (mmu_seq_changed)",
        "KVM_EXIT_MEMORY_FAULT",
        "invalidation_in_progress",
        "ENOMEM",
        "attributes identical to before: True",
        "reviewer-reorder: 7 of 19 schedules end with stale_mapping",
        "rfc-v9 (begin before the stores, end on the error path too): 0 of 32 schedules",
        # The in-place chapter: exit, EAGAIN on the pinned page, unpin, retry, mapped, SIGBUS.
        "memory_fault_exit, flags=0x8",
        "-> EAGAIN",
        "error_offset=0x2000",
        "converted: invalidated=True",
        "the guest's access again: mapped, private=True",
        "EFAULT SIGBUS",
        "where to look next",
    ):
        assert needle in out, needle
    assert "\x1b[" not in out, "no colours when not a terminal"


def test_demo_against_a_server(url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "--url", url, "demo"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert f"talking to {url}" in result.stdout


def test_cli_explore_timeline_and_replay(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run(url, capsys, "explore", "--variant", "reviewer-reorder", "--fail-nth", "2")
    assert code == 4  # an invariant broke: a status CI can gate on
    assert "7 of 19 schedules violate an invariant" in out
    assert "stale_mapping: gfn 0x0 is mapped private but its attribute is shared" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("#"))
    assert header.split() == ["#", "vCPU", "conversion", "seq", "in_prog", "attrs", "spte"]
    assert any(line.split()[-3:] == ["0", "ss", "P"] and "install_spte" in line for line in lines)
    replay = next(line for line in lines if "--schedule" in line)
    assert all(len(line) <= 80 for line in lines if line is not replay)
    schedule = replay.split("--schedule ")[1].strip("'")
    code, out, _ = run(
        url, capsys, "explore", "--variant", "reviewer-reorder", "--fail-nth", "2", "--schedule", schedule
    )
    assert code == 4 and "this schedule violates an invariant" in out


def test_cli_explore_all_and_json(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(url, capsys, "explore", "--all")
    assert code == 4  # three of the five variants break an invariant
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 4}
    assert "stale_mapping" in rows["reviewer-reorder"] and "no_termination" in rows["v9-naive-unwind"]
    assert "rollback_not_exact" in rows["v9-as-posted"]
    assert rows["rfc-v9"].split("│")[3].strip() == "0" and rows["linux"].split("│")[3].strip() == "0"
    # Every planted wrong order shows, on the review's case or (marked) the one that shows it.
    assert rows["in-place"].split("│")[3].strip() == "0"
    assert "stale_mapping" in rows["in-place-store-first"] and "pinned_page_private" in rows["in-place-no-pin-check*"]
    assert "* pinned 1" in out
    code, out, _ = run(url, capsys, "--json", "explore", "--variant", "rfc-v9", "--npages", "3", "--fail-nth", "2")
    assert code == 0 and json.loads(out)["violations"] == 0
    code, _, err = run(url, capsys, "explore", "--variant", "rfc-v9", "--npages", "9")
    assert code == 1 and "EINVAL" in err


def test_cli_vm_delete_all(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(url, capsys, "-q", "vm", "create")[0] == 0
    assert run(url, capsys, "vm", "delete", "--all")[0] == 0
    assert json.loads(run(url, capsys, "--json", "vm", "list")[1]) == {"vms": []}
    with pytest.raises(SystemExit):
        run(url, capsys, "vm", "delete")  # neither an id nor --all


def test_cli_vm_export_import(url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    vm = json.loads(run(url, capsys, "--json", "vm", "create", "--semantics", "linux")[1])["id"]
    assert run(url, capsys, "-q", "attrs", "set", vm, "4G", "8K", "--private")[0] == 0
    code, out, _ = run(url, capsys, "vm", "export", vm)
    assert code == 0 and json.loads(out)["version"] == 4
    path = tmp_path / "vm.json"
    path.write_text(out)
    code, out, _ = run(url, capsys, "--json", "vm", "import", str(path), "--name", "copy")
    assert code == 0
    copy = json.loads(out)
    assert copy["name"] == "copy" and copy["id"] != vm
    code, again, _ = run(url, capsys, "vm", "export", copy["id"])
    assert {**json.loads(again), "name": None} == {**json.loads(path.read_text()), "name": None}
    path.write_text("{}")
    code, _, err = run(url, capsys, "vm", "import", str(path))
    assert code == 1 and "EINVAL" in err


def test_cli_guest_memfd_host_side(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    vm = json.loads(run(url, capsys, "--json", "vm", "create", "--semantics", "linux", "--type", "default")[1])["id"]
    assert run(url, capsys, "-q", "gmem", "create", vm, "--size", "2M", "--flags", "3")[0] == 0
    gpa = ["--gpa", "4G", "--size", "2M", "--hva", "0x7f0000000000", "--flags", "4", "--gmem", "3"]
    assert run(url, capsys, "-q", "memslot", "set", vm, "0", *gpa)[0] == 0
    code, out, _ = run(url, capsys, "gmem", "mmap", vm, "3", "2M")
    assert code == 0 and "0x200000" in out  # the length, in hex like every size
    assert json.loads(run(url, capsys, "--json", "gmem", "touch", vm, "1", "--size", "8K")[1])["allocated_pages"] == 2
    code, _, err = run(url, capsys, "gmem", "touch", vm, "1", "--offset", "2M")
    assert code == 1 and "EFAULT" in err and "SIGSEGV" in err
    runs = json.loads(run(url, capsys, "--json", "gmem", "pages", vm, "3")[1])["runs"]
    assert [(r["start"], r["end"], r["allocated"]) for r in runs] == [(0, 0x2000, True), (0x2000, 0x200000, False)]
    out = json.loads(run(url, capsys, "--json", "gmem", "fallocate", vm, "3", "0", "1M", "--punch-hole")[1])
    assert (out["pages_freed"], out["invalidated"]) == (2, True)
    assert json.loads(run(url, capsys, "--json", "gmem", "munmap", vm, "1")[1])["released"] is False
