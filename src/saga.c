#include "saga.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <jansson.h>
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "delivery.h"
#include "log.h"
#include "metrics.h"
#include "saga_store.h"
#include "sagad.h"
#include "store.h"
#include "util.h"
#include "xmalloc.h"

const char *const saga_state_names[SAGA_NSTATES] = {
	"running", "completed", "compensating", "compensated", "failed"
};
const char *const saga_step_state_names[STEP_NSTATES] = {
	"pending", "active", "succeeded", "failed", "compensating", "compensated"
};

enum saga_timer_kind {
	TIMER_SAGA,		/* the whole saga's deadline */
	TIMER_STEP,		/* a command's reply is late: resend or fail */
	TIMER_COMPENSATE	/* a compensation's reply is late, or its retry is due */
};

struct saga_step_rt {
	enum saga_step_state state;
	unsigned attempts;	/* command sends */
	unsigned comp_attempts;
	unsigned order;		/* 1-based order of success; 0: never */
	char *body;		/* the message that completed the step */
	size_t body_len;
	char *ct;
};

struct saga_inst {
	int64_t row;		/* 0: not stored yet */
	const struct conf_saga *def;
	size_t def_index;
	char *id;
	enum saga_state state;
	unsigned cur;		/* orchestrated: the step in progress */
	unsigned order;		/* successes so far */
	char *body;		/* the start event */
	size_t body_len;
	char *ct;
	char *reason;		/* why it compensates or failed */
	double started_at;
	double updated_at, finished_at;	/* as read, for the admin API */
	enum saga_state loaded;		/* state in the store before this change */
	struct saga_step_rt *steps;
};

struct saga_stats {
	uint64_t started, compensations, failed, orphans, duplicates;
	int64_t states[SAGA_NSTATES];	/* instances in the store, kept as they change */
	struct histogram duration;
};

struct saga_engine {
	struct sagad *d;
	struct saga_store *ss;		/* its records (saga_store.h) */
	struct event *timer_ev;
	double timer_at;
	struct saga_stats *stats;	/* per saga definition */
	uint64_t orphans;
	/* Handling a consumed message (saga_handle): what it sends may go out
	 * before the fsync (STORE_OUT_EARLY), for the broker, not acked yet,
	 * delivers the message again if a crash of the machine loses the
	 * transaction, and the same state and message make the same messages,
	 * with the same ids. Timers and operators' commands wait for it. */
	int consumed;
};

/* ---- instance encoding ---- */

static void
saga_pack_str(msgpack_packer *pk, const char *s)
{
	if (!s) {
		msgpack_pack_nil(pk);
		return;
	}
	msgpack_pack_str(pk, strlen(s));
	msgpack_pack_str_body(pk, s, strlen(s));
}

static void
saga_pack_bin(msgpack_packer *pk, const char *b, size_t n)
{
	msgpack_pack_bin(pk, n);
	msgpack_pack_bin_body(pk, b ? b : "", n);
}

static void
saga_pack(const struct saga_inst *in, msgpack_sbuffer *sb)
{
	msgpack_packer pk;
	size_t i;

	msgpack_sbuffer_init(sb);
	msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
	msgpack_pack_array(&pk, 7);
	msgpack_pack_int(&pk, in->state);
	msgpack_pack_unsigned_int(&pk, in->cur);
	msgpack_pack_unsigned_int(&pk, in->order);
	saga_pack_bin(&pk, in->body, in->body_len);
	saga_pack_str(&pk, in->ct);
	saga_pack_str(&pk, in->reason);
	msgpack_pack_array(&pk, in->def->n_steps);
	for (i = 0; i < in->def->n_steps; i++) {
		const struct saga_step_rt *s = &in->steps[i];
		msgpack_pack_array(&pk, 6);
		msgpack_pack_int(&pk, s->state);
		msgpack_pack_unsigned_int(&pk, s->attempts);
		msgpack_pack_unsigned_int(&pk, s->comp_attempts);
		msgpack_pack_unsigned_int(&pk, s->order);
		saga_pack_bin(&pk, s->body, s->body_len);
		saga_pack_str(&pk, s->ct);
	}
}

static char *
saga_obj_str(const msgpack_object *o)
{
	if (o->type != MSGPACK_OBJECT_STR)
		return NULL;
	/* msgpack-c gives an empty string a NULL pointer. */
	return o->via.str.size ? xstrndup(o->via.str.ptr, o->via.str.size) : xstrdup("");
}

static char *
saga_obj_bin(const msgpack_object *o, size_t *len)
{
	char *b;

	*len = 0;
	if (o->type != MSGPACK_OBJECT_BIN)
		return NULL;
	b = xmalloc(o->via.bin.size + 1);
	if (o->via.bin.size)
		memcpy(b, o->via.bin.ptr, o->via.bin.size);
	*len = o->via.bin.size;
	return b;
}

static int
saga_obj_uint(const msgpack_object *o, unsigned max, unsigned *out)
{
	if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER || o->via.u64 > max)
		return -1;
	*out = (unsigned)o->via.u64;
	return 0;
}

