/*
 * The PostgreSQL saga outbox relay (saga_pg_relay.h).
 *
 * The rows it holds live in one array sorted by seq (r->rows), each
 * waiting, in flight (sent on the current broker epoch) or confirmed (its
 * delete not yet committed). At most one query is in flight on the
 * PostgreSQL connection; it is a pipeline (one round trip, one implicit
 * transaction) of what is due: the claim's lock, the deletes of confirmed
 * rows, the refresh of this replica's claims, the claim of more rows.
 * What comes back in the meantime waits for the next one: deletes batch by
 * themselves.
 */
#include "saga_pg_relay.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "broker.h"
#include "conf.h"
#include "log.h"
#include "pgconn.h"
#include "props.h"
#include "util.h"
#include "xmalloc.h"

#define SAGA_PG_RELAY_WINDOW 256	/* most rows in flight */
#define SAGA_PG_RELAY_POLL 1.0	/* seconds between looks for stale rows */

enum saga_pg_relay_state {
	SAGA_PG_RELAY_WAITING,	/* to publish (due: not before) */
	SAGA_PG_RELAY_SENT,	/* published on r->epoch, unconfirmed */
	SAGA_PG_RELAY_DONE	/* confirmed: to delete */
};

struct saga_pg_relay_row {
	struct msg *m;		/* ours; the broker gets a copy each time */
	char *saga_id;		/* NULL: no order to keep */
	enum saga_pg_relay_state state;
	int deleting;		/* its DELETE is in the query in flight */
	unsigned attempts;	/* nacks and returns so far */
	double due;		/* util_mono() before which it waits */
};

/* What the query in flight holds: statement indexes, -1 if absent. */
struct saga_pg_relay_query {
	int del, claim;
	int limit;		/* rows the claim asked for */
};

struct saga_pg_relay {
	struct event_base *base;
	const struct sagad_conf *conf;
	char *conninfo, *schema, *service, *replica;
	double grace;
	unsigned window;
	size_t max_held;

	struct pgc *pg;
	int pg_up;
	int busy;		/* a query is in flight */
	struct saga_pg_relay_query q;
	char *sql_lock, *sql_delete, *sql_refresh, *sql_claim;
	char lock_key[24];	/* the claim's advisory lock, as text */
	int want_claim;		/* kicked, polled, or a full claim: look */
	double refreshed;	/* util_mono() of the last refresh sent */

	struct broker *br;
	uint64_t epoch;		/* of the broker connection; 0: down */
	int blocked;		/* connection.blocked */

	struct saga_pg_relay_row *rows;
	size_t nrows, caprows;
	unsigned inflight;

	struct event *fill_ev;	/* publish: once per loop turn */
	struct event *poll_ev;	/* every SAGA_PG_RELAY_POLL */
	struct event *retry_ev;	/* the earliest backoff's end */
	struct event *pump_ev;	/* the next query, after the hook returns */
	struct saga_pg_relay_stats stats;
};

static void saga_pg_relay_pump(struct saga_pg_relay *r);

/* ---- rows ---- */

static struct msg *
saga_pg_relay_msg_copy(const struct msg *m)
{
	struct msg *c = xcalloc(1, sizeof *c);
	char **f[] = { &c->props.content_type, &c->props.correlation_id, &c->props.type,
	    &c->props.expiration, &c->props.reply_to };
	char *const src[] = { m->props.content_type, m->props.correlation_id, m->props.type,
	    m->props.expiration, m->props.reply_to };
	size_t i;

	c->seq = m->seq;
	c->message_id = xstrdup(m->message_id);
	c->exchange = xstrdup(m->exchange);
	c->routing_key = xstrdup(m->routing_key);
	for (i = 0; i < sizeof f / sizeof f[0]; i++)
		*f[i] = src[i] ? xstrdup(src[i]) : NULL;
	for (i = 0; i < m->props.n_headers; i++)
		props_set_header(&c->props, m->props.headers[i].name, m->props.headers[i].value);
	c->body = xmalloc(m->body_len + 1);
	memcpy(c->body, m->body, m->body_len);
	c->body[m->body_len] = '\0';
	c->body_len = m->body_len;
	c->attempts = m->attempts;
	c->created_at = m->created_at;
	return c;
}

