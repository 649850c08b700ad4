/* sagactl: the admin CLI, a thin client of sagad's admin API. */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "xmalloc.h"

enum sagactl_exit { SAGACTL_OK = 0, SAGACTL_FAILED = 1, SAGACTL_USAGE = 2 };

struct sagactl {
	const char *url;	/* http://host:port or unix:/path */
	char *token;
	int json;
	double timeout;
};

struct reply {
	int status;
	char *body;
	size_t len;
};

static void
usage(void)
{
	fprintf(stderr,
	    "usage: sagactl [-s URL] [-t TOKEN_FILE] [--json] COMMAND ...\n"
	    "commands:\n"
	    "  status                          daemon, broker, store and outbox state\n"
	    "  outbox [LIMIT]                  messages waiting in the outbox\n"
	    "  subscriptions                   backlog, circuit and counters per subscription\n"
	    "  dlq list SUBSCRIPTION           dead letters of a subscription\n"
	    "  dlq replay SUBSCRIPTION [ID...] deliver dead letters again (all without ids)\n"
	    "  sagas [--state S] [--name N]    saga instances, newest first\n"
	    "  saga ID                         one saga: state, steps and history\n"
	    "  saga retry ID                   resume the compensation of a failed saga\n"
	    "  saga abort ID                   compensate a running saga now\n"
	    "  tx list [--state S]             two-phase commits: coordinated, and as participant\n"
	    "  tx ID                           one transaction: votes, decision, acks, history\n"
	    "  tx resolve ID commit|abort      decide for a participant in doubt (coordinator lost)\n");
	exit(SAGACTL_USAGE);
}

static void
die(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "sagactl: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n");
	exit(SAGACTL_FAILED);
}

static int
sagactl_connect(const struct sagactl *c, char *host, size_t hostlen)
{
	struct timeval tv = { (time_t)c->timeout, 0 };
	int fd = -1;

	if (strncmp(c->url, "unix:", 5) == 0) {
		struct sockaddr_un sun;
		memset(&sun, 0, sizeof sun);
		sun.sun_family = AF_UNIX;
		snprintf(sun.sun_path, sizeof sun.sun_path, "%s", c->url + 5);
		fd = socket(AF_UNIX, SOCK_STREAM, 0);
		if (fd < 0 || connect(fd, (struct sockaddr *)&sun, sizeof sun) < 0)
			die("cannot connect to %s: %s", c->url, strerror(errno));
		snprintf(host, hostlen, "localhost");
	} else {
		const char *h = c->url + (strncmp(c->url, "http://", 7) == 0 ? 7 : 0);
		char name[300], port[16] = "80";
		const char *colon, *end = strchr(h, '/');
		struct addrinfo hints, *ai, *p;
		size_t n = end ? (size_t)(end - h) : strlen(h);

		snprintf(host, hostlen, "%.*s", (int)n, h);
		snprintf(name, sizeof name, "%s", host);
		colon = strrchr(name, ':');
		if (colon && !strchr(colon, ']')) {
			snprintf(port, sizeof port, "%s", colon + 1);
			name[colon - name] = '\0';
		}
		if (name[0] == '[') {
			memmove(name, name + 1, strlen(name));
			name[strlen(name) - 1] = '\0';
		}
		memset(&hints, 0, sizeof hints);
		hints.ai_socktype = SOCK_STREAM;
		if (getaddrinfo(name, port, &hints, &ai) != 0)
			die("cannot resolve %s", c->url);
		for (p = ai; p; p = p->ai_next) {
			fd = socket(p->ai_family, SOCK_STREAM, 0);
			if (fd >= 0 && connect(fd, p->ai_addr, p->ai_addrlen) == 0)
				break;
			if (fd >= 0)
				close(fd);
			fd = -1;
		}
		freeaddrinfo(ai);
		if (fd < 0)
			die("cannot connect to %s: %s (is sagad running?)", c->url, strerror(errno));
	}
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
	return fd;
}

