#include "relay.h"

#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "log.h"
#include "otel.h"
#include "store.h"
#include "util.h"
#include "xmalloc.h"

struct relay {
	struct event_base *base;
	struct store *st;
	struct broker *br;
	const struct sagad_conf *conf;
	enum relay_link link;
	char reason[200];
	uint64_t epoch;		/* of the connection we publish on; 0: none */
	int64_t cursor;		/* highest seq handed over in order */
	unsigned inflight;
	/* Confirmed messages whose delete is in the open transaction; if it
	 * is lost (disk full), only the deletes are tried again, later. */
	int64_t *done, *redo;
	size_t ndone, capdone, nredo, capredo;
	struct event *redo_ev;
	unsigned missing_exchange;	/* consecutive 404s, for their backoff */
	int paused;
	struct event *fill_ev;	/* one fill per loop turn, however many acks */
	struct event *retry_ev;
	double retry_at;
	/* Messages waiting for a retry's backoff: the earliest due time as
	 * the store said when last asked (0: none), and whether something
	 * may have changed it since. The store is asked only then, not at
	 * every commit. */
	double next_due;
	int due_stale;
	struct msg **batch;
	size_t batch_cap;
	struct relay_stats stats;
	struct otel *otel;	/* NULL: tracing off */
};

static void relay_fill_cb(evutil_socket_t, short, void *);
static void relay_redo_cb(evutil_socket_t, short, void *);
static int relay_is_done(const struct relay *r, int64_t seq);

struct relay *
relay_new(struct event_base *base, struct store *st, const struct sagad_conf *conf)
{
	struct relay *r = xcalloc(1, sizeof *r);

	r->base = base;
	r->st = st;
	r->conf = conf;
	r->link = RELAY_LINK_DOWN;
	r->due_stale = 1;	/* a restart finds retries in the store */
	snprintf(r->reason, sizeof r->reason, "connecting");
	r->fill_ev = event_new(base, -1, 0, relay_fill_cb, r);
	event_priority_set(r->fill_ev, 2);
	r->retry_ev = evtimer_new(base, relay_fill_cb, r);
	r->redo_ev = evtimer_new(base, relay_redo_cb, r);
	histogram_init(&r->stats.confirm, metrics_latency_bounds, metrics_latency_nbounds);
	return r;
}

void
relay_free(struct relay *r)
{
	if (!r)
		return;
	event_free(r->fill_ev);
	event_free(r->retry_ev);
	event_free(r->redo_ev);
	free(r->done);
	free(r->redo);
	free(r->batch);
	free(r);
}

void
relay_set_broker(struct relay *r, struct broker *b)
{
	r->br = b;
}

void
relay_set_otel(struct relay *r, struct otel *o)
{
	r->otel = o;
}

void
relay_set_conf(struct relay *r, const struct sagad_conf *conf)
{
	r->conf = conf;
	event_active(r->fill_ev, 0, 0);
}

static void
relay_schedule(struct relay *r)
{
	event_active(r->fill_ev, 0, 0);
}

/* Arm the retry timer for the earliest message waiting for its backoff. */
static void
relay_arm_retry(struct relay *r)
{
	double due = store_outbox_next_due(r->st), now = util_now();
	struct timeval tv;

	r->next_due = due;
	r->due_stale = 0;
	if (due <= 0)
		return;
	if (evtimer_pending(r->retry_ev, NULL) && r->retry_at <= due)
		return;
	if (due < now)
		due = now;
	r->retry_at = due;
	tv.tv_sec = (time_t)(due - now);
	tv.tv_usec = (suseconds_t)((due - now - tv.tv_sec) * 1e6) + 1000;
	evtimer_add(r->retry_ev, &tv);
}

static void
relay_send(struct relay *r, struct msg **ms, size_t n, int clear_due)
{
	size_t i;

	for (i = 0; i < n; i++) {
		if (r->nredo && relay_is_done(r, ms[i]->seq)) {
			msg_free(ms[i]);
			continue;
		}
		if (clear_due || ms[i]->attempts > 0)
			store_outbox_clear_due(r->st, ms[i]->seq);
		r->inflight++;
		broker_publish(r->br, r->epoch, ms[i]);
	}
}

