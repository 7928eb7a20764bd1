"""In-place conversion over HTTP (7.4): KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd, host pins,
and what the problem documents carry (error_offset, the ioctl to use)."""

from __future__ import annotations

from typing import Any

from app.client import Client, KvmMemattrError
from tests.api.conftest import GIB4, HVA, assert_problem
from tests.inprocess import TestClient

PAGE = 0x1000


def _in_place_vm(client: TestClient, profile: str = "linux-7.4-in-place", flags: int = 3) -> tuple[str, int, int]:
    """A VM with a 16-page MMAP | INIT_SHARED file bound at 4 GiB and mapped by the host: (vm, fd, mapping)."""
    vm = client.post("/v1/vms", json={"type": "sw_protected", "semantics": "linux", "profile": profile}).json()["id"]
    fd = client.post(f"/v1/vms/{vm}/guest-memfds", json={"size": 16 * PAGE, "flags": flags}).json()["fd"]
    slot = {"flags": 4, "guest_phys_addr": GIB4, "memory_size": 16 * PAGE, "userspace_addr": HVA, "guest_memfd": fd}
    assert client.put(f"/v1/vms/{vm}/memslots/0", json=slot).status_code == 200
    mapping = client.post(f"/v1/vms/{vm}/guest-memfds/{fd}/mmap", json={"length": 16 * PAGE}).json()["id"]
    return vm, fd, mapping


def _convert(client: TestClient, vm: str, fd: int, offset: int, size: int, attributes: int = 8, **more: Any) -> Any:
    body = {"offset": hex(offset), "size": hex(size), "attributes": attributes, **more}
    return client.post(f"/v1/vms/{vm}/guest-memfds/{fd}/memory-attributes", json=body)


def test_a_pinned_page_is_eagain_with_its_offset_then_converts_once_unpinned(client: TestClient) -> None:
    vm, fd, mapping = _in_place_vm(client)
    assert client.post(f"/v1/vms/{vm}/faults", json={"gpa": GIB4 + 5 * PAGE}).json()["outcome"] == "mapped"
    r = client.post(f"/v1/vms/{vm}/host-mappings/{mapping}/pin", json={"offset": hex(5 * PAGE), "size": PAGE})
    assert r.status_code == 201 and r.json() == {"id": 1, "fd": fd, "offset": 5 * PAGE, "size": PAGE}
    body = assert_problem(_convert(client, vm, fd, 0, 16 * PAGE), 409, "EAGAIN")
    assert body["error_offset"] == 5 * PAGE and "unpin" in body["detail"]
    mmu = client.get(f"/v1/vms/{vm}/mmu").json()
    assert (mmu["mmu_invalidate_seq"], mmu["mapped_pages"]) == (0, 1)  # nothing began, nothing unmapped
    assert client.get(f"/v1/vms/{vm}/host-pins").json() == {
        "pins": [{"id": 1, "fd": fd, "offset": 5 * PAGE, "size": PAGE}]
    }
    assert client.delete(f"/v1/vms/{vm}/host-pins/1").json()["released"] is False
    out = _convert(client, vm, fd, 0, 16 * PAGE).json()
    assert (out["noop"], out["invalidated"], out["pages_zapped"], out["tlb_flushed"]) == (False, True, 1, True)
    assert out["mmu"]["mmu_invalidate_seq"] == 1
    runs = client.get(f"/v1/vms/{vm}/guest-memfds/{fd}/pages").json()["runs"]
    assert [(r["start"], r["end"], r["private"]) for r in runs] == [
        (0, 5 * PAGE, True),
        (5 * PAGE, 6 * PAGE, True),
        (6 * PAGE, 16 * PAGE, True),
    ]
    assert client.get(f"/v1/vms/{vm}/gfns/{hex((GIB4 >> 12) + 5)}").json()["private"] is True
    touch = client.post(f"/v1/vms/{vm}/host-mappings/{mapping}/touch", json={"offset": 0, "size": PAGE})
    assert assert_problem(touch, 422, "EFAULT")["signal"] == "SIGBUS"
    assert assert_problem(client.get(f"/v1/vms/{vm}/host-pins/1"), 404, "ENOENT")


