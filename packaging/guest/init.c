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
 *
 * Exec channel (QEMU only: a second UART, /dev/ttyS1, when the host gave one):
 * commands beside the task for `synord exec`/`synord shell`.  Same framing;
 * the first payload byte of every session frame is the session id (1..255).
 *   host -> guest   'R' reset: kill every session, answer 'H' (sent on connect)
 *                   'S' sid argc:u8 argv\0... env KEY=VALUE\0...   start a command on pipes
 *                   'T' sid rows:u16be cols:u16be argc argv... env...   the same on a new
 *                       pseudo-terminal (its controlling tty; output all comes as 'o')
 *                   'Z' sid rows:u16be cols:u16be   the terminal's new size
 *                   'I' sid bytes   stdin        'C' sid   close stdin
 *                   'K' sid         SIGKILL its process group
 *                   'W' sid u32be   the host takes that many more output bytes
 *   guest -> host   'H' ready       'o'/'e' sid bytes   output
 *                   'a' sid u32be   that many stdin bytes were written to the command
 *                   'x' sid code    the command ended (after its output)
 * Both directions are windowed (EXEC_WINDOW bytes of stdin in flight, output
 * only against the host's credit), so one busy session never stalls the task
 * or another session, and the guest's tty buffer can never overflow.
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
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/signalfd.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define ROOT "/rootfs"
#define MAXFRAME 4096
#define MAXSESS 8
#define EXEC_WINDOW 65536

static int con = -1;
static int xcon = -1;  /* exec channel, /dev/ttyS1; -1 without one */
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

static void frame_to(int fd, char kind, const char *data, size_t n) {
    while (1) {
        size_t chunk = n > MAXFRAME ? MAXFRAME : n;
        unsigned char hdr[6] = {0x01, 'S', 'Y', (unsigned char)kind,
                                (unsigned char)(chunk >> 8), (unsigned char)(chunk & 0xff)};
        write_all(fd, hdr, sizeof hdr);
        write_all(fd, data, chunk);
        data += chunk;
        n -= chunk;
        if (n == 0) break;
    }
}

static void frame(char kind, const char *data, size_t n) { frame_to(con, kind, data, n); }

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
    /* pseudo-terminals for exec sessions; the task sees the same instance */
    mkdir("/dev/pts", 0755);
    if (mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=0620,ptmxmode=0666") == 0) {
        mkdir(ROOT "/dev/pts", 0755);
        mount("/dev/pts", ROOT "/dev/pts", NULL, MS_BIND, NULL);
    }
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


/* ---- exec channel ------------------------------------------------------ */

struct session {
    int sid;               /* 0: slot free */
    pid_t pid;
    int in, out, err;      /* our ends of its pipes; -1 once closed */
    int exited, status;
    int close_in;          /* the host closed stdin: close once pend is written */
    char *pend;            /* stdin bytes not yet written (at most EXEC_WINDOW) */
    size_t plen;
    unsigned long credit;  /* output bytes the host will still take */
};

static struct session sess[MAXSESS];
static char **task_envp;
static char *task_workdir;
static unsigned char xbuf[6 + MAXFRAME];
static size_t xlen;

static void put_u32(unsigned char *p, unsigned long v) {
    p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8); p[3] = (unsigned char)v;
}

static void sframe(struct session *s, char kind, const void *data, size_t n) {
    char buf[MAXFRAME];
    if (n > MAXFRAME - 1) n = MAXFRAME - 1;
    buf[0] = (char)s->sid;
    memcpy(buf + 1, data, n);
    frame_to(xcon, kind, buf, n + 1);
}

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

static void end_session(struct session *s) {
    int st = s->status;
    int code = WIFEXITED(st) ? WEXITSTATUS(st) : WIFSIGNALED(st) ? 128 + WTERMSIG(st) : 255;
    char num[16];
    int n = snprintf(num, sizeof num, "%d", code);
    sframe(s, 'x', num, (size_t)n);
    close_fd(&s->in); close_fd(&s->out); close_fd(&s->err);
    free(s->pend);
    memset(s, 0, sizeof *s);
}

static void drop_session(struct session *s) {  /* reset: no report, the host forgot it */
    if (!s->exited) { kill(-s->pid, SIGKILL); kill(s->pid, SIGKILL); }  /* reaped as an orphan */
    close_fd(&s->in); close_fd(&s->out); close_fd(&s->err);
    free(s->pend);
    memset(s, 0, sizeof *s);
}

static struct session *find_session(int sid) {
    for (int i = 0; i < MAXSESS; i++) if (sess[i].sid == sid) return &sess[i];
    return NULL;
}

