/* Unit tests for the saga engine (src/saga.c, saga_record.c, saga_admin.c):
 * the state diagram, the classification of incoming messages, and the
 * engine driven message by message on a real store (its commands,
 * compensations and outcome events read back from the outbox, its state
 * from the admin view); the saga store's dispatcher (src/saga_store.c):
 * the engine's sends and writes reach the backend inside a batch. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <event2/event.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "conf.h"
#include "props.h"
#include "saga.h"
#include "saga_store_backend.h"
#include "sagad.h"
#include "store.h"
#include "trace.h"

#define CONF \
	"service = \"orders\";\n" \
	"broker = { url = \"amqp://guest:guest@127.0.0.1:5672/%2f\"; };\n" \
	"exchanges = ( { name = \"events\"; type = \"topic\"; },\n" \
	"              { name = \"commands\"; type = \"topic\"; } );\n" \
	"sagas = ( {\n" \
	"  name = \"order\"; mode = \"orchestrated\"; start = \"events:order.created\";\n" \
	"  compensate_attempts = 2; retry_initial = 0.01; retry_max = 0.02;\n" \
	"  steps = (\n" \
	"    { name = \"reserve\"; command = \"commands:stock.reserve\";\n" \
	"      compensate = \"commands:stock.release\"; },\n" \
	"    { name = \"pay\"; command = \"commands:payment.authorize\";\n" \
	"      compensate = \"commands:payment.cancel\"; },\n" \
	"    { name = \"approve\"; command = \"commands:order.approve\"; }\n" \
	"  );\n" \
	"  completed = \"events:order.approved\"; compensated = \"events:order.rejected\";\n" \
	"}, {\n" \
	"  name = \"ship\"; mode = \"choreographed\"; start = \"events:ship.start\";\n" \
	"  steps = ( { name = \"pack\"; success = \"events:packed\"; failure = \"events:pack.failed\";\n" \
	"              compensate = \"commands:unpack\"; } );\n" \
	"}, {\n" \
	"  name = \"label\"; mode = \"choreographed\"; start = \"events:label.start\";\n" \
	"  steps = ( { name = \"print\"; success = \"events:packed\"; } );\n" \
	"} );\n"

/* ---- the store's backend, recorded ----
 * The engine's store is the SQLite backend with its sends, batches and
 * instance writes recorded first (ld --wrap of saga_store_open): the
 * dispatcher's tests see what reaches the backend. */

/* What the recording backend saw. */
static struct {
	int depth, begins, ends;
	int sends, consumed_sends;
	int writes, writes_outside;
	char last_key[64];
	char delivered[256];	/* saga_store_delivered's ids, blank separated */
} rec;

static struct saga_store_ops rec_ops;

/* Early events, kept by the recording backend when early_on (as the
 * PostgreSQL store does): per definition and saga id, handed once. */
static struct {
	int on, kept, handed;
	struct rec_early {
		char saga[16], id[16], mid[16], key[16];
		int taken;
	} v[8];
} early;

static int
rec_keep_early(struct saga_backend *b, const struct msg *m, const char *saga,
    const char *saga_id)
{
	struct rec_early *e;

	(void)b;
	if (!early.on)
		return -1;
	assert_true(early.kept < 8);
	e = &early.v[early.kept++];
	snprintf(e->saga, sizeof e->saga, "%s", saga);
	snprintf(e->id, sizeof e->id, "%s", saga_id);
	snprintf(e->mid, sizeof e->mid, "%s", m->message_id);
	snprintf(e->key, sizeof e->key, "%s", m->routing_key);
	e->taken = 0;
	return 0;
}

static void
rec_early_each(struct saga_backend *b, const char *saga, const char *saga_id,
    void (*fn)(void *arg, const struct msg *m), void *arg)
{
	int i, n = early.kept;

	(void)b;
	for (i = 0; i < n; i++) {
		struct rec_early *e = &early.v[i];
		struct msg m = { 0 };
		if (e->taken || strcmp(e->saga, saga) != 0 || strcmp(e->id, saga_id) != 0)
			continue;
		e->taken = 1;
		early.handed++;
		m.message_id = e->mid;
		m.exchange = "events";
		m.routing_key = e->key;
		m.props.correlation_id = e->id;
		m.body = "{}";
		m.body_len = 2;
		fn(arg, &m);
	}
}

