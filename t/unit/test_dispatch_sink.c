/* Unit tests for src/dispatch_sink.c: a subscription with deliver = "amqp"
 * hands its records to sinks (the front door's consumers, played here by
 * a recording sink) on the fixture of delivery_fixture.h: consumed from
 * the broker only while a sink is attached, within the sinks' room, in
 * turn, and each verdict recorded as for HTTP (delivered, retried then
 * dead-lettered, rejected, returned and redelivered); a detached sink is
 * released once it holds nothing; exclusive consumers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#define CONF \
	"service = \"orders\";\n" \
	"broker = { url = \"amqp://guest:guest@127.0.0.1:5672/%%2f\"; };\n" \
	"amqp = { listen = \"127.0.0.1:1\"; };\n" \
	"exchanges = ( { name = \"events\"; type = \"topic\"; } );\n" \
	"subscriptions = ( { name = \"inbox\"; queue = \"fd.in\"; queue_type = \"classic\";\n" \
	"  bind = [ \"events:#\" ]; deliver = \"amqp\"; max_attempts = 2;\n" \
	"  retry_initial = 0.05; retry_max = 0.05; } );\n" \
	"# service port %d unused\n"

#include "delivery_fixture.h"

/* A consumer as the dispatch sees it: room from its prefetch, every
 * record handed over recorded. */
struct fsink {
	struct delivery_sink s;
	unsigned prefetch;
	unsigned ngot;
	struct dattempt *got[16];
	char ids[16][32];
	int redelivered[16];
	int released;
};

static unsigned
fsink_room(struct delivery_sink *s)
{
	struct fsink *k = (struct fsink *)s;

	return k->prefetch > s->held ? k->prefetch - s->held : 0;
}

static int
fsink_deliver(struct delivery_sink *s, struct dattempt *t, const struct msg *m, int redelivered)
{
	struct fsink *k = (struct fsink *)s;

	assert_true(k->ngot < 16);
	k->got[k->ngot] = t;
	snprintf(k->ids[k->ngot], sizeof k->ids[k->ngot], "%s", m->message_id);
	k->redelivered[k->ngot] = redelivered;
	k->ngot++;
	return 0;
}

static void
fsink_release(struct delivery_sink *s)
{
	((struct fsink *)s)->released = 1;
}

static const struct delivery_sink_ops fsink_ops = { fsink_room, fsink_deliver, fsink_release };

static void
fsink_init(struct fsink *k, unsigned prefetch, int exclusive)
{
	memset(k, 0, sizeof *k);
	k->s.ops = &fsink_ops;
	k->s.exclusive = exclusive;
	k->prefetch = prefetch;
}

static struct fsink *wait_sink;

static int
got_reach(struct fx *f, unsigned n)
{
	(void)f;
	return wait_sink->ngot >= n;
}

static void
run_until_got(struct fx *f, struct fsink *k, unsigned n)
{
	wait_sink = k;
	run_until(f, got_reach, n);
}

/* A consumer of prefetch 1 attached, one message consumed and handed to it. */
static void
one_handed(struct fx *f, struct fsink *k)
{
	fsink_init(k, 1, 0);
	broker_up(f);
	assert_int_equal(delivery_attach(f->dl, 0, &k->s), 0);
	deliver(f, "m1", NULL);
	run_until_got(f, k, 1);
}

static void
test_consumed_only_while_attached(void **state)
{
	struct fx *f = *state;
	struct fsink k;

	assert_int_equal(delivery_frontdoor_sub(f->dl, "fd.in"), 0);
	assert_int_equal(delivery_frontdoor_sub(f->dl, "other"), -1);
	broker_up(f);
	settle(f);
	assert_int_equal(nconsume_on, 0);
	fsink_init(&k, 4, 0);
	assert_int_equal(delivery_attach(f->dl, 0, &k.s), 0);
	assert_int_equal(nconsume_on, 1);
	delivery_detach(f->dl, &k.s);
	assert_true(nconsume_off >= 1);
	assert_true(k.released);	/* held nothing */
}