/* The task's environment with the session's KEY=VALUE entries put over it. */
static char **merged_env(char **extra) {
    size_t n = 0, k = 0;
    for (char **e = task_envp; *e; e++) n++;
    for (char **e = extra; *e; e++) n++;
    char **env = calloc(n + 1, sizeof *env);
    for (char **e = task_envp; *e; e++) {
        size_t key = strcspn(*e, "=");
        int shadowed = 0;
        for (char **x = extra; *x && !shadowed; x++)
            shadowed = strncmp(*x, *e, key) == 0 && (*x)[key] == '=';
        if (!shadowed) env[k++] = *e;
    }
    for (char **e = extra; *e; e++) env[k++] = *e;
    return env;
}

/* Our ends of a pipe session: in (write), out, err; or of a terminal session:
 * the pty master twice (in, out), no err.  The child's ends go to *child. */
static int session_stdio(int tty, int rows, int cols, int mine[3], int child[3], char **pts) {
    if (tty) {
        int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (m < 0 || grantpt(m) < 0 || unlockpt(m) < 0 || !(*pts = ptsname(m))) {
            if (m >= 0) close(m);
            return -1;
        }
        struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
        ioctl(m, TIOCSWINSZ, &ws);
        mine[0] = fcntl(m, F_DUPFD_CLOEXEC, 0);
        mine[1] = m;
        mine[2] = -1;
        return mine[0] < 0 ? (close(m), -1) : 0;
    }
    int in[2], out[2], err[2];
    if (pipe2(in, O_CLOEXEC) < 0) return -1;
    if (pipe2(out, O_CLOEXEC) < 0) { close(in[0]); close(in[1]); return -1; }
    if (pipe2(err, O_CLOEXEC) < 0) { close(in[0]); close(in[1]); close(out[0]); close(out[1]); return -1; }
    mine[0] = in[1]; mine[1] = out[0]; mine[2] = err[0];
    child[0] = in[0]; child[1] = out[1]; child[2] = err[1];
    return 0;
}

/* 'S' (pipes) or 'T' (a terminal of rows x cols): p holds argc, argv, env. */
static void start_session(int sid, char *p, size_t len, int tty, int rows, int cols) {
    struct session fail = {.sid = sid, .in = -1, .out = -1, .err = -1, .status = 125 << 8};
    if (find_session(sid)) { sframe(&fail, 'e', "session id in use\n", 18); sframe(&fail, 'x', "125", 3); return; }
    struct session *s = find_session(0);
    if (!s) { sframe(&fail, 'e', "too many exec sessions\n", 23); sframe(&fail, 'x', "125", 3); return; }
    /* argc, then argv and env items, all NUL-terminated (an argument may be empty) */
    char *argv[256], *envx[256];
    size_t argc = len ? (unsigned char)p[0] : 0, na = 0, ne = 0, i = 1;
    while (i < len && na < argc) { argv[na++] = p + i; i += strlen(p + i) + 1; }
    while (i < len && ne < 255) { envx[ne++] = p + i; i += strlen(p + i) + 1; }
    argv[na] = NULL; envx[ne] = NULL;
    if (na == 0 || na != argc || p[len - 1] != 0) { sframe(&fail, 'e', "malformed exec request\n", 23); sframe(&fail, 'x', "125", 3); return; }
    int mine[3], child[3] = {-1, -1, -1};
    char *pts = NULL;
    if (session_stdio(tty, rows, cols, mine, child, &pts) < 0) {
        sframe(&fail, 'e', tty ? "no pseudo-terminal\n" : "pipe failed\n", tty ? 19 : 12);
        sframe(&fail, 'x', "125", 3);
        return;
    }
    char **env = merged_env(envx);
    pid_t pid = fork();
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);  /* like ignored dispositions, masks survive exec */
        signal(SIGPIPE, SIG_DFL);
        setsid();
        if (tty) {  /* the terminal becomes the session's controlling tty: ^C, job control */
            int sl = open(pts, O_RDWR);
            if (sl < 0 || ioctl(sl, TIOCSCTTY, 0) < 0) _exit(125);
            child[0] = child[1] = child[2] = sl;
        }
        if (chroot(ROOT) < 0 || chdir(task_workdir) < 0) {
            dprintf(child[2], "synord-init: cannot enter %s: %s\n", task_workdir, strerror(errno));
            _exit(126);
        }
        dup2(child[0], 0);
        dup2(child[1], 1);
        dup2(child[2], 2);
        environ = env;
        if (!getenv("PATH")) setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);
        execvp(argv[0], argv);
        dprintf(2, "synord-init: cannot execute %s: %s\n", argv[0], strerror(errno));
        _exit(errno == ENOENT ? 127 : 126);
    }
    free(env);
    for (int k = 0; k < 3; k++) if (child[k] >= 0) close(child[k]);
    if (pid < 0) {
        for (int k = 0; k < 3; k++) if (mine[k] >= 0) close(mine[k]);
        sframe(&fail, 'e', "fork failed\n", 12); sframe(&fail, 'x', "125", 3);
        return;
    }
    fcntl(mine[0], F_SETFL, O_NONBLOCK);  /* (a pty's two fds share this flag) */
    memset(s, 0, sizeof *s);
    s->sid = sid; s->pid = pid; s->in = mine[0]; s->out = mine[1]; s->err = mine[2];
    s->pend = malloc(EXEC_WINDOW);
}

