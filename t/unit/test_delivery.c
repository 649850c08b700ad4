/* Unit tests for src/delivery.c and src/dispatch.c: the inbox on a real
 * store, the consuming broker's thread replaced (ld --wrap) by a recorder
 * of acks, requeues and consume wishes, DELIVERY events played by the
 * test, and the service played in-process by an evhttp server on a free
 * loopback port: commit before ack, delivery, dedup, retries after their
 * backoff, refusals, dead letters once attempts are exhausted, and the
 * circuit. The loop runs until a condition holds, with a bounded wait:
 * nothing sleeps. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <jansson.h>
#include <netinet/in.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "broker.h"
#include "conf.h"
#include "delivery.h"
#include "props.h"
#include "sagad.h"
#include "store.h"
#include "store_records.h"
#include "util.h"
#include "xmalloc.h"

/* Short backoff and circuit so that every test ends within a second. */
#define CONF \
	"service = \"orders\";\n" \
	"broker = { url = \"amqp://guest:guest@127.0.0.1:5672/%%2f\"; };\n" \
	"exchanges = ( { name = \"events\"; type = \"topic\"; } );\n" \
	"subscriptions = ( { name = \"inbox\"; queue_type = \"classic\";\n" \
	"  bind = [ \"events:#\" ]; deliver = \"http://127.0.0.1:%d/messages\";\n" \
	"  concurrency = 2; max_pending = 64; timeout = 2; max_attempts = 5;\n" \
	"  retry_initial = 0.05; retry_max = 0.05;\n" \
	"  circuit_failures = 3; circuit_open = 0.1; } );\n"

#define WAIT_LIMIT 5.0	/* seconds a condition may take before the test fails */

/* ---- the broker, as the delivery sees it ---- */

static struct store *ack_store;	/* to check, at each ack, what is committed */
static unsigned nacks, nrequeues, nconsume_off, nconsume_on;
static uint64_t acked_tags[64];
static int acked_uncommitted;	/* an ack came while its record was not committed */
/* Every settlement (ack, requeue, reject) in order: what, epoch, sub, tag. */
static unsigned nrejects, nkicks, nsettled;
static struct settled {
	char what;	/* 'a', 'q', 'r' */
	uint64_t epoch, tag;
	int sub;
} settled[64];

static void
record_settled(char what, uint64_t epoch, int sub, uint64_t tag)
{
	assert_true(nsettled < 64);
	settled[nsettled].what = what;
	settled[nsettled].epoch = epoch;
	settled[nsettled].sub = sub;
	settled[nsettled].tag = tag;
	nsettled++;
}

void __wrap_broker_ack(struct broker *b, uint64_t epoch, int sub, uint64_t tag);
void __wrap_broker_requeue(struct broker *b, uint64_t epoch, int sub, uint64_t tag);
void __wrap_broker_reject(struct broker *b, uint64_t epoch, int sub, uint64_t tag);
void __wrap_broker_consume(struct broker *b, int sub, int on);
void __wrap_broker_kick(struct broker *b);

void
__wrap_broker_ack(struct broker *b, uint64_t epoch, int sub, uint64_t tag)
{
	(void)b;
	record_settled('a', epoch, sub, tag);
	/* Committed: no transaction open, and the record is in the inbox. */
	if (!sqlite3_get_autocommit(store_db(ack_store)) ||
	    store_inbox_count(ack_store, "inbox", INBOX_PENDING) +
	    store_inbox_count(ack_store, "inbox", INBOX_DONE) +
	    store_inbox_count(ack_store, "inbox", INBOX_DEAD) == 0)
		acked_uncommitted = 1;
	assert_true(nacks < 64);
	acked_tags[nacks++] = tag;
}

void
__wrap_broker_requeue(struct broker *b, uint64_t epoch, int sub, uint64_t tag)
{
	(void)b;
	record_settled('q', epoch, sub, tag);
	nrequeues++;
}

