/*
 * Delivery: the intake half. A consumed message becomes an inbox record in
 * the store's open transaction, goes to the dispatch (dispatch.c) once that
 * is written and is acked to the broker once it is durable; duplicates are
 * acked and dropped. Also here: the consumer's pause and resume, the
 * subscriptions' setup and their admin views.
 * (ARCHITECTURE.md: Inbox: from consume to ack)
 */
#include "delivery.h"
#include "dispatch.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "dedup.h"
#include "hclient.h"
#include "log.h"
#include "otel.h"
#include "props.h"
#include "saga_pg_schema.h"
#include "sagad.h"
#include "store.h"
#include "trace.h"
#include "txpart.h"
#include "txpg.h"
#include "util.h"
#include "xmalloc.h"

/* Ack after the commit that holds the inbox record. */
struct dack {
	struct delivery *dl;
	struct dmsg *dm;	/* NULL for a duplicate */
	int sub;
	uint64_t epoch, tag;
	double received;	/* util_mono() in the broker thread */
	/* Set on the syncer's thread before the loop's delivery_acked runs
	 * (store_on_durable_early): the ack went out from there. */
	int early;
	double acked;		/* util_mono() of that ack */
	int reload;		/* a record loaded at start: nothing to ack */
	struct otel_span *span;	/* consumed -> committed; NULL: not traced */
};

/* The consume's span ends with the dack: the ack, or the message given
 * back (error). */
static void
dack_free(struct dack *k, const char *error)
{
	otel_span_end(k->dl->d->otel, k->span, util_now(), error);
	free(k);
}

static void delivery_claim(struct dack *k);

const struct conf_subscription *
dsub_conf(const struct dsub *ds)
{
	return &ds->dl->d->conf->subs[ds->index];
}

/*
 * Every change of a record's state (enum dmsg_state): WRITING -> READY
 * once its inbox record is written, READY -> INFLIGHT when an attempt
 * takes it, INFLIGHT -> READY when the attempt ends without an outcome
 * that frees it. Any other edge is a bug: said loudly, and done anyway
 * (as before the states were explicit).
 */
void
dmsg_set_state(struct dmsg *dm, enum dmsg_state to)
{
	static const char *const names[] = { "writing", "ready", "inflight" };
	enum dmsg_state from = dm->state;
	int legal = (from == DMSG_WRITING && to == DMSG_READY) ||
	    (from == DMSG_READY && to == DMSG_INFLIGHT) ||
	    (from == DMSG_INFLIGHT && to == DMSG_READY);

	if (!legal)
		log_error("delivery record: state change outside the diagram",
		    LOG_STR("message_id", dm->rec->m ? dm->rec->m->message_id : NULL),
		    LOG_STR("from", names[from]), LOG_STR("to", names[to]));
	dm->state = to;
}

/* Take from the broker only while the backlog has room and the service is
 * healthy, so that replicas with a working service get the messages. */
void
dsub_flow(struct dsub *ds)
{
	struct delivery *dl = ds->dl;
	size_t max = (size_t)dsub_conf(ds)->max_pending;
	/* Pause at max_pending, resume below three quarters of it, so that a
	 * backlog at the edge does not cancel and consume for every message. */
	size_t limit = ds->consuming == 1 ? max : max - max / 4;
	/* A front-door subscription consumes while a client consumes it:
	 * with nobody to take them, messages wait in the broker's queue. */
	int want = !dl->stopping && ds->circuit == CIRCUIT_CLOSED &&
	    ds->npending < (limit ? limit : 1) && (ds->sinks || !dsub_conf(ds)->frontdoor);

	if (want == ds->consuming || !dl->br)
		return;
	ds->consuming = want;
	broker_consume(dl->br, ds->index, want);
	broker_kick(dl->br);
	log_debug(want ? "consumer resumed" : "consumer paused", LOG_STR("subscription", ds->name),
	    LOG_UINT("backlog", ds->npending), LOG_INT("circuit", ds->circuit));
}

