/*
 * The PostgreSQL saga store's batches (REPLICAS.md: One batch, one
 * transaction, two round trips), on one asynchronous connection
 * (pgconn.c) so that the loop never waits for PostgreSQL:
 *
 *   IDLE --jobs queued--> FETCH: BEGIN; record the consumed message ids
 *        (ON CONFLICT DO NOTHING RETURNING: the others are duplicates);
 *        SELECT the instances of the batch's saga ids FOR UPDATE, in one
 *        order (saga, id), so that two replicas' batches cannot deadlock;
 *        claim due timers (FOR UPDATE SKIP LOCKED: one replica fires
 *        each); history, listings and counts as the jobs ask
 *   FETCH --results--> the jobs run in order against the cache
 *        (saga_store_pgsql.c) --> COMMIT: their writes, then COMMIT
 *   COMMIT --ok--> each job's done (the broker acks follow the commit);
 *        the relay publishes the outbox rows; IDLE, next batch
 *   a transient error (pgc_error_class: deadlock, lock or statement
 *        timeout...) --> ROLLBACK, WAIT (a backoff), the batch again as
 *        it was: no job is refused for it
 *   a failover (read-only transaction) or connection trouble --> DOWN
 *   any other error --> ROLLBACK, the jobs queued again, alone: a job
 *        that fails PGS_ATTEMPTS times is refused (dead-lettered)
 *   connection lost --> DOWN: the batch's jobs wait in the queue (their
 *        messages unacked) for the next connection; operators' and
 *        timers' jobs are answered "retry" at once.
 */
#include "saga_pgsql.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "conf.h"
#include "log.h"
#include "msg.h"
#include "metrics.h"
#include "pgconn.h"
#include "saga_pg_relay.h"
#include "util.h"
#include "xmalloc.h"

/* Tries of a job whose batch failed for a statement. */
#define PGS_ATTEMPTS 5
/* The wait after a transient error, seconds: doubling, with jitter. */
#define PGS_WAIT_MIN 0.05
#define PGS_WAIT_MAX 2.0

static void pgs_next(struct saga_backend *b);

/* ---- jobs ---- */

static struct pgs_job *
pgs_job_new(const struct saga_job *job)
{
	struct pgs_job *p = xcalloc(1, sizeof *p);
	size_t i;

	p->j = *job;
	for (i = 0; i < job->n_ids; i++)
		p->j.ids[i] = p->ids[i] = xstrdup(job->ids[i]);
	if (job->consumed)
		p->j.consumed = p->consumed = xstrdup(job->consumed);
	if (job->list.saga)
		p->j.list.saga = p->list_saga = xstrdup(job->list.saga);
	if (job->list.after_saga) {
		p->j.list.after_saga = p->after_saga = xstrdup(job->list.after_saga);
		p->j.list.after_id = p->after_id = xstrdup(job->list.after_id);
	}
	return p;
}

static void
pgs_job_end(struct pgs_job *p, enum saga_job_result r)
{
	p->j.done(p->j.arg, r);
	PQclear(p->list);
	free(p->ids[0]);
	free(p->ids[1]);
	free(p->consumed);
	free(p->list_saga);
	free(p->after_saga);
	free(p->after_id);
	free(p);
}

static void
pgs_queue_front(struct saga_backend *b, struct pgs_job *list)
{
	struct pgs_job *last = list;

	if (!list)
		return;
	while (last->next)
		last = last->next;
	last->next = b->queue;
	if (!b->queue)
		b->queue_tail = &last->next;
	b->queue = list;
}

/* Answer "retry" to the queued jobs that must not wait for the connection
 * (an operator is waiting; the timers come again by themselves); the
 * consumed messages wait, unacked. */
static void
pgs_shed(struct saga_backend *b)
{
	struct pgs_job **pp = &b->queue, *p;

	while ((p = *pp)) {
		if (p->j.consumed) {
			pp = &p->next;
			continue;
		}
		*pp = p->next;
		pgs_job_end(p, SAGA_JOB_RETRY);
	}
	b->queue_tail = pp;
}

