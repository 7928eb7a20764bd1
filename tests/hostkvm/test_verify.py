"""verify-host against this machine's /dev/kvm (``pytest -m host``; skipped without a usable device)."""

from __future__ import annotations

import collections
import json
import os

import pytest

from app.cli import main
from app.core.kvm import AddressSpace, Memslot
from app.core.kvm import Kvm as StructKvm
from app.hostkvm import verify as v
from app.hostkvm.ioctls import HostKvmError, Kvm
from app.hostkvm.steps import SetMemslot
from app.models.host import PROFILES, HostProfile

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no usable /dev/kvm on this machine"),
]


@pytest.fixture(scope="module")
def kvm() -> Kvm:
    return Kvm()


@pytest.fixture(scope="module")
def profile(kvm: Kvm) -> HostProfile:
    return v.read_profile(kvm)


def test_profile(kvm: Kvm, profile: HostProfile) -> None:
    assert kvm.api_version() == 12
    assert 1 <= profile.address_spaces <= 2 and profile.caps.KVM_CAP_NR_MEMSLOTS == 32764
    assert 0 < profile.max_gfn < 1 << 52
    assert profile.release == os.uname().release and profile.kernel == "6.18"
    # The CI machines are one of the two 6.18 pvm hosts the project ships a profile of.
    if "fc" in profile.release:
        shipped = PROFILES["pvm-6.18-gmem" if profile.caps.KVM_CAP_GUEST_MEMFD else "pvm-6.18"]
        assert (profile.caps, profile.max_gfn) == (shipped.caps, shipped.max_gfn)


def test_the_ioctl_layer_returns_the_kernels_errno(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    try:
        vm.set_user_memory_region2(0, 0, 0x1_0000_0000, 0x200000, 0x1000_0000)
        with pytest.raises(HostKvmError) as overlap:
            vm.set_user_memory_region2(1, 0, 0x1_0010_0000, 0x200000, 0x2000_0000)
        assert overlap.value.errno_name == "EEXIST"
        with pytest.raises(HostKvmError) as unaligned:
            vm.set_user_memory_region2(2, 0, 0x800, 0x1000, 0x3000_0000)
        assert unaligned.value.errno_name == "EINVAL"
        if kvm.check_extension(234):  # KVM_CAP_GUEST_MEMFD
            fd = vm.create_guest_memfd(0x200000)
            assert fd > 2
            os.close(fd)
        else:
            with pytest.raises(HostKvmError) as no_gmem:
                vm.create_guest_memfd(0x200000)
            assert no_gmem.value.errno_name == "ENOTTY"
    finally:
        vm.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_the_engine_agrees_with_the_host(kvm: Kvm, profile: HostProfile, seed: int) -> None:
    seen: collections.Counter[str] = collections.Counter()
    report = list(v.verify(kvm, profile, 4000, seed))[-1]
    assert report.steps >= 4000
    assert report.divergences == [], [d.steps for d in report.divergences]
    assert {t for t, _, _ in report.vm_types} == {"default", "sw_protected", "sev", "sev_es", "snp", "tdx"}
    # The sequences reach every kind of answer, not only EINVAL.
    rng_outcomes = v.run_sequence(kvm, profile, v.Generator(__import__("random").Random(seed), profile).sequence(400))
    seen.update(theirs for _, theirs in rng_outcomes.results)
    assert {"ok", "EINVAL", "EEXIST"} <= seen.keys()


def test_a_planted_bug_is_found_and_shrunk(kvm: Kvm, profile: HostProfile, monkeypatch: pytest.MonkeyPatch) -> None:
    """Allow overlapping memslots in the engine: verify-host must report it in at most 3 steps."""

    def never_overlaps(self: AddressSpace, start: int, end: int, exclude: Memslot | None) -> bool:
        return False

    monkeypatch.setattr(AddressSpace, "overlaps_other", never_overlaps)
    report = None
    for report in v.verify(kvm, profile, 2000, 1):
        if report.divergences:
            break
    assert report is not None and report.divergences
    d = report.divergences[0]
    assert len(d.steps) <= 3
    mine, theirs = d.results[-1]
    assert theirs == "EEXIST" and mine != "EEXIST", d
    lines = v.cli_lines(d)
    assert lines[0].startswith("VM=$(kvm-memattr") and sum("memslot set" in line for line in lines) >= 2


def test_a_host_feature_the_engine_ignores_is_found(
    kvm: Kvm, profile: HostProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plant a bug in the profile's use: the engine accepts KVM_MEM_GUEST_MEMFD on a host without
    guest_memfd (on a host with it, the engine refuses it instead). Found in at most 3 steps."""
    has_gmem = bool(profile.caps.KVM_CAP_GUEST_MEMFD)
    monkeypatch.setattr(StructKvm, "gmem_slots", property(lambda self: not has_gmem))
    report = None
    for report in v.verify(kvm, profile, 2000, 1):
        if report.divergences:
            break
    assert report is not None and report.divergences
    d = report.divergences[0]
    assert len(d.steps) <= 3 and isinstance(d.steps[-1], SetMemslot) and d.steps[-1].flags & 4, d


def test_cli_json_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "verify-host", "--steps", "300", "--seed", "5"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["divergences"] == [] and doc["steps"] >= 300 and doc["profile"]["kernel"] == "6.18"
    assert doc["checked"] and doc["not_checked"] and len(doc["vm_types"]) == 6
    assert main(["--json", "host-profile"]) == 0
    measured = HostProfile.model_validate_json(capsys.readouterr().out)
    assert measured.model_dump(mode="json") == doc["profile"]
    assert main(["verify-host", "--device", "/nonexistent/kvm"]) == 2
    err = capsys.readouterr().err
    assert "needs a usable KVM device" in err and "Traceback" not in err
