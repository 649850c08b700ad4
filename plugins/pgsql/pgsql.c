/*
 * The pgsql source: the transactional outbox in the service's own
 * PostgreSQL database (sagad-plugins(7), schema in schema.sql).
 *
 * The service inserts rows into an outbox table in the transaction that
 * changes its business data; a statement trigger NOTIFYs. This plugin
 * LISTENs (and polls every poll_interval as a fallback), takes a batch in
 * order with FOR UPDATE SKIP LOCKED, hands it to sagad's outbox, and
 * deletes the rows in the same PostgreSQL transaction once sagad's store
 * says they are durable. A crash in between rolls the PostgreSQL
 * transaction back: the rows are read again and sagad's Message-Id dedup
 * drops them. Replicas on one table lock disjoint rows.
 *
 * Everything is asynchronous libpq on sagad's event loop, one connection
 * (pgconn.c: connect, queries, NOTIFYs, reconnect; it reports through
 * hooks), one explicit state (enum pg_state) and one dispatch function for
 * the end of each query (pg_query_done):
 *
 *   DOWN -> CONNECTING -> CHECKING -> LISTENING -> [LOCKING <-> STANDBY,
 *           LOCKING ->] IDLE
 *   IDLE -> FETCHING -> (rows) DURABLE_WAIT -> FETCHING (delete, commit,
 *           next batch in one round trip) or CLOSING -> IDLE
 *   any error -> DOWN, reconnect after a backoff
 *
 * DOWN -> CONNECTING, CONNECTING -> CHECKING and any -> DOWN are the
 * connection's reports (pg_on_connecting, pg_on_connected, pg_on_down).
 */
#include <event2/event.h>
#include <libpq-fe.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sagad/plugin.h"

#include "../codec.h"
#include "pgconn.h"

enum pg_state {
	PG_DOWN,		/* no connection; pgconn.c reconnects */
	PG_CONNECTING,		/* pgconn.c's PQconnectPoll under way */
	PG_CHECKING,		/* session settings and the table check */
	PG_LISTENING,		/* LISTEN in flight */
	PG_LOCKING,		/* exclusive: pg_try_advisory_lock in flight */
	PG_STANDBY,		/* exclusive: another replica holds the lock */
	PG_IDLE,		/* waiting for a NOTIFY or the poll timer */
	PG_FETCHING,		/* [DELETE; COMMIT;] BEGIN; SELECT ... in flight */
	PG_DURABLE_WAIT,	/* batch handed over, transaction open */
	PG_CLOSING		/* COMMIT or ROLLBACK ending a batch in flight */
};

static const char *const pg_state_names[] = {
	"down", "connecting", "checking", "listening", "locking", "standby", "idle", "fetching",
	"durable-wait", "closing"
};

/* The columns of the outbox table, in the order the fetch selects them. */
enum {
	COL_SEQ, COL_ID, COL_EXCHANGE, COL_KEY, COL_CT, COL_CORR, COL_HEADERS,
	COL_BODY, COL_AGE, COL_BAD_HEADERS, N_COLS
};

struct pg_column {
	const char *name;
	const char *types;	/* accepted pg_type.typname, space-separated */
	const char *want;	/* the same, for the error message */
};

static const struct pg_column pg_columns[] = {
	{ "seq", "int8 int4", "bigint or integer" },
	{ "message_id", "text varchar bpchar uuid", "text or uuid" },
	{ "exchange", "text varchar", "text" },
	{ "routing_key", "text varchar", "text" },
	{ "content_type", "text varchar", "text" },
	{ "correlation_id", "text varchar uuid", "text or uuid" },
	{ "headers", "jsonb json", "jsonb or json" },
	{ "body", "bytea text varchar json jsonb", "bytea, text, json or jsonb" },
	{ "created_at", "timestamptz timestamp", "timestamptz" },
};
#define N_TABLE_COLS (sizeof pg_columns / sizeof pg_columns[0])

struct pgsrc {
	const struct sagad_host_api *api;
	struct sagad_host *h;
	struct event_base *base;

	/* configuration */
	const char *conninfo, *table, *channel;
	double poll_interval, retry_initial, retry_max, connect_timeout, query_timeout;
	long batch_size;
	int exclusive;

