/*
 * loadgen: HTTP load generator for sagad's publish API.
 *
 *   loadgen -u URL [-u URL ...] -n N [-s SIZE] [-c CONNS] [-r RATE]
 *           [-o FILE] [-i RUNID] [-t TIMEOUT]
 *
 * CONNS keep-alive connections, each with at most one request outstanding;
 * with several -u (at most 16), connection k talks to URL k mod their
 * number, and released requests go to the idle connections in turn (round
 * robin), so successive requests go to successive URLs.
 * Without -r the connections go as fast as the server answers (closed loop).
 * With -r RATE the requests are released on a fixed schedule, request i at
 * t0 + i/RATE, whatever the server does (open loop); a request whose time has
 * come waits for a free connection and its latency is measured from its
 * scheduled time, so a slow server cannot hide its stalls (no coordinated
 * omission). Every request carries a unique Message-Id "b-RUNID-i".
 *
 * Output, one line on stdout:
 *
 *   loadgen n=N ok=OK errors=E seconds=S rate=R p50_ms=.. p99_ms=.. max_ms=..
 *
 * ok counts 2xx answers (a 200 "duplicate" is 2xx too, but is also reported
 * on stderr), errors everything else: non-2xx, resets, timeouts. S runs from
 * the first (scheduled) send to the last answer, R = OK / S, the percentiles
 * are over the 2xx answers. With -o FILE each answered request is written as
 * "message_id send_time_unix_ns latency_ns" (send time = scheduled time with
 * -r; latency -1 for a failed request).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE	/* strcasestr */
#endif
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/util.h>

enum conn_state {
	CONN_DOWN,		/* not connected, waiting to reconnect */
	CONN_CONNECTING,
	CONN_IDLE,
	CONN_BUSY,
};

enum parse_state {
	P_STATUS,
	P_HEADERS,
	P_BODY,
	P_CHUNK_SIZE,
	P_CHUNK_DATA,
	P_CHUNK_TRAILER,
};

struct target {
	const char *host;
	int port;
	const char *path;
};

#define MAX_TARGETS 16

struct conn {
	int id;
	const struct target *t;
	enum conn_state state;
	struct bufferevent *bev;
	struct event *retry;
	int64_t req;		/* request index in flight, -1 none */
	enum parse_state ps;
	int status;
	int64_t clen;		/* remaining body bytes, -1 unknown */
	int chunked;
	int close_after;
};

static struct {
	struct event_base *base;
	struct target targets[MAX_TARGETS];
	int ntargets;
	int rr;			/* next connection dispatch() tries first */
	const char *runid;
	int64_t n;
	size_t size;
	int nconns;
	double rate;		/* 0: closed loop */
	double timeout;
	const char *outfile;

	char *body;
	struct conn *conns;
	struct event *tick;

	int64_t released;	/* requests whose time has come */
	int64_t next;		/* next request to send */
	int64_t done;		/* answered or failed */
	int64_t ok, errors, dups, connect_errors;
	int64_t t0_ns;		/* monotonic, first scheduled send */
	int64_t tend_ns;	/* monotonic, last answer */
	int64_t rt_offset;	/* realtime - monotonic */
	int64_t *send_ns;	/* monotonic send (or scheduled) time */
	int64_t *lat_ns;	/* -1 failed */
	int started;
	int64_t last_success_ns;
	int64_t status_count[600];
} g;

static int64_t
mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t
real_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void conn_open(struct conn *c);
static void dispatch(void);

static void
finish_if_done(void)
{
	if (g.done == g.n)
		event_base_loopbreak(g.base);
}

static void
complete(struct conn *c, int status)
{
	int64_t i = c->req, t = mono_ns();

	if (i < 0)
		return;
	c->req = -1;
	g.done++;
	g.tend_ns = t;
	if (status > 0 && status < 600)
		g.status_count[status]++;
	if (status >= 200 && status < 300) {
		g.ok++;
		if (status == 200)
			g.dups++;
		g.lat_ns[i] = t - g.send_ns[i];
		g.last_success_ns = t;
	} else {
		g.errors++;
		g.lat_ns[i] = -1;
	}
}

static void
conn_reset(struct conn *c, int failed_request)
{
	if (c->bev != NULL) {
		bufferevent_free(c->bev);
		c->bev = NULL;
	}
	if (failed_request)
		complete(c, -1);
	c->state = CONN_DOWN;
	finish_if_done();
	if (g.done < g.n) {
		struct timeval tv = { 0, failed_request ? 0 : 100000 };
		evtimer_add(c->retry, &tv);
	}
}

