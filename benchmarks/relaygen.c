/* A lean load generator for the relay scenario against signaling_trio (v2 `peer_message`).
 *
 * Why it exists: on a 2-core machine the load generator shares the cores with the servers
 * it measures, so what `--workers 2` can show over `--workers 1` is bounded by
 * 2s/(s + g), s and g the server's and the generator's CPU per message (see
 * benchmarks/workers.py). Node's `ws` costs ~20 us per message; this costs a few, so the
 * figure measures the servers rather than the generator. It does what loadgen.mjs's
 * `relay` scenario does for target "ours", on the same wire: one TCP connection per peer,
 * masked text frames, TCP_NODELAY, no compression. The frames answering what one recv
 * read go out in one send (a client corking its socket while it handles a read); with
 * --one-send-per-message each goes in a send of its own, as loadgen.mjs sends them. With
 * --peerjs it drives the PeerJS server instead, as loadgen.mjs's target "peerjs" does
 * (peer k dials PATH + "peerjs?key=peerjs&id=K&token=tK", waits for OPEN, and each
 * message is an OFFER to `dst` carrying the same payload; rooms and tokens are unused).
 *
 *   cc -O2 -o relaygen relaygen.c && ./relaygen [--one-send-per-message] [--peerjs] CONFIG
 *
 * CONFIG, whitespace-separated (benchmarks/cluster.py writes it):
 *   host port path pairs inflight duration_s warmup_s pad id_token n_rooms
 *   room_id token   (n_rooms times; pair i registers in room i % n_rooms)
 * Prints loadgen.mjs's JSON lines: {"phase":"measure"} when the measured window opens,
 * then {"phase":"done","result":{...}} with delivered, msgs_per_s, rtt_p50_ms, rtt_p99_ms.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>

#define INBUF (1 << 16)

typedef struct {
    int fd;
    char in[INBUF];
    size_t have;
    char *out; /* bytes a send could not take yet, or frames held while corked */
    size_t out_len, out_cap;
    int out_armed; /* EPOLLOUT is asked for */
} conn_t;

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "relaygen: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int epfd = -1;
/* While set, frames wait in `out` and go in one send when the frames read in one recv are
 * handled (what a client corking its socket does); 0 with `--one-send-per-message`. */
static int corked, cork_reads = 1;

static void want_write(conn_t *c, int on) {
    if (c->out_armed == on) return;
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c};
    if (epfd >= 0 && epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
    c->out_armed = on;
}

static void queue_out(conn_t *c, const char *p, size_t n) {
    if (c->out_len + n > c->out_cap) {
        c->out_cap = (c->out_len + n) * 2;
        c->out = realloc(c->out, c->out_cap);
        if (!c->out) die("out of memory");
    }
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
}

/* Send what is queued, then `p`; whatever the socket does not take waits for EPOLLOUT. */
static void send_bytes(conn_t *c, const char *p, size_t n) {
    if (c->out_len || corked) { queue_out(c, p, n); return; }
    while (n) {
        ssize_t k = send(c->fd, p, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0 && errno == EAGAIN) break;
        if (k < 0) die("send: %s", strerror(errno));
        p += k;
        n -= (size_t)k;
    }
    if (n) { queue_out(c, p, n); want_write(c, 1); }
}

static void flush_out(conn_t *c) {
    size_t off = 0;
    while (off < c->out_len) {
        ssize_t k = send(c->fd, c->out + off, c->out_len - off, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0 && errno == EAGAIN) break;
        if (k < 0) die("send: %s", strerror(errno));
        off += (size_t)k;
    }
    memmove(c->out, c->out + off, c->out_len - off);
    c->out_len -= off;
    want_write(c, c->out_len != 0);
}

