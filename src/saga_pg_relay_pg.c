/*
 * The saga outbox relay's PostgreSQL side (saga_pg_relay_int.h): at most
 * one query in flight, a pipeline (one round trip, one implicit
 * transaction) of what is due: either the deletes of confirmed rows and
 * the refresh of this replica's claims, or a claim of more rows (the
 * claim's advisory lock, the claim, the count), taking turns when both are
 * due. Apart, so that the deletes' row locks are never held while the
 * claim waits for the lock behind other replicas' claims: a batch that
 * deletes a saga's delivered rows (saga_store_delivered) skips rows
 * locked, and then leaves its saga's next row to a claim. Confirms that
 * come meanwhile wait for the next pipeline: deletes batch by themselves.
 */
#include "saga_pg_relay_int.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "props.h"
#include "util.h"
#include "xmalloc.h"

/* Drops the rows whose delete committed. */
static void
saga_pg_relay_drop_deleted(struct saga_pg_relay *r)
{
	size_t i, w = 0;

	for (i = 0; i < r->nrows; i++) {
		if (r->rows[i].deleting) {
			msg_free(r->rows[i].m);
			free(r->rows[i].saga_id);
			r->stats.deleted++;
			continue;
		}
		r->rows[w++] = r->rows[i];
	}
	r->nrows = w;
}

/* The advisory lock that orders the claims of all replicas of a service
 * on a schema: FNV-1a of both names. */
void
saga_pg_relay_lock_key(struct saga_pg_relay *r)
{
	char *name = xasprintf("sagad saga outbox %s %s", r->schema, r->service);

	snprintf(r->lock_key, sizeof r->lock_key, "%lld",
	    (long long)(int64_t)util_fnv1a(name));
	free(name);
}

/*
 * The statements, once the first connection can quote the schema's name.
 *
 * The claim takes, in seq order, rows not held already ($5) that are this
 * replica's, unclaimed, or claimed before $4 (now - grace), except a row
 * whose saga has an earlier row claimed by another live replica: that one
 * goes first, from there ("behind", a window over the service's rows by
 * saga: one sort, where a NOT EXISTS per row was quadratic on a backlog).
 * The outer query locks the candidates (SKIP LOCKED passes over rows
 * another transaction holds) and checks the claim again on the row it
 * locked; MATERIALIZED, so that it runs once: a plan that scanned it again
 * for each row of the UPDATE (a nested loop, after pgconn's replanning)
 * claimed 1,023 rows for a limit of 512, and a later row of a saga whose
 * earlier one the next scan skipped (t/integration/saga_pg_relay.py saw
 * one out of order). The advisory lock taken before it in the same
 * transaction makes the claims of replicas one after the other, so that
 * one sees the other's committed claim and two replicas never split a
 * saga's stale rows between them. p.was says whose the row was.
 */
