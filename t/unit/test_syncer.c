/* Unit tests for src/syncer.c: fsyncs off the event loop, answered on it
 * in generation order; a failed fsync is reported, never hidden. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <event2/event.h>
#include <event2/thread.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "syncer.h"

/* Guards seen.gen, which a job reads on the syncer's thread. */
static pthread_mutex_t seen_lock = PTHREAD_MUTEX_INITIALIZER;

struct seen {
	struct event_base *base;
	uint64_t gen;
	int err, calls;
	uint64_t want;
};

static void
on_done(void *arg, uint64_t gen, int err)
{
	struct seen *s = arg;

	assert_true(gen >= s->gen);	/* never backwards */
	pthread_mutex_lock(&seen_lock);	/* jobs read it on the syncer thread */
	s->gen = gen;
	pthread_mutex_unlock(&seen_lock);
	s->err = err;
	s->calls++;
	if (err || gen >= s->want)
		event_base_loopbreak(s->base);
}

static int
temp_file(char *path, size_t n)
{
	int fd;

	snprintf(path, n, "/tmp/sagad-test-syncer-XXXXXX");
	fd = mkstemp(path);
	assert_true(fd >= 0);
	return fd;
}

/* A loop with the daemon's three priorities and a syncer on fd. */
static struct syncer *
setup(struct seen *s, int fd)
{
	memset(s, 0, sizeof *s);
	s->base = event_base_new();
	event_base_priority_init(s->base, 3);
	return syncer_new(s->base, fd, on_done, s);
}

static void
run_until(struct seen *s)
{
	struct timeval limit = { 10, 0 };

	event_base_loopexit(s->base, &limit);
	event_base_dispatch(s->base);
}

static void
test_requests_are_served_in_order(void **state)
{
	struct seen s;
	char path[64];
	int fd = temp_file(path, sizeof path), i;
	struct syncer *sy;
	uint64_t g = 0;

	(void)state;
	sy = setup(&s, fd);
	assert_non_null(sy);
	for (i = 0; i < 50; i++) {
		assert_int_equal(write(fd, "0123456789", 10), 10);
		g = syncer_request(sy);
		assert_int_equal(g, (uint64_t)i + 1);
	}
	s.want = g;
	run_until(&s);
	assert_int_equal(s.gen, g);
	assert_int_equal(s.err, 0);
	/* Requests made while a sync ran were served together. */
	assert_true(s.calls >= 1 && s.calls <= 50);
	syncer_free(sy);
	event_base_free(s.base);
	close(fd);
	unlink(path);
}

static void
test_wait_serves_everything(void **state)
{
	struct seen s;
	char path[64];
	int fd = temp_file(path, sizeof path);
	struct syncer *sy;
	uint64_t gen = 0;

	(void)state;
	sy = setup(&s, fd);
	syncer_request(sy);
	syncer_request(sy);
	assert_int_equal(syncer_wait(sy, &gen), 0);
	assert_int_equal(gen, 2);
	/* Nothing new for the loop: the waiter settled them. */
	s.want = 3;
	{
		struct timeval t = { 0, 200000 };
		event_base_loopexit(s.base, &t);
		event_base_dispatch(s.base);
	}
	assert_int_equal(s.calls, 0);
	syncer_free(sy);
	event_base_free(s.base);
	close(fd);
	unlink(path);
}

static void
test_failed_sync_is_reported(void **state)
{
	struct seen s;
	struct syncer *sy;
	uint64_t gen = 0;

	(void)state;
	sy = setup(&s, -1);	/* a descriptor that cannot be synced */
	s.want = 1;
	syncer_request(sy);
	run_until(&s);
	assert_int_equal(s.err, EBADF);
	/* Sticky: a waiter sees it too. */
	syncer_request(sy);
	assert_int_equal(syncer_wait(sy, &gen), EBADF);
	syncer_free(sy);
	event_base_free(s.base);
}

/* A job records the thread it ran on and how much the loop knew then. */
struct job_seen {
	struct seen *s;
	uint64_t gen;		/* the generation the job belongs to */
	pthread_t thread;
	int ran;
	uint64_t loop_gen;	/* what the loop had heard when the job ran */
};

static void
job(void *arg)
{
	struct job_seen *j = arg;

	j->thread = pthread_self();
	pthread_mutex_lock(&seen_lock);
	j->loop_gen = j->s->gen;
	pthread_mutex_unlock(&seen_lock);
	j->ran++;
}

static struct syncer_job *
jobs_of(struct job_seen *j, size_t n)
{
	struct syncer_job *v = calloc(n, sizeof *v);
	size_t i;

	for (i = 0; i < n; i++) {
		v[i].fn = job;
		v[i].arg = &j[i];
	}
	return v;
}

static void
test_jobs_run_on_the_thread_before_the_loop_hears(void **state)
{
	struct seen s;
	struct job_seen j[3];
	char path[64];
	int fd = temp_file(path, sizeof path), i;
	struct syncer *sy;
	uint64_t g;

	(void)state;
	memset(j, 0, sizeof j);
	sy = setup(&s, fd);
	for (i = 0; i < 3; i++)
		j[i].s = &s;
	/* The generations are 1 and 2 (setup makes a fresh syncer). */
	j[0].gen = j[1].gen = 1;
	j[2].gen = 2;
	syncer_request_jobs(sy, jobs_of(j, 2), 2);
	g = syncer_request_jobs(sy, jobs_of(j + 2, 1), 1);
	assert_int_equal(g, 2);
	s.want = g;
	run_until(&s);
	assert_int_equal(s.gen, g);
	/* The loop may hear of generation 1 before the job of 2 runs (two
	 * syncs), never of a job's own generation before the job. */
	for (i = 0; i < 3; i++) {
		assert_int_equal(j[i].ran, 1);	/* once */
		assert_false(pthread_equal(j[i].thread, pthread_self()));
		assert_true(j[i].loop_gen < j[i].gen);
	}
	syncer_free(sy);
	event_base_free(s.base);
	close(fd);
	unlink(path);
}

static void
test_jobs_of_a_failed_sync_never_run(void **state)
{
	struct seen s;
	struct job_seen j[2];
	struct syncer *sy;

	(void)state;
	memset(j, 0, sizeof j);
	sy = setup(&s, -1);
	j[0].s = j[1].s = &s;
	s.want = 1;
	syncer_request_jobs(sy, jobs_of(j, 2), 2);
	run_until(&s);
	assert_int_equal(s.err, EBADF);
	assert_int_equal(j[0].ran + j[1].ran, 0);
	syncer_free(sy);	/* frees what never ran */
	event_base_free(s.base);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_requests_are_served_in_order),
		cmocka_unit_test(test_wait_serves_everything),
		cmocka_unit_test(test_failed_sync_is_reported),
		cmocka_unit_test(test_jobs_run_on_the_thread_before_the_loop_hears),
		cmocka_unit_test(test_jobs_of_a_failed_sync_never_run),
	};

	evthread_use_pthreads();
	return cmocka_run_group_tests(tests, NULL, NULL);
}
