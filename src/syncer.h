#ifndef SAGAD_SYNCER_H
#define SAGAD_SYNCER_H

#include <stddef.h>
#include <stdint.h>

struct event_base;

/*
 * A thread that fsyncs one file for the event loop, so that the loop goes
 * on while the disk works (pipelined group commit): the loop commits a
 * transaction (written, not yet synced), asks for a sync and goes on with
 * the next requests; the answers of the transaction are sent when a sync
 * that started after its commit has finished. Requests made while a sync
 * runs are served together by the next one.
 */
struct syncer;

/* Runs on the loop's thread: every request up to gen is durable, or the
 * sync failed (err: errno). */
typedef void syncer_done_fn(void *arg, uint64_t gen, int err);

/* Work that may run on the syncer's own thread as soon as a generation is
 * durable, before the loop hears of it (a consumed message's ack: the loop
 * may be busy). Never run when the sync fails or the syncer is freed
 * first; the loop's done callback must then do the work itself. */
struct syncer_job {
	void (*fn)(void *arg);
	void *arg;
};

/* fd stays owned by the caller and must outlive the syncer. */
struct syncer *syncer_new(struct event_base *base, int fd, syncer_done_fn *done, void *arg);
/* Ask for a sync of everything written so far; returns its generation. */
uint64_t syncer_request(struct syncer *s);
/* The same, and run jobs[0..n) on the syncer's thread once it is durable;
 * takes the array (malloc'd). */
uint64_t syncer_request_jobs(struct syncer *s, struct syncer_job *jobs, size_t n);
/* Block until every request made so far is served; the done callback is
 * not called for them (the caller settles them itself). Returns 0 or the
 * errno of a failed sync. */
int syncer_wait(struct syncer *s, uint64_t *gen);
/* A copy of the histogram of fdatasync durations (seconds). */
struct histogram;
void syncer_took(struct syncer *s, struct histogram *out);
void syncer_free(struct syncer *s);

#endif
