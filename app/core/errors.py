"""Errno-typed errors raised by the engine.

The engine reports failures the way the kernel does: with an errno. Each errno
is its own exception class so callers can catch precisely, and the HTTP layer
maps ``KvmError.errno`` to a status code in one place::

    KvmError                 any failure of a simulated ioctl
     ├── EINVAL              invalid argument (validation)
     ├── EEXIST              overlapping memslot
     ├── EBUSY               memslot change while an MMU-notifier invalidation is open
     ├── ENOENT              unknown VM, slot, invalidation or guest_memfd
     ├── EBADF               memslot names a guest_memfd that is not open
     ├── ENOTTY              ioctl not available for this VM type / semantics
     ├── ENOMEM              injected allocation failure or per-VM budget exceeded
     ├── EOPNOTSUPP          prefault on a VM type that does not allow it
     ├── EAGAIN              prefault's first page is inside an open invalidation
     ├── EFAULT              prefault's first page would be a memory-fault exit
     ├── ENOSPC              the state file could not record a call (disk full)
     ├── ENODEV              mmap of a guest_memfd created without GUEST_MEMFD_FLAG_MMAP
     ├── EFBIG               fallocate past the largest file offset
     ├── EOVERFLOW           mmap whose page offset + length wraps
     └── EPERM               access denied (HTTP authentication)

A ``KvmError`` may carry ``members``: more facts for the problem document (the signal a host
access takes, the offset it takes it at).
"""

from __future__ import annotations

import errno as _errno
from typing import ClassVar


class KvmError(Exception):
    """Base class: a simulated ioctl failed with ``errno``."""

    errno: ClassVar[str] = "EINVAL"

    def __init__(self, detail: str, **members: int | str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.members = members

    @property
    def errno_value(self) -> int:
        """The numeric errno, as ``ioctl()`` would set it."""
        return int(getattr(_errno, self.errno))


class EINVAL(KvmError):
    errno = "EINVAL"


class EEXIST(KvmError):
    errno = "EEXIST"


class EBUSY(KvmError):
    errno = "EBUSY"


class ENOENT(KvmError):
    errno = "ENOENT"


class EBADF(KvmError):
    errno = "EBADF"


class ENOTTY(KvmError):
    errno = "ENOTTY"


class ENOMEM(KvmError):
    errno = "ENOMEM"


class EPERM(KvmError):
    errno = "EPERM"


class EOPNOTSUPP(KvmError):
    errno = "EOPNOTSUPP"


class EAGAIN(KvmError):
    errno = "EAGAIN"


class EFAULT(KvmError):
    errno = "EFAULT"


class ENOSPC(KvmError):
    errno = "ENOSPC"


class ENODEV(KvmError):
    errno = "ENODEV"


class EFBIG(KvmError):
    errno = "EFBIG"


class EOVERFLOW(KvmError):
    errno = "EOVERFLOW"