void
__wrap_broker_reject(struct broker *b, uint64_t epoch, int sub, uint64_t tag)
{
	(void)b;
	record_settled('r', epoch, sub, tag);
	nrejects++;
}

void
__wrap_broker_consume(struct broker *b, int sub, int on)
{
	(void)b;
	(void)sub;
	if (on)
		nconsume_on++;
	else
		nconsume_off++;
}

void
__wrap_broker_kick(struct broker *b)
{
	(void)b;
	nkicks++;
}

/* ---- the service ---- */

/* What the service answers, request by request; 200 past the script. */
struct service {
	int script[16];
	size_t nscript;
	size_t nreq;
	char ids[16][64];	/* Message-Id of each request */
	unsigned attempt[16];	/* its Sagad-Attempt */
	double at[16];		/* util_now() when it came */
};

static struct service svc;

static void
service_cb(struct evhttp_request *req, void *arg)
{
	struct evkeyvalq *h = evhttp_request_get_input_headers(req);
	const char *id = evhttp_find_header(h, "Message-Id");
	const char *att = evhttp_find_header(h, "Sagad-Attempt");
	size_t i = svc.nreq;
	int status = i < svc.nscript ? svc.script[i] : 200;

	(void)arg;
	if (i < 16) {
		snprintf(svc.ids[i], sizeof svc.ids[i], "%s", id ? id : "");
		svc.attempt[i] = att ? (unsigned)atoi(att) : 0;
		svc.at[i] = util_now();
	}
	svc.nreq++;
	evhttp_send_reply(req, status, status < 300 ? "OK" : "No", NULL);
}

/* ---- fixture ---- */

struct fx {
	char dir[64], path[128];
	struct event_base *base;
	struct evhttp *http;
	struct event *tick;
	struct sagad d;
	struct delivery *dl;
	uint64_t tag;
	uint64_t epoch;		/* of the broker connection the test plays */
};

static int
service_port(struct evhttp_bound_socket *bs)
{
	struct sockaddr_in sin;
	socklen_t len = sizeof sin;

	assert_int_equal(getsockname(evhttp_bound_socket_get_fd(bs),
	    (struct sockaddr *)&sin, &len), 0);
	return ntohs(sin.sin_port);
}

/* Wakes the loop now and then so that run_until sees its deadline. */
static void
tick_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd; (void)what; (void)arg;
}

static int
setup(void **state)
{
	struct fx *f = xcalloc(1, sizeof *f);
	struct conf_errors errs = { 0 };
	struct evhttp_bound_socket *bs;
	struct timeval tv = { 0, 10000 };
	char conf[1024], *err = NULL;

	snprintf(f->dir, sizeof f->dir, "/tmp/sagad-test-delivery-XXXXXX");
	assert_non_null(mkdtemp(f->dir));
	snprintf(f->path, sizeof f->path, "%s/store.db", f->dir);
	f->base = event_base_new();
	event_base_priority_init(f->base, 3);
	f->http = evhttp_new(f->base);
	evhttp_set_gencb(f->http, service_cb, NULL);
	bs = evhttp_bind_socket_with_handle(f->http, "127.0.0.1", 0);
	assert_non_null(bs);
	snprintf(conf, sizeof conf, CONF, service_port(bs));
	f->d.base = f->base;
	f->d.conf = conf_load_string(conf, "test.conf", ".", &errs);
	if (!f->d.conf)
		fail_msg("configuration: %s", errs.n ? errs.msg[0] : "?");
	f->d.store = store_open(f->path, f->base, INT64_C(1) << 30, &err);
	assert_non_null(f->d.store);
	f->d.state = SAGAD_RUNNING;
	f->dl = delivery_new(&f->d);
	assert_non_null(f->dl);
	f->d.delivery = f->dl;
	f->tick = event_new(f->base, -1, EV_PERSIST, tick_cb, NULL);
	event_add(f->tick, &tv);
	memset(&svc, 0, sizeof svc);
	ack_store = f->d.store;
	nacks = nrequeues = nconsume_off = nconsume_on = 0;
	nrejects = nkicks = nsettled = 0;
	acked_uncommitted = 0;
	f->epoch = 1;
	delivery_set_broker(f->dl, (struct broker *)f);	/* never looked into */
	*state = f;
	return 0;
}

