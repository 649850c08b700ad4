/*
 * The saga store on PostgreSQL, shared by the replicas of a service
 * (REPLICAS.md; sagad(8) "Running replicas"): the operations of
 * saga_store_backend.h. The engine runs only inside jobs
 * (saga_pgsql_batch.c), so every read is answered from the batch's cache
 * (the instances fetched and locked for the batch's saga ids, the due
 * timers it claimed, the history and listings it asked for), and every
 * write becomes a statement of the batch's commit round trip.
 */
#include "saga_pgsql.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "conf.h"
#include "log.h"
#include "msg.h"
#include "props.h"
#include "saga_pg_relay.h"
#include "saga_pg_schema.h"
#include "util.h"
#include "xmalloc.h"

/* ---- statements ---- */

struct pgs_stmt *
pgs_stmt_add(struct pgs_stmts *a, const char *sql)
{
	struct pgs_stmt *s = XPUSH(a->v, a->n, a->cap);

	memset(s, 0, sizeof *s);
	s->sql = sql;
	return s;
}

static void
pgs_param_own(struct pgs_stmt *s, char *v, int len, int fmt)
{
	if (s->n == PGS_MAXPARAM) {
		log_error("saga store: too many parameters (a bug)", LOG_STR("sql", s->sql));
		free(v);
		return;
	}
	s->v[s->n] = v;
	s->len[s->n] = len;
	s->fmt[s->n] = fmt;
	s->n++;
}

void
pgs_param(struct pgs_stmt *s, const char *v)
{
	pgs_param_own(s, v ? xstrdup(v) : NULL, 0, 0);
}

void
pgs_param_bin(struct pgs_stmt *s, const char *v, size_t len)
{
	char *c = xmalloc(len ? len : 1);

	memcpy(c, v, len);
	pgs_param_own(s, c, (int)len, 1);
}

void
pgs_param_dbl(struct pgs_stmt *s, double v)
{
	pgs_param_own(s, xasprintf("%.17g", v), 0, 0);
}

void
pgs_param_int(struct pgs_stmt *s, int64_t v)
{
	pgs_param_own(s, xasprintf("%lld", (long long)v), 0, 0);
}

void
pgs_stmts_clear(struct pgs_stmts *a)
{
	size_t i;
	int k;

	for (i = 0; i < a->n; i++)
		for (k = 0; k < a->v[i].n; k++)
			free(a->v[i].v[k]);
	a->n = 0;
}

char *
pgs_text_array(char *const *v, size_t n)
{
	size_t len = 3, i;
	const char *p;
	char *out, *o;

	for (i = 0; i < n; i++)
		len += 2 * strlen(v[i]) + 3;
	o = out = xmalloc(len);
	*o++ = '{';
	for (i = 0; i < n; i++) {
		if (i)
			*o++ = ',';
		*o++ = '"';
		for (p = v[i]; *p; p++) {
			if (*p == '"' || *p == '\\')
				*o++ = '\\';
			*o++ = *p;
		}
		*o++ = '"';
	}
	*o++ = '}';
	*o = '\0';
	return out;
}

/* ---- the batch's cache ---- */

void
pgs_cache_reset(struct saga_backend *b)
{
	size_t i;

	for (i = 0; i < b->ninsts; i++)
		saga_rec_clear(&b->insts[i].rec);
	b->ninsts = 0;
	b->ndues = 0;
	for (i = 0; i < b->nids; i++)
		free(b->ids[i]);
	b->nids = 0;
	PQclear(b->history);
	b->history = NULL;
	pgs_early_reset(b);
}

static struct pgs_inst *
pgs_find(struct saga_backend *b, const char *saga, const char *id)
{
	size_t i;

	for (i = 0; i < b->ninsts; i++)
		if (strcmp(b->insts[i].rec.id, id) == 0 && strcmp(b->insts[i].rec.saga, saga) == 0)
			return &b->insts[i];
	return NULL;
}