static int
saga_pg_relay_prepare_sql(struct saga_pg_relay *r)
{
	PGconn *conn = pgc_conn(r->pg);
	char *q = PQescapeIdentifier(conn, r->schema, strlen(r->schema));

	if (!q) {
		log_error("saga outbox relay: bad schema name", LOG_STR("schema", r->schema),
		    LOG_STR("reason", PQerrorMessage(conn)));
		return -1;
	}
	r->sql_lock = xstrdup("SELECT pg_advisory_xact_lock($1::bigint)");
	/* A row a batch is deleting (saga_store_delivered) is waited for, a
	 * few milliseconds: the form that skipped locked rows (a subquery FOR
	 * UPDATE SKIP LOCKED) got a generic plan that rescanned the subquery
	 * for each row, seconds on a backlog of 20,000 rows. */
	r->sql_delete = xasprintf("DELETE FROM %s.outbox WHERE service = $1"
	    " AND seq = ANY ($2::bigint[])", q);
	r->sql_refresh = xasprintf("UPDATE %s.outbox SET claimed_at = $3::float8"
	    " WHERE service = $1 AND claimed_by = $2", q);
	r->sql_claim = xasprintf(
	    "WITH p AS MATERIALIZED (SELECT c.service, c.seq, c.claimed_by AS was"
	    "   FROM %s.outbox c WHERE c.service = $1 AND c.seq IN ("
	    "     SELECT w.seq FROM (SELECT seq, claimed_by, claimed_at,"
	    "         bool_or(saga_id IS NOT NULL AND claimed_by <> $2"
	    "           AND claimed_at >= $4::float8) OVER (PARTITION BY saga_id"
	    "           ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)"
	    "         AS behind FROM %s.outbox WHERE service = $1) w"
	    "     WHERE (w.claimed_by = $2 OR w.claimed_at IS NULL"
	    "       OR w.claimed_at < $4::float8) AND w.behind IS NOT TRUE"
	    "       AND w.seq NOT IN (SELECT unnest($5::bigint[]))"
	    "     ORDER BY w.seq LIMIT 2 * $6::int)"
	    "   AND (c.claimed_by = $2 OR c.claimed_at IS NULL OR c.claimed_at < $4::float8)"
	    "   ORDER BY c.seq LIMIT $6::int FOR UPDATE OF c SKIP LOCKED)"
	    " UPDATE %s.outbox o SET claimed_by = $2, claimed_at = $3::float8 FROM p"
	    " WHERE o.service = p.service AND o.seq = p.seq"
	    " RETURNING o.seq, o.message_id, o.exchange, o.routing_key, o.props, o.body,"
	    " o.saga_id, p.was", q, q, q);
	/* After the claim, in its transaction: this replica's rows not held
	 * before it ($3), at most $4 (saga_pg_relay_caught_up). */
	r->sql_mine = xasprintf("SELECT seq FROM %s.outbox WHERE service = $1"
	    " AND claimed_by = $2 AND seq <> ALL ($3::bigint[]) LIMIT $4::int", q);
	r->sql_vacuum = xasprintf("VACUUM (SKIP_LOCKED) %s.outbox", q);
	PQfreemem(q);
	return 0;
}

/*
 * The outbox is a queue: every row is deleted within seconds, and its dead
 * versions stay until a VACUUM, which autovacuum runs at most once a
 * minute (autovacuum_naptime). The claim's window and the count read
 * every version: after a burst of 60,000 sagas, 57 ms a claim instead of
 * under 1, long enough for the rows handed meanwhile to wait on it. So
 * each relay vacuums the table after SAGA_PG_RELAY_VACUUM_ROWS deletes of
 * its own (SKIP_LOCKED: not when another replica's VACUUM runs). A role
 * that does not own the table gets a warning from PostgreSQL and nothing
 * done: autovacuum alone then.
 */
static int
saga_pg_relay_vacuum(struct saga_pg_relay *r)
{
	double mono = util_mono();

	if (r->stats.deleted - r->vacuum_mark < SAGA_PG_RELAY_VACUUM_ROWS ||
	    mono - r->vacuumed < SAGA_PG_RELAY_VACUUM_EVERY)
		return 0;
	r->vacuum_mark = r->stats.deleted;
	r->vacuumed = mono;
	r->q.del = r->q.claim = r->q.mine = -1;
	r->busy = 1;
	log_debug("saga outbox relay: VACUUM of the outbox", LOG_STR("schema", r->schema));
	pgc_send(r->pg, r->sql_vacuum);
	return 1;
}

/* seqs as a PostgreSQL array literal: "{1,2,3}". */
static char *
saga_pg_relay_array(struct saga_pg_relay *r, int deleting)
{
	struct evbuffer *b = evbuffer_new();
	size_t i, len;
	int first = 1;
	char *s;

	evbuffer_add(b, "{", 1);
	for (i = 0; i < r->nrows; i++) {
		if (deleting && !r->rows[i].deleting)
			continue;
		evbuffer_add_printf(b, "%s%lld", first ? "" : ",", (long long)r->rows[i].m->seq);
		first = 0;
	}
	evbuffer_add(b, "}", 1);
	len = evbuffer_get_length(b);
	s = xmalloc(len + 1);
	evbuffer_remove(b, s, len);
	s[len] = '\0';
	evbuffer_free(b);
	return s;
}