	/* the state and the connection */
	enum pg_state state;
	struct pgc *c;		/* the connection (pgconn.h) */
	struct event *poll;	/* persistent fallback poll */
	struct event *retry;	/* store full / failed: fetch again later */

	/* built after the check */
	char *qtable;		/* the table as a quoted, qualified name */
	char body_expr[96], headers_expr[256];
	char *sql_lock;		/* exclusive: take the session lock */

	/* the current batch */
	unsigned long batch;	/* batch number, for when_durable tickets */
	struct codec_rows rows;	/* taken and skipped rows (codec.h) */
	size_t nfetched;
	int more;		/* the batch was full, or a NOTIFY came meanwhile */
	int dirty;
	int stalled;		/* the store refused (full, error): wait */
	double stall;

	char reason[400];
	int logged_down;
	int ready;
};

static const char *const pgsql_keys[] = {
	"conninfo", "table", "channel", "poll_interval", "batch", "exclusive",
	"retry_initial", "retry_max", "connect_timeout", "query_timeout", NULL
};

static void pg_fetch(struct pgsrc *p, const char *prefix);
static void pg_next(struct pgsrc *p);

/* ---- helpers ---- */

/* A log-safe one-line version of a libpq message. */
static void
pg_clean(char *s)
{
	char *e = s + strlen(s);

	codec_clean(s);
	while (e > s && e[-1] == ' ')
		*--e = '\0';
}

/* ---- the connection's reports (pgconn.h) ---- */

/* DOWN -> CONNECTING: a connect begins. */
static void
pg_on_connecting(void *arg)
{
	struct pgsrc *p = arg;

	p->state = PG_CONNECTING;
}

static void pg_check(struct pgsrc *p);

/* Connected: check the table (CONNECTING -> CHECKING). */
static void
pg_on_connected(void *arg)
{
	struct pgsrc *p = arg;
	PGconn *conn = pgc_conn(p->c);

	SAGAD_LOG(p->api, p->h, SAGAD_LOG_DEBUG, "connected to PostgreSQL",
	    SAGAD_STR("host", PQhost(conn)), SAGAD_STR("port", PQport(conn)),
	    SAGAD_STR("dbname", PQdb(conn)), SAGAD_STR("user", PQuser(conn)));
	pg_check(p);
}

/* Any state -> DOWN: the connection is dropped (PostgreSQL rolls back an
 * open batch: its rows are read again); pgconn.c reconnects after the
 * backoff. */
static void
pg_on_down(void *arg, const char *what, double retry_in)
{
	struct pgsrc *p = arg;
	char why[600];

	snprintf(why, sizeof why, "%s", what);
	pg_clean(why);
	p->ready = 0;
	codec_report_down(p->api, p->h, why, p->reason, sizeof p->reason, &p->logged_down,
	    "state", pg_state_names[p->state], retry_in);
	event_del(p->retry);
	p->rows.nseqs = 0;
	p->state = PG_DOWN;
}

static void pg_query_done(void *arg);

static void
pg_notified(void *arg)
{
	struct pgsrc *p = arg;

	if (p->state == PG_IDLE)
		pg_fetch(p, NULL);
	else
		p->dirty = 1;
}

static const struct pgc_hooks pg_hooks = {
	.connecting = pg_on_connecting,
	.connected = pg_on_connected,
	.done = pg_query_done,
	.notified = pg_notified,
	.down = pg_on_down,
};

/* ---- the table check ---- */

static void
pg_check(struct pgsrc *p)
{
	char *lit = PQescapeLiteral(pgc_conn(p->c), p->table, strlen(p->table));
	char *sql;

	if (!lit) {
		pgc_down(p->c, PQerrorMessage(pgc_conn(p->c)));
		return;
	}
	p->state = PG_CHECKING;
	/* The deletes need no fsync of their own: a lost delete only means
	 * rows read again and dropped as duplicates. */
	if (asprintf(&sql,
	    "SET synchronous_commit = off;"
	    "SELECT c.oid::regclass::text, c.relname, c.relkind,"
	    " has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'UPDATE'),"
	    " has_table_privilege(c.oid, 'DELETE'), current_user"
	    " FROM pg_class c WHERE c.oid = to_regclass(%s);"
	    "SELECT a.attname, t.typname, format_type(a.atttypid, a.atttypmod)"
	    " FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
	    " WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped;"
	    "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a"
	    "  ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
	    "  WHERE i.indrelid = to_regclass(%s) AND i.indisunique AND i.indnkeyatts = 1"
	    "  AND a.attname = 'message_id'),"
	    " EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = to_regclass(%s)"
	    "  AND NOT g.tgisinternal AND g.tgenabled <> 'D')",
	    lit, lit, lit, lit) < 0)
		sql = NULL;
	PQfreemem(lit);
	if (!sql) {
		pgc_down(p->c, "out of memory");
		return;
	}
	pgc_send(p->c, sql);
	free(sql);
}