static struct pgs_inst *
pgs_at(struct saga_backend *b, int64_t row)
{
	if (row < 1 || (size_t)row > b->ninsts)
		return NULL;
	return &b->insts[row - 1];
}

/* A row of an instance query (columns saga, id, state, started_at,
 * updated_at, finished_at, data from `at`) as a record. */
static void
pgs_rec_from(const PGresult *res, int i, int at, struct saga_rec *r)
{
	size_t n = 0;
	unsigned char *data = PQunescapeBytea((const unsigned char *)PQgetvalue(res, i, at + 6), &n);

	memset(r, 0, sizeof *r);
	r->saga = xstrdup(PQgetvalue(res, i, at));
	r->id = xstrdup(PQgetvalue(res, i, at + 1));
	r->state = atoi(PQgetvalue(res, i, at + 2));
	r->started_at = strtod(PQgetvalue(res, i, at + 3), NULL);
	r->updated_at = strtod(PQgetvalue(res, i, at + 4), NULL);
	r->finished_at = strtod(PQgetvalue(res, i, at + 5), NULL);
	r->data = xmalloc(n + 1);
	if (data)
		memcpy(r->data, data, n);
	r->data[n] = '\0';
	r->data_len = data ? n : 0;
	PQfreemem(data);
}

int64_t
pgs_cache_add(struct saga_backend *b, const PGresult *res, int i, int at)
{
	struct pgs_inst *in = pgs_find(b, PQgetvalue(res, i, at), PQgetvalue(res, i, at + 1));

	if (!in) {
		in = XPUSH(b->insts, b->ninsts, b->capinsts);
		memset(in, 0, sizeof *in);
		pgs_rec_from(res, i, at, &in->rec);
		in->rec.row = (int64_t)b->ninsts;
		in->loaded = in->rec.state;
	}
	return in->rec.row;
}

static void
pgs_rec_copy(const struct saga_rec *from, struct saga_rec *to)
{
	*to = *from;
	to->saga = xstrdup(from->saga);
	to->id = xstrdup(from->id);
	to->data = xmalloc(from->data_len + 1);
	memcpy(to->data, from->data, from->data_len);
	to->data[from->data_len] = '\0';
}

/* Only the saga ids the batch fetched can be answered: another one would
 * be read as absent, wrongly. */
static int
pgs_fetched(struct saga_backend *b, const char *id)
{
	size_t i;

	for (i = 0; i < b->nids; i++)
		if (strcmp(b->ids[i], id) == 0)
			return 1;
	log_error("saga store: a saga id the batch did not fetch (a bug)", LOG_STR("id", id));
	return 0;
}

/* ---- reads ---- */

static int
pgs_get(struct saga_backend *b, const char *saga, const char *id, struct saga_rec *r)
{
	struct pgs_inst *in;

	memset(r, 0, sizeof *r);
	if (!pgs_fetched(b, id))
		return -1;
	in = pgs_find(b, saga, id);
	if (!in)
		return 0;
	pgs_rec_copy(&in->rec, r);
	return 1;
}

static int
pgs_get_row(struct saga_backend *b, int64_t row, struct saga_rec *r)
{
	struct pgs_inst *in = pgs_at(b, row);

	memset(r, 0, sizeof *r);
	if (!in)
		return 0;
	pgs_rec_copy(&in->rec, r);
	return 1;
}

static size_t
pgs_by_id(struct saga_backend *b, const char *id, int64_t *rows, size_t max)
{
	size_t i, n = 0;

	if (!pgs_fetched(b, id))
		return 0;
	for (i = 0; i < b->ninsts && n < max; i++)
		if (strcmp(b->insts[i].rec.id, id) == 0)
			rows[n++] = b->insts[i].rec.row;
	return n;
}

static int
pgs_list(struct saga_backend *b, const struct saga_list_page *page, saga_rec_fn *fn,
    void *arg)
{
	PGresult *res = b->cur ? b->cur->list : NULL;
	int i;

	(void)page;	/* the job's own query applied it */
	if (!res)
		return -1;
	for (i = 0; i < PQntuples(res); i++) {
		struct saga_rec r;
		pgs_rec_from(res, i, 0, &r);
		fn(arg, &r);
		saga_rec_clear(&r);
	}
	return 0;
}