/*
 * Which confirmed rows to delete now (their deleting flag set), and how
 * many: none until one of them has waited SAGA_PG_RELAY_LINGER for its
 * reply's batch to delete it (the poll looks every second), then every
 * one confirmed; all at once when they take more than a quarter of the
 * rows held (room for claims), or when the relay closes.
 */
int
saga_pg_relay_mark_deletes(struct saga_pg_relay *r)
{
	double mono = util_mono();
	size_t i, ndone = 0;
	int due = r->closing;

	for (i = 0; i < r->nrows; i++) {
		if (r->rows[i].state != SAGA_PG_RELAY_DONE)
			continue;
		ndone++;
		due |= mono - r->rows[i].done_at >= SAGA_PG_RELAY_LINGER;
	}
	if (ndone > r->max_held / 4)
		due = 1;
	for (i = 0; i < r->nrows; i++)
		r->rows[i].deleting = due && r->rows[i].state == SAGA_PG_RELAY_DONE;
	return due ? (int)ndone : 0;
}

/*
 * Sends what is due as one pipeline: the confirmed rows' deletes and the
 * claims' refresh (every grace / 2), or a claim when wanted and there is
 * room, after one pipeline of deletes at most. Nothing due, or a query in
 * flight: nothing (the end of that query pumps again).
 */
void
saga_pg_relay_send(struct saga_pg_relay *r)
{
	struct pgc_stmt s[5];
	const char *lockv[1], *delv[2], *refv[3], *claimv[6], *minev[4];
	char now_s[32], stale_s[32], limit_s[16], mine_s[16], *del = NULL, *held = NULL;
	double now = util_now(), mono = util_mono();
	size_t i, room = r->nrows < r->max_held ? r->max_held - r->nrows : 0;
	int n = 0, ndel = 0, refresh = mono - r->refreshed >= r->grace / 2, claim;

	if (!r->pg_up || r->busy || !r->sql_claim || saga_pg_relay_vacuum(r))
		return;
	ndel = saga_pg_relay_mark_deletes(r);
	claim = r->want_claim && room && (r->claim_next || (!ndel && !refresh));
	r->claim_next = !claim && r->want_claim && room;
	if (claim) {
		ndel = refresh = 0;
		for (i = 0; i < r->nrows; i++)
			r->rows[i].deleting = 0;
	}
	if (!ndel && !refresh && !claim)
		return;
	memset(s, 0, sizeof s);
	snprintf(now_s, sizeof now_s, "%.6f", now);
	snprintf(stale_s, sizeof stale_s, "%.6f", now - r->grace);
	r->q.del = r->q.claim = r->q.mine = -1;
	if (ndel) {
		delv[0] = r->service;
		delv[1] = del = saga_pg_relay_array(r, 1);
		r->q.del = n;
		s[n++] = (struct pgc_stmt){ r->sql_delete, 2, delv, NULL, NULL };
	}
	if (refresh) {
		refv[0] = r->service;
		refv[1] = r->replica;
		refv[2] = now_s;
		r->refreshed = mono;
		s[n++] = (struct pgc_stmt){ r->sql_refresh, 3, refv, NULL, NULL };
	}
	if (claim) {
		lockv[0] = r->lock_key;
		s[n++] = (struct pgc_stmt){ r->sql_lock, 1, lockv, NULL, NULL };
		r->want_claim = 0;
		r->q.limit = (int)room;
		snprintf(limit_s, sizeof limit_s, "%d", r->q.limit);
		claimv[0] = r->service;
		claimv[1] = r->replica;
		claimv[2] = now_s;
		claimv[3] = stale_s;
		claimv[4] = held = saga_pg_relay_array(r, 0);
		claimv[5] = limit_s;
		r->q.claim = n;
		s[n++] = (struct pgc_stmt){ r->sql_claim, 6, claimv, NULL, NULL };
		minev[0] = r->service;
		minev[1] = r->replica;
		minev[2] = held;
		snprintf(mine_s, sizeof mine_s, "%zu", r->max_held + 1);
		minev[3] = mine_s;
		r->q.mine = n;
		s[n++] = (struct pgc_stmt){ r->sql_mine, 4, minev, NULL, NULL };
		/* Its snapshot comes after every row handed so far. */
		r->claiming = 1;
		r->missed = 0;
	}
	r->busy = 1;
	pgc_send_pipeline(r->pg, s, n);	/* libpq copies the parameters */
	free(del);
	free(held);
}

