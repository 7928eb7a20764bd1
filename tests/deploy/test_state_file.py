"""The state file: compaction, its format version, and failures that say what is wrong."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.engine import Engine
from app.core.journal import SqliteJournal, StateFileError
from app.main import create_app
from app.models.kvm import FaultRequest, KvmCreateGuestMemfd, KvmMemoryAttributes, KvmUserspaceMemoryRegion2
from app.models.vm import VmCreate
from app.settings import Settings
from harness.live import ROOT, free_port
from tests.inprocess import TestClient

GIB4 = 0x1_0000_0000


def _rows(db: Path, sql: str) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute(sql).fetchone()[0])


def _busy_vm(engine: Engine) -> str:
    vm = engine.create_vm(VmCreate(semantics="linux"))
    fd = vm.create_guest_memfd(KvmCreateGuestMemfd(size=0x400000)).fd
    vm.set_user_memory_region(
        10,
        KvmUserspaceMemoryRegion2(
            flags=4, guest_phys_addr=GIB4, memory_size=0x400000, userspace_addr=0x7F0000000000, guest_memfd=fd
        ),
    )
    for i in range(60):
        vm.fault(FaultRequest(gpa=GIB4 + (i % 16) * 0x1000))
        vm.set_memory_attributes(KvmMemoryAttributes(address=GIB4, size=0x1000 * (1 + i % 3), attributes=8 * (i % 2)))
    return vm.id


def _state(engine: Engine) -> dict[str, object]:
    return {
        vm.id: (vm.snapshot().model_dump(), vm.memslots(), vm.mapping_runs(0, 0, 1 << 52, 10_000))
        for vm in engine.vms()
    }


def test_a_vm_is_compacted_past_the_threshold_and_restarts_from_its_snapshot(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite3"
    engine = Engine()
    engine.attach_journal(SqliteJournal(db, compact_after=25))
    vm = _busy_vm(engine)
    assert _rows(db, "SELECT COUNT(*) FROM snapshots") == 1
    assert _rows(db, f"SELECT COUNT(*) FROM journal WHERE vm_id = '{vm}'") < 25, "only the tail is kept"
    restarted = Engine()
    snapshots, calls = restarted.restore(SqliteJournal(db))
    assert snapshots == 1 and calls < 25
    assert _state(restarted) == _state(engine)


def test_graceful_shutdown_compacts_every_vm(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite3"
    settings = Settings(log_level="warning", state_file=str(db))
    with TestClient(create_app(settings)) as client:
        for semantics in ("linux", "rfc-v9"):
            vm = client.post("/v1/vms", json={"semantics": semantics}).json()["id"]
            client.post(f"/v1/vms/{vm}/faults", json={"gpa": 0})
        before = {v["id"]: v for v in client.get("/v1/vms").json()["vms"]}
    assert _rows(db, "SELECT COUNT(*) FROM journal") == 0
    assert _rows(db, "SELECT COUNT(*) FROM snapshots") == 2
    with TestClient(create_app(settings)) as client:
        assert {v["id"]: v for v in client.get("/v1/vms").json()["vms"]} == before


def _serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "app.cli", "serve", "--port", str(free_port())]
    return subprocess.run(argv, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def _refused(path: Path, needle: str) -> None:
    result = _serve({"KVM_MEMATTR_STATE_FILE": str(path)})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"KVM_MEMATTR_STATE_FILE={path}" in lines[0] and needle in lines[0], lines[0]


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not a database, just notes " * 100)
    _refused(bad, "file is not a database")


def test_a_directory_that_does_not_exist(tmp_path: Path) -> None:
    _refused(tmp_path / "missing" / "state.sqlite3", f"the directory {tmp_path / 'missing'} does not exist")


def test_someone_elses_database(tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite3"
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.commit()
    _refused(other, "not a kvm-memattr journal")


def test_a_newer_format_is_refused_and_left_untouched(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite3"
    SqliteJournal(db).close()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'version'")
        conn.commit()
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    _refused(db, "journal format 99 is newer")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest


def test_a_row_that_cannot_be_replayed_stops_start_up_naming_it(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite3"
    engine = Engine()
    engine.attach_journal(SqliteJournal(db))
    vm = engine.create_vm(VmCreate()).id
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("INSERT INTO journal (vm_id, op, args) VALUES (?, 'set_memory_attribute', '[]')", (vm,))
        conn.commit()
        (seq,) = conn.execute("SELECT MAX(seq) FROM journal").fetchone()
    _refused(db, f"journal row {seq} (VM {vm}, set_memory_attribute) cannot be replayed")
    with pytest.raises(StateFileError):
        Engine().restore(SqliteJournal(db))


def test_a_version_1_file_is_upgraded(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite3"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(
            "CREATE TABLE journal (seq INTEGER PRIMARY KEY, vm_id TEXT NOT NULL, op TEXT NOT NULL, args TEXT NOT NULL)"
        )
        conn.execute("""INSERT INTO journal (vm_id, op, args) VALUES ('v1', 'create_vm',
            '[{"$model": "VmCreate", "data": {"type": "default", "semantics": "linux", "name": "old"}}]')""")
        conn.commit()
    engine = Engine()
    assert engine.restore(SqliteJournal(db)) == (0, 1)
    assert engine.vm("v1").model().name == "old"
    assert _rows(db, "SELECT value FROM meta WHERE key = 'version'") == 3
    assert _rows(db, "SELECT COUNT(*) FROM pragma_table_info('journal') WHERE name = 'budget_refused'") == 1


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a tiny tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_the_call_with_enospc_and_changes_nothing(tiny_disk: Path) -> None:
    settings = Settings(log_level="warning", state_file=str(tiny_disk / "state.sqlite3"))
    with TestClient(create_app(settings)) as client:
        vm = client.post("/v1/vms", json={"semantics": "linux"}).json()["id"]
        client.put(
            f"/v1/vms/{vm}/memslots/0", json={"guest_phys_addr": 0, "memory_size": "0x100000", "userspace_addr": 0}
        )
        before = client.get(f"/v1/vms/{vm}/snapshot").json()
        filler = tiny_disk / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as f:
            while True:
                f.write(b"x" * 4096)
                f.flush()
        r = client.post(f"/v1/vms/{vm}/faults", json={"gpa": "0x1000", "write": True})
        assert r.status_code == 507 and r.json()["errno"] == "ENOSPC", r.text
        assert client.get(f"/v1/vms/{vm}/snapshot").json() == before, "nothing changed in memory"
        assert client.get("/healthz").json()["status"] == "ok"
        filler.unlink()
        assert client.post(f"/v1/vms/{vm}/faults", json={"gpa": "0x1000"}).json()["outcome"] == "mapped"


def test_a_read_only_file_system(tiny_disk: Path) -> None:
    db = tiny_disk / "state.sqlite3"
    SqliteJournal(db).close()
    if subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)]).returncode:
        pytest.skip("cannot remount read-only here")
    _refused(db, "(is it writable by this user?)")


def _journal_with_a_snapshot(tmp_path: Path) -> Path:
    db = tmp_path / "state.sqlite3"
    engine = Engine()
    engine.attach_journal(SqliteJournal(db))
    _busy_vm(engine)
    engine.compact_all()
    engine.create_vm(VmCreate(name="tail"))
    engine.journal.close()  # type: ignore[union-attr]
    return db


def test_bytes_flipped_mid_file_are_one_line(tmp_path: Path) -> None:
    db = _journal_with_a_snapshot(tmp_path)
    data = bytearray(db.read_bytes())
    at = data.index(b'"attributes"')  # inside the stored snapshot
    for i in range(at - 200, at + 200):
        data[i] ^= 0x5A
    db.write_bytes(bytes(data))
    _refused(db, "")


def test_a_non_numeric_format_version(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite3"
    SqliteJournal(db).close()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("UPDATE meta SET value = 'two' WHERE key = 'version'")
        conn.commit()
    _refused(db, "format version 'two' is not a number")


def test_a_bad_snapshot_row_is_one_line(tmp_path: Path) -> None:
    db = _journal_with_a_snapshot(tmp_path)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("""UPDATE snapshots SET doc = '{"version": 2, "type": "wrong"}'""")
        conn.commit()
    _refused(db, "does not load")


def test_an_empty_file_is_refused_not_treated_as_new(tmp_path: Path) -> None:
    empty = tmp_path / "state.sqlite3"
    empty.touch()
    _refused(empty, "is empty")


@pytest.mark.parametrize("table", ["snapshots", "journal"])
def test_a_dropped_table_is_refused(tmp_path: Path, table: str) -> None:
    db = _journal_with_a_snapshot(tmp_path)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(f"DROP TABLE {table}")
        conn.commit()
    _refused(db, f"has no {table} table")


def test_a_row_naming_an_unknown_vm_is_refused(tmp_path: Path) -> None:
    db = _journal_with_a_snapshot(tmp_path)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("""INSERT INTO journal (vm_id, op, args) VALUES ('nobody', 'set_fault_injection', '[3]')""")
        conn.commit()
    _refused(db, "VM nobody, which no snapshot or earlier row creates")
