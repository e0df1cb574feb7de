/* Sends one raw TPM command to a TPM character device from inside a Linux guest, for tier-4
 * tests (busybox has no TPM tools):
 *   tpm-raw DEVICE HEX    write the command HEX (e.g. 80010000000c0000017b0008) to DEVICE
 *                         (/dev/tpm0 or /dev/tpmrm0), print "TPM-RC=XXXXXXXX" (the response
 *                         code) and "TPM-RESPONSE=HEX" (the whole response)
 * Built static by the Linux kit (gcc -static). Exit status 0 when the TPM answered at all. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    unsigned char command[4096], response[4096];
    size_t len = 0;
    if (argc != 3 || strlen(argv[2]) % 2 != 0 || strlen(argv[2]) / 2 > sizeof command) {
        fprintf(stderr, "usage: tpm-raw DEVICE HEX\n");
        return 1;
    }
    for (const char *p = argv[2]; *p; p += 2) {
        unsigned byte;
        if (sscanf(p, "%2x", &byte) != 1) {
            fprintf(stderr, "tpm-raw: not hex: %s\n", p);
            return 1;
        }
        command[len++] = (unsigned char)byte;
    }
    int fd = open(argv[1], O_RDWR);
    if (fd < 0) {
        perror(argv[1]);
        return 1;
    }
    if (write(fd, command, len) != (ssize_t)len) {
        perror("write");
        return 1;
    }
    ssize_t got = read(fd, response, sizeof response);
    if (got < 10) {
        perror("read");
        return 1;
    }
    printf("TPM-RC=%02x%02x%02x%02x\n", response[6], response[7], response[8], response[9]);
    printf("TPM-RESPONSE=");
    for (ssize_t i = 0; i < got; i++)
        printf("%02x", response[i]);
    printf("\n");
    return 0;
}