static void
relay_fill(struct relay *r)
{
	double now = util_now();
	unsigned window = (unsigned)r->conf->outbox.max_inflight;
	size_t n;
	int sent = 0, check_due;

	if (!r->epoch || r->link == RELAY_LINK_BLOCKED || r->paused || !r->br)
		return;
	if (r->inflight >= window)
		return;
	if (r->batch_cap < window) {
		r->batch_cap = window;
		r->batch = xrealloc(r->batch, r->batch_cap * sizeof *r->batch);
	}
	/* Retries first: they are older than anything past the cursor. */
	check_due = r->due_stale || (r->next_due > 0 && r->next_due <= now);
	if (check_due && store_outbox_fetch_due(r->st, r->cursor, now,
	    window - r->inflight, r->batch, &n) == 0 && n > 0) {
		relay_send(r, r->batch, n, 1);
		sent = 1;
	}
	/* Nothing new publishable past the cursor: no query. */
	if (r->inflight < window && store_publishable_seq(r->st) > r->cursor &&
	    store_outbox_fetch(r->st, r->cursor, store_publishable_seq(r->st), now,
	    window - r->inflight, r->batch, &n) == 0 && n > 0) {
		r->cursor = r->batch[n - 1]->seq;
		relay_send(r, r->batch, n, 0);
		sent = 1;
	}
	/* Waking the broker's thread is a context switch: only with work. */
	if (sent)
		broker_kick(r->br);
	if (check_due)
		relay_arm_retry(r);
}

static void
relay_fill_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	relay_fill(arg);
}

static void
relay_push(int64_t **v, size_t *n, size_t *cap, int64_t seq)
{
	*XPUSH(*v, *n, *cap) = seq;
}

static int
relay_is_done(const struct relay *r, int64_t seq)
{
	size_t i;

	for (i = 0; i < r->nredo; i++)
		if (r->redo[i] == seq)
			return 1;
	return 0;
}

static void
relay_done(struct relay *r, int64_t seq)
{
	relay_push(&r->done, &r->ndone, &r->capdone, seq);
	store_outbox_done(r->st, seq);
}

void
relay_committed(void *arg)
{
	struct relay *r = arg;

	r->ndone = 0;
	relay_schedule(r);
}

static void
relay_redo_cb(evutil_socket_t fd, short what, void *arg)
{
	struct relay *r = arg;
	size_t i, n = r->nredo;

	(void)fd;
	(void)what;
	r->nredo = 0;
	for (i = 0; i < n; i++)
		relay_done(r, r->redo[i]);
}

void
relay_rolled_back(void *arg)
{
	struct relay *r = arg;
	struct timeval tv = { 1, 0 };
	size_t i;

	/* The broker has these messages: only their deletes were lost. Try
	 * them again in a second (not at once: the disk may still be full),
	 * and never publish them again meanwhile. */
	for (i = 0; i < r->ndone; i++)
		relay_push(&r->redo, &r->nredo, &r->capredo, r->done[i]);
	r->ndone = 0;
	r->due_stale = 1;	/* the lost transaction may have cleared some */
	if (r->nredo)
		evtimer_add(r->redo_ev, &tv);
	relay_schedule(r);
}

void
relay_pause(struct relay *r)
{
	r->paused = 1;
}

static void
relay_retry_later(struct relay *r, int64_t seq, const char *why)
{
	unsigned attempts = store_outbox_attempts(r->st, seq) + 1;
	double delay = util_backoff(r->conf->outbox.retry_initial,
	    r->conf->outbox.retry_max, attempts);

	store_outbox_retry(r->st, seq, util_now() + delay, attempts, why);
	r->due_stale = 1;
	log_debug("publish retry scheduled", LOG_INT("seq", seq), LOG_STR("reason", why),
	    LOG_UINT("attempt", attempts), LOG_DBL("in_seconds", delay));
}

