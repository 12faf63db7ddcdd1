/*
 * What one small frame costs the sender with each system call a hub could
 * write it with: writev (header and payload apart, as wshub wrote before
 * commit 64d1e6d), sendmsg (the same two slices), send and write (one
 * buffer: wshub now, for batches up to 16 KiB, uWS, and the benchmark's
 * floor). 4,000 loopback connections, 62-byte
 * frames, rounds of one write per connection; the sender's thread CPU
 * (user + system, which on loopback includes the receiving side's
 * softirq work) per call, the four calls interleaved over 12 repetitions.
 *
 *     cc -O2 -o /tmp/syscall-cost bench/misc/syscall-cost.c && (ulimit -n 8200 && /tmp/syscall-cost)
 *
 * Needs 8,000 open files (`ulimit -n 8200`). Loopback only; bounded.
 * bench/README.md shows the command; docs/architecture.md ("The delivery
 * path") what it showed and what it did not.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define N 4000
#define ROUNDS 60
#define REPS 12

static int srv[N], cli[N];

static double thread_cpu(void) {
    struct rusage r;
    getrusage(RUSAGE_THREAD, &r);
    return r.ru_utime.tv_sec + r.ru_stime.tv_sec + (r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6;
}

int main(void) {
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    if (bind(l, (void *)&a, sizeof a) || listen(l, 4096) || getsockname(l, (void *)&a, &al)) {
        perror("listen");
        return 1;
    }
    for (int i = 0; i < N; i++) {
        int one = 1;
        cli[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (cli[i] < 0 || connect(cli[i], (void *)&a, sizeof a) || (srv[i] = accept(l, 0, 0)) < 0) {
            perror("connect (ulimit -n 8200?)");
            return 1;
        }
        setsockopt(srv[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    char hdr[2] = {(char)0x81, 60}, pay[60], whole[62], drain[1 << 16];
    memset(pay, 'x', sizeof pay);
    memcpy(whole, hdr, 2);
    memcpy(whole + 2, pay, 60);
    const char *names[4] = {"writev (2 slices)", "sendmsg (2 slices)", "send (1 buffer)", "write (1 buffer)"};
    double cpu[4] = {0};
    long calls[4] = {0};
    for (int rep = 0; rep < REPS; rep++) {
        int m = rep % 4;
        double t0 = thread_cpu();
        for (int r = 0; r < ROUNDS; r++)
            for (int i = 0; i < N; i++) {
                struct iovec iov[2] = {{hdr, 2}, {pay, 60}};
                struct msghdr mh = {.msg_iov = iov, .msg_iovlen = 2};
                if (m == 0) writev(srv[i], iov, 2);
                else if (m == 1) sendmsg(srv[i], &mh, MSG_NOSIGNAL);
                else if (m == 2) send(srv[i], whole, sizeof whole, MSG_NOSIGNAL);
                else write(srv[i], whole, sizeof whole);
            }
        cpu[m] += thread_cpu() - t0;
        calls[m] += (long)ROUNDS * N;
        for (int i = 0; i < N; i++)
            while (recv(cli[i], drain, sizeof drain, MSG_DONTWAIT) > 0) {
            }
    }
    for (int m = 0; m < 4; m++)
        printf("%-20s %6.3f us per call (%.2f x writev)\n", names[m], cpu[m] / calls[m] * 1e6,
               (cpu[m] / calls[m]) / (cpu[0] / calls[0]));
    return 0;
}