static void
dsub_append(struct dsub *ds, struct dmsg *dm)
{
	size_t i;

	dm->tx = txpart_kind(dm->rec->m) != TXP_NOT_TX;
	if (ds->npending == ds->cappending)
		ds->pending = xgrow(ds->pending, &ds->cappending, ds->npending + 1, sizeof *ds->pending);
	/* Keep broker order: records reloaded from the store may be older
	 * than what is already held. */
	i = ds->npending;
	while (i > 0 && ds->pending[i - 1]->rec->id > dm->rec->id) {
		ds->pending[i] = ds->pending[i - 1];
		i--;
	}
	ds->pending[i] = dm;
	ds->npending++;
}

void
dsub_remove(struct dsub *ds, struct dmsg *dm)
{
	size_t i;

	for (i = 0; i < ds->npending; i++)
		if (ds->pending[i] == dm) {
			memmove(&ds->pending[i], &ds->pending[i + 1],
			    (ds->npending - i - 1) * sizeof *ds->pending);
			ds->npending--;
			break;
		}
	inbox_rec_free(dm->rec);
	free(dm);
}

static int
dsub_holds(const struct dsub *ds, int64_t id)
{
	size_t i;

	for (i = 0; i < ds->npending; i++)
		if (ds->pending[i]->rec->id == id)
			return 1;
	return 0;
}

/* Load pending records from the store (start-up, replay). */
void
dsub_load(struct dsub *ds)
{
	struct store *st = ds->dl->d->store;
	struct inbox_rec *batch[256];
	int64_t after = 0;
	size_t n, i;

	do {
		if (store_inbox_load(st, ds->name, INBOX_PENDING, after, 256, batch, &n) < 0)
			return;
		for (i = 0; i < n; i++) {
			after = batch[i]->id;
			if (dsub_holds(ds, batch[i]->id)) {
				inbox_rec_free(batch[i]);
				continue;
			}
			struct dmsg *dm = xcalloc(1, sizeof *dm);
			dm->rec = batch[i];
			dsub_append(ds, dm);
			if (dsub_conf(ds)->shared_dedup) {
				/* Another replica may have taken it since. */
				struct dack *k = xcalloc(1, sizeof *k);
				k->dl = ds->dl;
				k->sub = ds->index;
				k->dm = dm;
				k->reload = 1;
				delivery_claim(k);
			} else
				dmsg_set_state(dm, DMSG_READY);
		}
	} while (n == 256);
}

/* ---- from the broker ---- */

/*
 * The inbox record is committed (in the write-ahead log, not yet synced):
 * the message may go to the service now, while the fsync runs, instead of
 * one fsync later. A crash of sagad loses nothing written; only a crash of
 * the machine before the fsync could, and then the broker, never acked,
 * delivers the message again: one more case of what a machine crash
 * already does to the record of a delivery's outcome (sagad(8), THE STORE).
 */
static void
delivery_written(void *arg, int ok)
{
	struct dack *k = arg;

	if (ok && k->dm) {
		dmsg_set_state(k->dm, DMSG_READY);
		dispatch_schedule(&k->dl->subs[k->sub]);
		/* From now on the message is the delivery's: it may be
		 * answered and freed before the fsync is done. */
		k->dm = NULL;
	}
}

/*
 * On the syncer's thread, the moment the inbox record is durable: the ack
 * goes to the broker thread without waiting for the loop, which may be in
 * the middle of a batch of deliveries or a checkpoint. The broker's window
 * (prefetch) turns over that much sooner. Only the immutable fields of k
 * are read here.
 */
static void
delivery_ack_early(void *arg)
{
	struct dack *k = arg;

	broker_ack(k->dl->br, k->epoch, k->sub, k->tag);
	broker_kick(k->dl->br);
	k->acked = util_mono();
	k->early = 1;
}

