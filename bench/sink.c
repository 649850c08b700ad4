/*
 * sink: the service end of the inbox and saga benchmarks.
 *
 *   sink -p PORT [-a ADDRESS]
 *
 * A single-threaded libevent HTTP server on ADDRESS (default 127.0.0.1)
 * that answers every request at once with 200 and a small JSON body
 * ({"ok":true}), keeping HTTP/1.1 connections alive. It counts the requests
 * and records their arrival times (CLOCK_REALTIME). When a request's
 * Message-Id ends in "-<digits>" and those digits look like a Unix time in
 * nanoseconds (bench/pace puts its send time there), the sink also records
 * arrival - send.
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
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <netinet/in.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/util.h>

#define MAX_PATHS 16

static struct {
	struct event_base *base;
	char *path[MAX_PATHS];
	uint64_t path_count[MAX_PATHS];
	size_t npaths;
	uint64_t count;
	int64_t first_ns, last_ns;
	int64_t *lat;
	size_t nlat, caplat;
} g;

static int64_t
real_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The send time at the end of a message id ("...-<ns>"), or -1. */
static int64_t
id_time(const char *id)
{
	const char *p;
	char *end;
	long long v;

	if (id == NULL || (p = strrchr(id, '-')) == NULL)
		return -1;
	errno = 0;
	v = strtoll(p + 1, &end, 10);
	if (errno != 0 || end == p + 1 || *end != '\0')
		return -1;
	/* 2001-09-09 .. 2286: a Unix time in ns, not a sequence number */
	if (v < 1000000000000000000LL)
		return -1;
	return (int64_t)v;
}

static void
reply_json(struct evhttp_request *req, int status, const char *json)
{
	struct evbuffer *b = evbuffer_new();

	evhttp_add_header(evhttp_request_get_output_headers(req),
	    "Content-Type", "application/json");
	evbuffer_add(b, json, strlen(json));
	evhttp_send_reply(req, status, status == 200 ? "OK" : "Error", b);
	evbuffer_free(b);
}

static void
control(struct evhttp_request *req, const char *path)
{
	enum evhttp_cmd_type cmd = evhttp_request_get_command(req);

	if (cmd == EVHTTP_REQ_GET && strcmp(path, "/stats") == 0) {
		struct evbuffer *b = evbuffer_new();
		size_t i;

		evbuffer_add_printf(b,
		    "{\"count\":%" PRIu64 ",\"first_ns\":%" PRId64
		    ",\"last_ns\":%" PRId64 ",\"lat_n\":%zu,\"paths\":{", g.count,
		    g.first_ns, g.last_ns, g.nlat);
		for (i = 0; i < g.npaths; i++)
			evbuffer_add_printf(b, "%s\"%s\":%" PRIu64, i ? "," : "",
			    g.path[i], g.path_count[i]);
		evbuffer_add_printf(b, "}}");
		evhttp_add_header(evhttp_request_get_output_headers(req),
		    "Content-Type", "application/json");
		evhttp_send_reply(req, 200, "OK", b);
		evbuffer_free(b);
	} else if (cmd == EVHTTP_REQ_GET && strcmp(path, "/latencies") == 0) {
		struct evbuffer *b = evbuffer_new();
		size_t i;

		for (i = 0; i < g.nlat; i++)
			evbuffer_add_printf(b, "%" PRId64 "\n", g.lat[i]);
		evhttp_add_header(evhttp_request_get_output_headers(req),
		    "Content-Type", "text/plain");
		evhttp_send_reply(req, 200, "OK", b);
		evbuffer_free(b);
	} else if (cmd == EVHTTP_REQ_POST && strcmp(path, "/reset") == 0) {
		size_t i;

		g.count = 0;
		g.first_ns = g.last_ns = 0;
		g.nlat = 0;
		for (i = 0; i < g.npaths; i++)
			g.path_count[i] = 0;
		reply_json(req, 200, "{\"ok\":true}");
	} else {
		reply_json(req, 404, "{\"error\":\"not-found\"}");
	}
}