/* The index of seq, or of where it would go. */
static size_t
saga_pg_relay_find(const struct saga_pg_relay *r, int64_t seq)
{
	size_t lo = 0, hi = r->nrows;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (r->rows[mid].m->seq < seq)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

static struct saga_pg_relay_row *
saga_pg_relay_row(struct saga_pg_relay *r, int64_t seq)
{
	size_t i = saga_pg_relay_find(r, seq);

	return i < r->nrows && r->rows[i].m->seq == seq ? &r->rows[i] : NULL;
}

/* Takes m and saga_id; a seq already held is dropped (it cannot be: the
 * claim leaves out what is held). */
static void
saga_pg_relay_add(struct saga_pg_relay *r, struct msg *m, char *saga_id)
{
	size_t i = saga_pg_relay_find(r, m->seq);
	struct saga_pg_relay_row *row;

	if (i < r->nrows && r->rows[i].m->seq == m->seq) {
		msg_free(m);
		free(saga_id);
		return;
	}
	(void)XPUSH(r->rows, r->nrows, r->caprows);
	memmove(&r->rows[i + 1], &r->rows[i], (r->nrows - 1 - i) * sizeof *r->rows);
	row = &r->rows[i];
	memset(row, 0, sizeof *row);
	row->m = m;
	row->saga_id = saga_id;
	row->state = SAGA_PG_RELAY_WAITING;
}

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

/* Every row in flight waits again: its confirm can no longer come (the
 * connection is gone), so it is published again, from the oldest. */
static void
saga_pg_relay_unsend(struct saga_pg_relay *r)
{
	size_t i;

	for (i = 0; i < r->nrows; i++)
		if (r->rows[i].state == SAGA_PG_RELAY_SENT)
			r->rows[i].state = SAGA_PG_RELAY_WAITING;
	r->inflight = 0;
}

/* ---- publishing ---- */

/*
 * The sagas that have a row waiting or in flight ahead of the walk: a set
 * of saga ids, open addressing, made anew for each walk (it holds at most
 * max_held entries, in a table twice that size).
 */
struct saga_pg_relay_set {
	const char **slot;
	size_t mask;
};

static size_t
saga_pg_relay_hash(const char *s)
{
	size_t h = 14695981039346656037ULL;

	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 1099511628211ULL;
	return h;
}

/* Adds s; returns 1 if it was there already. */
static int
saga_pg_relay_set_put(struct saga_pg_relay_set *set, const char *s)
{
	size_t i = saga_pg_relay_hash(s) & set->mask;

	while (set->slot[i]) {
		if (strcmp(set->slot[i], s) == 0)
			return 1;
		i = (i + 1) & set->mask;
	}
	set->slot[i] = s;
	return 0;
}

static void
saga_pg_relay_arm(struct event *ev, double sec)
{
	struct timeval tv;

	if (sec < 0)
		sec = 0;
	tv.tv_sec = (time_t)sec;
	tv.tv_usec = (suseconds_t)((sec - (double)tv.tv_sec) * 1e6) + 1000;
	evtimer_add(ev, &tv);
}

/*
 * Publishes, in seq order, every waiting row that is due and whose saga
 * has no earlier row waiting or in flight, within the window. The earliest
 * backoff among the rows left behind arms the retry timer.
 */
static void
saga_pg_relay_fill(struct saga_pg_relay *r)
{
	struct saga_pg_relay_set set;
	double now = util_mono(), next_due = 0;
	size_t i, size = 16;
	int sent = 0;

	if (!r->epoch || r->blocked || r->inflight >= r->window || !r->nrows)
		return;
	while (size < 2 * r->nrows)
		size *= 2;
	set.slot = xcalloc(size, sizeof *set.slot);
	set.mask = size - 1;
	for (i = 0; i < r->nrows && r->inflight < r->window; i++) {
		struct saga_pg_relay_row *row = &r->rows[i];
		int ahead;

		if (row->state == SAGA_PG_RELAY_DONE)
			continue;
		/* The first row of its saga in the walk goes; the others wait
		 * for its confirm. */
		ahead = row->saga_id && saga_pg_relay_set_put(&set, row->saga_id);
		if (row->state != SAGA_PG_RELAY_WAITING || ahead)
			continue;
		if (row->due > now) {
			if (!next_due || row->due < next_due)
				next_due = row->due;
			continue;
		}
		row->state = SAGA_PG_RELAY_SENT;
		row->m->attempts = row->attempts;
		r->inflight++;
		broker_publish(r->br, r->epoch, saga_pg_relay_msg_copy(row->m));
		sent = 1;
	}
	free(set.slot);
	if (sent)
		broker_kick(r->br);
	if (next_due)
		saga_pg_relay_arm(r->retry_ev, next_due - now);
}

static void
saga_pg_relay_fill_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	saga_pg_relay_fill(arg);
}

