"""The host side of guest_memfd over HTTP: mmap, host accesses, fallocate, gmem-only slots.

Each rule is the kernel's (virt/kvm/guest_memfd.c, 6.18); the errno and counters are asserted."""

from __future__ import annotations

from typing import Any

from tests.api.conftest import GIB4, HVA, MakeVm, assert_problem
from tests.inprocess import TestClient

MIB2 = 0x200000
MMAP, INIT_SHARED = 1, 2
KEEP, PUNCH = 1, 3


def _file(client: TestClient, vm: str, size: int = MIB2, flags: int = 0) -> int:
    r = client.post(f"/v1/vms/{vm}/guest-memfds", json={"size": size, "flags": flags})
    assert r.status_code == 201, r.text
    fd: int = r.json()["fd"]
    return fd


def _bind(client: TestClient, vm: str, fd: int, slot: int = 0, gpa: int = GIB4, size: int = MIB2, off: int = 0) -> Any:
    body = {
        "flags": 4,
        "guest_phys_addr": gpa,
        "memory_size": size,
        "userspace_addr": HVA + gpa,
        "guest_memfd": fd,
        "guest_memfd_offset": off,
    }
    r = client.put(f"/v1/vms/{vm}/memslots/{slot}", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _fault(client: TestClient, vm: str, gpa: int, **kw: Any) -> Any:
    r = client.post(f"/v1/vms/{vm}/faults", json={"gpa": gpa, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def _pages(client: TestClient, vm: str, fd: int) -> list[tuple[int, int]]:
    runs = client.get(f"/v1/vms/{vm}/guest-memfds/{fd}/pages").json()["runs"]
    return [(r["start"], r["end"]) for r in runs if r["allocated"]]


def _mmu(client: TestClient, vm: str) -> Any:
    return client.get(f"/v1/vms/{vm}/mmu").json()


def test_mmap_errnos_in_the_kernels_order(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("default", "linux")
    plain, mappable = _file(client, vm), _file(client, vm, flags=MMAP)
    url = f"/v1/vms/{vm}/guest-memfds"
    assert_problem(client.post(f"{url}/{mappable}/mmap", json={"length": 0}), 422, "EINVAL")
    assert_problem(client.post(f"{url}/{mappable}/mmap", json={"offset": 1, "length": 4096}), 422, "EINVAL")
    # do_mmap()'s checks come before the file's own: ENODEV only for a valid request.
    assert_problem(client.post(f"{url}/{plain}/mmap", json={"offset": 1, "length": 4096}), 422, "EINVAL")
    assert_problem(client.post(f"{url}/{plain}/mmap", json={"length": 4096}), 400, "ENODEV")
    # kvm_gmem_mmap(): ENODEV before the MAP_SHARED check.
    assert_problem(client.post(f"{url}/{plain}/mmap", json={"length": 4096, "shared": False}), 400, "ENODEV")
    assert_problem(client.post(f"{url}/{mappable}/mmap", json={"length": 4096, "shared": False}), 422, "EINVAL")
    assert_problem(client.post(f"{url}/99/mmap", json={"length": 4096}), 422, "EBADF")
    r = client.post(f"{url}/{mappable}/mmap", json={"offset": 4096, "length": 5000})
    assert r.status_code == 201
    assert r.json() == {"id": 1, "fd": mappable, "offset": 4096, "length": 8192}  # PAGE_ALIGN(len)
    assert client.get(f"{url}/{mappable}").json()["mappings"] == [1]


def test_host_touch_needs_init_shared_and_stays_inside_the_file(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("default", "linux")
    shared, mmap_only = _file(client, vm, flags=MMAP | INIT_SHARED), _file(client, vm, flags=MMAP)
    url = f"/v1/vms/{vm}"
    m = client.post(f"{url}/guest-memfds/{shared}/mmap", json={"offset": 0, "length": 3 * MIB2}).json()["id"]
    n = client.post(f"{url}/guest-memfds/{mmap_only}/mmap", json={"length": MIB2}).json()["id"]
    # Without INIT_SHARED every page is SIGBUS (kvm_gmem_fault_user_mapping()).
    p = assert_problem(client.post(f"{url}/host-mappings/{n}/touch", json={"offset": 8192}), 422, "EFAULT")
    assert (p["signal"], p["fault_offset"]) == ("SIGBUS", 8192) and "INIT_SHARED" in p["detail"]
    # Past i_size: SIGBUS at the first page past the end, and nothing before it is touched.
    p = assert_problem(
        client.post(f"{url}/host-mappings/{m}/touch", json={"offset": MIB2 - 4096, "size": 8192}), 422, "EFAULT"
    )
    assert (p["signal"], p["fault_offset"]) == ("SIGBUS", MIB2) and "i_size" in p["detail"]
    assert _pages(client, vm, shared) == []
    # Past the mapping: SIGSEGV.
    p = assert_problem(client.post(f"{url}/host-mappings/{n}/touch", json={"offset": MIB2}), 422, "EFAULT")
    assert p["signal"] == "SIGSEGV"  # no VMA there: the file is never asked
    small = client.post(f"{url}/guest-memfds/{shared}/mmap", json={"length": 4096}).json()["id"]
    p = assert_problem(
        client.post(f"{url}/host-mappings/{small}/touch", json={"offset": 0, "size": 8192}), 422, "EFAULT"
    )
    assert (p["signal"], p["fault_offset"]) == ("SIGSEGV", 4096)
    # Inside: each page is faulted into the file once.
    t = client.post(f"{url}/host-mappings/{m}/touch", json={"offset": 4096, "size": 8192, "write": True}).json()
    assert t == {"pages": 2, "allocated_pages": 2}
    t = client.post(f"{url}/host-mappings/{m}/touch", json={"offset": 100, "size": 8192}).json()
    assert t == {"pages": 3, "allocated_pages": 1}
    assert _pages(client, vm, shared) == [(0, 3 * 4096)]


def test_fallocate_errnos_in_the_kernels_order(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "linux")
    fd = _file(client, vm)
    url = f"/v1/vms/{vm}/guest-memfds/{fd}/fallocate"

    def post(mode: int, offset: int, length: int) -> Any:
        return client.post(url, json={"mode": mode, "offset": offset, "len": length})

    before = client.get(f"/v1/vms/{vm}/snapshot").json()
    assert_problem(post(KEEP, 0, 0), 422, "EINVAL")  # len <= 0
    assert_problem(post(KEEP, 1 << 63, 4096), 422, "EINVAL")  # a negative loff_t
    assert_problem(post(KEEP | 0x100, 0, 4096), 400, "EOPNOTSUPP")  # unknown bit
    assert_problem(post(0x02, 0, 4096), 400, "EOPNOTSUPP")  # PUNCH_HOLE without KEEP_SIZE
    assert_problem(post(0x02 | 0x10, 0, 4096), 400, "EOPNOTSUPP")  # two modes
    assert_problem(post(PUNCH, (1 << 63) - 4096, 8192), 422, "EFBIG")  # past s_maxbytes
    assert_problem(post(0, 0, 4096), 400, "EOPNOTSUPP")  # guest_memfd: KEEP_SIZE only
    assert_problem(post(0x10 | KEEP, 0, 4096), 400, "EOPNOTSUPP")  # ZERO_RANGE
    assert_problem(post(KEEP, 1, 4096), 422, "EINVAL")  # unaligned
    assert_problem(post(PUNCH, 0, 100), 422, "EINVAL")
    assert_problem(post(KEEP, MIB2 - 4096, 8192), 422, "EINVAL")  # kvm_gmem_allocate(): past i_size
    assert_problem(client.post(f"/v1/vms/{vm}/guest-memfds/9/fallocate", json={"offset": 0, "len": 4096}), 422, "EBADF")
    after = client.get(f"/v1/vms/{vm}/snapshot").json()
    assert after == before  # a refused call changes nothing
    # A hole past the end is no error (punch-hole never checks i_size).
    r = post(PUNCH, 4 * MIB2, 4096).json()
    assert (r["pages_freed"], r["invalidated"]) == (0, False)
    r = post(KEEP, 0, 8 * 4096).json()
    assert (r["pages_allocated"], r["punch_hole"]) == (8, False)
    assert post(KEEP, 4 * 4096, 8 * 4096).json()["pages_allocated"] == 4
    assert _pages(client, vm, fd) == [(0, 12 * 4096)]


def test_fail_nth_fails_the_nth_new_folio_and_keeps_the_ones_before(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "linux")
    fd = _file(client, vm)
    client.post(f"/v1/vms/{vm}/guest-memfds/{fd}/fallocate", json={"mode": KEEP, "offset": 4096, "len": 4096})
    assert client.put(f"/v1/vms/{vm}/fault-injection", json={"fail_nth": 3}).status_code == 200
    r = client.post(f"/v1/vms/{vm}/guest-memfds/{fd}/fallocate", json={"mode": KEEP, "offset": 0, "len": 8 * 4096})
    assert_problem(r, 507, "ENOMEM")
    # New folios 1 and 2 are pages 0 and 2 (page 1 was there): page 3 fails.
    assert _pages(client, vm, fd) == [(0, 3 * 4096)]
    assert client.get(f"/v1/vms/{vm}/fault-injection").json()["fail_nth"] is None


def test_punch_hole_invalidates_every_binding_and_frees_the_pages(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "linux")
    fd = _file(client, vm, size=2 * MIB2)
    # Two slots bind the two halves of one file.
    _bind(client, vm, fd, slot=0, gpa=GIB4, size=MIB2, off=0)
    _bind(client, vm, fd, slot=1, gpa=2 * GIB4, size=MIB2, off=MIB2)
    client.put(f"/v1/vms/{vm}/memory-attributes", json={"address": GIB4, "size": MIB2, "attributes": 8})
    assert _fault(client, vm, GIB4 + 4096)["outcome"] == "mapped"
    assert _fault(client, vm, 2 * GIB4, private=False)["outcome"] == "mapped"
    assert _pages(client, vm, fd) == [(4096, 8192)]  # the private fault took its page from the file
    seq = _mmu(client, vm)["mmu_invalidate_seq"]
    # A hole over the end of the first half and the start of the second.
    r = client.post(
        f"/v1/vms/{vm}/guest-memfds/{fd}/fallocate", json={"mode": PUNCH, "offset": 0, "len": MIB2 + 4096}
    ).json()
    assert (r["punch_hole"], r["pages_freed"], r["invalidated"]) == (True, 1, True)
    # Outside TDX the filter reaches every mapping: the shared one on slot 1 goes too.
    assert r["pages_zapped"] == 2 and r["mmu"]["mapped_pages"] == 0
    assert r["mmu"]["mmu_invalidate_seq"] == seq + 1 and r["mmu"]["mmu_invalidate_in_progress"] == 0
    assert r["mmu"]["stats"]["tlb_flushes"] == 1
    assert _pages(client, vm, fd) == []
    events = client.get(f"/v1/vms/{vm}/events").json()["events"]
    kinds = [e["type"] for e in events[-6:]]
    assert kinds[-5:] == ["invalidate_range_add", "unmap", "tlb_flush", "invalidate_end", "fallocate"]
    # A hole over no binding runs no invalidation.
    fd2 = _file(client, vm)
    r = client.post(f"/v1/vms/{vm}/guest-memfds/{fd2}/fallocate", json={"mode": PUNCH, "offset": 0, "len": MIB2})
    assert r.json()["invalidated"] is False and r.json()["mmu"]["mmu_invalidate_seq"] == seq + 1


def test_gmem_only_slot_takes_shared_faults_from_the_file(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("default", "linux")
    fd = _file(client, vm, flags=MMAP | INIT_SHARED)
    slot = _bind(client, vm, fd)["memslot"]
    assert slot["gmem_only"] is True
    assert _fault(client, vm, GIB4, write=True)["outcome"] == "mapped"
    assert _pages(client, vm, fd) == [(0, 4096)]  # the shared fault allocated in the file
    # A plain guest_memfd slot: shared faults use the userspace mapping, the file is untouched.
    plain = _file(client, vm)
    assert _bind(client, vm, plain, slot=1, gpa=2 * GIB4)["memslot"]["gmem_only"] is False
    assert _fault(client, vm, 2 * GIB4)["outcome"] == "mapped"
    assert _pages(client, vm, plain) == []
    # Closing the mmap-able file: the slot keeps KVM_MEMSLOT_GMEM_ONLY, so a shared fault is now a
    # memory-fault exit (flags 0), not a mapping; on the plain slot shared faults still map.
    closed = client.delete(f"/v1/vms/{vm}/guest-memfds/{fd}").json()
    assert (closed["released"], closed["invalidated"], closed["pages_zapped"]) == (True, True, 1)
    assert client.get(f"/v1/vms/{vm}/memslots/0").json()["gmem_only"] is True
    f = _fault(client, vm, GIB4 + 4096)
    assert f["outcome"] == "memory_fault_exit" and f["exit"]["flags"] == 0
    r = client.post(f"/v1/vms/{vm}/prefault", json={"gpa": GIB4, "size": 4096})
    assert_problem(r, 422, "EFAULT")
    client.delete(f"/v1/vms/{vm}/guest-memfds/{plain}")
    assert _fault(client, vm, 2 * GIB4 + 4096)["outcome"] == "mapped"


def test_a_mapping_holds_the_file_until_the_last_munmap(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("default", "linux")
    fd = _file(client, vm, flags=MMAP | INIT_SHARED)
    _bind(client, vm, fd)
    m = client.post(f"/v1/vms/{vm}/guest-memfds/{fd}/mmap", json={"length": MIB2}).json()["id"]
    assert _fault(client, vm, GIB4)["outcome"] == "mapped"
    closed = client.delete(f"/v1/vms/{vm}/guest-memfds/{fd}").json()
    assert (closed["released"], closed["invalidated"], closed["pages_zapped"]) == (False, False, 0)
    assert client.get(f"/v1/vms/{vm}/host-mappings/{m}").json()["fd"] is None
    # Still bound: the guest keeps faulting from the file, and the host keeps touching it.
    assert _fault(client, vm, GIB4 + 4096)["outcome"] == "mapped"
    assert client.post(f"/v1/vms/{vm}/host-mappings/{m}/touch", json={"offset": 8192}).json()["allocated_pages"] == 1
    # The export of this state imports to the same document.
    doc = client.get(f"/v1/vms/{vm}/snapshot").json()
    imported = client.post("/v1/vms/import", json=doc)
    assert imported.status_code == 201, imported.text
    assert client.get(f"/v1/vms/{imported.json()['id']}/snapshot").json() == doc
    gone = client.delete(f"/v1/vms/{vm}/host-mappings/{m}").json()
    assert (gone["released"], gone["invalidated"], gone["pages_zapped"]) == (True, True, 2)
    assert_problem(client.get(f"/v1/vms/{vm}/host-mappings/{m}"), 404, "ENOENT")
    assert client.get(f"/v1/vms/{vm}/host-mappings").json() == {"mappings": []}


def test_bind_of_stdio_is_einval_and_of_a_closed_fd_ebadf(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("sw_protected", "linux")
    body = {"flags": 4, "guest_phys_addr": GIB4, "memory_size": MIB2, "userspace_addr": HVA, "guest_memfd_offset": 0}
    assert_problem(client.put(f"/v1/vms/{vm}/memslots/0", json={**body, "guest_memfd": 1}), 422, "EINVAL")
    assert_problem(client.put(f"/v1/vms/{vm}/memslots/0", json={**body, "guest_memfd": 7}), 422, "EBADF")


def test_imports_refuse_a_host_side_no_call_could_make(client: TestClient, make_vm: MakeVm) -> None:
    vm = make_vm("default", "linux")
    fd = _file(client, vm, flags=MMAP | INIT_SHARED)
    _bind(client, vm, fd)
    client.post(f"/v1/vms/{vm}/guest-memfds/{fd}/mmap", json={"length": MIB2})
    assert _fault(client, vm, GIB4)["outcome"] == "mapped"
    doc = client.get(f"/v1/vms/{vm}/snapshot").json()
    assert doc["files"][0]["allocated"] == [[0, 1]] and doc["memslots"][0]["gmem_only"] is True

    def refused(change: Any, what: str) -> None:
        bad = {**doc, "files": [dict(f) for f in doc["files"]], "memslots": [dict(s) for s in doc["memslots"]]}
        change(bad)
        p = assert_problem(client.post("/v1/vms/import", json=bad), 422, "EINVAL")
        assert what in p["detail"], p["detail"]

    refused(lambda d: d["files"][0].update(allocated=[]), "not allocated")
    refused(lambda d: d["files"][0].update(allocated=[[0, 1], [1, 2]]), "maximal")
    refused(lambda d: d["files"][0].update(allocated=[[0, 1 << 53]]), "maximal")
    refused(lambda d: d["files"][0].update(flags=INIT_SHARED), "ENODEV")
    refused(lambda d: d["memslots"][0].update(gmem_only=False), "gmem_only")
    refused(lambda d: d.update(version=2), "version 3")


def _vm_on(client: TestClient, profile: str) -> str:
    r = client.post("/v1/vms", json={"type": "sw_protected", "semantics": "linux", "profile": profile})
    assert r.status_code == 201, r.text
    vm: str = r.json()["id"]
    return vm


def test_an_overlapping_binding_is_eexist_from_7_2_and_einval_before(client: TestClient) -> None:
    # The file ranges overlap, the guest addresses do not (kvm_gmem_bind()'s own check).
    for profile, status, errno in (("linux-6.18", 422, "EINVAL"), ("linux-7.3", 409, "EEXIST")):
        vm = _vm_on(client, profile)
        fd = _file(client, vm)
        _bind(client, vm, fd, slot=0, gpa=GIB4, size=MIB2 // 2)
        body = {"flags": 4, "guest_phys_addr": 2 * GIB4, "memory_size": MIB2 // 2, "userspace_addr": HVA}
        r = client.put(f"/v1/vms/{vm}/memslots/1", json={**body, "guest_memfd": fd, "guest_memfd_offset": 4096})
        assert_problem(r, status, errno)


def test_from_7_3_a_to_shared_conversion_reserves_nothing_to_fail(client: TestClient) -> None:
    attrs = "/v1/vms/{}/memory-attributes"
    for profile, fails in (("linux-6.18", True), ("linux-7.3", False)):
        vm = _vm_on(client, profile)
        client.put(attrs.format(vm), json={"address": 0, "size": 8192, "attributes": 8})
        client.put(f"/v1/vms/{vm}/fault-injection", json={"fail_nth": 1})
        r = client.put(attrs.format(vm), json={"address": 0, "size": 8192, "attributes": 0})
        armed = client.get(f"/v1/vms/{vm}/fault-injection").json()["fail_nth"]
        if fails:
            assert_problem(r, 507, "ENOMEM")
            assert armed is None
        else:
            assert r.status_code == 200 and armed == 1  # nothing allocated, so the injection waits
            # ... for the next call that reserves: a to-private one.
            r = client.put(attrs.format(vm), json={"address": 0, "size": 8192, "attributes": 8})
            assert_problem(r, 507, "ENOMEM")