static int
pgs_defs(struct saga_backend *b, const struct saga_def_rec *put, size_t n,
    void (*fn)(void *arg, const struct saga_def_rec *d), void *arg)
{
	char *err = NULL;
	int r = saga_pg_defs(b->conninfo, b->schema, b->service, put, n, fn, arg, &err);

	if (r < 0)
		log_error("saga store: cannot keep the saga definitions",
		    LOG_STR("error", err ? err : ""));
	free(err);
	return r;
}

/* ---- counts: the last refresh plus this replica's changes since ---- */

static int64_t *
pgs_delta(struct saga_backend *b, const char *saga, int state)
{
	struct pgs_count *c;
	size_t i;

	for (i = 0; i < b->ndeltas; i++)
		if (b->deltas[i].state == state && strcmp(b->deltas[i].saga, saga) == 0)
			return &b->deltas[i].n;
	c = XPUSH(b->deltas, b->ndeltas, b->capdeltas);
	c->saga = xstrdup(saga);
	c->state = state;
	c->n = 0;
	return &c->n;
}

void
pgs_counts_commit(struct saga_backend *b)
{
	size_t i;

	for (i = 0; i < b->ninsts; i++) {
		struct pgs_inst *in = &b->insts[i];
		if (in->loaded == in->rec.state)
			continue;
		if (in->loaded >= 0)
			(*pgs_delta(b, in->rec.saga, in->loaded))--;
		(*pgs_delta(b, in->rec.saga, in->rec.state))++;
		in->loaded = in->rec.state;
	}
}

void
pgs_counts_fetched(struct saga_backend *b, PGresult *res)
{
	size_t i;

	PQclear(b->counts);
	b->counts = res;
	for (i = 0; i < b->ndeltas; i++)
		b->deltas[i].n = 0;
}

static int
pgs_counts(struct saga_backend *b, saga_rec_fn *fn, void *arg)
{
	struct saga_rec r;
	size_t i;
	int k;

	/* every (saga, state) seen in either */
	for (k = 0; b->counts && k < PQntuples(b->counts); k++)
		pgs_delta(b, PQgetvalue(b->counts, k, 0), atoi(PQgetvalue(b->counts, k, 1)));
	for (i = 0; i < b->ndeltas; i++) {
		memset(&r, 0, sizeof r);
		r.saga = b->deltas[i].saga;
		r.state = b->deltas[i].state;
		r.row = b->deltas[i].n;
		for (k = 0; b->counts && k < PQntuples(b->counts); k++)
			if (atoi(PQgetvalue(b->counts, k, 1)) == r.state &&
			    strcmp(PQgetvalue(b->counts, k, 0), r.saga) == 0)
				r.row += strtoll(PQgetvalue(b->counts, k, 2), NULL, 10);
		/* Another replica may have moved what this one counts out
		 * since the last count: never below zero. */
		if (r.row < 0)
			r.row = 0;
		fn(arg, &r);
	}
	return 0;
}

static int
pgs_history(struct saga_backend *b, int64_t row, void (*fn)(void *arg, const struct saga_hist *h),
    void *arg)
{
	struct pgs_inst *in = pgs_at(b, row);
	int i;

	if (!in || !b->history)
		return -1;
	for (i = 0; i < PQntuples(b->history); i++) {
		struct saga_hist h;
		if (strcmp(PQgetvalue(b->history, i, 0), in->rec.saga) != 0 ||
		    strcmp(PQgetvalue(b->history, i, 1), in->rec.id) != 0)
			continue;
		h.at = strtod(PQgetvalue(b->history, i, 2), NULL);
		h.dir = PQgetvalue(b->history, i, 3);
		h.what = PQgetvalue(b->history, i, 4);
		h.step = PQgetvalue(b->history, i, 5);
		h.message_id = PQgetvalue(b->history, i, 6);
		h.detail = PQgetvalue(b->history, i, 7);
		fn(arg, &h);
	}
	return 0;
}

