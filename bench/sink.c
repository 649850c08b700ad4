/*
 * sink: the service end of the inbox and saga benchmarks.
 *
 *   sink -p PORT [-a ADDRESS]
 *
 * A single-threaded HTTP/1.1 server on ADDRESS (default 127.0.0.1) that
 * answers every request at once with 200 and a small JSON body
 * ({"ok":true}), keeping connections alive. It counts the requests and
 * records their arrival times (CLOCK_REALTIME). When a request's Message-Id
 * ends in "-<digits>" and those digits look like a Unix time in nanoseconds
 * (bench/pace puts its send time there), the sink also records
 * arrival - send.
 *
 * It stands for a service that costs nothing, so that the benchmarks
 * measure sagad and not the stand-in: plain epoll, one read per readable
 * connection, every complete request in it answered, the answers written
 * with one write. It understands what HTTP clients send (request line,
 * headers, a Content-Length body, "Connection: close", HTTP/1.0); a
 * chunked request body gets 501 and the connection is closed.
 *
 * Control requests (not counted):
 *
 *   GET /stats       {"count":N,"first_ns":T,"last_ns":T,"lat_n":N,
 *                     "paths":{"/a":N,...}}  (requests per path, the
 *                     first 16 distinct paths)
 *   GET /latencies   one "latency_ns" line per timed request, arrival order
 *   POST /reset      forget everything counted so far
 *
 * It prints "sink port=PORT" on stdout once it listens, and exits on
 * SIGTERM or SIGINT.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>

#define MAX_PATHS 16
#define MAX_REQUEST (1 << 20)	/* head + body; larger: 413, closed */
#define READ_CHUNK 65536

struct buf {
	char *p;
	size_t len, cap;
};

struct conn {
	int fd;
	int closing;		/* close once the output is written */
	struct buf in, out;
};

static struct {
	char *path[MAX_PATHS];
	uint64_t path_count[MAX_PATHS];
	size_t npaths;
	uint64_t count;
	int64_t first_ns, last_ns;
	int64_t *lat;
	size_t nlat, caplat;
	int ep;
} g;

static void *
xrealloc(void *p, size_t n)
{
	if ((p = realloc(p, n)) == NULL) {
		fprintf(stderr, "sink: out of memory\n");
		exit(1);
	}
	return p;
}

static void
buf_reserve(struct buf *b, size_t more)
{
	if (b->len + more <= b->cap)
		return;
	while (b->len + more > b->cap)
		b->cap = b->cap ? b->cap * 2 : 4096;
	b->p = xrealloc(b->p, b->cap);
}

static void
buf_add(struct buf *b, const char *s, size_t n)
{
	buf_reserve(b, n);
	memcpy(b->p + b->len, s, n);
	b->len += n;
}

static void
buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void
buf_printf(struct buf *b, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	buf_reserve(b, (size_t)n + 1);
	va_start(ap, fmt);
	vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
	va_end(ap);
	b->len += (size_t)n;
}

static int64_t
real_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The send time at the end of a message id ("...-<ns>"), or -1. */
static int64_t
id_time(const char *id, size_t len)
{
	size_t i = len;
	int64_t v = 0;

	while (i > 0 && id[i - 1] >= '0' && id[i - 1] <= '9')
		i--;
	if (i == 0 || id[i - 1] != '-' || len - i < 19 || len - i > 19)
		return -1;
	for (; i < len; i++)
		v = v * 10 + (id[i] - '0');
	/* 2001-09-09 .. 2286: a Unix time in ns, not a sequence number */
	return v >= 1000000000000000000LL ? v : -1;
}

/* One request, as far as the sink cares. */
struct req {
	const char *method, *path;
	size_t method_len, path_len;
	const char *msgid;
	size_t msgid_len;
	size_t head_len, body_len;
	int close, chunked, bad;
};

