/*
 * The PostgreSQL saga outbox relay (saga_pg_relay.h).
 *
 * The rows it holds live in one array sorted by seq (r->rows), each
 * waiting, in flight (sent on the current broker epoch) or confirmed (its
 * delete not yet committed). This file holds them and publishes them; the
 * PostgreSQL side (claims, deletes, refresh) is saga_pg_relay_pg.c.
 */
#include "saga_pg_relay_int.h"

#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker.h"
#include "conf.h"
#include "log.h"
#include "otel.h"
#include "props.h"
#include "util.h"
#include "xmalloc.h"

/* ---- rows ---- */

struct msg *
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

/* A seq already held is dropped: a claim leaves out what is held, but a
 * row handed during the claim may come back in it. */
void
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

/* The index of seq, or of where it would go. */
size_t
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

struct saga_pg_relay_row *
saga_pg_relay_row(struct saga_pg_relay *r, int64_t seq)
{
	size_t i = saga_pg_relay_find(r, seq);

	return i < r->nrows && r->rows[i].m->seq == seq ? &r->rows[i] : NULL;
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
	saga_pg_relay_compact(r);
}

void
saga_pg_relay_compact(struct saga_pg_relay *r)
{
	size_t i, w = 0;

	for (i = 0; i < r->nrows; i++) {
		struct saga_pg_relay_row *row = &r->rows[i];

		if (row->gone && row->state != SAGA_PG_RELAY_SENT) {
			msg_free(row->m);
			free(row->saga_id);
			r->stats.deleted++;	/* by the batch: counts for VACUUM */
			r->stats.gone++;
			continue;
		}
		r->rows[w++] = *row;
	}
	r->nrows = w;
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

/* Adds s; returns 1 if it was there already. */
static int
saga_pg_relay_set_put(struct saga_pg_relay_set *set, const char *s)
{
	size_t i = (size_t)util_fnv1a(s) & set->mask;

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

	if (ev->kind != BROKER_EV_UP && (ev->epoch != r->epoch || !r->epoch))
		return;		/* news of a connection that is gone, or a
				 * connect that failed (the broker logs it) */
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
		otel_span_publish(r->otel, ev->trace, ev->latency, ev->kind == BROKER_EV_ACK ? NULL :
		    ev->kind == BROKER_EV_NACK ? "nack" : "unroutable");
		if (row->gone) {
			/* its saga went on: it arrived, whatever the broker says */
			row->state = SAGA_PG_RELAY_DONE;
			r->stats.published += ev->kind == BROKER_EV_ACK;
			saga_pg_relay_compact(r);
		} else if (ev->kind == BROKER_EV_ACK) {
			row->state = SAGA_PG_RELAY_DONE;
			row->done_at = util_mono();
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
	struct saga_pg_relay *r = xcalloc(1, sizeof *r);
	struct pgc_conf pc = { 0 };

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
	pc.retry_max = 2;	/* its sagas wait for it: look again often */
	pc.server_limits = 1;	/* a blocked claim ends, retried at the next poll */
	r->pg = pgc_new(base, &pc, &saga_pg_relay_pg_hooks, r);
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
saga_pg_relay_lost(struct saga_pg_relay *r)
{
	r->caught_up = 0;
	r->missed = 1;
	saga_pg_relay_kick(r);
}

void
saga_pg_relay_gone(struct saga_pg_relay *r, const int64_t *seqs, size_t n)
{
	struct saga_pg_relay_row *row;
	size_t i;

	for (i = 0; i < n; i++)
		if ((row = saga_pg_relay_row(r, seqs[i])))
			row->gone = 1;
	saga_pg_relay_compact(r);
	event_active(r->fill_ev, 0, 0);	/* later rows of their sagas may go */
}

void
saga_pg_relay_hand(struct saga_pg_relay *r, struct msg *m, char *saga_id, int alone)
{
	struct saga_pg_relay_row *row;

	if (!r->caught_up || r->nrows + r->npending >= r->max_held) {
		msg_free(m);
		free(saga_id);
		saga_pg_relay_lost(r);
		return;
	}
	r->stats.handed++;
	if (r->claiming && !alone) {
		/* The claim in flight may bring earlier rows of its saga (it
		 * may have claimed them before the batch's INSERT looked). */
		row = XPUSH(r->pending, r->npending, r->cappending);
		memset(row, 0, sizeof *row);
		row->m = m;
		row->saga_id = saga_id;
		return;
	}
	saga_pg_relay_add(r, m, saga_id);
	event_active(r->fill_ev, 0, 0);
}

int
saga_pg_relay_holds(struct saga_pg_relay *r, int64_t seq)
{
	size_t i;

	if (saga_pg_relay_row(r, seq))
		return 1;
	for (i = 0; i < r->npending; i++)
		if (r->pending[i].m->seq == seq)
			return 1;
	return 0;
}

void
saga_pg_relay_pending_end(struct saga_pg_relay *r, int take)
{
	size_t i;

	for (i = 0; i < r->npending; i++) {
		if (take) {
			saga_pg_relay_add(r, r->pending[i].m, r->pending[i].saga_id);
			continue;
		}
		msg_free(r->pending[i].m);
		free(r->pending[i].saga_id);
	}
	r->npending = 0;
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
	r->closing = 1;
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
	saga_pg_relay_pending_end(r, 0);
	free(r->pending);
	event_free(r->fill_ev);
	event_free(r->pump_ev);
	event_free(r->poll_ev);
	event_free(r->retry_ev);
	free(r->sql_lock);
	free(r->sql_delete);
	free(r->sql_refresh);
	free(r->sql_claim);
	free(r->sql_mine);
	free(r->sql_vacuum);
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

void
saga_pg_relay_set_otel(struct saga_pg_relay *r, struct otel *o)
{
	r->otel = o;
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
	X(sagad_saga_outbox_handed_total, counter,				\
	    "Saga outbox rows handed to the relay by this replica's commits"	\
	    " (published with no claim query).", s->handed)			\
	X(sagad_saga_outbox_claimed_total, counter,				\
	    "Saga outbox rows read by the relay's claim query.", s->claimed)	\
	X(sagad_saga_outbox_replied_total, counter,				\
	    "Saga outbox rows deleted by the transaction of their reply"	\
	    " (no delete of the relay's).", s->gone)				\
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