/* Durable: now the broker may forget the message. */
static void
delivery_acked(void *arg, int ok)
{
	struct dack *k = arg;
	struct delivery *dl = k->dl;

	if (k->early) {
		/* Acked from the syncer's thread: its sync went through, even
		 * when a later one failed and the store answers ok=0. */
		histogram_observe(&dl->subs[k->sub].stats.ack, k->acked - k->received);
	} else if (!ok) {
		/* The inbox record was lost with its transaction: give the
		 * message back so that it comes again. (When the commit went
		 * through and its fsync failed, the message was handed to the
		 * delivery already, and sagad is stopping.) */
		if (k->dm)
			dsub_remove(&dl->subs[k->sub], k->dm);
		if (dl->br && k->epoch == dl->epoch)
			broker_requeue(dl->br, k->epoch, k->sub, k->tag);
	} else if (k->dm && dsub_conf(&dl->subs[k->sub])->shared_dedup) {
		/* Durable here: now claimed, then delivered and acked. */
		delivery_claim(k);
		return;
	} else if (dl->br && k->epoch == dl->epoch) {
		broker_ack(dl->br, k->epoch, k->sub, k->tag);
		histogram_observe(&dl->subs[k->sub].stats.ack, util_mono() - k->received);
	}
	if (dl->br)
		broker_kick(dl->br);
	dack_free(k, ok || k->early ? NULL : "not committed: given back");
}

/* ---- shared deduplication (dedup.h) ---- */

static void
delivery_claimed(void *arg, enum dedup_claim r)
{
	struct dack *k = arg;
	struct delivery *dl = k->dl;
	struct dsub *ds = &dl->subs[k->sub];

	if (r == DEDUP_CANCELLED) {
		dack_free(k, "stopping");	/* the record waits for the next start */
		return;
	}
	if (r == DEDUP_MINE) {
		dmsg_set_state(k->dm, DMSG_READY);
		dispatch_schedule(ds);
	} else {
		/* Another replica has it durably: done here, never delivered. */
		store_inbox_done(dl->d->store, k->dm->rec->id, util_now(), 0);
		ds->stats.duplicates++;
		dsub_remove(ds, k->dm);
		dsub_flow(ds);
	}
	if (!k->reload && dl->br && k->epoch == dl->epoch) {
		broker_ack(dl->br, k->epoch, k->sub, k->tag);
		histogram_observe(&ds->stats.ack, util_mono() - k->received);
		broker_kick(dl->br);
	}
	dack_free(k, NULL);
}

static void
delivery_claim(struct dack *k)
{
	struct dsub *ds = &k->dl->subs[k->sub];

	dedup_claim(k->dl->dedup, ds->name, k->dm->rec->m->message_id, delivery_claimed, k);
}

void
delivery_derive_id(const struct msg *m, char out[40])
{
	/* Two FNV-1a 64-bit hashes with different bases over what identifies
	 * the message: the same message redelivered gets the same id. */
	uint64_t h1 = 0xcbf29ce484222325ULL, h2 = 0x84222325cbf29ce4ULL;
	const char *parts[5] = { m->exchange, m->routing_key, m->props.correlation_id,
	    m->props.type, NULL };
	size_t i, j;
	char ts[32];

	snprintf(ts, sizeof ts, "%.0f", m->created_at);
	parts[4] = ts;
	for (i = 0; i < 5; i++) {
		const char *p = parts[i] ? parts[i] : "";
		for (j = 0; j <= strlen(p); j++) {
			h1 = (h1 ^ (unsigned char)p[j]) * 0x100000001b3ULL;
			h2 = (h2 ^ (unsigned char)p[j]) * 0x100000001b3ULL;
		}
	}
	for (j = 0; j < m->body_len; j++) {
		h1 = (h1 ^ (unsigned char)m->body[j]) * 0x100000001b3ULL;
		h2 = (h2 ^ (unsigned char)m->body[j]) * 0x100000001b3ULL;
	}
	snprintf(out, 40, "sagad-%016llx%016llx", (unsigned long long)h1,
	    (unsigned long long)h2);
}

