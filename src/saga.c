/*
 * The saga engine (saga.h): what a consumed message means to the sagas,
 * the state machine (saga_set_state, the one place instance states
 * change) and the forward transitions; the messages it sends are made in
 * saga_send.c. The backward path (compensation) is in saga_compensate.c, timers in
 * saga_timer.c, an instance's
 * encoding and record in saga_record.c, the operators' views and commands
 * in saga_admin.c (shared types: saga_int.h).
 */
#include "saga.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "delivery.h"
#include "log.h"
#include "props.h"
#include "metrics.h"
#include "saga_data.h"
#include "saga_int.h"
#include "saga_store.h"
#include "sagad.h"
#include "trace.h"
#include "util.h"
#include "xmalloc.h"

const char *const saga_state_names[SAGA_NSTATES] = {
	"running", "completed", "compensating", "compensated", "failed"
};
const char *const saga_step_state_names[STEP_NSTATES] = {
	"pending", "active", "succeeded", "failed", "compensating", "compensated", "skipped"
};
/* ---- the state machine ---- */

/* The edges of the diagram in saga.h, and only they. An instance is born
 * running (saga_on_start); every later change goes through saga_set_state. */
static const unsigned char saga_edges[SAGA_NSTATES][SAGA_NSTATES] = {
	[SAGA_RUNNING] = { [SAGA_COMPLETED] = 1, [SAGA_COMPENSATING] = 1,
	    [SAGA_FAILED] = 1 },			/* given up after the pivot */
	[SAGA_COMPENSATING] = { [SAGA_COMPENSATED] = 1, [SAGA_FAILED] = 1 },
	/* retry, late confirmation; retry after the pivot, late success */
	[SAGA_FAILED] = { [SAGA_COMPENSATING] = 1, [SAGA_RUNNING] = 1 },
	[SAGA_COMPENSATED] = { [SAGA_COMPENSATING] = 1 },	/* late success */
};

int
saga_edge_allowed(enum saga_state from, enum saga_state to)
{
	return from < SAGA_NSTATES && to < SAGA_NSTATES && saga_edges[from][to];
}

/* The one place an instance changes state: checks the edge (an edge not in
 * the diagram is a bug, refused and logged as an error), keeps the reason,
 * counts, writes the history row and the log line. step names the step
 * that caused it, or NULL; why goes to the history and the log. The
 * instance's reason says why it left running, or why it failed: only those
 * changes set it (a late success or a retry keeps it). */
int
saga_set_state(struct saga_engine *e, struct saga_inst *in, enum saga_state to,
    const char *step, const char *why)
{
	struct saga_stats *st = &e->stats[in->def_index];
	enum saga_state from = in->state;

	if (!saga_edge_allowed(from, to)) {
		log_error("saga state change refused: not in the diagram",
		    LOG_STR("saga", in->def->name), LOG_STR("id", in->id),
		    LOG_STR("from", saga_state_names[from]), LOG_STR("to", saga_state_names[to]));
		return -1;
	}
	if (why && (from == SAGA_RUNNING || to == SAGA_FAILED)) {
		free(in->reason);
		in->reason = xstrdup(why);
	}
	in->state = to;
	if (to == SAGA_COMPENSATING && from == SAGA_RUNNING) {
		st->compensations++;
		if (in->def->transaction)
			saga_tx_decided(e, in, 0);
	}
	if (to == SAGA_FAILED)
		st->failed++;
	if (saga_finished(to)) {
		histogram_observe(&st->duration, util_now() - in->started_at);
		saga_trace_end(e, in);
	}
	saga_log(e, in, "state", saga_state_names[to], step, NULL, why ? why : in->reason);
	if (to == SAGA_FAILED)
		log_warn("saga failed", LOG_STR("saga", in->def->name), LOG_STR("id", in->id),
		    LOG_STR("step", step ? step : ""), LOG_STR("reason", in->reason));
	else {
		char msg[48];
		snprintf(msg, sizeof msg, "saga %s", saga_state_names[to]);
		log_info(msg, LOG_STR("saga", in->def->name), LOG_STR("id", in->id),
		    LOG_STR("reason", why));
	}
	return 0;
}

/* ---- transitions ---- */