static int
pg_type_ok(const char *types, const char *t)
{
	size_t n = strlen(t);
	const char *s = types;

	while ((s = strstr(s, t))) {
		if ((s == types || s[-1] == ' ') && (s[n] == ' ' || s[n] == '\0'))
			return 1;
		s += n;
	}
	return 0;
}

/* The check's answers: 1 if the table is usable (then the fetch is built
 * and LISTEN sent), 0 after pgc_down() with a reason naming the problem. */
static int
pg_check_done(struct pgsrc *p)
{
	PGresult *rel, *cols, *extra;
	char why[400], *chan, *sql;
	const char *body_type = "bytea", *headers_type = "jsonb", *relname;
	size_t i;
	int r;

	if (pgc_error(p->c)) {
		snprintf(why, sizeof why, "checking table %s: %s", p->table, pgc_error(p->c));
		pgc_down(p->c, why);
		return 0;
	}
	if (pgc_nresults(p->c) < 4) {
		pgc_down(p->c, "checking the table: unexpected answer from PostgreSQL");
		return 0;
	}
	rel = pgc_result(p->c, 1);
	cols = pgc_result(p->c, 2);
	extra = pgc_result(p->c, 3);
	if (PQntuples(rel) != 1) {
		snprintf(why, sizeof why, "table %s does not exist in database %s (create it with %s)",
		    p->table, PQdb(pgc_conn(p->c)), "schema.sql, see sagad-plugins(7)");
		pgc_down(p->c, why);
		return 0;
	}
	relname = PQgetvalue(rel, 0, 1);
	if (strchr("rp", PQgetvalue(rel, 0, 2)[0]) == NULL) {
		snprintf(why, sizeof why, "%s is not a table", PQgetvalue(rel, 0, 0));
		pgc_down(p->c, why);
		return 0;
	}
	for (i = 3; i < 6; i++)
		if (PQgetvalue(rel, 0, (int)i)[0] != 't') {
			snprintf(why, sizeof why, "role %s lacks the %s privilege on table %s",
			    PQgetvalue(rel, 0, 6), i == 3 ? "SELECT" : i == 4 ? "UPDATE" : "DELETE",
			    PQgetvalue(rel, 0, 0));
			pgc_down(p->c, why);
			return 0;
		}
	for (i = 0; i < N_TABLE_COLS; i++) {
		int row, found = -1;
		for (row = 0; row < PQntuples(cols); row++)
			if (strcmp(PQgetvalue(cols, row, 0), pg_columns[i].name) == 0)
				found = row;
		if (found < 0) {
			snprintf(why, sizeof why, "table %s: column %s is missing (expected type %s)",
			    PQgetvalue(rel, 0, 0), pg_columns[i].name, pg_columns[i].want);
			pgc_down(p->c, why);
			return 0;
		}
		if (!pg_type_ok(pg_columns[i].types, PQgetvalue(cols, found, 1))) {
			snprintf(why, sizeof why, "table %s: column %s has type %s, expected %s",
			    PQgetvalue(rel, 0, 0), pg_columns[i].name, PQgetvalue(cols, found, 2),
			    pg_columns[i].want);
			pgc_down(p->c, why);
			return 0;
		}
		if (strcmp(pg_columns[i].name, "body") == 0)
			body_type = strcmp(PQgetvalue(cols, found, 1), "bytea") == 0 ? "bytea" : "text";
		if (strcmp(pg_columns[i].name, "headers") == 0)
			headers_type = PQgetvalue(cols, found, 1);
	}
	free(p->qtable);
	p->qtable = xstrdup(PQgetvalue(rel, 0, 0));
	if (strcmp(body_type, "bytea") == 0)
		snprintf(p->body_expr, sizeof p->body_expr, "encode(body, 'hex')");
	else
		snprintf(p->body_expr, sizeof p->body_expr, "body::text");
	/* Headers as "hex(name):hex(value),..." so that no quoting can go
	 * wrong; a JSON null value is left out. */
	snprintf(p->headers_expr, sizeof p->headers_expr,
	    "CASE WHEN %s_typeof(headers) = 'object' THEN (SELECT string_agg("
	    "encode(convert_to(h.key, 'UTF8'), 'hex') || ':' || encode(convert_to(h.value, 'UTF8'), 'hex'), ',')"
	    " FROM %s_each_text(headers) h WHERE h.value IS NOT NULL) END",
	    headers_type, headers_type);
	if (PQgetvalue(extra, 0, 0)[0] != 't')
		SAGAD_LOG(p->api, p->h, SAGAD_LOG_WARN,
		    "no unique index on message_id: a reused id is dropped as a duplicate",
		    SAGAD_STR("table", p->qtable));
	if (PQgetvalue(extra, 0, 1)[0] != 't')
		SAGAD_LOG(p->api, p->h, SAGAD_LOG_WARN,
		    "no trigger on the table: new rows are noticed by polling only",
		    SAGAD_STR("table", p->qtable), SAGAD_DBL("poll_interval", p->poll_interval));
	chan = PQescapeIdentifier(pgc_conn(p->c), p->channel ? p->channel : relname,
	    strlen(p->channel ? p->channel : relname));
	if (!chan) {
		pgc_down(p->c, PQerrorMessage(pgc_conn(p->c)));
		return 0;
	}
	free(p->sql_lock);
	p->sql_lock = NULL;
	if (p->exclusive) {
		char *lit = PQescapeLiteral(pgc_conn(p->c), p->qtable, strlen(p->qtable));
		if (!lit || asprintf(&p->sql_lock,
		    "SELECT pg_try_advisory_lock(hashtext('sagad:' || %s))", lit) < 0)
			p->sql_lock = NULL;
		PQfreemem(lit);
		if (!p->sql_lock) {
			PQfreemem(chan);
			pgc_down(p->c, "out of memory");
			return 0;
		}
	}
	r = asprintf(&sql, "LISTEN %s", chan);
	PQfreemem(chan);
	if (r < 0) {
		pgc_down(p->c, "out of memory");
		return 0;
	}
	p->state = PG_LISTENING;
	pgc_send(p->c, sql);
	free(sql);
	return 1;
}