void
pgs_driver_submit(struct saga_backend *b, const struct saga_job *job)
{
	struct pgs_job *p;

	if (b->state == PGS_DOWN && !job->consumed) {
		job->done(job->arg, SAGA_JOB_RETRY);
		return;
	}
	p = pgs_job_new(job);
	*b->queue_tail = p;
	b->queue_tail = &p->next;
	/* At the end of this loop turn: the deliveries of one read from the
	 * broker make one batch. */
	if (b->state == PGS_IDLE)
		event_active(b->start_ev, 0, 0);
}

/* ---- round trip 1: fetch and lock (saga_pgsql_fetch.c) ---- */

/* The batch: up to PGS_BATCH_MAX jobs, or one that must run alone. */
static void
pgs_take_batch(struct saga_backend *b)
{
	struct pgs_job **tail = &b->batch;

	b->batch = NULL;
	b->nbatch = 0;
	while (b->queue && b->nbatch < PGS_BATCH_MAX) {
		struct pgs_job *p = b->queue;
		if (p->alone && b->nbatch)
			break;
		b->queue = p->next;
		p->next = NULL;
		*tail = p;
		tail = &p->next;
		b->nbatch++;
		if (p->alone)
			break;
	}
	if (!b->queue)
		b->queue_tail = &b->queue;
}

/* ---- the jobs run ---- */

/* Which consumed ids the INSERT took: the first job with each runs, any
 * other (a copy redelivered, in this batch or taken before) is a
 * duplicate. */
static void
pgs_mark_duplicates(struct saga_backend *b, PGresult *res)
{
	int n = res ? PQntuples(res) : 0, i;
	char *taken = xcalloc((size_t)n + 1, 1);
	struct pgs_job *p;

	for (p = b->batch; p; p = p->next) {
		if (!p->consumed)
			continue;
		p->duplicate = 1;
		for (i = 0; i < n; i++)
			if (!taken[i] && strcmp(PQgetvalue(res, i, 0), p->consumed) == 0) {
				taken[i] = 1;
				p->duplicate = 0;
				break;
			}
	}
	free(taken);
}

static void
pgs_fetched(struct saga_backend *b)
{
	struct pgs_fetch *f = b->fetch;
	struct pgs_job *p;
	PGresult *res;
	int i, k;

	if (f->at_consumed >= 0)
		pgs_mark_duplicates(b, pgc_result(b->pg, f->at_consumed));
	if (f->at_insts >= 0) {
		res = pgc_result(b->pg, f->at_insts);
		for (i = 0; i < PQntuples(res); i++)
			pgs_cache_add(b, res, i, 0);
	}
	if (f->at_early >= 0) {
		b->early = pgc_take_result(b->pg, f->at_early);
		b->early_taken = xcalloc((size_t)PQntuples(b->early) + 1, 1);
	}
	if (f->at_timers >= 0) {
		res = pgc_result(b->pg, f->at_timers);
		for (i = 0; i < PQntuples(res); i++) {
			struct pgs_due *d = XPUSH(b->dues, b->ndues, b->capdues);
			/* its saga id is the batch's too: the engine may read it */
			*XPUSH(b->ids, b->nids, b->capids) = xstrdup(PQgetvalue(res, i, 3));
			d->kind = atoi(PQgetvalue(res, i, 0));
			d->step = atoi(PQgetvalue(res, i, 1));
			d->row = pgs_cache_add(b, res, i, 2);
		}
	}
	if (f->at_history >= 0)
		b->history = pgc_take_result(b->pg, f->at_history);
	k = f->at_list;
	for (p = b->batch; p; p = p->next)
		if (p->j.want & SAGA_WANT_LIST)
			p->list = pgc_take_result(b->pg, k++);
	if (f->at_counts >= 0) {
		pgs_counts_fetched(b, pgc_take_result(b->pg, f->at_counts));
		b->want_counts = 0;
	}
	pgs_fetch_free(b);
}

/* What the jobs counted is taken back when their batch did not commit:
 * they run again. */
static void
pgs_batch_event(struct saga_backend *b, enum saga_batch_event ev)
{
	if (ev == SAGA_BATCH_UNDO && !b->ran)
		return;
	b->ran = ev == SAGA_BATCH_RUN;
	if (b->batch_fn)
		b->batch_fn(b->batch_arg, ev);
}