static int
teardown(void **state)
{
	struct fx *f = *state;
	char p[160];

	/* As sagad_run stops: pending commits are served while the delivery
	 * still exists (their callbacks use it), then it goes. */
	store_flush(f->d.store);
	f->d.state = SAGAD_STOPPED;
	delivery_free(f->dl);
	store_close(f->d.store);
	conf_free(f->d.conf);
	event_free(f->tick);
	evhttp_free(f->http);
	event_base_free(f->base);
	snprintf(p, sizeof p, "rm -rf '%s'", f->dir);
	assert_int_equal(system(p), 0);
	free(f);
	return 0;
}

/* ---- helpers ---- */

typedef int cond_fn(struct fx *f, unsigned n);

/* Run the loop until cond(f, n) holds; fail after WAIT_LIMIT seconds. */
static void
run_until(struct fx *f, cond_fn *cond, unsigned n)
{
	double end = util_mono() + WAIT_LIMIT;

	while (!cond(f, n)) {
		if (util_mono() > end)
			fail_msg("condition not reached within %.0f s", WAIT_LIMIT);
		event_base_loop(f->base, EVLOOP_ONCE);
	}
}

static int
requests_reach(struct fx *f, unsigned n)
{
	(void)f;
	return svc.nreq >= n;
}

static int
acks_reach(struct fx *f, unsigned n)
{
	(void)f;
	return nacks >= n;
}

static int
dead_reach(struct fx *f, unsigned n)
{
	return store_inbox_count(f->d.store, "inbox", INBOX_DEAD) >= (int64_t)n;
}

static int
done_reach(struct fx *f, unsigned n)
{
	return store_inbox_count(f->d.store, "inbox", INBOX_DONE) >= (int64_t)n &&
	    delivery_inflight(f->dl) == 0;
}

static int
circuit_closed_again(struct fx *f, unsigned n)
{
	(void)n;
	return done_reach(f, 1);
}

/* A few turns with nothing new expected: commits settle, nothing else. */
static void
settle(struct fx *f)
{
	int i;

	for (i = 0; i < 4; i++)
		event_base_loop(f->base, EVLOOP_NONBLOCK);
	assert_int_equal(store_flush(f->d.store), 0);
	for (i = 0; i < 4; i++)
		event_base_loop(f->base, EVLOOP_NONBLOCK);
}

static void
broker_up(struct fx *f)
{
	struct broker_event ev = { 0 };

	ev.kind = BROKER_EV_UP;
	ev.epoch = f->epoch;
	delivery_broker_event(f->dl, &ev);
}

/* A consumed message, as the broker thread posts it; reply_to may be NULL. */
static void
deliver(struct fx *f, const char *id, const char *reply_to)
{
	struct broker_event ev = { 0 };
	struct msg *m = xcalloc(1, sizeof *m);

	m->seq = (int64_t)++f->tag;
	m->message_id = xstrdup(id);
	m->exchange = xstrdup("events");
	m->routing_key = xstrdup("order.created");
	m->body = xstrdup("{}");
	m->body_len = 2;
	if (reply_to)
		m->props.reply_to = xstrdup(reply_to);
	ev.kind = BROKER_EV_DELIVERY;
	ev.epoch = f->epoch;
	ev.sub = 0;
	ev.msg = m;
	ev.received = util_mono();
	delivery_broker_event(f->dl, &ev);
}