/* One masked frame (FIN set), as a client must send it (RFC 6455 5.3). */
static void send_frame(conn_t *c, int opcode, const char *msg, size_t n) {
    static const unsigned char mask[4] = {0x37, 0xfa, 0x21, 0x3d};
    char f[14 + 4096];
    size_t h = 0;
    if (n > 4096) die("message too long for one frame here: %zu", n);
    f[h++] = (char)(0x80 | opcode);
    if (n < 126) {
        f[h++] = (char)(0x80 | n);
    } else {
        f[h++] = (char)(0x80 | 126);
        f[h++] = (char)(n >> 8);
        f[h++] = (char)(n & 0xff);
    }
    memcpy(f + h, mask, 4);
    h += 4;
    for (size_t i = 0; i < n; i++) f[h + i] = (char)(msg[i] ^ mask[i & 3]);
    send_bytes(c, f, h + n);
}

static void send_text(conn_t *c, const char *msg, size_t n) { send_frame(c, 0x1, msg, n); }

/* The next whole frame in c->in: 1 and its opcode, payload and total size, or 0. */
static int next_frame(conn_t *c, int *op, char **payload, size_t *len, size_t *total) {
    unsigned char *b = (unsigned char *)c->in;
    if (c->have < 2) return 0;
    if (b[1] & 0x80) die("the server masked a frame");
    if (!(b[0] & 0x80)) die("fragmented frames are not expected here");
    size_t h = 2, n = b[1] & 0x7f;
    if (n == 126) {
        if (c->have < 4) return 0;
        n = ((size_t)b[2] << 8) | b[3];
        h = 4;
    } else if (n == 127) {
        if (c->have < 10) return 0;
        n = 0;
        for (int i = 2; i < 10; i++) n = (n << 8) | b[i];
        h = 10;
    }
    if (h + n > INBUF) die("frame of %zu bytes is over the buffer", n);
    if (c->have < h + n) return 0;
    *op = b[0] & 0x0f;
    *payload = c->in + h;
    *len = n;
    *total = h + n;
    return 1;
}

static void consume(conn_t *c, size_t n) {
    memmove(c->in, c->in + n, c->have - n);
    c->have -= n;
}

static int read_some(conn_t *c) {
    ssize_t k = recv(c->fd, c->in + c->have, INBUF - c->have, 0);
    if (k == 0) die("the server closed a connection");
    if (k < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
    if (k < 0) die("recv: %s", strerror(errno));
    c->have += (size_t)k;
    return 1;
}

/* Blocking: the next text message (answering pings on the way), NUL-terminated copy. */
static char *blocking_text(conn_t *c) {
    for (;;) {
        int op;
        char *p;
        size_t n, total;
        while (!next_frame(c, &op, &p, &n, &total)) read_some(c);
        if (op == 1) {
            char *s = malloc(n + 1);
            memcpy(s, p, n);
            s[n] = 0;
            consume(c, total);
            return s;
        }
        if (op == 8) die("the server closed a connection while it registered");
        consume(c, total);
    }
}

static void dial(conn_t *c, const char *host, const char *port, const char *path) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(host, port, &hints, &ai)) die("cannot resolve %s", host);
    c->fd = socket(ai->ai_family, SOCK_STREAM, 0);
    if (c->fd < 0 || connect(c->fd, ai->ai_addr, ai->ai_addrlen) < 0) die("connect: %s", strerror(errno));
    freeaddrinfo(ai);
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char req[512];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                     path, host, port);
    send_bytes(c, req, (size_t)n);
    char *end;
    for (;;) {
        read_some(c);
        c->in[c->have < INBUF ? c->have : INBUF - 1] = 0;
        if ((end = strstr(c->in, "\r\n\r\n"))) break;
    }
    if (strncmp(c->in, "HTTP/1.1 101", 12)) die("handshake refused: %.40s", c->in);
    consume(c, (size_t)(end + 4 - c->in));
}

/* What a message is on each server's wire: its type, and the key naming its receiver
 * (`--peerjs` sets them); `type_tag` is `"type":"<msg_type>"`, what marks one. */
static int peerjs;
static const char *msg_type = "peer_message", *to_key = "to_peer_id";
static char type_tag[64];
static size_t type_tag_len;

