#include "syncer.h"

#include "metrics.h"
#include "util.h"
#include "xmalloc.h"

#include <errno.h>
#include <event2/event.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum syncer_state {
	SYNCER_IDLE,		/* nothing asked */
	SYNCER_SYNCING,		/* an fdatasync runs */
	SYNCER_STOPPING
};

/* Jobs of one generation, in request order. */
struct syncer_batch {
	uint64_t gen;
	struct syncer_job *jobs;
	size_t n;
};

struct syncer {
	int fd;
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t wake, served;
	enum syncer_state state;
	uint64_t requested;	/* under lock: the last generation asked for */
	uint64_t done;		/* under lock: every generation up to it is synced */
	int err;		/* under lock: errno of a failed sync, sticky */
	struct histogram took;	/* under lock: how long each fdatasync took */
	struct syncer_batch *batches;	/* under lock: waiting for their sync */
	size_t nbatches, capbatches;
	uint64_t reported;	/* loop thread: the last generation given to done_fn */
	struct event *done_ev;
	syncer_done_fn *done_fn;
	void *arg;
};

static void
syncer_free_batches(struct syncer_batch *b, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		free(b[i].jobs);
	free(b);
}

/* Under lock: detach the batches up to gen (ascending). */
static struct syncer_batch *
syncer_take(struct syncer *s, uint64_t gen, size_t *n)
{
	struct syncer_batch *b;
	size_t k = 0;

	while (k < s->nbatches && s->batches[k].gen <= gen)
		k++;
	*n = k;
	if (!k)
		return NULL;
	b = xmalloc(k * sizeof *b);
	memcpy(b, s->batches, k * sizeof *b);
	memmove(s->batches, s->batches + k, (s->nbatches - k) * sizeof *b);
	s->nbatches -= k;
	return b;
}

/* Syncer thread, after a sync up to target: run its jobs (unless it
 * failed) before the loop is told, so that the loop's done callback
 * always sees them run. */
static void
syncer_run_jobs(struct syncer *s, uint64_t target, int err)
{
	struct syncer_batch *b;
	size_t n, i, j;

	pthread_mutex_lock(&s->lock);
	b = syncer_take(s, target, &n);
	/* After a failed sync nothing is durable any more (fsyncgate: a
	 * later fsync may succeed without the lost pages): no job runs. */
	if (s->err)
		err = s->err;
	pthread_mutex_unlock(&s->lock);
	for (i = 0; i < n && !err; i++)
		for (j = 0; j < b[i].n; j++)
			b[i].jobs[j].fn(b[i].jobs[j].arg);
	syncer_free_batches(b, n);
}

static void *
syncer_main(void *arg)
{
	struct syncer *s = arg;
	uint64_t target;
	double t0, took;
	int err;

	pthread_setname_np(pthread_self(), "sagad-syncer");
	pthread_mutex_lock(&s->lock);
	for (;;) {
		while (s->state != SYNCER_STOPPING && s->requested == s->done)
			pthread_cond_wait(&s->wake, &s->lock);
		if (s->requested == s->done)	/* stopping, nothing left */
			break;
		target = s->requested;
		s->state = SYNCER_SYNCING;
		pthread_mutex_unlock(&s->lock);
		/* fsync covers what any descriptor of the file wrote before
		 * the call: every commit up to target. */
		t0 = util_mono();
		err = fdatasync(s->fd) < 0 ? errno : 0;
		took = util_mono() - t0;
		syncer_run_jobs(s, target, err);
		pthread_mutex_lock(&s->lock);
		histogram_observe(&s->took, took);
		if (err && !s->err)
			s->err = err;
		s->done = target;
		if (s->state == SYNCER_SYNCING)
			s->state = SYNCER_IDLE;
		pthread_cond_broadcast(&s->served);
		pthread_mutex_unlock(&s->lock);
		event_active(s->done_ev, 0, 0);
		pthread_mutex_lock(&s->lock);
	}
	pthread_mutex_unlock(&s->lock);
	return NULL;
}

static void
syncer_done_cb(evutil_socket_t fd, short what, void *arg)
{
	struct syncer *s = arg;
	uint64_t gen;
	int err;

	(void)fd;
	(void)what;
	pthread_mutex_lock(&s->lock);
	gen = s->done;
	err = s->err;
	pthread_mutex_unlock(&s->lock);
	if (gen <= s->reported && !err)
		return;
	if (gen > s->reported)
		s->reported = gen;
	s->done_fn(s->arg, gen, err);
}

struct syncer *
syncer_new(struct event_base *base, int fd, syncer_done_fn *done, void *arg)
{
	struct syncer *s = xcalloc(1, sizeof *s);

	s->fd = fd;
	s->done_fn = done;
	s->arg = arg;
	pthread_mutex_init(&s->lock, NULL);
	pthread_cond_init(&s->wake, NULL);
	pthread_cond_init(&s->served, NULL);
	histogram_init(&s->took, metrics_latency_bounds, metrics_latency_nbounds);
	s->done_ev = event_new(base, -1, 0, syncer_done_cb, s);
	/* First in the turn: answers wait for nothing else. */
	event_priority_set(s->done_ev, 0);
	if (pthread_create(&s->thread, NULL, syncer_main, s) != 0) {
		event_free(s->done_ev);
		free(s);
		return NULL;
	}
	return s;
}

uint64_t
syncer_request_jobs(struct syncer *s, struct syncer_job *jobs, size_t n)
{
	uint64_t gen;

	pthread_mutex_lock(&s->lock);
	gen = ++s->requested;
	/* Queued with the request, under the same lock: the thread cannot
	 * have synced this generation yet. */
	if (n && !s->err) {
		*XPUSH(s->batches, s->nbatches, s->capbatches) =
		    (struct syncer_batch){ gen, jobs, n };
	} else {
		free(jobs);
	}
	pthread_cond_signal(&s->wake);
	pthread_mutex_unlock(&s->lock);
	return gen;
}

uint64_t
syncer_request(struct syncer *s)
{
	return syncer_request_jobs(s, NULL, 0);
}

int
syncer_wait(struct syncer *s, uint64_t *gen)
{
	int err;

	pthread_mutex_lock(&s->lock);
	while (s->done != s->requested)
		pthread_cond_wait(&s->served, &s->lock);
	*gen = s->done;
	err = s->err;
	pthread_mutex_unlock(&s->lock);
	if (*gen > s->reported)
		s->reported = *gen;
	return err;
}

void
syncer_took(struct syncer *s, struct histogram *out)
{
	pthread_mutex_lock(&s->lock);
	*out = s->took;
	pthread_mutex_unlock(&s->lock);
}

void
syncer_free(struct syncer *s)
{
	if (!s)
		return;
	pthread_mutex_lock(&s->lock);
	s->state = SYNCER_STOPPING;
	pthread_cond_signal(&s->wake);
	pthread_mutex_unlock(&s->lock);
	pthread_join(s->thread, NULL);
	syncer_free_batches(s->batches, s->nbatches);
	event_free(s->done_ev);
	pthread_cond_destroy(&s->wake);
	pthread_cond_destroy(&s->served);
	pthread_mutex_destroy(&s->lock);
	free(s);
}