/* Completed or compensated: the outcome event goes out, then the state. */
void
saga_finish(struct saga_engine *e, struct saga_inst *in, enum saga_state state)
{
	const struct conf_binding *outcome = state == SAGA_COMPLETED ? &in->def->completed :
	    &in->def->compensated;

	saga_timer_del_all(e, in);
	if (outcome->exchange)
		saga_send(e, in, outcome, "event", NULL, saga_state_names[state],
		    in->body, in->body_len, in->ct, 0);
	saga_set_state(e, in, state, NULL, NULL);
}

/* A step whose message cannot be made (a reference of its templates is
 * missing): the step fails, the saga compensates, the history says why. */
static void
saga_step_data_failed(struct saga_engine *e, struct saga_inst *in, size_t i, const char *why)
{
	char reason[SAGA_DATA_ERR + 300];

	saga_log(e, in, "step", "data error", in->def->steps[i].name, NULL, why);
	snprintf(reason, sizeof reason, "step %s: %s", in->def->steps[i].name, why);
	if (saga_past_pivot(in)) {	/* no way back: an operator's turn */
		saga_set_state(e, in, SAGA_FAILED, in->def->steps[i].name, reason);
		return;
	}
	in->steps[i].state = STEP_FAILED;
	saga_start_compensation(e, in, reason);
}

void
saga_send_command(struct saga_engine *e, struct saga_inst *in, unsigned i)
{
	const struct conf_saga_step *cs = &in->def->steps[i];
	struct saga_step_rt *st = &in->steps[i];
	char why[SAGA_DATA_ERR];

	st->state = STEP_ACTIVE;
	st->attempts++;
	st->sent_at = util_now();
	in->cur = i;
	if (saga_send_step(e, in, i, 0, why) < 0) {
		saga_step_data_failed(e, in, i, why);
		return;
	}
	saga_timer_add(e, in, TIMER_STEP, (int)i, util_now() + cs->timeout);
}

int
saga_past_pivot(const struct saga_inst *in)
{
	size_t i;

	for (i = 0; i < in->def->n_steps; i++)
		if (in->def->steps[i].pivot)
			return in->steps[i].state == STEP_SUCCEEDED;
	return 0;
}

void
saga_retry_later(struct saga_engine *e, struct saga_inst *in, size_t i, int refused)
{
	struct saga_step_rt *st = &in->steps[i];
	const char *name = in->def->steps[i].name;
	char why[300];

	if (st->attempts >= (unsigned)in->def->retry_attempts) {
		snprintf(why, sizeof why, "step %s %s %u times after the pivot", name,
		    refused ? "refused" : "unanswered", st->attempts);
		saga_set_state(e, in, SAGA_FAILED, name, why);	/* the step stays active */
		return;
	}
	if (!refused) {		/* it waited its timeout: at once, the same message */
		saga_log(e, in, "timer", "step timeout: command sent again", name, NULL, NULL);
		saga_send_command(e, in, (unsigned)i);
		return;
	}
	/* The same message id: its participant's sagad forgot the refused
	 * command, so that the same command reaches the service again. */
	saga_log(e, in, "step", "refused after the pivot: sent again later", name, NULL, NULL);
	saga_timer_add(e, in, TIMER_STEP, (int)i, util_now() +
	    util_backoff(in->def->retry_initial, in->def->retry_max, st->attempts));
}

/* A step whose condition is false: recorded, never run nor compensated. */
static int
saga_step_skipped(struct saga_engine *e, struct saga_inst *in, size_t i)
{
	const struct conf_saga_step *cs = &in->def->steps[i];
	struct saga_data_src src;

	if (!cs->when)
		return 0;
	saga_data_of(in, &src);
	if (saga_data_when(cs->when, &src))
		return 0;
	in->steps[i].state = STEP_SKIPPED;
	saga_log(e, in, "step", "skipped: condition false", cs->name, NULL, cs->when);
	return 1;
}

/* Step i succeeded with body (what its compensation will carry). */
static void
saga_step_won(struct saga_inst *in, size_t i, const char *body, size_t len, const char *ct)
{
	struct saga_step_rt *st = &in->steps[i];

	st->state = STEP_SUCCEEDED;
	st->order = ++in->order;
	free(st->body);
	free(st->ct);
	st->body = xmalloc(len + 1);
	memcpy(st->body, body, len);
	st->body_len = len;
	st->ct = ct ? xstrdup(ct) : NULL;
}

