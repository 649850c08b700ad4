#include "otel.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "hclient.h"
#include "log.h"
#include "metrics.h"
#include "props.h"
#include "util.h"
#include "xmalloc.h"

/* The collector's answer is read and thrown away: bounded. */
#define OTEL_MAX_ANSWER 65536

struct otel {
	struct event_base *base;
	const struct conf_tracing *tc;
	char *service;
	char host[256];
	int port;
	char *path;
	struct hclient *hc;
	struct event *timer;
	/* Spans waiting, oldest first: a ring of tracing.queue encoded
	 * spans. */
	struct otel_enc *queue;
	size_t qhead, qlen;
	size_t sending;		/* spans of the request in flight */
	int failing;		/* the last batch failed: logged once */
	uint64_t exported, dropped, failed;
};

/* A span is written as the OTLP JSON object it will be sent as while it is
 * made (no tree of objects per span: tens of thousands a second). */
struct otel_enc {
	char *p;
	size_t len, cap;
};

struct otel_span {
	struct otel_enc e;
	size_t id_at;		/* where its spanId's 16 digits are */
	int nattrs;
	char id[17];
};

/* ---- JSON, written ---- */

static void
otel_put(struct otel_enc *e, const char *s, size_t n)
{
	if (e->len + n + 1 > e->cap) {
		e->cap = (e->len + n + 1) * 2;
		e->p = xrealloc(e->p, e->cap);
	}
	memcpy(e->p + e->len, s, n);
	e->len += n;
	e->p[e->len] = '\0';
}

static void
otel_puts(struct otel_enc *e, const char *s)
{
	otel_put(e, s, strlen(s));
}

/* The length of the UTF-8 sequence at s (1..4), 0 when it is not one. */
static size_t
otel_utf8_len(const unsigned char *s)
{
	size_t n, i;

	if (s[0] < 0x80)
		return 1;
	n = s[0] >= 0xf0 && s[0] <= 0xf4 ? 4 : s[0] >= 0xe0 ? 3 : s[0] >= 0xc2 ? 2 : 0;
	if (n == 0 || (s[0] >= 0xf8))
		return 0;
	for (i = 1; i < n; i++)
		if ((s[i] & 0xc0) != 0x80)
			return 0;
	return n;
}

/* s as a JSON string: quotes, backslashes and control characters escaped,
 * a byte that is not valid UTF-8 written as U+FFFD (a routing key is any
 * bytes; JSON is UTF-8). */
static void
otel_str(struct otel_enc *e, const char *s)
{
	const unsigned char *u = (const unsigned char *)s;
	char esc[8];

	otel_put(e, "\"", 1);
	while (*u) {
		size_t n = otel_utf8_len(u), run = 0;
		if (*u == '"' || *u == '\\') {
			esc[0] = '\\';
			esc[1] = (char)*u;
			otel_put(e, esc, 2);
			u++;
			continue;
		}
		if (*u < 0x20) {
			snprintf(esc, sizeof esc, "\\u%04x", *u);
			otel_put(e, esc, 6);
			u++;
			continue;
		}
		if (n == 0) {
			otel_puts(e, "\\ufffd");
			u++;
			continue;
		}
		while (u[run] >= 0x20 && u[run] != '"' && u[run] != '\\' && u[run] < 0x80)
			run++;		/* plain ASCII: in one piece */
		if (run) {
			otel_put(e, (const char *)u, run);
			u += run;
		} else {
			otel_put(e, (const char *)u, n);
			u += n;
		}
	}
	otel_put(e, "\"", 1);
}

/* OTLP JSON: 64-bit integers as decimal strings. */
static void
otel_nanos(struct otel_enc *e, double t)
{
	char buf[40];

	snprintf(buf, sizeof buf, "\"%.0f\"", t * 1e9);
	otel_puts(e, buf);
}

/* ---- the endpoint ---- */