void
saga_pg_relay_pump(struct saga_pg_relay *r)
{
	/* Not from inside a pgconn hook or a broker event's handler: once
	 * per loop turn, when the turn's confirms are all in. */
	event_active(r->pump_ev, 0, 0);
}

void
saga_pg_relay_pump_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	saga_pg_relay_send(arg);
}

/* A bytea column in text form (hex), malloc'd; *len its size. */
static char *
saga_pg_relay_bytea(const PGresult *res, int i, int col, size_t *len)
{
	unsigned char *raw;
	char *out;

	*len = 0;
	if (PQgetisnull(res, i, col))
		return xstrdup("");
	raw = PQunescapeBytea((const unsigned char *)PQgetvalue(res, i, col), len);
	if (!raw) {
		/* the allocation policy of xmalloc.h */
		log_error("out of memory", LOG_STR("what", "PQunescapeBytea"));
		_exit(3);
	}
	out = xmalloc(*len + 1);
	memcpy(out, raw, *len);
	out[*len] = '\0';
	PQfreemem(raw);
	return out;
}

/* One claimed row -> a held row. */
static void
saga_pg_relay_take_row(struct saga_pg_relay *r, const PGresult *res, int i)
{
	struct msg *m = xcalloc(1, sizeof *m);
	char *props;
	size_t plen;

	m->seq = strtoll(PQgetvalue(res, i, 0), NULL, 10);
	m->message_id = xstrdup(PQgetvalue(res, i, 1));
	m->exchange = xstrdup(PQgetvalue(res, i, 2));
	m->routing_key = xstrdup(PQgetvalue(res, i, 3));
	props = saga_pg_relay_bytea(res, i, 4, &plen);
	/* A row that cannot be read whole still goes (without properties):
	 * held back, it would stop its saga for good. */
	if (props_unpack(props, plen, &m->props) < 0) {
		props_free(&m->props);
		memset(&m->props, 0, sizeof m->props);
		log_error("saga outbox row has malformed properties, published without them",
		    LOG_INT("seq", m->seq), LOG_STR("message_id", m->message_id));
	}
	free(props);
	m->body = saga_pg_relay_bytea(res, i, 5, &m->body_len);
	if (PQgetisnull(res, i, 7) || strcmp(PQgetvalue(res, i, 7), r->replica) != 0)
		r->stats.claimed_from_others++;
	saga_pg_relay_add(r, m, PQgetisnull(res, i, 6) ? NULL : xstrdup(PQgetvalue(res, i, 6)));
}

/*
 * After a claim that read n rows: caught up if every row of this replica
 * that the count saw unheld (behind another replica's, beyond the claim's
 * limit, or committed by a batch after the claim's snapshot) is held now
 * (read by the claim, or handed meanwhile: held or pending) and none was
 * dropped meanwhile. A count of them alone would see a row a batch
 * committed between the claim's statement and its own as left behind.
 */
static void
saga_pg_relay_caught_up(struct saga_pg_relay *r, int n)
{
	PGresult *res = pgc_result(r->pg, r->q.mine);
	int i, k = res ? PQntuples(res) : 0, unheld = res ? 0 : 1, was = r->caught_up;

	for (i = 0; i < k; i++)
		unheld += !saga_pg_relay_holds(r, strtoll(PQgetvalue(res, i, 0), NULL, 10));
	r->claiming = 0;
	r->caught_up = !unheld && !r->missed;
	if (was != r->caught_up)
		log_info(r->caught_up ? "saga outbox relay: caught up, takes handed rows" :
		    "saga outbox relay: behind, claims what batches commit",
		    LOG_INT("unheld", unheld), LOG_INT("claimed", n),
		    LOG_INT("missed", r->missed));
	saga_pg_relay_pending_end(r, r->caught_up);
	if (!r->caught_up)
		r->want_claim = 1;
}

