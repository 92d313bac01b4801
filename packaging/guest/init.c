/* synord microVM guest init (PID 1 of the guest).
 *
 * Runs one task from the initramfs and reports it over the serial console
 * /dev/ttyS0, the only device every VMM we drive has (QEMU microvm and
 * Firecracker).  Everything we send is framed so the host can tell task
 * stdout, task stderr and the exit code apart from stray kernel messages:
 *
 *     frame = "\x01SY" kind:u8 length:u16be payload[length]
 *     kind  = 'o' stdout bytes | 'e' stderr bytes | 'x' exit code (ASCII decimal)
 *             | 'r' a reason before 'x': "oom" when the guest kernel OOM-killed
 *               a process (the guest runs nothing but the task)
 *
 * Bytes outside frames are kernel console output (only emergencies at
 * loglevel=1, e.g. a panic); the host keeps them as diagnostics.
 *
 * Task description, all written by the host into the initramfs:
 *     /synord/argv     NUL-separated argv (argv[0] searched in the task PATH)
 *     /synord/env      NUL-separated KEY=VALUE
 *     /synord/workdir  working directory inside the task rootfs (optional)
 *     /synord/stdin    task stdin (optional; else /dev/null)
 *     /rootfs/         the task's root filesystem (unpacked OCI image)
 *
 * After the task exits and the console is drained: exit frame, then
 * poweroff (or reboot with synord.exit=reboot on the kernel command line).
 * Build: gcc -static -Os -o init init.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define ROOT "/rootfs"
#define MAXFRAME 4096

static int con = -1;
/* QEMU exits on poweroff; Firecracker only on a guest reboot (synord.exit=reboot). */
static int halt_cmd = RB_POWER_OFF;

static void halt(void) {
    sync();
    reboot(halt_cmd);
    _exit(1);
}

static void write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            return;
        }
        p += w;
        n -= (size_t)w;
    }
}

static void frame(char kind, const char *data, size_t n) {
    while (1) {
        size_t chunk = n > MAXFRAME ? MAXFRAME : n;
        unsigned char hdr[6] = {0x01, 'S', 'Y', (unsigned char)kind,
                                (unsigned char)(chunk >> 8), (unsigned char)(chunk & 0xff)};
        write_all(con, hdr, sizeof hdr);
        write_all(con, data, chunk);
        data += chunk;
        n -= chunk;
        if (n == 0) break;
    }
}

static void die(const char *what) {
    char msg[512];
    int n = snprintf(msg, sizeof msg, "synord-init: %s: %s\n", what, strerror(errno));
    if (con >= 0) {
        frame('e', msg, (size_t)n);
        frame('x', "125", 3);
        tcdrain(con);
    }
    halt();
}

/* Read a whole file; *len gets its size.  NULL if absent.  Reads to EOF:
 * /proc files report a size of 0. */