/* Decode a stored instance; -1 on anything malformed (damage). */
static int
saga_unpack(struct saga_inst *in, const char *buf, size_t len)
{
	msgpack_unpacked u;
	const msgpack_object *a, *steps;
	size_t off = 0, i;
	unsigned v;
	int rc = -1;

	if (!props_msgpack_sane(buf, len))
		return -1;
	msgpack_unpacked_init(&u);
	if (msgpack_unpack_next(&u, buf, len, &off) != MSGPACK_UNPACK_SUCCESS ||
	    u.data.type != MSGPACK_OBJECT_ARRAY || u.data.via.array.size != 7)
		goto out;
	a = u.data.via.array.ptr;
	if (saga_obj_uint(&a[0], SAGA_NSTATES - 1, &v) < 0)
		goto out;
	in->state = v;
	if (saga_obj_uint(&a[1], 1u << 30, &in->cur) < 0 ||
	    saga_obj_uint(&a[2], 1u << 30, &in->order) < 0)
		goto out;
	in->body = saga_obj_bin(&a[3], &in->body_len);
	in->ct = saga_obj_str(&a[4]);
	in->reason = saga_obj_str(&a[5]);
	steps = &a[6];
	if (steps->type != MSGPACK_OBJECT_ARRAY || steps->via.array.size != in->def->n_steps)
		goto out;
	for (i = 0; i < in->def->n_steps; i++) {
		const msgpack_object *s = &steps->via.array.ptr[i];
		struct saga_step_rt *st = &in->steps[i];
		if (s->type != MSGPACK_OBJECT_ARRAY || s->via.array.size != 6 ||
		    saga_obj_uint(&s->via.array.ptr[0], STEP_NSTATES - 1, &v) < 0)
			goto out;
		st->state = v;
		if (saga_obj_uint(&s->via.array.ptr[1], 1u << 30, &st->attempts) < 0 ||
		    saga_obj_uint(&s->via.array.ptr[2], 1u << 30, &st->comp_attempts) < 0 ||
		    saga_obj_uint(&s->via.array.ptr[3], 1u << 30, &st->order) < 0)
			goto out;
		if (s->via.array.ptr[4].type == MSGPACK_OBJECT_BIN)
			st->body = saga_obj_bin(&s->via.array.ptr[4], &st->body_len);
		st->ct = saga_obj_str(&s->via.array.ptr[5]);
	}
	if (in->cur > in->def->n_steps)
		goto out;
	rc = 0;
out:
	msgpack_unpacked_destroy(&u);
	return rc;
}

static struct saga_inst *
saga_inst_new(const struct sagad_conf *conf, size_t def, const char *id)
{
	struct saga_inst *in = xcalloc(1, sizeof *in);

	in->def = &conf->sagas[def];
	in->def_index = def;
	in->id = xstrdup(id);
	in->steps = xcalloc(in->def->n_steps + 1, sizeof *in->steps);
	return in;
}

static void
saga_inst_free(struct saga_inst *in)
{
	size_t i;

	if (!in)
		return;
	for (i = 0; i < in->def->n_steps; i++) {
		free(in->steps[i].body);
		free(in->steps[i].ct);
	}
	free(in->steps);
	free(in->id);
	free(in->body);
	free(in->ct);
	free(in->reason);
	free(in);
}

/* ---- persistence ---- */

static ssize_t
saga_def_index(const struct sagad_conf *c, const char *name)
{
	size_t i;

	for (i = 0; i < c->n_sagas; i++)
		if (strcmp(c->sagas[i].name, name) == 0)
			return (ssize_t)i;
	return -1;
}

/* The instance a stored record holds, or NULL: its definition is gone
 * from the configuration, or the record is damaged (logged). */
static struct saga_inst *
saga_from_rec(struct saga_engine *e, const struct saga_rec *r)
{
	ssize_t def = saga_def_index(e->d->conf, r->saga);
	struct saga_inst *in;

	if (def < 0)
		return NULL;
	in = saga_inst_new(e->d->conf, (size_t)def, r->id);
	in->row = r->row;
	in->started_at = r->started_at;
	in->updated_at = r->updated_at;
	in->finished_at = r->finished_at;
	if (saga_unpack(in, r->data, r->data_len) < 0) {
		log_error("damaged saga instance in store, ignored", LOG_STR("saga", r->saga),
		    LOG_STR("id", r->id));
		saga_inst_free(in);
		return NULL;
	}
	in->loaded = in->state;
	return in;
}

static struct saga_inst *
saga_load(struct saga_engine *e, size_t def, const char *id)
{
	struct saga_rec r;
	struct saga_inst *in = NULL;

	if (saga_store_get(e->ss, e->d->conf->sagas[def].name, id, &r) == 1)
		in = saga_from_rec(e, &r);
	saga_rec_clear(&r);
	return in;
}

static struct saga_inst *
saga_load_row(struct saga_engine *e, int64_t row)
{
	struct saga_rec r;
	struct saga_inst *in = NULL;

	if (saga_store_get_row(e->ss, row, &r) == 1)
		in = saga_from_rec(e, &r);
	saga_rec_clear(&r);
	return in;
}

