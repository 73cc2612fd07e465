/*
 * vsock-tool: the guest half of the vsock tests with a real Linux guest (busybox has no vsock
 * client). A static Linux program, not a test guest: the tests build it with `gcc -static` and
 * append it to the initrd. Every syscall it makes is a slow one on KVM on PVM, so it makes few.
 *
 *   vsock-tool listen PORT          accept one connection, echo it until EOF
 *   vsock-tool connect CID PORT MSG send MSG, shut down writing, print "reply: " and what comes back
 *
 * And the guest half of the virtio-net benchmark (bench/devices.ts), over TCP: busybox's nc
 * writes 1 KiB at a time, so it measures the guest's tiny writes rather than the NIC. These move
 * data in large blocks (256 KiB unless BLOCK says otherwise):
 *   vsock-tool tcp-send IP PORT BYTES [BLOCK]  connect, send BYTES, shut down writing, wait for
 *                                              the peer's EOF; print "sent BYTES"
 *   vsock-tool tcp-recv IP PORT [BLOCK]        connect, read until EOF; print "received N"
 *
 * And the guest half of the UDP --publish test (test/net.test.ts):
 *   vsock-tool udp-echo PORT N  on UDP 0.0.0.0:PORT, answer every datagram to its sender with
 *                               "echo: " and the datagram, ASCII letters upper-cased (so the host
 *                               sees that the guest read it); print "udp-echo answered N" and exit
 *                               once N different datagrams came (a host that resends a datagram
 *                               it has no answer for yet may send one twice)
 */
#include <arpa/inet.h>
#include <linux/vm_sockets.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w <= 0)
            die("write");
        p += w;
        n -= (size_t)w;
    }
}

/* A TCP connection to IP:PORT, retried for ~10 s while the host's listener is not up yet. */
static int tcp_connect(const char *ip, const char *port)
{
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(port)) };
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1)
        die("address");
    for (int i = 0;; i++) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0)
            die("socket");
        if (connect(s, (struct sockaddr *)&a, sizeof a) == 0)
            return s;
        if (i == 100)
            die("connect");
        close(s);
        usleep(100000);
    }
}

static int tcp(int argc, char **argv)
{
    int sending = !strcmp(argv[1], "tcp-send");
    if (argc < (sending ? 5 : 4))
        return 2;
    const char *block_arg = argc > (sending ? 5 : 4) ? argv[sending ? 5 : 4] : NULL;
    size_t block = block_arg ? strtoull(block_arg, NULL, 10) : 256 * 1024;
    char *buf = block ? malloc(block) : NULL;
    if (buf == NULL)
        die("block");
    int s = tcp_connect(argv[2], argv[3]);
    if (sending) {
        unsigned long long left = strtoull(argv[4], NULL, 10), total = left;
        memset(buf, 'x', block);
        while (left > 0) {
            size_t n = left < block ? (size_t)left : block;
            write_all(s, buf, n);
            left -= n;
        }
        /* Wait for the host's EOF, which it sends once it has read ours: only then is every byte
         * out of this guest's socket (a guest that powers off sooner may still hold some). */
        if (shutdown(s, SHUT_WR))
            die("shutdown");
        while (read(s, buf, block) > 0) {
        }
        printf("sent %llu\n", total);
        return 0;
    }
    unsigned long long total = 0;
    ssize_t n;
    while ((n = read(s, buf, block)) > 0)
        total += (unsigned long long)n;
    if (n < 0)
        die("read");
    printf("received %llu\n", total);
    return 0;
}

/* FNV-1a, 64-bit: tells udp-echo's datagrams apart. */
static unsigned long long fnv1a64(const unsigned char *p, size_t n)
{
    unsigned long long h = 0xcbf29ce484222325ULL;
    while (n-- > 0)
        h = (h ^ *p++) * 0x100000001b3ULL;
    return h;
}