static char *slurp(const char *path, size_t *len) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return NULL;
    size_t cap = 4096, got = 0;
    char *buf = malloc(cap + 1);
    while (buf) {
        if (got == cap) {
            cap *= 2;
            char *bigger = realloc(buf, cap + 1);
            if (!bigger) { free(buf); buf = NULL; break; }
            buf = bigger;
        }
        ssize_t r = read(fd, buf + got, cap - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    close(fd);
    if (!buf) return NULL;
    buf[got] = 0;
    *len = got;
    return buf;
}

/* Split a NUL-separated buffer into a NULL-terminated vector. */
static char **split0(char *buf, size_t len) {
    size_t count = 0;
    for (size_t i = 0; i < len; i++) if (buf[i] == 0) count++;
    if (len > 0 && buf[len - 1] != 0) count++;
    char **v = calloc(count + 1, sizeof *v);
    size_t k = 0;
    for (size_t i = 0; i < len && k < count;) {
        v[k++] = buf + i;
        i += strlen(buf + i) + 1;
    }
    return v;
}

static void mount_task_fs(void) {
    mkdir(ROOT "/proc", 0555);
    mkdir(ROOT "/sys", 0555);
    mkdir(ROOT "/dev", 0755);
    mkdir(ROOT "/tmp", 01777);
    if (mount("proc", ROOT "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0) die("mount proc");
    if (mount("sysfs", ROOT "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0) die("mount sysfs");
    if (mount("devtmpfs", ROOT "/dev", "devtmpfs", MS_NOSUID, NULL) < 0) die("mount devtmpfs");
    mount("tmpfs", ROOT "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
}

/* oom_kill counter of /proc/vmstat: the guest's OOM killer ran. */
static long oom_kills(void) {
    size_t len = 0;
    char *v = slurp(ROOT "/proc/vmstat", &len);
    char *p = v ? strstr(v, "\noom_kill ") : NULL;
    long n = p ? strtol(p + 10, NULL, 10) : 0;
    free(v);
    return n;
}

int main(void) {
    mkdir("/dev", 0755);
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, NULL);
    con = open("/dev/ttyS0", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (con < 0) { reboot(RB_POWER_OFF); return 1; }
    struct termios t;
    if (tcgetattr(con, &t) == 0) {
        cfmakeraw(&t);  /* no \n -> \r\n, no echo: frames must pass byte-exact */
        tcsetattr(con, TCSANOW, &t);
    }

    size_t alen = 0, elen = 0, wlen = 0;
    char *abuf = slurp("/synord/argv", &alen);
    if (!abuf || alen == 0) { errno = ENOENT; die("no /synord/argv"); }
    char **argv = split0(abuf, alen);
    char *ebuf = slurp("/synord/env", &elen);
    char **envp = ebuf ? split0(ebuf, elen) : calloc(1, sizeof(char *));
    char *workdir = slurp("/synord/workdir", &wlen);
    if (!workdir || wlen == 0) workdir = "/";

    mount_task_fs();
    size_t clen = 0;
    char *cmdline = slurp(ROOT "/proc/cmdline", &clen);
    if (cmdline && strstr(cmdline, "synord.exit=reboot")) halt_cmd = RB_AUTOBOOT;

    int out[2], err[2];
    if (pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) die("pipe");

    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        int in = open("/synord/stdin", O_RDONLY);
        if (in < 0) in = open("/dev/null", O_RDONLY);
        if (chroot(ROOT) < 0 || chdir(workdir) < 0) {
            dprintf(err[1], "synord-init: cannot enter %s: %s\n", workdir, strerror(errno));
            _exit(126);
        }
        if (in >= 0) dup2(in, 0);
        dup2(out[1], 1);
        dup2(err[1], 2);
        setsid();
        /* execvpe searches PATH of the caller's environ, so install the task's. */
        environ = envp;
        if (!getenv("PATH")) setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);
        execvp(argv[0], argv);
        dprintf(2, "synord-init: cannot execute %s: %s\n", argv[0], strerror(errno));
        _exit(errno == ENOENT ? 127 : 126);
    }
    close(out[1]);
    close(err[1]);

    struct pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
    char buf[MAXFRAME];
    int open_fds = 2, status = 0, exited = 0;
    /* Relay until both pipes close, or the task exits and nothing is left
     * (a background process may keep the pipes open forever). */
    while (open_fds > 0) {
        int r = poll(fds, 2, exited ? 0 : 200);
        if (r < 0 && errno != EINTR) break;
        int got = 0;
        for (int i = 0; i < 2; i++) {
            if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            ssize_t n = read(fds[i].fd, buf, sizeof buf);
            if (n > 0) {
                frame(i == 0 ? 'o' : 'e', buf, (size_t)n);
                got = 1;
            } else if (n == 0 || errno != EINTR) {
                close(fds[i].fd);
                fds[i].fd = -1;
                open_fds--;
            }
        }
        if (!exited) {
            pid_t w;
            int st;
            while ((w = waitpid(-1, &st, WNOHANG)) > 0)  /* PID 1 reaps orphans too */
                if (w == child) { status = st; exited = 1; break; }
        } else if (!got) {
            break;
        }
    }
    if (!exited) {
        pid_t w;
        int st;
        while ((w = waitpid(-1, &st, 0)) > 0)
            if (w == child) { status = st; break; }
    }
    int code = WIFEXITED(status) ? WEXITSTATUS(status)
             : WIFSIGNALED(status) ? 128 + WTERMSIG(status) : 255;
    if (oom_kills() > 0) frame('r', "oom", 3);
    char num[16];
    int n = snprintf(num, sizeof num, "%d", code);
    frame('x', num, (size_t)n);
    tcdrain(con);  /* the UART transmits from a kernel buffer: wait before powering off */
    halt();
    return 0;
}