static int
saga_finished(enum saga_state s)
{
	return s == SAGA_COMPLETED || s == SAGA_COMPENSATED;
}

static void
saga_save(struct saga_engine *e, struct saga_inst *in)
{
	struct saga_stats *st = &e->stats[in->def_index];
	struct saga_rec r = { 0 };
	msgpack_sbuffer sb;
	int rc;

	saga_pack(in, &sb);
	r.row = in->row;
	r.saga = (char *)in->def->name;
	r.id = in->id;
	r.state = in->state;
	r.started_at = in->started_at;
	r.updated_at = util_now();
	r.finished_at = saga_finished(in->state) || in->state == SAGA_FAILED ? r.updated_at : 0;
	r.data = sb.data;
	r.data_len = sb.size;
	if (!in->row) {
		rc = saga_store_insert(e->ss, &r);
		if (rc == 0) {
			in->row = r.row;
			st->states[in->state]++;
			in->loaded = in->state;
		}
	} else if (saga_store_update(e->ss, &r) == 0 && in->loaded != in->state) {
		st->states[in->loaded]--;
		st->states[in->state]++;
		in->loaded = in->state;
	}
	msgpack_sbuffer_destroy(&sb);
}

/* One line of the instance's history (sagactl saga ID). */
static void
saga_log(struct saga_engine *e, struct saga_inst *in, const char *dir, const char *what,
    const char *step, const char *message_id, const char *detail)
{
	if (!in->row)
		saga_save(e, in);
	if (in->row)
		saga_store_log(e->ss, in->row, util_now(), dir, what, step, message_id, detail);
}

static void
saga_arm(struct saga_engine *e, double due)
{
	struct timeval tv;
	double now = util_now();

	if (evtimer_pending(e->timer_ev, NULL) && e->timer_at <= due)
		return;
	e->timer_at = due;
	if (due < now)
		due = now;
	tv.tv_sec = (time_t)(due - now);
	tv.tv_usec = (suseconds_t)((due - now - tv.tv_sec) * 1e6);
	evtimer_add(e->timer_ev, &tv);
}

static void
saga_timer_add(struct saga_engine *e, struct saga_inst *in, enum saga_timer_kind kind,
    int step, double due)
{
	if (!in->row)
		saga_save(e, in);
	if (in->row && saga_store_timer_set(e->ss, in->row, kind, step, due) == 0)
		saga_arm(e, due);
}

static void
saga_timer_del(struct saga_engine *e, struct saga_inst *in, enum saga_timer_kind kind, int step)
{
	if (in->row)
		saga_store_timer_del(e->ss, in->row, kind, step);
}

static void
saga_timer_del_all(struct saga_engine *e, struct saga_inst *in)
{
	if (in->row)
		saga_store_timer_del_all(e->ss, in->row);
}

/* ---- messages out ---- */

/* Ids are stable for one saga, step and purpose: a resend carries the
 * same id, so that the participant's inbox drops what it already did. */
static void
saga_message_id(const struct saga_inst *in, const char *step, const char *what,
    char *out, size_t len)
{
	int n = snprintf(out, len, "%s:%s%s%s:%s", in->id, in->def->name,
	    step ? ":" : "", step ? step : "", what);

	if (n < 0 || (size_t)n >= len || n > 255) {
		struct msg tmp;
		char h[40];
		memset(&tmp, 0, sizeof tmp);
		tmp.exchange = (char *)in->def->name;
		tmp.routing_key = (char *)(step ? step : "");
		tmp.props.correlation_id = in->id;
		tmp.props.type = (char *)what;
		delivery_derive_id(&tmp, h);
		snprintf(out, len, "%s", h);
	}
}

static void
saga_send(struct saga_engine *e, struct saga_inst *in, const struct conf_binding *to,
    const char *kind, const char *step, const char *what, const char *body,
    size_t len, const char *ct, int reply)
{
	struct msg m;
	char id[512];

	memset(&m, 0, sizeof m);
	saga_message_id(in, step, what, id, sizeof id);
	m.message_id = id;
	m.exchange = to->exchange;
	m.routing_key = to->key;
	m.body = (char *)body;
	m.body_len = len;
	m.props.content_type = ct ? xstrdup(ct) : NULL;
	m.props.correlation_id = xstrdup(in->id);
	if (reply)
		m.props.reply_to = xstrdup(e->d->conf->saga_queue);
	props_set_header(&m.props, "x-sagad-saga", in->def->name);
	if (step)
		props_set_header(&m.props, "x-sagad-step", step);
	props_set_header(&m.props, "x-sagad-kind", kind);
	if (store_outbox_put(e->d->store, &m, util_now(),
	    e->consumed ? STORE_OUT_EARLY : 0) != STORE_PUT_STORED)
		log_error("cannot store a saga message", LOG_STR("saga", in->def->name),
		    LOG_STR("id", in->id), LOG_STR("message_id", id));
	props_free(&m.props);
	{
		char detail[600];
		snprintf(detail, sizeof detail, "%s:%s", to->exchange, to->key);
		saga_log(e, in, "out", what, step, id, detail);
	}
}

/* ---- the state machine ---- */