/* The subscription's admin view, one string field. */
static void
assert_sub_field(struct fx *f, const char *key, const char *want)
{
	json_t *j = delivery_sub_json(f->dl, 0);

	assert_non_null(j);
	assert_string_equal(json_string_value(json_object_get(j, key)), want);
	json_decref(j);
}

/* The reason of the first dead letter. */
static void
assert_dead_reason(struct fx *f, const char *want)
{
	json_t *j = delivery_dlq_json(f->dl, 0, 10);
	json_t *first;

	assert_non_null(j);
	first = json_array_get(json_object_get(j, "messages"), 0);
	assert_non_null(first);
	assert_string_equal(json_string_value(json_object_get(first, "reason")), want);
	json_decref(j);
}

/* ---- tests ---- */

static void
test_committed_before_ack_then_delivered(void **state)
{
	struct fx *f = *state;

	broker_up(f);
	deliver(f, "m1", NULL);
	assert_int_equal(nacks, 0);	/* the record is not even written yet */
	run_until(f, acks_reach, 1);
	assert_false(acked_uncommitted);
	assert_true(acked_tags[0] == 1);
	run_until(f, done_reach, 1);
	assert_int_equal(svc.nreq, 1);
	assert_string_equal(svc.ids[0], "m1");
	assert_int_equal(svc.attempt[0], 1);
	assert_int_equal(nrequeues, 0);
}

static void
test_duplicate_acked_not_delivered_twice(void **state)
{
	struct fx *f = *state;

	broker_up(f);
	deliver(f, "dup", NULL);
	run_until(f, done_reach, 1);
	deliver(f, "dup", NULL);	/* the broker sends it again */
	run_until(f, acks_reach, 2);
	settle(f);
	assert_false(acked_uncommitted);
	assert_true(acked_tags[1] == 2);
	assert_int_equal(svc.nreq, 1);
	assert_int_equal(store_inbox_count(f->d.store, "inbox", INBOX_DONE), 1);
}

static void
test_5xx_retried_after_backoff(void **state)
{
	struct fx *f = *state;

	svc.script[0] = 503;
	svc.nscript = 1;
	broker_up(f);
	deliver(f, "r1", NULL);
	run_until(f, requests_reach, 2);
	assert_string_equal(svc.ids[1], "r1");
	assert_int_equal(svc.attempt[1], 2);
	/* util_backoff: at least half of retry_initial (0.05 s). */
	assert_true(svc.at[1] - svc.at[0] >= 0.025 - 0.002);
	run_until(f, done_reach, 1);
	assert_int_equal(store_inbox_count(f->d.store, "inbox", INBOX_DEAD), 0);
}

static void
test_409_422_are_refusals(void **state)
{
	struct fx *f = *state;

	svc.script[0] = 409;	/* a command: its failure reply */
	svc.script[1] = 422;	/* an event: dead-lettered as rejected */
	svc.nscript = 2;
	broker_up(f);
	deliver(f, "cmd", "orders.replies");
	run_until(f, requests_reach, 1);
	deliver(f, "evt", NULL);
	run_until(f, dead_reach, 1);
	settle(f);
	assert_int_equal(svc.nreq, 2);	/* neither is retried */
	assert_dead_reason(f, "rejected");
	/* The refused command is forgotten; its failure reply and the dead
	 * letter wait in the outbox. */
	assert_int_equal(store_inbox_count(f->d.store, "inbox", INBOX_PENDING), 0);
	assert_int_equal(store_inbox_count(f->d.store, "inbox", INBOX_DONE), 0);
	assert_int_equal(store_outbox_count(f->d.store), 2);
	assert_sub_field(f, "circuit", "closed");
}

static void
test_attempts_exhausted_dead_letter(void **state)
{
	struct fx *f = *state;
	size_t i;

	for (i = 0; i < 5; i++)
		svc.script[i] = 500;
	svc.nscript = 5;
	broker_up(f);
	deliver(f, "hopeless", NULL);
	run_until(f, dead_reach, 1);
	settle(f);
	assert_int_equal(svc.nreq, 5);	/* max_attempts */
	assert_int_equal(svc.attempt[4], 5);
	assert_dead_reason(f, "attempts-exhausted");
	assert_int_equal(store_inbox_count(f->d.store, "inbox", INBOX_PENDING), 0);
	assert_int_equal(store_outbox_count(f->d.store), 1);	/* to inbox's dlq */
}