/* "http://host[:port][/path]" (OTLP/HTTP: port 4318, path /v1/traces). */
int
otel_parse_endpoint(const char *url, char *host, size_t hostlen, int *port, char **path)
{
	const char *h = url + 7, *end, *slash;
	size_t n;

	if (strncmp(url, "http://", 7) != 0)
		return -1;
	slash = strchr(h, '/');
	end = slash ? slash : h + strlen(h);
	if (*h == '[') {		/* [v6]:port */
		const char *rb = memchr(h, ']', end - h);
		if (!rb)
			return -1;
		n = rb - h - 1;
		h++;
		end = rb + 1;
	} else {
		const char *colon = memchr(h, ':', end - h);
		n = (colon ? colon : end) - h;
		end = colon ? colon : end;
	}
	if (n == 0 || n >= hostlen)
		return -1;
	memcpy(host, h, n);
	host[n] = '\0';
	*port = 4318;
	if (*end == ':') {
		char *e;
		long p = strtol(end + 1, &e, 10);
		if (e == end + 1 || p < 1 || p > 65535 || (*e && *e != '/'))
			return -1;
		*port = (int)p;
	} else if (*end && *end != '/')
		return -1;
	*path = xstrdup(slash && slash[1] ? slash : "/v1/traces");
	return 0;
}

/* ---- export ---- */

static void otel_flush(struct otel *o);

static void
otel_answered(void *arg, const struct hclient_answer *a)
{
	struct otel *o = arg;
	int ok = a->result == HCLIENT_ANSWERED && a->status >= 200 && a->status < 300;

	if (ok) {
		o->exported += o->sending;
		if (o->failing)
			log_info("trace export works again", LOG_INT("port", o->port));
	} else {
		o->failed += o->sending;
		if (!o->failing && a->result != HCLIENT_CANCELLED)
			log_warn("trace export failed: spans dropped until it works",
			    LOG_STR("result", hclient_result_name(a->result)),
			    LOG_INT("status", a->status), LOG_INT("spans", o->sending));
	}
	o->failing = !ok;
	o->sending = 0;
	if (o->qlen >= (size_t)o->tc->batch)
		otel_flush(o);
}

/* The request's JSON around the spans: this service's resource and the
 * scope. */
static void
otel_envelope(struct otel *o, struct otel_enc *head)
{
	otel_puts(head, "{\"resourceSpans\":[{\"resource\":{\"attributes\":[{\"key\":"
	    "\"service.name\",\"value\":{\"stringValue\":");
	otel_str(head, o->service);
	otel_puts(head, "}}]},\"scopeSpans\":[{\"scope\":{\"name\":\"sagad\",\"version\":\""
	    PACKAGE_VERSION "\"},\"spans\":[");
}

/* One request: up to batch spans from the front of the queue. */
static void
otel_flush(struct otel *o)
{
	static const char tail[] = "]}]}]}";
	struct otel_enc head = { 0 };
	struct evbuffer *req;
	size_t n = o->qlen, len, i;

	if (!n || o->sending || hclient_busy(o->hc))
		return;
	if (n > (size_t)o->tc->batch)
		n = (size_t)o->tc->batch;
	otel_envelope(o, &head);
	len = head.len + strlen(tail) + n - 1;
	for (i = 0; i < n; i++)
		len += o->queue[(o->qhead + i) % o->tc->queue].len;
	req = evbuffer_new();
	evbuffer_add_printf(req, "POST %s HTTP/1.1\r\nHost: %s:%d\r\n"
	    "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n",
	    o->path, o->host, o->port, len);
	evbuffer_add(req, head.p, head.len);
	free(head.p);
	for (i = 0; i < n; i++) {
		struct otel_enc *e = &o->queue[o->qhead];
		if (i)
			evbuffer_add(req, ",", 1);
		evbuffer_add(req, e->p, e->len);
		free(e->p);
		memset(e, 0, sizeof *e);
		o->qhead = (o->qhead + 1) % o->tc->queue;
	}
	o->qlen -= n;
	evbuffer_add(req, tail, strlen(tail));
	o->sending = n;
	hclient_send(o->hc, req, o->tc->timeout, otel_answered, o);
	evbuffer_free(req);
}

