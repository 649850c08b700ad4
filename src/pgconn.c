/*
 * One asynchronous libpq connection on a libevent loop (pgconn.h).
 *
 *   down -(timer)-> connecting -(PQconnectPoll OK)-> up
 *   connecting -(connect deadline, failure)-> down
 *   up -(error, query deadline, pgc_down)-> down, connect again after the
 *       backoff
 *
 * One timer serves the three waits: the reconnect (down), the connect
 * deadline (connecting) and the query deadline (up, a query in flight).
 *
 * A query in flight is either one simple query (pgc_send, pgc_send_params:
 * its results end with a NULL from PQgetResult) or a pipeline
 * (pgc_send_pipeline: each statement's results end with a NULL, and the
 * whole with PGRES_PIPELINE_SYNC, after which the connection leaves
 * pipeline mode). pgc_take sorts the results of both.
 *
 * A pipeline's statements are prepared (named, once per connection, the
 * Parse sent in the same pipeline ahead of the first use): the saga store
 * and its relay send the same few statements all the time, and PostgreSQL
 * spent as much CPU planning them as running them (bench/README.md,
 * session 11). The cache is keyed by the SQL text and bounded; a Parse
 * that did not succeed (an error earlier in its pipeline) is forgotten at
 * the pipeline's end, and the whole cache with the connection.
 *
 * A prepared statement keeps its generic plan until the tables it reads
 * are analyzed again, and a plan made while they were nearly empty is the
 * wrong one once they hold thousands of rows (a scan of every instance
 * for each saga step: bench/README.md, session 13). So a pipeline begins
 * now and then with DISCARD PLANS, which keeps the statements and drops
 * their plans: 1 s after the connect, then 2, 4... up to every
 * PGC_REPLAN_MAX seconds (pgc_conf.replan_max), so that the first minutes
 * of a new schema, when its tables grow fastest, are replanned most often.
 */
#include <errno.h>
#include <event2/event.h>
#include <libpq-fe.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pgconn.h"
#include "util.h"
#include "xmalloc.h"

#define PGC_PREPARED_MAX 128	/* statements kept prepared; others unnamed */
#define PGC_REPLAN_MAX 60.0	/* seconds between DISCARD PLANS, at most */
#define PGC_ITEM_DROP (INT32_MIN + 1)	/* a pipeline item whose result is dropped */

/* A statement prepared on the connection as "sagad_<slot>". */
struct pgc_prep {
	char *sql;		/* NULL: a free slot */
	uint64_t hash;
	int ready;		/* its Parse succeeded (0: in the pipeline in flight) */
};

/* SETUP: connected, the conf's search_path and session settings sent. */
enum pgc_phase { PGC_DOWN, PGC_CONNECTING, PGC_SETUP, PGC_UP };

struct pgc {
	struct event_base *base;
	struct pgc_conf conf;
	struct pgc_hooks hooks;
	void *arg;

	enum pgc_phase phase;
	PGconn *conn;
	struct event *io;	/* persistent read on the socket */
	struct event *wev;	/* one-shot: connect wait or output to flush */
	struct event *timer;	/* reconnect, connect and query deadlines */
	unsigned long gen;	/* bumped at every disconnect */
	double backoff;
	int busy;		/* a query is in flight */
	int flushing;

	/* the current query's results */
	PGresult **res;
	int nres, capres;
	char *err;
	char sqlstate[6];	/* the first error's, or "" */
	int npipe;		/* items of the pipeline in flight, or 0 */
	int pipe_at;		/* the item whose results come now */
	int *item;		/* per item: its statement, -1 - slot: a Parse,
				 * or PGC_ITEM_DROP */
	int capitem;
	double replan_at;	/* util_mono() when plans are next discarded */
	double replan_every;	/* seconds, doubling up to PGC_REPLAN_MAX */

	struct pgc_prep prep[PGC_PREPARED_MAX];
};

static void pgc_connect(struct pgc *c);
static void pgc_setup(struct pgc *c);
static void pgc_setup_done(struct pgc *c);
static void pgc_prep_sweep(struct pgc *c, int all);

