/*
 * A saga's spans (sagad(8), TRACING). A saga is one trace, that of its
 * start event; its spans have ids derived from what they are (the trace,
 * the saga, the step, the attempt), so that whichever replica, before or
 * after a restart, sends a saga's message or hears its reply names the
 * same span without storing it:
 *
 *   saga <name>             start -> completed, compensated or failed;
 *                           a child of the start event's consume
 *     step <name>           a command sent -> its reply (or its timeout)
 *     compensate <name>     a compensation sent -> its reply
 *
 * A command or compensation names its step's span as its parent (the
 * participant's consume is that span's child); the outcome event names
 * the saga's. With tracing off, or a trace not sampled, messages carry
 * the saga's context as it came (trace.h).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "otel.h"
#include "props.h"
#include "saga_int.h"
#include "sagad.h"
#include "util.h"

/* The span id of (what, step, attempt) of this saga; what "saga" for the
 * saga's own. FNV-1a over the parts, never zero. */
static void
saga_span_id(const struct saga_inst *in, const char *what, size_t step, unsigned attempt,
    char out[17])
{
	char buf[700];
	uint64_t h;

	snprintf(buf, sizeof buf, "%.32s|%s|%s|%s|%zu|%u", in->trace_parent + 3, in->def->name,
	    in->id, what, step, attempt);
	h = util_fnv1a(buf);
	snprintf(out, 17, "%016llx", (unsigned long long)(h ? h : 1));
}

static int
saga_traced(const struct saga_engine *e, const struct saga_inst *in)
{
	return e->d->otel && in->trace_parent &&
	    (strtol(in->trace_parent + 53, NULL, 16) & 1);
}

static ssize_t
saga_step_index(const struct saga_inst *in, const char *step)
{
	size_t i;

	for (i = 0; step && i < in->def->n_steps; i++)
		if (strcmp(in->def->steps[i].name, step) == 0)
			return (ssize_t)i;
	return -1;
}

void
saga_trace_out(struct saga_engine *e, const struct saga_inst *in, struct props *p,
    const char *kind, const char *step)
{
	char id[17], tp[TRACE_PARENT_LEN + 1];
	ssize_t i = saga_step_index(in, step);

	if (!in->trace_parent)
		return;
	if (!saga_traced(e, in)) {
		trace_put(p, in->trace_parent, in->trace_state);
		return;
	}
	if (i >= 0 && strcmp(kind, "command") == 0)
		saga_span_id(in, "step", (size_t)i, in->steps[i].attempts, id);
	else if (i >= 0 && strcmp(kind, "compensation") == 0)
		saga_span_id(in, "compensate", (size_t)i, in->steps[i].comp_attempts, id);
	else
		saga_span_id(in, "saga", 0, 0, id);
	otel_child(in->trace_parent, id, tp);
	trace_put(p, tp, in->trace_state);
}

/* A span whose id is derived: otel_span_start gives a random one, which
 * is replaced (the parent set by its caller). */
static struct otel_span *
saga_span(struct saga_engine *e, const struct saga_inst *in, const char *tp, const char *name,
    double start, const char *id)
{
	struct otel_span *s = otel_span_start(e->d->otel, tp, name, OTEL_INTERNAL, start);

	otel_span_set_id(s, id);
	otel_span_str(s, "sagad.saga", in->def->name);
	otel_span_str(s, "sagad.saga_id", in->id);
	return s;
}

void
saga_trace_step(struct saga_engine *e, const struct saga_inst *in, size_t i, int compensation,
    const char *error)
{
	const struct saga_step_rt *st = &in->steps[i];
	char id[17], sid[17], tp[TRACE_PARENT_LEN + 1], name[300];
	struct otel_span *s;

	if (!saga_traced(e, in) || st->sent_at <= 0)
		return;
	saga_span_id(in, "saga", 0, 0, sid);
	otel_child(in->trace_parent, sid, tp);		/* the saga's span is its parent */
	saga_span_id(in, compensation ? "compensate" : "step", i,
	    compensation ? st->comp_attempts : st->attempts, id);
	snprintf(name, sizeof name, "%s %s", compensation ? "compensate" : "step",
	    in->def->steps[i].name);
	s = saga_span(e, in, tp, name, st->sent_at, id);
	otel_span_str(s, "sagad.step", in->def->steps[i].name);
	otel_span_int(s, "sagad.attempt", compensation ? st->comp_attempts : st->attempts);
	otel_span_end(e->d->otel, s, util_now(), error);
}

void
saga_trace_end(struct saga_engine *e, const struct saga_inst *in)
{
	char id[17], name[300];
	struct otel_span *s;

	if (!saga_traced(e, in))
		return;
	saga_span_id(in, "saga", 0, 0, id);
	snprintf(name, sizeof name, "saga %s", in->def->name);
	s = saga_span(e, in, in->trace_parent, name, in->started_at, id);
	otel_span_str(s, "sagad.state", saga_state_names[in->state]);
	otel_span_end(e->d->otel, s, util_now(), in->state == SAGA_FAILED ? in->reason : NULL);
}
