/*
 * OpenTelemetry export (sagad(8), TRACING): spans of the hops sagad
 * handles, sent in batches as OTLP/HTTP with the JSON encoding to
 * tracing.endpoint, from the loop, never holding a message up: spans wait
 * in a bounded queue, and those that find it full, or whose batch the
 * collector refused or never answered, are dropped and counted.
 *
 * A span belongs to the trace of a message's traceparent: its parent is
 * the traceparent's parent id, and the message goes on carrying the
 * span's own id (otel_child), so that the next hop is the span's child.
 * Only sampled traces (flags bit 0) get spans.
 */
#ifndef SAGAD_OTEL_H
#define SAGAD_OTEL_H

#include <stddef.h>
#include <stdint.h>

#include "trace.h"

struct event_base;
struct evbuffer;
struct sagad_conf;
struct otel;
struct otel_span;

/* OTLP's SpanKind. */
enum otel_kind {
	OTEL_INTERNAL = 1,
	OTEL_SERVER = 2,
	OTEL_CLIENT = 3,
	OTEL_PRODUCER = 4,
	OTEL_CONSUMER = 5
};

/* NULL when tracing is off (no tracing.endpoint); *err set on a bad
 * endpoint (sagad -n checks it first). */
struct otel *otel_new(struct event_base *base, const struct sagad_conf *conf, char **err);
/* The spans still queued are dropped (sagad is stopping). */
void otel_free(struct otel *o);

/* A span in the trace of traceparent, NULL when tracing is off or the
 * trace is not sampled: every otel_span_* call accepts NULL. */
struct otel_span *otel_span_start(struct otel *o, const char *traceparent, const char *name,
    enum otel_kind kind, double start);
/* Its id given rather than drawn (16 hex digits): a span whose id others
 * derive without asking (a saga's, saga_trace.c). */
void otel_span_set_id(struct otel_span *s, const char *id);
/* Its id (16 hex digits), for otel_child. */
const char *otel_span_id(const struct otel_span *s);
void otel_span_str(struct otel_span *s, const char *key, const char *value);
void otel_span_int(struct otel_span *s, const char *key, int64_t value);
/* The messaging attributes of a message's hop (OpenTelemetry's messaging
 * conventions): system rabbitmq, the operation, the exchange and routing
 * key, the message and correlation ids. */
void otel_span_message(struct otel_span *s, const char *operation, const struct msg *m);
/* Ends it (error: its status is ERROR with that message) and queues it. */
void otel_span_end(struct otel *o, struct otel_span *s, double end, const char *error);
/* A span that will not be ended (its hop was abandoned). */
void otel_span_drop(struct otel_span *s);

/* The relay's span of one publish, from its send to the broker's confirm
 * (latency seconds before now): a child of the message's context. */
void otel_span_publish(struct otel *o, const char *traceparent, double latency,
    const char *error);

/* traceparent with its parent id replaced by span_id: what the next hop
 * carries. out may be traceparent itself. */
void otel_child(const char *traceparent, const char *span_id, char out[TRACE_PARENT_LEN + 1]);

void otel_metrics(const struct otel *o, struct evbuffer *out);

/* "http://host[:port][/path]": the defaults of OTLP/HTTP are port 4318
 * and /v1/traces. -1 when it is not such a URL. */
int otel_parse_endpoint(const char *url, char *host, size_t hostlen, int *port, char **path);

#endif
