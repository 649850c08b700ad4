/*
 * Shared deduplication (dedup.h): claims of consumed message ids in the
 * PostgreSQL saga store's consumed table, batched, on a connection of
 * their own (pgconn.c), so that the loop never waits for PostgreSQL.
 */
#include "dedup.h"

#include <event2/event.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "log.h"
#include "pgconn.h"
#include "saga_pgsql.h"
#include "util.h"
#include "xmalloc.h"

/* Claims per statement. */
#define DEDUP_BATCH 256

struct dedup_req {
	char *sub, *message_id;
	dedup_claim_fn *fn;
	void *arg;
	struct dedup_req *next;
};

enum dedup_state {
	DEDUP_DOWN,
	DEDUP_IDLE,
	DEDUP_SENT,		/* a batch of claims in flight */
	DEDUP_EXPIRE		/* old claims being forgotten */
};

struct dedup {
	struct event_base *base;
	char *conninfo, *schema, *service, *replica;
	struct pgc_conf cfg;
	struct pgc *pg;
	enum dedup_state state;
	struct event *start_ev;
	struct event *expire_ev;	/* every minute: claims past dedup_window;
					 * NULL when the saga store does it */
	double window;
	int expire_due;
	struct dedup_req *queue, **tail;	/* waiting */
	struct dedup_req *sent;			/* in flight */
};

static void dedup_next(struct dedup *dd);

static void
dedup_answer(struct dedup_req *r, enum dedup_claim c)
{
	r->fn(r->arg, c);
	free(r->sub);
	free(r->message_id);
	free(r);
}

/* The batch in flight goes back to the head of the queue. */
static void
dedup_requeue(struct dedup *dd)
{
	struct dedup_req *last = dd->sent;

	if (!last)
		return;
	while (last->next)
		last = last->next;
	last->next = dd->queue;
	if (!dd->queue)
		dd->tail = &last->next;
	dd->queue = dd->sent;
	dd->sent = NULL;
}

/* The claims in (subscription, message id) order, the same for every
 * replica: the INSERT locks its rows in the order given, and two
 * replicas claiming overlapping ids in different orders could deadlock
 * (40P01). The answers match the requests by value (dedup_done). An
 * insertion sort: a batch is at most DEDUP_BATCH. */
void
dedup_sort(char **subs, char **ids, size_t n)
{
	size_t i, j;

	for (i = 1; i < n; i++) {
		char *s = subs[i], *m = ids[i];
		for (j = i; j > 0; j--) {
			int c = strcmp(subs[j - 1], s);
			if (c < 0 || (c == 0 && strcmp(ids[j - 1], m) <= 0))
				break;
			subs[j] = subs[j - 1];
			ids[j] = ids[j - 1];
		}
		subs[j] = s;
		ids[j] = m;
	}
}

/*
 * One statement claims the batch: a new row is this replica's; on a
 * conflict the no-op update returns the row as it is, with the replica
 * that holds it. A message id twice in one batch (redelivered while its
 * claim waited) is claimed once and answered for both.
 */
static void
dedup_send(struct dedup *dd)
{
	char *subs[DEDUP_BATCH], *ids[DEDUP_BATCH];
	const char *v[5];
	struct dedup_req **pp = &dd->queue, *r;
	size_t n = 0, i;
	char *at, *a1, *a2;

	dd->sent = NULL;
	while ((r = *pp) && n < DEDUP_BATCH) {
		int dup = 0;
		for (i = 0; i < n; i++)
			if (strcmp(subs[i], r->sub) == 0 && strcmp(ids[i], r->message_id) == 0)
				dup = 1;
		if (!dup) {
			subs[n] = r->sub;
			ids[n++] = r->message_id;
		}
		pp = &r->next;
	}
	/* the first ones, up to the n distinct, are the batch */
	dd->sent = dd->queue;
	dd->queue = *pp;
	*pp = NULL;
	if (!dd->queue)
		dd->tail = &dd->queue;
	dedup_sort(subs, ids, n);
	at = xasprintf("%.17g", util_now());
	a1 = pgs_text_array(subs, n);
	a2 = pgs_text_array(ids, n);
	v[0] = dd->service;
	v[1] = dd->replica;
	v[2] = at;
	v[3] = a1;
	v[4] = a2;
	dd->state = DEDUP_SENT;
	pgc_send_params(dd->pg, "INSERT INTO consumed (service, subscription, message_id, replica,"
	    " delivered, at) SELECT $1, s, m, $2, false, $3 FROM unnest($4::text[], $5::text[])"
	    " AS u(s, m) ON CONFLICT (service, subscription, message_id) DO UPDATE SET"
	    " at = consumed.at RETURNING subscription, message_id, replica", 5, v);
	free(at);
	free(a1);
	free(a2);
}

static void
dedup_done(struct dedup *dd)
{
	PGresult *res = pgc_nresults(dd->pg) ? pgc_result(dd->pg, 0) : NULL;
	struct dedup_req *r, *next;
	int i;

	if (pgc_error(dd->pg) || !res) {
		log_warn("shared dedup: claims not made, tried again",
		    LOG_STR("error", pgc_error(dd->pg)));
		dedup_requeue(dd);
		pgc_down(dd->pg, pgc_error(dd->pg) ? pgc_error(dd->pg) : "no result");
		return;
	}
	pgc_reset_backoff(dd->pg);
	for (r = dd->sent; r; r = next) {
		enum dedup_claim c = DEDUP_MINE;
		next = r->next;
		for (i = 0; i < PQntuples(res); i++)
			if (strcmp(PQgetvalue(res, i, 0), r->sub) == 0 &&
			    strcmp(PQgetvalue(res, i, 1), r->message_id) == 0) {
				c = strcmp(PQgetvalue(res, i, 2), dd->replica) == 0 ?
				    DEDUP_MINE : DEDUP_OTHER;
				break;
			}
		if (c == DEDUP_OTHER)
			log_debug("shared dedup: another replica has it", LOG_STR("subscription", r->sub),
			    LOG_STR("message_id", r->message_id));
		dedup_answer(r, c);
	}
	dd->sent = NULL;
	dd->state = DEDUP_IDLE;
	dedup_next(dd);
}

