/* Unit tests for src/acks.c: as few basic.ack frames as possible, and
 * never one that RabbitMQ would refuse (a tag that is not outstanding). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "acks.h"

/* A channel as RabbitMQ keeps it: which delivery tags are outstanding. */
#define MAXTAG 200000
struct channel {
	unsigned char outstanding[MAXTAG + 1];
	int frames, multiples, refused;
};

static int
channel_ack(void *arg, uint64_t tag, int multiple)
{
	struct channel *c = arg;
	uint64_t t;

	/* rabbit_channel:collect_acks: the named tag must be outstanding. */
	if (tag == 0 || tag > MAXTAG || !c->outstanding[tag]) {
		c->refused++;
		return -1;
	}
	c->frames++;
	if (multiple) {
		c->multiples++;
		for (t = 1; t <= tag; t++)
			c->outstanding[t] = 0;
	} else
		c->outstanding[tag] = 0;
	return 0;
}

static struct channel *
channel_new(uint64_t ntags)
{
	struct channel *c = calloc(1, sizeof *c);
	uint64_t t;

	for (t = 1; t <= ntags; t++)
		c->outstanding[t] = 1;
	return c;
}

static int
channel_clear(const struct channel *c)
{
	uint64_t t;

	for (t = 1; t <= MAXTAG; t++)
		if (c->outstanding[t])
			return 0;
	return 1;
}

static void
test_in_order_batch_is_one_frame(void **state)
{
	struct channel *c = channel_new(100);
	struct acks a;
	uint64_t t;

	(void)state;
	memset(&a, 0, sizeof a);
	for (t = 100; t >= 1; t--)	/* any order within a batch */
		acks_add(&a, t);
	assert_int_equal(acks_flush(&a, channel_ack, c), 1);
	assert_int_equal(c->multiples, 1);
	assert_true(channel_clear(c));
	assert_int_equal(a.upto, 100);
	assert_int_equal(acks_flush(&a, channel_ack, c), 0);
	acks_free(&a);
	free(c);
}

static void
test_gap_then_filled(void **state)
{
	struct channel *c = channel_new(10);
	struct acks a;

	(void)state;
	memset(&a, 0, sizeof a);
	/* Tag 1 still waits for its commit: 2..4 go one by one. */
	acks_add(&a, 2);
	acks_add(&a, 3);
	acks_add(&a, 4);
	assert_int_equal(acks_flush(&a, channel_ack, c), 3);
	assert_int_equal(c->multiples, 0);
	assert_int_equal(a.upto, 0);
	/* Tag 1 settles: one frame naming 1 (2..4 are gone at the broker). */
	acks_add(&a, 1);
	assert_int_equal(acks_flush(&a, channel_ack, c), 1);
	assert_int_equal(a.upto, 4);
	assert_int_equal(a.nahead, 0);
	/* The run goes on from 5. */
	acks_add(&a, 5);
	acks_add(&a, 6);
	acks_add(&a, 7);
	assert_int_equal(acks_flush(&a, channel_ack, c), 1);
	assert_int_equal(c->refused, 0);
	assert_int_equal(a.upto, 7);
	acks_free(&a);
	free(c);
}

static void
test_rejected_tags_are_passed(void **state)
{
	struct channel *c = channel_new(10);
	struct acks a;

	(void)state;
	memset(&a, 0, sizeof a);
	/* Tag 3 was given back (basic.reject requeue): the run passes it. */
	c->outstanding[3] = 0;
	acks_settled(&a, 3);
	acks_add(&a, 1);
	acks_add(&a, 2);
	acks_add(&a, 4);
	acks_add(&a, 5);
	assert_int_equal(acks_flush(&a, channel_ack, c), 1);
	assert_int_equal(a.upto, 5);
	/* The last tag of a run rejected: the frame names the last acked. */
	c->outstanding[8] = 0;
	acks_settled(&a, 8);
	acks_add(&a, 6);
	acks_add(&a, 7);
	assert_int_equal(acks_flush(&a, channel_ack, c), 1);
	assert_int_equal(a.upto, 8);
	assert_int_equal(c->refused, 0);
	assert_false(c->outstanding[6] || c->outstanding[7]);
	acks_free(&a);
	free(c);
}