/* HTTP/1.0 with Connection: close: the answer ends where the stream ends. */
static struct reply
sagactl_request(const struct sagactl *c, const char *method, const char *path,
    const char *body)
{
	struct reply r = { 0, NULL, 0 };
	char host[300], *req, *hdr_end, buf[65536];
	size_t cap = 0, len = 0;
	ssize_t n;
	int fd = sagactl_connect(c, host, sizeof host), reqlen;

	reqlen = asprintf(&req, "%s %s HTTP/1.0\r\nHost: %s\r\n%s%s%s"
	    "Content-Type: application/json\r\nContent-Length: %zu\r\n"
	    "Connection: close\r\n\r\n%s", method, path, host,
	    c->token ? "Authorization: Bearer " : "", c->token ? c->token : "",
	    c->token ? "\r\n" : "", body ? strlen(body) : 0, body ? body : "");
	if (reqlen < 0 || write(fd, req, reqlen) != reqlen)
		die("cannot send the request: %s", strerror(errno));
	free(req);
	while ((n = read(fd, buf, sizeof buf)) > 0) {
		if (len + n + 1 > cap) {
			cap = (len + n + 1) * 2;
			r.body = xrealloc(r.body, cap);
		}
		memcpy(r.body + len, buf, n);
		len += n;
	}
	close(fd);
	if (n < 0)
		die("no answer from %s: %s", c->url, strerror(errno));
	if (!r.body || sscanf(r.body, "HTTP/%*d.%*d %d", &r.status) != 1)
		die("malformed answer from %s", c->url);
	r.body[len] = '\0';
	hdr_end = strstr(r.body, "\r\n\r\n");
	if (!hdr_end)
		die("malformed answer from %s", c->url);
	memmove(r.body, hdr_end + 4, len - (hdr_end + 4 - r.body) + 1);
	r.len = strlen(r.body);
	return r;
}

/* GET/POST path and parse JSON; a non-2xx answer is reported and fails. */
static json_t *
sagactl_call_body(const struct sagactl *c, const char *method, const char *path,
    const char *body)
{
	struct reply r = sagactl_request(c, method, path, body);
	json_error_t e;
	json_t *j = json_loads(r.body, 0, &e);

	if (r.status < 200 || r.status > 299) {
		const char *msg = j ? json_string_value(json_object_get(j, "message")) : NULL;
		const char *code = j ? json_string_value(json_object_get(j, "error")) : NULL;
		fprintf(stderr, "sagactl: %s %s: %d %s%s%s\n", method, path, r.status,
		    code ? code : "", code ? ": " : "", msg ? msg : r.body);
		json_decref(j);
		free(r.body);
		exit(SAGACTL_FAILED);
	}
	if (!j) {
		free(r.body);
		die("%s %s: answer is not JSON: %s", method, path, e.text);
	}
	free(r.body);
	return j;
}

static json_t *
sagactl_call(const struct sagactl *c, const char *method, const char *path)
{
	return sagactl_call_body(c, method, path, NULL);
}

/* Percent-encode one path segment (saga ids may hold any character). */
static char *
pct_encode(const char *s)
{
	char *out = xmalloc(strlen(s) * 3 + 1), *o = out;

	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;
		if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
		    (ch >= '0' && ch <= '9') || strchr("-_.~", ch))
			*o++ = ch;
		else
			o += sprintf(o, "%%%02X", ch);
	}
	*o = '\0';
	return out;
}

/* method on /v1/admin/COLLECTION/ID[REST], the id percent-encoded. */
static json_t *
sagactl_call_id(const struct sagactl *c, const char *method, const char *collection,
    const char *id, const char *rest)
{
	char *e = pct_encode(id), *path;
	json_t *j;

	path = xasprintf("/v1/admin/%s/%s%s", collection, e, rest);
	j = sagactl_call(c, method, path);
	free(path);
	free(e);
	return j;
}

static void
print_json(json_t *j)
{
	char *s = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
	printf("%s\n", s);
	free(s);
}

/* With --json the answer as it is, and nothing more to print: 1 (j is
 * freed); 0 for a table. */
static int
printed_json(const struct sagactl *c, json_t *j)
{
	if (!c->json)
		return 0;
	print_json(j);
	json_decref(j);
	return 1;
}

static const char *
jstr(json_t *o, const char *path)
{
	const char *v = json_string_value(json_object_get(o, path));
	return v ? v : "";
}

static double
jnum(json_t *o, const char *key)
{
	return json_number_value(json_object_get(o, key));
}