/* The edges of the diagram in saga.h, and only they. An instance is born
 * running (saga_on_start); every later change goes through saga_set_state. */
static const unsigned char saga_edges[SAGA_NSTATES][SAGA_NSTATES] = {
	[SAGA_RUNNING] = { [SAGA_COMPLETED] = 1, [SAGA_COMPENSATING] = 1 },
	[SAGA_COMPENSATING] = { [SAGA_COMPENSATED] = 1, [SAGA_FAILED] = 1 },
	[SAGA_FAILED] = { [SAGA_COMPENSATING] = 1 },		/* retry, late confirmation */
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
static int
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
	if (to == SAGA_COMPENSATING && from == SAGA_RUNNING)
		st->compensations++;
	if (to == SAGA_FAILED)
		st->failed++;
	if (saga_finished(to))
		histogram_observe(&st->duration, util_now() - in->started_at);
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

static void saga_compensate_next(struct saga_engine *e, struct saga_inst *in);

/* Completed or compensated: the outcome event goes out, then the state. */
static void
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

static void
saga_send_command(struct saga_engine *e, struct saga_inst *in, unsigned i)
{
	const struct conf_saga_step *cs = &in->def->steps[i];
	struct saga_step_rt *st = &in->steps[i];

	st->state = STEP_ACTIVE;
	st->attempts++;
	in->cur = i;
	saga_send(e, in, &cs->command, "command", cs->name, "command", in->body,
	    in->body_len, in->ct, 1);
	saga_timer_add(e, in, TIMER_STEP, (int)i, util_now() + cs->timeout);
}

static void
saga_start_compensation(struct saga_engine *e, struct saga_inst *in, const char *reason)
{
	size_t i;

	if (saga_set_state(e, in, SAGA_COMPENSATING, NULL, reason) < 0)
		return;
	saga_timer_del_all(e, in);
	for (i = 0; i < in->def->n_steps; i++)
		if (in->steps[i].state == STEP_ACTIVE)
			in->steps[i].state = STEP_FAILED;
	saga_compensate_next(e, in);
}

static void
saga_send_compensation(struct saga_engine *e, struct saga_inst *in, size_t i)
{
	const struct conf_saga_step *cs = &in->def->steps[i];
	struct saga_step_rt *st = &in->steps[i];

	st->state = STEP_COMPENSATING;
	st->comp_attempts++;
	saga_send(e, in, &cs->compensate, "compensation", cs->name, "compensate",
	    st->body, st->body_len, st->ct, 1);
	saga_timer_add(e, in, TIMER_COMPENSATE, (int)i, util_now() + in->def->compensate_timeout);
}

/* Compensate one step at a time, the latest success first; a step with
 * nothing to undo is done at once. */
static void
saga_compensate_next(struct saga_engine *e, struct saga_inst *in)
{
	size_t i, pick = (size_t)-1;

	for (i = 0; i < in->def->n_steps; i++) {
		if (in->steps[i].state == STEP_COMPENSATING)
			return;		/* one in progress */
		if (in->steps[i].state == STEP_SUCCEEDED &&
		    (pick == (size_t)-1 || in->steps[i].order > in->steps[pick].order))
			pick = i;
	}
	if (pick == (size_t)-1) {
		saga_finish(e, in, SAGA_COMPENSATED);
		return;
	}
	if (!in->def->steps[pick].compensate.exchange) {
		in->steps[pick].state = STEP_COMPENSATED;
		saga_log(e, in, "step", "compensated", in->def->steps[pick].name, NULL,
		    "nothing to compensate");
		saga_compensate_next(e, in);
		return;
	}
	saga_send_compensation(e, in, pick);
}

static void
saga_step_succeeded(struct saga_engine *e, struct saga_inst *in, size_t i, const struct msg *m)
{
	struct saga_step_rt *st = &in->steps[i];

	(void)e;
	st->state = STEP_SUCCEEDED;
	st->order = ++in->order;
	free(st->body);
	free(st->ct);
	st->body = xmalloc(m->body_len + 1);
	memcpy(st->body, m->body, m->body_len);
	st->body_len = m->body_len;
	st->ct = m->props.content_type ? xstrdup(m->props.content_type) : NULL;
}

static int
saga_all_succeeded(const struct saga_inst *in)
{
	size_t i;

	for (i = 0; i < in->def->n_steps; i++)
		if (in->steps[i].state != STEP_SUCCEEDED)
			return 0;
	return 1;
}

/* A step succeeded after compensation started: it is compensated too. */
static void
saga_late_success(struct saga_engine *e, struct saga_inst *in, size_t i, const struct msg *m)
{
	saga_step_succeeded(e, in, i, m);
	saga_log(e, in, "step", "late success: will be compensated", in->def->steps[i].name,
	    NULL, NULL);
	if (in->state == SAGA_COMPENSATED)
		saga_set_state(e, in, SAGA_COMPENSATING, NULL, "late success");
	if (in->state == SAGA_COMPENSATING)
		saga_compensate_next(e, in);
}

static void
saga_on_step_result(struct saga_engine *e, struct saga_inst *in, size_t i, int success,
    const struct msg *m)
{
	struct saga_step_rt *st = &in->steps[i];
	const char *name = in->def->steps[i].name;
	int orchestrated = in->def->mode == SAGA_ORCHESTRATED;

	if (st->state == STEP_SUCCEEDED || st->state == STEP_COMPENSATING ||
	    st->state == STEP_COMPENSATED || (!success && st->state == STEP_FAILED)) {
		e->stats[in->def_index].duplicates++;
		saga_log(e, in, "in", "duplicate: ignored", name, m->message_id,
		    success ? "success" : "failure");
		return;
	}
	saga_log(e, in, "in", success ? "success" : "failure", name, m->message_id, NULL);
	if (in->state != SAGA_RUNNING) {
		if (success && in->state != SAGA_COMPLETED)
			saga_late_success(e, in, i, m);
		return;
	}
	if (orchestrated && (st->state != STEP_ACTIVE || in->cur != i)) {
		/* A reply for a step that was never sent: nothing to do. */
		e->stats[in->def_index].duplicates++;
		return;
	}
	saga_timer_del(e, in, TIMER_STEP, (int)i);
	if (!success) {
		char why[300];
		st->state = STEP_FAILED;
		snprintf(why, sizeof why, "step %s failed", name);
		saga_start_compensation(e, in, why);
		return;
	}
	saga_step_succeeded(e, in, i, m);
	if (orchestrated && i + 1 < in->def->n_steps)
		saga_send_command(e, in, (unsigned)i + 1);
	else if (saga_all_succeeded(in))
		saga_finish(e, in, SAGA_COMPLETED);
}

/* A step's compensation was refused or went unanswered too often: failed,
 * for an operator (sagactl saga retry). */
static void
saga_compensation_exhausted(struct saga_engine *e, struct saga_inst *in, size_t i,
    const char *how)
{
	char why[300];

	snprintf(why, sizeof why, "compensation of %s %s after %u attempts",
	    in->def->steps[i].name, how, in->steps[i].comp_attempts);
	saga_set_state(e, in, SAGA_FAILED, in->def->steps[i].name, why);
}

static void
saga_on_compensation_reply(struct saga_engine *e, struct saga_inst *in, size_t i,
    int success, const struct msg *m)
{
	struct saga_step_rt *st = &in->steps[i];
	const char *name = in->def->steps[i].name;

	if (st->state != STEP_COMPENSATING) {
		e->stats[in->def_index].duplicates++;
		saga_log(e, in, "in", "duplicate compensation reply: ignored", name,
		    m->message_id, NULL);
		return;
	}
	saga_log(e, in, "in", success ? "compensation success" : "compensation failure",
	    name, m->message_id, NULL);
	saga_timer_del(e, in, TIMER_COMPENSATE, (int)i);
	if (success) {
		st->state = STEP_COMPENSATED;
		if (in->state == SAGA_FAILED)
			saga_set_state(e, in, SAGA_COMPENSATING, name, "late compensation success");
		saga_compensate_next(e, in);
		return;
	}
	if (in->state == SAGA_FAILED)
		return;		/* waits for sagactl saga retry */
	if (st->comp_attempts >= (unsigned)in->def->compensate_attempts) {
		saga_compensation_exhausted(e, in, i, "refused");
		return;
	}
	saga_timer_add(e, in, TIMER_COMPENSATE, (int)i, util_now() +
	    util_backoff(in->def->retry_initial, in->def->retry_max, st->comp_attempts));
}

/* ---- input ---- */

static int
saga_binding_is(const struct conf_binding *b, const struct msg *m)
{
	return b->exchange && strcmp(b->exchange, m->exchange) == 0 &&
	    strcmp(b->key, m->routing_key) == 0;
}

size_t
saga_classify(const struct sagad_conf *conf, const struct msg *m,
    struct saga_match *out, size_t max)
{
	const char *outcome = props_get_header(&m->props, "x-sagad-outcome");
	size_t n = 0, i, j;

	if (outcome) {
		const char *saga = props_get_header(&m->props, "x-sagad-saga");
		const char *step = props_get_header(&m->props, "x-sagad-step");
		const char *kind = props_get_header(&m->props, "x-sagad-kind");
		if (!saga || !step || !max)
			return 0;
		for (i = 0; i < conf->n_sagas; i++) {
			if (strcmp(conf->sagas[i].name, saga) != 0)
				continue;
			for (j = 0; j < conf->sagas[i].n_steps; j++)
				if (strcmp(conf->sagas[i].steps[j].name, step) == 0) {
					out[0].input = SAGA_IN_REPLY;
					out[0].saga = i;
					out[0].step = j;
					out[0].compensation = kind && strcmp(kind, "compensation") == 0;
					out[0].success = strcmp(outcome, "success") == 0;
					return 1;
				}
		}
		return 0;
	}
	if (!m->exchange || !m->routing_key)
		return 0;
	for (i = 0; i < conf->n_sagas && n < max; i++) {
		const struct conf_saga *sg = &conf->sagas[i];
		if (saga_binding_is(&sg->start, m)) {
			out[n].input = SAGA_IN_START;
			out[n].saga = i;
			out[n].step = 0;
			n++;
		}
		if (sg->mode != SAGA_CHOREOGRAPHED)
			continue;
		for (j = 0; j < sg->n_steps && n < max; j++) {
			if (saga_binding_is(&sg->steps[j].success, m)) {
				out[n].input = SAGA_IN_SUCCESS;
				out[n].saga = i;
				out[n].step = j;
				n++;
			} else if (saga_binding_is(&sg->steps[j].failure, m)) {
				out[n].input = SAGA_IN_FAILURE;
				out[n].saga = i;
				out[n].step = j;
				n++;
			}
		}
	}
	return n;
}

static void
saga_on_start(struct saga_engine *e, size_t def, const struct msg *m)
{
	const char *id = m->props.correlation_id && *m->props.correlation_id ?
	    m->props.correlation_id : m->message_id;
	struct saga_inst *in = saga_load(e, def, id);
	size_t i;

	if (in) {
		e->stats[def].duplicates++;
		saga_log(e, in, "in", "start again: ignored", NULL, m->message_id, NULL);
		saga_inst_free(in);
		return;
	}
	in = saga_inst_new(e->d->conf, def, id);
	in->state = SAGA_RUNNING;
	in->started_at = util_now();
	in->body = xmalloc(m->body_len + 1);
	memcpy(in->body, m->body, m->body_len);
	in->body_len = m->body_len;
	in->ct = m->props.content_type ? xstrdup(m->props.content_type) : NULL;
	e->stats[def].started++;
	saga_save(e, in);
	saga_log(e, in, "in", "start", NULL, m->message_id, m->routing_key);
	if (in->def->timeout > 0)
		saga_timer_add(e, in, TIMER_SAGA, -1, in->started_at + in->def->timeout);
	if (in->def->mode == SAGA_ORCHESTRATED)
		saga_send_command(e, in, 0);
	else
		for (i = 0; i < in->def->n_steps; i++)
			in->steps[i].state = STEP_ACTIVE;
	saga_save(e, in);
	saga_inst_free(in);
}

static void
saga_orphan(struct saga_engine *e, const struct msg *m, const char *why)
{
	e->orphans++;
	log_debug("saga message ignored", LOG_STR("reason", why),
	    LOG_STR("message_id", m->message_id), LOG_STR("correlation_id", m->props.correlation_id));
}

void
saga_handle(void *arg, const struct msg *m)
{
	struct saga_engine *e = arg;
	struct saga_match matches[16];
	size_t n = saga_classify(e->d->conf, m, matches, 16), i;

	if (n == 0) {
		saga_orphan(e, m, "not a saga message");
		return;
	}
	e->consumed = 1;
	for (i = 0; i < n; i++) {
		struct saga_match *k = &matches[i];
		struct saga_inst *in;

		if (k->input == SAGA_IN_START) {
			saga_on_start(e, k->saga, m);
			continue;
		}
		if (!m->props.correlation_id) {
			saga_orphan(e, m, "no correlation id");
			continue;
		}
		in = saga_load(e, k->saga, m->props.correlation_id);
		if (!in) {
			saga_orphan(e, m, "unknown saga instance");
			continue;
		}
		if (k->input == SAGA_IN_REPLY && k->compensation)
			saga_on_compensation_reply(e, in, k->step, k->success, m);
		else if (k->input == SAGA_IN_REPLY)
			saga_on_step_result(e, in, k->step, k->success, m);
		else
			saga_on_step_result(e, in, k->step, k->input == SAGA_IN_SUCCESS, m);
		saga_save(e, in);
		saga_inst_free(in);
	}
	e->consumed = 0;
}

/* ---- timers ---- */

static void
saga_on_timer(struct saga_engine *e, struct saga_inst *in, int kind, int step)
{
	if (kind == TIMER_SAGA) {
		if (in->state == SAGA_RUNNING) {
			saga_log(e, in, "timer", "saga timeout", NULL, NULL, NULL);
			saga_start_compensation(e, in, "saga timeout");
		}
		return;
	}
	if (step < 0 || (size_t)step >= in->def->n_steps)
		return;
	if (kind == TIMER_STEP) {
		const struct conf_saga_step *cs = &in->def->steps[step];
		if (in->state != SAGA_RUNNING || in->steps[step].state != STEP_ACTIVE)
			return;
		if (in->steps[step].attempts < (unsigned)cs->attempts) {
			saga_log(e, in, "timer", "step timeout: command sent again", cs->name, NULL, NULL);
			saga_send_command(e, in, (unsigned)step);
			return;
		}
		in->steps[step].state = STEP_FAILED;
		saga_log(e, in, "timer", "step timeout", cs->name, NULL, NULL);
		{
			char why[300];
			snprintf(why, sizeof why, "step %s timed out", cs->name);
			saga_start_compensation(e, in, why);
		}
		return;
	}
	/* TIMER_COMPENSATE: no reply yet, or a refused one waited its backoff. */
	if (in->state != SAGA_COMPENSATING || in->steps[step].state != STEP_COMPENSATING)
		return;
	if (in->steps[step].comp_attempts >= (unsigned)in->def->compensate_attempts) {
		saga_compensation_exhausted(e, in, (size_t)step, "unconfirmed");
		return;
	}
	saga_send_compensation(e, in, (size_t)step);
}

static void
saga_rearm(struct saga_engine *e)
{
	double due = saga_store_timer_next(e->ss);

	if (due > 0) {
		evtimer_del(e->timer_ev);
		saga_arm(e, due);
	}
}

static void
saga_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct saga_engine *e = arg;
	struct saga_due due[256];
	size_t n, i;

	(void)fd;
	(void)what;
	if (e->d->state == SAGAD_STOPPED)
		return;
	n = saga_store_timers_due(e->ss, util_now(), due, 256);
	for (i = 0; i < n; i++) {
		struct saga_inst *in = saga_load_row(e, due[i].row);

		/* The timer is spent whatever happens next. */
		saga_store_timer_spent(e->ss, due[i].id);
		if (!in)
			continue;
		saga_on_timer(e, in, due[i].kind, due[i].step);
		saga_save(e, in);
		saga_inst_free(in);
	}
	e->timer_at = 0;
	saga_rearm(e);
}