/*
 * Publishing to an exchange that does not exist makes the broker close the
 * channel (404), and it would again after every reconnect: hold back that
 * exchange's messages with a backoff so that the others go on.
 */
static void
relay_missing_exchange(struct relay *r, const char *reason)
{
	const char *p = strstr(reason, "no exchange '"), *q;
	char name[256];
	double delay;
	int n;

	if (!p)
		return;
	p += strlen("no exchange '");
	q = strchr(p, '\'');
	if (!q || q - p >= (int)sizeof name)
		return;
	snprintf(name, sizeof name, "%.*s", (int)(q - p), p);
	delay = util_backoff(r->conf->outbox.retry_initial, r->conf->outbox.retry_max,
	    ++r->missing_exchange);
	n = store_outbox_defer_exchange(r->st, name, util_now() + delay, "no such exchange");
	r->due_stale = 1;
	log_warn("exchange does not exist on the broker, its messages wait", LOG_STR("exchange", name),
	    LOG_INT("messages", n), LOG_DBL("retry_in_seconds", delay));
}

void
relay_broker_event(void *arg, const struct broker_event *ev)
{
	struct relay *r = arg;

	if (ev->kind == BROKER_EV_DOWN && r->epoch == 0) {
		/* Still connecting: keep the latest reason for /readyz. */
		snprintf(r->reason, sizeof r->reason, "%s", ev->reason);
		return;
	}
	if (ev->kind != BROKER_EV_UP && ev->epoch != r->epoch)
		return;		/* news of a connection that is gone */
	switch (ev->kind) {
	case BROKER_EV_UP:
		/* Everything unconfirmed is still in the store: start again
		 * from the oldest so that order is kept. */
		if (r->stats.published || r->stats.reconnects || r->epoch)
			r->stats.reconnects++;
		r->epoch = ev->epoch;
		r->link = RELAY_LINK_UP;
		r->reason[0] = '\0';
		r->inflight = 0;
		r->cursor = 0;
		r->due_stale = 1;
		break;
	case BROKER_EV_DOWN:
		relay_missing_exchange(r, ev->reason);
		r->epoch = 0;
		r->link = RELAY_LINK_DOWN;
		snprintf(r->reason, sizeof r->reason, "%s", ev->reason);
		r->inflight = 0;
		return;
	case BROKER_EV_BLOCKED:
		r->link = RELAY_LINK_BLOCKED;
		snprintf(r->reason, sizeof r->reason, "blocked: %s", ev->reason);
		return;
	case BROKER_EV_UNBLOCKED:
		r->link = RELAY_LINK_UP;
		r->reason[0] = '\0';
		break;
	case BROKER_EV_ACK:
		r->missing_exchange = 0;
		r->inflight--;
		r->stats.published++;
		histogram_observe(&r->stats.confirm, ev->latency);
		otel_span_publish(r->otel, ev->trace, ev->latency, NULL);
		relay_done(r, ev->seq);
		break;
	case BROKER_EV_NACK:
		r->inflight--;
		r->stats.nacked++;
		otel_span_publish(r->otel, ev->trace, ev->latency, "nack");
		relay_retry_later(r, ev->seq, "nack");
		break;
	case BROKER_EV_RETURNED:
		r->inflight--;
		r->stats.unroutable++;
		otel_span_publish(r->otel, ev->trace, ev->latency, "unroutable");
		relay_retry_later(r, ev->seq, "unroutable");
		break;
	case BROKER_EV_DELIVERY:
	case BROKER_EV_TOO_LARGE:
		return;		/* the publishing connection consumes nothing */
	}
	relay_schedule(r);
}

enum relay_link
relay_link(const struct relay *r)
{
	return r->link;
}

const char *
relay_link_reason(const struct relay *r)
{
	return r->reason;
}

unsigned
relay_inflight(const struct relay *r)
{
	return r->inflight;
}

const struct relay_stats *
relay_stats(const struct relay *r)
{
	return &r->stats;
}