static void
test_circuit_opens_after_failures(void **state)
{
	struct fx *f = *state;
	unsigned off, on;

	svc.script[0] = svc.script[1] = svc.script[2] = 500;
	svc.nscript = 3;
	broker_up(f);
	deliver(f, "c1", NULL);
	run_until(f, requests_reach, 3);	/* circuit_failures */
	settle(f);
	assert_sub_field(f, "circuit", "open");
	assert_true(nconsume_off > 0);	/* takes nothing from the broker */
	off = nconsume_off;
	on = nconsume_on;
	/* After circuit_open, one probe: it succeeds and closes the circuit. */
	run_until(f, circuit_closed_again, 0);
	assert_int_equal(svc.nreq, 4);
	assert_sub_field(f, "circuit", "closed");
	assert_int_equal(nconsume_off, off);
	assert_true(nconsume_on > on);	/* resumed */
}

/* ---- a taker (the saga engine on a shared store): no inbox record ---- */

static struct {
	unsigned n;
	struct msg *m[8];
	struct delivery_ticket *t[8];
} taken;

static void
take_cb(void *arg, struct msg *m, struct delivery_ticket *t)
{
	struct fx *f = arg;

	assert_non_null(f);
	assert_true(taken.n < 8);
	taken.m[taken.n] = m;
	taken.t[taken.n] = t;
	taken.n++;
}

static void
taker_on(struct fx *f)
{
	memset(&taken, 0, sizeof taken);
	delivery_set_taker(f->dl, 0, take_cb, f);
	broker_up(f);
}

static void
taken_free(void)
{
	unsigned i;

	for (i = 0; i < taken.n; i++)
		msg_free(taken.m[i]);
	taken.n = 0;
}

static int64_t
inbox_total(struct fx *f)
{
	return store_inbox_count(f->d.store, "inbox", INBOX_PENDING) +
	    store_inbox_count(f->d.store, "inbox", INBOX_DONE) +
	    store_inbox_count(f->d.store, "inbox", INBOX_DEAD);
}

/* A sample of delivery_metrics, e.g. metric(f, "sagad_duplicates_total{subscription=\"inbox\"}");
 * fails if absent. */
static double
metric(struct fx *f, const char *sample)
{
	struct evbuffer *out = evbuffer_new();
	char *text, *p, key[256];
	size_t len;
	double v;

	delivery_metrics(f->dl, out);
	len = evbuffer_get_length(out);
	text = xmalloc(len + 1);
	evbuffer_remove(out, text, len);
	text[len] = '\0';
	evbuffer_free(out);
	snprintf(key, sizeof key, "\n%s ", sample);
	p = strstr(text, key);
	if (!p) {
		free(text);
		fail_msg("no sample %s", sample);
	}
	v = strtod(p + strlen(key), NULL);
	free(text);
	return v;
}

#define M_SUCCESS "sagad_delivered_total{subscription=\"inbox\",outcome=\"success\"}"
#define M_DUPLICATES "sagad_duplicates_total{subscription=\"inbox\"}"
#define M_DEAD "sagad_dead_lettered_total{subscription=\"inbox\"}"
#define M_INFLIGHT "sagad_inbox_inflight{subscription=\"inbox\"}"
#define M_ACK_COUNT "sagad_inbox_ack_seconds_count{subscription=\"inbox\"}"