static void reg(conn_t *c, const char *peer, const char *room, const char *token, const char *id_token) {
    if (peerjs) { /* the server opens the session itself */
        char *reply = blocking_text(c);
        if (!strstr(reply, "\"type\":\"OPEN\"")) die("PeerJS refused: %.200s", reply);
        free(reply);
        return;
    }
    char m[4096];
    int n = snprintf(m, sizeof m,
                     "{\"type\":\"register\",\"peer_id\":\"%s\",\"room_id\":\"%s\",\"token\":\"%s\","
                     "\"id_token\":\"%s\",\"role\":\"peer\",\"metadata\":{}}",
                     peer, room, token, id_token);
    if (n >= (int)sizeof m) die("register message too long");
    send_text(c, m, (size_t)n);
    char *reply = blocking_text(c);
    if (!strstr(reply, "\"type\":\"registered_auth\"")) die("register refused: %.200s", reply);
    free(reply);
}

/* The JSON value after "payload": in a message, as [start, end) (an object here). */
static int payload_span(const char *p, size_t n, const char **s, const char **e) {
    const char *k = memmem(p, n, "\"payload\":", 10);
    if (!k || k[10] != '{') return 0;
    int depth = 0, in_str = 0;
    for (const char *q = k + 10; q < p + n; q++) {
        if (in_str) {
            if (*q == '\\') q++;
            else if (*q == '"') in_str = 0;
        } else if (*q == '"') in_str = 1;
        else if (*q == '{') depth++;
        else if (*q == '}' && --depth == 0) {
            *s = k + 10;
            *e = q + 1;
            return 1;
        }
    }
    return 0;
}

static struct {
    int pairs, inflight, measuring, stopping;
    long delivered;
    double *rtts;
    size_t n_rtts, cap_rtts;
    char pad[1025];
} st;

static void send_fresh(conn_t *a, int i) {
    char m[2048];
    int n = snprintf(m, sizeof m, "{\"type\":\"%s\",\"%s\":\"b-%d\",\"payload\":{\"t\":%.6f,\"p\":\"%s\"}}",
                     msg_type, to_key, i, now_ms(), st.pad);
    send_text(a, m, (size_t)n);
}

static void on_message(conn_t *conns, int idx, const char *p, size_t n) {
    int i = idx % st.pairs, is_b = idx >= st.pairs;
    if (!memmem(p, n, type_tag, type_tag_len)) return; /* loadgen.mjs ignores others too */
    const char *s, *e;
    if (!payload_span(p, n, &s, &e)) die("peer_message without an object payload: %.200s", p);
    if (st.measuring) st.delivered++;
    if (is_b) { /* echo the payload back to a-i */
        char m[2048];
        int k = snprintf(m, sizeof m, "{\"type\":\"%s\",\"%s\":\"a-%d\",\"payload\":%.*s}", msg_type, to_key,
                         i, (int)(e - s), s);
        send_text(&conns[idx], m, (size_t)k);
        return;
    }
    if (st.measuring) {
        const char *t = memmem(s, (size_t)(e - s), "\"t\":", 4);
        if (!t) die("echo without its time");
        if (st.n_rtts == st.cap_rtts) {
            st.cap_rtts = st.cap_rtts ? st.cap_rtts * 2 : 1 << 16;
            st.rtts = realloc(st.rtts, st.cap_rtts * sizeof *st.rtts);
            if (!st.rtts) die("out of memory");
        }
        st.rtts[st.n_rtts++] = now_ms() - strtod(t + 4, NULL);
    }
    if (!st.stopping) send_fresh(&conns[i], i);
}

static void on_readable(conn_t *conns, int idx) {
    conn_t *c = &conns[idx];
    int op;
    char *p;
    size_t n, total;
    if (!read_some(c)) return; /* epoll is level-triggered: what is left wakes it again */
    corked = cork_reads; /* every frame this read answers is sent on c itself */
    while (next_frame(c, &op, &p, &n, &total)) {
        if (op == 1) on_message(conns, idx, p, n);
        else if (op == 9) send_frame(c, 0xA, p, n); /* ping: the same payload back in a pong */
        else if (op == 8) die("the server closed a connection");
        consume(c, total);
    }
    corked = 0;
    if (c->out_len && !c->out_armed) flush_out(c);
}

