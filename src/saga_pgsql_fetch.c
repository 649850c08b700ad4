/*
 * The PostgreSQL saga store's round trip 1 (REPLICAS.md: One batch, one
 * transaction, two round trips): the statements that open a batch's
 * transaction, record its consumed message ids, lock its instances in
 * one order and read what its jobs asked for (early events, due timers,
 * history, listings, counts), sent as one pipeline; saga_pgsql_batch.c
 * reads their results.
 */
#include "saga_pgsql.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"
#include "xmalloc.h"

static int
pgs_fetch_add(struct pgs_fetch *f, const char *sql, int n, ...)
{
	va_list ap;
	int i, k = f->n++;

	va_start(ap, n);
	for (i = 0; i < n; i++) {
		f->own[k][i] = va_arg(ap, char *);
		f->v[k][i] = f->own[k][i];
	}
	va_end(ap);
	f->st[k].sql = sql;
	f->st[k].n = n;
	f->st[k].values = f->v[k];
	return k;
}

static char *
pgs_dup_or_null(const char *s)
{
	return s ? xstrdup(s) : NULL;
}

static int
pgs_strcmp_p(const void *x, const void *y)
{
	return strcmp(*(char *const *)x, *(char *const *)y);
}

/* The consumed ids in one order (strcmp) for every replica: the INSERT
 * takes their row locks in the order given, and two replicas' batches
 * holding overlapping ids in different orders could deadlock (40P01).
 * The jobs find theirs again by value (pgs_mark_duplicates). */
void
pgs_sort_ids(char **v, size_t n)
{
	if (n > 1)
		qsort(v, n, sizeof *v, pgs_strcmp_p);
}

