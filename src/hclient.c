#include "hclient.h"
#include "util.h"
#include "xmalloc.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/util.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

/* ---- the answer parser ---- */

void
hparse_init(struct hparse *p, size_t max_body, size_t max_headers)
{
	memset(p, 0, sizeof *p);
	p->state = HP_STATUS;
	p->max_body = max_body;
	p->max_headers = max_headers;
	p->body = evbuffer_new();
}

void
hparse_clear(struct hparse *p)
{
	free(p->content_type);
	if (p->body)
		evbuffer_free(p->body);
	memset(p, 0, sizeof *p);
}

static enum hparse_state
hparse_fail(struct hparse *p, enum hclient_result why)
{
	p->error = why;
	return p->state = HP_ERROR;
}

/* One CRLF- (or LF-) terminated line, counted against the header limit;
 * NULL when it has not all arrived yet. */
static char *
hparse_line(struct hparse *p, struct evbuffer *in, int *over)
{
	size_t n;
	char *line = evbuffer_readln(in, &n, EVBUFFER_EOL_CRLF);

	*over = 0;
	if (!line) {
		if (p->header_bytes + evbuffer_get_length(in) > p->max_headers)
			*over = 1;
		return NULL;
	}
	p->header_bytes += n + 2;
	if (p->header_bytes > p->max_headers) {
		free(line);
		*over = 1;
		return NULL;
	}
	return line;
}

static int
hparse_status(struct hparse *p, const char *line)
{
	/* "HTTP/1.1 200 OK": the version, one space, three digits. */
	if (strncmp(line, "HTTP/1.", 7) != 0 || (line[7] != '0' && line[7] != '1') ||
	    line[8] != ' ' || line[9] < '1' || line[9] > '5' ||
	    line[10] < '0' || line[10] > '9' || line[11] < '0' || line[11] > '9' ||
	    (line[12] != ' ' && line[12] != '\0'))
		return -1;
	p->status = (line[9] - '0') * 100 + (line[10] - '0') * 10 + (line[11] - '0');
	/* HTTP/1.0 closes unless it says keep-alive. */
	p->close = line[7] == '0';
	return 0;
}

static int
hparse_header(struct hparse *p, char *line, long long *length, int *chunked)
{
	char *colon = strchr(line, ':'), *v, *end;

	if (!colon || colon == line)
		return -1;
	*colon = '\0';
	for (v = colon + 1; *v == ' ' || *v == '\t'; v++)
		;
	for (end = v + strlen(v); end > v && (end[-1] == ' ' || end[-1] == '\t'); end--)
		;
	*end = '\0';
	if (strcasecmp(line, "Content-Length") == 0) {
		char *e;
		long long n;
		errno = 0;
		n = strtoll(v, &e, 10);
		if (!*v || *e || errno || n < 0 || (*length >= 0 && *length != n))
			return -1;
		*length = n;
	} else if (strcasecmp(line, "Transfer-Encoding") == 0) {
		if (strcasestr(v, "chunked"))
			*chunked = 1;
	} else if (strcasecmp(line, "Connection") == 0) {
		if (strcasestr(v, "close"))
			p->close = 1;
		else if (strcasestr(v, "keep-alive"))
			p->close = 0;
	} else if (strcasecmp(line, "Content-Type") == 0 && !p->content_type) {
		p->content_type = xstrdup(v);
	}
	return 0;
}

static enum hparse_state
hparse_headers(struct hparse *p, struct evbuffer *in)
{
	long long length = -1;
	int chunked = 0, over;
	char *line;

	/* Headers are parsed once they have all arrived: hparse_feed only
	 * comes here when an empty line is in the buffer. */
	while ((line = hparse_line(p, in, &over))) {
		if (!*line) {
			free(line);
			break;
		}
		if (hparse_header(p, line, &length, &chunked) < 0) {
			free(line);
			return hparse_fail(p, HCLIENT_MALFORMED);
		}
		free(line);
	}
	if (over)
		return hparse_fail(p, HCLIENT_TOO_LARGE);
	if (p->status < 200) {
		/* 100 Continue and friends: the real answer follows. */
		free(p->content_type);
		p->content_type = NULL;
		return p->state = HP_STATUS;
	}
	if (p->status == 204 || p->status == 304)
		return p->state = HP_DONE;
	if (chunked)
		return p->state = HP_CHUNK_SIZE;
	if (length >= 0) {
		if ((size_t)length > p->max_body)
			return hparse_fail(p, HCLIENT_TOO_LARGE);
		p->left = (size_t)length;
		return p->state = p->left ? HP_BODY_LENGTH : HP_DONE;
	}
	p->close = 1;		/* the body ends with the connection */
	return p->state = HP_BODY_EOF;
}