static void
retry_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	conn_open(arg);
}

static void
send_request(struct conn *c)
{
	struct evbuffer *out = bufferevent_get_output(c->bev);
	int64_t i = g.next++;

	c->req = i;
	c->state = CONN_BUSY;
	c->ps = P_STATUS;
	c->status = 0;
	c->clen = -1;
	c->chunked = 0;
	c->close_after = 0;
	if (g.rate > 0)
		g.send_ns[i] = g.t0_ns + (int64_t)((double)i * 1e9 / g.rate);
	else
		g.send_ns[i] = mono_ns();
	evbuffer_add_printf(out,
	    "POST %s HTTP/1.1\r\n"
	    "Host: %s:%d\r\n"
	    "Content-Type: application/octet-stream\r\n"
	    "Message-Id: b-%s-%" PRId64 "\r\n"
	    "Content-Length: %zu\r\n"
	    "\r\n", c->t->path, c->t->host, c->t->port, g.runid, i, g.size);
	if (g.size > 0)
		evbuffer_add_reference(out, g.body, g.size, NULL, NULL);
}

/* Parse as much of the answer as has arrived; returns 1 when complete. */
static int
parse(struct conn *c, struct evbuffer *in)
{
	char *line;
	size_t len;

	for (;;) {
		switch (c->ps) {
		case P_STATUS:
			line = evbuffer_readln(in, &len, EVBUFFER_EOL_CRLF);
			if (line == NULL)
				return 0;
			if (len == 0) {	/* tolerate stray CRLF */
				free(line);
				break;
			}
			if (strncmp(line, "HTTP/1.", 7) != 0 || len < 12) {
				free(line);
				return -1;
			}
			if (line[7] == '0')
				c->close_after = 1;
			c->status = atoi(line + 9);
			free(line);
			c->ps = P_HEADERS;
			break;
		case P_HEADERS:
			line = evbuffer_readln(in, &len, EVBUFFER_EOL_CRLF);
			if (line == NULL)
				return 0;
			if (len == 0) {
				free(line);
				if (c->status == 204 || c->status == 304 ||
				    (c->status >= 100 && c->status < 200)) {
					if (c->status < 200) {
						c->ps = P_STATUS;
						break;
					}
					return 1;
				}
				if (c->chunked) {
					c->ps = P_CHUNK_SIZE;
				} else if (c->clen >= 0) {
					c->ps = P_BODY;
				} else {
					/* body until close: not keep-alive */
					c->close_after = 1;
					c->clen = -1;
					c->ps = P_BODY;
				}
				break;
			}
			if (strncasecmp(line, "content-length:", 15) == 0)
				c->clen = strtoll(line + 15, NULL, 10);
			else if (strncasecmp(line, "transfer-encoding:", 18) ==
			    0 && strcasestr(line + 18, "chunked") != NULL)
				c->chunked = 1;
			else if (strncasecmp(line, "connection:", 11) == 0 &&
			    strcasestr(line + 11, "close") != NULL)
				c->close_after = 1;
			else if (strncasecmp(line, "connection:", 11) == 0 &&
			    strcasestr(line + 11, "keep-alive") != NULL)
				c->close_after = 0;
			free(line);
			break;
		case P_BODY:
			if (c->clen < 0) {
				evbuffer_drain(in, evbuffer_get_length(in));
				return 0;	/* completes at EOF */
			}
			len = evbuffer_get_length(in);
			if ((int64_t)len > c->clen)
				len = (size_t)c->clen;
			evbuffer_drain(in, len);
			c->clen -= (int64_t)len;
			return c->clen == 0 ? 1 : 0;
		case P_CHUNK_SIZE:
			line = evbuffer_readln(in, &len, EVBUFFER_EOL_CRLF);
			if (line == NULL)
				return 0;
			c->clen = strtoll(line, NULL, 16);
			free(line);
			c->ps = c->clen == 0 ? P_CHUNK_TRAILER : P_CHUNK_DATA;
			c->clen += c->clen == 0 ? 0 : 2;	/* data + CRLF */
			break;
		case P_CHUNK_DATA:
			len = evbuffer_get_length(in);
			if ((int64_t)len > c->clen)
				len = (size_t)c->clen;
			evbuffer_drain(in, len);
			c->clen -= (int64_t)len;
			if (c->clen > 0)
				return 0;
			c->ps = P_CHUNK_SIZE;
			break;
		case P_CHUNK_TRAILER:
			line = evbuffer_readln(in, &len, EVBUFFER_EOL_CRLF);
			if (line == NULL)
				return 0;
			free(line);
			if (len == 0)
				return 1;
			break;
		}
	}
}