void
pgs_fetch_send(struct saga_backend *b)
{
	struct pgs_fetch *f = xcalloc(1, sizeof *f);
	char *consumed[PGS_BATCH_MAX];
	size_t nconsumed = 0, i;
	struct pgs_job *p;
	int want = 0;

	pgs_cache_reset(b);
	for (p = b->batch; p; p = p->next) {
		for (i = 0; i < p->j.n_ids; i++)
			*XPUSH(b->ids, b->nids, b->capids) = xstrdup(p->j.ids[i]);
		if (p->consumed)
			consumed[nconsumed++] = p->consumed;
		want |= (int)p->j.want;
	}
	pgs_sort_ids(consumed, nconsumed);
	f->at_consumed = f->at_insts = f->at_timers = f->at_history = f->at_list = -1;
	f->at_early = -1;
	f->at_counts = -1;
	pgs_fetch_add(f, "BEGIN", 0);
	if (nconsumed)
		f->at_consumed = pgs_fetch_add(f, "INSERT INTO consumed (service, subscription,"
		    " message_id, replica, delivered, at) SELECT $1, '_sagas', x, $2, true, $3"
		    " FROM unnest($4::text[]) AS x ON CONFLICT DO NOTHING RETURNING message_id", 4,
		    xstrdup(b->service), xstrdup(b->replica), xasprintf("%.17g", util_now()),
		    pgs_text_array(consumed, nconsumed));
	/* The saga ids locked whether or not their instance exists yet: a
	 * start and an event that overtook it, on two replicas, are applied
	 * one after the other (the early table). In one order: no deadlock. */
	if (b->nids)
		pgs_fetch_add(f, "SELECT pg_advisory_xact_lock(k) FROM (SELECT DISTINCT"
		    " hashtextextended($1 || chr(31) || x, 0) AS k FROM unnest($2::text[]) AS x"
		    " ORDER BY k) AS s", 2, xstrdup(b->service), pgs_text_array(b->ids, b->nids));
	if (b->nids)
		f->at_insts = pgs_fetch_add(f, "SELECT saga, id, state, started_at, updated_at,"
		    " coalesce(finished_at, 0), data FROM instances WHERE service = $1"
		    " AND id = ANY($2::text[]) ORDER BY saga, id FOR UPDATE", 2,
		    xstrdup(b->service), pgs_text_array(b->ids, b->nids));
	if (nconsumed && b->nids)
		f->at_early = pgs_fetch_add(f, "SELECT " PGS_EARLY_COLUMNS " FROM early"
		    " WHERE service = $1 AND saga_id = ANY($2::text[]) ORDER BY at", 2,
		    xstrdup(b->service), pgs_text_array(b->ids, b->nids));
	/* The timer row is locked too, not only its instance: a replica
	 * whose snapshot still sees a timer another one fired and deleted
	 * would lock the instance once it is free and fire the timer again;
	 * locking t, its re-check finds the row gone and skips it. Locks,
	 * not a DELETE ... RETURNING: a batch that rolls back leaves its
	 * timers due for the next one. */
	if (want & SAGA_WANT_TIMERS)
		f->at_timers = pgs_fetch_add(f, "SELECT t.kind, t.step, i.saga, i.id, i.state,"
		    " i.started_at, i.updated_at, coalesce(i.finished_at, 0), i.data FROM timers t"
		    " JOIN instances i ON i.service = t.service AND i.saga = t.saga AND i.id = t.id"
		    " WHERE t.service = $1 AND t.due <= $2 ORDER BY t.due LIMIT 256"
		    " FOR UPDATE OF t, i SKIP LOCKED", 2,
		    xstrdup(b->service), xasprintf("%.17g", util_now()));
	if ((want & SAGA_WANT_HISTORY) && b->nids)
		f->at_history = pgs_fetch_add(f, "SELECT saga, id, at, dir, what, coalesce(step, ''),"
		    " coalesce(message_id, ''), coalesce(detail, '') FROM history WHERE service = $1"
		    " AND id = ANY($2::text[]) ORDER BY saga, id, seq", 2,
		    xstrdup(b->service), pgs_text_array(b->ids, b->nids));
	f->at_list = f->n;
	for (p = b->batch; p; p = p->next)
		if (p->j.want & SAGA_WANT_LIST)
			pgs_fetch_add(f, "SELECT saga, id, state, started_at, updated_at,"
			    " coalesce(finished_at, 0), data FROM instances WHERE service = $1"
			    " AND ($2::text IS NULL OR saga = $2) AND ($3::int < 0 OR state = $3)"
			    " AND ($5::text IS NULL OR (started_at, saga, id) <"
			    " ($6::double precision, $5::text, $7::text))"
			    " ORDER BY started_at DESC, saga DESC, id DESC LIMIT $4", 7,
			    xstrdup(b->service), pgs_dup_or_null(p->j.list.saga),
			    xasprintf("%d", p->j.list.state), xasprintf("%zu", p->j.list.limit),
			    pgs_dup_or_null(p->j.list.after_saga),
			    xasprintf("%.17g", p->j.list.after_at),
			    pgs_dup_or_null(p->j.list.after_id));
	/* The counts scan every instance of the service (tens of ms on a big
	 * table): not in a batch of saga steps, whose acks would wait for
	 * them, unless they are overdue (a replica never idle). */
	if (b->want_counts && (!b->nbatch || util_mono() - b->counts_wanted > 2 * PGS_TICK))
		f->at_counts = pgs_fetch_add(f, "SELECT saga, state, count(*) FROM instances"
		    " WHERE service = $1 GROUP BY saga, state", 1, xstrdup(b->service));
	b->state = PGS_FETCH;
	b->fetch = f;
	pgc_send_pipeline(b->pg, f->st, f->n);
}

void
pgs_fetch_free(struct saga_backend *b)
{
	struct pgs_fetch *f = b->fetch;
	int k, i;

	if (!f)
		return;
	for (k = 0; k < f->n; k++)
		for (i = 0; i < 8; i++)
			free(f->own[k][i]);
	free(f);
	b->fetch = NULL;
}