/* A step done without a reply: its compensation carries the start event. */
static void
saga_step_done(struct saga_inst *in, size_t i)
{
	saga_step_won(in, i, in->body, in->body_len, in->ct);
}

/* A parallel group is the steps next to each other with the same group;
 * a step without one is a group of its own. */
static int
saga_same_group(const struct conf_saga *def, size_t a, size_t b)
{
	return def->steps[a].group && def->steps[b].group &&
	    strcmp(def->steps[a].group, def->steps[b].group) == 0;
}

static size_t
saga_group_start(const struct conf_saga *def, size_t i)
{
	while (i > 0 && saga_same_group(def, i - 1, i))
		i--;
	return i;
}

static size_t
saga_group_end(const struct conf_saga *def, size_t i)
{
	size_t j = i + 1;

	while (j < def->n_steps && saga_same_group(def, i, j))
		j++;
	return j;
}

/* Every step of [from, to) done going forward (succeeded or skipped). */
static int
saga_range_done(const struct saga_inst *in, size_t from, size_t to)
{
	for (; from < to; from++)
		if (in->steps[from].state != STEP_SUCCEEDED && in->steps[from].state != STEP_SKIPPED)
			return 0;
	return 1;
}

/*
 * Orchestrated: run the steps from i on, a parallel group's at once (the
 * next group once all of it is done). A step whose condition is false
 * is skipped; a compensation-only step runs
 * nothing (it is done at once and compensated like the others); a
 * notification step sends its command without reply_to and goes on; the
 * first other step sends its command and waits for the reply. Past the
 * last step the saga is completed.
 */
static void
saga_advance(struct saga_engine *e, struct saga_inst *in, size_t i)
{
	char why[SAGA_DATA_ERR];
	size_t end;

	while (i < in->def->n_steps) {
		end = saga_group_end(in->def, i);
		for (; i < end; i++) {
			const struct conf_saga_step *cs = &in->def->steps[i];
			if (saga_step_skipped(e, in, i))
				continue;
			if (!cs->command.exchange) {
				saga_step_done(in, i);
				if (cs->pivot && in->def->transaction)
					saga_tx_decided(e, in, 1);
				else
					saga_log(e, in, "step", "compensation only: nothing to run",
					    cs->name, NULL, NULL);
				continue;
			}
			if (!cs->notify) {
				saga_send_command(e, in, (unsigned)i);
				if (in->state != SAGA_RUNNING)
					return;	/* a data error: compensating */
				continue;
			}
			in->steps[i].attempts++;
			in->steps[i].sent_at = util_now();
			if (saga_send_step(e, in, i, 0, why) < 0) {
				saga_step_data_failed(e, in, i, why);
				return;
			}
			saga_step_done(in, i);
		}
		if (!saga_range_done(in, saga_group_start(in->def, end - 1), end))
			return;		/* the group's replies are awaited */
	}
	saga_finish(e, in, SAGA_COMPLETED);
}

void
saga_step_succeeded(struct saga_engine *e, struct saga_inst *in, size_t i, const struct msg *m)
{
	(void)e;
	saga_step_won(in, i, m->body, m->body_len, m->props.content_type);
}

static int
saga_all_succeeded(const struct saga_inst *in)
{
	return saga_range_done(in, 0, in->def->n_steps);
}