static int cmp_double(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

static double pct(double p) {
    size_t k = (size_t)(p / 100 * (double)st.n_rtts);
    return st.n_rtts ? st.rtts[k < st.n_rtts ? k : st.n_rtts - 1] : -1;
}

/* Run the loop until `until` (ms, monotonic). */
static void loop(conn_t *conns, double until) {
    struct epoll_event evs[256];
    for (double t; (t = now_ms()) < until;) {
        int n = epoll_wait(epfd, evs, 256, (int)(until - t) + 1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) die("epoll_wait: %s", strerror(errno));
        for (int k = 0; k < n; k++) {
            conn_t *c = evs[k].data.ptr;
            if (evs[k].events & EPOLLOUT) flush_out(c);
            if (evs[k].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(conns, (int)(c - conns));
        }
    }
}

int main(int argc, char **argv) {
    for (; argc > 2 && !strncmp(argv[1], "--", 2); argv++, argc--) {
        if (!strcmp(argv[1], "--one-send-per-message")) cork_reads = 0;
        else if (!strcmp(argv[1], "--peerjs")) peerjs = 1, msg_type = "OFFER", to_key = "dst";
        else die("unknown option %s", argv[1]);
    }
    type_tag_len = (size_t)snprintf(type_tag, sizeof type_tag, "\"type\":\"%s\"", msg_type);
    if (argc != 2) die("usage: relaygen [--one-send-per-message] [--peerjs] CONFIG");
    FILE *f = fopen(argv[1], "r");
    if (!f) die("cannot open %s", argv[1]);
    char host[256], port[16], path[256], id_token[4096];
    double duration, warmup;
    int pad, n_rooms;
    if (fscanf(f, "%255s %15s %255s %d %d %lf %lf %d %4095s %d", host, port, path, &st.pairs, &st.inflight,
               &duration, &warmup, &pad, id_token, &n_rooms) != 10 || n_rooms < 1 || st.pairs < 1 || pad > 1024)
        die("bad config");
    char (*room)[128] = calloc((size_t)n_rooms, 128), (*token)[1024] = calloc((size_t)n_rooms, 1024);
    for (int r = 0; r < n_rooms; r++)
        if (fscanf(f, "%127s %1023s", room[r], token[r]) != 2) die("bad config: room %d", r);
    fclose(f);
    memset(st.pad, 'x', (size_t)pad);

    int P = st.pairs;
    conn_t *conns = calloc((size_t)(2 * P), sizeof *conns); /* a-0..a-(P-1), then b-0.. */
    if (!conns) die("out of memory");
    char id[32], where[512];
    for (int k = 0; k < 2 * P; k++) {
        int i = k % P;
        snprintf(id, sizeof id, "%c-%d", k < P ? 'a' : 'b', i);
        if (peerjs) snprintf(where, sizeof where, "%speerjs?key=peerjs&id=%s&token=t%s", path, id, id);
        else snprintf(where, sizeof where, "%s", path);
        dial(&conns[k], host, port, where);
        reg(&conns[k], id, room[i % n_rooms], token[i % n_rooms], id_token);
    }
    epfd = epoll_create1(0);
    for (int k = 0; k < 2 * P; k++) {
        fcntl(conns[k].fd, F_SETFL, fcntl(conns[k].fd, F_GETFL) | O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &conns[k]};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, conns[k].fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
    }
    for (int i = 0; i < P; i++)
        for (int w = 0; w < st.inflight; w++) send_fresh(&conns[i], i);
    loop(conns, now_ms() + warmup * 1e3);
    printf("{\"phase\":\"measure\"}\n");
    fflush(stdout);
    st.measuring = 1;
    double t0 = now_ms();
    loop(conns, t0 + duration * 1e3);
    st.measuring = 0;
    double secs = (now_ms() - t0) / 1e3;
    st.stopping = 1;
    qsort(st.rtts, st.n_rtts, sizeof *st.rtts, cmp_double);
    printf("{\"phase\":\"done\",\"result\":{\"delivered\":%ld,\"msgs_per_s\":%.3f,\"rtt_p50_ms\":%.4f,"
           "\"rtt_p99_ms\":%.4f,\"samples\":%zu,\"seconds\":%.4f}}\n",
           st.delivered, st.delivered / secs, pct(50), pct(99), st.n_rtts, secs);
    fflush(stdout);
    return 0;
}
