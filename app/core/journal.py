"""Optional durable state: a write-ahead journal of every state-changing call, in SQLite.

Every mutation is recorded (under the VM lock, before it runs, so before the response is sent)
as ``(vm_id, op, args)``; on start-up the journal is replayed into a fresh engine. The engine is
deterministic, so replay rebuilds attributes, slots, mappings, counters and event ids exactly
(event timestamps are the replay's). Destroying a VM deletes its records, which keeps the
journal proportional to the live VMs' history.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

from app.core.errors import KvmError
from app.models import kvm as kvm_models
from app.models import snapshot as snapshot_models

if TYPE_CHECKING:
    from app.core.engine import Engine

_MODELS: dict[str, type[BaseModel]] = {
    name: cls
    for module in (kvm_models, snapshot_models)
    for name, cls in vars(module).items()
    if isinstance(cls, type) and issubclass(cls, BaseModel) and cls.__module__ == module.__name__
}


class Journal(Protocol):
    def record(self, vm_id: str, op: str, args: tuple[Any, ...]) -> None: ...

    def forget_vm(self, vm_id: str) -> None: ...


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

    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY, vm_id TEXT NOT NULL, op TEXT NOT NULL, args TEXT NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS journal_vm ON journal (vm_id)")
        self._lock = threading.Lock()

    def record(self, vm_id: str, op: str, args: tuple[Any, ...]) -> None:
        payload = json.dumps([_encode(a) for a in args])
        with self._lock:
            self._db.execute("INSERT INTO journal (vm_id, op, args) VALUES (?, ?, ?)", (vm_id, op, payload))

    def forget_vm(self, vm_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM journal WHERE vm_id = ?", (vm_id,))

    def replay(self, engine: Engine) -> int:
        """Re-run every recorded call, in order, into ``engine`` (which must not journal yet)."""
        n = 0
        for vm_id, op, payload in self._db.execute("SELECT vm_id, op, args FROM journal ORDER BY seq"):
            args = [_decode(a) for a in json.loads(payload)]
            with contextlib.suppress(KvmError):  # it failed the same way when it was recorded
                engine.replay(vm_id, op, args)
            n += 1
        return n

    def close(self) -> None:
        self._db.close()