static void
otel_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	otel_flush(arg);
}

/* ---- life ---- */

struct otel *
otel_new(struct event_base *base, const struct sagad_conf *conf, char **err)
{
	const struct conf_tracing *tc = &conf->tracing;
	struct otel *o;
	struct timeval tv;

	*err = NULL;
	if (!tc->endpoint)
		return NULL;
	o = xcalloc(1, sizeof *o);
	if (otel_parse_endpoint(tc->endpoint, o->host, sizeof o->host, &o->port, &o->path) < 0) {
		*err = xasprintf("tracing.endpoint must be http://host[:port][/path]: %s",
		    tc->endpoint);
		free(o);
		return NULL;
	}
	o->base = base;
	o->tc = tc;
	o->service = xstrdup(conf->service);
	o->queue = xcalloc((size_t)tc->queue, sizeof *o->queue);
	o->hc = hclient_new(base, o->host, o->port, OTEL_MAX_ANSWER, 16384);
	o->timer = event_new(base, -1, EV_PERSIST, otel_timer_cb, o);
	tv = util_timeval(tc->interval);
	event_add(o->timer, &tv);
	return o;
}

void
otel_free(struct otel *o)
{
	if (!o)
		return;
	event_free(o->timer);
	/* Spans still queued are lost with the process (counted for the
	 * log); the empty queue keeps the cancelled request's callback from
	 * sending another. */
	o->dropped += o->qlen;
	while (o->qlen) {
		free(o->queue[o->qhead].p);
		o->qhead = (o->qhead + 1) % o->tc->queue;
		o->qlen--;
	}
	hclient_free(o->hc);
	if (o->exported || o->dropped || o->failed)
		log_info("trace export stopped", LOG_UINT("exported", o->exported),
		    LOG_UINT("dropped", o->dropped), LOG_UINT("failed", o->failed));
	free(o->queue);
	free(o->service);
	free(o->path);
	free(o);
}

/* ---- spans ---- */

/* A random 64-bit id in hex, not zero (util_rand64: no system call). */
static void
otel_new_id(char out[17])
{
	uint64_t z;

	while (!(z = util_rand64()))
		;
	snprintf(out, 17, "%016llx", (unsigned long long)z);
}

struct otel_span *
otel_span_start(struct otel *o, const char *traceparent, const char *name,
    enum otel_kind kind, double start)
{
	struct otel_span *s;
	char trace_id[33], parent[17];

	if (!o || !traceparent || !trace_parent_valid(traceparent) ||
	    !(strtol(traceparent + 53, NULL, 16) & 1))
		return NULL;	/* off, or not sampled */
	memcpy(trace_id, traceparent + 3, 32);
	trace_id[32] = '\0';
	memcpy(parent, traceparent + 36, 16);
	parent[16] = '\0';
	s = xcalloc(1, sizeof *s);
	otel_new_id(s->id);
	otel_puts(&s->e, "{\"traceId\":\"");
	otel_puts(&s->e, trace_id);
	otel_puts(&s->e, "\",\"spanId\":\"");
	s->id_at = s->e.len;
	otel_puts(&s->e, s->id);
	otel_puts(&s->e, "\",\"parentSpanId\":\"");
	otel_puts(&s->e, parent);
	otel_puts(&s->e, "\",\"name\":");
	otel_str(&s->e, name);
	snprintf(trace_id, sizeof trace_id, ",\"kind\":%d", (int)kind);
	otel_puts(&s->e, trace_id);
	otel_puts(&s->e, ",\"startTimeUnixNano\":");
	otel_nanos(&s->e, start);
	otel_puts(&s->e, ",\"attributes\":[");
	return s;
}

void
otel_span_set_id(struct otel_span *s, const char *id)
{
	if (!s)
		return;
	snprintf(s->id, sizeof s->id, "%s", id);
	memcpy(s->e.p + s->id_at, s->id, 16);
}