static void
rec_write(void)
{
	rec.writes++;
	if (rec.depth != 1)
		rec.writes_outside++;
}

static void
rec_batch_begin(struct saga_backend *b)
{
	(void)b;
	rec.begins++;
	rec.depth++;
}

static int
rec_batch_end(struct saga_backend *b)
{
	(void)b;
	rec.ends++;
	rec.depth--;
	return 0;
}

static int
rec_send(struct saga_backend *b, struct msg *m, unsigned flags)
{
	rec_write();
	rec.sends++;
	if (flags & SAGA_SEND_CONSUMED)
		rec.consumed_sends++;
	snprintf(rec.last_key, sizeof rec.last_key, "%s", m->routing_key);
	return saga_store_sqlite_ops.send(b, m, flags);
}

static void
rec_delivered(struct saga_backend *b, const char *saga_id, const char *message_id)
{
	size_t n = strlen(rec.delivered);

	(void)b;
	assert_non_null(strstr(message_id, saga_id));
	snprintf(rec.delivered + n, sizeof rec.delivered - n, "%s%s", n ? " " : "", message_id);
}

static int
rec_insert(struct saga_backend *b, struct saga_rec *r)
{
	rec_write();
	return saga_store_sqlite_ops.insert(b, r);
}

static int
rec_update(struct saga_backend *b, const struct saga_rec *r)
{
	rec_write();
	return saga_store_sqlite_ops.update(b, r);
}

struct saga_store *__wrap_saga_store_open(struct event_base *base, struct store *st,
    const struct sagad_conf *conf, struct otel *otel, char **err);

struct saga_store *
__wrap_saga_store_open(struct event_base *base, struct store *st,
    const struct sagad_conf *conf, struct otel *otel, char **err)
{
	struct saga_backend *b = saga_store_sqlite_open(st, err);

	(void)base;
	(void)conf;
	(void)otel;
	rec_ops = saga_store_sqlite_ops;
	rec_ops.send = rec_send;
	rec_ops.insert = rec_insert;
	rec_ops.delivered = rec_delivered;
	rec_ops.update = rec_update;
	rec_ops.batch_begin = rec_batch_begin;
	rec_ops.batch_end = rec_batch_end;
	rec_ops.keep_early = rec_keep_early;
	rec_ops.early_each = rec_early_each;
	return b ? saga_store_new(&rec_ops, b) : NULL;
}

struct fx {
	char dir[64], path[128];
	struct event_base *base;
	struct sagad d;
	int64_t seen;		/* outbox seq read so far */
};

static int
setup(void **state)
{
	struct fx *f = calloc(1, sizeof *f);
	struct conf_errors errs = { 0 };
	char *err = NULL;

	snprintf(f->dir, sizeof f->dir, "/tmp/sagad-test-saga-XXXXXX");
	assert_non_null(mkdtemp(f->dir));
	snprintf(f->path, sizeof f->path, "%s/store.db", f->dir);
	f->base = event_base_new();
	f->d.base = f->base;
	f->d.conf = conf_load_string(CONF, "test.conf", ".", &errs);
	if (!f->d.conf)
		fail_msg("configuration: %s", errs.n ? errs.msg[0] : "?");
	f->d.store = store_open(f->path, f->base, INT64_C(1) << 30, &err);
	assert_non_null(f->d.store);
	f->d.saga = saga_new(&f->d, &err);
	assert_non_null(f->d.saga);
	*state = f;
	return 0;
}

static int
teardown(void **state)
{
	struct fx *f = *state;

	saga_free(f->d.saga);
	store_close(f->d.store);
	conf_free(f->d.conf);
	event_base_free(f->base);
	unlink(f->path);
	{
		char p[160];
		snprintf(p, sizeof p, "%s-wal", f->path);
		unlink(p);
		snprintf(p, sizeof p, "%s-shm", f->path);
		unlink(p);
	}
	rmdir(f->dir);
	free(f);
	return 0;
}

/* ---- driving the engine ---- */