static void
read_cb(struct bufferevent *bev, void *arg)
{
	struct conn *c = arg;
	int r;

	if (c->state != CONN_BUSY) {
		/* unsolicited data: drop the connection */
		conn_reset(c, 0);
		return;
	}
	r = parse(c, bufferevent_get_input(bev));
	if (r < 0) {
		fprintf(stderr, "loadgen: conn %d: malformed answer\n", c->id);
		conn_reset(c, 1);
		dispatch();
		return;
	}
	if (r == 0)
		return;
	complete(c, c->status);
	if (c->close_after) {
		conn_reset(c, 0);
		c->state = CONN_DOWN;
		event_del(c->retry);
		conn_open(c);
	} else {
		c->state = CONN_IDLE;
	}
	finish_if_done();
	dispatch();
}

static void
event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct conn *c = arg;

	(void)bev;
	if (what & BEV_EVENT_CONNECTED) {
		int one = 1;
		evutil_socket_t fd = bufferevent_getfd(c->bev);

		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		c->state = CONN_IDLE;
		dispatch();
		return;
	}
	if (c->state == CONN_BUSY && (what & BEV_EVENT_EOF) &&
	    c->ps == P_BODY && c->clen < 0) {
		/* body delimited by close */
		complete(c, c->status);
		conn_reset(c, 0);
		dispatch();
		return;
	}
	if (c->state == CONN_CONNECTING) {
		if (g.connect_errors++ < 5)
			fprintf(stderr, "loadgen: conn %d: connect failed: %s\n",
			    c->id, evutil_socket_error_to_string(
			    EVUTIL_SOCKET_ERROR()));
		conn_reset(c, 0);
		return;
	}
	if (what & BEV_EVENT_TIMEOUT)
		fprintf(stderr, "loadgen: conn %d: timeout\n", c->id);
	else if (c->state == CONN_BUSY && (what & BEV_EVENT_ERROR))
		fprintf(stderr, "loadgen: conn %d: %s\n", c->id,
		    evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
	conn_reset(c, c->state == CONN_BUSY);
	dispatch();
}

static void
conn_open(struct conn *c)
{
	struct timeval tmo;

	c->bev = bufferevent_socket_new(g.base, -1, BEV_OPT_CLOSE_ON_FREE);
	if (c->bev == NULL) {
		fprintf(stderr, "loadgen: out of memory\n");
		exit(1);
	}
	bufferevent_setcb(c->bev, read_cb, NULL, event_cb, c);
	tmo.tv_sec = (time_t)g.timeout;
	tmo.tv_usec = (suseconds_t)((g.timeout - (double)tmo.tv_sec) * 1e6);
	/* the read timeout only runs while a request waits for its answer */
	bufferevent_set_timeouts(c->bev, &tmo, &tmo);
	bufferevent_enable(c->bev, EV_READ | EV_WRITE);
	c->state = CONN_CONNECTING;
	c->req = -1;
	if (bufferevent_socket_connect_hostname(c->bev, NULL, AF_INET, c->t->host,
	    c->t->port) < 0) {
		conn_reset(c, 0);
	}
}

/* Released requests go to idle connections; schedule the next release. */
static void
dispatch(void)
{
	int64_t now;
	int i;

	if (!g.started)
		return;
	if (g.rate > 0) {
		now = mono_ns();
		if (now >= g.t0_ns) {
			int64_t r = (int64_t)floor((double)(now - g.t0_ns) *
			    g.rate / 1e9) + 1;
			g.released = r > g.n ? g.n : r;
		}
	}
	for (i = 0; i < g.nconns && g.next < g.released; i++) {
		struct conn *c = &g.conns[(g.rr + i) % g.nconns];

		if (c->state == CONN_IDLE) {
			send_request(c);
			g.rr = (c->id + 1) % g.nconns;
		}
	}
	if (g.rate > 0 && g.released < g.n && !evtimer_pending(g.tick, NULL)) {
		int64_t at = g.t0_ns + (int64_t)((double)g.released * 1e9 /
		    g.rate);
		int64_t d = at - mono_ns();
		struct timeval tv;

		if (d < 0)
			d = 0;
		tv.tv_sec = d / 1000000000;
		tv.tv_usec = (d % 1000000000) / 1000;
		evtimer_add(g.tick, &tv);
	}
}

