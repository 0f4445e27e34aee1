/*
 * stapes-agent: Stapes's guest agent. It runs inside a virtual machine and starts commands there for the
 * host (`stapes exec`, `incus exec`), over the virtio-serial port /dev/virtio-ports/org.stapes.agent (no vsock
 * on the hosts Stapes targets). One static binary, no configuration; build:
 *     gcc -static -O2 -Wall -o stapes-agent stapes-agent.c -lutil
 *
 * Why not Debian's qemu-guest-agent: its guest-exec runs a command with its output captured into buffers the
 * host polls for (base64), stdin given whole up front; no terminal, no window size, no signals, no streaming.
 * Stapes needs interactive sessions (a pty, resizes, ^C, several at once) and output as it comes.
 *
 * PROTOCOL. Frames both ways, integers big-endian:
 *     type u8 | session u32 | length u32 | payload (length bytes, at most MAX_PAYLOAD)
 * Session 0 is the connection itself; other ids are chosen by the host, one per command (or per INFO request).
 *
 * Host -> agent
 *   0x01 HELLO      session 0, payload "STAPES01". A new host connection: every session of an earlier one is
 *                   killed (the host daemon restarted), then WELCOME. Before its first HELLO (after a start or a
 *                   reopen of the port) the agent discards input until it finds a HELLO frame (resynchronises).
 *   0x02 OPEN       flags u8 (bit 0: a tty) | uid u32 | gid u32 | rows u16 | cols u16 | argc u16 | envc u16 |
 *                   cwd NUL | argv[0] NUL ... | "KEY=VALUE" NUL ...          -> STARTED, or FAILED
 *   0x03 STDIN      data for the command's stdin (the tty when it has one); the host keeps at most WINDOW
 *                   bytes unacknowledged (STDIN-ACK) per session
 *   0x04 STDIN-EOF  close the command's stdin once what came before is written (ignored with a tty)
 *   0x05 RESIZE     rows u16 | cols u16 (TIOCSWINSZ on the pty: the kernel sends SIGWINCH to its foreground)
 *   0x06 SIGNAL     signal u32, to the command's process
 *   0x07 ACK        bytes u32: the host consumed that much of the session's OUTPUT/ERROR-OUTPUT
 *   0x08 CLOSE      the host is done: the session's process group is killed (if still there), the session freed
 *   0x09 INFO       -> INFO-REPLY on the same session id
 * Agent -> host
 *   0x80 READY      session 0, payload "stapes-agent 1": the agent (re)opened the port (it started, or the
 *                   guest rebooted): sessions the host had are gone; the host answers with HELLO
 *   0x81 WELCOME    session 0, payload "stapes-agent 1": the answer to HELLO
 *   0x82 STARTED    pid u32
 *   0x83 OUTPUT     stdout (the tty's output with a tty)
 *   0x84 ERROR-OUTPUT stderr
 *   0x85 OUTPUT-EOF stream u8 (1 stdout/tty, 2 stderr)
 *   0x86 EXIT       status u32: the exit status, or 128 + the signal that killed it; sent once the command's
 *                   output that was there when it exited has been read
 *   0x87 FAILED     code u32 (127: command not found, 126: cannot execute, 1: other) | message; the session ends
 *   0x88 STDIN-ACK  bytes u32 written to the command's stdin
 *   0x89 INFO-REPLY text, one line per fact: "link NAME MAC up|down MTU" and "addr NAME inet|inet6 ADDRESS
 *                   PREFIXLEN global|link|local" (getifaddrs)
 *
 * Flow control: the agent stops reading a session's output while WINDOW bytes of it are unacknowledged (the
 * host's consumer is behind), and every session's while its queue to the port is over QUEUE_LIMIT (the port
 * is behind): the command then blocks on its own pipe or pty, never the agent. Several sessions run at once.
 * A host disconnect shows as POLLHUP (or end of file) on the port: the agent closes it and reopens it,
 * checking every POLL_IDLE_MS until a host is there again; sessions run on until the next HELLO.
 *
 * Where no udev made /dev/virtio-ports/NAME (an initramfs), the port is the /dev/vportNpM whose
 * /sys/class/virtio-ports/vportNpM/name is the name.
 *
 * Options (for tests): -p PATH (the port, default above), -s PATH (connect to a unix socket instead).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netpacket/packet.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_PORT "/dev/virtio-ports/org.stapes.agent"
#define VERSION "stapes-agent 1"
#define HELLO_MAGIC "STAPES01"
#define HEADER 9
#define MAX_PAYLOAD (256 * 1024)
#define CHUNK (32 * 1024)
#define WINDOW (256 * 1024)
#define QUEUE_LIMIT (4 * 1024 * 1024)
#define MAX_SESSIONS 128
#define POLL_IDLE_MS 100

enum {
    T_HELLO = 0x01, T_OPEN, T_STDIN, T_STDIN_EOF, T_RESIZE, T_SIGNAL, T_ACK, T_CLOSE, T_INFO,
    T_READY = 0x80, T_WELCOME, T_STARTED, T_OUTPUT, T_ERROR_OUTPUT, T_OUTPUT_EOF, T_EXIT, T_FAILED, T_STDIN_ACK,
    T_INFO_REPLY,
};

struct buffer {
    unsigned char *data;
    size_t len, cap;
};

struct session {
    uint32_t id;
    pid_t pid;
    int tty;
    int in_fd;             /* the command's stdin (the pty master with a tty), -1 once closed */
    int out_fd[2];         /* stdout (the pty master with a tty), stderr; -1 once at end of file */
    struct buffer input;   /* STDIN not yet written */
    int input_eof;         /* STDIN-EOF came: close in_fd once input is written */
    size_t unacked;        /* output sent (or queued) that the host has not acknowledged */
    int exited, exit_sent, status;
};

