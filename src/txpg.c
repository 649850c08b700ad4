/*
 * A participant's prepared transactions in its service's PostgreSQL
 * (txpg.h): the queue of COMMIT PREPARED / ROLLBACK PREPARED, and the
 * start-up pass over pg_prepared_xacts, on one pgconn.
 */
#include "txpg.h"

#include <libpq-fe.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "pgconn.h"
#include "txpart.h"
#include "xmalloc.h"

enum txpg_state {
	TXPG_DOWN,		/* connecting, or waiting to reconnect */
	TXPG_SCANNING,		/* the start-up pass's query is in flight */
	TXPG_IDLE,
	TXPG_BUSY		/* a COMMIT/ROLLBACK PREPARED is in flight */
};

struct txpg_req {
	char *gid;
	int commit;
	txpg_done_fn *done;	/* NULL: the start-up pass's own */
	void *arg;
};

struct txpg {
	struct pgc *pg;
	struct pgc_conf cfg;
	char *conninfo, *sub, *prefix;
	struct txpart *tp;
	enum txpg_state state;
	struct txpg_req *q;	/* q[0] is in flight while BUSY */
	size_t nq, capq;
};

static void txpg_next(struct txpg *g);

static void
txpg_set_state(struct txpg *g, enum txpg_state to)
{
	g->state = to;
}

static void
txpg_req_end(struct txpg_req *r, enum txpg_result res, const char *why)
{
	if (r->done)
		r->done(r->arg, res, why);
	free(r->gid);
}

static void
txpg_push(struct txpg *g, const char *gid, int commit, txpg_done_fn *done, void *arg)
{
	struct txpg_req *r = XPUSH(g->q, g->nq, g->capq);

	r->gid = xstrdup(gid);
	r->commit = commit;
	r->done = done;
	r->arg = arg;
}

static void
txpg_pop(struct txpg *g)
{
	memmove(&g->q[0], &g->q[1], (g->nq - 1) * sizeof *g->q);
	g->nq--;
}

/* ---- the start-up pass ---- */

static void
txpg_resolve_one(struct txpg *g, const char *gid)
{
	struct txp_doubt_key key = { NULL, NULL, NULL, NULL };
	enum txp_state st = txpart_by_gid(g->tp, gid, &key);

	switch (st) {
	case TXP_COMMITTED:
	case TXP_ABORTED:
	case TXP_REFUSED:
		log_info("prepared transaction decided before: finished now",
		    LOG_STR("subscription", g->sub), LOG_STR("gid", gid),
		    LOG_STR("record", txp_state_names[st]));
		txpg_push(g, gid, st == TXP_COMMITTED, NULL, NULL);
		break;
	case TXP_PREPARED:
		log_info("prepared transaction awaiting its decision: the coordinator is asked",
		    LOG_STR("subscription", g->sub), LOG_STR("gid", gid));
		txpart_ask_now(g->tp, &key);
		break;
	default:
		log_warn("prepared transaction without a record: left as it is (its PREPARE "
		    "comes again, or an operator finishes it)", LOG_STR("subscription", g->sub),
		    LOG_STR("gid", gid));
		break;
	}
	txpart_key_free(&key);
}

static void
txpg_scan_done(struct txpg *g)
{
	PGresult *res = pgc_nresults(g->pg) ? pgc_result(g->pg, 0) : NULL;
	int i;

	if (pgc_error(g->pg) || !res) {
		pgc_down(g->pg, pgc_error(g->pg) ? pgc_error(g->pg) : "no result");
		return;
	}
	for (i = 0; i < PQntuples(res); i++)
		txpg_resolve_one(g, PQgetvalue(res, i, 0));
	txpg_set_state(g, TXPG_IDLE);
	txpg_next(g);
}

/* ---- the queue ---- */

static void
txpg_next(struct txpg *g)
{
	PGconn *conn = pgc_conn(g->pg);
	char *lit, *sql;

	if (g->state != TXPG_IDLE || !g->nq || !conn)
		return;
	if (!(lit = PQescapeLiteral(conn, g->q[0].gid, strlen(g->q[0].gid)))) {
		pgc_down(g->pg, PQerrorMessage(conn));
		return;
	}
	sql = xasprintf("%s PREPARED %s", g->q[0].commit ? "COMMIT" : "ROLLBACK", lit);
	PQfreemem(lit);
	txpg_set_state(g, TXPG_BUSY);
	pgc_send(g->pg, sql);
	free(sql);
}

