/*
 * vsock-tool: the guest half of the vsock tests with a real Linux guest (busybox has no vsock
 * client). A static Linux program, not a test guest: the tests build it with `gcc -static` and
 * append it to the initrd. Every syscall it makes is a slow one on KVM on PVM, so it makes few.
 *
 *   vsock-tool listen PORT          accept one connection, echo it until EOF
 *   vsock-tool connect CID PORT MSG send MSG, shut down writing, print "reply: " and what comes back
 */
#include <linux/vm_sockets.h>
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

int main(int argc, char **argv)
{
    static char buf[65536];
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