/* Arms ev to fire in sec seconds. */
static void
pgc_arm(struct event *ev, double sec)
{
	double whole = floor(sec);
	struct timeval tv = { (time_t)whole, (suseconds_t)((sec - whole) * 1e6) };

	event_add(ev, &tv);
}

/* The first error is the one that matters (r: its result, or NULL). */
static void
pgc_set_err(struct pgc *c, const char *msg, const PGresult *r)
{
	const char *st = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;

	if (c->err)
		return;
	c->err = strdup(msg);
	snprintf(c->sqlstate, sizeof c->sqlstate, "%s", st ? st : "");
}

/* Classes and codes by the PostgreSQL manual's Appendix A. */
enum pgc_err_class
pgc_sqlstate_class(const char *st)
{
	static const char *const transient[] = {
		"40P01",	/* deadlock_detected */
		"40001",	/* serialization_failure */
		"55P03",	/* lock_not_available: lock_timeout */
		"57014",	/* query_canceled: statement_timeout, a cancel */
		NULL
	};
	int i;

	if (!st || strlen(st) != 5)
		return PGC_ERR_RECONNECT;	/* libpq's own: the link */
	for (i = 0; transient[i]; i++)
		if (strcmp(st, transient[i]) == 0)
			return PGC_ERR_TRANSIENT;
	if (strcmp(st, "25006") == 0)	/* read_only_sql_transaction */
		return PGC_ERR_RECONNECT;
	if (strncmp(st, "08", 2) == 0)	/* connection exception */
		return PGC_ERR_RECONNECT;
	if (strncmp(st, "57P", 3) == 0)	/* admin/crash shutdown, cannot connect now */
		return PGC_ERR_RECONNECT;
	if (strncmp(st, "53", 2) == 0 || strncmp(st, "57", 2) == 0)
		return PGC_ERR_TRANSIENT;	/* insufficient resources, operator */
	return PGC_ERR_PERMANENT;
}

enum pgc_err_class
pgc_error_class(const struct pgc *c)
{
	return pgc_sqlstate_class(c->sqlstate);
}

const char *
pgc_error_sqlstate(const struct pgc *c)
{
	return c->sqlstate;
}

static void
pgc_clear_results(struct pgc *c)
{
	int i;

	for (i = 0; i < c->nres; i++)
		if (c->res[i])
			PQclear(c->res[i]);
	c->nres = 0;
	c->npipe = 0;
	free(c->err);
	c->err = NULL;
	c->sqlstate[0] = '\0';
}

/* Room for n results, all NULL. */
static void
pgc_reserve(struct pgc *c, int n)
{
	if (n > c->capres) {
		c->res = xreallocarray(c->res, (size_t)n, sizeof *c->res);
		c->capres = n;
	}
	memset(c->res, 0, (size_t)n * sizeof *c->res);
}

/* Drop the connection and connect again after the backoff (with jitter,
 * so that replicas do not reconnect in step). */
void
pgc_down(struct pgc *c, const char *why)
{
	c->gen++;
	c->hooks.down(c->arg, why ? why : "connection lost", c->backoff);
	if (c->io) {
		event_free(c->io);
		c->io = NULL;
	}
	if (c->wev) {
		event_free(c->wev);
		c->wev = NULL;
	}
	event_del(c->timer);
	if (c->conn) {
		PQfinish(c->conn);
		c->conn = NULL;
	}
	pgc_clear_results(c);
	pgc_prep_sweep(c, 1);	/* a new session prepares anew */
	c->busy = 0;
	c->flushing = 0;
	c->phase = PGC_DOWN;
	pgc_arm(c->timer, c->backoff * (0.75 + 0.5 * ((double)rand() / RAND_MAX)));
	c->backoff = fmin(c->backoff * 2, c->conf.retry_max);
}

void
pgc_reset_backoff(struct pgc *c)
{
	c->backoff = c->conf.retry_initial;
}

static void
pgc_flush(struct pgc *c)
{
	int r = PQflush(c->conn);

	if (r < 0) {
		pgc_down(c, PQerrorMessage(c->conn));
		return;
	}
	c->flushing = r == 1;
	if (r == 1)
		event_add(c->wev, NULL);
}

static void
pgc_write_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	pgc_flush(arg);
}