/* ---- admin ---- */

static void
saga_hist_json(void *arg, const struct saga_hist *h)
{
	json_array_append_new(arg, json_pack("{s:f,s:s,s:s,s:s,s:s,s:s}", "at", h->at,
	    "dir", h->dir, "what", h->what, "step", h->step, "message_id", h->message_id,
	    "detail", h->detail));
}

static json_t *
saga_inst_json(struct saga_engine *e, struct saga_inst *in, double updated, double finished,
    int history)
{
	json_t *steps = json_array(), *j;
	size_t i;

	for (i = 0; i < in->def->n_steps; i++)
		json_array_append_new(steps, json_pack("{s:s,s:s,s:i,s:i}",
		    "name", in->def->steps[i].name,
		    "state", saga_step_state_names[in->steps[i].state],
		    "attempts", (int)in->steps[i].attempts,
		    "compensate_attempts", (int)in->steps[i].comp_attempts));
	j = json_pack("{s:s,s:s,s:s,s:s,s:s?,s:f,s:f,s:f,s:o}",
	    "saga", in->def->name, "id", in->id, "state", saga_state_names[in->state],
	    "mode", in->def->mode == SAGA_ORCHESTRATED ? "orchestrated" : "choreographed",
	    "reason", in->reason, "started_at", in->started_at, "updated_at", updated,
	    "finished_at", finished, "steps", steps);
	if (history) {
		json_t *h = json_array();
		saga_store_history(e->ss, in->row, saga_hist_json, h);
		json_object_set_new(j, "history", h);
	}
	return j;
}