static struct session *sessions[MAX_SESSIONS];
static struct buffer outq;   /* frames for the port */
static size_t outq_sent;     /* how much of outq is already written */
static int port = -1;
static int synced;           /* a HELLO was seen since the port was opened */
static const char *port_path = DEFAULT_PORT;
static const char *socket_path;
static unsigned char inbuf[HEADER + MAX_PAYLOAD + 65536];
static size_t inlen;

static void logmsg(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("stapes-agent: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static void buf_append(struct buffer *b, const void *data, size_t len) {
    if (b->len + len > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + len)
            cap *= 2;
        unsigned char *grown = realloc(b->data, cap);
        if (!grown) {
            logmsg("out of memory");
            exit(1);
        }
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
}

static void buf_consume(struct buffer *b, size_t len) {
    memmove(b->data, b->data + len, b->len - len);
    b->len -= len;
}

static void put32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint16_t get16(const unsigned char *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static void send_frame(int type, uint32_t session, const void *payload, size_t len) {
    unsigned char header[HEADER];
    if (port < 0)
        return;  /* no host: nothing is queued for one that is not there */
    header[0] = type;
    put32(header + 1, session);
    put32(header + 5, len);
    buf_append(&outq, header, HEADER);
    if (len)
        buf_append(&outq, payload, len);
}

static void send_u32(int type, uint32_t session, uint32_t value) {
    unsigned char p[4];
    put32(p, value);
    send_frame(type, session, p, 4);
}

static void send_failed(uint32_t session, uint32_t code, const char *message) {
    unsigned char p[4 + 512];
    size_t n = strlen(message);
    if (n > 512)
        n = 512;
    put32(p, code);
    memcpy(p + 4, message, n);
    send_frame(T_FAILED, session, p, 4 + n);
}

static void set_nonblock_cloexec(int fd) {
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    fcntl(fd, F_SETFD, FD_CLOEXEC);
}

static void close_fd(int *fd) {
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

static struct session *find(uint32_t id) {
    for (int i = 0; i < MAX_SESSIONS; i++)
        if (sessions[i] && sessions[i]->id == id)
            return sessions[i];
    return NULL;
}

static void free_session(struct session *s) {
    for (int i = 0; i < MAX_SESSIONS; i++)
        if (sessions[i] == s)
            sessions[i] = NULL;
    if (!s->exited && s->pid > 0) {
        kill(-s->pid, SIGKILL);  /* its process group: the command and what it started in its session */
        kill(s->pid, SIGKILL);   /* (before its setsid) */
    }
    if (s->tty) {
        s->in_fd = -1;  /* the same descriptor as out_fd[0] */
    }
    close_fd(&s->in_fd);
    close_fd(&s->out_fd[0]);
    close_fd(&s->out_fd[1]);
    free(s->input.data);
    free(s);
}

static void kill_all_sessions(void) {
    for (int i = 0; i < MAX_SESSIONS; i++)
        if (sessions[i])
            free_session(sessions[i]);
}

/* Read what one output descriptor has now, within the session's window. Returns 1 if more may be there. */
static int read_output(struct session *s, int stream) {
    int *fd = &s->out_fd[stream];
    unsigned char data[CHUNK];
    while (*fd >= 0 && s->unacked < WINDOW) {
        size_t room = WINDOW - s->unacked;
        ssize_t n = read(*fd, data, room < sizeof data ? room : sizeof data);
        if (n > 0) {
            send_frame(stream ? T_ERROR_OUTPUT : T_OUTPUT, s->id, data, n);
            s->unacked += n;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return 0;
        /* End of file, or EIO: no process holds the pty's other end any more. */
        unsigned char which = stream + 1;
        send_frame(T_OUTPUT_EOF, s->id, &which, 1);
        if (s->tty)
            s->in_fd = -1;  /* the master goes: input has nowhere to go either */
        close_fd(fd);
        return 0;
    }
    return *fd >= 0;
}

/* Once the command exited: EXIT, after the output that was there is sent; the session ends when its output
 * reached its end too. */
static void try_finish(struct session *s) {
    if (!s->exited)
        return;
    if (!s->exit_sent) {
        if (read_output(s, 0) || read_output(s, 1))
            return;  /* the window is full: after the host's ACK */
        send_u32(T_EXIT, s->id, s->status);
        s->exit_sent = 1;
    }
    if (s->out_fd[0] < 0 && s->out_fd[1] < 0)
        free_session(s);
}

static void reap_children(void) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (int i = 0; i < MAX_SESSIONS; i++) {
            struct session *s = sessions[i];
            if (s && s->pid == pid && !s->exited) {
                s->exited = 1;
                s->status = WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
                try_finish(s);
                break;
            }
        }
    }
}

/* The child's side of OPEN. Reports an exec failure's errno on `report` (close-on-exec: silence = it ran). */
static void child(int tty_slave, int pipes[3][2], int report, const char *cwd, char **argv, char **env,
                  uid_t uid, gid_t gid) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
    setsid();
    if (tty_slave >= 0) {
        ioctl(tty_slave, TIOCSCTTY, 0);
        dup2(tty_slave, 0);
        dup2(tty_slave, 1);
        dup2(tty_slave, 2);
        if (tty_slave > 2)
            close(tty_slave);
    } else {
        dup2(pipes[0][0], 0);
        dup2(pipes[1][1], 1);
        dup2(pipes[2][1], 2);
        for (int i = 0; i < 3; i++) {
            if (pipes[i][0] > 2) close(pipes[i][0]);
            if (pipes[i][1] > 2) close(pipes[i][1]);
        }
    }
    int code = 0;
    if (setgroups(0, NULL) != 0 && uid != 0)
        code = errno;
    if (!code && setgid(gid) != 0)
        code = errno;
    if (!code && setuid(uid) != 0)
        code = errno;
    if (code) {
        int message[2] = {1, code};
        if (write(report, message, sizeof message) < 0) {}
        _exit(1);
    }
    if (chdir(cwd) != 0) {
        int message[2] = {2, errno};
        if (write(report, message, sizeof message) < 0) {}
        _exit(1);
    }
    environ = env;
    execvp(argv[0], argv);
    int message[2] = {3, errno};
    if (write(report, message, sizeof message) < 0) {}
    _exit(errno == ENOENT || errno == ENOTDIR ? 127 : 126);
}

static void open_session(uint32_t id, const unsigned char *p, size_t len) {
    char message[600];
    if (id == 0 || find(id)) {
        send_failed(id, 1, "invalid or duplicate session id");
        return;
    }
    int slot = -1;
    for (int i = 0; i < MAX_SESSIONS && slot < 0; i++)
        if (!sessions[i])
            slot = i;
    if (slot < 0) {
        send_failed(id, 1, "too many sessions at once in this guest");
        return;
    }
    if (len < 17 || p[len - 1] != 0) {
        send_failed(id, 1, "malformed OPEN");
        return;
    }
    int tty = p[0] & 1;
    uid_t uid = get32(p + 1);
    gid_t gid = get32(p + 5);
    struct winsize ws = {.ws_row = get16(p + 9), .ws_col = get16(p + 11)};
    unsigned argc = get16(p + 13), envc = get16(p + 15);
    /* The strings: cwd, argv, env, each NUL-terminated (the payload ends with a NUL: checked above). */
    char **strings = calloc(1 + argc + 1 + envc + 2, sizeof *strings);
    if (!strings) {
        send_failed(id, 1, "out of memory");
        return;
    }
    unsigned count = 0;
    for (size_t off = 17; off < len && count < 1 + argc + envc; count++) {
        strings[count] = (char *)p + off;
        off += strlen((char *)p + off) + 1;
    }
    if (argc == 0 || count != 1 + argc + envc) {
        free(strings);
        send_failed(id, 1, "malformed OPEN (argv or environment)");
        return;
    }
    /* In the one allocation: cwd, argv..., NULL, env..., PATH?, NULL. */
    memmove(strings + 1 + argc + 1, strings + 1 + argc, envc * sizeof *strings);
    strings[1 + argc] = NULL;
    char **argv = strings + 1, **env = strings + 1 + argc + 1;
    int has_path = 0;
    for (unsigned i = 0; i < envc; i++)
        has_path |= strncmp(env[i], "PATH=", 5) == 0;
    env[envc] = has_path ? NULL : (char *)"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    env[envc + 1] = NULL;
    const char *cwd = strings[0][0] ? strings[0] : "/";

    int master = -1, slave = -1, pipes[3][2] = {{-1, -1}, {-1, -1}, {-1, -1}}, report[2];
    if (tty) {
        if (ws.ws_row == 0 || ws.ws_col == 0)
            ws.ws_row = 24, ws.ws_col = 80;
        if (openpty(&master, &slave, NULL, NULL, &ws) != 0) {
            snprintf(message, sizeof message, "cannot allocate a pty: %s", strerror(errno));
            send_failed(id, 1, message);
            free(strings);
            return;
        }
    } else {
        for (int i = 0; i < 3; i++)
            if (pipe(pipes[i]) != 0) {
                snprintf(message, sizeof message, "cannot create pipes: %s", strerror(errno));
                send_failed(id, 1, message);
                for (int j = 0; j < i; j++) { close(pipes[j][0]); close(pipes[j][1]); }
                free(strings);
                return;
            }
    }
    if (pipe2(report, O_CLOEXEC) != 0) {
        report[0] = report[1] = -1;
    }
    pid_t pid = fork();
    if (pid == 0) {
        close(report[0]);
        if (master >= 0)
            close(master);
        child(slave, pipes, report[1], cwd, argv, env, uid, gid);
    }
    close(report[1]);
    if (slave >= 0)
        close(slave);
    for (int i = 0; i < 3; i++)
        close(i == 0 ? pipes[i][0] : pipes[i][1]);
    int failure[2] = {0, 0};
    ssize_t got = pid > 0 ? read(report[0], failure, sizeof failure) : -1;
    close(report[0]);
    if (pid < 0 || got == (ssize_t)sizeof failure) {
        if (pid > 0)
            waitpid(pid, NULL, 0);
        close_fd(&master);
        for (int i = 0; i < 3; i++)
            close(i == 0 ? pipes[i][1] : pipes[i][0]);
        int err = pid < 0 ? errno : failure[1];
        if (pid < 0)
            snprintf(message, sizeof message, "cannot fork: %s", strerror(err));
        else if (failure[0] == 1)
            snprintf(message, sizeof message, "cannot switch to uid %u gid %u: %s", uid, gid, strerror(err));
        else if (failure[0] == 2)
            snprintf(message, sizeof message, "cannot change to directory %.256s: %s", cwd, strerror(err));
        else
            snprintf(message, sizeof message, "%.256s: %s", argv[0], strerror(err));
        uint32_t code = failure[0] != 3 ? 1 : (err == ENOENT || err == ENOTDIR) ? 127 : 126;
        send_failed(id, code, message);
        free(strings);
        return;
    }
    free(strings);
    struct session *s = calloc(1, sizeof *s);
    if (!s) {
        logmsg("out of memory");
        exit(1);
    }
    s->id = id;
    s->pid = pid;
    s->tty = tty;
    if (tty) {
        set_nonblock_cloexec(master);
        s->in_fd = s->out_fd[0] = master;
        s->out_fd[1] = -1;
    } else {
        s->in_fd = pipes[0][1];
        s->out_fd[0] = pipes[1][0];
        s->out_fd[1] = pipes[2][0];
        for (int i = 0; i < 3; i++)
            set_nonblock_cloexec(i == 0 ? pipes[i][1] : pipes[i][0]);
    }
    sessions[slot] = s;
    send_u32(T_STARTED, id, pid);
}

static void write_input(struct session *s) {
    while (s->input.len && s->in_fd >= 0) {
        ssize_t n = write(s->in_fd, s->input.data, s->input.len);
        if (n > 0) {
            buf_consume(&s->input, n);
            send_u32(T_STDIN_ACK, s->id, n);
        } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            return;
        } else {
            /* The command closed its stdin (EPIPE): what the host sends more is dropped, yet acknowledged. */
            send_u32(T_STDIN_ACK, s->id, s->input.len);
            s->input.len = 0;
            if (!s->tty)
                close_fd(&s->in_fd);
        }
    }
    if (!s->input.len && s->input_eof && !s->tty)
        close_fd(&s->in_fd);
}