/* A query was handed to libpq (ok) or not: its results arrive through
 * pgc_io_cb and end in the done hook. */
static void
pgc_sent(struct pgc *c, int ok)
{
	if (!ok) {
		pgc_down(c, PQerrorMessage(c->conn));
		return;
	}
	c->busy = 1;
	pgc_arm(c->timer, c->conf.query_timeout);
	pgc_flush(c);
}

/* Room for one more result of a simple query. */
static void
pgc_reserve_more(struct pgc *c)
{
	if (c->nres == c->capres) {
		c->capres = c->capres ? c->capres * 2 : 8;
		c->res = xreallocarray(c->res, (size_t)c->capres, sizeof *c->res);
	}
}

/* ---- prepared statements ---- */

/* The slot of sql, prepared or in this pipeline; else a new slot for it
 * (*parse set: send its Parse), or -1 when the cache is full. */
static int
pgc_prep_slot(struct pgc *c, const char *sql, int *parse)
{
	uint64_t h = util_fnv1a(sql);
	int i, free_slot = -1;

	*parse = 0;
	for (i = 0; i < PGC_PREPARED_MAX; i++) {
		if (!c->prep[i].sql) {
			if (free_slot < 0)
				free_slot = i;
			continue;
		}
		if (c->prep[i].hash == h && strcmp(c->prep[i].sql, sql) == 0)
			return i;
	}
	if (free_slot >= 0) {
		c->prep[free_slot].sql = xstrdup(sql);
		c->prep[free_slot].hash = h;
		c->prep[free_slot].ready = 0;
		*parse = 1;
	}
	return free_slot;
}

/* Forgets the Parses that did not succeed (all: the connection is gone). */
static void
pgc_prep_sweep(struct pgc *c, int all)
{
	int i;

	for (i = 0; i < PGC_PREPARED_MAX; i++)
		if (c->prep[i].sql && (all || !c->prep[i].ready)) {
			free(c->prep[i].sql);
			c->prep[i].sql = NULL;
		}
}

static void
pgc_item_add(struct pgc *c, int v)
{
	if (c->npipe == c->capitem) {
		c->capitem = c->capitem ? c->capitem * 2 : 16;
		c->item = xreallocarray(c->item, (size_t)c->capitem, sizeof *c->item);
	}
	c->item[c->npipe++] = v;
}

/* One result of a pipeline's item: its statement's (the first), or a
 * Parse's success. */
static void
pgc_pipe_keep(struct pgc *c, PGresult *r)
{
	int it = c->pipe_at < c->npipe ? c->item[c->pipe_at] : INT32_MIN;

	if (it >= 0 && !c->res[it]) {
		c->res[it] = r;
		return;
	}
	if (it < 0 && it != INT32_MIN && it != PGC_ITEM_DROP)
		c->prep[-1 - it].ready = 1;
	PQclear(r);	/* a Parse's, or a second result of one statement */
}

/*
 * One result of the query in flight (NULL: the end of a query, or of one
 * statement of a pipeline). Returns 1 when the whole has ended. Errors are
 * not kept as results: the first one is pgc_error; in a pipeline its
 * statement's result, and those of the statements that the error aborted,
 * stay NULL.
 */
static int
pgc_take(struct pgc *c, PGresult *r)
{
	ExecStatusType st = r ? PQresultStatus(r) : PGRES_EMPTY_QUERY;

	if (!r) {
		if (!c->npipe)
			return 1;
		c->pipe_at++;
		return 0;
	}
	switch (st) {
	case PGRES_PIPELINE_SYNC:
		PQclear(r);
		PQexitPipelineMode(c->conn);
		c->npipe = 0;
		pgc_prep_sweep(c, 0);
		return 1;
	case PGRES_PIPELINE_ABORTED:
		PQclear(r);
		break;
	case PGRES_FATAL_ERROR:
	case PGRES_BAD_RESPONSE:
	case PGRES_NONFATAL_ERROR:
		pgc_set_err(c, PQresultErrorMessage(r), r);
		PQclear(r);
		break;
	default:
		if (c->npipe) {
			pgc_pipe_keep(c, r);
		} else {
			pgc_reserve_more(c);
			c->res[c->nres++] = r;
		}
	}
	return 0;
}