static void
pgs_run_jobs(struct saga_backend *b)
{
	struct pgs_job *p;

	pgs_batch_event(b, SAGA_BATCH_RUN);

	for (p = b->batch; p; p = p->next) {
		if (p->duplicate)
			continue;
		b->cur = p;
		p->j.run(p->j.arg);
	}
	b->cur = NULL;
}

/* ---- round trip 2: the writes and COMMIT ---- */

static void
pgs_commit_send(struct saga_backend *b)
{
	struct pgc_stmt *st;
	size_t n, i;

	pgs_flush_instances(b);
	for (i = 0; i < b->loose.n; i++)
		*pgs_stmt_add(&b->writes, NULL) = b->loose.v[i];
	b->loose.n = 0;		/* their values are the writes' now */
	pgs_stmt_add(&b->writes, "COMMIT");
	n = b->writes.n;
	st = xcalloc(n, sizeof *st);
	for (i = 0; i < n; i++) {
		st[i].sql = b->writes.v[i].sql;
		st[i].n = b->writes.v[i].n;
		st[i].values = (const char *const *)b->writes.v[i].v;
		st[i].lengths = b->writes.v[i].len;
		st[i].formats = b->writes.v[i].fmt;
	}
	b->state = PGS_COMMIT;
	pgc_send_pipeline(b->pg, st, (int)n);
	free(st);
}

void
pgs_hands_free(struct saga_backend *b)
{
	size_t i;

	for (i = 0; i < b->nhands; i++)
		msg_free(b->hands[i].m);
	b->nhands = 0;
}

/* The rows the batch's replies deleted (saga_store_delivered): the relay
 * holding them forgets them. */
static void
pgs_gone_all(struct saga_backend *b)
{
	int64_t *seqs = NULL;
	size_t i, n = 0, cap = 0;
	int k;

	for (i = 0; i < b->nhands && b->relay; i++) {
		PGresult *res = pgc_result(b->pg, (int)b->hands[i].stmt);

		if (b->hands[i].m || !res)
			continue;
		for (k = 0; k < PQntuples(res); k++)
			*XPUSH(seqs, n, cap) = strtoll(PQgetvalue(res, k, 0), NULL, 10);
	}
	if (n)
		saga_pg_relay_gone(b->relay, seqs, n);
	free(seqs);
}

/* The batch's outbox rows, committed: each claimed by this replica goes to
 * its relay with the seq it got; an unclaimed one is the relay's claim's
 * to read, now. */
static void
pgs_hand_all(struct saga_backend *b)
{
	size_t i;
	int unclaimed = 0;

	pgs_gone_all(b);
	for (i = 0; i < b->nhands && b->relay; i++) {
		PGresult *res = pgc_result(b->pg, (int)b->hands[i].stmt);
		struct msg *m = b->hands[i].m;

		if (!m)
			continue;
		if (!res || PQntuples(res) != 1 || strcmp(PQgetvalue(res, 0, 1), "t") != 0) {
			unclaimed = 1;
			continue;
		}
		m->seq = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
		b->hands[i].m = NULL;
		saga_pg_relay_hand(b->relay, m, m->props.correlation_id ?
		    xstrdup(m->props.correlation_id) : NULL,
		    strcmp(PQgetvalue(res, 0, 2), "t") == 0);
	}
	if (unclaimed)
		saga_pg_relay_kick(b->relay);
	pgs_hands_free(b);
}

static void
pgs_committed(struct saga_backend *b)
{
	struct pgs_job *p = b->batch, *next;

	b->batch = NULL;
	b->nbatch = 0;
	b->ran = 0;
	b->commits++;
	histogram_observe(&b->batch_seconds, util_mono() - b->batch_at);
	pgs_counts_commit(b);
	pgs_stmts_clear(&b->writes);
	pgs_hand_all(b);
	pgc_reset_backoff(b->pg);
	b->wait = PGS_WAIT_MIN;
	b->state = PGS_IDLE;
	for (; p; p = next) {
		next = p->next;
		pgs_job_end(p, p->duplicate ? SAGA_JOB_DUPLICATE : SAGA_JOB_DONE);
	}
	pgs_cache_reset(b);
	pgs_next(b);
}

