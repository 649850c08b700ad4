/*
 * Drives src/pgconn.c against a real PostgreSQL (t/integration/pgconn.py
 * starts a private one): simple queries, pipelines (results in statement
 * order, the first error, the implicit transaction, a pipeline bigger than
 * the socket's buffers), the query deadline that drops the connection,
 * cancels the query and makes the connection again, the server-side
 * limits (statement and lock timeouts: transient errors), the errors'
 * classes, and prepared statements (parsed once, a skipped Parse sent
 * again, their plans discarded and made again on a table that grew). Usage: pgconn CONNINFO. Prints "ok: ..." for each
 * check, "FAIL: ..." and exits 1 at the first that fails.
 */
#include <event2/event.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pgconn.h"

struct run {
	struct event_base *base;
	struct pgc *c;
	int step;		/* the check whose query is in flight */
	int downs;
	int failed;
	const char *conninfo;
	PGconn *locker;		/* a second session, holding a lock */
	PGconn *control;	/* a session that never discards its plans */
};

static void run_next(struct run *r);
static void replan_cb(evutil_socket_t fd, short what, void *arg);

static void
check(struct run *r, int ok, const char *what)
{
	printf("%s: %s\n", ok ? "ok" : "FAIL", what);
	fflush(stdout);
	if (!ok) {
		r->failed = 1;
		event_base_loopbreak(r->base);
	}
}

static const char *
value(struct run *r, int i)
{
	PGresult *res = pgc_result(r->c, i);

	if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) < 1)
		return NULL;
	return PQgetvalue(res, 0, 0);
}

static int
value_is(struct run *r, int i, const char *want)
{
	const char *v = value(r, i);

	return v && strcmp(v, want) == 0;
}

/* A pipeline of n statements: insert x = 0 .. n-2, then count them. */
static void
send_big(struct run *r, int n)
{
	struct pgc_stmt *s = calloc((size_t)n, sizeof *s);
	char (*num)[16] = calloc((size_t)n, sizeof *num);
	const char **vals = calloc((size_t)n, sizeof *vals);
	int i;

	for (i = 0; i < n - 1; i++) {
		snprintf(num[i], sizeof num[i], "%d", i);
		vals[i] = num[i];
		s[i].sql = "INSERT INTO big(x, pad) VALUES ($1, repeat('x', 200)) RETURNING x";
		s[i].n = 1;
		s[i].values = &vals[i];
	}
	s[n - 1].sql = "SELECT count(*) FROM big";
	pgc_send_pipeline(r->c, s, n);
	free(s);
	free(num);
	free(vals);
}

#define BIG 2000