void
pgc_send(struct pgc *c, const char *sql)
{
	pgc_clear_results(c);
	pgc_sent(c, PQsendQuery(c->conn, sql));
}

void
pgc_send_params(struct pgc *c, const char *sql, int n, const char *const *values)
{
	pgc_clear_results(c);
	pgc_sent(c, PQsendQueryParams(c->conn, sql, n, NULL, values, NULL, NULL, 0));
}

/* Sends statement i of s: its Parse first if it is new to the connection,
 * then it by name; unnamed when the cache is full. */
static int
pgc_send_stmt(struct pgc *c, const struct pgc_stmt *s, int i)
{
	char name[24];
	int parse, slot = pgc_prep_slot(c, s->sql, &parse);

	if (slot < 0) {
		pgc_item_add(c, i);
		return PQsendQueryParams(c->conn, s->sql, s->n, NULL, s->values, s->lengths,
		    s->formats, 0);
	}
	snprintf(name, sizeof name, "sagad_%d", slot);
	if (parse) {
		pgc_item_add(c, -1 - slot);
		if (!PQsendPrepare(c->conn, name, s->sql, s->n, NULL))
			return 0;
	}
	pgc_item_add(c, i);
	return PQsendQueryPrepared(c->conn, name, s->n, s->values, s->lengths, s->formats, 0);
}

void
pgc_send_pipeline(struct pgc *c, const struct pgc_stmt *s, int n)
{
	int i, ok;

	pgc_clear_results(c);
	pgc_reserve(c, n);
	c->nres = n;
	c->npipe = 0;
	c->pipe_at = 0;
	ok = PQenterPipelineMode(c->conn);
	if (ok && util_mono() >= c->replan_at) {
		/* not transactional: fine ahead of the pipeline's BEGIN */
		pgc_item_add(c, PGC_ITEM_DROP);
		ok = PQsendQueryParams(c->conn, "DISCARD PLANS", 0, NULL, NULL, NULL, NULL, 0);
		c->replan_every = fmin(2 * c->replan_every,
		    c->conf.replan_max > 0 ? c->conf.replan_max : PGC_REPLAN_MAX);
		c->replan_at = util_mono() + c->replan_every;
	}
	for (i = 0; ok && i < n; i++)
		ok = pgc_send_stmt(c, &s[i], i);
	if (ok)
		ok = PQpipelineSync(c->conn);
	pgc_sent(c, ok);	/* not ok: down, which leaves pipeline mode */
}

static void
pgc_notified(struct pgc *c)
{
	PGnotify *n;
	int got = 0;

	while (c->conn && (n = PQnotifies(c->conn))) {
		PQfreemem(n);
		got++;
	}
	if (got)
		c->hooks.notified(c->arg);
}

static void
pgc_io_cb(evutil_socket_t fd, short what, void *arg)
{
	struct pgc *c = arg;
	unsigned long gen = c->gen;

	(void)fd;
	(void)what;
	if (!PQconsumeInput(c->conn)) {
		pgc_down(c, PQerrorMessage(c->conn));
		return;
	}
	if (c->flushing) {
		pgc_flush(c);
		if (gen != c->gen)
			return;
	}
	while (c->busy && !PQisBusy(c->conn)) {
		if (pgc_take(c, PQgetResult(c->conn))) {
			c->busy = 0;
			event_del(c->timer);
			if (c->phase == PGC_SETUP) {
				pgc_setup_done(c);
				return;
			}
			c->hooks.done(c->arg);
			if (gen != c->gen)
				return;
		}
	}
	if (PQstatus(c->conn) == CONNECTION_BAD) {
		pgc_down(c, PQerrorMessage(c->conn));
		return;
	}
	pgc_notified(c);
}

static void pgc_connect_poll(struct pgc *c, PostgresPollingStatusType st);

static void
pgc_connect_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	pgc_connect_poll(arg, PQconnectPoll(((struct pgc *)arg)->conn));
}

static void
pgc_connect_wait(struct pgc *c, short what)
{
	if (c->wev)
		event_free(c->wev);
	/* The socket may change while libpq tries the hosts in turn. */
	c->wev = event_new(c->base, PQsocket(c->conn), what, pgc_connect_cb, c);
	event_add(c->wev, NULL);
}