static void
fmt_time(double t, char *buf, size_t len)
{
	time_t s = (time_t)t;
	struct tm tm;

	if (t <= 0) {
		snprintf(buf, len, "-");
		return;
	}
	gmtime_r(&s, &tm);
	strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static int
cmd_status(struct sagactl *c, int argc, char **argv)
{
	json_t *j, *b, *s, *o;

	(void)argv;
	if (argc != 1)
		usage();
	j = sagactl_call(c, "GET", "/v1/admin/status");
	if (printed_json(c, j))
		return SAGACTL_OK;
	b = json_object_get(j, "broker");
	s = json_object_get(j, "store");
	o = json_object_get(j, "outbox");
	printf("service      %s (sagad %s, pid %lld, up %.0fs, %s)\n", jstr(j, "service"),
	    jstr(j, "version"), (long long)json_integer_value(json_object_get(j, "pid")),
	    jnum(j, "uptime_seconds"), jstr(j, "state"));
	printf("broker       %s %s%s%s (reconnects %lld)\n", jstr(b, "link"), jstr(b, "url"),
	    *jstr(b, "reason") ? ": " : "", jstr(b, "reason"),
	    (long long)json_integer_value(json_object_get(b, "reconnects")));
	printf("node         %s (publish), %s (consume)\n",
	    *jstr(b, "node") ? jstr(b, "node") : "-",
	    *jstr(b, "consumer_node") ? jstr(b, "consumer_node") : "-");
	printf("store        %s %lld/%lld bytes%s\n", jstr(s, "path"),
	    (long long)json_integer_value(json_object_get(s, "bytes")),
	    (long long)json_integer_value(json_object_get(s, "max_bytes")),
	    json_is_true(json_object_get(s, "writable")) ? "" : " NOT WRITABLE");
	printf("outbox       %lld pending, %lld in flight, oldest %.1fs\n",
	    (long long)json_integer_value(json_object_get(o, "pending")),
	    (long long)json_integer_value(json_object_get(o, "inflight")),
	    jnum(o, "oldest_age_seconds"));
	printf("published    %lld confirmed, %lld unroutable, %lld nacked\n",
	    (long long)json_integer_value(json_object_get(o, "published_total")),
	    (long long)json_integer_value(json_object_get(o, "unroutable_total")),
	    (long long)json_integer_value(json_object_get(o, "nacked_total")));
	json_decref(j);
	return SAGACTL_OK;
}

static int
cmd_outbox(struct sagactl *c, int argc, char **argv)
{
	char path[128], when[32];
	json_t *j, *list, *m;
	long limit = 100;
	size_t i;

	if (argc > 2)
		usage();
	if (argc == 2) {
		char *end;
		limit = strtol(argv[1], &end, 10);
		if (*end || limit < 1)
			usage();
	}
	snprintf(path, sizeof path, "/v1/admin/outbox?limit=%ld", limit);
	j = sagactl_call(c, "GET", path);
	if (printed_json(c, j))
		return SAGACTL_OK;
	printf("%lld pending, %lld in flight, oldest %.1fs\n",
	    (long long)json_integer_value(json_object_get(j, "pending")),
	    (long long)json_integer_value(json_object_get(j, "inflight")),
	    jnum(j, "oldest_age_seconds"));
	list = json_object_get(j, "messages");
	if (json_array_size(list))
		printf("%-10s %-38s %-12s %-24s %-8s %-20s %-32s %s\n", "SEQ", "MESSAGE-ID",
		    "EXCHANGE", "ROUTING-KEY", "ATTEMPTS", "CREATED", "TRACE-ID", "LAST-ERROR");
	json_array_foreach(list, i, m) {
		fmt_time(jnum(m, "created_at"), when, sizeof when);
		printf("%-10lld %-38s %-12s %-24s %-8lld %-20s %-32s %s\n",
		    (long long)json_integer_value(json_object_get(m, "seq")),
		    jstr(m, "message_id"), *jstr(m, "exchange") ? jstr(m, "exchange") : "-",
		    jstr(m, "routing_key"),
		    (long long)json_integer_value(json_object_get(m, "attempts")), when,
		    *jstr(m, "trace_id") ? jstr(m, "trace_id") : "-", jstr(m, "last_error"));
	}
	json_decref(j);
	return SAGACTL_OK;
}

static int
cmd_subscriptions(struct sagactl *c, int argc, char **argv)
{
	json_t *j, *s;
	size_t i;

	(void)argv;
	if (argc != 1)
		usage();
	j = sagactl_call(c, "GET", "/v1/admin/subscriptions");
	if (printed_json(c, j))
		return SAGACTL_OK;
	printf("%-16s %-28s %-8s %-8s %-10s %-10s %-10s %s\n", "NAME", "QUEUE", "BACKLOG",
	    "INFLIGHT", "CIRCUIT", "DELIVERED", "DEAD", "DUPLICATES");
	json_array_foreach(json_object_get(j, "subscriptions"), i, s)
		printf("%-16s %-28s %-8lld %-8lld %-10s %-10lld %-10lld %lld\n", jstr(s, "name"),
		    jstr(s, "queue"), (long long)json_integer_value(json_object_get(s, "backlog")),
		    (long long)json_integer_value(json_object_get(s, "inflight")),
		    jstr(s, "circuit"),
		    (long long)json_integer_value(json_object_get(s, "delivered_total")),
		    (long long)json_integer_value(json_object_get(s, "dead_letters")),
		    (long long)json_integer_value(json_object_get(s, "duplicates_total")));
	json_decref(j);
	return SAGACTL_OK;
}

static int
cmd_dlq(struct sagactl *c, int argc, char **argv)
{
	char *sub, path[1024], when[32];
	json_t *j, *m;
	size_t i;

	if (argc < 3 || (strcmp(argv[1], "list") != 0 && strcmp(argv[1], "replay") != 0) ||
	    (strcmp(argv[1], "list") == 0 && argc != 3))
		usage();
	sub = pct_encode(argv[2]);
	if (strcmp(argv[1], "list") == 0) {
		snprintf(path, sizeof path, "/v1/admin/dlq/%s?limit=1000", sub);
		j = sagactl_call(c, "GET", path);
	} else {
		json_t *body = json_object(), *ids = json_array();
		char *text;
		int k;
		for (k = 3; k < argc; k++)
			json_array_append_new(ids, json_string(argv[k]));
		if (argc > 3)
			json_object_set_new(body, "message_ids", ids);
		else
			json_decref(ids);
		text = json_dumps(body, JSON_COMPACT);
		json_decref(body);
		snprintf(path, sizeof path, "/v1/admin/dlq/%s/replay", sub);
		j = sagactl_call_body(c, "POST", path, text);
		free(text);
		if (!c->json) {
			printf("%lld dead letters of %s put back for delivery\n",
			    (long long)json_integer_value(json_object_get(j, "replayed")), argv[2]);
			json_decref(j);
			free(sub);
			return SAGACTL_OK;
		}
	}
	free(sub);
	if (printed_json(c, j))
		return SAGACTL_OK;
	printf("%lld dead letters in %s (queue %s)\n",
	    (long long)json_integer_value(json_object_get(j, "count")), argv[2],
	    jstr(j, "queue"));
	if (json_array_size(json_object_get(j, "messages")))
		printf("%-40s %-20s %-20s %-8s %-6s %-32s %s\n", "MESSAGE-ID", "ROUTING-KEY",
		    "DEAD-AT", "ATTEMPTS", "STATUS", "TRACE-ID", "REASON");
	json_array_foreach(json_object_get(j, "messages"), i, m) {
		fmt_time(jnum(m, "dead_at"), when, sizeof when);
		printf("%-40s %-20s %-20s %-8lld %-6lld %-32s %s\n", jstr(m, "message_id"),
		    jstr(m, "routing_key"), when,
		    (long long)json_integer_value(json_object_get(m, "attempts")),
		    (long long)json_integer_value(json_object_get(m, "last_status")),
		    *jstr(m, "trace_id") ? jstr(m, "trace_id") : "-", jstr(m, "reason"));
	}
	json_decref(j);
	return SAGACTL_OK;
}

static void
print_saga_rows(json_t *j)
{
	char when[32];
	json_t *s, *st;
	size_t i, k;

	json_array_foreach(json_object_get(j, "sagas"), i, s) {
		fmt_time(jnum(s, "started_at"), when, sizeof when);
		printf("%-40s %-16s %-16s %-13s %-20s ", jstr(s, "id"), jstr(s, "saga"),
		    jstr(s, "version"), jstr(s, "state"), when);
		json_array_foreach(json_object_get(s, "steps"), k, st)
			printf("%s%s=%s", k ? " " : "", jstr(st, "name"), jstr(st, "state"));
		printf("\n");
	}
}

/* One page of GET /v1/admin/sagas; the next page's cursor (malloc'd) or
 * NULL into *next. */
static json_t *
sagas_page(struct sagactl *c, const char *query, const char *after, char **next)
{
	char *path, *e = after ? pct_encode(after) : NULL;
	json_t *j, *n;

	path = xasprintf("/v1/admin/sagas?%s%s%s", query, e ? "&after=" : "", e ? e : "");
	j = sagactl_call(c, "GET", path);
	n = json_object_get(j, "next");
	*next = json_is_string(n) ? xstrdup(json_string_value(n)) : NULL;
	free(path);
	free(e);
	return j;
}

static int
cmd_sagas(struct sagactl *c, int argc, char **argv)
{
	const char *state = NULL, *name = NULL, *after = NULL;
	char query[1024], *e1 = NULL, *e2 = NULL, *next = NULL, *cur = NULL;
	long limit = 100;
	int a, all = 0;
	json_t *j;

	for (a = 1; a < argc; a++) {
		if (strcmp(argv[a], "--state") == 0 && a + 1 < argc)
			state = argv[++a];
		else if (strcmp(argv[a], "--name") == 0 && a + 1 < argc)
			name = argv[++a];
		else if (strcmp(argv[a], "--limit") == 0 && a + 1 < argc)
			limit = strtol(argv[++a], NULL, 10);
		else if (strcmp(argv[a], "--after") == 0 && a + 1 < argc)
			after = argv[++a];
		else if (strcmp(argv[a], "--all") == 0)
			all = 1;
		else
			usage();
	}
	if (state)
		e1 = pct_encode(state);
	if (name)
		e2 = pct_encode(name);
	snprintf(query, sizeof query, "limit=%ld%s%s%s%s", limit,
	    e1 ? "&state=" : "", e1 ? e1 : "", e2 ? "&name=" : "", e2 ? e2 : "");
	free(e1);
	free(e2);
	if (!c->json)
		printf("%-40s %-16s %-16s %-13s %-20s %s\n", "ID", "SAGA", "VERSION", "STATE", "STARTED",
		    "STEPS");
	/* --all: page after page, each of --limit instances, to the end. */
	for (cur = after ? xstrdup(after) : NULL;; cur = next) {
		j = sagas_page(c, query, cur, &next);
		free(cur);
		if (c->json)
			print_json(j);
		else
			print_saga_rows(j);
		json_decref(j);
		if (!all || !next)
			break;
	}
	if (next && !c->json)
		fprintf(stderr, "(more: --after '%s', or --all)\n", next);
	free(next);
	return SAGACTL_OK;
}

static void
print_history(json_t *in)
{
	char when[32];
	json_t *h;
	size_t k;

	printf("history\n");
	json_array_foreach(json_object_get(in, "history"), k, h) {
		double at = jnum(h, "at");
		time_t t = (time_t)at;
		struct tm tm;
		gmtime_r(&t, &tm);
		strftime(when, sizeof when, "%H:%M:%S", &tm);
		printf("  %s.%03d  %-6s %-36s %-18s %s %s\n", when,
		    (int)((at - (double)t) * 1000), jstr(h, "dir"), jstr(h, "what"),
		    jstr(h, "step"), jstr(h, "message_id"), jstr(h, "detail"));
	}
}

static int
cmd_saga(struct sagactl *c, int argc, char **argv)
{
	char rest[16];
	json_t *j, *in, *st;
	size_t i, k;

	if (argc == 3 && (strcmp(argv[1], "retry") == 0 || strcmp(argv[1], "abort") == 0)) {
		snprintf(rest, sizeof rest, "/%s", argv[1]);
		j = sagactl_call_id(c, "POST", "sagas", argv[2], rest);
		if (c->json)
			print_json(j);
		else
			printf("%s %s: %lld instance(s)\n", argv[1], argv[2],
			    (long long)json_integer_value(json_object_get(j, "instances")));
		json_decref(j);
		return SAGACTL_OK;
	}
	if (argc != 2)
		usage();
	j = sagactl_call_id(c, "GET", "sagas", argv[1], "");
	if (printed_json(c, j))
		return SAGACTL_OK;
	json_array_foreach(json_object_get(j, "instances"), i, in) {
		printf("%ssaga %s  id %s  (%s)\n", i ? "\n" : "", jstr(in, "saga"), jstr(in, "id"),
		    jstr(in, "mode"));
		printf("state   %s%s%s\n", jstr(in, "state"), *jstr(in, "reason") ? ": " : "",
		    jstr(in, "reason"));
		printf("version %s\n", jstr(in, "version"));
		if (*jstr(in, "trace_id"))
			printf("trace   %s\n", jstr(in, "trace_id"));
		printf("steps  ");
		json_array_foreach(json_object_get(in, "steps"), k, st)
			printf(" %s=%s", jstr(st, "name"), jstr(st, "state"));
		printf("\n");
		print_history(in);
	}
	json_decref(j);
	return SAGACTL_OK;
}

/* tx list [--state S] [--limit N]: the coordinator's transactions, then
 * the participant's records (sagad(8) TWO-PHASE COMMIT). */
static int
cmd_tx_list(struct sagactl *c, int argc, char **argv)
{
	char path[1024], when[32], *e = NULL;
	json_t *j, *t, *p;
	long limit = 100;
	size_t i, k;
	int a;

	for (a = 2; a < argc; a++) {
		if (strcmp(argv[a], "--state") == 0 && a + 1 < argc)
			e = pct_encode(argv[++a]);
		else if (strcmp(argv[a], "--limit") == 0 && a + 1 < argc)
			limit = strtol(argv[++a], NULL, 10);
		else
			usage();
	}
	snprintf(path, sizeof path, "/v1/admin/transactions?limit=%ld%s%s", limit,
	    e ? "&state=" : "", e ? e : "");
	free(e);
	j = sagactl_call(c, "GET", path);
	if (printed_json(c, j))
		return SAGACTL_OK;
	printf("%-36s %-16s %-11s %-8s %-20s %s\n", "COORDINATOR: ID", "TRANSACTION", "STATE",
	    "DECISION", "STARTED", "VOTES");
	json_array_foreach(json_object_get(j, "transactions"), i, t) {
		json_t *tx = json_object_get(t, "transaction");
		fmt_time(jnum(t, "started_at"), when, sizeof when);
		printf("%-36s %-16s %-11s %-8s %-20s", jstr(t, "id"), jstr(t, "saga"),
		    jstr(tx, "state"), *jstr(tx, "decision") ? jstr(tx, "decision") : "-", when);
		json_array_foreach(json_object_get(tx, "participants"), k, p)
			printf(" %s=%s/%s", jstr(p, "name"), jstr(p, "vote"), jstr(p, "decision"));
		printf("\n");
	}
	printf("\n%-36s %-16s %-12s %-10s %-9s %s\n", "PARTICIPANT: ID", "TRANSACTION",
	    "AS", "STATE", "IN DOUBT", "UPDATED");
	json_array_foreach(json_object_get(j, "participant"), i, p) {
		fmt_time(jnum(p, "updated_at"), when, sizeof when);
		printf("%-36s %-16s %-12s %-10s %-9s %s\n", jstr(p, "id"), jstr(p, "saga"),
		    jstr(p, "participant"), jstr(p, "state"),
		    json_is_true(json_object_get(p, "in_doubt")) ? "yes" : "no", when);
	}
	json_decref(j);
	return SAGACTL_OK;
}

static int
cmd_tx_show(struct sagactl *c, const char *id)
{
	json_t *j = sagactl_call_id(c, "GET", "transactions", id, ""), *t, *tx, *p;
	size_t i, k;

	if (printed_json(c, j))
		return SAGACTL_OK;
	json_array_foreach(json_object_get(j, "coordinator"), i, t) {
		tx = json_object_get(t, "transaction");
		printf("%stransaction %s  id %s  (coordinated here)\n", i ? "\n" : "",
		    jstr(t, "saga"), jstr(t, "id"));
		printf("state     %s%s%s\n", jstr(tx, "state"), *jstr(t, "reason") ? ": " : "",
		    jstr(t, "reason"));
		printf("decision  %s\n", *jstr(tx, "decision") ? jstr(tx, "decision") : "none yet");
		json_array_foreach(json_object_get(tx, "participants"), k, p)
			printf("  %-16s vote %-8s decision %s\n", jstr(p, "name"), jstr(p, "vote"),
			    jstr(p, "decision"));
		print_history(t);
	}
	json_array_foreach(json_object_get(j, "participant"), i, p)
		printf("\nparticipant %s in %s %s: %s%s, voted %.3f, asked the coordinator %lld "
		    "time(s)%s%s\n", jstr(p, "participant"), jstr(p, "saga"), jstr(p, "id"),
		    jstr(p, "state"), json_is_true(json_object_get(p, "in_doubt")) ? " (in doubt)" : "",
		    jnum(p, "voted_at"), (long long)jnum(p, "asks"),
		    *jstr(p, "note") ? "; " : "", jstr(p, "note"));
	json_decref(j);
	return SAGACTL_OK;
}

/* tx resolve ID commit|abort: for a participant in doubt whose
 * coordinator's log is gone. */
static int
cmd_tx_resolve(struct sagactl *c, const char *id, const char *decision)
{
	char rest[32];
	json_t *j;

	if (strcmp(decision, "commit") != 0 && strcmp(decision, "abort") != 0)
		usage();
	fprintf(stderr, "sagactl: WARNING: deciding transaction %s here, not at its coordinator; "
	    "if the coordinator decided otherwise, the participants now disagree\n", id);
	snprintf(rest, sizeof rest, "/resolve?decision=%s", decision);
	j = sagactl_call_id(c, "POST", "transactions", id, rest);
	if (c->json)
		print_json(j);
	else
		printf("%s %s: %lld record(s), delivered to the service\n", decision, id,
		    (long long)json_integer_value(json_object_get(j, "records")));
	json_decref(j);
	return SAGACTL_OK;
}

static int
cmd_tx(struct sagactl *c, int argc, char **argv)
{
	if (argc >= 2 && strcmp(argv[1], "list") == 0)
		return cmd_tx_list(c, argc, argv);
	if (argc == 4 && strcmp(argv[1], "resolve") == 0)
		return cmd_tx_resolve(c, argv[2], argv[3]);
	if (argc != 2)
		usage();
	return cmd_tx_show(c, argv[1]);
}

static const struct {
	const char *name;
	int (*fn)(struct sagactl *, int, char **);
} commands[] = {
	{ "status", cmd_status },
	{ "outbox", cmd_outbox },
	{ "subscriptions", cmd_subscriptions },
	{ "dlq", cmd_dlq },
	{ "sagas", cmd_sagas },
	{ "saga", cmd_saga },
	{ "tx", cmd_tx },
};

int
main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "json", no_argument, NULL, 'j' },
		{ "server", required_argument, NULL, 's' },
		{ "token-file", required_argument, NULL, 't' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 }
	};
	struct sagactl c = { "http://127.0.0.1:7601", NULL, 0, 10 };
	const char *token_file = getenv("SAGACTL_TOKEN_FILE");
	size_t i;
	int ch;

	if (getenv("SAGACTL_URL"))
		c.url = getenv("SAGACTL_URL");
	while ((ch = getopt_long(argc, argv, "+s:t:jh", longopts, NULL)) != -1) {
		switch (ch) {
		case 's': c.url = optarg; break;
		case 't': token_file = optarg; break;
		case 'j': c.json = 1; break;
		default: usage();
		}
	}
	if (token_file) {
		FILE *f = fopen(token_file, "r");
		char buf[4096];
		size_t n;
		if (!f)
			die("cannot read token file %s: %s", token_file, strerror(errno));
		n = fread(buf, 1, sizeof buf - 1, f);
		fclose(f);
		while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' '))
			n--;
		buf[n] = '\0';
		c.token = xstrdup(buf);
	}
	argc -= optind;
	argv += optind;
	if (argc < 1)
		usage();
	for (i = 0; i < sizeof commands / sizeof commands[0]; i++)
		if (strcmp(commands[i].name, argv[0]) == 0) {
			int rc = commands[i].fn(&c, argc, argv);
			free(c.token);
			return rc;
		}
	fprintf(stderr, "sagactl: unknown command '%s'\n", argv[0]);
	usage();
	return SAGACTL_USAGE;
}