/*
 * A nack or a return: the row waits for a backoff, and the later rows of
 * its saga with it. As src/relay.c, an unroutable message is not dropped:
 * a binding may come (a consumer's queue declared late), and until then
 * the retries show in the metrics and the log.
 */
static void
saga_pg_relay_retry_later(struct saga_pg_relay *r, struct saga_pg_relay_row *row,
    const char *why)
{
	double delay = util_backoff(r->conf->outbox.retry_initial, r->conf->outbox.retry_max,
	    ++row->attempts);

	row->state = SAGA_PG_RELAY_WAITING;
	row->due = util_mono() + delay;
	log_debug("saga outbox publish retry scheduled", LOG_INT("seq", row->m->seq),
	    LOG_STR("message_id", row->m->message_id), LOG_STR("reason", why),
	    LOG_UINT("attempt", row->attempts), LOG_DBL("in_seconds", delay));
}

/*
 * A publish to an exchange that does not exist closes the channel (404),
 * and would again after every reconnect: that exchange's rows wait for a
 * backoff so that the others go on (as src/relay.c).
 */
static void
saga_pg_relay_missing_exchange(struct saga_pg_relay *r, const char *reason)
{
	const char *p = strstr(reason, "no exchange '"), *end;
	size_t i, len, n = 0;

	if (!p)
		return;
	p += strlen("no exchange '");
	if (!(end = strchr(p, '\'')))
		return;
	len = (size_t)(end - p);
	for (i = 0; i < r->nrows; i++) {
		struct saga_pg_relay_row *row = &r->rows[i];
		if (row->state == SAGA_PG_RELAY_SENT && strlen(row->m->exchange) == len &&
		    memcmp(row->m->exchange, p, len) == 0) {
			saga_pg_relay_retry_later(r, row, "no such exchange");
			n++;
		}
	}
	if (n)
		log_warn("exchange does not exist on the broker, saga outbox rows wait",
		    LOG_STR("reason", reason), LOG_UINT("rows", n));
}

/* The broker's events (broker_event_fn), on the loop. */
static void
saga_pg_relay_broker_event(void *arg, const struct broker_event *ev)
{
	struct saga_pg_relay *r = arg;
	struct saga_pg_relay_row *row;

	if (ev->kind != BROKER_EV_UP && ev->epoch != r->epoch)
		return;		/* news of a connection that is gone */
	switch (ev->kind) {
	case BROKER_EV_UP:
		if (r->epoch || r->stats.published)
			r->stats.reconnects++;
		r->epoch = ev->epoch;
		r->blocked = 0;
		saga_pg_relay_unsend(r);
		break;
	case BROKER_EV_DOWN:
		log_warn("saga outbox relay: broker connection down, rows kept",
		    LOG_STR("reason", ev->reason), LOG_UINT("inflight", r->inflight));
		saga_pg_relay_missing_exchange(r, ev->reason);
		r->epoch = 0;
		saga_pg_relay_unsend(r);
		return;
	case BROKER_EV_BLOCKED:
		r->blocked = 1;
		return;
	case BROKER_EV_UNBLOCKED:
		r->blocked = 0;
		break;
	case BROKER_EV_ACK:
	case BROKER_EV_NACK:
	case BROKER_EV_RETURNED:
		row = saga_pg_relay_row(r, ev->seq);
		if (!row || row->state != SAGA_PG_RELAY_SENT)
			return;
		r->inflight--;
		if (ev->kind == BROKER_EV_ACK) {
			row->state = SAGA_PG_RELAY_DONE;
			r->stats.published++;
			histogram_observe(&r->stats.confirm, ev->latency);
			saga_pg_relay_pump(r);
		} else if (ev->kind == BROKER_EV_NACK) {
			r->stats.nacked++;
			saga_pg_relay_retry_later(r, row, "nack");
		} else {
			r->stats.unroutable++;
			saga_pg_relay_retry_later(r, row, "unroutable");
		}
		break;
	case BROKER_EV_DELIVERY:
	case BROKER_EV_TOO_LARGE:
		return;		/* the publishing connection consumes nothing */
	}
	event_active(r->fill_ev, 0, 0);
}