static void write_stdin(struct session *s) {
    size_t done = 0;
    while (done < s->plen && s->in >= 0) {
        ssize_t w = write(s->in, s->pend + done, s->plen - done);
        if (w > 0) { done += (size_t)w; continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) break;
        close_fd(&s->in);  /* EPIPE: the command closed stdin; the rest is dropped */
        done = s->plen;
    }
    if (s->in < 0) done = s->plen;
    if (done) {
        unsigned char ack[4];
        put_u32(ack, done);
        memmove(s->pend, s->pend + done, s->plen - done);
        s->plen -= done;
        sframe(s, 'a', ack, 4);
    }
    if (s->close_in && s->plen == 0) close_fd(&s->in);
}

static void host_frame(char kind, unsigned char *p, size_t len) {
    if (kind == 'R') {
        for (int i = 0; i < MAXSESS; i++) if (sess[i].sid) drop_session(&sess[i]);
        frame_to(xcon, 'H', "", 0);
        return;
    }
    if (len < 1 || p[0] == 0) return;
    int sid = p[0];
    p++; len--;
    if (kind == 'S') { start_session(sid, (char *)p, len, 0, 0, 0); return; }
    if (kind == 'T') {
        if (len < 4) return;
        start_session(sid, (char *)p + 4, len - 4, 1, (p[0] << 8) | p[1], (p[2] << 8) | p[3]);
        return;
    }
    struct session *s = find_session(sid);
    if (!s) return;  /* ended already: late input is dropped */
    if (kind == 'I') {
        if (s->in < 0 || s->close_in) {  /* nobody reads it: acknowledge and drop */
            unsigned char ack[4];
            put_u32(ack, len);
            sframe(s, 'a', ack, 4);
            return;
        }
        if (len > EXEC_WINDOW - s->plen) len = EXEC_WINDOW - s->plen;  /* the host overran its window */
        memcpy(s->pend + s->plen, p, len);
        s->plen += len;
        write_stdin(s);
    } else if (kind == 'C') {
        s->close_in = 1;
        if (s->plen == 0) close_fd(&s->in);
    } else if (kind == 'K') {
        if (!s->exited) { kill(-s->pid, SIGKILL); kill(s->pid, SIGKILL); }  /* before its setsid too */
    } else if (kind == 'Z' && len >= 4 && s->out >= 0) {
        struct winsize ws = {.ws_row = (unsigned short)((p[0] << 8) | p[1]),
                             .ws_col = (unsigned short)((p[2] << 8) | p[3])};
        ioctl(s->out, TIOCSWINSZ, &ws);
    } else if (kind == 'W' && len >= 4) {
        s->credit += ((unsigned long)p[0] << 24) | ((unsigned long)p[1] << 16) | ((unsigned long)p[2] << 8) | p[3];
    }
}

/* Read what the host sent and act on each whole frame. */
static void read_exec_channel(void) {
    ssize_t r = read(xcon, xbuf + xlen, sizeof xbuf - xlen);
    if (r <= 0) return;
    xlen += (size_t)r;
    size_t off = 0;
    while (xlen - off >= 6) {
        unsigned char *f = xbuf + off;
        if (f[0] != 0x01 || f[1] != 'S' || f[2] != 'Y') { off++; continue; }  /* resync */
        size_t n = ((size_t)f[4] << 8) | f[5];
        if (n > MAXFRAME) { off++; continue; }
        if (xlen - off < 6 + n) break;
        host_frame((char)f[3], f + 6, n);
        off += 6 + n;
    }
    memmove(xbuf, xbuf + off, xlen - off);
    xlen -= off;
}

/* Output of one session's pipe, within the host's credit; 1 if data came. */
static int relay_session_output(struct session *s, int *fd, char kind) {
    char buf[MAXFRAME - 1];
    size_t want = s->credit < sizeof buf ? s->credit : sizeof buf;
    if (*fd < 0 || want == 0) return 0;
    ssize_t n = read(*fd, buf, want);
    if (n > 0) {
        s->credit -= (unsigned long)n;
        sframe(s, kind, buf, (size_t)n);
        return 1;
    }
    if (n == 0 || (errno != EINTR && errno != EAGAIN)) close_fd(fd);  /* EIO: the pty's last user left */
    return 0;
}