static void
run_next(struct run *r)
{
	static const char *const one[] = { "7" };
	const struct pgc_stmt ok3[] = {
		{ "CREATE TABLE t (x int PRIMARY KEY)", 0, NULL, NULL, NULL },
		{ "INSERT INTO t VALUES ($1) RETURNING x + 1", 1, one, NULL, NULL },
		{ "SELECT count(*) FROM t", 0, NULL, NULL, NULL },
	};
	const struct pgc_stmt bad[] = {
		{ "INSERT INTO t VALUES (8)", 0, NULL, NULL, NULL },
		{ "INSERT INTO t VALUES ($1)", 1, one, NULL, NULL },	/* duplicate key */
		{ "SELECT 1", 0, NULL, NULL, NULL },
	};
	const struct pgc_stmt after[] = {
		{ "SELECT count(*) FROM t", 0, NULL, NULL, NULL },
		{ "SELECT NULL::int IS NULL", 0, NULL, NULL, NULL },
	};
	const char *nul[] = { NULL };
	const struct pgc_stmt nulls[] = {
		{ "SELECT $1::int IS NULL", 1, nul, NULL, NULL },
	};
	static const char *const five[] = { "5" }, *const six[] = { "6" };
	/* prepared statements: a Parse aborted by an error before it is
	 * forgotten, and sent again; a statement used again is not parsed
	 * again */
	const struct pgc_stmt aborted[] = {
		{ "INSERT INTO t VALUES ($1)", 1, one, NULL, NULL },	/* duplicate key */
		{ "SELECT $1::int + 100", 1, five, NULL, NULL },
	};
	const struct pgc_stmt reparsed[] = {
		{ "SELECT $1::int + 100", 1, five, NULL, NULL },
		{ "SELECT count(*) FROM pg_prepared_statements WHERE statement ="
		    " 'SELECT $1::int + 100'", 0, NULL, NULL, NULL },
	};
	const struct pgc_stmt reused[] = {
		{ "SELECT $1::int + 100", 1, six, NULL, NULL },
		{ "SELECT count(*) FROM pg_prepared_statements WHERE statement ="
		    " 'SELECT $1::int + 100'", 0, NULL, NULL, NULL },
	};
	/* a generic plan made on 40 rows (a seq scan), then 100,000 rows */
	static const char *const k5[] = { "5" };
	const struct pgc_stmt grow_q = { "SELECT v FROM grow WHERE k = $1", 1, k5, NULL, NULL };
	const struct pgc_stmt grown[] = {
		grow_q, grow_q, grow_q, grow_q, grow_q, grow_q, grow_q,
	};
	const struct pgc_stmt regrown[] = {
		grow_q,
		/* this session's index scans of grow not yet reported: the
		 * statement's (nothing before it used the index) */
		{ "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables WHERE relname = 'grow'",
		    0, NULL, NULL, NULL },
	};
	struct timeval replan = { 1, 200000 };	/* past conf.replan_max */
	/* past the client's deadline: the server's statement_timeout off */
	const struct pgc_stmt slow[] = {
		{ "SET statement_timeout = 0", 0, NULL, NULL, NULL },
		{ "SELECT pg_sleep(5)", 0, NULL, NULL, NULL },
	};

	switch (r->step) {
	case 0:
		pgc_send(r->c, "SELECT 1; SELECT 2");
		break;
	case 1:
		pgc_send_pipeline(r->c, ok3, 3);
		break;
	case 2:
		pgc_send_pipeline(r->c, bad, 3);
		break;
	case 3:
		pgc_send_pipeline(r->c, after, 2);
		break;
	case 4:
		pgc_send_pipeline(r->c, nulls, 1);
		break;
	case 5:
		pgc_send(r->c, "CREATE TABLE big (x int, pad text)");
		break;
	case 6:
		send_big(r, BIG);
		break;
	case 7:
		pgc_send_pipeline(r->c, slow, 2);	/* the deadline is 1 s */
		break;
	case 8:
		pgc_send(r->c, "SELECT 42");
		break;
	case 9:
		/* the cancel is sent by a thread: give it a moment */
		pgc_send(r->c, "SELECT pg_sleep(0.5); SELECT count(*) FROM pg_stat_activity"
		    " WHERE query = 'SELECT pg_sleep(5)' AND state = 'active'");
		break;
	case 10:
		pgc_send(r->c, "SHOW statement_timeout; SHOW lock_timeout;"
		    " SHOW idle_in_transaction_session_timeout");
		break;
	case 11:
		pgc_send(r->c, "SELECT pg_sleep(5)");
		break;
	case 12:
		/* blocking, but this is a test */
		r->locker = PQconnectdb(r->conninfo);
		PQclear(PQexec(r->locker, "BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE"));
		pgc_send(r->c, "SELECT count(*) FROM t");
		break;
	case 13:
		PQclear(PQexec(r->locker, "COMMIT"));
		PQfinish(r->locker);
		r->locker = NULL;
		pgc_send(r->c, "SELECT count(*) FROM t");
		break;
	case 14:
		pgc_send_pipeline(r->c, aborted, 2);
		break;
	case 15:
		pgc_send_pipeline(r->c, reparsed, 2);
		break;
	case 16:
		pgc_send_pipeline(r->c, reused, 2);
		break;
	case 17:
		pgc_send(r->c, "CREATE TABLE grow (k int NOT NULL, v int NOT NULL)"
		    " WITH (autovacuum_enabled = false); CREATE INDEX grow_k ON grow(k);"
		    " INSERT INTO grow SELECT g, g FROM generate_series(1, 40) g; ANALYZE grow");
		break;
	case 18:
		/* five custom plans, then the generic one, cached */
		pgc_send_pipeline(r->c, grown, 7);
		break;
	case 19:
		pgc_send(r->c, "INSERT INTO grow SELECT g, g FROM generate_series(41, 100000) g");
		break;
	case 20:
		event_base_once(r->base, -1, EV_TIMEOUT, replan_cb, r, &replan);
		break;
	case 21:
		pgc_send_pipeline(r->c, regrown, 2);
		break;
	default:
		event_base_loopbreak(r->base);
	}
}

