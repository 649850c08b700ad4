/* Unit tests for src/hclient.c: the answer parser, fed whole and byte by
 * byte; and the client against a one-shot server on loopback. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "hclient.h"

/* Feed text to a parser, in pieces of step bytes (0: all at once). */
static enum hparse_state
feed(struct hparse *p, const char *text, size_t len, size_t step)
{
	struct evbuffer *in = evbuffer_new();
	enum hparse_state st = p->state;
	size_t off = 0;

	if (!step)
		step = len ? len : 1;
	while (off < len && st != HP_DONE && st != HP_ERROR) {
		size_t n = len - off < step ? len - off : step;
		evbuffer_add(in, text + off, n);
		off += n;
		st = hparse_feed(p, in);
	}
	evbuffer_free(in);
	return st;
}

static void
body_is(struct hparse *p, const char *want)
{
	size_t n = evbuffer_get_length(p->body);
	char *b = malloc(n + 1);

	evbuffer_copyout(p->body, b, n);
	b[n] = '\0';
	assert_string_equal(b, want);
	free(b);
}

static void
test_content_length(void **state)
{
	static const char a[] = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
	    "Content-Length: 11\r\n\r\n{\"ok\":true}";
	size_t step;

	(void)state;
	for (step = 0; step <= 7; step++) {
		struct hparse p;
		hparse_init(&p, 1 << 20, 65536);
		assert_int_equal(feed(&p, a, strlen(a), step), HP_DONE);
		assert_int_equal(p.status, 200);
		assert_string_equal(p.content_type, "application/json");
		assert_false(p.close);
		body_is(&p, "{\"ok\":true}");
		hparse_clear(&p);
	}
}

static void
test_chunked_and_continue(void **state)
{
	static const char a[] = "HTTP/1.1 100 Continue\r\n\r\n"
	    "HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
	    "5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n";
	size_t step;

	(void)state;
	for (step = 0; step <= 5; step++) {
		struct hparse p;
		hparse_init(&p, 1 << 20, 65536);
		assert_int_equal(feed(&p, a, strlen(a), step), HP_DONE);
		assert_int_equal(p.status, 409);
		assert_null(p.content_type);
		assert_true(p.close);
		body_is(&p, "hello world");
		hparse_clear(&p);
	}
}

static void
test_body_until_close(void **state)
{
	static const char a[] = "HTTP/1.0 500 Oops\r\n\r\npartial";
	struct hparse p;

	(void)state;
	hparse_init(&p, 1 << 20, 65536);
	assert_int_equal(feed(&p, a, strlen(a), 3), HP_BODY_EOF);
	assert_int_equal(hparse_eof(&p), HP_DONE);
	assert_int_equal(p.status, 500);
	body_is(&p, "partial");
	hparse_clear(&p);
	/* Closed in the middle of a counted body: no answer. */
	hparse_init(&p, 1 << 20, 65536);
	{
		static const char a[] = "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc";
		assert_int_equal(feed(&p, a, strlen(a), 0), HP_BODY_LENGTH);
	}
	assert_int_equal(hparse_eof(&p), HP_ERROR);
	assert_int_equal(p.error, HCLIENT_CLOSED);
	hparse_clear(&p);
}

static void
test_garbage_and_limits(void **state)
{
	static const char *const bad[] = {
		"SMTP ready\r\n",
		"HTTP/1.1 2x0 OK\r\n\r\n",
		"HTTP/2 200\r\n\r\n",
		"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
		"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
		"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n",
	};
	struct hparse p;
	char big[300];
	size_t i;

	(void)state;
	for (i = 0; i < sizeof bad / sizeof *bad; i++) {
		hparse_init(&p, 1 << 20, 65536);
		if (feed(&p, bad[i], strlen(bad[i]), 0) != HP_ERROR)
			fail_msg("accepted: %s", bad[i]);
		assert_int_equal(p.error, HCLIENT_MALFORMED);
		hparse_clear(&p);
	}
	/* Body over the limit, counted and chunked. */
	hparse_init(&p, 4, 65536);
	{
		static const char a[] = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
		assert_int_equal(feed(&p, a, strlen(a), 0), HP_ERROR);
	}
	assert_int_equal(p.error, HCLIENT_TOO_LARGE);
	hparse_clear(&p);
	hparse_init(&p, 4, 65536);
	{
		static const char a[] = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
		    "3\r\nabc\r\n3\r\n";
		assert_int_equal(feed(&p, a, strlen(a), 0), HP_ERROR);
	}
	assert_int_equal(p.error, HCLIENT_TOO_LARGE);
	hparse_clear(&p);
	/* Headers over the limit, even without an end of line. */
	memset(big, 'h', sizeof big);
	hparse_init(&p, 1 << 20, 256);
	assert_int_equal(feed(&p, big, sizeof big, 50), HP_ERROR);
	assert_int_equal(p.error, HCLIENT_TOO_LARGE);
	hparse_clear(&p);
}

