/* Unit tests for src/broker.c without a broker: the hand-over between the
 * main thread and the broker thread. Its point is the ThreadSanitizer build
 * (t/run.sh): every wish, command and the stop cross threads under the
 * broker's lock, read by the one wake-up path (broker_turn). Before that
 * path, the thread read subs_changed without the lock and TSan failed this
 * test with a data race. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <event2/event.h>
#include <event2/thread.h>
#include <stdlib.h>
#include <string.h>

#include "broker.h"
#include "conf.h"

/* Port 1 on loopback refuses at once: the link stays down and retries. */
#define CONF "service = \"orders\";\n" \
	"broker = { url = \"amqp://guest:guest@127.0.0.1:1/\"; connect_timeout = 0.5;\n" \
	"  reconnect_initial = 0.01; reconnect_max = 0.05; };\n" \
	"exchanges = ({ name = \"events\"; });\n" \
	"subscriptions = (\n" \
	"  { name = \"a\"; bind = [\"events:a.#\"]; deliver = \"http://127.0.0.1:8080/a\"; },\n" \
	"  { name = \"b\"; bind = [\"events:b.#\"]; deliver = \"http://127.0.0.1:8080/b\"; });\n"

struct seen {
	struct event_base *base;
	int downs;
};

static void
on_event(void *arg, const struct broker_event *ev)
{
	struct seen *s = arg;

	assert_int_equal(ev->kind, BROKER_EV_DOWN);
	assert_non_null(strstr(ev->reason, "127.0.0.1:1"));
	s->downs++;
	event_base_loopbreak(s->base);
}

/* Wait a little, by varying amounts: the next wish then lands at a varying
 * point of the turn that the kick started. */
static void
spin(int n)
{
	volatile int k;

	for (k = 0; k < n * 50; k++)
		;
}

static struct sagad_conf *
load(void)
{
	struct conf_errors e = { NULL, 0 };
	struct sagad_conf *c = conf_load_string(CONF, "broker.conf", ".", &e);

	assert_non_null(c);
	assert_int_equal(e.n, 0);
	return c;
}

/* The main thread changes its consume wishes and queues settlements while
 * the broker thread turns (it fails to connect, retries, wakes on every
 * kick); then it stops the thread. Nothing blocks, nothing races, and the
 * failed connects reach the main thread as DOWN events. */
static void
test_wishes_and_commands_cross_threads(void **state)
{
	struct sagad_conf *c = load();
	struct seen s = { event_base_new(), 0 };
	struct broker *b;
	int i;

	(void)state;
	b = broker_new(s.base, c, BROKER_ROLE_CONSUME, on_event, &s);
	assert_int_equal(broker_start(b), 0);
	/* Many tries: a race shows only when the two sides meet in time. */
	for (i = 0; i < 20000; i++) {
		broker_consume(b, i % 2, (i / 2) % 2);
		if (i % 3 == 0)
			broker_requeue(b, 1, i % 2, (uint64_t)i);
		broker_kick(b);
		spin(i % 61);
	}
	while (s.downs < 2)
		event_base_dispatch(s.base);
	for (i = 0; i < 100; i++) {
		broker_consume(b, 0, i % 2);
		broker_kick(b);
	}
	broker_free(b);
	event_base_free(s.base);
	conf_free(c);
}

/* A stop asked before the thread ever ran is seen by its first turn. */
static void
test_stop_at_once(void **state)
{
	struct sagad_conf *c = load();
	struct seen s = { event_base_new(), 0 };
	struct broker *b;

	(void)state;
	b = broker_new(s.base, c, BROKER_ROLE_PUBLISH, on_event, &s);
	assert_int_equal(broker_start(b), 0);
	broker_free(b);
	event_base_free(s.base);
	conf_free(c);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_wishes_and_commands_cross_threads),
		cmocka_unit_test(test_stop_at_once),
	};

	evthread_use_pthreads();
	return cmocka_run_group_tests(tests, NULL, NULL);
}