/* The control session: the statement of step 18 prepared and run as
 * often, before the table grows; its plan then (EXPLAIN's first line). */
static void
control_prepare(struct run *r)
{
	const char *k5[] = { "5" };
	int i;

	r->control = PQconnectdb(r->conninfo);
	PQclear(PQprepare(r->control, "q", "SELECT v FROM grow WHERE k = $1", 1, NULL));
	for (i = 0; i < 7; i++)
		PQclear(PQexecPrepared(r->control, "q", 1, k5, NULL, NULL, 0));
}

static int
control_seq_scan(struct run *r)
{
	PGresult *res = PQexec(r->control, "EXPLAIN EXECUTE q(5)");
	int seq = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) > 0 &&
	    strstr(PQgetvalue(res, 0, 0), "Seq Scan on grow") != NULL;

	PQclear(res);
	PQfinish(r->control);
	r->control = NULL;
	return seq;
}

static void
replan_cb(evutil_socket_t fd, short what, void *arg)
{
	struct run *r = arg;

	(void)fd;
	(void)what;
	r->step++;
	run_next(r);
}

static void
on_done(void *arg)
{
	struct run *r = arg;
	char what[160];

	switch (r->step) {
	case 0:
		check(r, pgc_nresults(r->c) == 2 && value_is(r, 0, "1") && value_is(r, 1, "2") &&
		    !pgc_error(r->c), "a simple query of two statements: two results");
		break;
	case 1:
		check(r, pgc_nresults(r->c) == 3 && !pgc_error(r->c) &&
		    PQresultStatus(pgc_result(r->c, 0)) == PGRES_COMMAND_OK &&
		    value_is(r, 1, "8") && value_is(r, 2, "1"),
		    "a pipeline of three: one result per statement, in order");
		break;
	case 2:
		check(r, pgc_nresults(r->c) == 3 && pgc_result(r->c, 0) &&
		    !pgc_result(r->c, 1) && !pgc_result(r->c, 2) && pgc_error(r->c) &&
		    strstr(pgc_error(r->c), "duplicate key") &&
		    strcmp(pgc_error_sqlstate(r->c), "23505") == 0 &&
		    pgc_error_class(r->c) == PGC_ERR_PERMANENT,
		    "an error in a pipeline: its statement and the later ones have no result;"
		    " a unique violation (23505) is permanent");
		break;
	case 3:
		check(r, value_is(r, 0, "1"), "the connection serves after the error, and the"
		    " statement before it was rolled back (one implicit transaction)");
		break;
	case 4:
		check(r, value_is(r, 0, "t"), "a NULL parameter is SQL NULL");
		break;
	case 5:
		check(r, !pgc_error(r->c), "table for the big pipeline");
		break;
	case 6:
		snprintf(what, sizeof what, "a pipeline of %d statements (past the socket buffers):"
		    " every result, in order", BIG);
		check(r, pgc_nresults(r->c) == BIG && !pgc_error(r->c) && value_is(r, 0, "0") &&
		    value_is(r, BIG - 2, "1998") && value_is(r, BIG - 1, "1999"), what);
		break;
	case 7:
		check(r, 0, "a pipeline past its deadline must not end normally");
		return;
	case 8:
		check(r, value_is(r, 0, "42") && r->downs == 1,
		    "after the deadline dropped it, the connection was made again and serves");
		break;
	case 9:
		check(r, value_is(r, 1, "0"), "the query past the deadline was cancelled:"
		    " it no longer runs on the server");
		break;
	case 10:
		check(r, value_is(r, 0, "800ms") && value_is(r, 1, "400ms") &&
		    value_is(r, 2, "1min"), "server-side limits: statement_timeout"
		    " 0.8 x query_timeout (1 s), lock_timeout half that, idle_in_transaction 1min");
		break;
	case 11:
		check(r, pgc_error(r->c) && strcmp(pgc_error_sqlstate(r->c), "57014") == 0 &&
		    pgc_error_class(r->c) == PGC_ERR_TRANSIENT, "the server's statement_timeout"
		    " ends a slow query before the client's deadline: 57014, transient");
		break;
	case 12:
		check(r, pgc_error(r->c) && strcmp(pgc_error_sqlstate(r->c), "55P03") == 0 &&
		    pgc_error_class(r->c) == PGC_ERR_TRANSIENT, "a lock held by another session"
		    " past lock_timeout: 55P03, transient");
		break;
	case 13:
		check(r, !pgc_error(r->c) && value_is(r, 0, "1"), "the lock released:"
		    " the same query succeeds");
		break;
	case 14:
		check(r, pgc_error(r->c) && !pgc_result(r->c, 1), "a new statement after an error"
		    " in its pipeline: no result (its Parse was skipped)");
		break;
	case 15:
		check(r, !pgc_error(r->c) && value_is(r, 0, "105") && value_is(r, 1, "1"),
		    "the statement whose Parse was skipped is parsed again, and prepared");
		break;
	case 16:
		check(r, !pgc_error(r->c) && value_is(r, 0, "106") && value_is(r, 1, "1"),
		    "a statement used again runs by its name: prepared once");
		break;
	case 17:
		check(r, !pgc_error(r->c), "a table of 40 rows, analyzed; another session prepares the same query");
		control_prepare(r);
		break;
	case 18:
		check(r, !pgc_error(r->c) && value_is(r, 6, "5"), "a statement run 7 times");
		break;
	case 19:
		check(r, !pgc_error(r->c) && control_seq_scan(r), "the table grown to 100,000"
		    " rows: a session that keeps its plans still scans all of it");
		break;		/* step 20 waits for the timer, which runs 21 */
	case 21:
		check(r, !pgc_error(r->c) && value_is(r, 0, "5") &&
		    PQgetisnull(pgc_result(r->c, 1), 0, 1) == 0 &&
		    strcmp(PQgetvalue(pgc_result(r->c, 1), 0, 1), "1") == 0,
		    "after replan_max, pgconn's plans were discarded: the index is used");
		break;
	}
	if (r->failed)
		return;
	r->step++;
	run_next(r);
}