/* Connected, table checked, listening: ready (also as a standby). */
static void
pg_up(struct pgsrc *p, const char *role)
{
	pgc_reset_backoff(p->c);
	if (!p->ready || strcmp(role, "standby") != 0)
		SAGAD_LOG(p->api, p->h, SAGAD_LOG_INFO,
		    strcmp(role, "standby") == 0 ? "standing by: another sagad holds the table" :
		    "relaying from PostgreSQL", SAGAD_STR("table", p->qtable), SAGAD_STR("role", role),
		    SAGAD_INT("batch", p->batch_size));
	p->ready = 1;
	codec_report_up(p->api, p->h, p->reason, &p->logged_down);
}

/* ---- batches ---- */

/* Send "[prefix] BEGIN; SELECT ... FOR UPDATE SKIP LOCKED". */
static void
pg_fetch(struct pgsrc *p, const char *prefix)
{
	char *sql, *skip = xmalloc(p->rows.nskip * 24 + 64);
	size_t len;
	int r;

	/* Rows left in the table are skipped (codec_skip_list tries them
	 * again now and then). */
	len = (size_t)sprintf(skip, " WHERE seq <> ALL ('{");
	len += codec_skip_list(&p->rows, skip + len);
	if (p->rows.nskip)
		sprintf(skip + len, "}'::bigint[])");
	else
		skip[0] = '\0';
	r = asprintf(&sql,
	    "%sBEGIN; SELECT seq, message_id::text, exchange, routing_key, content_type,"
	    " correlation_id::text, %s, %s,"
	    " extract(epoch FROM clock_timestamp() - created_at)::float8,"
	    " headers IS NOT NULL AND json_typeof(headers::json) <> 'object'"
	    " FROM %s%s ORDER BY seq LIMIT %ld FOR UPDATE SKIP LOCKED",
	    prefix ? prefix : "", p->headers_expr, p->body_expr, p->qtable,
	    skip, p->batch_size);
	free(skip);
	if (r < 0) {
		pgc_down(p->c, "out of memory");
		return;
	}
	p->state = PG_FETCHING;
	p->dirty = 0;
	pgc_send(p->c, sql);
	free(sql);
}