/* ---- PostgreSQL ---- */

/* The advisory lock that orders the claims of all replicas of a service
 * on a schema: FNV-1a of both names. */
static void
saga_pg_relay_lock_key(struct saga_pg_relay *r)
{
	const char *parts[3] = { "sagad saga outbox ", r->schema, r->service };
	uint64_t h = 14695981039346656037ULL;
	const char *p;
	int i;

	for (i = 0; i < 3; i++)
		for (p = parts[i]; *p; p++)
			h = (h ^ (unsigned char)*p) * 1099511628211ULL;
	snprintf(r->lock_key, sizeof r->lock_key, "%lld", (long long)(int64_t)h);
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
 * locked. The advisory lock taken before it in the same transaction makes
 * the claims of replicas one after the other, so that one sees the
 * other's committed claim and two replicas never split a saga's stale rows
 * between them. p.was says whose the row was.
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
	r->sql_delete = xasprintf("DELETE FROM %s.outbox WHERE service = $1"
	    " AND seq = ANY ($2::bigint[])", q);
	r->sql_refresh = xasprintf("UPDATE %s.outbox SET claimed_at = $3::float8"
	    " WHERE service = $1 AND claimed_by = $2", q);
	r->sql_claim = xasprintf(
	    "UPDATE %s.outbox o SET claimed_by = $2, claimed_at = $3::float8"
	    " FROM (SELECT c.service, c.seq, c.claimed_by AS was FROM %s.outbox c"
	    "   WHERE c.service = $1 AND c.seq IN ("
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
	    "   ORDER BY c.seq LIMIT $6::int FOR UPDATE OF c SKIP LOCKED) p"
	    " WHERE o.service = p.service AND o.seq = p.seq"
	    " RETURNING o.seq, o.message_id, o.exchange, o.routing_key, o.props, o.body,"
	    " o.saga_id, p.was", q, q, q);
	PQfreemem(q);
	return 0;
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
 * Sends what is due as one pipeline: the confirmed rows' deletes, the
 * claims' refresh (every grace / 2), a claim when wanted and there is
 * room. Nothing due, or a query in flight: nothing (the end of that query
 * pumps again).
 */
static void
saga_pg_relay_send(struct saga_pg_relay *r)
{
	struct pgc_stmt s[4];
	const char *lockv[1], *delv[2], *refv[3], *claimv[6];
	char now_s[32], stale_s[32], limit_s[16], *del = NULL, *held = NULL;
	double now = util_now(), mono = util_mono();
	size_t i, room = r->nrows < r->max_held ? r->max_held - r->nrows : 0;
	int n = 0, ndel = 0, refresh = mono - r->refreshed >= r->grace / 2;

	if (!r->pg_up || r->busy || !r->sql_claim)
		return;
	for (i = 0; i < r->nrows; i++)
		if ((r->rows[i].deleting = r->rows[i].state == SAGA_PG_RELAY_DONE))
			ndel++;
	if (!ndel && !refresh && !(r->want_claim && room))
		return;
	memset(s, 0, sizeof s);
	snprintf(now_s, sizeof now_s, "%.6f", now);
	snprintf(stale_s, sizeof stale_s, "%.6f", now - r->grace);
	r->q.del = r->q.claim = -1;
	if (r->want_claim && room) {
		lockv[0] = r->lock_key;
		s[n++] = (struct pgc_stmt){ r->sql_lock, 1, lockv, NULL, NULL };
	}
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
	if (r->want_claim && room) {
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
	}
	r->busy = 1;
	pgc_send_pipeline(r->pg, s, n);	/* libpq copies the parameters */
	free(del);
	free(held);
}

static void
saga_pg_relay_pump(struct saga_pg_relay *r)
{
	/* Not from inside a pgconn hook or a broker event's handler: once
	 * per loop turn, when the turn's confirms are all in. */
	event_active(r->pump_ev, 0, 0);
}

static void
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
		 * and the claim are tried again at the next poll. */
		r->stats.pg_errors++;
		log_warn("saga outbox relay: query failed, retried", LOG_STR("reason",
		    pgc_error(r->pg)));
		for (i = 0; i < (int)r->nrows; i++)
			r->rows[i].deleting = 0;
		r->refreshed = 0;
		return;
	}
	pgc_reset_backoff(r->pg);
	if (r->q.del >= 0)
		saga_pg_relay_drop_deleted(r);
	if (r->q.claim >= 0 && (res = pgc_result(r->pg, r->q.claim))) {
		n = PQntuples(res);
		for (i = 0; i < n; i++)
			saga_pg_relay_take_row(r, res, i);
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
	else
		log_debug("saga outbox relay: cannot connect to PostgreSQL",
		    LOG_STR("reason", why), LOG_DBL("retry_in_seconds", retry_in));
	r->pg_up = 0;
	r->busy = 0;
	for (i = 0; i < r->nrows; i++)
		r->rows[i].deleting = 0;
}