/* A statement failed: the transaction is over for PostgreSQL, not yet
 * for the connection (a BEGIN block stays open in its aborted state).
 * A failover or a broken link: the next connection runs the batch. */
static void
pgs_failed(struct saga_backend *b, const char *why)
{
	enum pgc_err_class cls = pgc_error_class(b->pg);

	log_warn("saga store: batch not committed", LOG_STR("error", why),
	    LOG_STR("sqlstate", pgc_error_sqlstate(b->pg)),
	    LOG_STR("retry", cls == PGC_ERR_PERMANENT ? "each job alone" : "the batch"),
	    LOG_UINT("jobs", b->nbatch));
	b->failures++;
	if (cls == PGC_ERR_RECONNECT) {
		char *copy = xstrdup(why);	/* why is the connection's */
		b->transient_failures++;
		pgc_down(b->pg, copy);
		free(copy);
		return;
	}
	b->transient = cls == PGC_ERR_TRANSIENT;
	b->transient_failures += (uint64_t)b->transient;
	pgs_batch_event(b, SAGA_BATCH_UNDO);
	pgs_fetch_free(b);
	pgs_stmts_clear(&b->writes);
	pgs_hands_free(b);
	b->state = PGS_ROLLBACK;
	pgc_send(b->pg, "ROLLBACK");
}

static void
pgs_wait_cb(evutil_socket_t fd, short what, void *arg)
{
	struct saga_backend *b = arg;

	(void)fd;
	(void)what;
	if (b->state != PGS_WAIT)
		return;
	b->state = PGS_IDLE;
	pgs_next(b);
}

/* After a transient error's ROLLBACK: the same batch again, after a
 * doubling wait with jitter (two replicas that deadlocked do not meet
 * again in step); no job's tries are counted. */
/* The batch's jobs back at the head of the queue, as they came. */
static void
pgs_requeue_batch(struct saga_backend *b)
{
	struct pgs_job *p;

	for (p = b->batch; p; p = p->next) {
		p->duplicate = 0;
		PQclear(p->list);
		p->list = NULL;
	}
	pgs_queue_front(b, b->batch);
	b->batch = NULL;
	b->nbatch = 0;
}

static void
pgs_wait(struct saga_backend *b)
{
	double sec = b->wait * (0.5 + (double)rand() / RAND_MAX);
	struct timeval tv = { (time_t)sec, (suseconds_t)((sec - (double)(time_t)sec) * 1e6) };

	pgs_requeue_batch(b);
	b->wait = b->wait * 2 < PGS_WAIT_MAX ? b->wait * 2 : PGS_WAIT_MAX;
	b->state = PGS_WAIT;
	event_add(b->wait_ev, &tv);
}

/* After the ROLLBACK: each job again, alone, or refused after its tries;
 * after a transient error, the batch again after a wait. */
static void
pgs_rolled_back(struct saga_backend *b)
{
	struct pgs_job *p = b->batch, *next, *again = NULL, **tail = &again;

	pgs_cache_reset(b);
	if (b->transient) {
		b->transient = 0;
		pgs_wait(b);
		return;
	}
	b->batch = NULL;
	b->nbatch = 0;
	for (; p; p = next) {
		next = p->next;
		p->next = NULL;
		p->duplicate = 0;
		PQclear(p->list);
		p->list = NULL;
		if (++p->alone >= PGS_ATTEMPTS) {
			log_error("saga store: a job failed every try; refused",
			    LOG_STR("message_id", p->consumed), LOG_STR("saga_id", p->ids[0]));
			pgs_job_end(p, SAGA_JOB_FAILED);
			continue;
		}
		*tail = p;
		tail = &p->next;
	}
	pgs_queue_front(b, again);
	b->state = PGS_IDLE;
	pgs_next(b);
}

/* ---- the connection ---- */

static void
pgs_next(struct saga_backend *b)
{
	if (b->state != PGS_IDLE)
		return;
	if (!b->queue && !b->loose.n && !b->want_counts)
		return;
	pgs_take_batch(b);
	b->batches++;
	b->batch_at = util_mono();
	pgs_fetch_send(b);
}