static void
on_connecting(void *arg)
{
	(void)arg;
}

static void
on_connected(void *arg)
{
	struct run *r = arg;

	pgc_reset_backoff(r->c);
	run_next(r);
}

static void
on_notified(void *arg)
{
	(void)arg;
}

static void
on_down(void *arg, const char *why, double retry_in)
{
	struct run *r = arg;

	r->downs++;
	if (r->step == 7) {
		check(r, strstr(why, "timed out") != NULL, "a pipeline past its deadline:"
		    " the connection is dropped (query timed out)");
		r->step = 8;	/* run when connected again */
		return;
	}
	fprintf(stderr, "connection down (retry in %.1fs): %s\n", retry_in, why);
	check(r, 0, "the connection stays up");
}

int
main(int argc, char **argv)
{
	const struct pgc_hooks hooks = { on_connecting, on_connected, on_done, on_notified, on_down };
	struct pgc_conf conf = { NULL, 10, 1, 0.1, 1, NULL, NULL, 1, 1 };
	struct run r;

	if (argc != 2) {
		fprintf(stderr, "usage: pgconn CONNINFO\n");
		return 2;
	}
	memset(&r, 0, sizeof r);
	conf.conninfo = r.conninfo = argv[1];
	r.base = event_base_new();
	r.c = pgc_new(r.base, &conf, &hooks, &r);
	pgc_start(r.c);
	event_base_dispatch(r.base);
	if (!r.failed && r.step != 22) {
		printf("FAIL: stopped at check %d\n", r.step);
		r.failed = 1;
	}
	pgc_free(r.c);
	event_base_free(r.base);
	return r.failed;
}