int
saga_state_from_name(const char *name)
{
	int i;

	for (i = 0; i < SAGA_NSTATES; i++)
		if (strcmp(saga_state_names[i], name) == 0)
			return i;
	return -1;
}

struct saga_list_ctx {
	struct saga_engine *e;
	json_t *list;
};

static void
saga_list_one(void *arg, const struct saga_rec *r)
{
	struct saga_list_ctx *c = arg;
	struct saga_inst *in = saga_from_rec(c->e, r);

	if (in)
		json_array_append_new(c->list, saga_inst_json(c->e, in, in->updated_at,
		    in->finished_at, 0));
	saga_inst_free(in);
}

void *
saga_list_json(struct saga_engine *e, const char *name, int state, size_t limit)
{
	struct saga_list_ctx c = { e, json_array() };

	saga_store_list(e->ss, name, state, limit, saga_list_one, &c);
	return json_pack("{s:o}", "sagas", c.list);
}

/* Every instance with this saga id (one per saga definition). */
static size_t
saga_by_id(struct saga_engine *e, const char *id, int64_t *rows, size_t max)
{
	return saga_store_by_id(e->ss, id, rows, max);
}

void *
saga_get_json(struct saga_engine *e, const char *id)
{
	int64_t rows[64];
	size_t n = saga_by_id(e, id, rows, 64), i;
	json_t *list = json_array();

	for (i = 0; i < n; i++) {
		struct saga_inst *in = saga_load_row(e, rows[i]);
		if (!in)
			continue;
		json_array_append_new(list, saga_inst_json(e, in, in->updated_at, in->finished_at, 1));
		saga_inst_free(in);
	}
	if (!json_array_size(list)) {
		json_decref(list);
		return NULL;
	}
	return json_pack("{s:s,s:o}", "id", id, "instances", list);
}