static void
pg_durable(void *cookie, int ok)
{
	unsigned long batch;
	struct pgsrc *p = codec_ticket_take(cookie, &batch);
	char *sql, *w;
	size_t i;

	/* A batch of a connection since lost: PostgreSQL rolled it back and
	 * its rows come again (and are duplicates then). */
	if (p->state != PG_DURABLE_WAIT || batch != p->batch)
		return;
	if (!ok) {
		codec_lost_batch(p->api, p->h, p->rows.nseqs);
		p->rows.nseqs = 0;
		p->state = PG_CLOSING;
		p->stalled = 1;
		pgc_send(p->c, "ROLLBACK");
		return;
	}
	sql = xmalloc(p->rows.nseqs * 21 + strlen(p->qtable) + 96);
	w = sql + sprintf(sql, "DELETE FROM %s WHERE seq = ANY ('{", p->qtable);
	for (i = 0; i < p->rows.nseqs; i++)
		w += sprintf(w, "%s%lld", i ? "," : "", (long long)p->rows.seqs[i]);
	strcpy(w, "}'::bigint[]); COMMIT; ");
	p->api->counter_add(p->h, "rows_deleted", (double)p->rows.nseqs);
	p->rows.nseqs = 0;
	if ((p->more || p->dirty) && !p->stalled)
		pg_fetch(p, sql);	/* one round trip: delete, commit, next batch */
	else {
		p->state = PG_CLOSING;
		pgc_send(p->c, sql);
	}
	free(sql);
}

/* Hand one row to sagad. 1: taken (delete it once durable), 0: left in
 * the table (invalid), -1: the store refused, stop the batch. */
static int
pg_row(struct pgsrc *p, PGresult *r, int row)
{
	struct sagad_message m;
	struct codec_hdrs hd;
	char *body = NULL;
	size_t blen;
	const char *why;
	int64_t seq = strtoll(PQgetvalue(r, row, COL_SEQ), NULL, 10);
	int ret;

	memset(&m, 0, sizeof m);
	m.message_id = PQgetisnull(r, row, COL_ID) ? NULL : PQgetvalue(r, row, COL_ID);
	m.exchange = PQgetvalue(r, row, COL_EXCHANGE);	/* NULL reads as "": the default exchange */
	m.routing_key = PQgetisnull(r, row, COL_KEY) ? NULL : PQgetvalue(r, row, COL_KEY);
	m.content_type = PQgetisnull(r, row, COL_CT) ? NULL : PQgetvalue(r, row, COL_CT);
	m.correlation_id = PQgetisnull(r, row, COL_CORR) ? NULL : PQgetvalue(r, row, COL_CORR);
	why = codec_row_headers(&m, &hd, PQgetvalue(r, row, COL_BAD_HEADERS)[0] == 't',
	    PQgetisnull(r, row, COL_HEADERS) ? NULL : PQgetvalue(r, row, COL_HEADERS));
	if (strcmp(p->body_expr, "body::text") == 0) {
		m.body = PQgetvalue(r, row, COL_BODY);
		m.body_len = (size_t)PQgetlength(r, row, COL_BODY);
	} else {
		blen = (size_t)PQgetlength(r, row, COL_BODY);
		body = xmalloc(blen / 2 + 1);
		if (codec_unhex(PQgetvalue(r, row, COL_BODY), blen, body) < 0)
			why = "body is not valid hex (unexpected)";
		m.body = body;
		m.body_len = blen / 2;
	}
	ret = codec_take_row(p->api, p->h, &p->rows, &m, seq, p->qtable, why);
	codec_hdrs_free(&hd);
	free(body);
	return ret;
}