/* Requests per path (no query); paths with '"' or '\\' are not counted. */
static void
count_path(const char *uri)
{
	size_t i, len;

	if (uri == NULL)
		return;
	len = strcspn(uri, "?");
	if (len > 200 || strcspn(uri, "\"\\") < len)
		return;
	for (i = 0; i < g.npaths; i++)
		if (strlen(g.path[i]) == len && strncmp(g.path[i], uri, len) == 0) {
			g.path_count[i]++;
			return;
		}
	if (g.npaths < MAX_PATHS && (g.path[g.npaths] = strndup(uri, len)) != NULL)
		g.path_count[g.npaths++] = 1;
}

static void
request_cb(struct evhttp_request *req, void *arg)
{
	const char *uri = evhttp_request_get_uri(req);
	int64_t now = real_ns(), sent;

	(void)arg;
	if (uri != NULL && (strcmp(uri, "/stats") == 0 ||
	    strcmp(uri, "/latencies") == 0 || strcmp(uri, "/reset") == 0)) {
		control(req, uri);
		return;
	}
	g.count++;
	count_path(uri);
	if (g.first_ns == 0)
		g.first_ns = now;
	g.last_ns = now;
	sent = id_time(evhttp_find_header(evhttp_request_get_input_headers(req),
	    "Message-Id"));
	if (sent > 0) {
		if (g.nlat == g.caplat) {
			g.caplat = g.caplat ? g.caplat * 2 : 65536;
			g.lat = realloc(g.lat, g.caplat * sizeof *g.lat);
			if (g.lat == NULL) {
				fprintf(stderr, "sink: out of memory\n");
				exit(1);
			}
		}
		g.lat[g.nlat++] = now - sent;
	}
	evbuffer_drain(evhttp_request_get_input_buffer(req),
	    evbuffer_get_length(evhttp_request_get_input_buffer(req)));
	reply_json(req, 200, "{\"ok\":true}");
}

static void
signal_cb(evutil_socket_t sig, short what, void *arg)
{
	(void)sig;
	(void)what;
	(void)arg;
	event_base_loopbreak(g.base);
}

int
main(int argc, char **argv)
{
	const char *addr = "127.0.0.1";
	struct evhttp *http;
	struct evhttp_bound_socket *bs;
	struct event *sigterm, *sigint;
	struct sockaddr_storage ss;
	ev_socklen_t sl = sizeof ss;
	int port = -1, ch;

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
	{
		/* As in sagad: fold evhttp's per-request epoll_ctl pairs, so
		 * that the stand-in service takes less of the shared CPU. */
		struct event_config *cfg = event_config_new();
		event_config_set_flag(cfg, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
		g.base = event_base_new_with_config(cfg);
		event_config_free(cfg);
	}
	http = evhttp_new(g.base);
	if (g.base == NULL || http == NULL) {
		fprintf(stderr, "sink: cannot set up libevent\n");
		return 1;
	}
	evhttp_set_gencb(http, request_cb, NULL);
	evhttp_set_allowed_methods(http, EVHTTP_REQ_GET | EVHTTP_REQ_POST |
	    EVHTTP_REQ_PUT);
	evhttp_set_timeout(http, 600);
	bs = evhttp_bind_socket_with_handle(http, addr, (ev_uint16_t)port);
	if (bs == NULL) {
		fprintf(stderr, "sink: cannot listen on %s:%d\n", addr, port);
		return 1;
	}
	if (getsockname(evhttp_bound_socket_get_fd(bs), (struct sockaddr *)&ss,
	    &sl) == 0) {
		if (ss.ss_family == AF_INET)
			port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
		else if (ss.ss_family == AF_INET6)
			port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
	}
	sigterm = evsignal_new(g.base, SIGTERM, signal_cb, NULL);
	sigint = evsignal_new(g.base, SIGINT, signal_cb, NULL);
	evsignal_add(sigterm, NULL);
	evsignal_add(sigint, NULL);
	printf("sink port=%d\n", port);
	fflush(stdout);
	event_base_dispatch(g.base);
	event_free(sigterm);
	event_free(sigint);
	evhttp_free(http);
	event_base_free(g.base);
	free(g.lat);
	return 0;
}
