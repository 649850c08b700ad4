/* Unit tests for src/relay.c: the outbox -> broker relay on a real store,
 * with the broker's thread replaced (ld --wrap) by a recorder of what the
 * relay hands it, and its events played by the test: acceptance order, the
 * confirm window, deletes on ack, retries of nacked and returned messages
 * without holding back the others, a restart from the oldest unconfirmed
 * message after a reconnect, and news of a dead connection ignored. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "broker.h"
#include "conf.h"
#include "props.h"
#include "relay.h"
#include "store.h"

#define CONF \
	"service = \"orders\";\n" \
	"broker = { url = \"amqp://guest:guest@127.0.0.1:5672/%2f\"; };\n" \
	"outbox = { max_inflight = 4; retry_initial = 0.05; retry_max = 0.05; };\n"

/* ---- the broker, as the relay sees it ---- */

static int64_t published[256];
static uint64_t published_epoch[256];
static size_t npublished;

void __wrap_broker_publish(struct broker *b, uint64_t epoch, struct msg *m);
void __wrap_broker_kick(struct broker *b);

void
__wrap_broker_publish(struct broker *b, uint64_t epoch, struct msg *m)
{
	(void)b;
	assert_true(npublished < 256);
	published_epoch[npublished] = epoch;
	published[npublished++] = m->seq;
	msg_free(m);
}

void
__wrap_broker_kick(struct broker *b)
{
	(void)b;
}

struct fx {
	char dir[64], path[128];
	struct event_base *base;
	struct sagad_conf *conf;
	struct store *st;
	struct relay *r;
};

static int
setup(void **state)
{
	struct fx *f = calloc(1, sizeof *f);
	struct conf_errors errs = { 0 };
	struct store_hooks hooks = { relay_committed, relay_rolled_back, NULL };
	char *err = NULL;

	snprintf(f->dir, sizeof f->dir, "/tmp/sagad-test-relay-XXXXXX");
	assert_non_null(mkdtemp(f->dir));
	snprintf(f->path, sizeof f->path, "%s/store.db", f->dir);
	f->base = event_base_new();
	event_base_priority_init(f->base, 3);
	f->conf = conf_load_string(CONF, "test.conf", ".", &errs);
	if (!f->conf)
		fail_msg("configuration: %s", errs.n ? errs.msg[0] : "?");
	f->st = store_open(f->path, f->base, INT64_C(1) << 30, &err);
	assert_non_null(f->st);
	f->r = relay_new(f->base, f->st, f->conf);
	relay_set_broker(f->r, (struct broker *)f);	/* never looked into */
	hooks.arg = f->r;
	store_set_hooks(f->st, &hooks);
	npublished = 0;
	*state = f;
	return 0;
}

static int
teardown(void **state)
{
	struct fx *f = *state;
	char p[160];

	relay_free(f->r);
	store_close(f->st);
	conf_free(f->conf);
	event_base_free(f->base);
	snprintf(p, sizeof p, "rm -rf '%s'", f->dir);
	assert_int_equal(system(p), 0);
	free(f);
	return 0;
}

/* ---- helpers ---- */

static void
turn(struct fx *f)
{
	int i;

	for (i = 0; i < 4; i++)
		event_base_loop(f->base, EVLOOP_NONBLOCK);
	assert_int_equal(store_flush(f->st), 0);
	for (i = 0; i < 4; i++)
		event_base_loop(f->base, EVLOOP_NONBLOCK);
}

static void
put(struct fx *f, int n)
{
	int i;

	for (i = 0; i < n; i++) {
		struct msg m = { 0 };
		char id[32];
		snprintf(id, sizeof id, "m%d", i);
		m.message_id = id;
		m.exchange = "";
		m.routing_key = "q";
		m.body = "x";
		m.body_len = 1;
		assert_int_equal(store_outbox_put(f->st, &m, 1.0, 0), STORE_PUT_STORED);
	}
	turn(f);
}

static void
event(struct fx *f, enum broker_event_kind kind, uint64_t epoch, int64_t seq)
{
	struct broker_event ev = { 0 };

	ev.kind = kind;
	ev.epoch = epoch;
	ev.seq = seq;
	snprintf(ev.reason, sizeof ev.reason, "test");
	relay_broker_event(f->r, &ev);
	turn(f);
}

/* The seqs published since index from, as "1 2 3". */
static const char *
since(size_t from)
{
	static char s[1024];
	size_t i;

	s[0] = 0;
	for (i = from; i < npublished; i++)
		snprintf(s + strlen(s), sizeof s - strlen(s), "%s%lld", s[0] ? " " : "",
		    (long long)published[i]);
	return s;
}