/* ---- writes ---- */

static int
pgs_insert(struct saga_backend *b, struct saga_rec *r)
{
	struct pgs_inst *in;

	if (!pgs_fetched(b, r->id))
		return -1;
	in = XPUSH(b->insts, b->ninsts, b->capinsts);
	memset(in, 0, sizeof *in);
	r->row = (int64_t)b->ninsts;
	pgs_rec_copy(r, &in->rec);
	in->fresh = in->dirty = 1;
	in->loaded = -1;
	return 0;
}

static int
pgs_update(struct saga_backend *b, const struct saga_rec *r)
{
	struct pgs_inst *in = pgs_at(b, r->row);
	int64_t row = r->row;

	if (!in)
		return -1;
	free(in->rec.data);
	in->rec.state = r->state;
	in->rec.updated_at = r->updated_at;
	in->rec.finished_at = r->finished_at;
	in->rec.data = xmalloc(r->data_len + 1);
	memcpy(in->rec.data, r->data, r->data_len);
	in->rec.data[r->data_len] = '\0';
	in->rec.data_len = r->data_len;
	in->rec.row = row;
	in->dirty = 1;
	return 0;
}

/* The instances' own rows go out at the commit, once each (the last
 * state of the batch), ahead of what refers to them. */
static const char pgs_sql_insert[] =
    "INSERT INTO instances (service, saga, id, state, started_at, updated_at, finished_at, data)"
    " VALUES ($1, $2, $3, $4, $5, $6, NULLIF($7::double precision, 0), $8)";
static const char pgs_sql_update[] =
    "UPDATE instances SET state = $4, updated_at = $5, finished_at = NULLIF($6::double precision, 0),"
    " data = $7 WHERE service = $1 AND saga = $2 AND id = $3";

void
pgs_flush_instances(struct saga_backend *b)
{
	size_t i;

	for (i = 0; i < b->ninsts; i++) {
		struct pgs_inst *in = &b->insts[i];
		struct pgs_stmt *s;
		if (!in->dirty)
			continue;
		s = pgs_stmt_add(&b->writes, in->fresh ? pgs_sql_insert : pgs_sql_update);
		pgs_param(s, b->service);
		pgs_param(s, in->rec.saga);
		pgs_param(s, in->rec.id);
		pgs_param_int(s, in->rec.state);
		if (in->fresh)
			pgs_param_dbl(s, in->rec.started_at);
		pgs_param_dbl(s, in->rec.updated_at);
		pgs_param_dbl(s, in->rec.finished_at);
		pgs_param_bin(s, in->rec.data, in->rec.data_len);
		in->dirty = in->fresh = 0;
	}
}

static int
pgs_log(struct saga_backend *b, int64_t row, double at, const char *dir, const char *what,
    const char *step, const char *message_id, const char *detail)
{
	struct pgs_inst *in = pgs_at(b, row);
	struct pgs_stmt *s;

	if (!in)
		return -1;
	s = pgs_stmt_add(&b->writes, "INSERT INTO history (service, saga, id, at, dir, what, step,"
	    " message_id, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)");
	pgs_param(s, b->service);
	pgs_param(s, in->rec.saga);
	pgs_param(s, in->rec.id);
	pgs_param_dbl(s, at);
	pgs_param(s, dir);
	pgs_param(s, what);
	pgs_param(s, step);
	pgs_param(s, message_id);
	pgs_param(s, detail);
	return 0;
}

/*
 * Claimed by this replica in the same transaction, and handed to its
 * relay after the commit (pgs_hand_all), unless an earlier row of the
 * same saga is in the table claimed by another replica or by none: then
 * the row is left unclaimed, and a claim takes it after that one, in
 * order (saga_pg_relay.h). The saga's advisory lock, held by this
 * transaction, keeps other batches from adding rows meanwhile. Another
 * replica takes a claimed row over only after relay_grace. "alone": no
 * earlier row of the saga at all, so that the relay may publish it even
 * while a claim is in flight (none can bring a row to go before it).
 */