/* ---- a taker's messages (shared saga store) ---- */

struct delivery_ticket {
	struct dack k;
};

static void
delivery_hand_over(struct dsub *ds, struct dack *k, struct msg *m)
{
	ds->inflight++;
	ds->taker(ds->taker_arg, m, (struct delivery_ticket *)k);
}

void
delivery_settle(struct delivery_ticket *t, enum delivery_verdict v)
{
	struct dack *k = &t->k;
	struct delivery *dl = k->dl;
	struct dsub *ds = &dl->subs[k->sub];

	ds->inflight--;
	/* A ticket of an earlier connection: that delivery is void, the
	 * broker has given the message again. */
	if (dl->d->state != SAGAD_STOPPED && dl->br && k->epoch == dl->epoch) {
		if (v == DELIVERY_ACK || v == DELIVERY_DUPLICATE) {
			broker_ack(dl->br, k->epoch, k->sub, k->tag);
			histogram_observe(&ds->stats.ack, util_mono() - k->received);
			if (v == DELIVERY_ACK)
				ds->stats.outcomes[OUTCOME_SUCCESS]++;
			else
				ds->stats.duplicates++;
		} else if (v == DELIVERY_REQUEUE)
			broker_requeue(dl->br, k->epoch, k->sub, k->tag);
		else {
			broker_reject(dl->br, k->epoch, k->sub, k->tag);
			ds->stats.dead_lettered++;
		}
		broker_kick(dl->br);
	}
	dack_free(k, v == DELIVERY_ACK || v == DELIVERY_DUPLICATE ? NULL :
	    v == DELIVERY_REQUEUE ? "given back" : "dead-lettered");
}

void
delivery_set_taker(struct delivery *dl, int sub, delivery_take_fn *fn, void *arg)
{
	dl->subs[sub].taker = fn;
	dl->subs[sub].taker_arg = arg;
}

/*
 * The consume's span, from the last frame's arrival to the ack (its
 * commit). A message from a publisher that traces nothing starts its trace
 * here when sagad starts traces (tracing.new_traces), and every delivery
 * attempt of the inbox record carries it; the stored context names this
 * span as the parent of what follows.
 */
static struct otel_span *
delivery_span(struct delivery *dl, struct dsub *ds, struct msg *m, double received)
{
	struct otel_span *s;
	char name[300], child[TRACE_PARENT_LEN + 1];

	trace_ensure(&m->props, dl->d->conf);
	if (!dl->d->otel)
		return NULL;
	snprintf(name, sizeof name, "receive %s", ds->queue);
	s = otel_span_start(dl->d->otel, props_get_header(&m->props, TRACE_PARENT), name,
	    OTEL_CONSUMER, util_now() - (util_mono() - received));
	if (!s)
		return NULL;
	otel_span_message(s, "receive", m);
	otel_span_str(s, "messaging.source.name", ds->queue);
	otel_span_str(s, "sagad.subscription", ds->name);
	otel_child(props_get_header(&m->props, TRACE_PARENT), otel_span_id(s), child);
	props_set_header(&m->props, TRACE_PARENT, child);
	return s;
}