const char *
otel_span_id(const struct otel_span *s)
{
	return s ? s->id : NULL;
}

void
otel_span_str(struct otel_span *s, const char *key, const char *value)
{
	if (!s || !value)
		return;
	otel_puts(&s->e, s->nattrs++ ? ",{\"key\":" : "{\"key\":");
	otel_str(&s->e, key);
	otel_puts(&s->e, ",\"value\":{\"stringValue\":");
	otel_str(&s->e, value);
	otel_puts(&s->e, "}}");
}

void
otel_span_int(struct otel_span *s, const char *key, int64_t value)
{
	char buf[64];

	if (!s)
		return;
	otel_puts(&s->e, s->nattrs++ ? ",{\"key\":" : "{\"key\":");
	otel_str(&s->e, key);
	snprintf(buf, sizeof buf, ",\"value\":{\"intValue\":\"%lld\"}}", (long long)value);
	otel_puts(&s->e, buf);
}

void
otel_span_message(struct otel_span *s, const char *operation, const struct msg *m)
{
	otel_span_str(s, "messaging.system", "rabbitmq");
	otel_span_str(s, "messaging.operation", operation);
	otel_span_str(s, "messaging.destination.name", m->exchange);
	otel_span_str(s, "messaging.rabbitmq.destination.routing_key", m->routing_key);
	otel_span_str(s, "messaging.message.id", m->message_id);
	otel_span_str(s, "messaging.message.conversation_id", m->props.correlation_id);
}

void
otel_span_end(struct otel *o, struct otel_span *s, double end, const char *error)
{
	if (!s)
		return;
	otel_puts(&s->e, "],\"endTimeUnixNano\":");
	otel_nanos(&s->e, end);
	if (error) {
		otel_puts(&s->e, ",\"status\":{\"code\":2,\"message\":");
		otel_str(&s->e, error);
		otel_puts(&s->e, "}");
	}
	otel_puts(&s->e, "}");
	if (o->qlen >= (size_t)o->tc->queue) {
		o->dropped++;
		free(s->e.p);
	} else {
		o->queue[(o->qhead + o->qlen) % o->tc->queue] = s->e;
		o->qlen++;
	}
	free(s);
	if (o->qlen >= (size_t)o->tc->batch)
		otel_flush(o);
}

void
otel_span_drop(struct otel_span *s)
{
	if (!s)
		return;
	free(s->e.p);
	free(s);
}

void
otel_span_publish(struct otel *o, const char *traceparent, double latency, const char *error)
{
	double now = util_now();
	struct otel_span *s = otel_span_start(o, traceparent, "publish", OTEL_PRODUCER,
	    now - latency);

	otel_span_str(s, "messaging.system", "rabbitmq");
	otel_span_str(s, "messaging.operation", "publish");
	otel_span_end(o, s, now, error);
}

void
otel_child(const char *traceparent, const char *span_id, char out[TRACE_PARENT_LEN + 1])
{
	/* A later version's extra fields are not ours to pass on: the
	 * context goes on as version 00. */
	memmove(out, traceparent, TRACE_PARENT_LEN);
	out[TRACE_PARENT_LEN] = '\0';
	memcpy(out, "00", 2);
	memcpy(out + 36, span_id, 16);
}

void
otel_metrics(const struct otel *o, struct evbuffer *out)
{
	if (!o)
		return;
	metrics_family(out, "sagad_trace_spans_total", "counter",
	    "Spans by fate: exported (the collector answered 2xx), dropped (the queue"
	    " was full), failed (their batch was refused or not answered).");
	metrics_sample(out, "sagad_trace_spans_total", "result=\"exported\"", (double)o->exported);
	metrics_sample(out, "sagad_trace_spans_total", "result=\"dropped\"", (double)o->dropped);
	metrics_sample(out, "sagad_trace_spans_total", "result=\"failed\"", (double)o->failed);
	metrics_family(out, "sagad_trace_queue", "gauge", "Spans waiting for export.");
	metrics_sample(out, "sagad_trace_queue", "", (double)o->qlen);
}
