/*
 * The saga outbox relay's rows handed by the batch (saga_pg_relay_hand):
 * taken only while the relay holds every row of this replica, held aside
 * while a claim is in flight, dropped (for the next claim) otherwise; rows
 * a batch deleted (saga_pg_relay_gone) forgotten once not in flight; the
 * deletes of confirmed rows left to the replies for SAGA_PG_RELAY_LINGER.
 * The relay is made but not started: no PostgreSQL, no broker.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <event2/event.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "msg.h"
#include "saga_pg_relay_int.h"
#include "util.h"
#include "xmalloc.h"

struct fx {
	struct event_base *base;
	struct sagad_conf *conf;
	struct saga_pg_relay *r;
};

static int
setup(void **state)
{
	struct fx *f = xcalloc(1, sizeof *f);

	f->base = event_base_new();
	f->conf = xcalloc(1, sizeof *f->conf);
	f->conf->outbox.max_inflight = 4;	/* max_held 8 */
	f->r = saga_pg_relay_new(f->base, f->conf, "dbname=none", NULL, "orders", "r1", 2);
	*state = f;
	return 0;
}

static int
teardown(void **state)
{
	struct fx *f = *state;

	saga_pg_relay_free(f->r);	/* frees rows and pending: valgrind sees leaks */
	free(f->conf);
	event_base_free(f->base);
	free(f);
	return 0;
}

static struct msg *
row_msg(int64_t seq)
{
	struct msg *m = xcalloc(1, sizeof *m);

	m->seq = seq;
	m->message_id = xasprintf("m%lld", (long long)seq);
	m->exchange = xstrdup("commands");
	m->routing_key = xstrdup("stock.reserve");
	m->body = xstrdup("{}");
	m->body_len = 2;
	return m;
}

/* A row whose saga had earlier rows in the table when the batch wrote it
 * (alone: none). */
static void
hand_as(struct saga_pg_relay *r, int64_t seq, const char *saga, int alone)
{
	saga_pg_relay_hand(r, row_msg(seq), saga ? xstrdup(saga) : NULL, alone);
}

static void
hand(struct saga_pg_relay *r, int64_t seq, const char *saga)
{
	hand_as(r, seq, saga, 0);
}

static void
assert_seqs(const struct saga_pg_relay *r, const int64_t *seqs, size_t n)
{
	size_t i;

	assert_int_equal(r->nrows, n);
	for (i = 0; i < n; i++)
		assert_int_equal(r->rows[i].m->seq, seqs[i]);
}

/* Before a claim has caught up, a handed row may have earlier rows of its
 * saga in the table, unread: it is dropped, and a claim is wanted. */
static void
test_not_caught_up_drops(void **state)
{
	struct saga_pg_relay *r = ((struct fx *)*state)->r;

	hand(r, 5, "s1");
	assert_int_equal(r->nrows, 0);
	assert_int_equal(r->stats.handed, 0);
	assert_true(r->missed);
	assert_true(r->want_claim);
}

static void
test_caught_up_takes_in_seq_order(void **state)
{
	struct saga_pg_relay *r = ((struct fx *)*state)->r;
	const int64_t want[] = { 3, 5, 9 };

	r->caught_up = 1;
	hand(r, 5, "s1");
	hand(r, 9, NULL);
	hand(r, 3, "s2");
	assert_seqs(r, want, 3);
	assert_int_equal(r->stats.handed, 3);
	assert_int_equal(r->rows[0].state, SAGA_PG_RELAY_WAITING);
	assert_string_equal(r->rows[1].saga_id, "s1");
	assert_null(r->rows[2].saga_id);
}

/* During a claim, handed rows wait: the claim may bring earlier rows of
 * their sagas, and may bring them too (dropped as held). */
static void
test_claiming_holds_aside(void **state)
{
	struct saga_pg_relay *r = ((struct fx *)*state)->r;
	const int64_t want[] = { 4, 6, 7 };

	r->caught_up = 1;
	r->claiming = 1;
	hand(r, 7, "s1");
	hand(r, 6, "s1");
	assert_int_equal(r->nrows, 0);
	assert_int_equal(r->npending, 2);
	saga_pg_relay_add(r, row_msg(4), xstrdup("s1"));	/* the claim's rows */
	saga_pg_relay_add(r, row_msg(6), xstrdup("s1"));
	saga_pg_relay_pending_end(r, 1);
	assert_int_equal(r->npending, 0);
	assert_seqs(r, want, 3);
}

/* A row with no earlier row of its saga in the table goes at once, claim
 * or not: nothing the claim brings goes before it. */
static void
test_claiming_alone_goes(void **state)
{
	struct saga_pg_relay *r = ((struct fx *)*state)->r;
	const int64_t want[] = { 8 }, after[] = { 4, 8 };

	r->caught_up = 1;
	r->claiming = 1;
	hand_as(r, 8, "s2", 1);
	hand(r, 9, "s1");
	assert_int_equal(r->npending, 1);
	assert_seqs(r, want, 1);
	assert_int_equal(r->stats.handed, 2);
	saga_pg_relay_add(r, row_msg(4), xstrdup("s1"));	/* the claim's row */
	saga_pg_relay_add(r, row_msg(8), xstrdup("s2"));	/* and the handed one again */
	assert_seqs(r, after, 2);
	saga_pg_relay_pending_end(r, 1);
	assert_int_equal(r->nrows, 3);
	assert_int_equal(r->rows[2].m->seq, 9);
}

