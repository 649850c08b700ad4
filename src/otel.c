#include "otel.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <jansson.h>
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
	json_t *queue;		/* spans waiting, oldest first */
	size_t sending;		/* spans of the request in flight */
	int failing;		/* the last batch failed: logged once */
	uint64_t exported, dropped, failed;
	uint64_t id_state;	/* otel_new_id's */
};

struct otel_span {
	json_t *j;
	json_t *attrs;
	char id[17];
};

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
	if (json_array_size(o->queue) >= (size_t)o->tc->batch)
		otel_flush(o);
}

static json_t *
otel_kv(const char *key, json_t *value)
{
	return json_pack("{s:s,s:o}", "key", key, "value", value);
}

/* One request: resourceSpans of this service, its scope, up to batch
 * spans from the front of the queue. */
static void
otel_flush(struct otel *o)
{
	json_t *spans, *rest, *doc;
	struct evbuffer *req;
	char *body;
	size_t size = json_array_size(o->queue), n = size, i;

	if (!n || o->sending || hclient_busy(o->hc))
		return;
	if (n > (size_t)o->tc->batch)
		n = (size_t)o->tc->batch;
	/* The batch and the rest as two arrays: removing from the front one
	 * by one would move the whole queue for each span. */
	spans = json_array();
	rest = json_array();
	for (i = 0; i < size; i++)
		json_array_append(i < n ? spans : rest, json_array_get(o->queue, i));
	json_decref(o->queue);
	o->queue = rest;
	doc = json_pack("{s:[{s:{s:[o]},s:[{s:{s:s,s:s},s:o}]}]}",
	    "resourceSpans", "resource", "attributes",
	    otel_kv("service.name", json_pack("{s:s}", "stringValue", o->service)),
	    "scopeSpans", "scope", "name", "sagad", "version", PACKAGE_VERSION, "spans", spans);
	body = json_dumps(doc, JSON_COMPACT);
	json_decref(doc);
	req = evbuffer_new();
	evbuffer_add_printf(req, "POST %s HTTP/1.1\r\nHost: %s:%d\r\n"
	    "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n",
	    o->path, o->host, o->port, strlen(body));
	evbuffer_add(req, body, strlen(body));
	free(body);
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
	o->queue = json_array();
	util_random(&o->id_state, sizeof o->id_state);
	o->hc = hclient_new(base, o->host, o->port, OTEL_MAX_ANSWER, 16384);
	o->timer = event_new(base, -1, EV_PERSIST, otel_timer_cb, o);
	tv.tv_sec = (time_t)tc->interval;
	tv.tv_usec = (suseconds_t)((tc->interval - (double)tv.tv_sec) * 1e6);
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
	o->dropped += json_array_size(o->queue);
	json_array_clear(o->queue);
	hclient_free(o->hc);
	if (o->exported || o->dropped || o->failed)
		log_info("trace export stopped", LOG_UINT("exported", o->exported),
		    LOG_UINT("dropped", o->dropped), LOG_UINT("failed", o->failed));
	json_decref(o->queue);
	free(o->service);
	free(o->path);
	free(o);
}

/* ---- spans ---- */

/* A random 64-bit id in hex, not zero: splitmix64 seeded from the
 * kernel once. Span ids must be unique, not unguessable, and a system call
 * for each of tens of thousands of spans a second would cost more than
 * the span. Spans are made on the loop's thread only. */
static void
otel_new_id(struct otel *o, char out[17])
{
	uint64_t z;

	do {
		z = (o->id_state += 0x9e3779b97f4a7c15ULL);
		z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
		z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
		z ^= z >> 31;
	} while (!z);
	snprintf(out, 17, "%016llx", (unsigned long long)z);
}

int
otel_sample_new(const struct otel *o)
{
	unsigned char r[4];
	uint32_t x;

	if (!o || o->tc->sampling >= 1)
		return 1;
	util_random(r, sizeof r);
	x = (uint32_t)r[0] << 24 | (uint32_t)r[1] << 16 | (uint32_t)r[2] << 8 | r[3];
	return x < o->tc->sampling * 4294967296.0;
}

static json_t *
otel_nanos(double t)
{
	char buf[32];

	/* OTLP JSON: 64-bit integers as decimal strings. */
	snprintf(buf, sizeof buf, "%.0f", t * 1e9);
	return json_string(buf);
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
	otel_new_id(o, s->id);
	s->attrs = json_array();
	s->j = json_pack("{s:s,s:s,s:s,s:s,s:i,s:o}", "traceId", trace_id, "spanId", s->id,
	    "parentSpanId", parent, "name", name, "kind", (int)kind,
	    "startTimeUnixNano", otel_nanos(start));
	return s;
}

void
otel_span_set_id(struct otel_span *s, const char *id)
{
	if (!s)
		return;
	snprintf(s->id, sizeof s->id, "%s", id);
	json_object_set_new(s->j, "spanId", json_string(s->id));
}

const char *
otel_span_id(const struct otel_span *s)
{
	return s ? s->id : NULL;
}

void
otel_span_str(struct otel_span *s, const char *key, const char *value)
{
	if (s && value)
		json_array_append_new(s->attrs, otel_kv(key, json_pack("{s:s}", "stringValue", value)));
}

void
otel_span_int(struct otel_span *s, const char *key, int64_t value)
{
	char buf[24];

	if (!s)
		return;
	snprintf(buf, sizeof buf, "%lld", (long long)value);
	json_array_append_new(s->attrs, otel_kv(key, json_pack("{s:s}", "intValue", buf)));
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
	json_object_set_new(s->j, "endTimeUnixNano", otel_nanos(end));
	json_object_set_new(s->j, "attributes", s->attrs);
	if (error)
		json_object_set_new(s->j, "status", json_pack("{s:i,s:s}", "code", 2,
		    "message", error));
	if (json_array_size(o->queue) >= (size_t)o->tc->queue) {
		o->dropped++;
		json_decref(s->j);
	} else
		json_array_append_new(o->queue, s->j);
	free(s);
	if (json_array_size(o->queue) >= (size_t)o->tc->batch)
		otel_flush(o);
}

void
otel_span_drop(struct otel_span *s)
{
	if (!s)
		return;
	json_decref(s->attrs);
	json_decref(s->j);
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
	metrics_sample(out, "sagad_trace_queue", "", (double)json_array_size(o->queue));
}