static void
test_reset_starts_again(void **state)
{
	struct channel *c = channel_new(5);
	struct acks a;

	(void)state;
	memset(&a, 0, sizeof a);
	acks_add(&a, 3);
	assert_int_equal(acks_flush(&a, channel_ack, c), 1);
	acks_reset(&a);		/* a new connection: tags from 1 again */
	free(c);
	c = channel_new(5);
	acks_add(&a, 1);
	acks_add(&a, 2);
	acks_add(&a, 3);
	assert_int_equal(acks_flush(&a, channel_ack, c), 1);
	assert_int_equal(c->multiples, 1);
	assert_int_equal(c->refused, 0);
	acks_free(&a);
	free(c);
}

/* Random batches, gaps and rejects: every tag settled exactly once at the
 * broker, no refused frame, far fewer frames than tags. */
static void
test_random_batches(void **state)
{
	enum { N = 20000 };
	struct channel *c = channel_new(N);
	uint64_t *order = malloc(N * sizeof *order);
	struct acks a;
	size_t i, k;
	int frames = 0, rc;

	(void)state;
	memset(&a, 0, sizeof a);
	srand(7);
	/* Mostly in order, with local shuffles (commits finishing out of
	 * order) and a few tags held back a long way. */
	for (i = 0; i < N; i++)
		order[i] = i + 1;
	for (i = 0; i + 1 < N; i++)
		if (rand() % 4 == 0) {
			size_t j = i + 1 + (size_t)rand() % (rand() % 200 == 0 ? 300 : 5);
			uint64_t t;
			if (j >= N)
				j = N - 1;
			t = order[i]; order[i] = order[j]; order[j] = t;
		}
	for (i = 0; i < N; i += k) {
		size_t end;
		k = 1 + (size_t)rand() % 64;
		end = i + k < N ? i + k : N;
		for (size_t j = i; j < end; j++) {
			if (rand() % 50 == 0) {	/* given back */
				assert_int_equal(c->outstanding[order[j]], 1);
				c->outstanding[order[j]] = 0;
				acks_settled(&a, order[j]);
			} else
				acks_add(&a, order[j]);
		}
		rc = acks_flush(&a, channel_ack, c);
		assert_true(rc >= 0);
		frames += rc;
	}
	assert_int_equal(c->refused, 0);
	assert_true(channel_clear(c));
	assert_int_equal(a.upto, N);
	assert_int_equal(a.nahead, 0);
	print_message("%d tags, %d frames\n", N, frames);
	assert_true(frames < N / 4);
	acks_free(&a);
	free(order);
	free(c);
}

/* One tag never settles: the memory of tags beyond it is bounded, and acks
 * stay correct one by one. */
static void
test_stuck_tag_falls_back(void **state)
{
	enum { N = 70000 };
	struct channel *c = channel_new(N + 10);
	struct acks a;
	uint64_t t;

	(void)state;
	memset(&a, 0, sizeof a);
	for (t = 2; t <= N; t++) {
		acks_add(&a, t);
		if (t % 1000 == 0)
			assert_true(acks_flush(&a, channel_ack, c) >= 0);
	}
	assert_true(acks_flush(&a, channel_ack, c) >= 0);
	assert_true(a.nahead <= 65536);
	assert_int_equal(a.individual, 1);
	acks_add(&a, N + 1);
	acks_add(&a, 1);
	assert_int_equal(acks_flush(&a, channel_ack, c), 2);
	assert_int_equal(c->refused, 0);
	for (t = 1; t <= N + 1; t++)
		assert_int_equal(c->outstanding[t], 0);
	acks_free(&a);
	free(c);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_in_order_batch_is_one_frame),
		cmocka_unit_test(test_gap_then_filled),
		cmocka_unit_test(test_rejected_tags_are_passed),
		cmocka_unit_test(test_reset_starts_again),
		cmocka_unit_test(test_random_batches),
		cmocka_unit_test(test_stuck_tag_falls_back),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