static const char pgs_sql_outbox[] =
    "WITH c AS (SELECT EXISTS (SELECT 1 FROM outbox o WHERE o.service = $1::text"
    "   AND o.saga_id = $7::text AND o.claimed_by IS DISTINCT FROM $9::text) AS other,"
    "   NOT EXISTS (SELECT 1 FROM outbox o WHERE o.service = $1::text"
    "   AND o.saga_id = $7::text) AS alone),"
    " i AS (INSERT INTO outbox (service, message_id, exchange, routing_key, props, body,"
    "   saga_id, created_at, claimed_by, claimed_at)"
    "   SELECT $1::text, $2::text, $3::text, $4::text, $5::bytea, $6::bytea, $7::text,"
    "   $8::float8, CASE WHEN c.other THEN NULL ELSE $9::text END,"
    "   CASE WHEN c.other THEN NULL ELSE $8::float8 END FROM c"
    "   RETURNING seq, claimed_by IS NOT NULL AS mine)"
    " SELECT i.seq, i.mine, c.alone FROM i, c";

/*
 * The saga's rows up to the replied message's, whoever holds them: the
 * relay, told of the seqs once committed (a hand without a message),
 * drops them with no delete of its own (it waits SAGA_PG_RELAY_LINGER for
 * this). SKIP LOCKED: a row its relay is deleting now is left to it, and
 * the batch never waits on a relay (then the INSERT after it leaves its
 * row to a claim, as before). min(seq): a message sent again has one id
 * for two rows; only the first surely went.
 */
static void
pgs_delivered(struct saga_backend *b, const char *saga_id, const char *message_id)
{
	struct pgs_stmt *s = pgs_stmt_add(&b->writes,
	    "DELETE FROM outbox WHERE service = $1 AND saga_id = $2 AND seq IN (SELECT seq"
	    " FROM outbox WHERE service = $1 AND saga_id = $2 AND seq <= (SELECT min(seq) FROM outbox"
	    " WHERE service = $1 AND saga_id = $2 AND message_id = $3)"
	    " FOR UPDATE SKIP LOCKED) RETURNING seq");
	struct pgs_hand *h;

	pgs_param(s, b->service);
	pgs_param(s, saga_id);
	pgs_param(s, message_id);
	h = XPUSH(b->hands, b->nhands, b->caphands);
	h->stmt = b->writes.n - 1;
	h->m = NULL;
}

static int
pgs_send(struct saga_backend *b, struct msg *m, unsigned flags)
{
	struct pgs_stmt *s = pgs_stmt_add(&b->writes, pgs_sql_outbox);
	struct pgs_hand *h;
	char *props = NULL;
	size_t plen = 0;

	(void)flags;	/* what may go out early is SQLite's concern */
	if (props_pack(&m->props, &props, &plen) < 0)
		return -1;
	pgs_param(s, b->service);
	pgs_param(s, m->message_id);
	pgs_param(s, m->exchange);
	pgs_param(s, m->routing_key);
	pgs_param_bin(s, props, plen);
	pgs_param_bin(s, m->body, m->body_len);
	pgs_param(s, m->props.correlation_id);
	pgs_param_dbl(s, util_now());
	pgs_param(s, b->replica);
	free(props);
	m->seq = 0;
	h = XPUSH(b->hands, b->nhands, b->caphands);
	h->stmt = b->writes.n - 1;
	h->m = saga_pg_relay_msg_copy(m);
	return 0;
}

static struct pgs_stmt *
pgs_timer_stmt(struct saga_backend *b, const char *sql, int64_t row)
{
	struct pgs_inst *in = pgs_at(b, row);
	struct pgs_stmt *s;

	if (!in)
		return NULL;
	s = pgs_stmt_add(&b->writes, sql);
	pgs_param(s, b->service);
	pgs_param(s, in->rec.saga);
	pgs_param(s, in->rec.id);
	return s;
}

