/* A WASI command used by tests/test_runtime_wasm.py: argv[1] picks what it does. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int cmd_args(int argc, char **argv) {
    for (int i = 0; i < argc; i++) printf("argv[%d]=%s\n", i, argv[i]);
    const char *g = getenv("GREETING");
    printf("GREETING=%s\n", g ? g : "(unset)");
    char buf[256];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) {
        fputs("stdin:", stdout);
        fwrite(buf, 1, n, stdout);
        fputc('\n', stdout);
    }
    return 0;
}

static int cmd_write(const char *path) {
    FILE *f = fopen(path, "w");
    if (!f) { fprintf(stderr, "open %s: %s\n", path, strerror(errno)); return 1; }
    fputs("written by wasm\n", f);
    fclose(f);
    puts("write ok");
    return 0;
}

static int cmd_read(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) { fprintf(stderr, "open %s: %s\n", path, strerror(errno)); return 1; }
    char buf[256];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = 0;
    printf("read:%s", buf);
    fclose(f);
    return 0;
}

static int cmd_bomb(void) {
    /* Grow until malloc fails, touching every page, then abort like most programs do. */
    /* Chain the blocks so the compiler cannot drop the unused allocations. */
    size_t total = 0;
    void **head = 0;
    for (;;) {
        void **p = malloc(1 << 20);
        if (!p) { fprintf(stderr, "malloc failed after %zu MiB\n", total >> 20); abort(); }
        memset(p, 1, 1 << 20);
        *p = head;
        head = p;
        total += 1 << 20;
    }
}

int main(int argc, char **argv) {
    const char *cmd = argc > 1 ? argv[1] : "hello";
    if (!strcmp(cmd, "hello")) { puts("hello, wasm"); fputs("to stderr\n", stderr); return 0; }
    if (!strcmp(cmd, "exit")) return argc > 2 ? atoi(argv[2]) : 0;
    if (!strcmp(cmd, "exit-call")) { fflush(stdout); exit(argc > 2 ? atoi(argv[2]) : 0); }
    if (!strcmp(cmd, "args")) return cmd_args(argc, argv);
    if (!strcmp(cmd, "write")) return cmd_write(argv[2]);
    if (!strcmp(cmd, "read")) return cmd_read(argv[2]);
    if (!strcmp(cmd, "bomb")) return cmd_bomb();
    if (!strcmp(cmd, "trap")) __builtin_trap();
    if (!strcmp(cmd, "loop")) {
        puts("looping"); fflush(stdout);
        for (volatile unsigned long i = 0;; i++) {}
    }
    if (!strcmp(cmd, "sleep")) {  /* blocks in a host call, where epochs cannot reach */
        puts("sleeping"); fflush(stdout);
        sleep(argc > 2 ? atoi(argv[2]) : 3600);
        return 0;
    }
    if (!strcmp(cmd, "spin")) {
        volatile unsigned long n = argc > 2 ? strtoul(argv[2], 0, 10) : 1000000, x = 0;
        for (unsigned long i = 0; i < n; i++) x += i;
        printf("spun %lu\n", (unsigned long)x);
        return 0;
    }
    fprintf(stderr, "unknown command %s\n", cmd);
    return 2;
}