static void info_reply(uint32_t id) {
    struct ifaddrs *list, *ifa;
    struct buffer text = {0};
    char line[256], address[INET6_ADDRSTRLEN];
    if (getifaddrs(&list) != 0) {
        send_frame(T_INFO_REPLY, id, "", 0);
        return;
    }
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    for (ifa = list; ifa; ifa = ifa->ifa_next) {
        if (!ifa->ifa_addr)
            continue;
        int family = ifa->ifa_addr->sa_family;
        if (family == AF_PACKET) {
            struct sockaddr_ll *ll = (struct sockaddr_ll *)ifa->ifa_addr;
            struct ifreq req = {0};
            snprintf(req.ifr_name, sizeof req.ifr_name, "%s", ifa->ifa_name);
            int mtu = sock >= 0 && ioctl(sock, SIOCGIFMTU, &req) == 0 ? req.ifr_mtu : 0;
            unsigned char *m = ll->sll_addr;
            snprintf(line, sizeof line, "link %s %02x:%02x:%02x:%02x:%02x:%02x %s %d\n", ifa->ifa_name,
                     m[0], m[1], m[2], m[3], m[4], m[5], ifa->ifa_flags & IFF_UP ? "up" : "down", mtu);
        } else if (family == AF_INET || family == AF_INET6) {
            const void *raw;
            const char *scope = "global";
            int prefix = 0;
            if (family == AF_INET) {
                raw = &((struct sockaddr_in *)ifa->ifa_addr)->sin_addr;
                uint32_t mask = ifa->ifa_netmask ? ntohl(((struct sockaddr_in *)ifa->ifa_netmask)->sin_addr.s_addr) : 0;
                prefix = __builtin_popcount(mask);
                if ((ntohl(*(const uint32_t *)raw) >> 24) == 127)
                    scope = "local";
            } else {
                struct in6_addr *a6 = &((struct sockaddr_in6 *)ifa->ifa_addr)->sin6_addr;
                raw = a6;
                if (ifa->ifa_netmask) {
                    unsigned char *mb = ((struct sockaddr_in6 *)ifa->ifa_netmask)->sin6_addr.s6_addr;
                    for (int i = 0; i < 16; i++)
                        prefix += __builtin_popcount(mb[i]);
                }
                if (IN6_IS_ADDR_LINKLOCAL(a6))
                    scope = "link";
                else if (IN6_IS_ADDR_LOOPBACK(a6))
                    scope = "local";
            }
            inet_ntop(family, raw, address, sizeof address);
            snprintf(line, sizeof line, "addr %s %s %s %d %s\n", ifa->ifa_name, family == AF_INET ? "inet" : "inet6",
                     address, prefix, scope);
        } else {
            continue;
        }
        if (text.len + strlen(line) < MAX_PAYLOAD)
            buf_append(&text, line, strlen(line));
    }
    if (sock >= 0)
        close(sock);
    freeifaddrs(list);
    send_frame(T_INFO_REPLY, id, text.data, text.len);
    free(text.data);
}