static void
delivery_take(struct delivery *dl, const struct broker_event *ev)
{
	struct dsub *ds = &dl->subs[ev->sub];
	struct msg *m = ev->msg;
	struct dack *k = xcalloc(1, sizeof *k);
	enum store_put put;
	int64_t id = 0;

	k->dl = dl;
	k->sub = ev->sub;
	k->epoch = ev->epoch;
	k->tag = (uint64_t)m->seq;
	k->received = ev->received;
	if (!m->message_id || !*m->message_id || !util_valid_shortstr(m->message_id, 255)) {
		char derived[40];
		delivery_derive_id(m, derived);
		free(m->message_id);
		m->message_id = xstrdup(derived);
	}
	k->span = delivery_span(dl, ds, m, ev->received);
	if (ds->taker) {
		delivery_hand_over(ds, k, m);
		return;
	}
	put = store_inbox_put(dl->d->store, ds->name, m, util_now(), &id);
	switch (put) {
	case STORE_PUT_STORED:
		if (ds->handler) {
			/* Same transaction: the inbox record, what the handler
			 * changes and the messages it causes commit together,
			 * and only then is the message acked. */
			ds->handler(ds->handler_arg, m);
			store_inbox_done(dl->d->store, id, util_now(), 200);
			ds->stats.outcomes[OUTCOME_SUCCESS]++;
			break;
		}
		{
		struct dmsg *dm = xcalloc(1, sizeof *dm);
		dm->rec = xcalloc(1, sizeof *dm->rec);
		dm->rec->id = id;
		dm->rec->m = m;
		dm->rec->received_at = util_now();
		dm->rec->last_error = xstrdup("");
		dm->rec->dead_reason = xstrdup("");
		dsub_append(ds, dm);
		k->dm = dm;
		m = NULL;
		}
		break;
	case STORE_PUT_DUPLICATE:
		ds->stats.duplicates++;
		log_debug("duplicate dropped", LOG_STR("subscription", ds->name),
		    LOG_STR("message_id", m->message_id));
		break;
	case STORE_PUT_FULL:
	case STORE_PUT_ERROR:
		log_error("cannot store a consumed message, giving it back",
		    LOG_STR("subscription", ds->name));
		broker_requeue(dl->br, ev->epoch, ev->sub, k->tag);
		broker_kick(dl->br);
		dack_free(k, "not stored: given back");
		msg_free(m);
		return;
	}
	msg_free(m);
	/* Delivered once the inbox record is written, acked only once it is
	 * durable. */
	/* A shared-dedup record waits for its durable commit and its claim
	 * (delivery_claimed) before it is delivered or acked. */
	if (k->dm && !dsub_conf(ds)->shared_dedup)
		store_on_written(dl->d->store, delivery_written, k);
	if (put == STORE_PUT_STORED && !dsub_conf(ds)->shared_dedup)
		store_on_durable_early(dl->d->store, delivery_ack_early, k);
	store_on_commit(dl->d->store, delivery_acked, k);
	dsub_flow(ds);
}

void
delivery_broker_event(void *arg, const struct broker_event *ev)
{
	struct delivery *dl = arg;
	size_t i;

	switch (ev->kind) {
	case BROKER_EV_UP:
		dl->epoch = ev->epoch;
		break;
	case BROKER_EV_DOWN:
		dl->epoch = 0;
		/* The broker forgets our consumers: ask again after the next UP
		 * as the flow decides. */
		for (i = 0; i < dl->nsubs; i++)
			dl->subs[i].consuming = -1;
		for (i = 0; i < dl->nsubs; i++)
			dsub_flow(&dl->subs[i]);
		break;
	case BROKER_EV_DELIVERY:
		if (ev->epoch != dl->epoch || dl->d->state == SAGAD_STOPPED) {
			msg_free(ev->msg);
			break;
		}
		delivery_take(dl, ev);
		break;
	case BROKER_EV_TOO_LARGE:
		dl->subs[ev->sub].stats.too_large++;
		dl->subs[ev->sub].stats.dead_lettered++;
		break;
	default:
		break;
	}
}

/* ---- life ---- */

