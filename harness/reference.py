"""A deliberately naive reference model of semantics.md: one dict entry per gfn.

It stores attributes the way the kernel's xarray does (one entry per gfn) and
mappings one per (as_id, gfn), and walks every page of every range. It is slow
and obviously correct over a small gfn window; the stateful test checks the
range-based engine against it after every step, and bench/engine.py times the engine against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.core.errors import (
    EAGAIN,
    EBADF,
    EBUSY,
    EEXIST,
    EFAULT,
    EFBIG,
    EINVAL,
    ENODEV,
    ENOENT,
    ENOMEM,
    ENOTTY,
    EOPNOTSUPP,
    EOVERFLOW,
    KvmError,
)
from app.models.host import KERNELS, PROFILES, HostCaps, Kernel
from app.models.kvm import Semantics, VmType

PAGE = 4096
U64_MAX = 2**64 - 1
PRIVATE = 8
LOG_DIRTY, READONLY, GMEM = 1, 2, 4


@dataclass
class RefSlot:
    as_id: int
    id: int
    flags: int
    base: int
    npages: int
    hva: int
    gmem_fd: int | None = None
    gmem_off: int = 0
    gmem_file: dict[str, Any] | None = None
    gmem_only: bool = False

    def pgoff(self, gfn: int) -> int:
        return self.gmem_off // PAGE + gfn - self.base

    def has(self, gfn: int) -> bool:
        return self.base <= gfn < self.base + self.npages

    def writable(self, write: bool) -> bool:
        return not self.flags & READONLY and (write or not self.flags & LOG_DIRTY)


@dataclass
class RefVM:
    vm_type: VmType
    semantics: Semantics
    max_gfn: int
    hugepages: tuple[int, ...] = (512, 262144)
    # The host's KVM_CHECK_EXTENSION answers: raw data, every rule that reads them is below.
    caps: HostCaps = PROFILES["linux-6.18"].caps
    kernel: Kernel = "6.18"
    in_place: bool = False
    """gmem_in_place_conversion (7.4): private/shared lives in each file, per page."""
    attrs: dict[int, int] = field(default_factory=dict)
    slots: dict[tuple[int, int], RefSlot] = field(default_factory=dict)
    maps: dict[tuple[int, int], tuple[bool, bool]] = field(default_factory=dict)
    seq: int = 0
    in_progress: int = 0
    rstart: int | None = None
    rend: int | None = None
    stats: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            [
                "attribute_updates",
                "tlb_flushes",
                "pages_zapped",
                "faults",
                "fault_retries",
                "memory_fault_exits",
                "mmio_exits",
            ],
            0,
        )
    )
    fail_nth: int | None = None
    gmem: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Open files: size, flags, bindings {raw slot: (offset, size)}, pages (allocated page
    indexes), mmaps (ids of the host mappings holding it), private (in place: page -> bool, where
    it differs from the file's default), pins {pin id: (first page, pages)}."""
    pins: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Pins of file pages: id -> the file."""
    next_pin: int = 1
    host_maps: dict[int, tuple[dict[str, Any], int, int]] = field(default_factory=dict)
    """Host mappings: id -> (file, first page, pages)."""
    next_mid: int = 1
    next_fd: int = 3
    notifiers: dict[int, bool] = field(default_factory=dict)
    next_nid: int = 1
    pinned: list[tuple[int, int]] = field(default_factory=list)

    @property
    def since_7_3(self) -> bool:
        return KERNELS.index(self.kernel) >= KERNELS.index("7.3")

    @property
    def debian_6_12(self) -> bool:
        """6.12.118: guest_memfd slots only with private memory, a u64 binding end, the in-file
        overlap found last (after max_gfn) and EEXIST."""
        return self.linux and self.kernel == "6.12"

    @property
    def linux(self) -> bool:
        return self.semantics is Semantics.linux

    @property
    def private_mem(self) -> bool:
        return self.vm_type in (VmType.sw_protected, VmType.snp, VmType.tdx)

    @property
    def nr_as(self) -> int:
        if self.linux and self.private_mem:
            return 1
        return 2 if self.caps.KVM_CAP_MULTI_ADDRESS_SPACE == 2 else 1

    def created(self) -> None:
        """KVM_CREATE_VM: a linux VM of a type the host does not list is EINVAL."""
        if self.linux and not self.caps.KVM_CAP_VM_TYPES & (1 << self.vm_type.value_code):
            raise EINVAL("vm type")

    @property
    def tdx(self) -> bool:
        """Only TDX (under linux) keeps private SPTEs apart, so only there an unmap's filter counts."""
        return self.linux and self.vm_type is VmType.tdx

    def attr(self, gfn: int) -> int:
        default = PRIVATE if not self.linux and self.private_mem else 0
        return self.attrs.get(gfn, default)

    @property
    def in_place_mode(self) -> bool:
        return self.linux and self.in_place

    def is_private(self, gfn: int) -> bool:
        """What a fault reads: the VM's attribute, or in place the file page behind the gfn."""
        if not self.in_place_mode:
            return bool(self.attr(gfn) & PRIVATE)
        slot = self.slot_at(0, gfn)
        if slot is None or slot.gmem_file is None or not self.private_mem:
            return False
        return self.file_private(slot.gmem_file, slot.pgoff(gfn))

    @staticmethod
    def file_private(f: dict[str, Any], page: int) -> bool:
        """The host may not touch the page: in place its attribute, else the whole file's."""
        return bool(f["private"].get(page, not f["flags"] & 2))

    def slot_at(self, as_id: int, gfn: int) -> RefSlot | None:
        for s in self.slots.values():
            if s.as_id == as_id and s.has(gfn):
                return s
        return None

    # -- invalidation
    def begin(self) -> None:
        self.in_progress += 1
        if self.in_progress == 1:
            self.rstart = self.rend = None

    def add(self, s: int, e: int) -> None:
        if self.rstart is None or self.rend is None:
            self.rstart, self.rend = s, e
        else:
            self.rstart, self.rend = min(self.rstart, s), max(self.rend, e)

    def end(self) -> None:
        self.seq += 1
        self.in_progress -= 1

    def unmap(self, as_id: int, gfns: range, kind: str) -> int:
        if not self.tdx:
            kind = "all"
        n = 0
        for g in gfns:
            m = self.maps.get((as_id, g))
            if m is not None and (kind == "all" or m[0] == (kind == "private")):
                del self.maps[(as_id, g)]
                n += 1
        self.stats["pages_zapped"] += n
        return n

    def flush(self, n: int) -> None:
        if n:
            self.stats["tlb_flushes"] += 1

    # -- attributes
    def _range(self, addr: int, size: int) -> range:
        if size == 0 or addr + size > U64_MAX or addr % PAGE or size % PAGE:
            raise EINVAL("range")
        return range(addr // PAGE, (addr + size) // PAGE)

    def enc_region(self, addr: int, size: int, register: bool) -> dict[str, object]:
        sev = self.vm_type in (VmType.sev, VmType.sev_es) or (self.linux and self.vm_type is VmType.snp)
        if sev:
            if register:
                if size == 0 or addr + size > U64_MAX:
                    raise EINVAL("sev")
                self.pinned.append((addr, size))
            else:
                if (addr, size) not in self.pinned:
                    raise EINVAL("sev")
                self.pinned.remove((addr, size))
            return {"pinned_regions": len(self.pinned)}
        if self.linux or not self.private_mem:
            raise ENOTTY("enc")
        gfns = self._range(addr, size)
        value = PRIVATE if register else 0
        self.begin()
        self.add(gfns.start, gfns.stop)
        nth, self.fail_nth = self.fail_nth, None
        saved: dict[int, int] = {}
        for i, g in enumerate(gfns, start=1):
            if nth == i:
                for old_g, old_v in saved.items():  # restore exactly what was there
                    self.attrs[old_g] = old_v
                self.end()
                raise ENOMEM("store")
            saved[g] = self.attr(g)
            self.attrs[g] = value
        zapped = 0
        for as_id in range(self.nr_as):
            zapped += self.unmap(as_id, range(gfns.start, gfns.stop), "all")
        self.flush(zapped)
        self.end()
        self.stats["attribute_updates"] += 1
        return {"noop": False, "invalidated": True, "pages_zapped": zapped}

    def set_attributes(self, address: int, size: int, attributes: int, flags: int) -> dict[str, object]:
        if not self.linux:
            raise ENOTTY("rfc")
        if not self.caps.KVM_CAP_MEMORY_ATTRIBUTES and not self.in_place_mode:
            raise ENOTTY("not built")
        if flags:
            raise EINVAL("flags")
        if attributes & ~(PRIVATE if self.private_mem and not self.in_place_mode else 0):
            raise EINVAL("attributes")
        gfns = self._range(address, size)
        if all(self.attr(g) == attributes for g in gfns):
            self.stats["attribute_updates"] += 1
            return {"noop": True, "invalidated": False, "pages_zapped": 0}
        if attributes or not self.since_7_3:  # 7.3: storing empty attributes reserves nothing
            nth, self.fail_nth = self.fail_nth, None
            if nth is not None and nth <= len(gfns):
                raise ENOMEM("reserve")
        hit = [(a, g) for a in range(self.nr_as) for g in gfns if self.slot_at(a, g)]
        zapped = 0
        if hit:
            self.begin()
            for a, g in hit:
                self.add(g, g + 1)
                zapped += self.unmap(a, range(g, g + 1), "shared" if attributes else "private")
            for slot in {(a, s.id): s for a, g in hit if (s := self.slot_at(a, g)) is not None}.values():
                self._widen(slot, range(max(gfns.start, slot.base), min(gfns.stop, slot.base + slot.npages)))
            self.flush(zapped)
        for g in gfns:
            self.attrs[g] = attributes
        if hit:
            self.end()
        self.stats["attribute_updates"] += 1
        return {"noop": False, "invalidated": bool(hit), "pages_zapped": zapped}

    def _widen(self, slot: RefSlot, part: range) -> None:
        """The hugepages holding the first and last gfn of a slot's part, if inside the slot,
        not wholly inside the part, and of one attribute value: added to the range."""
        for n in self.hugepages:
            for edge in {part.start - part.start % n, part[-1] - part[-1] % n}:
                page = range(edge, edge + n)
                inside = slot.base <= page.start and page.stop <= slot.base + slot.npages
                covered = part.start <= page.start and page.stop <= part.stop
                if inside and not covered and len({self.attr(h) for h in page}) == 1:
                    self.add(page.start, page.stop)

    # -- memslots
    def set_region(
        self, raw: int, flags: int, gpa: int, size: int, hva: int, fd: int | None, off: int
    ) -> dict[str, object]:
        as_id, sid = raw >> 16, raw & 0xFFFF
        if sid >= self.caps.KVM_CAP_NR_MEMSLOTS:
            raise EINVAL("id")
        allowed = LOG_DIRTY
        if not self.linux or (
            self.caps.KVM_CAP_READONLY_MEM and self.vm_type not in (VmType.sev_es, VmType.snp, VmType.tdx)
        ):
            allowed |= READONLY
        if (self.linux and self.caps.KVM_CAP_GUEST_MEMFD and (self.private_mem or not self.debian_6_12)) or (
            not self.linux and self.private_mem
        ):
            allowed |= GMEM
        if flags & GMEM:
            allowed &= ~(LOG_DIRTY | READONLY)
        if flags & ~allowed:
            raise EINVAL("flags")
        if size % PAGE or gpa % PAGE or hva % PAGE or hva + size > 0x7FFFFFFFF000:
            raise EINVAL("align")
        if flags & GMEM and (off % PAGE or off + size > U64_MAX):
            raise EINVAL("off")
        if as_id >= self.nr_as:
            raise EINVAL("as")
        if gpa + size > U64_MAX or size // PAGE > 2**31 - 1:
            raise EINVAL("wrap")
        old = self.slots.get((as_id, sid))
        npages, base = size // PAGE, gpa // PAGE
        if npages == 0:
            if old is None:
                raise EINVAL("delete")
            change = "delete"
        elif old is not None:
            if old.flags & GMEM or flags & GMEM:
                raise EINVAL("gmem")
            if hva != old.hva or npages != old.npages or (flags ^ old.flags) & READONLY:
                raise EINVAL("modify")
            change = "move" if base != old.base else ("flags_only" if flags != old.flags else "none")
        else:
            change = "create"
        gfile = None
        if change in ("create", "move"):
            for g in range(base, base + npages):
                other = self.slot_at(as_id, g)
                if other is not None and other is not old:
                    raise EEXIST("overlap")
            if flags & GMEM:
                if fd is not None and 0 <= fd <= 2:
                    raise EINVAL("stdio is not a guest_memfd")
                if fd is None or fd not in self.gmem:
                    raise EBADF("fd")
                gfile = self.gmem[fd]
                binds: dict[int, tuple[int, int]] = gfile["bindings"]
                end = off + size  # loff_t: past 2^63 it is negative and passes the check (6.12: u64)
                if self.debian_6_12:
                    if end > gfile["size"]:
                        raise EINVAL("gmem size")
                elif off >= 2**63 or (end < 2**63 and end > gfile["size"]):
                    raise EINVAL("gmem size")
                overlap = any(off < o + s and o < off + size for o, s in binds.values())
                if overlap and not self.debian_6_12:
                    raise (EEXIST if self.linux and self.since_7_3 else EINVAL)("bound")
            if base + npages - 1 > self.max_gfn:
                raise EINVAL("max_gfn")
            if flags & GMEM and overlap and self.debian_6_12:
                raise EEXIST("bound")
        if change == "none":
            return {"change": "none", "pages_zapped": 0}
        if self.notifiers:
            raise EBUSY("notifier")
        zapped = 0
        if change in ("delete", "move"):
            assert old is not None
            if not self.linux or self.vm_type is VmType.default:  # KVM_X86_QUIRK_SLOT_ZAP_ALL
                zapped = len(self.maps)
                self.maps.clear()
                self.stats["pages_zapped"] += zapped
            else:
                zapped = self.unmap(as_id, range(old.base, old.base + old.npages), "all")
            self.flush(zapped)
        if change == "delete":
            assert old is not None
            del self.slots[(as_id, sid)]
            if old.gmem_file is not None:
                del old.gmem_file["bindings"][raw]
        elif change == "create":
            self.slots[(as_id, sid)] = RefSlot(
                as_id,
                sid,
                flags,
                base,
                npages,
                hva,
                fd if gfile else None,
                off,
                gfile,
                bool(gfile and (gfile["flags"] & 1 or self.in_place_mode)),
            )
            if gfile is not None:
                gfile["bindings"][raw] = (off, size)
        else:
            assert old is not None
            old.base, old.flags = base, flags
        return {"change": change, "pages_zapped": zapped}

    def create_gmem(self, size: int, flags: int) -> int:
        if self.linux and not self.caps.KVM_CAP_GUEST_MEMFD:
            raise ENOTTY("not built")
        init_shared = 0 if self.private_mem and not self.in_place_mode else 2
        supported = (1 | init_shared) & self.caps.KVM_CAP_GUEST_MEMFD_FLAGS if self.linux else 0
        if flags & ~supported or size == 0 or size % PAGE or size >= 2**63:
            raise EINVAL("gmem")
        fd = self.next_fd
        self.next_fd += 1
        self.gmem[fd] = {
            "size": size,
            "flags": flags,
            "bindings": {},
            "pages": set(),
            "mmaps": set(),
            "fd": fd,
            "private": {},
            "pins": {},
            "detached": {},
        }
        return fd

    def _held(self, f: dict[str, Any]) -> bool:
        return bool(f["mmaps"] or f["pins"] or self.gmem.get(f["fd"]) is f)

    def _kind(self, f: dict[str, Any]) -> str:
        """The file's invalidation filter: in place both kinds, else by INIT_SHARED."""
        return "all" if self.in_place_mode else "shared" if f["flags"] & 2 else "private"

    def close_gmem(self, fd: int) -> tuple[bool, int, bool]:
        """(released, pages zapped, invalidated): a host mapping keeps the file."""
        if fd not in self.gmem:
            raise ENOENT("fd")
        f = self.gmem.pop(fd)
        if self._held(f):
            return False, 0, False
        return self._release(f)

    def _release(self, f: dict[str, Any]) -> tuple[bool, int, bool]:
        if not self.linux:
            return True, 0, False
        bound = [s for s in self.slots.values() if s.gmem_file is f]
        for slot in bound:
            slot.gmem_file, slot.gmem_fd = None, None
        f["bindings"] = {}
        zapped = 0
        if bound:
            self.begin()
            kind = self._kind(f)
            for slot in sorted(bound, key=lambda x: (x.as_id, x.id)):
                self.add(slot.base, slot.base + slot.npages)
                zapped += self.unmap(slot.as_id, range(slot.base, slot.base + slot.npages), kind)
            self.flush(zapped)
            self.end()
        return True, zapped, bool(bound)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> tuple[int, int, bool, int]:
        """(pages allocated, pages freed, invalidated, pages zapped)."""
        f = self.gmem.get(fd)
        if f is None:
            raise EBADF("fd")
        off = offset - 2**64 if offset >= 2**63 else offset
        ln = length - 2**64 if length >= 2**63 else length
        if off < 0 or ln <= 0:
            raise EINVAL("vfs")
        if mode & ~0xFF or mode & 0x04:
            raise EOPNOTSUPP("unknown bits")
        kind = mode & 0xFE
        if kind not in (0, 0x02, 0x08, 0x10, 0x20, 0x40, 0x80):
            raise EOPNOTSUPP("two modes")
        if kind == 0x02 and not mode & 1:
            raise EOPNOTSUPP("punch without keep")
        if kind in (0x08, 0x20, 0x80) and mode & 1:
            raise EOPNOTSUPP("keep with a resizing mode")
        if off + ln > 2**63 - 1:
            raise EFBIG("maxbytes")
        if not mode & 1 or mode & ~3:
            raise EOPNOTSUPP("gmem")
        if off % PAGE or ln % PAGE:
            raise EINVAL("align")
        first, stop = off // PAGE, (off + ln) // PAGE
        pages: set[int] = f["pages"]
        if not mode & 2:
            if off + ln > f["size"]:
                raise EINVAL("i_size")
            nth, self.fail_nth = self.fail_nth, None
            new = 0
            for p in range(first, stop):
                if p in pages:
                    continue
                if nth == new + 1:
                    raise ENOMEM("folio")
                pages.add(p)
                new += 1
            return new, 0, False, 0
        hits, zapped = self._invalidate_file(f, range(first, stop), self._kind(f))
        freed = {p for p in pages if first <= p < stop}
        pages -= freed
        for pid, (s, n) in f["pins"].items():  # the pinned folios leave the file with the pages
            f["detached"].setdefault(pid, set()).update(range(max(s, first), min(s + n, stop)))
        if hits:
            self.end()
        return 0, len(freed), hits, zapped

    def _invalidate_file(self, f: dict[str, Any], pages: range, kind: str) -> tuple[bool, int]:
        """Begin (if a binding holds any of ``pages``), then range_add and unmap ``kind`` per
        binding, one flush: (whether it began, pages zapped). The caller ends it."""
        hits = []
        for raw, (o, sz) in sorted(f["bindings"].items()):
            slot = self.slots[(raw >> 16, raw & 0xFFFF)]
            lo, hi = max(o // PAGE, pages.start), min((o + sz) // PAGE, pages.stop)
            if lo < hi:
                hits.append((slot, range(slot.base + lo - o // PAGE, slot.base + hi - o // PAGE)))
        zapped = 0
        if hits:
            self.begin()
            for slot, gfns in hits:
                self.add(gfns.start, gfns.stop)
                zapped += self.unmap(slot.as_id, gfns, kind)
            self.flush(zapped)
        return bool(hits), zapped

    def mmap(self, fd: int, offset: int, length: int, shared: bool) -> int:
        f = self.gmem.get(fd)
        if f is None:
            raise EBADF("fd")
        if length == 0 or offset % PAGE:
            raise EINVAL("do_mmap")
        npages = -(-length // PAGE)
        if offset // PAGE + npages > (2**64 - 1) // PAGE:
            raise EOVERFLOW("pgoff")
        if not f["flags"] & 1:
            raise ENODEV("no MMAP")
        if not shared:
            raise EINVAL("MAP_PRIVATE")
        mid = self.next_mid
        self.next_mid += 1
        self.host_maps[mid] = (f, offset // PAGE, npages)
        f["mmaps"].add(mid)
        return mid

    def munmap(self, mid: int) -> tuple[bool, int, bool]:
        if mid not in self.host_maps:
            raise ENOENT("mapping")
        f, _, _ = self.host_maps.pop(mid)
        f["mmaps"].discard(mid)
        if self._held(f):
            return False, 0, False
        return self._release(f)

    def touch(self, mid: int, offset: int, size: int) -> tuple[int, int]:
        """(pages, newly allocated); EFAULT for a page that takes a signal, checked page by page."""
        if mid not in self.host_maps:
            raise ENOENT("mapping")
        if size == 0:
            raise EINVAL("size")
        f, pg, npages = self.host_maps[mid]
        span = range(offset // PAGE, (offset + size - 1) // PAGE + 1)
        for p in span:
            if p >= npages:
                raise EFAULT("SIGSEGV")
            if pg + p >= f["size"] // PAGE or self.file_private(f, pg + p):
                raise EFAULT("SIGBUS")
        new = sum(pg + p not in f["pages"] for p in span)
        f["pages"].update(pg + p for p in span)
        return len(span), new

    def pin(self, mid: int, offset: int, size: int) -> int:
        """pin_user_pages(): faulted in as a touch, then held; the pin's id."""
        self.touch(mid, offset, size)
        f, pg, _ = self.host_maps[mid]
        pid = self.next_pin
        self.next_pin += 1
        f["pins"][pid] = (pg + offset // PAGE, (offset + size - 1) // PAGE - offset // PAGE + 1)
        self.pins[pid] = f
        return pid

    def unpin(self, pid: int) -> tuple[bool, int, bool]:
        if pid not in self.pins:
            raise ENOENT("pin")
        f = self.pins.pop(pid)
        del f["pins"][pid]
        f["detached"].pop(pid, None)
        if self._held(f):
            return False, 0, False
        return self._release(f)

    def gmem_attributes(self, fd: int, offset: int, size: int, attributes: int, flags: int) -> tuple[bool, bool, int]:
        """KVM_SET_MEMORY_ATTRIBUTES2: (noop, invalidated, pages zapped); EAGAIN/ENOMEM carry
        the error offset as their message."""
        f = self.gmem.get(fd)
        if f is None:
            raise ENOTTY("stdio") if 0 <= fd <= 2 else EBADF("fd")
        if not self.in_place_mode:
            raise ENOTTY("not in place")
        if flags or not self.private_mem or attributes & ~PRIVATE:
            raise EINVAL("flags, VM, attributes")
        if size == 0 or offset + size > U64_MAX or offset % PAGE or size % PAGE or offset + size > f["size"]:
            raise EINVAL("range")
        span = range(offset // PAGE, (offset + size) // PAGE)
        private = bool(attributes)
        if all(self.file_private(f, p) == private for p in span):
            self.stats["attribute_updates"] += 1
            return True, False, 0
        nth, self.fail_nth = self.fail_nth, None
        if nth == 1:
            raise ENOMEM(str(offset))
        if private:
            for p in span:  # the first page in use: pinned and still in the page cache
                held = (s <= p < s + n and p not in f["detached"].get(pid, ()) for pid, (s, n) in f["pins"].items())
                if p in f["pages"] and any(held):
                    raise EAGAIN(str(p * PAGE))
        hits, zapped = self._invalidate_file(f, span, "shared" if private else "private")
        for p in span:
            f["private"][p] = private
        if hits:
            self.end()
        self.stats["attribute_updates"] += 1
        return False, hits, zapped

    # -- faults
    def fault(self, as_id: int, gpa: int, write: bool, private: bool | None, mmu_seq: int | None) -> str:
        if as_id >= self.nr_as:
            raise EINVAL("as")
        gfn = gpa // PAGE
        attr_priv = self.is_private(gfn)
        priv = attr_priv if private is None else private
        snap = self.seq if mmu_seq is None else mmu_seq
        slot = self.slot_at(as_id, gfn)
        self.stats["faults"] += 1
        outcome = self._faultin(slot, gfn, priv, attr_priv, write, snap)
        if outcome == "mapped":
            assert slot is not None
            present = self.maps.get((as_id, gfn))
            if present is None:
                self.maps[(as_id, gfn)] = (priv, slot.writable(write))
            elif write and not present[1] and slot.writable(True):
                self.maps[(as_id, gfn)] = (present[0], True)  # the write-protection fault upgrades it
        else:
            self.stats[
                {"retry": "fault_retries", "memory_fault_exit": "memory_fault_exits", "mmio_exit": "mmio_exits"}[
                    outcome
                ]
            ] += 1
        return outcome

    def _faultin(self, slot: RefSlot | None, gfn: int, priv: bool, attr_priv: bool, write: bool, snap: int) -> str:
        """The checks of semantics.md section 6, in each semantics' order."""
        gmem = slot is not None and slot.flags & GMEM
        retry = self._would_retry(gfn) or self.seq != snap
        if self.linux:
            if priv != attr_priv:
                return "memory_fault_exit"
            if slot is None:
                return "memory_fault_exit" if priv else "mmio_exit"
            if retry:
                return "retry"
            if priv or slot.gmem_only:  # the page comes from guest_memfd, allocated if missing
                if slot.gmem_file is None:
                    return "memory_fault_exit"
                slot.gmem_file["pages"].add(slot.pgoff(gfn))
            if write and slot.flags & READONLY:
                return "mmio_exit"
            return "mapped"
        if gmem and priv != attr_priv:
            return "memory_fault_exit"
        if priv and not gmem:
            return "memory_fault_exit"
        if slot is None or (write and slot.flags & READONLY):
            return "mmio_exit"
        if priv:
            assert slot.gmem_file is not None
            slot.gmem_file["pages"].add(slot.pgoff(gfn))
        return "retry" if retry else "mapped"

    def _would_retry(self, gfn: int) -> bool:
        return bool(
            self.in_progress and self.rstart is not None and self.rend is not None and self.rstart <= gfn < self.rend
        )

    def prefault(self, gpa: int, size: int, as_id: int) -> tuple[int, int, str | None, int]:
        """(newly mapped, already mapped, stopping errno, first gfn not processed)."""
        if not self.linux:
            raise ENOTTY("prefault")
        gfns = self._range(gpa, size)
        if as_id >= self.nr_as:
            raise EINVAL("as")
        if not self.caps.KVM_CAP_PRE_FAULT_MEMORY or self.vm_type in (VmType.snp, VmType.tdx):
            raise EOPNOTSUPP("prefault")
        plan: dict[tuple[int, int], tuple[bool, bool]] = {}
        folios: list[tuple[dict[str, Any], int]] = []
        already = 0
        for g in gfns:
            slot = self.slot_at(as_id, g)
            priv = self.is_private(g)
            stop: type[KvmError] | None = None
            if slot is None:
                stop = EFAULT if priv else ENOENT
            elif self._would_retry(g):
                stop = EAGAIN
            elif (priv or slot.gmem_only) and slot.gmem_file is None:
                stop = EFAULT
            if stop is not None:
                if g == gfns.start:
                    raise stop("prefault")
                self._prefaulted(plan, folios)
                return len(plan), already, stop.errno, g
            assert slot is not None
            if (priv or slot.gmem_only) and slot.gmem_file is not None:
                folios.append((slot.gmem_file, slot.pgoff(g)))
            if (as_id, g) in self.maps:
                already += 1
            else:
                plan[(as_id, g)] = (priv, slot.writable(False))
        self._prefaulted(plan, folios)
        return len(plan), already, None, gfns.stop

    def _prefaulted(
        self, plan: dict[tuple[int, int], tuple[bool, bool]], folios: list[tuple[dict[str, Any], int]]
    ) -> None:
        self.maps.update(plan)
        for f, p in folios:
            f["pages"].add(p)

    # -- host MMU notifier
    def notifier_start(self, hs: int, he: int) -> tuple[int, int]:
        if hs >= he:
            raise EINVAL("hva")
        hits: list[tuple[int, int, int]] = []
        for s in self.slots.values():
            gfns = [s.base + i for i in range(s.npages) if s.hva + i * PAGE < he and hs < s.hva + (i + 1) * PAGE]
            if gfns:
                hits.append((s.as_id, min(gfns), max(gfns) + 1))
        zapped = 0
        if hits:
            self.begin()
            for a, lo, hi in hits:
                self.add(lo, hi)
                zapped += self.unmap(a, range(lo, hi), "shared")
            self.flush(zapped)
        nid = self.next_nid
        self.next_nid += 1
        self.notifiers[nid] = bool(hits)
        return nid, zapped

    def notifier_end(self, nid: int) -> None:
        if nid not in self.notifiers:
            raise ENOENT("nid")
        if self.notifiers.pop(nid):
            self.end()