/* 42704 undefined_object: no prepared transaction of that gid, so it was
 * finished before (by this sagad before a crash, or by an operator). */
static void
txpg_finish_done(struct txpg *g)
{
	struct txpg_req r = g->q[0];
	const char *err = pgc_error(g->pg);

	txpg_pop(g);
	txpg_set_state(g, TXPG_IDLE);
	if (!err) {
		log_info(r.commit ? "prepared transaction committed" :
		    "prepared transaction rolled back", LOG_STR("subscription", g->sub),
		    LOG_STR("gid", r.gid));
		txpg_req_end(&r, TXPG_DONE, NULL);
	} else if (strcmp(pgc_error_sqlstate(g->pg), "42704") == 0) {
		log_info("prepared transaction already finished", LOG_STR("subscription", g->sub),
		    LOG_STR("gid", r.gid));
		txpg_req_end(&r, TXPG_DONE, NULL);
	} else {
		log_warn("prepared transaction not finished: tried again later",
		    LOG_STR("subscription", g->sub), LOG_STR("gid", r.gid), LOG_STR("error", err));
		txpg_req_end(&r, TXPG_FAILED, err);
	}
	txpg_next(g);
}

/* ---- the connection's hooks ---- */

static void
txpg_connecting(void *arg)
{
	(void)arg;
}

static void
txpg_connected(void *arg)
{
	struct txpg *g = arg;
	const char *p[1] = { g->prefix };

	txpg_set_state(g, TXPG_SCANNING);
	pgc_send_params(g->pg, "SELECT gid FROM pg_prepared_xacts WHERE database ="
	    " current_database() AND left(gid, length($1)) = $1 ORDER BY prepared", 1, p);
}

static void
txpg_done(void *arg)
{
	struct txpg *g = arg;

	if (g->state == TXPG_SCANNING)
		txpg_scan_done(g);
	else if (g->state == TXPG_BUSY)
		txpg_finish_done(g);
}

static void
txpg_notified(void *arg)
{
	(void)arg;
}

/* Everything queued fails now: the owners try again after their backoff
 * (the start-up pass runs again on the next connect). */
static void
txpg_down(void *arg, const char *why, double retry_in)
{
	struct txpg *g = arg;
	struct txpg_req *q = g->q;
	size_t n = g->nq, i;

	if (g->state != TXPG_DOWN)
		log_warn("service's PostgreSQL lost: prepared transactions wait",
		    LOG_STR("subscription", g->sub), LOG_STR("error", why),
		    LOG_DBL("retry_in", retry_in));
	txpg_set_state(g, TXPG_DOWN);
	g->q = NULL;
	g->nq = g->capq = 0;
	for (i = 0; i < n; i++)
		txpg_req_end(&q[i], TXPG_FAILED, why);
	free(q);
}

static const struct pgc_hooks txpg_hooks = {
	txpg_connecting, txpg_connected, txpg_done, txpg_notified, txpg_down
};

/* ---- life ---- */

struct txpg *
txpg_new(struct event_base *base, const char *conninfo, const char *sub, const char *service,
    struct txpart *tp)
{
	struct txpg *g = xcalloc(1, sizeof *g);

	g->conninfo = xstrdup(conninfo);
	g->sub = xstrdup(sub);
	g->prefix = xasprintf("sagad:%s:", service);
	g->tp = tp;
	g->cfg.conninfo = g->conninfo;
	g->cfg.connect_timeout = 5;
	g->cfg.query_timeout = 30;
	g->cfg.retry_initial = 0.2;
	g->cfg.retry_max = 10;
	g->cfg.server_limits = 1;
	g->pg = pgc_new(base, &g->cfg, &txpg_hooks, g);
	pgc_start(g->pg);
	return g;
}

void
txpg_finish(struct txpg *g, const char *gid, int commit, txpg_done_fn *done, void *arg)
{
	if (g->state == TXPG_DOWN) {
		done(arg, TXPG_FAILED, "the service's PostgreSQL is not connected");
		return;
	}
	txpg_push(g, gid, commit, done, arg);
	txpg_next(g);
}

void
txpg_free(struct txpg *g)
{
	size_t i;

	if (!g)
		return;
	for (i = 0; i < g->nq; i++)
		txpg_req_end(&g->q[i], TXPG_CANCELLED, NULL);
	free(g->q);
	g->nq = 0;
	pgc_free(g->pg);
	free(g->conninfo);
	free(g->sub);
	free(g->prefix);
	free(g);
}