static void
saga_on_step_result(struct saga_engine *e, struct saga_inst *in, size_t i, int success,
    const struct msg *m)
{
	struct saga_step_rt *st = &in->steps[i];
	const char *name = in->def->steps[i].name;
	int orchestrated = in->def->mode == SAGA_ORCHESTRATED;

	if (st->state == STEP_SKIPPED) {
		saga_log(e, in, "in", "skipped step: ignored", name, m->message_id,
		    success ? "success" : "failure");
		return;
	}
	if (in->def->transaction && success && !st->order && (st->state == STEP_SUCCEEDED ||
	    st->state == STEP_COMPENSATING || st->state == STEP_COMPENSATED)) {
		st->order = ++in->order;	/* its vote, for the record */
		saga_log(e, in, "in", "late yes: aborted all the same", name, m->message_id, NULL);
		return;
	}
	if (st->state == STEP_SUCCEEDED || st->state == STEP_COMPENSATING ||
	    st->state == STEP_COMPENSATED || (!success && st->state == STEP_FAILED)) {
		e->stats[in->def_index].duplicates++;
		saga_log(e, in, "in", "duplicate: ignored", name, m->message_id,
		    success ? "success" : "failure");
		return;
	}
	saga_log(e, in, "in", success ? "success" : "failure", name, m->message_id, NULL);
	if (success && in->state == SAGA_FAILED && saga_past_pivot(in) && st->state == STEP_ACTIVE) {
		saga_set_state(e, in, SAGA_RUNNING, name, "late success after the pivot");
		saga_resume_forward(e, in, i);	/* the others given up go again */
	}
	if (in->state != SAGA_RUNNING) {
		if (success && in->state != SAGA_COMPLETED)
			saga_late_success(e, in, i, m);
		return;
	}
	if (orchestrated && st->state != STEP_ACTIVE) {
		/* A reply for a step that was never sent: nothing to do. */
		e->stats[in->def_index].duplicates++;
		return;
	}
	saga_timer_del(e, in, TIMER_STEP, (int)i);
	saga_trace_step(e, in, i, 0, success ? NULL : "refused");
	if (!success && saga_past_pivot(in)) {
		saga_retry_later(e, in, i, 1);
		return;
	}
	if (!success) {
		char why[300];
		st->state = STEP_FAILED;
		snprintf(why, sizeof why, "step %s failed", name);
		saga_start_compensation(e, in, why);
		return;
	}
	saga_step_succeeded(e, in, i, m);
	if (orchestrated) {
		size_t end = saga_group_end(in->def, i);
		if (saga_range_done(in, saga_group_start(in->def, i), end))
			saga_advance(e, in, end);
	} else if (saga_all_succeeded(in))
		saga_finish(e, in, SAGA_COMPLETED);
}

/* ---- input ---- */

/* Every match of a message, or only those of one definition. */
#define SAGA_ALL_DEFS ((size_t)-1)
static void saga_handle_matches(struct saga_engine *e, const struct msg *m, size_t only);

/* An early event applied by the start of the definition it was kept for:
 * its matches of that definition only; those of another definition were
 * kept for that one's start (keeping them again here would hand the same
 * start the event again). */
struct saga_early_arg {
	struct saga_engine *e;
	size_t def;
};

static void
saga_apply_early(void *arg, const struct msg *m)
{
	struct saga_early_arg *a = arg;

	saga_handle_matches(a->e, m, a->def);
}

void
saga_resume_forward(struct saga_engine *e, struct saga_inst *in, size_t except)
{
	size_t j, waiting = 0;

	for (j = 0; j < in->def->n_steps; j++)
		if (j != except && in->steps[j].state == STEP_ACTIVE) {
			in->steps[j].attempts = 0;
			saga_send_command(e, in, (unsigned)j);
			waiting++;
			if (in->state != SAGA_RUNNING)
				return;
		}
	for (j = 0; j < in->def->n_steps; j++)
		if (in->steps[j].state == STEP_PENDING)
			break;
	/* The rest of the group in progress (members after one whose data
	 * failed were never sent), or the next group once nothing waits. */
	if (j < in->def->n_steps && ((j > 0 && saga_same_group(in->def, j - 1, j)) ||
	    (!waiting && except == (size_t)-1)))
		saga_advance(e, in, j);
}

/* Choreographed: every step waits for its event, but a skipped one and a
 * compensation-only one, done at once (all of them: completed). */
static void
saga_chore_begin(struct saga_engine *e, struct saga_inst *in)
{
	size_t i;

	for (i = 0; i < in->def->n_steps; i++) {
		if (saga_step_skipped(e, in, i))
			continue;
		if (in->def->steps[i].success.exchange) {
			in->steps[i].state = STEP_ACTIVE;
			continue;
		}
		saga_step_done(in, i);
		saga_log(e, in, "step", "compensation only: nothing to run",
		    in->def->steps[i].name, NULL, NULL);
	}
	if (saga_all_succeeded(in))
		saga_finish(e, in, SAGA_COMPLETED);
}