static void
deliver(struct fx *f, const char *exchange, const char *key, const char *id,
    const char *cid, const char *body)
{
	struct msg m = { 0 };

	m.message_id = (char *)id;
	m.exchange = (char *)exchange;
	m.routing_key = (char *)key;
	m.props.correlation_id = (char *)cid;
	m.body = (char *)body;
	m.body_len = strlen(body);
	saga_handle(f->d.saga, &m);
	assert_int_equal(store_flush(f->d.store), 0);
}

/* m through the engine, then the commit; m's headers are freed (its
 * correlation id is the caller's). */
static void
handle_owned(struct fx *f, struct msg *m)
{
	saga_handle(f->d.saga, m);
	m->props.correlation_id = NULL;
	props_free(&m->props);
	assert_int_equal(store_flush(f->d.store), 0);
}

/* A reply as a participant's sagad sends it (x-sagad-* headers). */
static void
reply(struct fx *f, const char *saga, const char *step, int compensation, int success,
    const char *cid, const char *id)
{
	struct msg m = { 0 };

	props_set_header(&m.props, "x-sagad-outcome", success ? "success" : "failure");
	props_set_header(&m.props, "x-sagad-saga", saga);
	props_set_header(&m.props, "x-sagad-step", step);
	if (compensation)
		props_set_header(&m.props, "x-sagad-kind", "compensation");
	m.props.correlation_id = (char *)cid;
	m.message_id = (char *)id;
	m.exchange = "";
	m.routing_key = "orders.sagas";
	m.body = "{}";
	m.body_len = 2;
	handle_owned(f, &m);
}

/* What the engine sent since the last call, space-separated: for each
 * message, what `what` writes of it. */
static const char *
sent_as(struct fx *f, void (*what)(const struct msg *m, char *out, size_t len))
{
	static char out[2048];
	struct msg *ms[64];
	size_t n = 0, i;

	out[0] = 0;
	assert_int_equal(store_outbox_fetch(f->d.store, f->seen, INT64_MAX, 1e12, 64, ms, &n), 0);
	for (i = 0; i < n; i++) {
		if (out[0])
			strcat(out, " ");
		what(ms[i], out + strlen(out), sizeof out - strlen(out));
		f->seen = ms[i]->seq;
		msg_free(ms[i]);
	}
	return out;
}

static void
routing_key_of(const struct msg *m, char *out, size_t len)
{
	snprintf(out, len, "%s", m->routing_key);
}

/* The routing keys the engine sent since the last call. */
static const char *
sent(struct fx *f)
{
	return sent_as(f, routing_key_of);
}

/* The engine's answers to operators come through a callback: with the
 * SQLite store before the call returns. */
struct answer {
	int called, status;
	json_t *json;
};

static void
answer_fn(void *arg, int status, void *json)
{
	struct answer *a = arg;

	a->called = 1;
	a->status = status;
	a->json = json;
}

static json_t *
saga_get_json(struct saga_engine *e, const char *id)
{
	struct answer a = { 0, 0, NULL };

	saga_get(e, id, answer_fn, &a);
	assert_true(a.called);
	assert_true(a.status == 200 || a.status == 404);
	return a.json;
}

/* Instances changed, as the admin API says it. */
static int
saga_cmd(struct saga_engine *e, const char *id, int retry)
{
	struct answer a = { 0, 0, NULL };
	int n;

	saga_command(e, id, retry, answer_fn, &a);
	assert_true(a.called);
	if (a.status == 409)
		return 0;
	assert_int_equal(a.status, 200);
	n = (int)json_integer_value(json_object_get(a.json, "instances"));
	json_decref(a.json);
	return n;
}

static const char *
state_of(struct fx *f, const char *id)
{
	static char st[32];
	json_t *j = saga_get_json(f->d.saga, id), *inst;

	if (!j)
		return "none";
	inst = json_array_get(json_object_get(j, "instances"), 0);
	snprintf(st, sizeof st, "%s", json_string_value(json_object_get(inst, "state")));
	json_decref(j);
	return st;
}

static void
trace_of(const struct msg *m, char *out, size_t len)
{
	const char *tp = props_get_header(&m->props, TRACE_PARENT);
	const char *ts = props_get_header(&m->props, TRACE_STATE);

	snprintf(out, len, "%s/%s", tp ? tp : "-", ts ? ts : "-");
}