static void
tick_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	dispatch();
}

/* Watchdog: give up when no request has succeeded for a long time. */
static void
watchdog_cb(evutil_socket_t fd, short what, void *arg)
{
	int64_t idle = mono_ns() - g.last_success_ns;

	(void)fd;
	(void)what;
	(void)arg;
	if (idle > (int64_t)((g.timeout * 2 + 10) * 1e9)) {
		fprintf(stderr, "loadgen: no successful answer for %.0f s, "
		    "giving up\n", (double)idle / 1e9);
		/* count everything not answered as failed */
		g.errors += g.n - g.done;
		g.done = g.n;
		event_base_loopbreak(g.base);
	}
}

/* Start the clock once every connection is up (or after 2 s anyway). */
static void
start_cb(evutil_socket_t fd, short what, void *arg)
{
	int i, up = 0;
	static int waited;

	(void)fd;
	(void)what;
	for (i = 0; i < g.nconns; i++)
		up += g.conns[i].state == CONN_IDLE;
	if (up < g.nconns && waited++ < 200) {
		struct timeval tv = { 0, 10000 };
		evtimer_add((struct event *)arg, &tv);
		return;
	}
	g.started = 1;
	g.t0_ns = mono_ns();
	g.last_success_ns = g.t0_ns;
	g.rt_offset = real_ns() - mono_ns();
	g.released = g.rate > 0 ? 0 : g.n;
	dispatch();
}

static int
cmp64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;

	return x < y ? -1 : x > y;
}

static double
pct_ms(const int64_t *sorted, int64_t n, double p)
{
	int64_t k;

	if (n == 0)
		return 0.0;
	k = (int64_t)ceil(p * (double)n) - 1;	/* nearest rank */
	if (k < 0)
		k = 0;
	if (k >= n)
		k = n - 1;
	return (double)sorted[k] / 1e6;
}

static void
usage(void)
{
	fprintf(stderr, "usage: loadgen -u URL [-u URL ...] -n N [-s SIZE] [-c CONNS] "
	    "[-r RATE] [-o FILE] [-i RUNID] [-t TIMEOUT]\n");
	exit(2);
}

