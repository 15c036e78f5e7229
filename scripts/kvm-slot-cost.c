/* What a local hand-over's memory mapping costs in KVM alone, without Ferry: create a VM,
 * register a memory slot of N GiB over anonymous memory, then map a memfd over it with
 * MAP_FIXED (what the destination of `migrate --local` does), and for comparison delete
 * the slot and create it again over a fresh mapping. BENCHMARKS.md ("local") quotes it.
 *
 *   gcc -O2 -o /tmp/kvm-slot-cost scripts/kvm-slot-cost.c && /tmp/kvm-slot-cost 8
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

int main(int argc, char **argv) {
    size_t gib = argc > 1 ? strtoul(argv[1], NULL, 10) : 1;
    size_t len = gib << 30;
    int kvm = open("/dev/kvm", O_RDWR);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    char *anon = mmap(NULL, len, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (anon == MAP_FAILED) die("mmap");
    int mfd = memfd_create("guest", 0);
    if (mfd < 0 || ftruncate(mfd, len)) die("memfd");
    struct kvm_userspace_memory_region r = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = len,
        .userspace_addr = (unsigned long)anon};
    double t0 = now_ms();
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r)) die("create slot");
    double t1 = now_ms();
    if (mmap(anon, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, mfd, 0) == MAP_FAILED)
        die("mmap fixed");
    double t2 = now_ms();
    r.memory_size = 0;
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r)) die("delete slot");
    double t3 = now_ms();
    char *fresh = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (fresh == MAP_FAILED) die("mmap");
    r.memory_size = len;
    r.userspace_addr = (unsigned long)fresh;
    double t4 = now_ms();
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r)) die("create slot again");
    double t5 = now_ms();
    printf("%zu GiB: create slot %.2f ms, map a memfd over the slot %.2f ms, delete slot %.2f ms, "
           "create it again %.2f ms\n", gib, t1 - t0, t2 - t1, t3 - t2, t5 - t4);
    return 0;
}