/* The traceparent/tracestate of every message sent since the last call
 * ("-" for none). */
static const char *
sent_traces(struct fx *f)
{
	return sent_as(f, trace_of);
}

/* ---- tests ---- */

static void
test_edges_are_the_diagram(void **state)
{
	static const struct { enum saga_state from, to; } edges[] = {
		{ SAGA_RUNNING, SAGA_COMPLETED }, { SAGA_RUNNING, SAGA_COMPENSATING },
		{ SAGA_COMPENSATING, SAGA_COMPENSATED }, { SAGA_COMPENSATING, SAGA_FAILED },
		{ SAGA_FAILED, SAGA_COMPENSATING }, { SAGA_COMPENSATED, SAGA_COMPENSATING },
		/* past the pivot: given up, then retried or a late success */
		{ SAGA_RUNNING, SAGA_FAILED }, { SAGA_FAILED, SAGA_RUNNING },
	};
	int from, to, n = 0;
	size_t k;

	(void)state;
	for (from = 0; from < SAGA_NSTATES; from++)
		for (to = 0; to < SAGA_NSTATES; to++) {
			int want = 0;
			for (k = 0; k < sizeof edges / sizeof edges[0]; k++)
				want |= edges[k].from == (enum saga_state)from &&
				    edges[k].to == (enum saga_state)to;
			assert_int_equal(saga_edge_allowed(from, to), want);
			n += want;
		}
	assert_int_equal(n, 8);
	assert_false(saga_edge_allowed(SAGA_NSTATES, SAGA_RUNNING));
	assert_false(saga_edge_allowed(SAGA_COMPLETED, SAGA_COMPENSATING));
}

static void
test_classify(void **state)
{
	struct fx *f = *state;
	struct saga_match k[4];
	struct msg m = { 0 };

	m.exchange = "events";
	m.routing_key = "order.created";
	assert_int_equal(saga_classify(f->d.conf, &m, k, 4), 1);
	assert_int_equal(k[0].input, SAGA_IN_START);
	assert_int_equal(k[0].saga, 0);

	m.routing_key = "packed";	/* a step of two sagas */
	assert_int_equal(saga_classify(f->d.conf, &m, k, 4), 2);
	assert_int_equal(k[0].input, SAGA_IN_SUCCESS);
	assert_int_equal(k[0].saga, 1);
	assert_int_equal(k[1].input, SAGA_IN_SUCCESS);
	assert_int_equal(k[1].saga, 2);

	m.routing_key = "something.else";
	assert_int_equal(saga_classify(f->d.conf, &m, k, 4), 0);

	props_set_header(&m.props, "x-sagad-outcome", "failure");
	props_set_header(&m.props, "x-sagad-saga", "order");
	props_set_header(&m.props, "x-sagad-step", "pay");
	props_set_header(&m.props, "x-sagad-kind", "compensation");
	assert_int_equal(saga_classify(f->d.conf, &m, k, 4), 1);
	assert_int_equal(k[0].input, SAGA_IN_REPLY);
	assert_int_equal(k[0].step, 1);
	assert_true(k[0].compensation);
	assert_false(k[0].success);
	/* a step that the configured saga does not have: an older version's,
	 * found by name in the instance's own (the engine's orphan if not) */
	props_set_header(&m.props, "x-sagad-step", "nosuch");
	assert_int_equal(saga_classify(f->d.conf, &m, k, 4), 1);
	assert_int_equal(k[0].step, SAGA_STEP_BY_NAME);
	assert_string_equal(k[0].step_name, "nosuch");
	/* a saga that is not configured is not a saga message */
	props_set_header(&m.props, "x-sagad-saga", "nosuch");
	assert_int_equal(saga_classify(f->d.conf, &m, k, 4), 0);
	props_free(&m.props);
}

