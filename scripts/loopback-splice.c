/* What loopback TCP costs a migration's two ends here: one thread sends 1 GiB of populated
 * memory (one non-zero byte per cache line) to another in 1 MiB writes, and the receiver
 * reads it into its own memory in 1 MiB payloads, as Ferry's data channels do with their
 * 256-page batches. Modes:
 *   write        write(): the kernel copies each byte into its buffers;
 *   splice       vmsplice() + splice(): the kernel takes the pages by reference;
 *   write-lowat  write(), and the receiver raises SO_RCVLOWAT to the bytes of the payload
 *                still to come (at most 256 KiB) while it reads, so it is woken less often.
 * Prints wall time and each thread's CPU time, and checks the bytes. BENCHMARKS.md
 * ("migrate --pin") quotes it; `taskset -c 1` runs both threads on one CPU.
 *
 *   gcc -O2 -pthread -o /tmp/loopback-splice scripts/loopback-splice.c
 *   for m in write splice write-lowat; do /tmp/loopback-splice $m; done
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define SIZE (1UL << 30)
#define BATCH (1 << 20)

#define PAYLOAD (1 << 20)
#define LOWAT_MAX (256 * 1024)

static char *src, *dst;
static int listener, lowat;
static double receiver_cpu_ms;

static double ms(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void *receive(void *unused) {
    (void)unused;
    int c = accept(listener, NULL, NULL);
    if (c < 0)
        die("accept");
    double c0 = ms(CLOCK_THREAD_CPUTIME_ID);
    for (size_t off = 0; off < SIZE; off += PAYLOAD) {
        for (size_t got = 0; got < PAYLOAD;) {
            if (lowat) {
                int mark = PAYLOAD - got < LOWAT_MAX ? (int)(PAYLOAD - got) : LOWAT_MAX;
                if (setsockopt(c, SOL_SOCKET, SO_RCVLOWAT, &mark, sizeof mark))
                    die("SO_RCVLOWAT");
            }
            ssize_t n = read(c, dst + off + got, PAYLOAD - got);
            if (n <= 0)
                die("read");
            got += n;
        }
        if (lowat) {
            int one = 1;
            if (setsockopt(c, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof one))
                die("SO_RCVLOWAT");
        }
    }
    receiver_cpu_ms = ms(CLOCK_THREAD_CPUTIME_ID) - c0;
    if (close(c))
        die("close");
    return NULL;
}

static void send_write(int s, size_t off) {
    for (size_t w = 0; w < BATCH;) {
        ssize_t n = write(s, src + off + w, BATCH - w);
        if (n < 0)
            die("write");
        w += n;
    }
}

static void send_splice(int s, int pipe_rd, int pipe_wr, size_t off) {
    struct iovec v = {src + off, BATCH};
    while (v.iov_len) {
        ssize_t n = vmsplice(pipe_wr, &v, 1, 0);
        if (n < 0)
            die("vmsplice");
        v.iov_base = (char *)v.iov_base + n;
        v.iov_len -= n;
        for (ssize_t left = n; left;) {
            ssize_t k = splice(pipe_rd, NULL, s, NULL, left, SPLICE_F_MOVE | SPLICE_F_MORE);
            if (k <= 0)
                die("splice");
            left -= k;
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 2 ||
        (strcmp(argv[1], "write") && strcmp(argv[1], "splice") && strcmp(argv[1], "write-lowat"))) {
        fprintf(stderr, "usage: %s write|splice|write-lowat\n", argv[0]);
        return 2;
    }
    int splicing = !strcmp(argv[1], "splice");
    lowat = !strcmp(argv[1], "write-lowat");
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE;
    src = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, flags, -1, 0);
    dst = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (src == MAP_FAILED || dst == MAP_FAILED)
        die("mmap");
    for (size_t i = 0; i < SIZE; i += 64)
        src[i] = (char)(i * 7 + 1);

    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof a;
    listener = socket(AF_INET, SOCK_STREAM, 0);
    if (listener < 0 || bind(listener, (void *)&a, sizeof a) || listen(listener, 1) ||
        getsockname(listener, (void *)&a, &alen))
        die("listen");
    pthread_t rx;
    if (pthread_create(&rx, NULL, receive, NULL))
        die("pthread_create");
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0 || connect(s, (void *)&a, sizeof a))
        die("connect");
    int p[2];
    if (pipe(p) || fcntl(p[1], F_SETPIPE_SZ, 1 << 20) < 0)
        die("pipe");

    double t0 = ms(CLOCK_MONOTONIC), c0 = ms(CLOCK_THREAD_CPUTIME_ID);
    for (size_t off = 0; off < SIZE; off += BATCH) {
        if (splicing)
            send_splice(s, p[0], p[1], off);
        else
            send_write(s, off);
    }
    double sender_cpu_ms = ms(CLOCK_THREAD_CPUTIME_ID) - c0;
    if (pthread_join(rx, NULL))
        die("pthread_join");
    double wall_ms = ms(CLOCK_MONOTONIC) - t0;
    if (memcmp(src, dst, SIZE)) {
        fprintf(stderr, "the received bytes differ from the sent ones\n");
        return 1;
    }
    printf("%s: %.0f ms wall, sender CPU %.0f ms, receiver CPU %.0f ms, %.2f GB/s\n", argv[1],
           wall_ms, sender_cpu_ms, receiver_cpu_ms, SIZE / wall_ms / 1e6);
    return 0;
}