static void
saga_on_start(struct saga_engine *e, size_t def, const struct msg *m)
{
	const char *id = m->props.correlation_id && *m->props.correlation_id ?
	    m->props.correlation_id : m->message_id;
	struct saga_inst *in = saga_load(e, def, id);
	struct saga_early_arg early = { e, def };

	if (in) {
		e->stats[def].duplicates++;
		saga_log(e, in, "in", "start again: ignored", NULL, m->message_id, NULL);
		saga_inst_free(in);
		return;
	}
	in = saga_inst_new(e->versions[def], id);	/* new ones: the current version */
	in->state = SAGA_RUNNING;
	in->started_at = util_now();
	in->body = xmalloc(m->body_len + 1);
	memcpy(in->body, m->body, m->body_len);
	in->body_len = m->body_len;
	in->ct = m->props.content_type ? xstrdup(m->props.content_type) : NULL;
	trace_take(&m->props, &in->trace_parent, &in->trace_state);	/* the saga's trace */
	e->stats[def].started++;
	saga_save(e, in);
	saga_log(e, in, "in", "start", NULL, m->message_id, m->routing_key);
	if (in->def->timeout > 0)
		saga_timer_add(e, in, TIMER_SAGA, -1, in->started_at + in->def->timeout);
	if (in->def->mode == SAGA_ORCHESTRATED)
		saga_advance(e, in, 0);
	else
		saga_chore_begin(e, in);
	saga_save(e, in);
	saga_inst_free(in);
	/* Events that came before this start, now in order after it. */
	saga_store_early_each(e->ss, e->d->conf->sagas[def].name, id, saga_apply_early, &early);
}

static void
saga_orphan(struct saga_engine *e, const struct msg *m, const char *why)
{
	e->orphans++;
	log_debug("saga message ignored", LOG_STR("reason", why),
	    LOG_STR("message_id", m->message_id), LOG_STR("correlation_id", m->props.correlation_id));
}

/* A reply: its command (or compensation) went out, and the saga's messages
 * before it (saga_store.h). */
static void
saga_delivered(struct saga_engine *e, const struct saga_inst *in, const struct saga_match *k)
{
	char id[512];

	saga_message_id_of(in->id, in->def->name, k->step_name,
	    k->compensation ? "compensate" : "command", id, sizeof id);
	saga_store_delivered(e->ss, in->id, id);
}

/* The matches of m: the configuration's, then the step events of older
 * versions of its sagas (bound too, saga_version.c) not matched already. */
static size_t
saga_matches(struct saga_engine *e, const struct msg *m, struct saga_match *out, size_t max)
{
	size_t n = saga_classify(e->d->conf, m, out, max), v, k, j, more;

	for (v = e->d->conf->n_sagas; v < e->nversions && n < max; v++) {
		more = saga_classify_events(e->versions[v]->def, e->versions[v]->def_index, m,
		    out + n, max - n);
		for (k = n; k < n + more; k++) {
			for (j = 0; j < n; j++)
				if (out[j].saga == out[k].saga && out[j].input == out[k].input &&
				    strcmp(out[j].step_name, out[k].step_name) == 0)
					break;
			if (j < n) {	/* the same: drop it */
				out[k--] = out[--more + n];
			}
		}
		n += more;
	}
	return n;
}

/* Step k names in in's own version of its definition, or -1: none there,
 * or an event bound in another version only. */
static ssize_t
saga_match_step(const struct saga_inst *in, const struct saga_match *k, const struct msg *m)
{
	const struct conf_saga_step *st;
	size_t i;

	for (i = 0; i < in->def->n_steps; i++)
		if (strcmp(in->def->steps[i].name, k->step_name) == 0)
			break;
	if (i == in->def->n_steps)
		return -1;
	st = &in->def->steps[i];
	switch (k->input) {
	case SAGA_IN_SUCCESS:
		return saga_binding_is(&st->success, m) ? (ssize_t)i : -1;
	case SAGA_IN_FAILURE:
		return saga_binding_is(&st->failure, m) ? (ssize_t)i : -1;
	case SAGA_IN_COMP_SUCCESS:
		return saga_binding_is(&st->compensate_success, m) ? (ssize_t)i : -1;
	case SAGA_IN_COMP_FAILURE:
		return saga_binding_is(&st->compensate_failure, m) ? (ssize_t)i : -1;
	default:
		return (ssize_t)i;
	}
}