int
saga_retry(struct saga_engine *e, const char *id)
{
	int64_t rows[64];
	size_t n = saga_by_id(e, id, rows, 64), i, j;
	int done = 0;

	for (i = 0; i < n; i++) {
		struct saga_inst *in = saga_load_row(e, rows[i]);
		if (!in)
			continue;
		if (in->state == SAGA_FAILED) {
			saga_log(e, in, "admin", "retry", NULL, NULL, "sagactl saga retry");
			saga_set_state(e, in, SAGA_COMPENSATING, NULL, "retried by an operator");
			for (j = 0; j < in->def->n_steps; j++)
				if (in->steps[j].state == STEP_COMPENSATING) {
					in->steps[j].comp_attempts = 0;
					in->steps[j].state = STEP_SUCCEEDED;
				}
			saga_compensate_next(e, in);
			saga_save(e, in);
			done++;
		}
		saga_inst_free(in);
	}
	return done;
}

int
saga_abort(struct saga_engine *e, const char *id)
{
	int64_t rows[64];
	size_t n = saga_by_id(e, id, rows, 64), i;
	int done = 0;

	for (i = 0; i < n; i++) {
		struct saga_inst *in = saga_load_row(e, rows[i]);
		if (!in)
			continue;
		if (in->state == SAGA_RUNNING) {
			saga_log(e, in, "admin", "abort", NULL, NULL, "sagactl saga abort");
			saga_start_compensation(e, in, "aborted by an operator");
			saga_save(e, in);
			done++;
		}
		saga_inst_free(in);
	}
	return done;
}

