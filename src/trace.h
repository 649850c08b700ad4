/* W3C Trace Context (https://www.w3.org/TR/trace-context/) on messages:
 * the traceparent and tracestate a message carries, as AMQP headers of
 * those names, from its publish to its delivery; sagad starts a trace for
 * a message without one as tracing.new_traces says (sagad(8), TRACE
 * CONTEXT). */
#ifndef SAGAD_TRACE_H
#define SAGAD_TRACE_H

#include <stddef.h>

#include "msg.h"

struct sagad_conf;

#define TRACE_PARENT "traceparent"
#define TRACE_STATE "tracestate"
#define TRACE_PARENT_LEN 55		/* version 00: 2-32-16-2 hex, 3 dashes */
#define TRACE_STATE_MAX 512		/* what W3C asks a vendor to pass on */

/* Whether s is a traceparent this version of the spec accepts: version
 * 00 exactly, a later version with the same leading fields (forward
 * compatibility); trace id and parent id not all zeros. */
int trace_parent_valid(const char *s);
/* tracestate: at most TRACE_STATE_MAX bytes, printable ASCII. */
int trace_state_valid(const char *s);

/* A new trace: version 00, random trace and parent ids, the sampled flag
 * as asked. */
void trace_new(char out[TRACE_PARENT_LEN + 1], int sampled);
/* Whether a trace sagad starts is sampled: tracing.sampling of the share
 * of them; always when tracing is off (the services' tracers decide). */
int trace_sample(const struct sagad_conf *conf);

/* A message's own context, as published to sagad: -1 with *why set when a
 * traceparent or tracestate header is malformed. Without one, a new
 * trace when tracing.start (tracing.new_traces) says sagad starts them;
 * otherwise the message goes on without a context. */
int trace_check(struct props *p, const struct sagad_conf *conf, const char **why);
/* A message from elsewhere (the broker, a source's table): a malformed
 * traceparent is dropped with the tracestate that went with it (W3C: a
 * vendor that cannot parse traceparent restarts the trace), and a message
 * left without one starts a new trace when tracing.start is set. Returns
 * 1 when it started one. */
int trace_ensure(struct props *p, const struct sagad_conf *conf);

/* Copies the context of src to dst (a reply, a saga's message). */
void trace_copy(struct props *dst, const struct props *src);

/* A message's context as copies (NULL when none or malformed), and back
 * (parent NULL: nothing): a saga keeps its start event's. */
void trace_take(const struct props *p, char **parent, char **state);
void trace_put(struct props *p, const char *parent, const char *state);

/* The trace id (32 hex digits) of a message; NULL when it has none. */
const char *trace_id(const struct props *p, char out[33]);

#endif
