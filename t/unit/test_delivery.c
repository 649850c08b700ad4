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

void __wrap_broker_ack(struct broker *b, uint64_t epoch, int sub, uint64_t tag);
void __wrap_broker_requeue(struct broker *b, uint64_t epoch, int sub, uint64_t tag);
void __wrap_broker_reject(struct broker *b, uint64_t epoch, int sub, uint64_t tag);
void __wrap_broker_consume(struct broker *b, int sub, int on);
void __wrap_broker_kick(struct broker *b);

void
__wrap_broker_ack(struct broker *b, uint64_t epoch, int sub, uint64_t tag)
{
	(void)b;
	(void)epoch;
	(void)sub;
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
	(void)b; (void)epoch; (void)sub; (void)tag;
	nrequeues++;
}

void
__wrap_broker_reject(struct broker *b, uint64_t epoch, int sub, uint64_t tag)
{
	(void)b; (void)epoch; (void)sub; (void)tag;
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
	acked_uncommitted = 0;
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
	ev.epoch = 1;
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
	ev.epoch = 1;
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
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