static void handle_frame(int type, uint32_t id, const unsigned char *p, size_t len) {
    struct session *s = id ? find(id) : NULL;
    switch (type) {
    case T_HELLO:
        kill_all_sessions();
        send_frame(T_WELCOME, 0, VERSION, strlen(VERSION));
        break;
    case T_OPEN:
        open_session(id, p, len);
        break;
    case T_STDIN:
        if (s && s->in_fd >= 0) {
            size_t take = len;
            if (s->input.len + take > WINDOW) {
                take = s->input.len < WINDOW ? WINDOW - s->input.len : 0;  /* beyond the window: dropped */
                send_u32(T_STDIN_ACK, id, len - take);
            }
            buf_append(&s->input, p, take);
            write_input(s);
        } else if (s) {
            send_u32(T_STDIN_ACK, id, len);
        }
        break;
    case T_STDIN_EOF:
        if (s) {
            s->input_eof = 1;
            write_input(s);
        }
        break;
    case T_RESIZE:
        if (s && s->tty && len >= 4 && s->out_fd[0] >= 0) {
            struct winsize ws = {.ws_row = get16(p), .ws_col = get16(p + 2)};
            ioctl(s->out_fd[0], TIOCSWINSZ, &ws);
        }
        break;
    case T_SIGNAL:
        if (s && len >= 4 && !s->exited) {
            int sig = get32(p);
            if (sig > 0 && sig < 65)
                kill(s->pid, sig);
        }
        break;
    case T_ACK:
        if (s && len >= 4) {
            uint32_t n = get32(p);
            s->unacked = n > s->unacked ? 0 : s->unacked - n;
            try_finish(s);
        }
        break;
    case T_CLOSE:
        if (s)
            free_session(s);
        break;
    case T_INFO:
        info_reply(id);
        break;
    default:
        logmsg("unknown frame type 0x%02x ignored", type);
    }
}