static void
saga_handle_matches(struct saga_engine *e, const struct msg *m, size_t only)
{
	struct saga_match matches[16];
	size_t n = saga_matches(e, m, matches, 16), i;
	ssize_t step;

	if (n == 0) {
		saga_orphan(e, m, "not a saga message");
		return;
	}
	for (i = 0; i < n; i++) {
		struct saga_match *k = &matches[i];
		struct saga_inst *in;

		if (only != SAGA_ALL_DEFS && k->saga != only)
			continue;
		if (k->input == SAGA_IN_START) {
			saga_on_start(e, k->saga, m);
			continue;
		}
		if (!m->props.correlation_id) {
			saga_orphan(e, m, "no correlation id");
			continue;
		}
		if (k->input == SAGA_IN_STATUS) {
			saga_tx_status(e, k, m->props.correlation_id);
			continue;
		}
		in = saga_load(e, k->saga, m->props.correlation_id);
		if (!in && k->input != SAGA_IN_REPLY &&
		    saga_store_keep_early(e->ss, m, e->d->conf->sagas[k->saga].name,
		    m->props.correlation_id) == 0) {
			/* A reply's command came from a committed instance; an
			 * event may have overtaken its start (saga_store.h). */
			e->early++;
			log_debug("saga event before its start: kept",
			    LOG_STR("message_id", m->message_id),
			    LOG_STR("correlation_id", m->props.correlation_id));
			continue;
		}
		if (!in) {
			saga_orphan(e, m, "unknown saga instance");
			continue;
		}
		if ((step = saga_match_step(in, k, m)) < 0) {
			/* Another version's step or event: not this instance's. */
			saga_orphan(e, m, "no such step in the instance's version");
			saga_inst_free(in);
			continue;
		}
		if (k->input == SAGA_IN_REPLY)
			saga_delivered(e, in, k);
		if (k->input == SAGA_IN_REPLY && k->compensation)
			saga_on_compensation_reply(e, in, (size_t)step, k->success, m);
		else if (k->input == SAGA_IN_COMP_SUCCESS || k->input == SAGA_IN_COMP_FAILURE)
			saga_on_compensation_reply(e, in, (size_t)step,
			    k->input == SAGA_IN_COMP_SUCCESS, m);
		else if (k->input == SAGA_IN_REPLY)
			saga_on_step_result(e, in, (size_t)step, k->success, m);
		else
			saga_on_step_result(e, in, (size_t)step, k->input == SAGA_IN_SUCCESS, m);
		saga_save(e, in);
		saga_inst_free(in);
	}
}

/* One consumed message is one batch of the saga store (saga_store.h): a
 * transactional backend commits its state changes and sends together. */
void
saga_handle(void *arg, const struct msg *m)
{
	struct saga_engine *e = arg;

	e->consumed = 1;
	saga_store_batch_begin(e->ss);
	saga_handle_matches(e, m, SAGA_ALL_DEFS);
	if (saga_store_batch_end(e->ss) < 0)
		log_error("saga batch not committed", LOG_STR("message_id", m->message_id));
	e->consumed = 0;
}

/* With a shared store, a consumed message is a job whose end settles it
 * with the broker: acked once committed (or a duplicate), given back when
 * not. */
struct saga_take {
	struct saga_engine *e;
	struct msg *m;
	saga_settle_fn *settle;
	void *arg;
};

static void
saga_take_run(void *arg)
{
	struct saga_take *t = arg;

	t->e->consumed = 1;
	saga_handle_matches(t->e, t->m, SAGA_ALL_DEFS);
	t->e->consumed = 0;
}

static void
saga_take_done(void *arg, enum saga_job_result r)
{
	struct saga_take *t = arg;

	if (r == SAGA_JOB_DUPLICATE)
		log_debug("saga message taken before: acked", LOG_STR("message_id", t->m->message_id));
	t->settle(t->arg, r);
	msg_free(t->m);
	free(t);
}