/* Move up to p->left bytes of in to the body. */
static void
hparse_take(struct hparse *p, struct evbuffer *in)
{
	size_t n = evbuffer_get_length(in);

	if (n > p->left)
		n = p->left;
	evbuffer_remove_buffer(in, p->body, n);
	p->left -= n;
}

/* The header block has all arrived: an empty line is in the buffer (at
 * its start when there are no headers). */
static int
hparse_headers_complete(struct evbuffer *in)
{
	static const char *const ends[] = { "\r\n\r\n", "\n\n", "\n\r\n" };
	size_t i;

	if (evbuffer_search(in, "\r\n", 2, NULL).pos == 0 ||
	    evbuffer_search(in, "\n", 1, NULL).pos == 0)
		return 1;
	for (i = 0; i < sizeof ends / sizeof *ends; i++)
		if (evbuffer_search(in, ends[i], strlen(ends[i]), NULL).pos >= 0)
			return 1;
	return 0;
}

enum hparse_state
hparse_feed(struct hparse *p, struct evbuffer *in)
{
	char *line, *e;
	int over;

	for (;;) {
		switch (p->state) {
		case HP_STATUS:
			if (!(line = hparse_line(p, in, &over)))
				return over ? hparse_fail(p, HCLIENT_TOO_LARGE) : p->state;
			if (hparse_status(p, line) < 0) {
				free(line);
				return hparse_fail(p, HCLIENT_MALFORMED);
			}
			free(line);
			p->state = HP_HEADERS;
			break;
		case HP_HEADERS:
			if (!hparse_headers_complete(in)) {
				if (p->header_bytes + evbuffer_get_length(in) > p->max_headers)
					return hparse_fail(p, HCLIENT_TOO_LARGE);
				return p->state;
			}
			if (hparse_headers(p, in) == HP_ERROR)
				return p->state;
			break;
		case HP_BODY_LENGTH:
		case HP_CHUNK_DATA:
			hparse_take(p, in);
			if (p->left)
				return p->state;
			p->state = p->state == HP_BODY_LENGTH ? HP_DONE : HP_CHUNK_END;
			break;
		case HP_BODY_EOF:
			evbuffer_add_buffer(p->body, in);
			if (evbuffer_get_length(p->body) > p->max_body)
				return hparse_fail(p, HCLIENT_TOO_LARGE);
			return p->state;
		case HP_CHUNK_SIZE: {
			unsigned long long n;
			if (!(line = hparse_line(p, in, &over)))
				return over ? hparse_fail(p, HCLIENT_TOO_LARGE) : p->state;
			errno = 0;
			n = strtoull(line, &e, 16);
			if (e == line || errno || (*e && *e != ';' && *e != ' ' && *e != '\t')) {
				free(line);
				return hparse_fail(p, HCLIENT_MALFORMED);
			}
			free(line);
			if (n > p->max_body || evbuffer_get_length(p->body) + n > p->max_body)
				return hparse_fail(p, HCLIENT_TOO_LARGE);
			p->left = (size_t)n;
			p->state = n ? HP_CHUNK_DATA : HP_TRAILERS;
			break;
		}
		case HP_CHUNK_END:
			if (!(line = hparse_line(p, in, &over)))
				return over ? hparse_fail(p, HCLIENT_TOO_LARGE) : p->state;
			over = *line != '\0';
			free(line);
			if (over)
				return hparse_fail(p, HCLIENT_MALFORMED);
			p->state = HP_CHUNK_SIZE;
			break;
		case HP_TRAILERS:
			if (!(line = hparse_line(p, in, &over)))
				return over ? hparse_fail(p, HCLIENT_TOO_LARGE) : p->state;
			over = *line == '\0';
			free(line);
			if (over)
				p->state = HP_DONE;
			break;
		case HP_DONE:
		case HP_ERROR:
			return p->state;
		}
	}
}

enum hparse_state
hparse_eof(struct hparse *p)
{
	if (p->state == HP_BODY_EOF)
		return p->state = HP_DONE;
	if (p->state == HP_DONE || p->state == HP_ERROR)
		return p->state;
	return hparse_fail(p, HCLIENT_CLOSED);
}

/* ---- the connection ---- */

enum hclient_state {
	HC_CLOSED,		/* no socket: the next request connects */
	HC_CONNECTING,		/* connect() in progress, request waiting */
	HC_IDLE,		/* connected, nothing in flight */
	HC_BUSY			/* request written (or being written), answer awaited */
};