static int
dsub_init(struct delivery *dl, struct dsub *ds, int index)
{
	const struct conf_subscription *c = &dl->d->conf->subs[index];
	struct evhttp_uri *u = evhttp_uri_parse(c->deliver);
	const char *path;

	ds->dl = dl;
	ds->index = index;
	ds->name = xstrdup(c->name);
	ds->queue = xstrdup(c->queue);
	ds->dlq = xasprintf("%s.dlq", c->queue);
	ds->dispatch_ev = event_new(dl->d->base, -1, 0, dispatch_cb, ds);
	event_priority_set(ds->dispatch_ev, 2);
	ds->timer_ev = evtimer_new(dl->d->base, dispatch_cb, ds);
	histogram_init(&ds->stats.latency, metrics_latency_bounds, metrics_latency_nbounds);
	histogram_init(&ds->stats.ack, metrics_latency_bounds, metrics_latency_nbounds);
	ds->consuming = -1;	/* unknown: the first flow decision tells the broker */
	if (c->internal) {
		if (u)
			evhttp_uri_free(u);
		return 0;
	}
	if (c->frontdoor) {	/* to the consumers of the AMQP front door */
		if (u)
			evhttp_uri_free(u);
		dsub_load(ds);
		return 0;
	}
	if (!u || !evhttp_uri_get_host(u)) {
		log_error("bad deliver URL", LOG_STR("subscription", c->name), LOG_STR("url", c->deliver));
		if (u)
			evhttp_uri_free(u);
		return -1;
	}
	ds->host = xstrdup(evhttp_uri_get_host(u));
	ds->port = evhttp_uri_get_port(u) > 0 ? evhttp_uri_get_port(u) : 80;
	path = evhttp_uri_get_path(u);
	if (evhttp_uri_get_query(u)) {
		ds->path = xasprintf("%s?%s", path && *path ? path : "/",
		    evhttp_uri_get_query(u));
	} else
		ds->path = xstrdup(path && *path ? path : "/");
	evhttp_uri_free(u);
	ds->nconns = c->concurrency;
	ds->conns = xcalloc(ds->nconns, sizeof *ds->conns);
	if (c->prepared_conninfo)
		ds->txpg = txpg_new(dl->d->base, c->prepared_conninfo, c->name, dl->d->conf->service,
		    dl->txp);
	dsub_load(ds);
	if (ds->npending)
		log_info("pending deliveries resumed", LOG_STR("subscription", ds->name),
		    LOG_UINT("count", ds->npending));
	return 0;
}

struct delivery *
delivery_new(struct sagad *d)
{
	struct delivery *dl = xcalloc(1, sizeof *dl);
	size_t i;

	dl->d = d;
	dl->nsubs = d->conf->n_subs;
	dl->subs = xcalloc(dl->nsubs + 1, sizeof *dl->subs);
	for (i = 0; i < dl->nsubs; i++)
		if (d->conf->subs[i].shared_dedup && !dl->dedup) {
			char *err = NULL;
			/* The claims live in the saga store's schema. */
			if (saga_pg_schema_migrate(d->conf->saga_store.conninfo,
			    d->conf->saga_store.schema, &err) < 0) {
				log_error("shared dedup: cannot set up the PostgreSQL schema",
				    LOG_STR("error", err));
				free(err);
				delivery_free(dl);
				return NULL;
			}
			dl->dedup = dedup_new(d->base, d->conf, store_replica_id(d->store));
		}
	if (!(dl->txp = txpart_new(d))) {
		delivery_free(dl);
		return NULL;
	}
	for (i = 0; i < dl->nsubs; i++)
		if (dsub_init(dl, &dl->subs[i], (int)i) < 0) {
			delivery_free(dl);
			return NULL;
		}
	return dl;
}

void
delivery_set_broker(struct delivery *dl, struct broker *b)
{
	size_t i;

	dl->br = b;
	for (i = 0; i < dl->nsubs; i++) {
		dsub_flow(&dl->subs[i]);
		dispatch_schedule(&dl->subs[i]);
	}
}

void
delivery_set_handler(struct delivery *dl, int sub, delivery_handler_fn *fn, void *arg)
{
	dl->subs[sub].handler = fn;
	dl->subs[sub].handler_arg = arg;
}

