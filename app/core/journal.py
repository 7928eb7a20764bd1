"""Optional durable state: per VM, its latest snapshot plus a write-ahead journal of the calls since.

Every mutation is recorded (under the VM lock, before it runs, so before the response is sent)
as ``(vm_id, op, args)``. When a VM's tail passes ``compact_after`` calls, and at a graceful
shutdown, the VM is compacted: its snapshot is written and the rows it covers are deleted in one
transaction, so a crash at any point loses nothing acknowledged. Start-up loads the snapshots and
replays only the tails: restart time follows the live state, not the history. The engine is
deterministic, so replay rebuilds attributes, slots, mappings, counters and event ids exactly
(event timestamps are the replay's; a compacted VM's trace restarts empty at its next event id).

The file carries its format and version; a file that is not ours, or is newer, is refused at
start-up and never rewritten.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError

from app.core.errors import ENOSPC
from app.models import kvm as kvm_models
from app.models import snapshot as snapshot_models
from app.models import vm as vm_models
from app.models.validation import one_line

FORMAT = "kvm-memattr-journal"
VERSION = 3
"""1: the journal table alone; 2: adds the format row and per-VM snapshots; 3: marks the calls the
service-wide budget refused (older files are upgraded)."""

_MODELS: dict[str, type[BaseModel]] = {
    name: cls
    for module in (kvm_models, snapshot_models, vm_models)
    for name, cls in vars(module).items()
    if isinstance(cls, type) and issubclass(cls, BaseModel) and cls.__module__ == module.__name__
}


class StateFileError(Exception):
    """The state file cannot be used; the message is the one line to print."""


class Journal(Protocol):
    def record(self, vm_id: str, op: str, args: tuple[Any, ...]) -> int: ...

    def mark_budget_refused(self, row: int) -> None: ...

    def forget_vm(self, vm_id: str) -> None: ...

    def wants_compaction(self, vm_id: str) -> bool: ...

    def compact(self, vm_id: str, snapshot: BaseModel) -> None: ...


def _encode(arg: Any) -> Any:
    if isinstance(arg, BaseModel):
        return {"$model": type(arg).__name__, "data": arg.model_dump(mode="json")}
    if arg is None or isinstance(arg, int | str):
        return arg
    raise TypeError(f"cannot journal {type(arg).__name__}")


def _decode(arg: Any) -> Any:
    if isinstance(arg, dict):
        return _MODELS[arg["$model"]].model_validate(arg["data"])
    return arg


class SqliteJournal:
    """WAL-mode SQLite; ``synchronous=NORMAL`` survives a killed process (not a power cut)."""

    def __init__(self, path: str | Path, compact_after: int = 10_000) -> None:
        self.path, self.compact_after = str(path), compact_after
        self._lock = threading.Lock()
        self._tail: dict[str, int] = {}  # rows since each VM's snapshot
        file = Path(self.path)
        if file.is_file() and file.stat().st_size == 0:
            # SQLite would take it as a new database: whatever it held is gone. Say so.
            raise self.error("the file is empty (0 bytes), not a kvm-memattr journal; remove it to start afresh")
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._open()
        except sqlite3.Error as e:
            raise self.error(self._why(e)) from None

    def _why(self, e: sqlite3.Error) -> str:
        reason = str(e)
        parent = Path(self.path).parent
        if "unable to open" in reason and not parent.is_dir():
            reason = f"the directory {parent} does not exist"
        elif "unable to open" in reason or "readonly" in reason:
            reason = f"{reason} (is it writable by this user?)"
        return reason

    def _open(self) -> None:
        db = self._db
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "meta" in tables:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("format") != FORMAT:
                raise self.error("not a kvm-memattr journal")
            text = meta.get("version", "")
            if not text.isdigit():
                raise self.error(f"the journal format version {text!r} is not a number: the file is damaged")
            version = int(text)
            if version > VERSION:
                raise self.error(
                    f"journal format {version} is newer than this kvm-memattr reads ({VERSION}); it was left untouched"
                )
            # A file of ours missing a table lost state: refuse it rather than start without it.
            for table in ("journal", "snapshots") if version >= 2 else ("journal",):
                if table not in tables:
                    raise self.error(f"the file has no {table} table: it is damaged, and starting would lose state")
        elif tables - {"journal"}:
            raise self.error("not a kvm-memattr journal")
        with db:  # an older file (or a new one) becomes the current format in one transaction
            db.execute("BEGIN IMMEDIATE")  # fails now, not at the first call, on a read-only file
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?), ('version', ?)", (FORMAT, str(VERSION)))
            db.execute(
                "CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY, vm_id TEXT NOT NULL, op TEXT NOT NULL, "
                "args TEXT NOT NULL, budget_refused INTEGER NOT NULL DEFAULT 0)"
            )
            if "budget_refused" not in {row[1] for row in db.execute("PRAGMA table_info(journal)")}:
                db.execute("ALTER TABLE journal ADD COLUMN budget_refused INTEGER NOT NULL DEFAULT 0")
            db.execute("CREATE INDEX IF NOT EXISTS journal_vm ON journal (vm_id)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS snapshots (vm_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, doc TEXT NOT NULL)"
            )

    def record(self, vm_id: str, op: str, args: tuple[Any, ...]) -> int:
        """Write one call ahead of running it; a full disk fails the call (ENOSPC), changing nothing.
        Returns the row, for ``mark_budget_refused()``."""
        payload = json.dumps([_encode(a) for a in args])
        with self._lock:
            try:
                cur = self._db.execute("INSERT INTO journal (vm_id, op, args) VALUES (?, ?, ?)", (vm_id, op, payload))
            except sqlite3.OperationalError as e:
                raise ENOSPC(f"the state file could not record the call: {e}") from None
            self._tail[vm_id] = self._tail.get(vm_id, 0) + 1
            assert cur.lastrowid is not None
            return cur.lastrowid

    def mark_budget_refused(self, row: int) -> None:
        """The service-wide budget refused the call of ``row``: replay must refuse it too. Written
        before the response; a crash in between leaves the call in flight, which may go either way."""
        with self._lock, contextlib.suppress(sqlite3.OperationalError):  # a full disk: as a crash before it
            self._db.execute("UPDATE journal SET budget_refused = 1 WHERE seq = ?", (row,))

    def wants_compaction(self, vm_id: str) -> bool:
        return self._tail.get(vm_id, 0) >= self.compact_after

    def compact(self, vm_id: str, snapshot: BaseModel) -> None:
        """Replace the VM's rows by its snapshot, atomically (call it under the VM lock)."""
        doc = snapshot.model_dump_json()
        with self._lock:
            try:
                with self._db:
                    self._db.execute("BEGIN IMMEDIATE")
                    (last,) = self._db.execute("SELECT MAX(seq) FROM journal WHERE vm_id = ?", (vm_id,)).fetchone()
                    self._db.execute(
                        "INSERT OR REPLACE INTO snapshots (vm_id, seq, doc) VALUES (?, ?, ?)", (vm_id, last or 0, doc)
                    )
                    self._db.execute("DELETE FROM journal WHERE vm_id = ?", (vm_id,))
            except sqlite3.OperationalError:
                return  # e.g. a full disk: the rows stay, nothing acknowledged is lost; try again later
            self._tail[vm_id] = 0

    def forget_vm(self, vm_id: str) -> None:
        with self._lock:
            with self._db:
                self._db.execute("DELETE FROM journal WHERE vm_id = ?", (vm_id,))
                self._db.execute("DELETE FROM snapshots WHERE vm_id = ?", (vm_id,))
            self._tail.pop(vm_id, None)

    def snapshots(self) -> Iterator[tuple[str, snapshot_models.VmSnapshot]]:
        """Every VM's latest snapshot, in the order they were written."""
        for vm_id, doc in self._read("SELECT vm_id, doc FROM snapshots ORDER BY seq"):
            try:
                yield vm_id, snapshot_models.VmSnapshot.model_validate_json(doc)
            except ValidationError as e:
                raise self.error(f"the snapshot of VM {vm_id} does not load: {one_line(e)}") from None

    def calls(self) -> Iterator[tuple[int, str, str, list[Any], bool]]:
        """The calls after the snapshots, in call order: (seq, vm_id, op, args, budget_refused)."""
        for seq, vm_id, op, payload, refused in self._read(
            "SELECT seq, vm_id, op, args, budget_refused FROM journal ORDER BY seq"
        ):
            try:
                args = [_decode(a) for a in json.loads(payload)]
            except ValidationError as e:
                raise self.error(f"journal row {seq} (VM {vm_id}, {op}) cannot be replayed: {one_line(e)}") from None
            except (ValueError, KeyError, TypeError) as e:
                raise self.error(f"journal row {seq} (VM {vm_id}, {op}) cannot be replayed: {e}") from None
            self._tail[vm_id] = self._tail.get(vm_id, 0) + 1
            yield seq, vm_id, op, args, bool(refused)

    def _read(self, sql: str) -> list[Any]:
        """All rows of a start-up query; a damaged file (SQLite's own check) is one line."""
        try:
            return self._db.execute(sql).fetchall()
        except sqlite3.DatabaseError as e:
            raise self.error(f"the file is damaged ({e}); restore it from a backup or remove it") from None

    def error(self, what: str) -> StateFileError:
        """The one line a state-file failure prints."""
        return StateFileError(f"KVM_MEMATTR_STATE_FILE={self.path}: {what}")

    def close(self) -> None:
        self._db.close()
