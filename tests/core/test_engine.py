from __future__ import annotations

import pytest

from app.core import Engine, EngineLimits
from app.core.errors import ENOENT, ENOMEM
from app.models.vm import VmCreate


def test_create_list_destroy() -> None:
    engine = Engine()
    vm = engine.create_vm(VmCreate(name="a"))
    assert engine.vm(vm.id) is vm and len(engine) == 1
    model = vm.model()
    assert (model.type.value, model.type_value, model.semantics.value, model.address_spaces) == (
        "sw_protected",
        1,
        "rfc-v9",
        2,
    )
    engine.destroy_vm(vm.id)
    with pytest.raises(ENOENT):
        engine.vm(vm.id)
    with pytest.raises(ENOENT):
        engine.destroy_vm(vm.id)


def test_vm_limit() -> None:
    engine = Engine(EngineLimits(max_vms=1))
    engine.create_vm(VmCreate())
    with pytest.raises(ENOMEM):
        engine.create_vm(VmCreate())


@pytest.mark.parametrize(
    ("vm_type", "semantics", "attrs", "nr_as"),
    [
        ("sw_protected", "linux", 8, 1),
        ("snp", "linux", 8, 1),
        ("default", "linux", 0, 2),
        ("sw_protected", "rfc-v9", 0, 2),
    ],
)
def test_capabilities(vm_type: str, semantics: str, attrs: int, nr_as: int) -> None:
    engine = Engine()
    system = engine.capabilities()
    assert system["caps"]["KVM_CAP_VM_TYPES"] == 0x3F and system["caps"]["KVM_CAP_MEMORY_ATTRIBUTES"] == 8
    assert system["caps"]["KVM_CAP_MULTI_ADDRESS_SPACE"] == 2
    vm = engine.create_vm(VmCreate(type=vm_type, semantics=semantics))  # type: ignore[arg-type]
    caps = engine.vm_capabilities(vm.id)["caps"]
    assert (caps["KVM_CAP_MEMORY_ATTRIBUTES"], caps["KVM_CAP_MULTI_ADDRESS_SPACE"]) == (attrs, nr_as)


def test_max_gfn_must_fit() -> None:
    with pytest.raises(ValueError):
        EngineLimits(max_gfn=1 << 52)