def test_errno_order_and_hints(client: TestClient) -> None:
    vm, fd, _ = _in_place_vm(client)
    assert assert_problem(_convert(client, vm, fd, 0, PAGE, flags=1), 422, "EINVAL")["detail"].startswith("flags")
    assert assert_problem(_convert(client, vm, 99, 0, PAGE), 422, "EBADF")
    assert (
        "reserved"
        in assert_problem(_convert(client, vm, fd, 0, PAGE, reserved=[0] * 10 + [1]), 422, "EINVAL")["detail"]
    )
    assert assert_problem(_convert(client, vm, fd, 15 * PAGE, 2 * PAGE), 422, "EINVAL")
    # The VM ioctl names the file's; a host without the mode names the VM's.
    vm_call = client.put(f"/v1/vms/{vm}/memory-attributes", json={"address": GIB4, "size": PAGE, "attributes": 8})
    assert "KVM_SET_MEMORY_ATTRIBUTES2" in assert_problem(vm_call, 422, "EINVAL")["detail"]
    old, old_fd, _ = _in_place_vm(client, "linux-7.3", flags=1)  # INIT_SHARED: private-memory VMs only in place
    detail = assert_problem(_convert(client, old, old_fd, 0, PAGE, flags=1), 400, "ENOTTY")["detail"]
    assert "it converts with KVM_SET_MEMORY_ATTRIBUTES (kvm-memattr attrs set)" in detail
    reg = client.post(f"/v1/vms/{vm}/memory-encrypt/reg-region", json={"addr": GIB4, "size": PAGE})
    assert "KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd" in assert_problem(reg, 400, "ENOTTY")["detail"]
    caps = client.get(f"/v1/vms/{vm}/capabilities").json()["caps"]
    assert (caps["KVM_CAP_MEMORY_ATTRIBUTES"], caps["KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES"]) == (0, 8)


def test_enomem_carries_the_offset_and_the_client_raises_it(client: TestClient) -> None:
    vm, fd, _ = _in_place_vm(client)
    assert client.put(f"/v1/vms/{vm}/fault-injection", json={"fail_nth": 1}).status_code == 200
    body = assert_problem(_convert(client, vm, fd, 2 * PAGE, PAGE), 507, "ENOMEM")
    assert body["error_offset"] == 2 * PAGE
    assert client.get(f"/v1/vms/{vm}/fault-injection").json()["fail_nth"] is None
    runs = client.get(f"/v1/vms/{vm}/guest-memfds/{fd}/pages").json()["runs"]
    assert not any(r["private"] for r in runs)


def test_the_typed_client_converts_pins_and_reads_error_offset() -> None:
    with Client.in_process() as kvm:
        vm = kvm.create_vm(type="sw_protected", semantics="linux", profile="linux-7.4-in-place")
        fd = kvm.create_guest_memfd(vm.id, size=4 * PAGE, flags=3).fd
        m = kvm.mmap_guest_memfd(vm.id, fd, length=4 * PAGE)
        pin = kvm.pin_host_mapping(vm.id, m.id, offset=PAGE, size=PAGE)
        try:
            kvm.set_guest_memfd_memory_attributes(vm.id, fd, offset=0, size=4 * PAGE, attributes=8)
        except KvmMemattrError as e:
            assert e.errno == "EAGAIN" and e.problem["error_offset"] == PAGE
        else:
            raise AssertionError("a pinned page must refuse the conversion")
        assert [p.id for p in kvm.list_host_pins(vm.id).pins] == [pin.id]
        kvm.unpin_host_pin(vm.id, pin.id)
        out = kvm.set_guest_memfd_memory_attributes(vm.id, fd, offset=0, size=4 * PAGE, attributes=8)
        assert not out.noop and not out.invalidated  # no slot binds the file