static void
test_taker_gets_message_without_inbox(void **state)
{
	struct fx *f = *state;
	char derived[40];

	taker_on(f);
	deliver(f, "t1", NULL);
	assert_int_equal(taken.n, 1);	/* at once, in the loop turn of the event */
	assert_string_equal(taken.m[0]->message_id, "t1");
	assert_string_equal(taken.m[0]->routing_key, "order.created");
	assert_int_equal(taken.m[0]->body_len, 2);
	assert_memory_equal(taken.m[0]->body, "{}", 2);
	/* an id-less message is given its derived id first */
	deliver(f, "", NULL);
	assert_int_equal(taken.n, 2);
	delivery_derive_id(taken.m[1], derived);
	assert_string_equal(taken.m[1]->message_id, derived);
	assert_true(strncmp(derived, "sagad-", 6) == 0);
	settle(f);
	/* no inbox record, no HTTP delivery, nothing settled until the taker says */
	assert_int_equal(inbox_total(f), 0);
	assert_int_equal(svc.nreq, 0);
	assert_int_equal(nsettled, 0);
	assert_int_equal(delivery_inflight(f->dl), 2);
	assert_true(metric(f, M_INFLIGHT) == 2);
	delivery_settle(taken.t[0], DELIVERY_ACK);
	delivery_settle(taken.t[1], DELIVERY_ACK);
	assert_int_equal(nsettled, 2);
	assert_int_equal(delivery_inflight(f->dl), 0);
	settle(f);
	assert_int_equal(inbox_total(f), 0);
	assert_int_equal(svc.nreq, 0);
	taken_free();
}

static void
test_taker_settle_verdicts(void **state)
{
	struct fx *f = *state;
	unsigned kicks;

	taker_on(f);
	deliver(f, "ack", NULL);
	deliver(f, "dup", NULL);
	deliver(f, "again", NULL);
	deliver(f, "bad", NULL);
	assert_int_equal(taken.n, 4);
	assert_true(metric(f, M_SUCCESS) == 0);
	kicks = nkicks;

	delivery_settle(taken.t[0], DELIVERY_ACK);
	assert_int_equal(nsettled, 1);
	assert_int_equal(settled[0].what, 'a');
	assert_true(settled[0].tag == 1 && settled[0].epoch == 1 && settled[0].sub == 0);
	assert_true(metric(f, M_SUCCESS) == 1);
	assert_true(metric(f, M_DUPLICATES) == 0);
	assert_true(metric(f, M_ACK_COUNT) == 1);

	delivery_settle(taken.t[1], DELIVERY_DUPLICATE);	/* acked, counted, not a success */
	assert_int_equal(nsettled, 2);
	assert_int_equal(settled[1].what, 'a');
	assert_true(settled[1].tag == 2);
	assert_true(metric(f, M_SUCCESS) == 1);
	assert_true(metric(f, M_DUPLICATES) == 1);
	assert_true(metric(f, M_ACK_COUNT) == 2);

	delivery_settle(taken.t[2], DELIVERY_REQUEUE);	/* given back: nothing counted */
	assert_int_equal(nsettled, 3);
	assert_int_equal(settled[2].what, 'q');
	assert_true(settled[2].tag == 3 && settled[2].epoch == 1);
	assert_true(metric(f, M_SUCCESS) == 1);
	assert_true(metric(f, M_DEAD) == 0);
	assert_true(metric(f, M_ACK_COUNT) == 2);

	delivery_settle(taken.t[3], DELIVERY_REJECT);	/* dead-lettered by the broker */
	assert_int_equal(nsettled, 4);
	assert_int_equal(settled[3].what, 'r');
	assert_true(settled[3].tag == 4 && settled[3].epoch == 1);
	assert_true(metric(f, M_DEAD) == 1);
	assert_true(metric(f, M_DUPLICATES) == 1);
	assert_true(metric(f, M_SUCCESS) == 1);

	/* once each, and the broker thread woken for each */
	assert_int_equal(nacks, 2);
	assert_int_equal(nrequeues, 1);
	assert_int_equal(nrejects, 1);
	assert_int_equal(nkicks - kicks, 4);
	assert_int_equal(delivery_inflight(f->dl), 0);
	settle(f);
	assert_int_equal(nsettled, 4);
	assert_int_equal(inbox_total(f), 0);
	taken_free();
}

