// SPDX-License-Identifier: GPL-2.0
/*
 * The vCPU-free tests of the kernel's own set_memory_region_test.c, run unchanged: its main() runs
 * vCPU tests first (test_zero_memory_regions() needs KVM_RUN), which kvm-memattr exec cannot
 * serve, so this main() calls the others itself. Built inside the kernel's
 * tools/testing/selftests/kvm by scripts/selftests.sh; nothing of the kernel tree is kept here.
 */
#define main set_memory_region_test_main
#include "set_memory_region_test.c"
#undef main

int main(int argc, char *argv[])
{
	test_invalid_memory_region_flags();
	test_add_max_memory_regions();
	/* Unlike upstream's main(), no quiet skip: the profile must have what these test. */
	TEST_ASSERT(kvm_has_cap(KVM_CAP_GUEST_MEMFD) &&
		    (kvm_check_cap(KVM_CAP_VM_TYPES) & BIT(KVM_X86_SW_PROTECTED_VM)),
		    "the host profile lacks KVM_CAP_GUEST_MEMFD or KVM_X86_SW_PROTECTED_VM");
	test_add_private_memory_region();
	test_add_overlapping_private_memory_regions();
	pr_info("set_memory_region_test: the 4 vCPU-free tests passed\n");
	return 0;
}