struct hclient {
	struct event_base *base;
	char *host;
	int port;
	size_t max_body, max_headers;
	enum hclient_state state;
	evutil_socket_t fd;
	struct event *read_ev, *write_ev, *timer_ev;
	struct event *fail_ev;		/* a failure found inside hclient_send */
	enum hclient_result fail;
	struct evbuffer *out, *in;
	struct hparse parse;
	hclient_done_fn *fn;
	void *arg;
};

const char *
hclient_result_name(enum hclient_result r)
{
	switch (r) {
	case HCLIENT_ANSWERED: return "answered";
	case HCLIENT_CONNECT_FAILED: return "connection failed";
	case HCLIENT_TIMEOUT: return "timeout";
	case HCLIENT_CLOSED: return "connection closed";
	case HCLIENT_MALFORMED: return "malformed answer";
	case HCLIENT_TOO_LARGE: return "answer too large";
	case HCLIENT_CANCELLED: return "cancelled";
	}
	return "connection failed";
}

static void
hclient_close(struct hclient *c)
{
	if (c->fd >= 0) {
		event_del(c->read_ev);
		event_del(c->write_ev);
		evutil_closesocket(c->fd);
		c->fd = -1;
	}
	evbuffer_drain(c->out, evbuffer_get_length(c->out));
	evbuffer_drain(c->in, evbuffer_get_length(c->in));
	c->state = HC_CLOSED;
}

/* The request is over: tell the caller, keep the connection when the
 * answer allows it. */
static void
hclient_finish(struct hclient *c, enum hclient_result r)
{
	struct hclient_answer a;
	hclient_done_fn *fn = c->fn;
	void *arg = c->arg;
	struct hparse p = c->parse;

	evtimer_del(c->timer_ev);
	event_del(c->fail_ev);
	/* Kept only when the exchange ended cleanly: not after an error, not
	 * when the server said close, not with bytes after the answer (not
	 * ours to guess), not when it answered before taking the whole
	 * request (the rest would be read as the next request). */
	if (r != HCLIENT_ANSWERED || p.close || evbuffer_get_length(c->in) ||
	    evbuffer_get_length(c->out))
		hclient_close(c);
	else
		c->state = HC_IDLE;
	hparse_init(&c->parse, c->max_body, c->max_headers);
	c->fn = NULL;
	memset(&a, 0, sizeof a);
	a.result = r;
	a.status = r == HCLIENT_ANSWERED ? p.status : 0;
	a.content_type = p.content_type;
	a.body = p.body;
	fn(arg, &a);
	hparse_clear(&p);
}

/* Write what is pending; -1 when the connection is gone. */
static int
hclient_flush(struct hclient *c)
{
	/* Written at once: the socket is almost always writable, and waiting
	 * for the loop to say so costs two epoll_ctl per request. */
	while (evbuffer_get_length(c->out)) {
		int n = evbuffer_write(c->out, c->fd);
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				break;
			return -1;
		}
	}
	if (evbuffer_get_length(c->out))
		event_add(c->write_ev, NULL);
	else
		event_del(c->write_ev);
	return 0;
}

/* Report a failure from the loop, never from inside the caller. */
static void
hclient_fail_later(struct hclient *c, enum hclient_result r)
{
	c->fail = r;
	event_active(c->fail_ev, 0, 0);
}

static void
hclient_fail_cb(evutil_socket_t fd, short what, void *arg)
{
	struct hclient *c = arg;

	(void)fd;
	(void)what;
	if (c->fn)
		hclient_finish(c, c->fail);
}

static void
hclient_read_cb(evutil_socket_t fd, short what, void *arg)
{
	struct hclient *c = arg;
	char buf[16384];
	ssize_t n;
	enum hparse_state st;

	(void)what;
	n = recv(fd, buf, sizeof buf, 0);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (c->state != HC_BUSY) {
		/* Idle: the server closed, or sent what nobody asked for. */
		hclient_close(c);
		return;
	}
	if (n <= 0) {
		st = hparse_eof(&c->parse);
		hclient_finish(c, st == HP_DONE ? HCLIENT_ANSWERED :
		    n < 0 ? HCLIENT_CLOSED : c->parse.error);
		return;
	}
	evbuffer_add(c->in, buf, (size_t)n);
	st = hparse_feed(&c->parse, c->in);
	if (st == HP_DONE)
		hclient_finish(c, HCLIENT_ANSWERED);
	else if (st == HP_ERROR)
		hclient_finish(c, c->parse.error);
}