static void
wait_retries(struct fx *f)
{
	struct timeval tv = { 0, 120000 };

	event_base_loopexit(f->base, &tv);
	event_base_dispatch(f->base);
	turn(f);
}

/* ---- tests ---- */

static void
test_order_and_window(void **state)
{
	struct fx *f = *state;

	put(f, 10);
	assert_string_equal(since(0), "");		/* no connection yet */
	assert_int_equal(relay_link(f->r), RELAY_LINK_DOWN);
	event(f, BROKER_EV_UP, 1, 0);
	assert_string_equal(since(0), "1 2 3 4");	/* max_inflight */
	assert_int_equal(relay_inflight(f->r), 4);
	event(f, BROKER_EV_ACK, 1, 1);
	event(f, BROKER_EV_ACK, 1, 2);
	assert_string_equal(since(4), "5 6");
	assert_int_equal(store_outbox_count(f->st), 8);	/* acked ones deleted */
	assert_int_equal(relay_stats(f->r)->published, 2);
	assert_true(published_epoch[5] == 1);
}

static void
test_nack_is_retried_without_holding_back(void **state)
{
	struct fx *f = *state;

	put(f, 6);
	event(f, BROKER_EV_UP, 1, 0);
	event(f, BROKER_EV_NACK, 1, 2);
	event(f, BROKER_EV_RETURNED, 1, 3);
	assert_string_equal(since(0), "1 2 3 4 5 6");	/* 5, 6 did not wait */
	assert_int_equal(relay_stats(f->r)->nacked, 1);
	assert_int_equal(relay_stats(f->r)->unroutable, 1);
	assert_int_equal(store_outbox_attempts(f->st, 2), 1);
	wait_retries(f);
	assert_string_equal(since(6), "");		/* the window (4) is full */
	event(f, BROKER_EV_ACK, 1, 1);
	event(f, BROKER_EV_ACK, 1, 4);
	assert_string_equal(since(6), "2 3");		/* after their backoff */
	event(f, BROKER_EV_ACK, 1, 2);
	event(f, BROKER_EV_ACK, 1, 3);
	assert_int_equal(store_outbox_count(f->st), 2);
}

static void
test_reconnect_starts_from_the_oldest(void **state)
{
	struct fx *f = *state;

	put(f, 5);
	event(f, BROKER_EV_UP, 1, 0);
	event(f, BROKER_EV_ACK, 1, 1);
	assert_string_equal(since(0), "1 2 3 4 5");
	event(f, BROKER_EV_DOWN, 1, 0);
	assert_int_equal(relay_link(f->r), RELAY_LINK_DOWN);
	assert_int_equal(relay_inflight(f->r), 0);
	/* a confirm of the dead connection changes nothing */
	event(f, BROKER_EV_ACK, 1, 2);
	assert_int_equal(store_outbox_count(f->st), 4);
	event(f, BROKER_EV_UP, 2, 0);
	assert_string_equal(since(5), "2 3 4 5");	/* every unconfirmed one, in order */
	assert_true(published_epoch[5] == 2);
	assert_int_equal(relay_stats(f->r)->reconnects, 1);
}

static void
test_blocked_stops_publishing(void **state)
{
	struct fx *f = *state;

	event(f, BROKER_EV_UP, 1, 0);
	event(f, BROKER_EV_BLOCKED, 1, 0);
	put(f, 2);
	assert_string_equal(since(0), "");
	assert_int_equal(relay_link(f->r), RELAY_LINK_BLOCKED);
	event(f, BROKER_EV_UNBLOCKED, 1, 0);
	assert_string_equal(since(0), "1 2");
}

static void
test_paused_takes_nothing_new(void **state)
{
	struct fx *f = *state;

	event(f, BROKER_EV_UP, 1, 0);
	put(f, 1);
	relay_pause(f->r);
	put(f, 1);
	event(f, BROKER_EV_ACK, 1, 1);
	assert_string_equal(since(0), "1");
	assert_int_equal(store_outbox_count(f->st), 1);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_order_and_window, setup, teardown),
		cmocka_unit_test_setup_teardown(test_nack_is_retried_without_holding_back, setup, teardown),
		cmocka_unit_test_setup_teardown(test_reconnect_starts_from_the_oldest, setup, teardown),
		cmocka_unit_test_setup_teardown(test_blocked_stops_publishing, setup, teardown),
		cmocka_unit_test_setup_teardown(test_paused_takes_nothing_new, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