static void
test_completes_in_order(void **state)
{
	struct fx *f = *state;

	deliver(f, "events", "order.created", "e1", "o1", "{\"total\":5}");
	assert_string_equal(state_of(f, "o1"), "running");
	assert_string_equal(sent(f), "stock.reserve");
	reply(f, "order", "reserve", 0, 1, "o1", "r1");
	assert_string_equal(sent(f), "payment.authorize");
	reply(f, "order", "pay", 0, 1, "o1", "r2");
	assert_string_equal(sent(f), "order.approve");
	reply(f, "order", "approve", 0, 1, "o1", "r3");
	assert_string_equal(sent(f), "order.approved");
	assert_string_equal(state_of(f, "o1"), "completed");
	/* a duplicate start and a late reply change nothing */
	deliver(f, "events", "order.created", "e1", "o1", "{}");
	reply(f, "order", "pay", 0, 0, "o1", "r4");
	assert_string_equal(sent(f), "");
	assert_string_equal(state_of(f, "o1"), "completed");
}

#define TP "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

/* A saga is one trace: its start event's context goes with every command,
 * compensation and outcome event, after the instance was stored and read
 * back (each reply loads it again), and the admin view names the trace. */
static void
test_trace_follows_the_saga(void **state)
{
	struct fx *f = *state;
	struct msg m = { 0 };
	json_t *j;

	props_set_header(&m.props, TRACE_PARENT, TP);
	props_set_header(&m.props, TRACE_STATE, "rojo=1");
	m.message_id = "t1";
	m.exchange = "events";
	m.routing_key = "order.created";
	m.props.correlation_id = "ot";
	m.body = "{}";
	m.body_len = 2;
	handle_owned(f, &m);
	assert_string_equal(sent_traces(f), TP "/rojo=1");
	reply(f, "order", "reserve", 0, 1, "ot", "tr1");
	assert_string_equal(sent_traces(f), TP "/rojo=1");
	reply(f, "order", "pay", 0, 0, "ot", "tr2");	/* refused: compensate */
	assert_string_equal(sent_traces(f), TP "/rojo=1");
	reply(f, "order", "reserve", 1, 1, "ot", "tr3");
	assert_string_equal(sent_traces(f), TP "/rojo=1");	/* order.rejected */
	assert_string_equal(state_of(f, "ot"), "compensated");
	j = saga_get_json(f->d.saga, "ot");
	assert_string_equal(json_string_value(json_object_get(json_array_get(
	    json_object_get(j, "instances"), 0), "trace_id")), "4bf92f3577b34da6a3ce929d0e0e4736");
	json_decref(j);
	/* a start without a context (not from the broker): none invented */
	deliver(f, "events", "order.created", "t2", "ou", "{}");
	assert_string_equal(sent_traces(f), "-/-");
	reply(f, "order", "reserve", 0, 1, "ou", "tr4");	/* and it goes on */
	assert_string_equal(sent_traces(f), "-/-");
	j = saga_get_json(f->d.saga, "ou");
	assert_null(json_object_get(json_array_get(json_object_get(j, "instances"), 0), "trace_id"));
	json_decref(j);
}

static void
test_compensates_in_reverse(void **state)
{
	struct fx *f = *state;

	deliver(f, "events", "order.created", "e2", "o2", "{}");
	rec.delivered[0] = '\0';
	reply(f, "order", "reserve", 0, 1, "o2", "r1");
	reply(f, "order", "pay", 0, 1, "o2", "r2");
	assert_string_equal(sent(f), "stock.reserve payment.authorize order.approve");
	/* each reply tells the store that its command went out */
	assert_string_equal(rec.delivered, "o2:order:reserve:command o2:order:pay:command");
	reply(f, "order", "approve", 0, 0, "o2", "r3");
	assert_string_equal(state_of(f, "o2"), "compensating");
	assert_string_equal(sent(f), "payment.cancel");
	reply(f, "order", "pay", 1, 1, "o2", "c1");
	assert_string_equal(sent(f), "stock.release");
	reply(f, "order", "reserve", 1, 1, "o2", "c2");
	assert_string_equal(sent(f), "order.rejected");
	assert_non_null(strstr(rec.delivered, "o2:order:approve:command"
	    " o2:order:pay:compensate o2:order:reserve:compensate"));
	assert_string_equal(state_of(f, "o2"), "compensated");
}

