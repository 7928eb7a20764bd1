// kvmprobe: a small KVM client for the bridge's tests. It drives /dev/kvm the way a VMM does and
// prints one line per call, "name = result", where result is the return value or the errno name:
// nothing that differs between a real /dev/kvm and the bridge by design (fd numbers, pointers), so
// the output of two runs can be compared line for line. Its own uapi definitions: the build host's
// linux-libc-dev may predate guest_memfd.
//
//   kvmprobe memory        the script: capabilities, memslots, attributes, guest_memfd, vCPU, errnos
//   kvmprobe raw           the same first calls as raw `syscall` instructions (no libc wrapper)
//   kvmprobe threads N     N threads converting and adding memslots on one VM at once
//   kvmprobe run           KVM_RUN on a fresh vCPU
//   kvmprobe spin          KVM_CHECK_EXTENSION forever (prints "spinning" first)
//   kvmprobe time N        microseconds per call of a few calls, N each (bench/bridge.py)
//   kvmprobe mmap          an MMAP | INIT_SHARED guest_memfd written, read and punched through a mapping
//   kvmprobe wait          a VM with a guest_memfd slot and a private range; then, a line of stdin
//                          each: dup the guest_memfd and close the first fd, close the dup, exit
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define KVMIO 0xAE
struct region { uint32_t slot, flags; uint64_t gpa, size, hva; };
struct region2 { uint32_t slot, flags; uint64_t gpa, size, hva, gmem_offset; uint32_t gmem_fd, pad1; uint64_t pad2[14]; };
struct attributes { uint64_t address, size, attributes, flags; };
struct attributes2 { uint64_t offset, size, attributes, flags, error_offset, reserved[11]; };
struct create_gmem { uint64_t size, flags, reserved[6]; };
struct pre_fault { uint64_t gpa, size, flags, padding[5]; };

#define GET_API_VERSION _IO(KVMIO, 0x00)
#define CREATE_VM _IO(KVMIO, 0x01)
#define CHECK_EXTENSION _IO(KVMIO, 0x03)
#define GET_VCPU_MMAP_SIZE _IO(KVMIO, 0x04)
#define CREATE_VCPU _IO(KVMIO, 0x41)
#define SET_REGION _IOW(KVMIO, 0x46, struct region)
#define SET_REGION2 _IOW(KVMIO, 0x49, struct region2)
#define RUN _IO(KVMIO, 0x80)
#define SET_ATTRIBUTES _IOW(KVMIO, 0xd2, struct attributes)
#define SET_ATTRIBUTES2 _IOWR(KVMIO, 0xd2, struct attributes2)
#define CREATE_GMEM _IOWR(KVMIO, 0xd4, struct create_gmem)
#define PRE_FAULT _IOWR(KVMIO, 0xd5, struct pre_fault)

enum { CAP_NR_MEMSLOTS = 10, CAP_READONLY_MEM = 81, CAP_MULTI_AS = 118, CAP_USER_MEMORY2 = 231,
       CAP_MEMORY_ATTRIBUTES = 233, CAP_GUEST_MEMFD = 234, CAP_VM_TYPES = 235, CAP_PRE_FAULT = 236,
       CAP_GUEST_MEMFD_FLAGS = 244 };
static const int caps[] = { 3, CAP_NR_MEMSLOTS, CAP_READONLY_MEM, CAP_MULTI_AS, CAP_USER_MEMORY2, 232,
                            CAP_MEMORY_ATTRIBUTES, CAP_GUEST_MEMFD, CAP_VM_TYPES, CAP_PRE_FAULT,
                            CAP_GUEST_MEMFD_FLAGS };
#define MiB (1ull << 20)
#define GiB (1ull << 30)

static long show(const char *name, long rc)
{
	if (rc < 0)
		printf("%s = %s\n", name, strerrorname_np(errno));
	else
		printf("%s = %ld\n", name, rc);
	return rc;
}

static long region2(int vm, uint32_t slot, uint32_t flags, uint64_t gpa, uint64_t size, void *hva, int gmem, uint64_t off)
{
	struct region2 r = { .slot = slot, .flags = flags, .gpa = gpa, .size = size,
			     .hva = (uint64_t)(uintptr_t)hva, .gmem_offset = off, .gmem_fd = (uint32_t)gmem };
	return ioctl(vm, SET_REGION2, &r);
}