static int udp_echo(int argc, char **argv)
{
    static const char prefix[] = "echo: ";
    static unsigned char in[65536], out[sizeof prefix - 1 + sizeof in];
    if (argc < 4) {
        fprintf(stderr, "usage: vsock-tool udp-echo PORT N\n");
        return 2;
    }
    char *port_end, *want_end;
    unsigned long port = strtoul(argv[2], &port_end, 10);
    unsigned long want = strtoul(argv[3], &want_end, 10);
    if (*port_end != '\0' || port < 1 || port > 65535 || *want_end != '\0' || want < 1 || want > 1000) {
        fprintf(stderr, "vsock-tool udp-echo: PORT must be 1-65535 and N 1-1000\n");
        return 2;
    }
    unsigned long long *seen = calloc(want, sizeof *seen);
    if (seen == NULL)
        die("calloc");
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0)
        die("socket");
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)port), .sin_addr.s_addr = htonl(INADDR_ANY) };
    if (bind(s, (struct sockaddr *)&a, sizeof a))
        die("bind");
    printf("udp-echo listening %lu\n", port);
    fflush(stdout);
    unsigned long have = 0;
    while (have < want) {
        struct sockaddr_in from;
        socklen_t from_len = sizeof from;
        ssize_t n = recvfrom(s, in, sizeof in, 0, (struct sockaddr *)&from, &from_len);
        if (n < 0)
            die("recvfrom");
        memcpy(out, prefix, sizeof prefix - 1);
        for (ssize_t i = 0; i < n; i++)
            out[sizeof prefix - 1 + i] = in[i] >= 'a' && in[i] <= 'z' ? in[i] - 'a' + 'A' : in[i];
        size_t len = sizeof prefix - 1 + (size_t)n;
        ssize_t w = sendto(s, out, len, 0, (struct sockaddr *)&from, from_len);
        if (w < 0)
            die("sendto");
        if ((size_t)w != len) {
            fprintf(stderr, "vsock-tool udp-echo: sendto sent %zd of %zu bytes\n", w, len);
            return 1;
        }
        unsigned long long h = fnv1a64(in, (size_t)n);
        unsigned long i = 0;
        while (i < have && seen[i] != h)
            i++;
        if (i == have)
            seen[have++] = h;
    }
    printf("udp-echo answered %lu\n", have);
    return 0;
}

int main(int argc, char **argv)
{
    static char buf[65536];
    if (argc >= 2 && !strncmp(argv[1], "tcp-", 4))
        return tcp(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "udp-echo"))
        return udp_echo(argc, argv);
    struct sockaddr_vm a = { .svm_family = AF_VSOCK };
    if (argc < 3)
        return 2;
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0)
        die("socket");
    if (!strcmp(argv[1], "listen")) {
        a.svm_cid = VMADDR_CID_ANY;
        a.svm_port = (unsigned)atoi(argv[2]);
        if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1))
            die("listen");
        printf("listening %s\n", argv[2]);
        fflush(stdout);
        int c = accept(s, NULL, NULL);
        if (c < 0)
            die("accept");
        ssize_t n;
        while ((n = read(c, buf, sizeof buf)) > 0)
            write_all(c, buf, (size_t)n);
        return 0;
    }
    if (argc < 5)
        return 2;
    a.svm_cid = (unsigned)atoi(argv[2]);
    a.svm_port = (unsigned)atoi(argv[3]);
    /* The host's listener may not be up yet: retry for ~10 s. */
    for (int i = 0; connect(s, (struct sockaddr *)&a, sizeof a) != 0; i++) {
        if (i == 100)
            die("connect");
        close(s);
        usleep(100000);
        s = socket(AF_VSOCK, SOCK_STREAM, 0);
    }
    write_all(s, argv[4], strlen(argv[4]));
    shutdown(s, SHUT_WR);
    ssize_t n;
    printf("reply: ");
    while ((n = read(s, buf, sizeof buf)) > 0)
        fwrite(buf, 1, (size_t)n, stdout);
    printf("\n");
    return 0;
}