static void
saga_pg_relay_done(void *arg)
{
	struct saga_pg_relay *r = arg;
	PGresult *res;
	size_t before = r->stats.claimed_from_others;
	int i, n;

	r->busy = 0;
	if (pgc_error(r->pg)) {
		/* The whole pipeline rolled back (one transaction): the deletes
		 * and the claim are tried again at the next poll, and rows are
		 * handed again once a claim has caught up. */
		if (r->claiming) {
			r->claiming = 0;
			r->caught_up = 0;
			saga_pg_relay_pending_end(r, 0);
		}
		r->stats.pg_errors++;
		log_warn("saga outbox relay: query failed, retried", LOG_STR("reason",
		    pgc_error(r->pg)), LOG_STR("sqlstate", pgc_error_sqlstate(r->pg)));
		for (i = 0; i < (int)r->nrows; i++)
			r->rows[i].deleting = 0;
		r->refreshed = 0;
		/* A standby after a failover (read-only) answers the same
		 * until the connection is made again, to the new primary. */
		if (pgc_error_class(r->pg) == PGC_ERR_RECONNECT) {
			char *why = xstrdup(pgc_error(r->pg));
			pgc_down(r->pg, why);
			free(why);
		}
		return;
	}
	pgc_reset_backoff(r->pg);
	if (r->q.del >= 0)
		saga_pg_relay_drop_deleted(r);
	if (r->q.claim >= 0 && (res = pgc_result(r->pg, r->q.claim))) {
		n = PQntuples(res);
		for (i = 0; i < n; i++)
			saga_pg_relay_take_row(r, res, i);
		r->stats.claimed += (uint64_t)n;
		saga_pg_relay_caught_up(r, n);
		/* A full claim: more may wait. */
		if (n == r->q.limit)
			r->want_claim = 1;
		if (r->stats.claimed_from_others > before)
			log_info("saga outbox rows taken over", LOG_UINT("rows",
			    r->stats.claimed_from_others - before), LOG_STR("replica", r->replica));
	}
	event_active(r->fill_ev, 0, 0);
	saga_pg_relay_pump(r);
}

static void
saga_pg_relay_connecting(void *arg)
{
	(void)arg;
}

static void
saga_pg_relay_connected(void *arg)
{
	struct saga_pg_relay *r = arg;

	if (!r->sql_claim && saga_pg_relay_prepare_sql(r) < 0) {
		pgc_down(r->pg, "bad schema name");
		return;
	}
	log_info("saga outbox relay: PostgreSQL connected", LOG_STR("schema", r->schema));
	r->pg_up = 1;
	r->pg_warned = 0;
	r->want_claim = 1;
	r->refreshed = 0;	/* the claims may have aged meanwhile */
	saga_pg_relay_pump(r);
}

static void
saga_pg_relay_notified(void *arg)
{
	(void)arg;
}

/* Rows held stay held: their confirms still count and their deletes are
 * sent again on the next connection (a delete whose commit was lost with
 * the connection is then a no-op or done now). */
static void
saga_pg_relay_down(void *arg, const char *why, double retry_in)
{
	struct saga_pg_relay *r = arg;
	size_t i;

	if (r->pg_up)
		log_warn("saga outbox relay: PostgreSQL connection down", LOG_STR("reason", why),
		    LOG_DBL("retry_in_seconds", retry_in));
	else if (!r->pg_warned)	/* once, then quietly until it connects */
		log_warn("saga outbox relay: cannot connect to PostgreSQL",
		    LOG_STR("reason", why), LOG_DBL("retry_in_seconds", retry_in));
	else
		log_debug("saga outbox relay: cannot connect to PostgreSQL",
		    LOG_STR("reason", why), LOG_DBL("retry_in_seconds", retry_in));
	r->pg_warned = 1;
	r->pg_up = 0;
	r->busy = 0;
	if (r->claiming) {
		/* The claim may have committed, its rows unread. */
		r->claiming = 0;
		r->caught_up = 0;
		saga_pg_relay_pending_end(r, 0);
	}
	for (i = 0; i < r->nrows; i++)
		r->rows[i].deleting = 0;
}

const struct pgc_hooks saga_pg_relay_pg_hooks = { saga_pg_relay_connecting,
	saga_pg_relay_connected, saga_pg_relay_done, saga_pg_relay_notified,
	saga_pg_relay_down };