static long region1(int vm, uint32_t slot, uint32_t flags, uint64_t gpa, uint64_t size, void *hva)
{
	struct region r = { .slot = slot, .flags = flags, .gpa = gpa, .size = size, .hva = (uint64_t)(uintptr_t)hva };
	return ioctl(vm, SET_REGION, &r);
}

static long attrs(int vm, uint64_t address, uint64_t size, uint64_t attributes, uint64_t flags)
{
	struct attributes a = { address, size, attributes, flags };
	return ioctl(vm, SET_ATTRIBUTES, &a);
}

static int gmem(int vm, uint64_t size, uint64_t flags)
{
	struct create_gmem g = { .size = size, .flags = flags };
	return ioctl(vm, CREATE_GMEM, &g);
}

static int open_kvm(void)
{
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) {
		perror("/dev/kvm");
		exit(2);
	}
	return kvm;
}

static void memory(void)
{
	char name[64];
	int kvm = open_kvm();
	void *mem = mmap(NULL, 8 * MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

	show("KVM_GET_API_VERSION", ioctl(kvm, GET_API_VERSION, 0));
	show("KVM_GET_API_VERSION(1)", ioctl(kvm, GET_API_VERSION, 1));
	for (size_t i = 0; i < sizeof(caps) / sizeof(caps[0]); i++) {
		snprintf(name, sizeof(name), "KVM_CHECK_EXTENSION(%d)", caps[i]);
		show(name, ioctl(kvm, CHECK_EXTENSION, caps[i]));
	}
	long types = ioctl(kvm, CHECK_EXTENSION, CAP_VM_TYPES);
	show("KVM_CREATE_VM(31)", ioctl(kvm, CREATE_VM, 31));
	int type = types & 2 ? 1 : 0; /* KVM_X86_SW_PROTECTED_VM where there is one */
	int vm = ioctl(kvm, CREATE_VM, type);
	show("KVM_CREATE_VM", vm < 0 ? vm : type);
	if (vm < 0)
		exit(1);
	for (size_t i = 0; i < sizeof(caps) / sizeof(caps[0]); i++) {
		snprintf(name, sizeof(name), "vm KVM_CHECK_EXTENSION(%d)", caps[i]);
		show(name, ioctl(vm, CHECK_EXTENSION, caps[i]));
	}
	long nr_slots = ioctl(kvm, CHECK_EXTENSION, CAP_NR_MEMSLOTS);

	/* memslots */
	show("region slot 0", region1(vm, 0, 0, 0, 2 * MiB, mem));
	show("region v1 GUEST_MEMFD", region1(vm, 1, 4, 16 * MiB, 2 * MiB, mem));
	show("region unaligned size", region1(vm, 1, 0, 16 * MiB, 2 * MiB + 1, mem));
	show("region overlap", region1(vm, 1, 0, MiB, 2 * MiB, mem));
	show("region move", region1(vm, 0, 0, 4 * MiB, 2 * MiB, mem));
	show("region resize", region1(vm, 0, 0, 4 * MiB, 4 * MiB, mem));
	show("region flags only", region1(vm, 0, 1, 4 * MiB, 2 * MiB, mem));
	show("region delete absent", region1(vm, 5, 0, 0, 0, mem));
	show("region slot id too big", region1(vm, (uint32_t)nr_slots, 0, 64 * MiB, 2 * MiB, mem));
	show("region as_id 2", region1(vm, 2 << 16, 0, 64 * MiB, 2 * MiB, mem));
	show("region hva above user", region1(vm, 1, 0, 64 * MiB, 2 * MiB, (void *)0x7ffffffff000ull));
	show("region bad pointer", ioctl(vm, SET_REGION, (void *)8));
	show("region2 slot 2", region2(vm, 2, 0, 32 * MiB, 2 * MiB, mem, 0, 0));
	show("region2 unknown flag", region2(vm, 3, 1u << 8, 48 * MiB, 2 * MiB, mem, 0, 0));

	/* attributes */
	show("attributes private", attrs(vm, 4 * GiB, 2 * MiB, 8, 0));
	show("attributes flags", attrs(vm, 4 * GiB, 2 * MiB, 8, 1));
	show("attributes unaligned", attrs(vm, 4 * GiB + 1, 2 * MiB, 8, 0));
	show("attributes size 0", attrs(vm, 4 * GiB, 0, 8, 0));
	show("attributes unknown bit", attrs(vm, 4 * GiB, 2 * MiB, 1, 0));
	show("attributes shared", attrs(vm, 4 * GiB, 2 * MiB, 0, 0));

	/* guest_memfd */
	show("gmem size 0", gmem(vm, 0, 0));
	show("gmem unaligned", gmem(vm, 4097, 0));
	show("gmem flag 63", gmem(vm, 4 * MiB, 1ull << 63));
	int g = gmem(vm, 4 * MiB, 0);
	show("gmem 4M", g < 0 ? g : 0);
	if (g >= 0) {
		struct stat st;
		char buf[8];
		show("gmem fstat", fstat(g, &st));
		show("gmem st_size", st.st_size);
		show("gmem read", read(g, buf, sizeof(buf)));
		show("gmem write", write(g, buf, sizeof(buf)));
		show("gmem mmap", mmap(NULL, 4096, PROT_READ, MAP_SHARED, g, 0) == MAP_FAILED ? -1 : 0);
		show("gmem fallocate", fallocate(g, FALLOC_FL_KEEP_SIZE, 0, 2 * MiB));
		show("gmem fallocate unaligned", fallocate(g, FALLOC_FL_KEEP_SIZE, 1, 4096));
		show("gmem fallocate past end", fallocate(g, FALLOC_FL_KEEP_SIZE, 4 * MiB, 4096));
		show("gmem fallocate no KEEP_SIZE", fallocate(g, 0, 0, 4096));
		show("gmem punch hole", fallocate(g, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, 4096));
		show("gmem SET_MEMORY_ATTRIBUTES2", ioctl(g, SET_ATTRIBUTES2, &(struct attributes2){ .size = 4096, .attributes = 8 }));
		show("bind", region2(vm, 10, 4, 4 * GiB, 2 * MiB, 0, g, 0));
		show("bind overlap in the file", region2(vm, 11, 4, 8 * GiB, 2 * MiB, 0, g, 0));
		show("bind past the file", region2(vm, 11, 4, 8 * GiB, 2 * MiB, 0, g, 3 * MiB));
		show("bind unaligned offset", region2(vm, 11, 4, 8 * GiB, 2 * MiB, 0, g, 4095));
		show("bind kvm fd", region2(vm, 11, 4, 8 * GiB, 2 * MiB, 0, kvm, 0));
		show("bind closed fd", region2(vm, 11, 4, 8 * GiB, 2 * MiB, 0, 999, 0));
		show("bind READONLY", region2(vm, 11, 4 | 2, 8 * GiB, 2 * MiB, 0, g, 2 * MiB));
		show("bind second half", region2(vm, 11, 4, 8 * GiB, 2 * MiB, 0, g, 2 * MiB));
		show("gmem close", close(g));
		show("gmem ioctl after close", ioctl(g, SET_ATTRIBUTES2, &(struct attributes2){ 0 }));
		g = gmem(vm, 2 * MiB, 0);
		show("rebind a new file", region2(vm, 12, 4, 12 * GiB, 2 * MiB, 0, g, 0));
		show("delete bound slot", region2(vm, 10, 4, 4 * GiB, 0, 0, -1, 0));
		close(g);
		/* a VM without private memory: guest_memfd slots since 6.18 only */
		int plain = ioctl(kvm, CREATE_VM, 0);
		g = gmem(plain, 2 * MiB, 0);
		show("default VM: gmem", g < 0 ? g : 0);
		show("default VM: bind", region2(plain, 0, 4, 0, 2 * MiB, 0, g, 0));
		close(g);
		close(plain);
	}

	/* vCPU */
	show("KVM_GET_VCPU_MMAP_SIZE", ioctl(kvm, GET_VCPU_MMAP_SIZE, 0));
	int vcpu = ioctl(vm, CREATE_VCPU, 0);
	show("KVM_CREATE_VCPU", vcpu < 0 ? vcpu : 0);
	show("KVM_CREATE_VCPU again", ioctl(vm, CREATE_VCPU, 0));
	struct pre_fault pf = { .gpa = 4 * GiB, .size = 4096, .flags = 1 };
	show("KVM_PRE_FAULT_MEMORY flags", ioctl(vcpu, PRE_FAULT, &pf));

	/* another process (another mm) */
	pid_t child = fork();
	if (child == 0) {
		show("child: vm KVM_CHECK_EXTENSION", ioctl(vm, CHECK_EXTENSION, CAP_USER_MEMORY2));
		show("child: region", region1(vm, 7, 0, 256 * MiB, 2 * MiB, mem));
		show("child: kvm KVM_GET_API_VERSION", ioctl(kvm, GET_API_VERSION, 0));
		fflush(stdout);
		_exit(0);
	}
	waitpid(child, NULL, 0);

	close(vcpu);
	show("vm close", close(vm));
	show("vm ioctl after close", ioctl(vm, CHECK_EXTENSION, 3));
	show("non-KVM ioctl on a pipe", ioctl(0, CHECK_EXTENSION, 3));
	close(kvm);
}

static long raw_syscall(long nr, long a, long b, long c, long d)
{
	long ret;
	register long r10 __asm__("r10") = d;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
	return ret;
}

static void raw(void)
{
	/* what a Go or Rust program without libc does: the syscall instruction itself */
	long kvm = raw_syscall(SYS_openat, AT_FDCWD, (long)"/dev/kvm", O_RDWR | O_CLOEXEC, 0);
	printf("raw openat = %s\n", kvm >= 0 ? "ok" : strerrorname_np((int)-kvm));
	printf("raw KVM_GET_API_VERSION = %ld\n", raw_syscall(SYS_ioctl, kvm, GET_API_VERSION, 0, 0));
	printf("raw KVM_CHECK_EXTENSION(USER_MEMORY2) = %ld\n", raw_syscall(SYS_ioctl, kvm, CHECK_EXTENSION, CAP_USER_MEMORY2, 0));
	long vm = raw_syscall(SYS_ioctl, kvm, CREATE_VM, 0, 0);
	printf("raw KVM_CREATE_VM = %s\n", vm >= 0 ? "ok" : strerrorname_np((int)-vm));
	struct region r = { .slot = 0, .gpa = 0, .size = 2 * MiB, .hva = 0x7f0000000000ull };
	printf("raw region = %ld\n", raw_syscall(SYS_ioctl, vm, SET_REGION, (long)&r, 0));
	r.size = 4097;
	printf("raw region unaligned = %s\n", strerrorname_np((int)-raw_syscall(SYS_ioctl, vm, SET_REGION, (long)&r, 0)));
	raw_syscall(SYS_close, vm, 0, 0, 0);
	raw_syscall(SYS_close, kvm, 0, 0, 0);
}

static int shared_vm;
static int per_thread;

static void *worker(void *arg)
{
	long id = (long)arg, wrong = 0;
	for (int i = 0; i < per_thread; i++) {
		uint64_t gpa = (uint64_t)(id + 1) * GiB;
		wrong += region1(shared_vm, (uint32_t)id, 0, gpa, 2 * MiB, (void *)0x7f0000000000ull) != 0;
		wrong += attrs(shared_vm, gpa, 2 * MiB, 0, 1) != -1 || errno != EINVAL;
		wrong += region1(shared_vm, (uint32_t)id, 0, gpa, 2 * MiB, (void *)0x7f0000000000ull) != 0; /* no change */
		wrong += region1(shared_vm, (uint32_t)id, 0, gpa, 0, (void *)0x7f0000000000ull) != 0;
	}
	return (void *)wrong;
}

static void threads(int n)
{
	int kvm = open_kvm();
	pthread_t t[64];
	long wrong = 0;
	shared_vm = ioctl(kvm, CREATE_VM, 0);
	per_thread = 250;
	for (long i = 0; i < n && i < 64; i++)
		pthread_create(&t[i], NULL, worker, (void *)i);
	for (int i = 0; i < n && i < 64; i++) {
		void *w;
		pthread_join(t[i], &w);
		wrong += (long)w;
	}
	printf("threads %d x %d x 4 calls, wrong answers = %ld\n", n, per_thread, wrong);
}

static void run(void)
{
	int kvm = open_kvm();
	int vm = ioctl(kvm, CREATE_VM, 0);
	int vcpu = ioctl(vm, CREATE_VCPU, 0);
	show("KVM_RUN", ioctl(vcpu, RUN, 0));
}

static void spin(void)
{
	int kvm = open_kvm();
	printf("spinning\n");
	fflush(stdout);
	for (;;)
		ioctl(kvm, CHECK_EXTENSION, CAP_USER_MEMORY2);
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static void timing(int n)
{
	int kvm = open_kvm();
	int vm = ioctl(kvm, CREATE_VM, 0);
	double t = now();
	for (int i = 0; i < n; i++)
		ioctl(kvm, CHECK_EXTENSION, CAP_USER_MEMORY2);
	printf("KVM_CHECK_EXTENSION = %.2f\n", (now() - t) / n * 1e6);
	t = now();
	for (int i = 0; i < n; i++) /* create, then delete: both change the memslots */
		if (region1(vm, 1, 0, 4 * GiB, i & 1 ? 0 : 2 * MiB, (void *)0x7f0000000000ull)) {
			perror("KVM_SET_USER_MEMORY_REGION");
			exit(1);
		}
	printf("KVM_SET_USER_MEMORY_REGION = %.2f\n", (now() - t) / n * 1e6);
	t = now();
	for (int i = 0; i < n; i++)
		attrs(vm, 4 * GiB, 2 * MiB, 0, 1); /* EINVAL (flags): a decoded, refused call */
	printf("KVM_SET_MEMORY_ATTRIBUTES (EINVAL) = %.2f\n", (now() - t) / n * 1e6);
	t = now();
	for (int i = 0; i < n; i++)
		close(open("/proc/self/stat", O_RDONLY));
	printf("open+close of another file = %.2f\n", (now() - t) / n * 1e6);
	t = now();
	for (int i = 0; i < n; i++)
		getppid();
	printf("getppid (untrapped) = %.2f\n", (now() - t) / n * 1e6);
}

static void map_gmem(void)
{
	int kvm = open_kvm();
	int vm = ioctl(kvm, CREATE_VM, 0);
	int g = gmem(vm, 2 * MiB, 1 | 2); /* GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED */
	if (show("gmem MMAP|INIT_SHARED", g < 0 ? g : 0) < 0)
		return;
	show("mmap MAP_PRIVATE", mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, g, 0) == MAP_FAILED ? -1 : 0);
	volatile char *p = mmap(NULL, 2 * MiB, PROT_READ | PROT_WRITE, MAP_SHARED, g, 0);
	show("mmap MAP_SHARED", p == MAP_FAILED ? -1 : 0);
	p[4096] = 42;
	show("read back", p[4096]);
	show("punch hole", fallocate(g, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 4096, 4096));
	show("read after punch", p[4096]);
	show("close while mapped", close(g));
	show("read after close", p[0]);
}

static void wait_stdin(void)
{
	char line[16];
	int kvm = open_kvm();
	int vm = ioctl(kvm, CREATE_VM, 1);
	int g = gmem(vm, 4 * MiB, 0);
	show("bind", region2(vm, 10, 4, 4 * GiB, 4 * MiB, (void *)0x7f0000000000ull, g, 0));
	show("attributes private", attrs(vm, 4 * GiB, 2 * MiB, 8, 0));
	printf("ready\n");
	if (!fgets(line, sizeof(line), stdin))
		return;
	int copy = dup(g);
	close(g);
	printf("dup closed\n");
	if (!fgets(line, sizeof(line), stdin))
		return;
	close(copy);
	printf("closed\n");
	if (!fgets(line, sizeof(line), stdin))
		return;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	const char *mode = argc > 1 ? argv[1] : "memory";
	if (!strcmp(mode, "memory"))
		memory();
	else if (!strcmp(mode, "raw"))
		raw();
	else if (!strcmp(mode, "threads"))
		threads(argc > 2 ? atoi(argv[2]) : 4);
	else if (!strcmp(mode, "run"))
		run();
	else if (!strcmp(mode, "spin"))
		spin();
	else if (!strcmp(mode, "time"))
		timing(argc > 2 ? atoi(argv[2]) : 10000);
	else if (!strcmp(mode, "mmap"))
		map_gmem();
	else if (!strcmp(mode, "wait"))
		wait_stdin();
	else
		return 2;
	return 0;
}