/* Lets the engine's timers run for a while (retries wait retry_initial). */
static void
run_timers(struct fx *f, double seconds)
{
	struct timeval tv = { 0, (suseconds_t)(seconds * 1e6) };

	event_base_loopexit(f->base, &tv);
	event_base_dispatch(f->base);
	assert_int_equal(store_flush(f->d.store), 0);
}

/* Refused compensations: failed after compensate_attempts (2); sagactl
 * saga retry resumes the compensation, which then completes. */
static void
test_failed_then_retried(void **state)
{
	struct fx *f = *state;

	deliver(f, "events", "order.created", "e3", "o3", "{}");
	reply(f, "order", "reserve", 0, 1, "o3", "r1");
	reply(f, "order", "pay", 0, 0, "o3", "r2");
	assert_string_equal(sent(f), "stock.reserve payment.authorize stock.release");
	reply(f, "order", "reserve", 1, 0, "o3", "c1");
	assert_string_equal(state_of(f, "o3"), "compensating");
	assert_int_equal(saga_cmd(f->d.saga, "o3", 1), 0);	/* not failed: nothing */
	run_timers(f, 0.2);					/* the backoff, then again */
	assert_string_equal(sent(f), "stock.release");
	reply(f, "order", "reserve", 1, 0, "o3", "c2");
	assert_string_equal(state_of(f, "o3"), "failed");
	run_timers(f, 0.1);
	assert_string_equal(sent(f), "");			/* failed waits */
	assert_int_equal(saga_cmd(f->d.saga, "o3", 1), 1);
	assert_int_equal(store_flush(f->d.store), 0);
	assert_string_equal(state_of(f, "o3"), "compensating");
	assert_string_equal(sent(f), "stock.release");
	reply(f, "order", "reserve", 1, 1, "o3", "c3");
	assert_string_equal(sent(f), "order.rejected");
	assert_string_equal(state_of(f, "o3"), "compensated");
}

static void
test_abort_compensates(void **state)
{
	struct fx *f = *state;

	deliver(f, "events", "order.created", "e4", "o4", "{}");
	reply(f, "order", "reserve", 0, 1, "o4", "r1");
	assert_int_equal(saga_cmd(f->d.saga, "o4", 0), 1);
	assert_int_equal(store_flush(f->d.store), 0);
	assert_string_equal(state_of(f, "o4"), "compensating");
	assert_string_equal(sent(f), "stock.reserve payment.authorize stock.release");
	/* abort only a running saga */
	assert_int_equal(saga_cmd(f->d.saga, "o4", 0), 0);
	/* the reply of the aborted step arrives late: compensated too */
	reply(f, "order", "pay", 0, 1, "o4", "r2");
	reply(f, "order", "reserve", 1, 1, "o4", "c1");
	assert_string_equal(sent(f), "payment.cancel");
	reply(f, "order", "pay", 1, 1, "o4", "c2");
	assert_string_equal(sent(f), "order.rejected");
	assert_string_equal(state_of(f, "o4"), "compensated");
}

static void
test_choreographed(void **state)
{
	struct fx *f = *state;

	deliver(f, "events", "ship.start", "s1", "sh1", "{}");
	assert_string_equal(sent(f), "");
	assert_string_equal(state_of(f, "sh1"), "running");
	deliver(f, "events", "packed", "p1", "sh1", "{}");
	assert_string_equal(state_of(f, "sh1"), "completed");
	/* an event for an unknown instance is an orphan */
	deliver(f, "events", "packed", "p2", "nosuch", "{}");
	assert_string_equal(state_of(f, "nosuch"), "none");
}

/* The saga of one definition's instance of id, as the admin API says. */
static const char *
state_in(struct fx *f, const char *saga, const char *id)
{
	static char st[32];
	json_t *j = saga_get_json(f->d.saga, id), *inst;
	size_t i;

	snprintf(st, sizeof st, "none");
	json_array_foreach(j ? json_object_get(j, "instances") : NULL, i, inst)
		if (strcmp(json_string_value(json_object_get(inst, "saga")), saga) == 0)
			snprintf(st, sizeof st, "%s",
			    json_string_value(json_object_get(inst, "state")));
	json_decref(j);
	return st;
}