int
main(int argc, char **argv)
{
	const char *urls[MAX_TARGETS];
	int nurls = 0, k;
	struct evhttp_uri *uri;
	struct event *start, *watchdog;
	struct event_config *cfg;
	struct timeval tv0 = { 0, 0 }, tv1 = { 1, 0 };
	char runbuf[64];
	int64_t i, nlat;
	int64_t *lat;
	double secs;
	int ch;

	g.n = -1;
	g.size = 256;
	g.nconns = 32;
	g.timeout = 30;
	while ((ch = getopt(argc, argv, "u:n:s:c:r:o:i:t:")) != -1) {
		switch (ch) {
		case 'u':
			if (nurls == MAX_TARGETS)
				usage();
			urls[nurls++] = optarg;
			break;
		case 'n': g.n = strtoll(optarg, NULL, 10); break;
		case 's': g.size = strtoull(optarg, NULL, 10); break;
		case 'c': g.nconns = atoi(optarg); break;
		case 'r': g.rate = strtod(optarg, NULL); break;
		case 'o': g.outfile = optarg; break;
		case 'i': g.runid = optarg; break;
		case 't': g.timeout = strtod(optarg, NULL); break;
		default: usage();
		}
	}
	if (nurls == 0 || g.n < 1 || g.nconns < 1 || g.rate < 0 ||
	    g.timeout <= 0 || optind != argc)
		usage();
	for (k = 0; k < nurls; k++) {
		struct target *t = &g.targets[k];

		uri = evhttp_uri_parse(urls[k]);
		if (uri == NULL || evhttp_uri_get_host(uri) == NULL ||
		    evhttp_uri_get_scheme(uri) == NULL ||
		    strcmp(evhttp_uri_get_scheme(uri), "http") != 0) {
			fprintf(stderr, "loadgen: bad URL (http://HOST:PORT/PATH): "
			    "%s\n", urls[k]);
			return 2;
		}
		t->host = evhttp_uri_get_host(uri);
		t->port = evhttp_uri_get_port(uri) > 0 ?
		    evhttp_uri_get_port(uri) : 80;
		t->path = evhttp_uri_get_path(uri);
		if (t->path == NULL || t->path[0] == '\0')
			t->path = "/";
	}
	g.ntargets = nurls;
	if (g.runid == NULL) {
		snprintf(runbuf, sizeof(runbuf), "%" PRIx64 "%lx",
		    real_ns() / 1000000, (long)getpid());
		g.runid = runbuf;
	}
	if (g.nconns > g.n)
		g.nconns = (int)g.n;

	signal(SIGPIPE, SIG_IGN);
	g.body = malloc(g.size + 1);
	g.send_ns = calloc((size_t)g.n, sizeof(int64_t));
	g.lat_ns = calloc((size_t)g.n, sizeof(int64_t));
	g.conns = calloc((size_t)g.nconns, sizeof(struct conn));
	if (g.body == NULL || g.send_ns == NULL || g.lat_ns == NULL ||
	    g.conns == NULL) {
		fprintf(stderr, "loadgen: out of memory\n");
		return 1;
	}
	for (size_t k = 0; k < g.size; k++)
		g.body[k] = 'a' + (char)(k % 26);

	g.last_success_ns = mono_ns();
	/* timerfd: the open-loop schedule needs better than epoll's 1 ms */
	cfg = event_config_new();
	event_config_set_flag(cfg, EVENT_BASE_FLAG_PRECISE_TIMER);
	g.base = event_base_new_with_config(cfg);
	event_config_free(cfg);
	if (g.base == NULL) {
		fprintf(stderr, "loadgen: cannot create event base\n");
		return 1;
	}
	g.tick = evtimer_new(g.base, tick_cb, NULL);
	for (i = 0; i < g.nconns; i++) {
		g.conns[i].id = (int)i;
		g.conns[i].t = &g.targets[i % g.ntargets];
		g.conns[i].retry = evtimer_new(g.base, retry_cb, &g.conns[i]);
		conn_open(&g.conns[i]);
	}
	start = evtimer_new(g.base, start_cb, NULL);
	event_assign(start, g.base, -1, 0, start_cb, start);
	evtimer_add(start, &tv0);
	watchdog = event_new(g.base, -1, EV_PERSIST, watchdog_cb, NULL);
	evtimer_add(watchdog, &tv1);

	event_base_dispatch(g.base);

	secs = (double)(g.tend_ns - g.t0_ns) / 1e9;
	if (secs <= 0)
		secs = 1e-9;
	lat = malloc((size_t)g.n * sizeof(int64_t));
	nlat = 0;
	for (i = 0; i < g.n; i++)
		if (i < g.next && g.lat_ns[i] >= 0)
			lat[nlat++] = g.lat_ns[i];
	qsort(lat, (size_t)nlat, sizeof(int64_t), cmp64);

	if (g.outfile != NULL) {
		FILE *f = fopen(g.outfile, "w");

		if (f == NULL) {
			fprintf(stderr, "loadgen: %s: %s\n", g.outfile,
			    strerror(errno));
			return 1;
		}
		for (i = 0; i < g.next; i++)
			fprintf(f, "b-%s-%" PRId64 " %" PRId64 " %" PRId64 "\n",
			    g.runid, i, g.send_ns[i] + g.rt_offset,
			    g.lat_ns[i]);
		if (fclose(f) != 0) {
			fprintf(stderr, "loadgen: %s: %s\n", g.outfile,
			    strerror(errno));
			return 1;
		}
	}
	for (i = 0; i < 600; i++)
		if (g.status_count[i] && (i < 200 || i > 299 || i == 200))
			fprintf(stderr, "loadgen: %" PRId64 " answers with "
			    "status %d%s\n", g.status_count[i], (int)i,
			    i == 200 ? " (duplicate)" : "");
	printf("loadgen n=%" PRId64 " ok=%" PRId64 " errors=%" PRId64
	    " seconds=%.3f rate=%.1f p50_ms=%.3f p99_ms=%.3f max_ms=%.3f\n",
	    g.n, g.ok, g.errors, secs, (double)g.ok / secs,
	    pct_ms(lat, nlat, 0.50), pct_ms(lat, nlat, 0.99),
	    nlat ? (double)lat[nlat - 1] / 1e6 : 0.0);
	fflush(stdout);
	return g.errors == 0 ? 0 : 1;
}