/* Frames from the port: until the first HELLO, everything before a HELLO frame is discarded. */
static void parse_input(void) {
    static const unsigned char hello[HEADER + 8] = {T_HELLO, 0, 0, 0, 0, 0, 0, 0, 8,
                                                    'S', 'T', 'A', 'P', 'E', 'S', '0', '1'};
    size_t off = 0;
    if (!synced) {
        unsigned char *at = memmem(inbuf, inlen, hello, sizeof hello);
        if (!at) {
            size_t keep = inlen < sizeof hello - 1 ? inlen : sizeof hello - 1;
            memmove(inbuf, inbuf + inlen - keep, keep);
            inlen = keep;
            return;
        }
        off = at - inbuf;
        synced = 1;
    }
    while (inlen - off >= HEADER) {
        uint32_t len = get32(inbuf + off + 5);
        if (len > MAX_PAYLOAD) {
            logmsg("frame of %u bytes refused: resynchronising", len);
            synced = 0;
            off += 1;
            memmove(inbuf, inbuf + off, inlen - off);
            inlen -= off;
            parse_input();
            return;
        }
        if (inlen - off < HEADER + len)
            break;
        handle_frame(inbuf[off], get32(inbuf + off + 1), inbuf + off + HEADER, len);
        off += HEADER + len;
    }
    memmove(inbuf, inbuf + off, inlen - off);
    inlen -= off;
}

