/* A vsock peer for tier-4 tests, run inside a Linux guest (busybox has no vsock):
 *   vsock-peer listen PORT            print "VSOCK-LISTENING PORT", accept one connection,
 *                                     answer each line with "echo: LINE" until EOF
 *   vsock-peer connect CID PORT TEXT  connect, send "TEXT\n", print the answer line
 *   vsock-peer cid                    print "VSOCK-CID N", this guest's CID
 * Built static by the Linux kit (gcc -static). Exit status 0 on success, 1 with a message. */
#include <linux/vm_sockets.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

static int fail(const char *what) {
    perror(what);
    return 1;
}

static struct sockaddr_vm address(unsigned cid, unsigned port) {
    struct sockaddr_vm a;
    memset(&a, 0, sizeof a);
    a.svm_family = AF_VSOCK;
    a.svm_cid = cid;
    a.svm_port = port;
    return a;
}

static int serve(unsigned port) {
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0)
        return fail("socket");
    struct sockaddr_vm a = address(VMADDR_CID_ANY, port);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0)
        return fail("bind");
    if (listen(s, 1) < 0)
        return fail("listen");
    printf("VSOCK-LISTENING %u\n", port);
    fflush(stdout);
    int c = accept(s, NULL, NULL);
    if (c < 0)
        return fail("accept");
    FILE *in = fdopen(c, "r");
    char line[4096];
    while (in && fgets(line, sizeof line, in)) {
        char answer[4200];
        int n = snprintf(answer, sizeof answer, "echo: %s", line);
        if (write(c, answer, n) != n)
            return fail("write");
    }
    printf("VSOCK-CLOSED\n");
    return 0;
}

static int call(unsigned cid, unsigned port, const char *text) {
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0)
        return fail("socket");
    struct sockaddr_vm a = address(cid, port);
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0)
        return fail("connect");
    char line[4096];
    int n = snprintf(line, sizeof line, "%s\n", text);
    if (write(s, line, n) != n)
        return fail("write");
    FILE *in = fdopen(s, "r");
    if (!in || !fgets(line, sizeof line, in))
        return fail("read");
    printf("VSOCK-ANSWER %s", line);
    return 0;
}

static int local_cid(void) {
    int fd = open("/dev/vsock", O_RDONLY);
    unsigned cid = 0;
    if (fd < 0)
        return fail("/dev/vsock");
    if (ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) < 0)
        return fail("IOCTL_VM_SOCKETS_GET_LOCAL_CID");
    printf("VSOCK-CID %u\n", cid);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "cid") == 0)
        return local_cid();
    if (argc == 3 && strcmp(argv[1], "listen") == 0)
        return serve((unsigned)strtoul(argv[2], NULL, 10));
    if (argc == 5 && strcmp(argv[1], "connect") == 0)
        return call((unsigned)strtoul(argv[2], NULL, 10), (unsigned)strtoul(argv[3], NULL, 10),
                    argv[4]);
    fprintf(stderr, "usage: vsock-peer listen PORT | connect CID PORT TEXT | cid\n");
    return 2;
}