static int
pgs_timer_set(struct saga_backend *b, int64_t row, int kind, int step, double due)
{
	struct pgs_stmt *s = pgs_timer_stmt(b, "INSERT INTO timers (service, saga, id, kind, step, due)"
	    " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (service, saga, id, kind, step)"
	    " DO UPDATE SET due = EXCLUDED.due", row);

	if (!s)
		return -1;
	pgs_param_int(s, kind);
	pgs_param_int(s, step);
	pgs_param_dbl(s, due);
	return 0;
}

static int
pgs_timer_del(struct saga_backend *b, int64_t row, int kind, int step)
{
	struct pgs_stmt *s = pgs_timer_stmt(b, "DELETE FROM timers WHERE service = $1 AND saga = $2"
	    " AND id = $3 AND kind = $4 AND step = $5", row);

	if (!s)
		return -1;
	pgs_param_int(s, kind);
	pgs_param_int(s, step);
	return 0;
}

static int
pgs_timer_del_all(struct saga_backend *b, int64_t row)
{
	return pgs_timer_stmt(b, "DELETE FROM timers WHERE service = $1 AND saga = $2 AND id = $3",
	    row) ? 0 : -1;
}

static int
pgs_timer_spent(struct saga_backend *b, int64_t id)
{
	struct pgs_due *d;

	if (id < 1 || (size_t)id > b->ndues)
		return -1;
	d = &b->dues[id - 1];
	return pgs_timer_del(b, d->row, d->kind, d->step);
}

/* Every replica looks for due timers once a second: a dead replica's
 * deadlines fire on the others. */
static double
pgs_timer_next(struct saga_backend *b)
{
	(void)b;
	return util_now() + 1;
}

static size_t
pgs_timers_due(struct saga_backend *b, double now, struct saga_due *out, size_t max)
{
	size_t i;

	(void)now;	/* the claim asked for those due at the batch's start */
	if (!b->cur || !(b->cur->j.want & SAGA_WANT_TIMERS))
		return 0;
	for (i = 0; i < b->ndues && i < max; i++) {
		out[i].id = (int64_t)i + 1;
		out[i].row = b->dues[i].row;
		out[i].kind = b->dues[i].kind;
		out[i].step = b->dues[i].step;
	}
	return i;
}

/* Retention: a statement of the next batch, not more than every ten
 * seconds (the engine asks every second); what it removes shows in the
 * next counts. */
static int
pgs_expire(struct saga_backend *b, double before, unsigned states, int batch, saga_rec_fn *fn,
    void *arg)
{
	struct pgs_stmt *s;
	char list[128] = "{";	/* every state bit 0..30: 85 bytes */
	int k;

	(void)fn;
	(void)arg;
	if (util_now() < b->expire_at)
		return 0;
	b->expire_at = util_now() + 10;
	for (k = 0; k < 31; k++)
		if (states & (1u << k))
			snprintf(list + strlen(list), sizeof list - strlen(list), "%s%d",
			    list[1] ? "," : "", k);
	strcat(list, "}");
	s = pgs_stmt_add(&b->loose, "WITH gone AS (DELETE FROM instances WHERE service = $1"
	    " AND (saga, id) IN (SELECT saga, id FROM instances WHERE service = $1"
	    " AND finished_at < $2 AND state = ANY($3::int[]) LIMIT $4 FOR UPDATE SKIP LOCKED)"
	    " RETURNING saga, id), h AS (DELETE FROM history x USING gone WHERE x.service = $1"
	    " AND x.saga = gone.saga AND x.id = gone.id) DELETE FROM timers x USING gone"
	    " WHERE x.service = $1 AND x.saga = gone.saga AND x.id = gone.id");
	pgs_param(s, b->service);
	pgs_param_dbl(s, before);
	pgs_param(s, list);
	pgs_param_int(s, batch);
	/* early events whose start never came: orphans */
	s = pgs_stmt_add(&b->loose, "DELETE FROM early WHERE service = $1 AND at < $2");
	pgs_param(s, b->service);
	pgs_param_dbl(s, util_now() - b->conf->saga_store.early_window);
	/* The owner of consumed's expiry, for every subscription: the saga
	 * messages' ids and shared dedup's claims (dedup.c forgets its claims
	 * itself only in a sagad without sagas, where this does not run). */
	s = pgs_stmt_add(&b->loose, "DELETE FROM consumed WHERE service = $1 AND at < $2");
	pgs_param(s, b->service);
	pgs_param_dbl(s, util_now() - b->conf->store.dedup_window);
	return 0;
}