static void
hclient_write_cb(evutil_socket_t fd, short what, void *arg)
{
	struct hclient *c = arg;

	(void)what;
	if (c->state == HC_CONNECTING) {
		int err = 0;
		socklen_t len = sizeof err;
		if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err) {
			hclient_finish(c, HCLIENT_CONNECT_FAILED);
			return;
		}
		c->state = HC_BUSY;
		event_add(c->read_ev, NULL);
	}
	if (hclient_flush(c) < 0)
		hclient_finish(c, HCLIENT_CLOSED);
}

static void
hclient_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	/* A late answer must not be taken for the next request's. */
	hclient_finish(arg, HCLIENT_TIMEOUT);
}

static int
hclient_connect(struct hclient *c)
{
	struct evutil_addrinfo hints, *ai = NULL;
	char port[16];
	int one = 1;

	memset(&hints, 0, sizeof hints);
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = EVUTIL_AI_ADDRCONFIG;
	snprintf(port, sizeof port, "%d", c->port);
	if (evutil_getaddrinfo(c->host, port, &hints, &ai) != 0 || !ai)
		return -1;
	c->fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (c->fd < 0) {
		evutil_freeaddrinfo(ai);
		return -1;
	}
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	if (connect(c->fd, ai->ai_addr, ai->ai_addrlen) < 0 && errno != EINPROGRESS) {
		evutil_freeaddrinfo(ai);
		evutil_closesocket(c->fd);
		c->fd = -1;
		return -1;
	}
	evutil_freeaddrinfo(ai);
	event_assign(c->read_ev, c->base, c->fd, EV_READ | EV_PERSIST, hclient_read_cb, c);
	event_assign(c->write_ev, c->base, c->fd, EV_WRITE | EV_PERSIST, hclient_write_cb, c);
	return 0;
}

struct hclient *
hclient_new(struct event_base *base, const char *host, int port, size_t max_body,
    size_t max_headers)
{
	struct hclient *c = xcalloc(1, sizeof *c);

	c->base = base;
	c->host = xstrdup(host);
	c->port = port;
	c->max_body = max_body;
	c->max_headers = max_headers;
	c->fd = -1;
	c->read_ev = event_new(base, -1, 0, hclient_read_cb, c);
	c->write_ev = event_new(base, -1, 0, hclient_write_cb, c);
	c->timer_ev = evtimer_new(base, hclient_timer_cb, c);
	c->fail_ev = event_new(base, -1, 0, hclient_fail_cb, c);
	c->out = evbuffer_new();
	c->in = evbuffer_new();
	hparse_init(&c->parse, max_body, max_headers);
	return c;
}

int
hclient_send(struct hclient *c, struct evbuffer *req, double timeout,
    hclient_done_fn *fn, void *arg)
{
	struct timeval tv;

	if (c->state == HC_BUSY || c->state == HC_CONNECTING)
		return -1;
	c->fn = fn;
	c->arg = arg;
	evbuffer_add_buffer(c->out, req);
	tv = util_timeval(timeout);
	evtimer_add(c->timer_ev, &tv);
	if (c->state == HC_CLOSED) {
		if (hclient_connect(c) < 0) {
			c->state = HC_CONNECTING;
			hclient_fail_later(c, HCLIENT_CONNECT_FAILED);
			return 0;
		}
		c->state = HC_CONNECTING;
		event_add(c->write_ev, NULL);
		return 0;
	}
	c->state = HC_BUSY;
	if (hclient_flush(c) < 0)
		hclient_fail_later(c, HCLIENT_CLOSED);
	return 0;
}

int
hclient_busy(const struct hclient *c)
{
	return c->state == HC_BUSY || c->state == HC_CONNECTING;
}

void
hclient_free(struct hclient *c)
{
	if (!c)
		return;
	if (c->fn)
		hclient_finish(c, HCLIENT_CANCELLED);
	hclient_close(c);
	event_free(c->read_ev);
	event_free(c->write_ev);
	event_free(c->timer_ev);
	event_free(c->fail_ev);
	evbuffer_free(c->out);
	evbuffer_free(c->in);
	hparse_clear(&c->parse);
	free(c->host);
	free(c);
}

void
hclient_answer_text(const struct hclient_answer *a, const char *prefix,
    char *buf, size_t len)
{
	char said[200];
	ev_ssize_t n = 0;
	ev_ssize_t i;

	if (a->body)
		n = evbuffer_copyout(a->body, said, sizeof said - 1);
	if (n <= 0) {
		snprintf(buf, len, "%s", prefix);
		return;
	}
	for (i = 0; i < n; i++) {
		unsigned char c = (unsigned char)said[i];
		if ((c < 0x20 && c != '\t' && c != '\n' && c != '\r') || c >= 0x7f)
			said[i] = '?';
	}
	said[n] = '\0';
	snprintf(buf, len, "%s: %s", prefix, said);
}