static void
pgs_start_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	pgs_next(arg);
}

/* The session is set up (search_path and settings) before this. */
static void
pgs_connected(void *arg)
{
	struct saga_backend *b = arg;

	log_info("saga store connected to PostgreSQL", LOG_STR("schema", b->schema),
	    LOG_STR("replica", b->replica));
	b->state = PGS_IDLE;
	b->want_counts = 1;
	pgs_next(b);
}

static void
pgs_done(void *arg)
{
	struct saga_backend *b = arg;
	const char *err = pgc_error(b->pg);

	switch (b->state) {
	case PGS_FETCH:
		if (err) {
			pgs_failed(b, err);
			return;
		}
		pgs_fetched(b);
		pgs_run_jobs(b);
		pgs_commit_send(b);
		break;
	case PGS_COMMIT:
		if (err)
			pgs_failed(b, err);
		else
			pgs_committed(b);
		break;
	case PGS_ROLLBACK:
		pgs_rolled_back(b);
		break;
	default:
		break;
	}
}

static void
pgs_connecting(void *arg)
{
	(void)arg;
}

static void
pgs_notified(void *arg)
{
	(void)arg;
}

/* The batch in flight, committed or not, is tried again on the next
 * connection: its consumed ids tell a committed one's messages apart. */
static void
pgs_down(void *arg, const char *why, double retry_in)
{
	struct saga_backend *b = arg;

	/* A COMMIT lost with the connection may have committed rows that
	 * the relay then must read itself. */
	if (b->state == PGS_COMMIT && b->nhands && b->relay)
		saga_pg_relay_lost(b->relay);
	if (b->state != PGS_DOWN)
		log_warn("saga store: PostgreSQL connection lost", LOG_STR("error", why),
		    LOG_DBL("retry_in", retry_in));
	b->state = PGS_DOWN;
	b->transient = 0;
	event_del(b->wait_ev);
	pgs_batch_event(b, SAGA_BATCH_UNDO);
	pgs_fetch_free(b);
	pgs_stmts_clear(&b->writes);
	pgs_stmts_clear(&b->loose);
	pgs_hands_free(b);
	pgs_cache_reset(b);
	pgs_requeue_batch(b);
	b->retries++;
	pgs_shed(b);
}

static const struct pgc_hooks pgs_hooks = {
	pgs_connecting, pgs_connected, pgs_done, pgs_notified, pgs_down
};

/* Every PGS_TICK seconds: this replica's heartbeat, and counts. */
static void
pgs_tick_cb(evutil_socket_t fd, short what, void *arg)
{
	struct saga_backend *b = arg;
	struct pgs_stmt *s;

	(void)fd;
	(void)what;
	if (b->state == PGS_DOWN)
		return;
	s = pgs_stmt_add(&b->loose, "INSERT INTO replicas (service, replica, host, pid,"
	    " started_at, heartbeat_at) VALUES ($1, $2, $3, $4, $5,"
	    " extract(epoch FROM clock_timestamp())) ON CONFLICT (service, replica)"
	    " DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at");
	pgs_param(s, b->service);
	pgs_param(s, b->replica);
	pgs_param(s, b->replica_host);
	pgs_param_int(s, (int64_t)getpid());
	pgs_param_dbl(s, b->started_at);
	if (!b->want_counts)
		b->counts_wanted = util_mono();
	b->want_counts = 1;
	pgs_next(b);
}