static int
hdr_is(const char *line, size_t len, const char *name, const char **val, size_t *vlen)
{
	size_t n = strlen(name);

	if (len <= n || line[n] != ':' || strncasecmp(line, name, n) != 0)
		return 0;
	line += n + 1;
	len -= n + 1;
	while (len > 0 && (*line == ' ' || *line == '\t'))
		line++, len--;
	while (len > 0 && (line[len - 1] == ' ' || line[len - 1] == '\t'))
		len--;
	*val = line;
	*vlen = len;
	return 1;
}

/* Parses the head at p (n bytes available). 0: incomplete; else 1. */
static int
req_parse(const char *p, size_t n, struct req *r)
{
	const char *end = memmem(p, n, "\r\n\r\n", 4), *line, *sp, *nl;
	const char *v;
	size_t vlen;

	memset(r, 0, sizeof *r);
	if (end == NULL)
		return 0;
	r->head_len = (size_t)(end - p) + 4;
	nl = memchr(p, '\r', r->head_len);
	/* request line: METHOD SP PATH SP VERSION */
	sp = memchr(p, ' ', (size_t)(nl - p));
	if (sp == NULL) {
		r->bad = 1;
		return 1;
	}
	r->method = p;
	r->method_len = (size_t)(sp - p);
	r->path = sp + 1;
	sp = memchr(r->path, ' ', (size_t)(nl - r->path));
	if (sp == NULL) {
		r->bad = 1;
		return 1;
	}
	r->path_len = (size_t)(sp - r->path);
	if ((size_t)(nl - sp - 1) == 8 && memcmp(sp + 1, "HTTP/1.0", 8) == 0)
		r->close = 1;
	for (line = nl + 2; line < end; line = nl + 2) {
		size_t len;

		nl = memchr(line, '\r', (size_t)(end - line) + 1);
		len = (size_t)(nl - line);
		if (hdr_is(line, len, "Content-Length", &v, &vlen)) {
			char num[24];
			char *e;

			if (vlen == 0 || vlen >= sizeof num) {
				r->bad = 1;
				continue;
			}
			memcpy(num, v, vlen);
			num[vlen] = '\0';
			r->body_len = strtoull(num, &e, 10);
			if (*e != '\0')
				r->bad = 1;
		} else if (hdr_is(line, len, "Message-Id", &v, &vlen)) {
			r->msgid = v;
			r->msgid_len = vlen;
		} else if (hdr_is(line, len, "Connection", &v, &vlen)) {
			if (vlen == 5 && strncasecmp(v, "close", 5) == 0)
				r->close = 1;
			else if (vlen == 10 && strncasecmp(v, "keep-alive", 10) == 0)
				r->close = 0;
		} else if (hdr_is(line, len, "Transfer-Encoding", &v, &vlen)) {
			r->chunked = 1;
		}
	}
	return 1;
}

static void
answer(struct conn *c, int status, const char *type, const char *body, size_t len,
    int close)
{
	buf_printf(&c->out, "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s\r\n",
	    status, status == 200 ? "OK" : "Error", type, len,
	    close ? "Connection: close\r\n" : "");
	buf_add(&c->out, body, len);
}

static int
is(const struct req *r, const char *method, const char *path)
{
	return r->method_len == strlen(method) && memcmp(r->method, method, r->method_len) == 0 &&
	    r->path_len == strlen(path) && memcmp(r->path, path, r->path_len) == 0;
}

/* Answers a control request; 0 if r is not one. */
static int
control(struct conn *c, const struct req *r)
{
	struct buf b = { 0 };
	size_t i;

	if (is(r, "GET", "/stats")) {
		buf_printf(&b, "{\"count\":%" PRIu64 ",\"first_ns\":%" PRId64
		    ",\"last_ns\":%" PRId64 ",\"lat_n\":%zu,\"paths\":{", g.count,
		    g.first_ns, g.last_ns, g.nlat);
		for (i = 0; i < g.npaths; i++)
			buf_printf(&b, "%s\"%s\":%" PRIu64, i ? "," : "", g.path[i],
			    g.path_count[i]);
		buf_printf(&b, "}}");
		answer(c, 200, "application/json", b.p, b.len, r->close);
	} else if (is(r, "GET", "/latencies")) {
		for (i = 0; i < g.nlat; i++)
			buf_printf(&b, "%" PRId64 "\n", g.lat[i]);
		answer(c, 200, "text/plain", b.p ? b.p : "", b.len, r->close);
	} else if (is(r, "POST", "/reset")) {
		g.count = 0;
		g.first_ns = g.last_ns = 0;
		g.nlat = 0;
		for (i = 0; i < g.npaths; i++)
			g.path_count[i] = 0;
		answer(c, 200, "application/json", "{\"ok\":true}", 11, r->close);
	} else {
		return 0;
	}
	free(b.p);
	return 1;
}

