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

int main(int argc, char **argv)
{
    static char buf[65536];
    if (argc >= 2 && !strncmp(argv[1], "tcp-", 4))
        return tcp(argc, argv);
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