static void
pgc_connect_poll(struct pgc *c, PostgresPollingStatusType st)
{
	switch (st) {
	case PGRES_POLLING_READING:
		pgc_connect_wait(c, EV_READ);
		return;
	case PGRES_POLLING_WRITING:
		pgc_connect_wait(c, EV_WRITE);
		return;
	case PGRES_POLLING_FAILED:
		pgc_down(c, PQerrorMessage(c->conn));
		return;
	case PGRES_POLLING_OK:
		break;
	default:		/* PGRES_POLLING_ACTIVE, unused since 7.4 */
		pgc_connect_wait(c, EV_WRITE);
		return;
	}
	event_del(c->timer);
	event_free(c->wev);
	c->wev = NULL;
	if (PQsetnonblocking(c->conn, 1) != 0) {
		pgc_down(c, PQerrorMessage(c->conn));
		return;
	}
	c->phase = PGC_UP;
	c->wev = event_new(c->base, PQsocket(c->conn), EV_WRITE, pgc_write_cb, c);
	c->io = event_new(c->base, PQsocket(c->conn), EV_READ | EV_PERSIST, pgc_io_cb, c);
	event_add(c->io, NULL);
	if (c->conf.schema || c->conf.session || c->conf.server_limits)
		pgc_setup(c);
	else
		c->hooks.connected(c->arg);
}

/* The server-side limits (pgc_conf.server_limits), in milliseconds, or
 * "" without them. */
static char *
pgc_limits_sql(const struct pgc *c)
{
	double stmt = c->conf.query_timeout - PGC_STATEMENT_MARGIN;

	if (!c->conf.server_limits)
		return xstrdup("");
	if (stmt < c->conf.query_timeout * 0.8)	/* a short query_timeout */
		stmt = c->conf.query_timeout * 0.8;
	return xasprintf("SET statement_timeout = %.0f; SET lock_timeout = %.0f;"
	    " SET idle_in_transaction_session_timeout = %d; ", stmt * 1000,
	    fmin(stmt / 2, PGC_LOCK_TIMEOUT) * 1000, PGC_IDLE_TX_TIMEOUT * 1000);
}

/* The session as the owner wants it, before the owner's first query. */
static void
pgc_setup(struct pgc *c)
{
	char *q = c->conf.schema ?
	    PQescapeIdentifier(c->conn, c->conf.schema, strlen(c->conf.schema)) : NULL;
	char *sql, *limits;

	if (c->conf.schema && !q) {
		pgc_down(c, PQerrorMessage(c->conn));
		return;
	}
	limits = pgc_limits_sql(c);
	/* The owner's session settings last: they may override the limits. */
	sql = xasprintf("%s%s%s%s%s", limits, q ? "SET search_path TO " : "", q ? q : "",
	    q && c->conf.session ? "; " : "", c->conf.session ? c->conf.session : "");
	free(limits);
	PQfreemem(q);
	c->phase = PGC_SETUP;
	pgc_send(c, sql);
	free(sql);
}

static void
pgc_setup_done(struct pgc *c)
{
	if (c->err) {
		char *why = xstrdup(c->err);
		pgc_down(c, why);
		free(why);
		return;
	}
	c->phase = PGC_UP;
	c->replan_every = 1;
	c->replan_at = util_mono() + c->replan_every;
	c->hooks.connected(c->arg);
}

static void
pgc_connect(struct pgc *c)
{
	/* The conninfo is expanded from dbname; the later keywords override
	 * it: sagad always talks UTF-8. */
	const char *kw[] = { "dbname", "client_encoding", "fallback_application_name", NULL };
	const char *val[] = { c->conf.conninfo, "UTF8", "sagad", NULL };

	c->phase = PGC_CONNECTING;
	c->hooks.connecting(c->arg);
	c->conn = PQconnectStartParams(kw, val, 1);
	if (!c->conn) {
		pgc_down(c, "out of memory");
		return;
	}
	if (PQstatus(c->conn) == CONNECTION_BAD) {
		pgc_down(c, PQerrorMessage(c->conn));
		return;
	}
	/* libpq's connect_timeout does not apply to a non-blocking connect. */
	pgc_arm(c->timer, c->conf.connect_timeout);
	pgc_connect_poll(c, PGRES_POLLING_WRITING);
}