/* Claims older than the dedup window are forgotten, as the local inbox
 * forgets its records. Only in a sagad without sagas: with sagas, the
 * PostgreSQL saga store (pgs_expire) forgets every row of consumed, its
 * own and these claims alike, and owns their expiry. */
static void
dedup_expire(struct dedup *dd)
{
	char *before = xasprintf("%.17g", util_now() - dd->window);
	const char *v[2] = { dd->service, before };

	dd->expire_due = 0;
	dd->state = DEDUP_EXPIRE;
	pgc_send_params(dd->pg, "DELETE FROM consumed WHERE service = $1 AND at < $2"
	    " AND subscription <> '_sagas'", 2, v);
	free(before);
}

static void
dedup_next(struct dedup *dd)
{
	if (dd->state != DEDUP_IDLE)
		return;
	if (dd->queue)
		dedup_send(dd);
	else if (dd->expire_due)
		dedup_expire(dd);
}

static void
dedup_expire_cb(evutil_socket_t fd, short what, void *arg)
{
	struct dedup *dd = arg;

	(void)fd;
	(void)what;
	dd->expire_due = 1;
	dedup_next(dd);
}

static void
dedup_start_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	dedup_next(arg);
}

/* ---- the connection ---- */

static void
dedup_connecting(void *arg)
{
	(void)arg;
}

/* The session's search_path is the saga store's schema (pgconn.c). */
static void
dedup_connected(void *arg)
{
	struct dedup *dd = arg;

	dd->state = DEDUP_IDLE;
	dedup_next(dd);
}

static void
dedup_pg_done(void *arg)
{
	struct dedup *dd = arg;

	if (dd->state == DEDUP_SENT)
		dedup_done(dd);
	else if (dd->state == DEDUP_EXPIRE) {
		if (pgc_error(dd->pg))
			log_warn("shared dedup: old claims not forgotten",
			    LOG_STR("error", pgc_error(dd->pg)));
		dd->state = DEDUP_IDLE;
		dedup_next(dd);
	}
}

static void
dedup_notified(void *arg)
{
	(void)arg;
}

static void
dedup_down(void *arg, const char *why, double retry_in)
{
	struct dedup *dd = arg;

	if (dd->state != DEDUP_DOWN)
		log_warn("shared dedup: PostgreSQL connection lost; claims wait",
		    LOG_STR("error", why), LOG_DBL("retry_in", retry_in));
	dd->state = DEDUP_DOWN;
	dedup_requeue(dd);
}

static const struct pgc_hooks dedup_hooks = {
	dedup_connecting, dedup_connected, dedup_pg_done, dedup_notified, dedup_down
};

/* ---- life ---- */

struct dedup *
dedup_new(struct event_base *base, const struct sagad_conf *conf, const char *replica_id)
{
	struct dedup *dd = xcalloc(1, sizeof *dd);
	struct timeval minute = { 60, 0 };

	dd->base = base;
	dd->replica = xstrdup(replica_id);
	dd->conninfo = xstrdup(conf->saga_store.conninfo);
	dd->schema = xstrdup(conf->saga_store.schema);
	dd->service = xstrdup(conf->service);
	dd->tail = &dd->queue;
	dd->cfg.conninfo = dd->conninfo;
	dd->cfg.connect_timeout = 5;
	dd->cfg.query_timeout = 30;
	dd->cfg.retry_initial = 0.2;
	dd->cfg.retry_max = 5;
	dd->cfg.schema = dd->schema;
	dd->cfg.server_limits = 1;
	dd->pg = pgc_new(base, &dd->cfg, &dedup_hooks, dd);
	dd->start_ev = event_new(base, -1, 0, dedup_start_cb, dd);
	dd->window = conf->store.dedup_window;
	if (!conf->n_sagas) {
		dd->expire_ev = event_new(base, -1, EV_PERSIST, dedup_expire_cb, dd);
		event_add(dd->expire_ev, &minute);
	}
	pgc_start(dd->pg);
	return dd;
}

void
dedup_claim(struct dedup *dd, const char *sub, const char *message_id, dedup_claim_fn *fn,
    void *arg)
{
	struct dedup_req *r = xcalloc(1, sizeof *r);

	r->sub = xstrdup(sub);
	r->message_id = xstrdup(message_id);
	r->fn = fn;
	r->arg = arg;
	*dd->tail = r;
	dd->tail = &r->next;
	/* At the end of this loop turn: the claims of one read, one batch. */
	if (dd->state == DEDUP_IDLE)
		event_active(dd->start_ev, 0, 0);
}

const char *
dedup_replica(const struct dedup *dd)
{
	return dd->replica;
}

void
dedup_free(struct dedup *dd)
{
	struct dedup_req *r, *next;

	if (!dd)
		return;
	pgc_free(dd->pg);
	dedup_requeue(dd);
	for (r = dd->queue; r; r = next) {
		next = r->next;
		dedup_answer(r, DEDUP_CANCELLED);
	}
	event_free(dd->start_ev);
	if (dd->expire_ev)
		event_free(dd->expire_ev);
	free(dd->conninfo);
	free(dd->schema);
	free(dd->service);
	free(dd->replica);
	free(dd);
}