static void
saga_pg_relay_poll_cb(evutil_socket_t fd, short what, void *arg)
{
	struct saga_pg_relay *r = arg;

	(void)fd;
	(void)what;
	r->want_claim = 1;
	saga_pg_relay_send(r);
	saga_pg_relay_fill(r);
}

/* ---- life ---- */

struct saga_pg_relay *
saga_pg_relay_new(struct event_base *base, const struct sagad_conf *conf,
    const char *conninfo, const char *schema, const char *service, const char *replica,
    double grace)
{
	static const struct pgc_hooks hooks = { saga_pg_relay_connecting,
	    saga_pg_relay_connected, saga_pg_relay_done, saga_pg_relay_notified,
	    saga_pg_relay_down };
	struct saga_pg_relay *r = xcalloc(1, sizeof *r);
	struct pgc_conf pc;

	r->base = base;
	r->conf = conf;
	r->conninfo = xstrdup(conninfo);
	r->schema = xstrdup(schema ? schema : "sagad");
	r->service = xstrdup(service);
	r->replica = xstrdup(replica);
	r->grace = grace > 0 ? grace : 5;
	r->window = conf->outbox.max_inflight > 0 &&
	    conf->outbox.max_inflight < SAGA_PG_RELAY_WINDOW ?
	    (unsigned)conf->outbox.max_inflight : SAGA_PG_RELAY_WINDOW;
	/* Room to claim the next rows while the window is full. */
	r->max_held = 2 * (size_t)r->window;
	saga_pg_relay_lock_key(r);
	pc.conninfo = r->conninfo;
	pc.connect_timeout = 10;
	pc.query_timeout = 30;
	pc.retry_initial = 0.1;
	pc.retry_max = 5;
	r->pg = pgc_new(base, &pc, &hooks, r);
	histogram_init(&r->stats.confirm, metrics_latency_bounds, metrics_latency_nbounds);
	r->fill_ev = event_new(base, -1, 0, saga_pg_relay_fill_cb, r);
	r->pump_ev = event_new(base, -1, 0, saga_pg_relay_pump_cb, r);
	r->poll_ev = event_new(base, -1, EV_PERSIST, saga_pg_relay_poll_cb, r);
	r->retry_ev = evtimer_new(base, saga_pg_relay_fill_cb, r);
	return r;
}

int
saga_pg_relay_start(struct saga_pg_relay *r)
{
	struct timeval poll = { (time_t)SAGA_PG_RELAY_POLL, 0 };

	r->br = broker_new(r->base, r->conf, BROKER_ROLE_PUBLISH, saga_pg_relay_broker_event, r);
	if (broker_start(r->br) < 0) {
		broker_free(r->br);
		r->br = NULL;
		return -1;
	}
	event_add(r->poll_ev, &poll);
	pgc_start(r->pg);
	return 0;
}