void
saga_metrics(struct saga_engine *e, struct evbuffer *out)
{
	const struct sagad_conf *c = e->d->conf;
	char labels[600];
	size_t i;
	int k;

	metrics_family(out, "sagad_sagas", "gauge", "Saga instances in the store by state.");
	for (i = 0; i < c->n_sagas; i++)
		for (k = 0; k < SAGA_NSTATES; k++) {
			snprintf(labels, sizeof labels, "saga=\"%s\",state=\"%s\"", c->sagas[i].name,
			    saga_state_names[k]);
			metrics_sample(out, "sagad_sagas", labels, (double)e->stats[i].states[k]);
		}
#define PER_SAGA(mname, help, field)						\
	do {									\
		metrics_family(out, mname, "counter", help);			\
		for (i = 0; i < c->n_sagas; i++) {				\
			snprintf(labels, sizeof labels, "saga=\"%s\"", c->sagas[i].name); \
			metrics_sample(out, mname, labels, (double)e->stats[i].field); \
		}								\
	} while (0)
	PER_SAGA("sagad_sagas_started_total", "Saga instances started.", started);
	PER_SAGA("sagad_saga_compensations_total", "Compensations started.", compensations);
	PER_SAGA("sagad_saga_failed_total", "Sagas whose compensation was exhausted.", failed);
	PER_SAGA("sagad_saga_duplicates_total", "Saga messages that changed nothing (repeats).",
	    duplicates);
#undef PER_SAGA
	metrics_family(out, "sagad_saga_orphans_total", "counter",
	    "Messages for unknown or finished sagas, acked and ignored.");
	metrics_sample(out, "sagad_saga_orphans_total", "", (double)e->orphans);
	metrics_family(out, "sagad_saga_duration_seconds", "histogram",
	    "Time from start to completed or compensated.");
	for (i = 0; i < c->n_sagas; i++) {
		snprintf(labels, sizeof labels, "saga=\"%s\"", c->sagas[i].name);
		metrics_histogram(out, "sagad_saga_duration_seconds", labels, &e->stats[i].duration);
	}
}

/* Forget finished (completed or compensated) sagas and their history
 * after the retention, a small batch per call; failed ones stay until an
 * operator acts. Returns how many went. */
static void
saga_expired_one(void *arg, const struct saga_rec *r)
{
	struct saga_engine *e = arg;
	ssize_t def = saga_def_index(e->d->conf, r->saga);

	if (def >= 0 && r->state >= 0 && r->state < SAGA_NSTATES)
		e->stats[def].states[r->state]--;
}

int
saga_expire(struct saga_engine *e, double before, int batch)
{
	int n = saga_store_expire(e->ss, before, 1u << SAGA_COMPLETED | 1u << SAGA_COMPENSATED,
	    batch, saga_expired_one, e);

	return n < 0 ? 0 : n;
}

/* ---- life ---- */

/* Counted once at start, then kept up to date as instances change: a
 * scrape must not count a large table on the event loop. */
static void
saga_count_one(void *arg, const struct saga_rec *r)
{
	struct saga_engine *e = arg;
	ssize_t def = saga_def_index(e->d->conf, r->saga);

	if (def >= 0 && r->state >= 0 && r->state < SAGA_NSTATES)
		e->stats[def].states[r->state] = r->row;
}

struct saga_engine *
saga_new(struct sagad *d, char **err)
{
	struct saga_engine *e = xcalloc(1, sizeof *e);
	size_t i;

	*err = NULL;
	e->d = d;
	e->ss = saga_store_open(d->store, err);
	if (!e->ss) {
		saga_free(e);
		return NULL;
	}
	e->stats = xcalloc(d->conf->n_sagas + 1, sizeof *e->stats);
	for (i = 0; i < d->conf->n_sagas; i++)
		histogram_init(&e->stats[i].duration, metrics_latency_bounds, metrics_latency_nbounds);
	saga_store_counts(e->ss, saga_count_one, e);
	e->timer_ev = evtimer_new(d->base, saga_timer_cb, e);
	/* Deadlines live in the store: after a restart they fire as due. */
	saga_rearm(e);
	return e;
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
	free(e);
}
