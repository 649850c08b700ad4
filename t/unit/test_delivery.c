/* Unit tests for src/delivery.c and src/dispatch.c, on the fixture of
 * delivery_fixture.h (a real store, the broker's thread and the service
 * played by the test): commit before ack, delivery, dedup, retries after
 * their backoff, refusals, dead letters once attempts are exhausted, and
 * the circuit. The loop runs until a condition holds, with a bounded wait:
 * nothing sleeps. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

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

#include "delivery_fixture.h"

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