/* Without udev (an initramfs), /dev/virtio-ports/NAME does not exist: the port is the vportNpM whose
 * /sys/class/virtio-ports/vportNpM/name holds the name. */
static int open_port_by_name(void) {
    const char *name = strrchr(DEFAULT_PORT, '/') + 1;
    char path[128], text[128];
    for (int dev = 0; dev < 8; dev++)
        for (int n = 0; n < 32; n++) {
            snprintf(path, sizeof path, "/sys/class/virtio-ports/vport%dp%d/name", dev, n);
            FILE *f = fopen(path, "re");
            if (!f)
                continue;
            int match = fgets(text, sizeof text, f) && strncmp(text, name, strlen(name)) == 0 &&
                        (text[strlen(name)] == '\n' || text[strlen(name)] == 0);
            fclose(f);
            if (match) {
                snprintf(path, sizeof path, "/dev/vport%dp%d", dev, n);
                return open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
            }
        }
    errno = ENOENT;
    return -1;
}

static int open_port(void) {
    int fd;
    if (socket_path) {
        struct sockaddr_un addr = {.sun_family = AF_UNIX};
        snprintf(addr.sun_path, sizeof addr.sun_path, "%s", socket_path);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
            close(fd);
            fd = -1;
        }
    } else {
        fd = open(port_path, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
        if (fd < 0 && errno == ENOENT && strcmp(port_path, DEFAULT_PORT) == 0)
            fd = open_port_by_name();
    }
    if (fd < 0)
        return -1;
    port = fd;
    synced = 0;
    inlen = 0;
    outq.len = outq_sent = 0;
    send_frame(T_READY, 0, VERSION, strlen(VERSION));
    return fd;
}

