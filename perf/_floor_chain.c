/* The machine's floor for a replicated write (``rpcfast-perf floor``).
 *
 * One client, one master and R backups, each its own process, over loopback UDP: the client
 * sends a 128-byte request to the master, the master sends it to every backup, each backup
 * answers with 16 bytes, and once all R have answered the master answers the client. Nobody
 * does any other work, so this is what the processes and the wake-ups alone cost on this host.
 * R = 0 is a plain request/response round trip (the shape of a read).
 *
 * usage: _floor_chain R MODE ITERATIONS SECONDS
 *   MODE: block (blocking recvfrom), yield (non-blocking recvfrom, sched_yield between tries),
 *         spin (non-blocking recvfrom in a tight loop)
 * Prints one JSON object: {"replicas", "mode", "count", "median_us", "p99_us", "truncated"}.
 * Bounded: at most ITERATIONS timed round trips and about SECONDS of timing; a round trip
 * that takes over a second ends the run. Every child dies with its parent (PR_SET_PDEATHSIG).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_REPLICAS 8
#define WARMUP 500

enum { BLOCK, YIELD, SPIN };
static int mode;

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec / 1e3;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

/* A socket bound to an ephemeral loopback port; its port in *port. */
static int open_socket(unsigned short *port) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) die("socket");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(s, (struct sockaddr *)&a, sizeof a)) die("bind");
    socklen_t len = sizeof a;
    if (getsockname(s, (struct sockaddr *)&a, &len)) die("getsockname");
    *port = ntohs(a.sin_port);
    return s;
}

static void send_to(int s, unsigned short port, const char *buf, size_t n) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (sendto(s, buf, n, 0, (struct sockaddr *)&a, sizeof a) < 0) die("sendto");
}

/* One datagram; the sender's port in *from (if given). -1 on the client's timeout. */
static ssize_t receive(int s, char *buf, size_t n, unsigned short *from) {
    struct sockaddr_in a;
    for (;;) {
        socklen_t len = sizeof a;
        ssize_t r = recvfrom(s, buf, n, mode == BLOCK ? 0 : MSG_DONTWAIT, (struct sockaddr *)&a, &len);
        if (r >= 0) {
            if (from) *from = ntohs(a.sin_port);
            return r;
        }
        /* non-blocking: nothing yet; blocking: only the client's SO_RCVTIMEO ends here */
        if ((errno == EAGAIN || errno == EWOULDBLOCK) && mode != BLOCK) {
            if (mode == YIELD) sched_yield();
            continue;
        }
        if (errno == EINTR) continue;
        return -1;
    }
}

static pid_t child(void) {
    pid_t parent = getpid();
    pid_t p = fork();
    if (p < 0) die("fork");
    if (p == 0) {
        if (prctl(PR_SET_PDEATHSIG, SIGKILL)) die("prctl");
        if (getppid() != parent) _exit(0);
    }
    return p;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s R block|yield|spin ITERATIONS SECONDS\n", argv[0]);
        return 2;
    }
    int replicas = atoi(argv[1]);
    if (!strcmp(argv[2], "block")) mode = BLOCK;
    else if (!strcmp(argv[2], "yield")) mode = YIELD;
    else if (!strcmp(argv[2], "spin")) mode = SPIN;
    else {
        fprintf(stderr, "unknown mode %s\n", argv[2]);
        return 2;
    }
    long iterations = atol(argv[3]);
    double seconds = atof(argv[4]);
    if (replicas < 0 || replicas > MAX_REPLICAS || iterations < 1 || seconds <= 0) {
        fprintf(stderr, "R must be 0..%d, ITERATIONS and SECONDS positive\n", MAX_REPLICAS);
        return 2;
    }

    unsigned short client_port, master_port, backup_port[MAX_REPLICAS];
    int client = open_socket(&client_port);
    int master = open_socket(&master_port);
    int backup[MAX_REPLICAS];
    for (int i = 0; i < replicas; i++) backup[i] = open_socket(&backup_port[i]);
    char buf[2048];

    pid_t kids[MAX_REPLICAS + 1];
    int nkids = 0;
    for (int i = 0; i < replicas; i++) {
        pid_t p = child();
        if (p == 0) {
            for (;;) {
                unsigned short from;
                if (receive(backup[i], buf, sizeof buf, &from) < 0) _exit(1);
                send_to(backup[i], from, buf, 16);
            }
        }
        kids[nkids++] = p;
    }
    pid_t p = child();
    if (p == 0) {
        char ack[64];
        for (;;) {
            unsigned short from;
            ssize_t n = receive(master, buf, sizeof buf, &from);
            if (n < 0) _exit(1);
            for (int i = 0; i < replicas; i++) send_to(master, backup_port[i], buf, (size_t)n);
            for (int i = 0; i < replicas; i++)
                if (receive(master, ack, sizeof ack, NULL) < 0) _exit(1);
            send_to(master, from, buf, 16);
        }
    }
    kids[nkids++] = p;

    /* The client blocks with a timeout in block mode; the others poll against the clock. */
    struct timeval limit = {.tv_sec = 1, .tv_usec = 0};
    setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
    double *samples = malloc(sizeof(double) * (size_t)iterations);
    if (!samples) die("malloc");
    memset(buf, 7, 128);
    long count = 0;
    int truncated = 0, failed = 0;
    double start = now_us(), deadline = start + seconds * 1e6;
    /* The warm-up round trips get at most half the time: on a loaded host they can be slow
       enough to use it all, and the run would measure nothing. */
    double warm_until = start + seconds * 0.5e6;
    for (long i = -WARMUP; i < iterations; i++) {
        double t0 = now_us();
        if (t0 > deadline) {
            truncated = 1;
            break;
        }
        if (i < 0 && t0 > warm_until) i = 0;
        send_to(client, master_port, buf, 128);
        ssize_t r;
        if (mode == BLOCK) {
            r = receive(client, buf, sizeof buf, NULL);
        } else {
            struct sockaddr_in a;
            socklen_t len = sizeof a;
            while ((r = recvfrom(client, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr *)&a, &len)) < 0) {
                if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) break;
                if (now_us() - t0 > 1e6) break;
                if (mode == YIELD) sched_yield();
                len = sizeof a;
            }
        }
        if (r < 0) {
            failed = 1;
            break;
        }
        if (i >= 0) samples[count++] = now_us() - t0;
    }
    for (int i = 0; i < nkids; i++) kill(kids[i], SIGKILL);
    while (wait(NULL) > 0) {
    }
    if (failed) {
        fprintf(stderr, "a round trip took over a second\n");
        return 1;
    }
    if (count == 0) {
        fprintf(stderr, "no round trip finished within %.1f s\n", seconds);
        return 1;
    }
    qsort(samples, (size_t)count, sizeof(double), by_value);
    long p99 = (long)((count * 99 + 99) / 100) - 1;
    printf("{\"replicas\": %d, \"mode\": \"%s\", \"count\": %ld, \"median_us\": %.2f, "
           "\"p99_us\": %.2f, \"truncated\": %d}\n",
           replicas, argv[2], count, samples[count / 2], samples[p99], truncated);
    free(samples);
    return 0;
}