void
delivery_stop(struct delivery *dl)
{
	size_t i;

	dl->stopping = 1;
	for (i = 0; i < dl->nsubs; i++)
		dsub_flow(&dl->subs[i]);
}

unsigned
delivery_inflight(const struct delivery *dl)
{
	unsigned n = 0;
	size_t i;

	for (i = 0; dl && i < dl->nsubs; i++)
		n += dl->subs[i].inflight;
	return n;
}

int
delivery_connected(const struct delivery *dl)
{
	return !dl || dl->nsubs == 0 || dl->epoch != 0;
}

void
delivery_free(struct delivery *dl)
{
	size_t i, j;
	int k;

	if (!dl)
		return;
	dedup_free(dl->dedup);	/* first: its claims' records are freed below */
	txpart_free(dl->txp);
	for (i = 0; i < dl->nsubs; i++) {
		struct dsub *ds = &dl->subs[i];
		/* Freeing a connection cancels its request; the callback then
		 * sees SAGAD_STOPPED and only frees its attempt. */
		txpg_free(ds->txpg);	/* its requests' owners are the records below */
		for (k = 0; k < ds->nconns; k++)
			hclient_free(ds->conns[k].hc);
		for (j = 0; j < ds->npending; j++) {
			inbox_rec_free(ds->pending[j]->rec);
			free(ds->pending[j]);
		}
		free(ds->pending);
		free(ds->conns);
		if (ds->dispatch_ev)
			event_free(ds->dispatch_ev);
		if (ds->timer_ev)
			event_free(ds->timer_ev);
		free(ds->name); free(ds->queue); free(ds->dlq);
		free(ds->host); free(ds->path);
	}
	free(dl->subs);
	free(dl);
}

/* ---- admin ---- */

/* An operator's COMMIT or ABORT (txpart_resolve): put in the inbox of
 * subscription sub as if it had been consumed, then delivered as usual. */
static int
delivery_inject(void *arg, const char *sub, struct msg *m)
{
	struct delivery *dl = arg;
	int i = delivery_sub_index(dl, sub);
	int64_t id = 0;
	enum store_put r;

	if (i < 0 || dl->subs[i].handler) {
		msg_free(m);
		return -1;
	}
	r = store_inbox_put(dl->d->store, sub, m, util_now(), &id);
	msg_free(m);
	if (r == STORE_PUT_DUPLICATE)	/* resolved before: it is on its way */
		return 0;
	if (r != STORE_PUT_STORED)
		return -1;
	dsub_load(&dl->subs[i]);
	dispatch_schedule(&dl->subs[i]);
	return 0;
}

int
delivery_tx_resolve(struct delivery *dl, const char *tx, int commit)
{
	return txpart_resolve(dl->txp, tx, commit, delivery_inject, dl);
}

void *
delivery_tx_json(struct delivery *dl, const char *tx, const char *state, size_t limit)
{
	int st = state ? txpart_state_from_name(state) : 0;

	return st < 0 ? json_array() : txpart_list_json(dl->txp, tx, st, limit);
}

int
delivery_sub_index(const struct delivery *dl, const char *name)
{
	size_t i;

	for (i = 0; i < dl->nsubs; i++)
		if (strcmp(dl->subs[i].name, name) == 0)
			return (int)i;
	return -1;
}

static double
dsub_oldest_age(const struct dsub *ds)
{
	return ds->npending ? util_now() - ds->pending[0]->rec->received_at : 0;
}