static void
pg_fetch_done(struct pgsrc *p)
{
	PGresult *r = NULL;
	int i, n;

	if (pgc_error(p->c)) {
		char why[600];
		snprintf(why, sizeof why, "reading table %s: %s", p->qtable, pgc_error(p->c));
		pgc_down(p->c, why);
		return;
	}
	for (i = 0; i < pgc_nresults(p->c); i++)
		if (PQresultStatus(pgc_result(p->c, i)) == PGRES_TUPLES_OK)
			r = pgc_result(p->c, i);
	if (!r || PQnfields(r) != N_COLS) {
		pgc_down(p->c, "reading the table: unexpected answer from PostgreSQL");
		return;
	}
	n = PQntuples(r);
	p->nfetched = (size_t)n;
	p->more = n == p->batch_size;
	p->rows.nseqs = 0;
	p->stalled = 0;
	p->api->gauge_set(p->h, "lag_seconds", n ? fmax(0, strtod(PQgetvalue(r, 0, COL_AGE), NULL)) : 0);
	for (i = 0; i < n; i++)
		if (pg_row(p, r, i) < 0) {
			p->stalled = 1;
			break;
		}
	if (!p->rows.nseqs) {
		/* Nothing taken: end the transaction (unlocks what is left). */
		p->state = PG_CLOSING;
		pgc_send(p->c, "ROLLBACK");
		return;
	}
	p->state = PG_DURABLE_WAIT;
	codec_when_durable(p->api, p->h, pg_durable, p, ++p->batch);
}

static void
pg_retry_cb(evutil_socket_t fd, short what, void *arg)
{
	struct pgsrc *p = arg;

	(void)fd;
	(void)what;
	if (p->state == PG_IDLE)
		pg_fetch(p, NULL);
}

/* A batch ended: go on at once, later, or wait. */
static void
pg_next(struct pgsrc *p)
{
	p->state = PG_IDLE;
	if (p->stalled) {
		codec_timer(p->retry, codec_backoff(&p->stall, p->retry_initial, p->retry_max));
		return;
	}
	p->stall = 0;
	if (p->more || p->dirty)
		pg_fetch(p, NULL);
}

static void
pg_poll_cb(evutil_socket_t fd, short what, void *arg)
{
	struct pgsrc *p = arg;

	(void)fd;
	(void)what;
	if (p->state == PG_IDLE && !event_pending(p->retry, EV_TIMEOUT, NULL))
		pg_fetch(p, NULL);
	else if (p->state == PG_STANDBY) {
		p->state = PG_LOCKING;
		pgc_send(p->c, p->sql_lock);
	}
}

/* The one dispatch point: a query has ended, in state p->state. */
static void
pg_query_done(void *arg)
{
	struct pgsrc *p = arg;
	PGresult *last;

	switch (p->state) {
	case PG_CHECKING:
		pg_check_done(p);
		return;
	case PG_LISTENING:
		if (pgc_error(p->c)) {
			pgc_down(p->c, pgc_error(p->c));
			return;
		}
		if (p->exclusive) {
			p->state = PG_LOCKING;
			pgc_send(p->c, p->sql_lock);
			return;
		}
		pg_up(p, "shared");
		pg_fetch(p, NULL);
		return;
	case PG_LOCKING:
		if (pgc_error(p->c)) {
			pgc_down(p->c, pgc_error(p->c));
			return;
		}
		last = pgc_nresults(p->c) ? pgc_result(p->c, pgc_nresults(p->c) - 1) : NULL;
		if (last && PQntuples(last) == 1 && PQgetvalue(last, 0, 0)[0] == 't') {
			pg_up(p, "exclusive");
			pg_fetch(p, NULL);
		} else {
			pg_up(p, "standby");
			p->state = PG_STANDBY;
		}
		return;
	case PG_FETCHING:
		pg_fetch_done(p);
		return;
	case PG_CLOSING:
		if (pgc_error(p->c)) {
			pgc_down(p->c, pgc_error(p->c));
			return;
		}
		pg_next(p);
		return;
	default:
		/* A query answered in a state that sends none: a bug. */
		pgc_down(p->c, "internal error: unexpected query result");
		return;
	}
}

/* ---- life ---- */

static void pgsql_stop(void *state);