static void open_exec_channel(void) {
    int fd = open("/dev/ttyS1", O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return;
    struct termios t;
    /* a UART the VMM did not give us has no line status: leave it alone */
    if (tcgetattr(fd, &t) != 0) { close(fd); return; }
    cfmakeraw(&t);
    tcsetattr(fd, TCSANOW, &t);
    fcntl(fd, F_SETFL, 0);  /* blocking writes: frames go out whole */
    xcon = fd;
    frame_to(xcon, 'H', "", 0);
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

    task_envp = envp;
    task_workdir = workdir;
    open_exec_channel();

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
    signal(SIGPIPE, SIG_IGN);  /* a session that closed its stdin must not kill init */
    /* A child's exit wakes the loop at once (an exec session ends without waiting
     * out a poll timeout); children get an empty mask back before exec. */
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    int sfd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);

    int tfd[2] = {out[0], err[0]};
    char buf[MAXFRAME];
    int status = 0, exited = 0;
    /* Relay until both task pipes close, or the task exits and nothing is left
     * (a background process may keep the pipes open forever); meanwhile serve
     * the exec channel. */
    while (1) {
        struct pollfd fds[4 + 3 * MAXSESS];  /* task out+err, exec channel, signalfd, sessions */
        /* "nothing more came" only counts for a round that began after the exit */
        int nf = 0, timeout = exited ? 0 : 200, was_exited = exited, drained[MAXSESS] = {0};
        for (int i = 0; i < 2; i++)
            if (tfd[i] >= 0) fds[nf++] = (struct pollfd){tfd[i], POLLIN, 0};
        int xi = -1, si = -1;
        if (xcon >= 0) { xi = nf; fds[nf++] = (struct pollfd){xcon, POLLIN, 0}; }
        if (sfd >= 0) { si = nf; fds[nf++] = (struct pollfd){sfd, POLLIN, 0}; }
        for (int k = 0; k < MAXSESS; k++) {
            struct session *x = &sess[k];
            if (!x->sid) continue;
            if (x->plen && x->in >= 0) fds[nf++] = (struct pollfd){x->in, POLLOUT, 0};
            if (x->credit && x->out >= 0) fds[nf++] = (struct pollfd){x->out, POLLIN, 0};
            if (x->credit && x->err >= 0) fds[nf++] = (struct pollfd){x->err, POLLIN, 0};
            if (x->exited && x->credit) timeout = 0, drained[k] = 1;
        }
        int r = poll(fds, (nfds_t)nf, timeout);
        if (r < 0 && errno != EINTR) break;
        int got = 0, sgot[MAXSESS] = {0};
        for (int j = 0; j < nf; j++) {
            if (!(fds[j].revents & (POLLIN | POLLOUT | POLLHUP | POLLERR))) continue;
            int fd = fds[j].fd;
            if (j == xi) { read_exec_channel(); continue; }
            if (j == si) {  /* drain; the reaping below does the work */
                struct signalfd_siginfo info;
                while (read(sfd, &info, sizeof info) == sizeof info) {}
                continue;
            }
            if (fd == tfd[0] || fd == tfd[1]) {
                int i = fd == tfd[0] ? 0 : 1;
                ssize_t n = read(fd, buf, sizeof buf);
                if (n > 0) {
                    frame(i == 0 ? 'o' : 'e', buf, (size_t)n);
                    got = 1;
                } else if (n == 0 || errno != EINTR) {
                    close(fd);
                    tfd[i] = -1;
                }
                continue;
            }
            for (int k = 0; k < MAXSESS; k++) {
                struct session *x = &sess[k];
                if (!x->sid) continue;
                if (fd == x->in && (fds[j].events & POLLOUT)) write_stdin(x);
                else if (fd == x->out) sgot[k] |= relay_session_output(x, &x->out, 'o');
                else if (fd == x->err) sgot[k] |= relay_session_output(x, &x->err, 'e');
            }
        }
        pid_t w;
        int st;
        while ((w = waitpid(-1, &st, WNOHANG)) > 0) {  /* PID 1 reaps orphans too */
            if (w == child) { status = st; exited = 1; continue; }
            for (int k = 0; k < MAXSESS; k++)
                if (sess[k].sid && sess[k].pid == w) { sess[k].status = st; sess[k].exited = 1; }
        }
        for (int k = 0; k < MAXSESS; k++) {
            struct session *x = &sess[k];
            /* ended: output closed, or nothing more came with room to send it */
            if (x->sid && x->exited && ((x->out < 0 && x->err < 0) || (drained[k] && !sgot[k])))
                end_session(x);
        }
        if (exited && ((was_exited && !got) || (tfd[0] < 0 && tfd[1] < 0))) break;
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
