"""Host profiles over HTTP: listed, chosen per VM (by name or as a document), the service default,
and every rule a profile field changes answering with the kernel's errno."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.core.engine import Engine
from app.core.journal import SqliteJournal
from app.main import create_app
from app.models.host import PROFILES
from app.settings import ProfileError, Settings
from tests.api.conftest import GIB4, HVA, assert_problem
from tests.inprocess import TestClient

PVM = {"type": "default", "semantics": "linux", "profile": "pvm-6.18"}


def _vm(client: TestClient, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/vms", json=body)
    assert r.status_code == 201, r.text
    vm: dict[str, Any] = r.json()
    return vm


def test_the_shipped_profiles_are_listed_and_fetched(client: TestClient) -> None:
    doc = client.get("/v1/host-profiles").json()
    assert doc["default"] == "linux-6.18"
    assert [p["name"] for p in doc["profiles"]] == list(PROFILES)
    one = client.get("/v1/host-profiles/pvm-6.18").json()
    assert one == PROFILES["pvm-6.18"].model_dump(mode="json")
    assert (one["caps"]["KVM_CAP_GUEST_MEMFD"], one["caps"]["KVM_CAP_MULTI_ADDRESS_SPACE"]) == (0, 0)
    assert_problem(client.get("/v1/host-profiles/nope"), 404, "ENOENT")


def test_a_vm_shows_and_answers_as_its_host(client: TestClient) -> None:
    vm = _vm(client, **PVM)
    assert (vm["profile"], vm["kernel"], vm["address_spaces"]) == ("pvm-6.18", "6.18", 1)
    caps = client.get(f"/v1/vms/{vm['id']}/capabilities").json()
    assert caps["profile"]["name"] == "pvm-6.18" and [t["name"] for t in caps["vm_types"]] == ["default"]
    assert {k: caps["caps"][k] for k in ("KVM_CAP_GUEST_MEMFD", "KVM_CAP_GUEST_MEMFD_FLAGS")} == {
        "KVM_CAP_GUEST_MEMFD": 0,
        "KVM_CAP_GUEST_MEMFD_FLAGS": 0,
    }
    assert (caps["caps"]["KVM_CAP_MEMORY_ATTRIBUTES"], caps["caps"]["KVM_CAP_MULTI_ADDRESS_SPACE"]) == (0, 0)
    # Beside it, a VM of the default host still has everything.
    full = client.get(f"/v1/vms/{_vm(client, type='default', semantics='linux')['id']}/capabilities").json()
    assert (full["caps"]["KVM_CAP_GUEST_MEMFD"], full["caps"]["KVM_CAP_GUEST_MEMFD_FLAGS"]) == (1, 3)
    assert full["caps"]["KVM_CAP_MULTI_ADDRESS_SPACE"] == 2


def test_what_the_host_lacks_fails_with_the_kernels_errno_and_changes_nothing(client: TestClient) -> None:
    vm = _vm(client, **PVM)["id"]
    before = client.get(f"/v1/vms/{vm}/snapshot").json()
    # No CONFIG_KVM_GUEST_MEMFD: the ioctl does not exist, the memslot flag is not valid.
    assert_problem(client.post(f"/v1/vms/{vm}/guest-memfds", json={"size": "0x200000"}), 400, "ENOTTY")
    body = {"flags": 4, "guest_phys_addr": hex(GIB4), "memory_size": "0x200000", "userspace_addr": hex(HVA)}
    assert_problem(client.put(f"/v1/vms/{vm}/memslots/0", json=body), 422, "EINVAL")
    # No memory attributes: ENOTTY before any argument is looked at (flags 1 would be EINVAL).
    attrs = {"address": hex(GIB4), "size": "0x1000", "attributes": 0, "flags": 1}
    assert_problem(client.put(f"/v1/vms/{vm}/memory-attributes", json=attrs), 400, "ENOTTY")
    # One address space (no SMM), and no TDP for prefault.
    body = {"flags": 0, "guest_phys_addr": hex(GIB4), "memory_size": "0x200000", "userspace_addr": hex(HVA)}
    assert_problem(client.put(f"/v1/vms/{vm}/memslots/{1 << 16}", json=body), 422, "EINVAL")
    assert client.put(f"/v1/vms/{vm}/memslots/0", json=body).status_code == 200
    pre = client.post(f"/v1/vms/{vm}/prefault", json={"gpa": hex(GIB4), "size": "0x1000"})
    assert_problem(pre, 400, "EOPNOTSUPP")
    after = client.get(f"/v1/vms/{vm}/snapshot").json()
    assert [m["id"] for m in after["memslots"]] == [0] and after["files"] == before["files"] == []
    assert after["invalidation"] == before["invalidation"]


def test_vm_types_and_profile_names_are_checked(client: TestClient) -> None:
    r = client.post("/v1/vms", json={**PVM, "type": "tdx"})
    assert "KVM_CAP_VM_TYPES" in assert_problem(r, 422, "EINVAL")["detail"]
    assert _vm(client, type="tdx", semantics="linux", profile="tdx-6.18")["type"] == "tdx"
    assert_problem(client.post("/v1/vms", json={**PVM, "type": "snp", "profile": "tdx-6.18"}), 422, "EINVAL")
    assert (
        "GET /v1/host-profiles"
        in assert_problem(client.post("/v1/vms", json={"profile": "x"}), 422, "EINVAL")["detail"]
    )
    # rfc-v9 is a patch series, not one of these hosts: its VM types are its own.
    assert _vm(client, type="sw_protected", semantics="rfc-v9", profile="pvm-6.18")["profile"] == "pvm-6.18"
    assert client.get("/v1/vms").json()["vms"][0]["profile"] == "tdx-6.18"


def test_a_vm_from_a_recorded_profile_document(client: TestClient) -> None:
    doc = {**PROFILES["pvm-6.18-gmem"].model_dump(mode="json"), "name": "my-prod-host", "release": "6.18.44-x"}
    vm = _vm(client, type="default", semantics="linux", profile=doc)
    assert vm["profile"] == "my-prod-host"
    assert client.get(f"/v1/vms/{vm['id']}/capabilities").json()["profile"] == doc
    fd = client.post(f"/v1/vms/{vm['id']}/guest-memfds", json={"size": "0x200000", "flags": 3})
    assert fd.status_code == 201, fd.text  # this host has guest_memfd, MMAP and INIT_SHARED
    bad = {**doc, "caps": {**doc["caps"], "KVM_CAP_VM_TYPES": 2}}  # no default VM: no such host
    assert client.post("/v1/vms", json={"profile": bad}).status_code == 422
    # The snapshot carries the document: an import is the same host.
    snap = client.get(f"/v1/vms/{vm['id']}/snapshot").json()
    assert snap["profile"] == doc
    assert client.post("/v1/vms/import", json=snap).json()["profile"] == "my-prod-host"


def test_a_version_1_snapshot_loads_as_the_default_host(client: TestClient) -> None:
    vm = _vm(client, type="default", semantics="linux")["id"]
    snap = client.get(f"/v1/vms/{vm}/snapshot").json()
    old = {**{k: v for k, v in snap.items() if k != "profile"}, "version": 1}
    assert client.post("/v1/vms/import", json=old).json()["profile"] == "linux-6.18"
    assert_problem(client.post("/v1/vms/import", json={**snap, "version": 1}), 422, "EINVAL")
    assert_problem(client.post("/v1/vms/import", json={**old, "version": 2}), 422, "EINVAL")


def test_the_service_default_profile(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(log_level="warning", profile="pvm-6.18"))) as c:
        caps = c.get("/v1/capabilities").json()
        assert caps["profile"]["name"] == "pvm-6.18" and caps["caps"]["KVM_CAP_GUEST_MEMFD"] == 0
        assert [t["name"] for t in caps["vm_types"]] == ["default"]
        assert c.get("/v1/host-profiles").json()["default"] == "pvm-6.18"
        assert _vm(c, type="default", semantics="linux")["profile"] == "pvm-6.18"
    path = tmp_path / "host.json"
    path.write_text(json.dumps({"name": "recorded", "max_gfn": 0xFFFFF}))
    custom = Settings(profile=str(path), address_spaces=1)
    host = custom.host_profile()
    assert (host.name, host.max_gfn, host.address_spaces) == ("recorded-custom", 0xFFFFF, 1)
    with TestClient(create_app(Settings(log_level="warning", profile=str(path)))) as c:
        names = [p["name"] for p in c.get("/v1/host-profiles").json()["profiles"]]
        assert names[-1] == "recorded" and c.get("/v1/host-profiles/recorded").status_code == 200
    for bad, why in ((tmp_path / "missing.json", "nor a file"), (tmp_path / "bad.json", "not a host profile")):
        (tmp_path / "bad.json").write_text('{"name": "x", "caps": {"KVM_CAP_GUEST_MEMFD": 2}}')
        with pytest.raises(ProfileError, match=why) as e:
            Settings(profile=str(bad)).host_profile()
        assert "\n" not in str(e.value)


def test_a_restart_keeps_each_vms_host_whatever_the_new_default(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite3"
    first = Engine()
    first.attach_journal(SqliteJournal(db))
    with TestClient(create_app(Settings(log_level="warning"), first)) as c:
        vm = _vm(c, **PVM)["id"]
    restarted = Engine(host=PROFILES["tdx-6.18"])
    restarted.restore(SqliteJournal(db))
    assert restarted.vm(vm).model().profile == "pvm-6.18"


def test_in_place_conversion_is_a_7_4_host_setting_with_its_capabilities() -> None:
    """gmem_in_place_conversion needs a 7.4 kernel with guest_memfd, and the host then answers
    KVM_CAP_MEMORY_ATTRIBUTES 0 and KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES 8; nothing else does."""
    from pydantic import ValidationError

    from app.models.host import HostProfile

    good = PROFILES["linux-7.4-in-place"].model_dump()
    assert HostProfile.model_validate(good).gmem_in_place_conversion
    for change in (
        {"kernel": "7.3"},
        {"caps": {**good["caps"], "KVM_CAP_MEMORY_ATTRIBUTES": 8}},
        {"caps": {**good["caps"], "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES": 0}},
        {"gmem_in_place_conversion": False},  # the capability without the mode
    ):
        with pytest.raises(ValidationError):
            HostProfile.model_validate({**good, **change})


def test_a_measured_host_reads_the_module_parameter(tmp_path: Path) -> None:
    from app.hostkvm.verify import read_module_param

    param = tmp_path / "gmem_in_place_conversion"
    assert read_module_param(param) is None  # an older kernel has no such parameter
    param.write_text("Y\n")
    assert read_module_param(param) == "Y"


def test_an_attributes_capability_is_0_or_8_and_never_a_bool() -> None:
    """Literal[0, 8] let false through as 0 (schemathesis found it on a POST /v1/vms profile)."""
    from pydantic import ValidationError

    from app.models.host import HostCaps

    for name in ("KVM_CAP_MEMORY_ATTRIBUTES", "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES"):
        for bad in (False, True, 4, 16):
            with pytest.raises(ValidationError):
                HostCaps.model_validate({"KVM_CAP_VM_TYPES": 1, name: bad})
        assert getattr(HostCaps.model_validate({"KVM_CAP_VM_TYPES": 1, name: 0}), name) == 0
