/*
 * The saga store's public calls (saga_store.h), forwarded to the backend
 * that holds the records (saga_store_backend.h). Nothing here knows a
 * database: the engine's calls stay the same whichever backend runs.
 */
#include "saga_store_backend.h"

#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "store.h"
#include "xmalloc.h"

struct saga_store {
	const struct saga_store_ops *ops;
	struct saga_backend *b;
};

void
saga_rec_clear(struct saga_rec *r)
{
	free(r->saga);
	free(r->id);
	free(r->data);
	memset(r, 0, sizeof *r);
}

struct saga_store *
saga_store_new(const struct saga_store_ops *ops, struct saga_backend *b)
{
	struct saga_store *ss = xcalloc(1, sizeof *ss);

	ss->ops = ops;
	ss->b = b;
	return ss;
}

/* SQLite unless the configuration names PostgreSQL (saga_store.backend). */
struct saga_store *
saga_store_open(struct event_base *base, struct store *st, const struct sagad_conf *conf,
    struct otel *otel, char **err)
{
	struct saga_backend *b;

	if (conf->saga_store.backend == SAGA_BACKEND_PGSQL) {
		b = saga_store_pgsql_open(base, conf, store_replica_id(st), otel, err);
		return b ? saga_store_new(&saga_store_pgsql_ops, b) : NULL;
	}
	b = saga_store_sqlite_open(st, err);
	return b ? saga_store_new(&saga_store_sqlite_ops, b) : NULL;
}

void
saga_store_close(struct saga_store *ss)
{
	if (!ss)
		return;
	ss->ops->close(ss->b);
	free(ss);
}

/* ---- batches ---- */

void
saga_store_batch_begin(struct saga_store *ss)
{
	if (ss->ops->batch_begin)
		ss->ops->batch_begin(ss->b);
}

int
saga_store_batch_end(struct saga_store *ss)
{
	return ss->ops->batch_end ? ss->ops->batch_end(ss->b) : 0;
}

/* ---- jobs ---- */

void
saga_store_submit(struct saga_store *ss, const struct saga_job *job)
{
	int r;

	if (ss->ops->submit) {
		ss->ops->submit(ss->b, job);
		return;
	}
	saga_store_batch_begin(ss);
	job->run(job->arg);
	r = saga_store_batch_end(ss);
	job->done(job->arg, r < 0 ? SAGA_JOB_RETRY : SAGA_JOB_DONE);
}

int
saga_store_shared(const struct saga_store *ss)
{
	return ss->ops->shared;
}

void
saga_store_on_batch(struct saga_store *ss, saga_batch_fn *fn, void *arg)
{
	if (ss->ops->on_batch)
		ss->ops->on_batch(ss->b, fn, arg);
}

void
saga_store_metrics(struct saga_store *ss, struct evbuffer *out)
{
	if (ss->ops->metrics)
		ss->ops->metrics(ss->b, out);
}

/* ---- instances ---- */

int
saga_store_get(struct saga_store *ss, const char *saga, const char *id, struct saga_rec *r)
{
	return ss->ops->get(ss->b, saga, id, r);
}

int
saga_store_get_row(struct saga_store *ss, int64_t row, struct saga_rec *r)
{
	return ss->ops->get_row(ss->b, row, r);
}

size_t
saga_store_by_id(struct saga_store *ss, const char *id, int64_t *rows, size_t max)
{
	return ss->ops->by_id(ss->b, id, rows, max);
}

int
saga_store_defs(struct saga_store *ss, const struct saga_def_rec *put, size_t n,
    void (*fn)(void *arg, const struct saga_def_rec *d), void *arg)
{
	return ss->ops->defs ? ss->ops->defs(ss->b, put, n, fn, arg) : 0;
}

int
saga_store_list(struct saga_store *ss, const struct saga_list_page *page,
    saga_rec_fn *fn, void *arg)
{
	return ss->ops->list(ss->b, page, fn, arg);
}

int
saga_store_counts(struct saga_store *ss, saga_rec_fn *fn, void *arg)
{
	return ss->ops->counts(ss->b, fn, arg);
}

int
saga_store_history(struct saga_store *ss, int64_t row,
    void (*fn)(void *arg, const struct saga_hist *h), void *arg)
{
	return ss->ops->history(ss->b, row, fn, arg);
}

int
saga_store_insert(struct saga_store *ss, struct saga_rec *r)
{
	return ss->ops->insert(ss->b, r);
}

int
saga_store_update(struct saga_store *ss, const struct saga_rec *r)
{
	return ss->ops->update(ss->b, r);
}

int
saga_store_log(struct saga_store *ss, int64_t row, double at, const char *dir,
    const char *what, const char *step, const char *message_id, const char *detail)
{
	return ss->ops->log(ss->b, row, at, dir, what, step, message_id, detail);
}

int
saga_store_send(struct saga_store *ss, struct msg *m, unsigned flags)
{
	return ss->ops->send(ss->b, m, flags);
}

void
saga_store_delivered(struct saga_store *ss, const char *saga_id, const char *message_id)
{
	if (ss->ops->delivered)
		ss->ops->delivered(ss->b, saga_id, message_id);
}

/* ---- early events ---- */

int
saga_store_keep_early(struct saga_store *ss, const struct msg *m, const char *saga,
    const char *saga_id)
{
	return ss->ops->keep_early ? ss->ops->keep_early(ss->b, m, saga, saga_id) : -1;
}

void
saga_store_early_each(struct saga_store *ss, const char *saga, const char *saga_id,
    void (*fn)(void *arg, const struct msg *m), void *arg)
{
	if (ss->ops->early_each)
		ss->ops->early_each(ss->b, saga, saga_id, fn, arg);
}

/* ---- timers ---- */

int
saga_store_timer_set(struct saga_store *ss, int64_t row, int kind, int step, double due)
{
	return ss->ops->timer_set(ss->b, row, kind, step, due);
}

int
saga_store_timer_del(struct saga_store *ss, int64_t row, int kind, int step)
{
	return ss->ops->timer_del(ss->b, row, kind, step);
}

int
saga_store_timer_del_all(struct saga_store *ss, int64_t row)
{
	return ss->ops->timer_del_all(ss->b, row);
}

int
saga_store_timer_spent(struct saga_store *ss, int64_t id)
{
	return ss->ops->timer_spent(ss->b, id);
}

double
saga_store_timer_next(struct saga_store *ss)
{
	return ss->ops->timer_next(ss->b);
}

size_t
saga_store_timers_due(struct saga_store *ss, double now, struct saga_due *out, size_t max)
{
	return ss->ops->timers_due(ss->b, now, out, max);
}

/* ---- retention ---- */

int
saga_store_expire(struct saga_store *ss, double before, unsigned states, int batch,
    saga_rec_fn *fn, void *arg)
{
	return ss->ops->expire(ss->b, before, states, batch, fn, arg);
}