void
delivery_metrics(struct delivery *dl, struct evbuffer *out)
{
	char labels[512];
	size_t i;
	int o;

	metrics_family(out, "sagad_delivered_total", "counter",
	    "Delivery attempts to the service by outcome.");
	for (i = 0; i < dl->nsubs; i++)
		for (o = 0; o < OUTCOME_COUNT; o++) {
			snprintf(labels, sizeof labels, "subscription=\"%s\",outcome=\"%s\"",
			    dl->subs[i].name, dispatch_outcome_names[o]);
			metrics_sample(out, "sagad_delivered_total", labels,
			    (double)dl->subs[i].stats.outcomes[o]);
		}
#define PER_SUB(mname, type, help, expr)					\
	do {									\
		metrics_family(out, mname, type, help);				\
		for (i = 0; i < dl->nsubs; i++) {				\
			const struct dsub *ds = &dl->subs[i];			\
			snprintf(labels, sizeof labels, "subscription=\"%s\"", ds->name); \
			metrics_sample(out, mname, labels, (double)(expr));	\
		}								\
	} while (0)
	PER_SUB("sagad_dead_lettered_total", "counter", "Messages dead-lettered.",
	    ds->stats.dead_lettered);
	PER_SUB("sagad_duplicates_total", "counter", "Consumed messages dropped as already seen.",
	    ds->stats.duplicates);
	PER_SUB("sagad_too_large_total", "counter", "Consumed messages over max_message_bytes.",
	    ds->stats.too_large);
	PER_SUB("sagad_inbox_backlog", "gauge", "Consumed messages waiting for delivery.",
	    ds->npending);
	PER_SUB("sagad_inbox_inflight", "gauge", "Deliveries in flight to the service.",
	    ds->inflight);
	PER_SUB("sagad_inbox_oldest_age_seconds", "gauge", "Age of the oldest waiting message.",
	    dsub_oldest_age(ds));
	PER_SUB("sagad_circuit_open", "gauge", "1 while the service's circuit is open or half open.",
	    ds->circuit != CIRCUIT_CLOSED);
	PER_SUB("sagad_consuming", "gauge", "1 while sagad takes messages from the queue.",
	    ds->consuming == 1);
#undef PER_SUB
	metrics_family(out, "sagad_delivery_seconds", "histogram",
	    "Time from consumption to the recorded outcome.");
	for (i = 0; i < dl->nsubs; i++) {
		snprintf(labels, sizeof labels, "subscription=\"%s\"", dl->subs[i].name);
		metrics_histogram(out, "sagad_delivery_seconds", labels, &dl->subs[i].stats.latency);
	}
	/* What the broker's prefetch window must cover: a subscription takes
	 * at most prefetch / this many messages a second. */
	metrics_family(out, "sagad_inbox_ack_seconds", "histogram",
	    "Time from a message's arrival to its broker ack (inbox commit and fsync).");
	for (i = 0; i < dl->nsubs; i++) {
		snprintf(labels, sizeof labels, "subscription=\"%s\"", dl->subs[i].name);
		metrics_histogram(out, "sagad_inbox_ack_seconds", labels, &dl->subs[i].stats.ack);
	}
	txpart_metrics(dl->txp, out);
}

void *
delivery_sub_json(struct delivery *dl, int sub)
{
	struct dsub *ds = &dl->subs[sub];
	const struct conf_subscription *c = dsub_conf(ds);

	const struct delivery_sink *k;
	int consumers = 0;

	for (k = ds->sinks; k; k = k->next)
		consumers++;
	return json_pack("{s:s,s:s,s:s,s:i,s:I,s:i,s:f,s:s,s:b,s:I,s:I,s:I,s:I}",
	    "name", ds->name, "queue", ds->queue, "deliver", c->deliver,
	    "consumers", consumers,
	    "backlog", (json_int_t)ds->npending, "inflight", (int)ds->inflight,
	    "oldest_age_seconds", dsub_oldest_age(ds),
	    "circuit", dispatch_circuit_names[ds->circuit], "consuming", ds->consuming == 1,
	    "delivered_total", (json_int_t)ds->stats.outcomes[OUTCOME_SUCCESS],
	    "dead_lettered_total", (json_int_t)ds->stats.dead_lettered,
	    "duplicates_total", (json_int_t)ds->stats.duplicates,
	    "dead_letters", (json_int_t)store_inbox_count(dl->d->store, ds->name, INBOX_DEAD));
}