/* The families of the PostgreSQL saga store and of its relay. */
void
pgs_metrics(struct saga_backend *b, struct evbuffer *out)
{
	size_t queued = 0;
	struct pgs_job *p;

	for (p = b->queue; p; p = p->next)
		queued++;
#define PGS_METRIC(name, type, help, value)					\
	do {									\
		metrics_family(out, name, type, help);				\
		metrics_sample(out, name, "", (double)(value));			\
	} while (0)
	PGS_METRIC("sagad_saga_store_connected", "gauge",
	    "1 while the saga store's PostgreSQL connection serves.",
	    b->state != PGS_DOWN);
	PGS_METRIC("sagad_saga_store_batches_total", "counter",
	    "Batches of saga jobs sent to PostgreSQL.", b->batches);
	PGS_METRIC("sagad_saga_store_commits_total", "counter",
	    "Batches committed.", b->commits);
	PGS_METRIC("sagad_saga_store_failures_total", "counter",
	    "Batches rolled back for an error (their jobs run again alone, or after a"
	    " transient error the batch after a wait).", b->failures);
	PGS_METRIC("sagad_saga_store_transient_failures_total", "counter",
	    "Of the failures, those for a transient error (deadlock, serialization"
	    " failure, lock or statement timeout, failover): the batch runs again"
	    " after a wait, no job's tries counted.", b->transient_failures);
	PGS_METRIC("sagad_saga_store_reconnects_total", "counter",
	    "PostgreSQL connections lost (their batch runs again).", b->retries);
	PGS_METRIC("sagad_saga_store_queued", "gauge",
	    "Saga jobs waiting for a batch (consumed messages held unacked).", queued);
#undef PGS_METRIC
	metrics_family(out, "sagad_saga_store_batch_seconds", "histogram",
	    "Time from a batch's BEGIN sent to its COMMIT answered (both round trips).");
	metrics_histogram(out, "sagad_saga_store_batch_seconds", "", &b->batch_seconds);
	if (b->relay)
		saga_pg_relay_metrics(b->relay, out);
}

int
pgs_driver_start(struct saga_backend *b)
{
	struct timeval tv = { PGS_TICK, 0 };

	histogram_init(&b->batch_seconds, metrics_latency_bounds, metrics_latency_nbounds);
	b->queue_tail = &b->queue;
	b->cfg.conninfo = b->conninfo;
	b->cfg.connect_timeout = 5;
	b->cfg.query_timeout = 30;
	b->cfg.retry_initial = 0.2;
	b->cfg.retry_max = 2;	/* sagas wait for it: look again often */
	/* The server drops a vanished replica's connection, and its locks,
	 * within about eleven seconds (keepalives), and one that stopped in
	 * a transaction after a minute (server_limits: with the statement and
	 * lock timeouts). */
	b->cfg.schema = b->schema;
	b->cfg.server_limits = 1;
	b->cfg.session = "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2;"
	    " SET tcp_keepalives_count = 3";
	b->wait = PGS_WAIT_MIN;
	b->pg = pgc_new(b->base, &b->cfg, &pgs_hooks, b);
	b->start_ev = event_new(b->base, -1, 0, pgs_start_cb, b);
	b->tick_ev = event_new(b->base, -1, EV_PERSIST, pgs_tick_cb, b);
	b->wait_ev = evtimer_new(b->base, pgs_wait_cb, b);
	event_add(b->tick_ev, &tv);
	b->relay = saga_pg_relay_new(b->base, b->conf, b->conninfo, b->schema, b->service,
	    b->replica, b->conf->saga_store.relay_grace);
	if (!b->relay || saga_pg_relay_start(b->relay) < 0)
		return -1;
	saga_pg_relay_set_otel(b->relay, b->otel);
	pgc_start(b->pg);
	return 0;
}

/* Jobs still here are answered "retry": their messages, unacked, come
 * again to whichever replica lives. */
void
pgs_driver_stop(struct saga_backend *b)
{
	struct pgs_job *p, *next;

	if (b->pg)
		pgc_free(b->pg);
	b->pg = NULL;
	pgs_fetch_free(b);
	pgs_queue_front(b, b->batch);
	b->batch = NULL;
	for (p = b->queue; p; p = next) {
		next = p->next;
		pgs_job_end(p, SAGA_JOB_RETRY);
	}
	b->queue = NULL;
	b->queue_tail = &b->queue;
	pgs_hands_free(b);	/* committed or not: a claim reads them */
	if (b->relay)
		saga_pg_relay_free(b->relay);
	b->relay = NULL;
	if (b->start_ev)
		event_free(b->start_ev);
	if (b->tick_ev)
		event_free(b->tick_ev);
	if (b->wait_ev)
		event_free(b->wait_ev);
	b->start_ev = b->tick_ev = b->wait_ev = NULL;
}