void
saga_pg_relay_kick(struct saga_pg_relay *r)
{
	r->want_claim = 1;
	saga_pg_relay_pump(r);
}

void
saga_pg_relay_free(struct saga_pg_relay *r)
{
	size_t i;

	if (!r)
		return;
	/* The broker first: no more confirms; then the deletes of those
	 * that came, if the connection is free to take them. */
	if (r->br)
		broker_free(r->br);
	if (r->pg_up && r->busy)
		pgc_finish(r->pg, 2);
	r->busy = 0;
	r->want_claim = 0;
	r->refreshed = util_mono();
	saga_pg_relay_send(r);
	if (r->busy)
		pgc_finish(r->pg, 2);
	pgc_free(r->pg);
	for (i = 0; i < r->nrows; i++) {
		msg_free(r->rows[i].m);
		free(r->rows[i].saga_id);
	}
	free(r->rows);
	event_free(r->fill_ev);
	event_free(r->pump_ev);
	event_free(r->poll_ev);
	event_free(r->retry_ev);
	free(r->sql_lock);
	free(r->sql_delete);
	free(r->sql_refresh);
	free(r->sql_claim);
	free(r->conninfo);
	free(r->schema);
	free(r->service);
	free(r->replica);
	free(r);
}

/* ---- figures ---- */

const struct saga_pg_relay_stats *
saga_pg_relay_stats(const struct saga_pg_relay *r)
{
	return &r->stats;
}

unsigned
saga_pg_relay_inflight(const struct saga_pg_relay *r)
{
	return r->inflight;
}

size_t
saga_pg_relay_held(const struct saga_pg_relay *r)
{
	return r->nrows;
}

int
saga_pg_relay_pg_up(const struct saga_pg_relay *r)
{
	return r->pg_up;
}

int
saga_pg_relay_broker_up(const struct saga_pg_relay *r)
{
	return r->epoch != 0;
}

/* Each metric once: name, type, help, value (over r and s). */
#define SAGA_PG_RELAY_METRICS(X)						\
	X(sagad_saga_outbox_published_total, counter,				\
	    "Saga outbox rows confirmed by the broker.", s->published)		\
	X(sagad_saga_outbox_nacked_total, counter,				\
	    "Saga outbox publishes refused with basic.nack (retried).", s->nacked) \
	X(sagad_saga_outbox_unroutable_total, counter,				\
	    "Saga outbox publishes returned as unroutable (retried).", s->unroutable) \
	X(sagad_saga_outbox_taken_over_total, counter,				\
	    "Saga outbox rows claimed from other replicas (stale) or unclaimed.", \
	    s->claimed_from_others)						\
	X(sagad_saga_outbox_pg_errors_total, counter,				\
	    "Saga outbox relay queries that failed (retried).", s->pg_errors)	\
	X(sagad_saga_outbox_inflight, gauge,					\
	    "Saga outbox rows published, waiting for the broker's confirm.",	\
	    r->inflight)							\
	X(sagad_saga_outbox_held, gauge,					\
	    "Saga outbox rows this replica holds (waiting, in flight, to delete).", \
	    r->nrows)								\
	X(sagad_saga_outbox_pg_connected, gauge,				\
	    "1 while the saga outbox relay's PostgreSQL connection is up.", r->pg_up) \
	X(sagad_saga_outbox_broker_connected, gauge,				\
	    "1 while the saga outbox relay's broker connection is up.", r->epoch != 0)

#define SAGA_PG_RELAY_EMIT(name, type, help, expr)				\
	metrics_family(out, #name, #type, help);				\
	metrics_sample(out, #name, "", (double)(expr));

void
saga_pg_relay_metrics(const struct saga_pg_relay *r, struct evbuffer *out)
{
	const struct saga_pg_relay_stats *s = &r->stats;

	SAGA_PG_RELAY_METRICS(SAGA_PG_RELAY_EMIT)
	metrics_family(out, "sagad_saga_outbox_confirm_seconds", "histogram",
	    "Time from a saga outbox row's publish to the broker's confirm.");
	metrics_histogram(out, "sagad_saga_outbox_confirm_seconds", "", &s->confirm);
}