static void
test_taker_old_epoch_not_settled(void **state)
{
	struct fx *f = *state;
	struct broker_event ev = { 0 };
	unsigned kicks;

	taker_on(f);
	deliver(f, "o1", NULL);
	deliver(f, "o2", NULL);
	deliver(f, "o3", NULL);
	assert_int_equal(taken.n, 3);
	/* the connection is lost: its tickets are void */
	ev.kind = BROKER_EV_DOWN;
	ev.epoch = 1;
	delivery_broker_event(f->dl, &ev);
	delivery_settle(taken.t[0], DELIVERY_ACK);
	assert_int_equal(nsettled, 0);
	/* reconnected (a new epoch): the broker gives the message again */
	f->epoch = 2;
	broker_up(f);
	kicks = nkicks;
	delivery_settle(taken.t[1], DELIVERY_ACK);
	delivery_settle(taken.t[2], DELIVERY_REJECT);
	assert_int_equal(nsettled, 0);
	assert_int_equal(nkicks, kicks);
	assert_true(metric(f, M_SUCCESS) == 0);
	assert_true(metric(f, M_DEAD) == 0);
	assert_int_equal(delivery_inflight(f->dl), 0);
	/* a delivery the old connection still posted: not taken */
	f->epoch = 1;
	deliver(f, "late", NULL);
	assert_int_equal(taken.n, 3);
	f->epoch = 2;
	/* the copy of the new connection is settled on it */
	deliver(f, "o1", NULL);
	assert_int_equal(taken.n, 4);
	delivery_settle(taken.t[3], DELIVERY_ACK);
	assert_int_equal(nsettled, 1);
	assert_int_equal(settled[0].what, 'a');
	assert_true(settled[0].epoch == 2 && settled[0].tag == 5);
	assert_true(metric(f, M_SUCCESS) == 1);
	taken_free();
}

static void
test_taker_settle_stopped(void **state)
{
	struct fx *f = *state;
	unsigned kicks;

	taker_on(f);
	deliver(f, "s1", NULL);
	deliver(f, "s2", NULL);
	assert_int_equal(taken.n, 2);
	f->d.state = SAGAD_STOPPED;
	kicks = nkicks;
	/* nothing more is taken, and settling touches no broker */
	deliver(f, "s3", NULL);
	assert_int_equal(taken.n, 2);
	delivery_settle(taken.t[0], DELIVERY_ACK);
	delivery_settle(taken.t[1], DELIVERY_REQUEUE);
	assert_int_equal(nsettled, 0);
	assert_int_equal(nkicks, kicks);
	assert_int_equal(delivery_inflight(f->dl), 0);
	assert_true(metric(f, M_SUCCESS) == 0);
	taken_free();
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_committed_before_ack_then_delivered, setup, teardown),
		cmocka_unit_test_setup_teardown(test_duplicate_acked_not_delivered_twice, setup, teardown),
		cmocka_unit_test_setup_teardown(test_5xx_retried_after_backoff, setup, teardown),
		cmocka_unit_test_setup_teardown(test_409_422_are_refusals, setup, teardown),
		cmocka_unit_test_setup_teardown(test_attempts_exhausted_dead_letter, setup, teardown),
		cmocka_unit_test_setup_teardown(test_circuit_opens_after_failures, setup, teardown),
		cmocka_unit_test_setup_teardown(test_taker_gets_message_without_inbox, setup, teardown),
		cmocka_unit_test_setup_teardown(test_taker_settle_verdicts, setup, teardown),
		cmocka_unit_test_setup_teardown(test_taker_old_epoch_not_settled, setup, teardown),
		cmocka_unit_test_setup_teardown(test_taker_settle_stopped, setup, teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