static int
pgsql_init(const struct sagad_host_api *api, struct sagad_host *h, void **state,
    char *err, size_t errlen)
{
	struct pgsrc *p;
	struct pgc_conf pc = { 0 };
	double batch = 100;
	const char *s;
	int b;

	if (codec_abi_check(api, err, errlen) < 0)
		return -1;
	p = xcalloc(1, sizeof *p);
	p->api = api;
	p->h = h;
	p->base = api->event_base(h);
	p->table = "sagad_outbox";
	p->poll_interval = 1;
	p->retry_initial = 0.5;
	p->retry_max = 30;
	p->connect_timeout = 10;
	p->query_timeout = 30;
	if (api->conf_string(h, "conninfo", &p->conninfo) < 0) {
		snprintf(err, errlen, "'conninfo' (a string, e.g. \"host=/run/postgresql dbname=orders\") is required");
		goto fail;
	}
	if (codec_conf_table(api, h, &p->table, err, errlen) < 0)
		goto fail;
	if (api->conf_string(h, "table", &s) < 0 &&
	    (api->conf_number(h, "table", &batch) == 0 || api->conf_bool(h, "table", &b) == 0)) {
		snprintf(err, errlen, "'table' must be a string");
		goto fail;
	}
	if (api->conf_string(h, "channel", &s) == 0) {
		if (!*s) {
			snprintf(err, errlen, "'channel' must not be empty");
			goto fail;
		}
		p->channel = s;
	}
	batch = 100;
	if (codec_conf_pacing(api, h, &p->poll_interval, &batch, &p->retry_initial, &p->retry_max,
	    err, errlen) < 0 ||
	    codec_conf_number(api, h, "connect_timeout", &p->connect_timeout, 0.1, err, errlen) < 0 ||
	    codec_conf_number(api, h, "query_timeout", &p->query_timeout, 0.1, err, errlen) < 0 ||
	    codec_conf_batch(batch, &p->batch_size, p->retry_initial, &p->retry_max, err, errlen) < 0)
		goto fail;
	if (api->conf_bool(h, "exclusive", &b) == 0)
		p->exclusive = b;
	else if (api->conf_string(h, "exclusive", &s) == 0 || api->conf_number(h, "exclusive", &batch) == 0) {
		snprintf(err, errlen, "'exclusive' must be true or false");
		goto fail;
	}
	pc.conninfo = p->conninfo;
	pc.connect_timeout = p->connect_timeout;
	pc.query_timeout = p->query_timeout;
	pc.retry_initial = p->retry_initial;
	pc.retry_max = p->retry_max;
	p->c = pgc_new(p->base, &pc, &pg_hooks, p);
	p->retry = evtimer_new(p->base, pg_retry_cb, p);
	p->poll = event_new(p->base, -1, EV_PERSIST, pg_poll_cb, p);
	codec_timer(p->poll, p->poll_interval);
	srand((unsigned)(time(NULL) ^ (uintptr_t)p));
	api->set_ready(h, 0, "connecting to PostgreSQL");
	SAGAD_LOG(api, h, SAGAD_LOG_INFO, "pgsql source starting", SAGAD_STR("table", p->table),
	    SAGAD_DBL("poll_interval", p->poll_interval), SAGAD_INT("batch", p->batch_size),
	    SAGAD_STR("exclusive", p->exclusive ? "true" : "false"));
	pgc_start(p->c);
	*state = p;
	return 0;
fail:
	free(p);
	return -1;
}

/* At shutdown the loop has stopped; sagad's last commit may just have
 * asked for a delete. Give it a moment to reach PostgreSQL (if it does
 * not, the rows are read again at the next start and dropped as
 * duplicates). */
static void
pgsql_stop(void *state)
{
	struct pgsrc *p = state;

	if (p->state == PG_FETCHING || p->state == PG_CLOSING)
		pgc_finish(p->c, 2);
	pgc_free(p->c);
	event_free(p->retry);
	event_free(p->poll);
	free(p->qtable);
	free(p->sql_lock);
	free(p->rows.seqs);
	free(p);
}

const struct sagad_plugin sagad_plugin = {
	.abi = SAGAD_PLUGIN_ABI,
	.name = "pgsql",
	.version = "1",
	.keys = pgsql_keys,
	.init = pgsql_init,
	.stop = pgsql_stop,
};