/* PQcancel connects to the server anew and waits for it: off the loop,
 * so that an unreachable server cannot stall it (libpq 17's non-blocking
 * PQcancelStart would do; Debian 12 has libpq 15). */
static void *
pgc_cancel_thread(void *arg)
{
	PGcancel *k = arg;
	char buf[256];

	PQcancel(k, buf, sizeof buf);	/* best effort: the server stops it anyway */
	PQfreeCancel(k);
	return NULL;
}

/*
 * The query in flight is given up: ask the server to cancel it before the
 * connection goes, or it runs on, holding its locks, until the server sees
 * the connection closed (at its next write, or its statement_timeout).
 */
static void
pgc_cancel(struct pgc *c)
{
	PGcancel *k = PQgetCancel(c->conn);
	pthread_attr_t at;
	pthread_t t;
	int r;

	if (!k)
		return;
	pthread_attr_init(&at);
	pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
	r = pthread_create(&t, &at, pgc_cancel_thread, k);
	pthread_attr_destroy(&at);
	if (r != 0)
		pgc_cancel_thread(k);
}

static void
pgc_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct pgc *c = arg;

	(void)fd;
	(void)what;
	switch (c->phase) {
	case PGC_DOWN:
		pgc_connect(c);
		break;
	case PGC_CONNECTING:
		pgc_down(c, "cannot connect to PostgreSQL: timed out");
		break;
	case PGC_SETUP:
	case PGC_UP:
		if (c->busy) {
			char why[100];
			snprintf(why, sizeof why, "query timed out after %gs, cancelled",
			    c->conf.query_timeout);
			pgc_cancel(c);
			pgc_down(c, why);
		}
		break;
	}
}

struct pgc *
pgc_new(struct event_base *base, const struct pgc_conf *conf, const struct pgc_hooks *hooks,
    void *arg)
{
	struct pgc *c = xcalloc(1, sizeof *c);

	c->base = base;
	c->conf = *conf;
	c->hooks = *hooks;
	c->arg = arg;
	c->backoff = conf->retry_initial;
	c->timer = evtimer_new(base, pgc_timer_cb, c);
	return c;
}

void
pgc_start(struct pgc *c)
{
	pgc_connect(c);
}

int
pgc_nresults(const struct pgc *c)
{
	return c->nres;
}

PGresult *
pgc_result(const struct pgc *c, int i)
{
	return c->res[i];
}

PGresult *
pgc_take_result(struct pgc *c, int i)
{
	PGresult *r = c->res[i];

	c->res[i] = NULL;
	return r;
}

const char *
pgc_error(const struct pgc *c)
{
	return c->err;
}

PGconn *
pgc_conn(const struct pgc *c)
{
	return c->conn;
}

unsigned long
pgc_gen(const struct pgc *c)
{
	return c->gen;
}

void
pgc_finish(struct pgc *c, double sec)
{
	double deadline = util_mono() + sec;

	if (!c->conn || PQstatus(c->conn) != CONNECTION_OK)
		return;
	while (c->busy && util_mono() < deadline) {
		struct pollfd pfd = { PQsocket(c->conn), POLLIN | (c->flushing ? POLLOUT : 0), 0 };
		int ms = (int)((deadline - util_mono()) * 1000) + 1;
		if (poll(&pfd, 1, ms) < 0 && errno != EINTR)
			break;
		if (c->flushing) {
			int r = PQflush(c->conn);
			if (r < 0)
				break;
			c->flushing = r == 1;
		}
		if (!PQconsumeInput(c->conn))
			break;
		while (c->busy && !PQisBusy(c->conn))
			if (pgc_take(c, PQgetResult(c->conn)))
				c->busy = 0;
	}
}

void
pgc_free(struct pgc *c)
{
	if (c->io)
		event_free(c->io);
	if (c->wev)
		event_free(c->wev);
	event_free(c->timer);
	if (c->conn)
		PQfinish(c->conn);
	pgc_clear_results(c);
	pgc_prep_sweep(c, 1);
	free(c->res);
	free(c->item);
	free(c);
}