/* ---- life ---- */

static void
pgs_submit(struct saga_backend *b, const struct saga_job *job)
{
	pgs_driver_submit(b, job);
}

static void
pgs_on_batch(struct saga_backend *b, saga_batch_fn *fn, void *arg)
{
	b->batch_fn = fn;
	b->batch_arg = arg;
}

static void
pgs_close(struct saga_backend *b)
{
	pgs_driver_stop(b);
	pgs_cache_reset(b);
	pgs_stmts_clear(&b->writes);
	pgs_stmts_clear(&b->loose);
	free(b->writes.v);
	free(b->loose.v);
	free(b->hands);
	free(b->insts);
	free(b->dues);
	free(b->ids);
	free(b->early_new);
	PQclear(b->counts);
	while (b->ndeltas)
		free(b->deltas[--b->ndeltas].saga);
	free(b->deltas);
	free(b->conninfo);
	free(b->schema);
	free(b->service);
	free(b->replica);
	free(b->replica_host);
	free(b);
}

const struct saga_store_ops saga_store_pgsql_ops = {
	.get = pgs_get,
	.get_row = pgs_get_row,
	.by_id = pgs_by_id,
	.list = pgs_list,
	.defs = pgs_defs,
	.counts = pgs_counts,
	.history = pgs_history,
	.insert = pgs_insert,
	.update = pgs_update,
	.log = pgs_log,
	.send = pgs_send,
	.delivered = pgs_delivered,
	.keep_early = pgs_early_keep,
	.early_each = pgs_early_each,
	.timer_set = pgs_timer_set,
	.timer_del = pgs_timer_del,
	.timer_del_all = pgs_timer_del_all,
	.timer_spent = pgs_timer_spent,
	.timer_next = pgs_timer_next,
	.timers_due = pgs_timers_due,
	.expire = pgs_expire,
	.submit = pgs_submit,
	.shared = 1,
	.metrics = pgs_metrics,
	.on_batch = pgs_on_batch,
	.close = pgs_close,
};

/* The schema made or migrated first, blocking: sagad is starting and has
 * nothing to serve without it. */
struct saga_backend *
saga_store_pgsql_open(struct event_base *base, const struct sagad_conf *conf,
    const char *replica_id, struct otel *otel, char **err)
{
	struct saga_backend *b;
	char host[256];

	if (saga_pg_schema_migrate(conf->saga_store.conninfo, conf->saga_store.schema, err) < 0)
		return NULL;
	b = xcalloc(1, sizeof *b);
	b->base = base;
	b->otel = otel;
	b->conf = conf;
	b->conninfo = xstrdup(conf->saga_store.conninfo);
	b->schema = xstrdup(conf->saga_store.schema);
	b->service = xstrdup(conf->service);
	if (gethostname(host, sizeof host) < 0)
		strcpy(host, "unknown");
	host[sizeof host - 1] = '\0';
	b->replica_host = xstrdup(host);
	/* Unique while it lives: the store's random id (host and pid are
	 * the same in two containers of one image), and the start, since its
	 * rows must look dead after a restart. Host and pid go to the
	 * replicas table, for operators. */
	b->started_at = util_now();
	b->replica = xasprintf("%s:%.0f", replica_id, b->started_at * 1000);
	if (pgs_driver_start(b) < 0) {
		*err = xstrdup("cannot start the PostgreSQL saga store");
		pgs_close(b);
		return NULL;
	}
	return b;
}