static void
test_prefetch_then_ack(void **state)
{
	struct fx *f = *state;
	struct fsink k;

	fsink_init(&k, 2, 0);
	broker_up(f);
	assert_int_equal(delivery_attach(f->dl, 0, &k.s), 0);
	deliver(f, "m1", NULL);
	deliver(f, "m2", NULL);
	deliver(f, "m3", NULL);
	run_until_got(f, &k, 2);
	settle(f);
	assert_int_equal(k.ngot, 2);	/* the third waits for room */
	assert_string_equal(k.ids[0], "m1");
	assert_false(k.redelivered[0]);
	delivery_take_settle(k.got[0], TAKE_ACK, NULL);
	run_until_got(f, &k, 3);
	assert_string_equal(k.ids[2], "m3");
	delivery_take_settle(k.got[1], TAKE_ACK, NULL);
	delivery_take_settle(k.got[2], TAKE_ACK, NULL);
	run_until(f, done_reach, 3);
	delivery_detach(f->dl, &k.s);
	assert_true(k.released);
}

static void
test_requeue_then_dead_letter(void **state)
{
	struct fx *f = *state;
	struct fsink k;

	one_handed(f, &k);
	delivery_take_settle(k.got[0], TAKE_REQUEUE, "nacked by the consumer (requeue)");
	run_until_got(f, &k, 2);	/* after the backoff */
	assert_string_equal(k.ids[1], "m1");
	assert_true(k.redelivered[1]);
	delivery_take_settle(k.got[1], TAKE_REQUEUE, "nacked by the consumer (requeue)");
	run_until(f, dead_reach, 1);	/* max_attempts = 2 */
	assert_dead_reason(f, "attempts-exhausted");
	delivery_detach(f->dl, &k.s);
}

static void
test_reject_dead_letter(void **state)
{
	struct fx *f = *state;
	struct fsink k;

	one_handed(f, &k);
	delivery_take_settle(k.got[0], TAKE_REJECT, "rejected by the consumer");
	run_until(f, dead_reach, 1);
	assert_dead_reason(f, "rejected");
	delivery_detach(f->dl, &k.s);
}

/* Two consumers take turns; one gives its record back (its channel went):
 * the other gets it, redelivered, once it has room; the one detached
 * while holding is released only after its record is settled. */
static void
test_returned_to_the_other(void **state)
{
	struct fx *f = *state;
	struct fsink a, b;

	fsink_init(&a, 1, 0);
	fsink_init(&b, 1, 0);
	broker_up(f);
	assert_int_equal(delivery_attach(f->dl, 0, &a.s), 0);
	assert_int_equal(delivery_attach(f->dl, 0, &b.s), 0);
	deliver(f, "m1", NULL);
	deliver(f, "m2", NULL);
	run_until_got(f, &a, 1);
	run_until_got(f, &b, 1);
	delivery_detach(f->dl, &a.s);
	assert_false(a.released);	/* still holds one */
	delivery_take_settle(a.got[0], TAKE_RETURNED, NULL);
	assert_true(a.released);
	settle(f);
	assert_int_equal(b.ngot, 1);	/* b is full */
	delivery_take_settle(b.got[0], TAKE_ACK, NULL);
	run_until_got(f, &b, 2);
	assert_string_equal(b.ids[1], a.ids[0]);
	assert_true(b.redelivered[1]);
	delivery_take_settle(b.got[1], TAKE_ACK, NULL);
	run_until(f, done_reach, 2);
	delivery_detach(f->dl, &b.s);
}

static void
test_exclusive(void **state)
{
	struct fx *f = *state;
	struct fsink a, b, c;

	fsink_init(&a, 1, 1);
	fsink_init(&b, 1, 0);
	fsink_init(&c, 1, 1);
	assert_int_equal(delivery_attach(f->dl, 0, &a.s), 0);
	assert_int_equal(delivery_attach(f->dl, 0, &b.s), -1);
	delivery_detach(f->dl, &a.s);
	assert_int_equal(delivery_attach(f->dl, 0, &b.s), 0);
	assert_int_equal(delivery_attach(f->dl, 0, &c.s), -1);
	delivery_detach(f->dl, &b.s);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_consumed_only_while_attached, setup, teardown),
		cmocka_unit_test_setup_teardown(test_prefetch_then_ack, setup, teardown),
		cmocka_unit_test_setup_teardown(test_requeue_then_dead_letter, setup, teardown),
		cmocka_unit_test_setup_teardown(test_reject_dead_letter, setup, teardown),
		cmocka_unit_test_setup_teardown(test_returned_to_the_other, setup, teardown),
		cmocka_unit_test_setup_teardown(test_exclusive, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