static void close_port(void) {
    close_fd(&port);
    outq.len = outq_sent = 0;
    inlen = 0;
    synced = 0;
}

static void flush_port(void) {
    while (port >= 0 && outq_sent < outq.len) {
        ssize_t n = write(port, outq.data + outq_sent, outq.len - outq_sent);
        if (n > 0) {
            outq_sent += n;
        } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            break;
        } else {
            close_port();  /* the host went (EPIPE, ENODEV): reopened at the next turn */
            return;
        }
    }
    if (outq_sent == outq.len) {
        outq.len = outq_sent = 0;
    } else if (outq_sent > (1 << 20)) {
        buf_consume(&outq, outq_sent);
        outq_sent = 0;
    }
}

int main(int argc, char **argv) {
    int opt;
    while ((opt = getopt(argc, argv, "p:s:")) != -1) {
        if (opt == 'p')
            port_path = optarg;
        else if (opt == 's')
            socket_path = optarg;
        else {
            fprintf(stderr, "usage: stapes-agent [-p PORT] [-s UNIX-SOCKET]\n");
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    int sfd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0) {
        logmsg("signalfd: %s", strerror(errno));
        return 1;
    }
    int waiting_logged = 0;
    struct pollfd fds[2 + 3 * MAX_SESSIONS];
    struct {
        struct session *s;
        int what;  /* 0 stdout, 1 stderr, 2 stdin */
    } owner[2 + 3 * MAX_SESSIONS];
    int hung_up = 0;

    for (;;) {
        if (port < 0) {
            if (open_port() < 0) {
                if (!waiting_logged++)
                    logmsg("waiting for %s", socket_path ? socket_path : port_path);
            } else {
                waiting_logged = 0;
            }
        }
        int n = 0;
        fds[n++] = (struct pollfd){.fd = sfd, .events = POLLIN};
        /* After a hang-up the port is left out for one idle turn: it reports POLLHUP until a host is back. */
        int port_index = -1;
        if (port >= 0 && !hung_up) {
            port_index = n;
            fds[n++] = (struct pollfd){.fd = port, .events = POLLIN | (outq_sent < outq.len ? POLLOUT : 0)};
        }
        int first = n;
        int behind = outq.len - outq_sent > QUEUE_LIMIT;
        for (int i = 0; i < MAX_SESSIONS; i++) {
            struct session *s = sessions[i];
            if (!s)
                continue;
            for (int k = 0; k < 2; k++)
                if (s->out_fd[k] >= 0 && s->unacked < WINDOW && !behind && port >= 0 && !s->exited) {
                    owner[n].s = s, owner[n].what = k;
                    fds[n++] = (struct pollfd){.fd = s->out_fd[k], .events = POLLIN};
                }
            if (s->in_fd >= 0 && s->input.len) {
                owner[n].s = s, owner[n].what = 2;
                fds[n++] = (struct pollfd){.fd = s->in_fd, .events = POLLOUT};
            }
        }
        /* Exited commands' output is read by try_finish (bounded); background writers after EXIT here: */
        for (int i = 0; i < MAX_SESSIONS; i++) {
            struct session *s = sessions[i];
            if (s && s->exited && s->exit_sent && !behind && port >= 0)
                for (int k = 0; k < 2; k++)
                    if (s->out_fd[k] >= 0 && s->unacked < WINDOW) {
                        owner[n].s = s, owner[n].what = k;
                        fds[n++] = (struct pollfd){.fd = s->out_fd[k], .events = POLLIN};
                    }
        }
        int timeout = port < 0 || hung_up ? POLL_IDLE_MS : -1;
        hung_up = 0;
        if (poll(fds, n, timeout) < 0) {
            if (errno == EINTR)
                continue;
            logmsg("poll: %s", strerror(errno));
            return 1;
        }
        if (fds[0].revents) {
            struct signalfd_siginfo info;
            while (read(sfd, &info, sizeof info) == sizeof info) {}
            reap_children();
        }
        if (port_index >= 0 && fds[port_index].revents) {
            short ev = fds[port_index].revents;
            int gone = (ev & (POLLHUP | POLLERR | POLLNVAL)) != 0;
            if (ev & POLLIN) {
                ssize_t got = read(port, inbuf + inlen, sizeof inbuf - inlen);
                if (got > 0) {
                    inlen += got;
                    parse_input();
                    gone = 0;  /* what the host wrote before it went is read first */
                } else if (got == 0 || (errno != EAGAIN && errno != EINTR)) {
                    gone = 1;
                }
            }
            if (gone) {
                /* The host is gone (virtio-serial: POLLHUP while no host is connected): reopen the port. */
                close_port();
                hung_up = 1;
                continue;
            }
        }
        for (int i = first; i < n; i++) {
            if (!fds[i].revents || port < 0)
                continue;
            struct session *s = owner[i].s;
            if (find(s->id) != s)
                continue;  /* freed meanwhile */
            if (owner[i].what == 2)
                write_input(s);
            else
                read_output(s, owner[i].what);
            if (find(s->id) == s)
                try_finish(s);
        }
        flush_port();
    }
}