/* Requests per path (no query); paths with '"' or '\\' are not counted. */
static void
count_path(const char *path, size_t n)
{
	size_t i, len = 0;

	while (len < n && path[len] != '?')
		len++;
	if (len > 200 || memchr(path, '"', len) || memchr(path, '\\', len))
		return;
	for (i = 0; i < g.npaths; i++)
		if (strlen(g.path[i]) == len && strncmp(g.path[i], path, len) == 0) {
			g.path_count[i]++;
			return;
		}
	if (g.npaths < MAX_PATHS && (g.path[g.npaths] = strndup(path, len)) != NULL)
		g.path_count[g.npaths++] = 1;
}

static void
count(const struct req *r, int64_t now)
{
	int64_t sent;

	g.count++;
	count_path(r->path, r->path_len);
	if (g.first_ns == 0)
		g.first_ns = now;
	g.last_ns = now;
	if (r->msgid && (sent = id_time(r->msgid, r->msgid_len)) > 0) {
		if (g.nlat == g.caplat) {
			g.caplat = g.caplat ? g.caplat * 2 : 65536;
			g.lat = xrealloc(g.lat, g.caplat * sizeof *g.lat);
		}
		g.lat[g.nlat++] = now - sent;
	}
}

/* Answers every complete request in c->in; the rest waits for more. */
static void
serve(struct conn *c)
{
	size_t off = 0;
	int64_t now = 0;
	struct req r;

	while (!c->closing && req_parse(c->in.p + off, c->in.len - off, &r)) {
		if (r.bad) {
			answer(c, 400, "application/json", "{\"error\":\"bad-request\"}", 23, 1);
			c->closing = 1;
			break;
		}
		if (r.chunked) {
			answer(c, 501, "application/json", "{\"error\":\"chunked\"}", 19, 1);
			c->closing = 1;
			break;
		}
		if (r.head_len + r.body_len > MAX_REQUEST) {
			answer(c, 413, "application/json", "{\"error\":\"too-large\"}", 21, 1);
			c->closing = 1;
			break;
		}
		if (c->in.len - off < r.head_len + r.body_len)
			break;
		if (!control(c, &r)) {
			if (now == 0)
				now = real_ns();
			count(&r, now);
			answer(c, 200, "application/json", "{\"ok\":true}", 11, r.close);
		}
		c->closing = r.close;
		off += r.head_len + r.body_len;
	}
	memmove(c->in.p, c->in.p + off, c->in.len - off);
	c->in.len -= off;
	if (c->in.len >= MAX_REQUEST && !c->closing) {
		answer(c, 413, "application/json", "{\"error\":\"too-large\"}", 21, 1);
		c->closing = 1;
	}
}

static void
conn_free(struct conn *c)
{
	close(c->fd);	/* also leaves the epoll set */
	free(c->in.p);
	free(c->out.p);
	free(c);
}