void
saga_take(struct saga_engine *e, struct msg *m, saga_settle_fn *settle, void *arg)
{
	struct saga_take *t = xcalloc(1, sizeof *t);
	struct saga_job job = { .consumed = m->message_id, .run = saga_take_run,
	    .done = saga_take_done, .arg = t };

	t->e = e;
	t->m = m;
	t->settle = settle;
	t->arg = arg;
	/* A start's saga id is its correlation id, or else its message id. */
	if (m->props.correlation_id && *m->props.correlation_id)
		job.ids[job.n_ids++] = m->props.correlation_id;
	job.ids[job.n_ids++] = m->message_id;
	saga_store_submit(e->ss, &job);
}

/* ---- life ---- */

/* Counted once at start, then kept up to date as instances change: a
 * scrape must not count a large table on the event loop. A shared store
 * is changed by other replicas too: its counts (which it refreshes in the
 * background) are read again at each scrape. */
static void
saga_count_one(void *arg, const struct saga_rec *r)
{
	struct saga_engine *e = arg;
	ssize_t def = saga_def_index(e->d->conf, r->saga);

	if (def >= 0 && r->state >= 0 && r->state < SAGA_NSTATES)
		e->stats[def].states[r->state] = r->row;
}

/* A shared store's batch: counters kept before it runs, put back when it
 * does not commit (its jobs run again and count again). */
static void
saga_batch_event(void *arg, enum saga_batch_event ev)
{
	struct saga_engine *e = arg;
	size_t n = e->d->conf->n_sagas * sizeof *e->stats;

	if (ev == SAGA_BATCH_RUN) {
		memcpy(e->stats_before, e->stats, n);
		e->orphans_before = e->orphans;
		e->early_before = e->early;
	} else {
		memcpy(e->stats, e->stats_before, n);
		e->orphans = e->orphans_before;
		e->early = e->early_before;
	}
}

void
saga_counts_refresh(struct saga_engine *e)
{
	size_t i;

	for (i = 0; i < e->d->conf->n_sagas; i++)
		memset(e->stats[i].states, 0, sizeof e->stats[i].states);
	saga_store_counts(e->ss, saga_count_one, e);
}

struct saga_engine *
saga_new(struct sagad *d, char **err)
{
	struct saga_engine *e = xcalloc(1, sizeof *e);
	size_t i;

	*err = NULL;
	e->d = d;
	e->ss = saga_store_open(d->base, d->store, d->conf, d->otel, err);
	if (!e->ss) {
		saga_free(e);
		return NULL;
	}
	e->stats = xcalloc(d->conf->n_sagas + 1, sizeof *e->stats);
	for (i = 0; i < d->conf->n_sagas; i++) {
		histogram_init(&e->stats[i].duration, metrics_latency_bounds, metrics_latency_nbounds);
		histogram_init(&e->stats[i].prepare, metrics_latency_bounds, metrics_latency_nbounds);
	}
	if (saga_versions_load(e) < 0) {
		*err = xstrdup("saga store: cannot keep the saga definitions' versions (see the log)");
		saga_free(e);
		return NULL;
	}
	saga_counts_refresh(e);
	if (saga_store_shared(e->ss)) {
		log_info("sagas shared with other replicas", LOG_STR("service", d->conf->service));
		e->stats_before = xcalloc(d->conf->n_sagas + 1, sizeof *e->stats_before);
		saga_store_on_batch(e->ss, saga_batch_event, e);
	}
	e->timer_ev = evtimer_new(d->base, saga_timer_cb, e);
	saga_tx_recover(e);
	/* Deadlines live in the store: after a restart they fire as due. */
	saga_rearm(e);
	return e;
}

int
saga_shared(const struct saga_engine *e)
{
	return saga_store_shared(e->ss);
}

void
saga_free(struct saga_engine *e)
{
	if (!e)
		return;
	saga_store_close(e->ss);
	if (e->timer_ev)
		event_free(e->timer_ev);
	free(e->stats);
	free(e->stats_before);
	saga_versions_free(e);
	free(e);
}