/* An event of two choreographed sagas before both starts: kept for each
 * definition; each start applies the one kept for it, once, to its own
 * instance, and keeps nothing again (issue 15). */
static void
test_early_two_definitions(void **state)
{
	struct fx *f = *state;

	memset(&early, 0, sizeof early);
	early.on = 1;
	deliver(f, "events", "packed", "p1", "c1", "{}");
	assert_int_equal(early.kept, 2);
	assert_string_equal(early.v[0].saga, "ship");
	assert_string_equal(early.v[1].saga, "label");
	deliver(f, "events", "ship.start", "s1", "c1", "{}");
	assert_int_equal(early.handed, 1);
	assert_true(early.v[0].taken);
	assert_false(early.v[1].taken);
	assert_int_equal(early.kept, 2);	/* label's not kept again */
	assert_string_equal(state_in(f, "ship", "c1"), "completed");
	assert_string_equal(state_in(f, "label", "c1"), "none");
	deliver(f, "events", "label.start", "l1", "c1", "{}");
	assert_int_equal(early.handed, 2);
	assert_int_equal(early.kept, 2);
	assert_string_equal(state_in(f, "label", "c1"), "completed");
	assert_string_equal(state_in(f, "ship", "c1"), "completed");
	early.on = 0;
}

/* ---- the dispatcher ---- */

/* A consumed message, which must be one batch of the store. */
static void
deliver_one_batch(struct fx *f, const char *key, const char *id, const char *cid)
{
	memset(&rec, 0, sizeof rec);
	deliver(f, "events", key, id, cid, "{}");
	assert_int_equal(rec.begins, 1);
	assert_int_equal(rec.ends, 1);
	assert_int_equal(rec.depth, 0);
}

/* A start: the instance and the first command written in its batch, the
 * command through the backend, marked as caused by a consumed message and
 * in sagad's outbox. */
static void
test_start_sends_through_backend(void **state)
{
	struct fx *f = *state;

	deliver_one_batch(f, "order.created", "m-1", "o-1");
	assert_int_equal(rec.sends, 1);
	assert_int_equal(rec.consumed_sends, 1);
	assert_string_equal(rec.last_key, "stock.reserve");
	assert_true(rec.writes >= 2);
	assert_int_equal(rec.writes_outside, 0);
	assert_string_equal(sent(f), "stock.reserve");
}

/* A message for no saga is still one (empty) batch. */
static void
test_orphan_is_one_batch(void **state)
{
	struct fx *f = *state;

	deliver_one_batch(f, "order.unknown", "m-2", "o-2");
	assert_int_equal(rec.sends, 0);
}

/* The SQLite backend has no batch operations: the dispatcher's batch
 * calls do nothing and the end reports success. */
static void
test_batch_ops_optional(void **state)
{
	struct fx *f = *state;
	char *err = NULL;
	struct saga_backend *b = saga_store_sqlite_open(f->d.store, &err);
	struct saga_store *ss;

	assert_non_null(b);
	ss = saga_store_new(&saga_store_sqlite_ops, b);
	saga_store_batch_begin(ss);
	assert_int_equal(saga_store_batch_end(ss), 0);
	saga_store_close(ss);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_edges_are_the_diagram),
		cmocka_unit_test_setup_teardown(test_classify, setup, teardown),
		cmocka_unit_test_setup_teardown(test_completes_in_order, setup, teardown),
		cmocka_unit_test_setup_teardown(test_compensates_in_reverse, setup, teardown),
		cmocka_unit_test_setup_teardown(test_trace_follows_the_saga, setup, teardown),
		cmocka_unit_test_setup_teardown(test_failed_then_retried, setup, teardown),
		cmocka_unit_test_setup_teardown(test_abort_compensates, setup, teardown),
		cmocka_unit_test_setup_teardown(test_choreographed, setup, teardown),
		cmocka_unit_test_setup_teardown(test_early_two_definitions, setup, teardown),
		cmocka_unit_test_setup_teardown(test_start_sends_through_backend, setup, teardown),
		cmocka_unit_test_setup_teardown(test_orphan_is_one_batch, setup, teardown),
		cmocka_unit_test_setup_teardown(test_batch_ops_optional, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