/* Writes what it can; 1 if everything is out, 0 if more must wait, -1 on error. */
static int
flush(struct conn *c)
{
	size_t off = 0;

	while (off < c->out.len) {
		ssize_t n = write(c->fd, c->out.p + off, c->out.len - off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			break;
		if (n <= 0)
			return -1;
		off += (size_t)n;
	}
	memmove(c->out.p, c->out.p + off, c->out.len - off);
	c->out.len -= off;
	return c->out.len == 0;
}

static void
conn_event(struct conn *c, uint32_t ev)
{
	struct epoll_event e = { .data.ptr = c };
	size_t had = c->out.len;
	int rc;

	if ((ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) && !c->closing) {
		ssize_t n;

		buf_reserve(&c->in, READ_CHUNK);
		n = read(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len);
		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
			conn_free(c);
			return;
		}
		if (n > 0) {
			c->in.len += (size_t)n;
			serve(c);
		}
	}
	if (c->out.len == 0 && !c->closing)
		return;
	if ((rc = flush(c)) < 0 || (rc == 1 && c->closing)) {
		conn_free(c);
		return;
	}
	/* Output left over: wait for room instead of reading more. */
	if ((rc == 0) != (had > 0)) {
		e.events = rc == 0 ? EPOLLOUT : EPOLLIN;
		epoll_ctl(g.ep, EPOLL_CTL_MOD, c->fd, &e);
	}
}

static void
accept_all(int lfd)
{
	int fd, one = 1;

	while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
		struct conn *c = calloc(1, sizeof *c);
		struct epoll_event e = { .events = EPOLLIN };

		if (c == NULL) {
			close(fd);
			continue;
		}
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		c->fd = fd;
		e.data.ptr = c;
		if (epoll_ctl(g.ep, EPOLL_CTL_ADD, fd, &e) < 0)
			conn_free(c);
	}
}

static int
listen_on(const char *addr, int *port)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	socklen_t sl = sizeof sin;
	int fd, one = 1;

	if (inet_pton(AF_INET, addr, &sin.sin_addr) != 1)
		return -1;
	sin.sin_port = htons((uint16_t)*port);
	fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (bind(fd, (struct sockaddr *)&sin, sizeof sin) < 0 || listen(fd, 512) < 0 ||
	    getsockname(fd, (struct sockaddr *)&sin, &sl) < 0) {
		close(fd);
		return -1;
	}
	*port = ntohs(sin.sin_port);
	return fd;
}

int
main(int argc, char **argv)
{
	const char *addr = "127.0.0.1";
	struct epoll_event ev[256], e = { .events = EPOLLIN };
	int lfd, sfd, port = -1, ch, i, n;
	sigset_t mask;

	while ((ch = getopt(argc, argv, "p:a:")) != -1) {
		switch (ch) {
		case 'p': port = atoi(optarg); break;
		case 'a': addr = optarg; break;
		default:
			fprintf(stderr, "usage: sink -p PORT [-a ADDRESS]\n");
			return 2;
		}
	}
	if (port < 0 || optind != argc) {
		fprintf(stderr, "usage: sink -p PORT [-a ADDRESS]\n");
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigprocmask(SIG_BLOCK, &mask, NULL);
	if ((lfd = listen_on(addr, &port)) < 0) {
		fprintf(stderr, "sink: cannot listen on %s:%d: %s\n", addr, port, strerror(errno));
		return 1;
	}
	if ((g.ep = epoll_create1(EPOLL_CLOEXEC)) < 0 ||
	    (sfd = signalfd(-1, &mask, SFD_CLOEXEC)) < 0) {
		fprintf(stderr, "sink: %s\n", strerror(errno));
		return 1;
	}
	/* data.ptr NULL: the listener; &sfd: the signals */
	e.data.ptr = NULL;
	epoll_ctl(g.ep, EPOLL_CTL_ADD, lfd, &e);
	e.data.ptr = &sfd;
	epoll_ctl(g.ep, EPOLL_CTL_ADD, sfd, &e);
	printf("sink port=%d\n", port);
	fflush(stdout);
	for (;;) {
		n = epoll_wait(g.ep, ev, 256, -1);
		if (n < 0 && errno != EINTR) {
			fprintf(stderr, "sink: epoll_wait: %s\n", strerror(errno));
			return 1;
		}
		for (i = 0; i < n; i++) {
			if (ev[i].data.ptr == NULL)
				accept_all(lfd);
			else if (ev[i].data.ptr == &sfd)
				return 0;
			else
				conn_event(ev[i].data.ptr, ev[i].events);
		}
	}
}