/* What a claim's count of unheld rows checks: held, or pending. */
static void
test_holds(void **state)
{
	struct saga_pg_relay *r = ((struct fx *)*state)->r;

	r->caught_up = 1;
	hand(r, 5, "s1");
	r->claiming = 1;
	hand(r, 8, "s1");
	assert_true(saga_pg_relay_holds(r, 5));
	assert_true(saga_pg_relay_holds(r, 8));
	assert_false(saga_pg_relay_holds(r, 6));
	assert_false(saga_pg_relay_holds(r, 9));
	saga_pg_relay_pending_end(r, 0);
	assert_false(saga_pg_relay_holds(r, 8));
}

/* A claim that did not catch up: the rows handed meanwhile are the next
 * claim's to read. */
static void
test_claim_not_caught_up_frees_pending(void **state)
{
	struct saga_pg_relay *r = ((struct fx *)*state)->r;

	r->caught_up = 1;
	r->claiming = 1;
	hand(r, 7, "s1");
	saga_pg_relay_pending_end(r, 0);
	assert_int_equal(r->npending, 0);
	assert_int_equal(r->nrows, 0);
}

/* Memory is bounded: past max_held a handed row is dropped, and the relay
 * is no longer caught up. */
static void
test_full_drops(void **state)
{
	struct saga_pg_relay *r = ((struct fx *)*state)->r;
	int64_t seq;

	r->caught_up = 1;
	for (seq = 1; seq <= (int64_t)r->max_held; seq++)
		hand(r, seq, NULL);
	assert_int_equal(r->nrows, r->max_held);
	hand(r, 100, NULL);
	assert_int_equal(r->nrows, r->max_held);
	assert_false(r->caught_up);
	assert_true(r->missed);
	hand(r, 101, NULL);	/* and stays so until a claim */
	assert_int_equal(r->nrows, r->max_held);
}

/* A batch's COMMIT lost with its connection: rows may be in the table. */
static void
test_lost(void **state)
{
	struct saga_pg_relay *r = ((struct fx *)*state)->r;

	r->caught_up = 1;
	saga_pg_relay_lost(r);
	assert_false(r->caught_up);
	assert_true(r->missed);
	assert_true(r->want_claim);
	hand(r, 1, "s1");
	assert_int_equal(r->nrows, 0);
}

/* A reply's batch deleted rows: those held and not in flight are
 * forgotten; one in flight stays until its confirm (or nack) comes. */
static void
test_gone(void **state)
{
	struct saga_pg_relay *r = ((struct fx *)*state)->r;
	const int64_t gone[] = { 3, 5, 7, 99 }, left[] = { 5, 9 };

	r->caught_up = 1;
	hand(r, 3, "s1");
	hand(r, 5, "s1");
	hand(r, 7, "s2");
	hand(r, 9, "s2");
	r->rows[0].state = SAGA_PG_RELAY_DONE;
	r->rows[1].state = SAGA_PG_RELAY_SENT;
	saga_pg_relay_gone(r, gone, 4);
	assert_seqs(r, left, 2);
	assert_true(r->rows[0].gone);
	assert_false(r->rows[1].gone);
	assert_int_equal(r->stats.gone, 2);
	r->rows[0].state = SAGA_PG_RELAY_DONE;	/* its confirm */
	saga_pg_relay_compact(r);
	assert_seqs(r, left + 1, 1);
	assert_int_equal(r->stats.gone, 3);
}

/* Confirmed rows are deleted once one has waited SAGA_PG_RELAY_LINGER (all
 * of them then), when they are more than a quarter of max_held, or at the
 * close. */
static void
test_linger(void **state)
{
	struct saga_pg_relay *r = ((struct fx *)*state)->r;
	double now = util_mono();

	r->caught_up = 1;
	hand(r, 1, "s1");
	hand(r, 2, "s2");
	hand(r, 3, "s3");
	r->rows[0].state = r->rows[1].state = SAGA_PG_RELAY_DONE;
	r->rows[0].done_at = r->rows[1].done_at = now;
	assert_int_equal(saga_pg_relay_mark_deletes(r), 0);
	assert_false(r->rows[0].deleting);
	r->rows[0].done_at = now - SAGA_PG_RELAY_LINGER - 0.1;
	assert_int_equal(saga_pg_relay_mark_deletes(r), 2);
	assert_true(r->rows[0].deleting && r->rows[1].deleting);
	assert_false(r->rows[2].deleting);
	r->rows[0].done_at = now;
	r->rows[2].state = SAGA_PG_RELAY_DONE;
	r->rows[2].done_at = now;
	assert_int_equal(saga_pg_relay_mark_deletes(r), 3);	/* > max_held 8 / 4 */
	r->rows[1].state = r->rows[2].state = SAGA_PG_RELAY_WAITING;
	assert_int_equal(saga_pg_relay_mark_deletes(r), 0);
	r->closing = 1;
	assert_int_equal(saga_pg_relay_mark_deletes(r), 1);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_not_caught_up_drops, setup, teardown),
		cmocka_unit_test_setup_teardown(test_caught_up_takes_in_seq_order, setup, teardown),
		cmocka_unit_test_setup_teardown(test_claiming_alone_goes, setup, teardown),
		cmocka_unit_test_setup_teardown(test_holds, setup, teardown),
		cmocka_unit_test_setup_teardown(test_claiming_holds_aside, setup, teardown),
		cmocka_unit_test_setup_teardown(test_claim_not_caught_up_frees_pending, setup,
		    teardown),
		cmocka_unit_test_setup_teardown(test_full_drops, setup, teardown),
		cmocka_unit_test_setup_teardown(test_lost, setup, teardown),
		cmocka_unit_test_setup_teardown(test_gone, setup, teardown),
		cmocka_unit_test_setup_teardown(test_linger, setup, teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