/* ---- the client against a real socket ---- */

struct srv {
	struct event_base *base;
	int lfd, cfd;
	const char *answer;	/* what to send once the request is in; NULL: nothing */
	int close_after;
	struct event *ev;
	char req[4096];
	size_t reqlen;
};

struct got {
	struct event_base *base;
	enum hclient_result result;
	int status, calls;
	char body[64];
};

static void
srv_cb(evutil_socket_t fd, short what, void *arg)
{
	struct srv *s = arg;
	ssize_t n;

	(void)what;
	if (fd == s->lfd) {
		s->cfd = accept(s->lfd, NULL, NULL);
		event_free(s->ev);
		s->ev = event_new(s->base, s->cfd, EV_READ | EV_PERSIST, srv_cb, s);
		event_add(s->ev, NULL);
		return;
	}
	n = read(fd, s->req + s->reqlen, sizeof s->req - s->reqlen - 1);
	if (n <= 0)
		return;
	s->reqlen += (size_t)n;
	s->req[s->reqlen] = '\0';
	if (strstr(s->req, "\r\n\r\nBODY") && s->answer) {
		assert_true(write(fd, s->answer, strlen(s->answer)) == (ssize_t)strlen(s->answer));
		s->answer = NULL;
		if (s->close_after)
			shutdown(fd, SHUT_WR);
	}
}

static void
got_cb(void *arg, const struct hclient_answer *a)
{
	struct got *g = arg;
	size_t n = a->body ? evbuffer_get_length(a->body) : 0;

	g->calls++;
	g->result = a->result;
	g->status = a->status;
	if (n >= sizeof g->body)
		n = sizeof g->body - 1;
	if (n)
		evbuffer_copyout(a->body, g->body, n);
	g->body[n] = '\0';
	event_base_loopbreak(g->base);
}

static int
listen_any(int *port)
{
	struct sockaddr_in sa;
	socklen_t len = sizeof sa;
	int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;

	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	memset(&sa, 0, sizeof sa);
	sa.sin_family = AF_INET;
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
	assert_int_equal(listen(fd, 4), 0);
	getsockname(fd, (struct sockaddr *)&sa, &len);
	*port = ntohs(sa.sin_port);
	return fd;
}

static void
run(struct got *g)
{
	struct timeval limit = { 5, 0 };

	event_base_loopexit(g->base, &limit);
	event_base_dispatch(g->base);
}

static void
send_one(struct hclient *c, double timeout, struct got *g)
{
	struct evbuffer *req = evbuffer_new();

	evbuffer_add_printf(req, "POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nBODY");
	assert_int_equal(hclient_send(c, req, timeout, got_cb, g), 0);
	assert_true(hclient_busy(c));
	evbuffer_free(req);
	run(g);
}

static void
test_client_round_trips(void **state)
{
	struct event_base *base = event_base_new();
	struct srv s;
	struct got g;
	struct hclient *c;
	int port;

	(void)state;
	memset(&s, 0, sizeof s);
	memset(&g, 0, sizeof g);
	g.base = base;
	s.base = base;
	s.lfd = listen_any(&port);
	s.ev = event_new(base, s.lfd, EV_READ, srv_cb, &s);
	event_add(s.ev, NULL);
	c = hclient_new(base, "127.0.0.1", port, 1 << 20, 65536);

	/* First request: connects, answered. */
	s.answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
	send_one(c, 5, &g);
	assert_int_equal(g.result, HCLIENT_ANSWERED);
	assert_int_equal(g.status, 200);
	assert_string_equal(g.body, "ok");
	assert_false(hclient_busy(c));
	assert_non_null(strstr(s.req, "POST /x HTTP/1.1\r\n"));

	/* Second on the same connection: no answer within the timeout. */
	s.reqlen = 0;
	s.answer = NULL;
	send_one(c, 0.2, &g);
	assert_int_equal(g.result, HCLIENT_TIMEOUT);
	assert_int_equal(g.calls, 2);
	hclient_free(c);
	close(s.cfd);
	close(s.lfd);
	event_free(s.ev);

	/* Nobody listening: connection failed, from the loop. */
	c = hclient_new(base, "127.0.0.1", port, 1 << 20, 65536);
	send_one(c, 5, &g);
	assert_int_equal(g.result, HCLIENT_CONNECT_FAILED);
	assert_int_equal(g.calls, 3);
	hclient_free(c);
	event_base_free(base);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_content_length),
		cmocka_unit_test(test_chunked_and_continue),
		cmocka_unit_test(test_body_until_close),
		cmocka_unit_test(test_garbage_and_limits),
		cmocka_unit_test(test_client_round_trips),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
