#include "delivery.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include "conf.h"
#include "hclient.h"
#include "log.h"
#include "sagad.h"
#include "store.h"
#include "util.h"
#include "xmalloc.h"

/* One inbox record held in memory while it waits for delivery. */
struct dmsg {
	struct inbox_rec *rec;
	int committed;		/* its inbox record is committed: may be delivered */
	int inflight;
};

struct dconn {
	struct hclient *hc;	/* NULL until first used */
	int reserved;		/* taken by an attempt that waits for its mark */
};

struct dsub {
	struct delivery *dl;
	int index;
	char *name, *queue, *dlq;
	char *host, *path;
	int port;
	struct dconn *conns;
	int nconns;
	struct dmsg **pending;	/* broker order (inbox id) */
	size_t npending, cappending;
	unsigned inflight;
	enum delivery_circuit circuit;
	unsigned failures;	/* consecutive */
	double open_until;
	int consuming;		/* what we asked the broker for */
	struct event *dispatch_ev, *timer_ev;
	double timer_at;
	struct delivery_sub_stats stats;
	delivery_handler_fn *handler;	/* internal subscription */
	void *handler_arg;
};

struct delivery {
	struct sagad *d;
	struct broker *br;
	uint64_t epoch;		/* consuming connection; 0 while down */
	int stopping;
	struct dsub *subs;
	size_t nsubs;
};

/* One HTTP attempt. */
struct dattempt {
	struct dsub *ds;
	struct dmsg *dm;
	struct dconn *conn;
	struct evbuffer *req;	/* until it goes out (delivery_marked_cb) */
};

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
};

static const char *const outcome_names[OUTCOME_COUNT] = {
	"success", "refused", "retry", "dead-lettered"
};

static const struct conf_subscription *
dsub_conf(const struct dsub *ds)
{
	return &ds->dl->d->conf->subs[ds->index];
}

static void
dsub_schedule(struct dsub *ds)
{
	event_active(ds->dispatch_ev, 0, 0);
}

/* Take from the broker only while the backlog has room and the service is
 * healthy, so that replicas with a working service get the messages. */
static void
dsub_flow(struct dsub *ds)
{
	struct delivery *dl = ds->dl;
	size_t max = (size_t)dsub_conf(ds)->max_pending;
	/* Pause at max_pending, resume below three quarters of it, so that a
	 * backlog at the edge does not cancel and consume for every message. */
	size_t limit = ds->consuming == 1 ? max : max - max / 4;
	int want = !dl->stopping && ds->circuit == CIRCUIT_CLOSED &&
	    ds->npending < (limit ? limit : 1);

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

static void
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
static void
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
			dm->committed = 1;
			dsub_append(ds, dm);
		}
	} while (n == 256);
}

/* ---- outcomes ---- */

static void
delivery_publish_internal(struct delivery *dl, struct msg *m, unsigned flags)
{
	if (store_outbox_put(dl->d->store, m, util_now(), flags) != STORE_PUT_STORED)
		log_error("cannot store an outgoing message", LOG_STR("message_id", m->message_id),
		    LOG_STR("exchange", m->exchange), LOG_STR("routing_key", m->routing_key));
}

static void
delivery_copy_props(struct props *dst, const struct props *src)
{
	size_t i;

	if (src->content_type)
		dst->content_type = xstrdup(src->content_type);
	if (src->correlation_id)
		dst->correlation_id = xstrdup(src->correlation_id);
	if (src->type)
		dst->type = xstrdup(src->type);
	for (i = 0; i < src->n_headers; i++)
		props_set_header(dst, src->headers[i].name, src->headers[i].value);
}

/* The service's answer to a command goes back to its reply_to queue, in
 * the same transaction as the inbox record. */
static void
dsub_reply(struct dsub *ds, struct dmsg *dm, const struct hclient_answer *ans, int success)
{
	const struct msg *in = dm->rec->m;
	struct evbuffer *body = ans->body;
	const char *ct = ans->content_type;
	const char *h;
	struct msg m;

	char id[37];

	memset(&m, 0, sizeof m);
	/* A fresh id: a command refused, then sent again with the same id,
	 * gets a second reply that must not look like a repeat of the first. */
	util_uuid7(id);
	m.message_id = xstrdup(id);
	m.exchange = xstrdup("");
	m.routing_key = xstrdup(in->props.reply_to);
	if (ct && util_valid_shortstr(ct, 255))
		m.props.content_type = xstrdup(ct);
	if (in->props.correlation_id)
		m.props.correlation_id = xstrdup(in->props.correlation_id);
	props_set_header(&m.props, "x-sagad-outcome", success ? "success" : "failure");
	if ((h = props_get_header(&in->props, "x-sagad-saga")))
		props_set_header(&m.props, "x-sagad-saga", h);
	if ((h = props_get_header(&in->props, "x-sagad-step")))
		props_set_header(&m.props, "x-sagad-step", h);
	if ((h = props_get_header(&in->props, "x-sagad-kind")))
		props_set_header(&m.props, "x-sagad-kind", h);
	props_set_header(&m.props, "x-sagad-reply-to-message-id", in->message_id);
	m.body_len = evbuffer_get_length(body);
	m.body = xmalloc(m.body_len + 1);
	evbuffer_copyout(body, m.body, m.body_len);
	/* Out once written: if a crash of the machine loses this transaction,
	 * the record is pending again and the service's answer comes again. */
	delivery_publish_internal(ds->dl, &m, STORE_OUT_EARLY);
	free(m.message_id); free(m.exchange); free(m.routing_key); free(m.body);
	props_free(&m.props);
}

static void
dsub_dead_letter(struct dsub *ds, struct dmsg *dm, const char *reason, int status,
    const char *error)
{
	const struct msg *in = dm->rec->m;
	char num[32];
	struct msg m;

	memset(&m, 0, sizeof m);
	m.message_id = xstrdup(in->message_id);
	m.exchange = xstrdup("");
	m.routing_key = xstrdup(ds->dlq);
	delivery_copy_props(&m.props, &in->props);
	props_set_header(&m.props, "x-sagad-dead-reason", reason);
	snprintf(num, sizeof num, "%u", dm->rec->attempts);
	props_set_header(&m.props, "x-sagad-attempts", num);
	snprintf(num, sizeof num, "%d", status);
	props_set_header(&m.props, "x-sagad-last-status", num);
	props_set_header(&m.props, "x-sagad-last-error", error ? error : "");
	props_set_header(&m.props, "x-sagad-subscription", ds->name);
	props_set_header(&m.props, "x-sagad-original-exchange", in->exchange);
	props_set_header(&m.props, "x-sagad-original-routing-key", in->routing_key);
	m.body = in->body;
	m.body_len = in->body_len;
	delivery_publish_internal(ds->dl, &m, 0);
	m.body = NULL;
	free(m.message_id); free(m.exchange); free(m.routing_key);
	props_free(&m.props);
	store_inbox_dead(ds->dl->d->store, dm->rec->id, util_now(), dm->rec->attempts,
	    reason, status, error ? error : "");
	ds->stats.dead_lettered++;
	ds->stats.outcomes[OUTCOME_DEAD]++;
	log_warn("dead-lettered", LOG_STR("subscription", ds->name),
	    LOG_STR("message_id", in->message_id), LOG_STR("routing_key", in->routing_key),
	    LOG_STR("reason", reason), LOG_UINT("attempts", dm->rec->attempts),
	    LOG_INT("status", status), LOG_STR("error", error));
}

static void
dsub_circuit_ok(struct dsub *ds)
{
	if (ds->circuit != CIRCUIT_CLOSED)
		log_info("circuit closed: service answers again", LOG_STR("subscription", ds->name));
	ds->failures = 0;
	ds->circuit = CIRCUIT_CLOSED;
}

static void
dsub_circuit_fail(struct dsub *ds)
{
	const struct conf_subscription *c = dsub_conf(ds);

	ds->failures++;
	if (ds->circuit == CIRCUIT_HALF_OPEN ||
	    (ds->circuit == CIRCUIT_CLOSED && ds->failures >= (unsigned)c->circuit_failures)) {
		if (ds->circuit == CIRCUIT_CLOSED)
			log_warn("circuit open: service keeps failing, taking nothing from the broker",
			    LOG_STR("subscription", ds->name), LOG_UINT("failures", ds->failures));
		ds->circuit = CIRCUIT_OPEN;
		ds->open_until = util_mono() + c->circuit_open;
	}
}

static void
dsub_retry(struct dsub *ds, struct dmsg *dm, int status, const char *error)
{
	const struct conf_subscription *c = dsub_conf(ds);
	double delay;

	dsub_circuit_fail(ds);
	if (dm->rec->attempts >= (unsigned)c->max_attempts) {
		dsub_dead_letter(ds, dm, "attempts-exhausted", status, error);
		dsub_remove(ds, dm);
		return;
	}
	ds->stats.outcomes[OUTCOME_RETRY]++;
	delay = util_backoff(c->retry_initial, c->retry_max, dm->rec->attempts);
	dm->rec->due_at = util_now() + delay;
	dm->rec->last_status = status;
	store_inbox_retry(ds->dl->d->store, dm->rec->id, dm->rec->attempts,
	    dm->rec->due_at, status, error);
	log_debug("delivery failed, retry scheduled", LOG_STR("subscription", ds->name),
	    LOG_STR("message_id", dm->rec->m->message_id),
	    LOG_STR("routing_key", dm->rec->m->routing_key), LOG_UINT("attempt", dm->rec->attempts),
	    LOG_INT("status", status), LOG_STR("error", error), LOG_DBL("in_seconds", delay));
}

static void
dsub_done(struct dsub *ds, struct dmsg *dm, int status)
{
	store_inbox_done(ds->dl->d->store, dm->rec->id, util_now(), status);
	histogram_observe(&ds->stats.latency, util_now() - dm->rec->received_at);
	dsub_remove(ds, dm);
}

static void
delivery_answered(struct dattempt *a, const struct hclient_answer *ans)
{
	struct dsub *ds = a->ds;
	struct dmsg *dm = a->dm;
	int status = ans->status;
	char error[256];

	if (ans->result != HCLIENT_ANSWERED) {
		snprintf(error, sizeof error, "%s", hclient_result_name(ans->result));
		dsub_retry(ds, dm, 0, error);
	} else if (status >= 200 && status <= 299) {
		dsub_circuit_ok(ds);
		ds->stats.outcomes[OUTCOME_SUCCESS]++;
		if (dm->rec->m->props.reply_to)
			dsub_reply(ds, dm, ans, 1);
		dsub_done(ds, dm, status);
	} else if (status == 409 || status == 422) {
		dsub_circuit_ok(ds);
		if (dm->rec->m->props.reply_to) {
			/* A business refusal of a command is its failure reply.
			 * The record is forgotten: the sender may try the same
			 * command (same id) again later, and then it must reach
			 * the service. */
			ds->stats.outcomes[OUTCOME_REFUSED]++;
			dsub_reply(ds, dm, ans, 0);
			store_inbox_forget(ds->dl->d->store, dm->rec->id);
			dsub_remove(ds, dm);
		} else {
			hclient_answer_text(ans, "refused by the service", error, sizeof error);
			dsub_dead_letter(ds, dm, "rejected", status, error);
			dsub_remove(ds, dm);
		}
	} else if (status >= 400 && status <= 499) {
		char reason[32];
		dsub_circuit_ok(ds);
		snprintf(reason, sizeof reason, "refused-%d", status);
		hclient_answer_text(ans, "refused by the service", error, sizeof error);
		dsub_dead_letter(ds, dm, reason, status, error);
		dsub_remove(ds, dm);
	} else {
		char prefix[32];
		snprintf(prefix, sizeof prefix, "HTTP %d", status);
		hclient_answer_text(ans, prefix, error, sizeof error);
		dsub_retry(ds, dm, status, error);
	}
}

static void
delivery_done_cb(void *arg, const struct hclient_answer *ans)
{
	struct dattempt *a = arg;
	struct dsub *ds = a->ds;

	a->dm->inflight = 0;
	ds->inflight--;
	if (ds->dl->d->state == SAGAD_STOPPED || ans->result == HCLIENT_CANCELLED) {
		free(a);
		return;
	}
	delivery_answered(a, ans);
	free(a);
	dsub_flow(ds);
	dsub_schedule(ds);
}

/* ---- attempts ---- */

/* Where delivery_headers puts each header: the request being written, or
 * (the fuzz target) a list. */
typedef void delivery_emit_fn(void *arg, const char *name, const char *value);

static void
delivery_add(delivery_emit_fn *emit, void *arg, const char *k, const char *v)
{
	/* A value with CR/LF or other garbage from the broker is left out
	 * rather than breaking the request. */
	if (v && util_valid_shortstr(v, 65535))
		emit(arg, k, v);
}

static void
delivery_headers(struct dsub *ds, struct dmsg *dm, delivery_emit_fn *emit, void *arg)
{
	const struct msg *m = dm->rec->m;
	const char *kind = props_get_header(&m->props, "x-sagad-kind");
	char num[16], name[300];
	size_t i;

	snprintf(name, sizeof name, "%s:%d", ds->host, ds->port);
	emit(arg, "Host", name);
	delivery_add(emit, arg, "Content-Type", m->props.content_type ?
	    m->props.content_type : "application/octet-stream");
	delivery_add(emit, arg, "Message-Id", m->message_id);
	delivery_add(emit, arg, "Correlation-Id", m->props.correlation_id);
	delivery_add(emit, arg, "Sagad-Subscription", ds->name);
	delivery_add(emit, arg, "Sagad-Exchange", m->exchange);
	delivery_add(emit, arg, "Sagad-Routing-Key", m->routing_key);
	snprintf(num, sizeof num, "%u", dm->rec->attempts + 1);
	delivery_add(emit, arg, "Sagad-Attempt", num);
	if (dm->rec->redelivered)
		delivery_add(emit, arg, "Sagad-Redelivered", "true");
	delivery_add(emit, arg, "Sagad-Kind", kind && (strcmp(kind, "command") == 0 ||
	    strcmp(kind, "compensation") == 0) ? kind : "event");
	delivery_add(emit, arg, "Sagad-Saga", props_get_header(&m->props, "x-sagad-saga"));
	delivery_add(emit, arg, "Sagad-Step", props_get_header(&m->props, "x-sagad-step"));
	if (m->props.type)
		delivery_add(emit, arg, "Amqp-Type", m->props.type);
	for (i = 0; i < m->props.n_headers; i++) {
		const char *k = m->props.headers[i].name;
		const char *c;
		if (strcmp(k, "x-sagad-kind") == 0 || strcmp(k, "x-sagad-saga") == 0 ||
		    strcmp(k, "x-sagad-step") == 0)
			continue;
		for (c = k; *c; c++)	/* HTTP field names are tokens */
			if (*c <= 0x20 || *c >= 0x7f || strchr("()<>@,;:\\\"/[]?={}", *c))
				break;
		if (*c)
			continue;
		snprintf(name, sizeof name, "Amqp-Header-%s", k);
		delivery_add(emit, arg, name, m->props.headers[i].value);
	}
}

static struct dconn *
dsub_idle_conn(struct dsub *ds)
{
	const struct conf_subscription *c = dsub_conf(ds);
	int i;

	for (i = 0; i < ds->nconns; i++)
		if (!ds->conns[i].reserved && (!ds->conns[i].hc || !hclient_busy(ds->conns[i].hc)))
			break;
	if (i == ds->nconns)
		return NULL;
	if (!ds->conns[i].hc)
		ds->conns[i].hc = hclient_new(ds->dl->d->base, ds->host, ds->port,
		    (size_t)c->max_message_bytes, 65536);
	return &ds->conns[i];
}

static void
delivery_emit_wire(void *arg, const char *name, const char *value)
{
	struct evbuffer *out = arg;
	size_t nl = strlen(name), vl = strlen(value);
	struct evbuffer_iovec v;

	/* One reservation per header instead of four small adds. */
	if (evbuffer_reserve_space(out, (ev_ssize_t)(nl + vl + 4), &v, 1) < 1) {
		evbuffer_add_printf(out, "%s: %s\r\n", name, value);
		return;
	}
	memcpy(v.iov_base, name, nl);
	memcpy((char *)v.iov_base + nl, ": ", 2);
	memcpy((char *)v.iov_base + nl + 2, value, vl);
	memcpy((char *)v.iov_base + nl + 2 + vl, "\r\n", 2);
	v.iov_len = nl + vl + 4;
	evbuffer_commit_space(out, &v, 1);
}

/* The request as it goes on the wire: request line, the headers of
 * delivery_headers, Content-Length, the body. */
static void
delivery_request(struct dsub *ds, struct dmsg *dm, struct evbuffer *out)
{
	char len[48];

	evbuffer_expand(out, 1024 + dm->rec->m->body_len);
	evbuffer_add(out, "POST ", 5);
	evbuffer_add(out, ds->path, strlen(ds->path));
	evbuffer_add(out, " HTTP/1.1\r\n", 11);
	delivery_headers(ds, dm, delivery_emit_wire, out);
	snprintf(len, sizeof len, "Content-Length: %zu\r\n\r\n", dm->rec->m->body_len);
	evbuffer_add(out, len, strlen(len));
	evbuffer_add(out, dm->rec->m->body, dm->rec->m->body_len);
}

static void dsub_arm(struct dsub *ds, double at);

/* An attempt that will not go out after all: as if never started. */
static void
dattempt_cancel(struct dattempt *a)
{
	a->conn->reserved = 0;
	a->dm->inflight = 0;
	a->dm->rec->attempts--;
	a->ds->inflight--;
	if (a->req)
		evbuffer_free(a->req);
	free(a);
}

/* The attempt's mark is written (or lost): send the request, or give the
 * attempt up without sending. Runs inside a commit: no store writes. */
static void
delivery_marked_cb(void *arg, int ok)
{
	struct dattempt *a = arg;
	struct dsub *ds = a->ds;
	struct evbuffer *req = a->req;

	if (!ok || ds->dl->d->state == SAGAD_STOPPED) {
		/* Unmarked, it must not go out: after a crash the repeat
		 * would look like a first delivery. (Draining, it goes out:
		 * marked, it was decided while running, and the drain waits
		 * for it. Stopped: never sent, yet marked; the next start
		 * calls it a possible redelivery, which it then is not.) */
		dattempt_cancel(a);
		if (!ok)
			dsub_arm(ds, util_now() + 1);
		return;
	}
	a->conn->reserved = 0;
	a->req = NULL;
	/* Cannot fail: the connection was idle. Its answer, or failure,
	 * comes from the loop. */
	hclient_send(a->conn->hc, req, dsub_conf(ds)->timeout, delivery_done_cb, a);
	evbuffer_free(req);
}

/*
 * An attempt starts once the store holds that it started (store_inbox_sent,
 * written with the turn's transaction, no fsync of its own): if sagad dies
 * while the service holds the request, the record shows it after the
 * restart and the repeat carries Sagad-Redelivered (sagad(8), DELIVERY
 * GUARANTEES). The request waits for the end of the turn, not for a sync.
 */
static void
dsub_attempt(struct dsub *ds, struct dmsg *dm)
{
	struct dconn *conn = dsub_idle_conn(ds);
	struct store *st = ds->dl->d->store;
	struct dattempt *a;

	if (!conn)
		return;
	a = xcalloc(1, sizeof *a);
	a->ds = ds;
	a->dm = dm;
	a->conn = conn;
	a->req = evbuffer_new();
	delivery_request(ds, dm, a->req);	/* Sagad-Attempt: before the count */
	conn->reserved = 1;
	dm->inflight = 1;
	dm->rec->attempts++;
	ds->inflight++;
	if (store_inbox_sent(st, dm->rec->id, dm->rec->attempts) < 0) {
		dattempt_cancel(a);	/* unmarked: not sent (delivery_marked_cb) */
		dsub_arm(ds, util_now() + 1);
		return;
	}
	store_on_written(st, delivery_marked_cb, a);
}

static int
dsub_cid_busy(const char **busy, size_t n, const char *cid)
{
	size_t i;

	for (i = 0; i < n; i++)
		if (strcmp(busy[i], cid) == 0)
			return 1;
	return 0;
}

static void
dsub_arm(struct dsub *ds, double at)
{
	struct timeval tv;
	double now = util_now();

	if (evtimer_pending(ds->timer_ev, NULL) && ds->timer_at <= at)
		return;
	ds->timer_at = at;
	if (at < now)
		at = now;
	tv.tv_sec = (time_t)(at - now);
	tv.tv_usec = (suseconds_t)((at - now - tv.tv_sec) * 1e6) + 1000;
	evtimer_add(ds->timer_ev, &tv);
}

/*
 * Start every attempt that may start: within concurrency (one while the
 * circuit is half open), due, committed, and in ordered mode the first of
 * its correlation id (one at a time per id, in broker order, retries
 * included).
 */
static void
dsub_dispatch(struct dsub *ds)
{
	const struct conf_subscription *c = dsub_conf(ds);
	double now = util_now(), next = 0;
	const char **busy = NULL;
	size_t nbusy = 0, i;
	unsigned limit = (unsigned)c->concurrency;

	/* Draining starts nothing new: what waits stays in the store. */
	if (ds->dl->d->state != SAGAD_RUNNING)
		return;
	if (ds->circuit == CIRCUIT_OPEN) {
		if (util_mono() < ds->open_until) {
			dsub_arm(ds, now + (ds->open_until - util_mono()));
			return;
		}
		ds->circuit = CIRCUIT_HALF_OPEN;
		log_info("circuit half open: probing the service", LOG_STR("subscription", ds->name));
	}
	if (ds->circuit == CIRCUIT_HALF_OPEN)
		limit = 1;
	if (c->ordered)
		busy = xcalloc(ds->npending + 1, sizeof *busy);
	for (i = 0; i < ds->npending && ds->inflight < limit; i++) {
		struct dmsg *dm = ds->pending[i];
		const char *cid = dm->rec->m->props.correlation_id;
		int blocked = dm->inflight || !dm->committed || dm->rec->due_at > now;

		if (dm->rec->due_at > now && !dm->inflight && (next == 0 || dm->rec->due_at < next))
			next = dm->rec->due_at;
		if (c->ordered && cid) {
			if (dsub_cid_busy(busy, nbusy, cid))
				continue;
			busy[nbusy++] = cid;
		}
		if (!blocked)
			dsub_attempt(ds, dm);
	}
	free(busy);
	if (next > 0)
		dsub_arm(ds, next);
}

static void
dsub_dispatch_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	dsub_dispatch(arg);
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
		k->dm->committed = 1;
		dsub_schedule(&k->dl->subs[k->sub]);
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
	} else if (dl->br && k->epoch == dl->epoch) {
		broker_ack(dl->br, k->epoch, k->sub, k->tag);
		histogram_observe(&dl->subs[k->sub].stats.ack, util_mono() - k->received);
	}
	if (dl->br)
		broker_kick(dl->br);
	free(k);
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
		free(k);
		msg_free(m);
		return;
	}
	msg_free(m);
	/* Delivered once the inbox record is written, acked only once it is
	 * durable. */
	if (k->dm)
		store_on_written(dl->d->store, delivery_written, k);
	if (put == STORE_PUT_STORED)
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
	if (asprintf(&ds->dlq, "%s.dlq", c->queue) < 0)
		return -1;
	ds->dispatch_ev = event_new(dl->d->base, -1, 0, dsub_dispatch_cb, ds);
	event_priority_set(ds->dispatch_ev, 2);
	ds->timer_ev = evtimer_new(dl->d->base, dsub_dispatch_cb, ds);
	histogram_init(&ds->stats.latency, metrics_latency_bounds, metrics_latency_nbounds);
	histogram_init(&ds->stats.ack, metrics_latency_bounds, metrics_latency_nbounds);
	ds->consuming = -1;	/* unknown: the first flow decision tells the broker */
	if (c->internal) {
		if (u)
			evhttp_uri_free(u);
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
		dsub_schedule(&dl->subs[i]);
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
	for (i = 0; i < dl->nsubs; i++) {
		struct dsub *ds = &dl->subs[i];
		/* Freeing a connection cancels its request; the callback then
		 * sees SAGAD_STOPPED and only frees its attempt. */
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
			    dl->subs[i].name, outcome_names[o]);
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
}

static const char *const circuit_names[] = { "closed", "open", "half-open" };

void *
delivery_sub_json(struct delivery *dl, int sub)
{
	struct dsub *ds = &dl->subs[sub];
	const struct conf_subscription *c = dsub_conf(ds);

	return json_pack("{s:s,s:s,s:s,s:I,s:i,s:f,s:s,s:b,s:I,s:I,s:I,s:I}",
	    "name", ds->name, "queue", ds->queue, "deliver", c->deliver,
	    "backlog", (json_int_t)ds->npending, "inflight", (int)ds->inflight,
	    "oldest_age_seconds", dsub_oldest_age(ds),
	    "circuit", circuit_names[ds->circuit], "consuming", ds->consuming == 1,
	    "delivered_total", (json_int_t)ds->stats.outcomes[OUTCOME_SUCCESS],
	    "dead_lettered_total", (json_int_t)ds->stats.dead_lettered,
	    "duplicates_total", (json_int_t)ds->stats.duplicates,
	    "dead_letters", (json_int_t)store_inbox_count(dl->d->store, ds->name, INBOX_DEAD));
}

void *
delivery_dlq_json(struct delivery *dl, int sub, size_t limit)
{
	struct dsub *ds = &dl->subs[sub];
	struct inbox_rec **recs = xcalloc(limit ? limit : 1, sizeof *recs);
	json_t *list = json_array();
	size_t n = 0, i;

	if (store_inbox_load(dl->d->store, ds->name, INBOX_DEAD, 0, limit, recs, &n) < 0) {
		free(recs);
		json_decref(list);
		return NULL;
	}
	for (i = 0; i < n; i++) {
		struct inbox_rec *r = recs[i];
		json_array_append_new(list, json_pack("{s:I,s:s,s:s,s:s,s:s?,s:s,s:i,s:i,s:s,s:f,s:f,s:I}",
		    "id", (json_int_t)r->id, "message_id", r->m->message_id,
		    "exchange", r->m->exchange, "routing_key", r->m->routing_key,
		    "correlation_id", r->m->props.correlation_id,
		    "reason", r->dead_reason, "attempts", (int)r->attempts,
		    "last_status", r->last_status, "last_error", r->last_error,
		    "received_at", r->received_at, "dead_at", r->finished_at,
		    "bytes", (json_int_t)r->m->body_len));
		inbox_rec_free(r);
	}
	free(recs);
	return json_pack("{s:s,s:s,s:I,s:o}", "subscription", ds->name,
	    "queue", ds->dlq, "count",
	    (json_int_t)store_inbox_count(dl->d->store, ds->name, INBOX_DEAD),
	    "messages", list);
}

int
delivery_replay(struct delivery *dl, int sub, const char *const *ids, size_t n)
{
	struct dsub *ds = &dl->subs[sub];
	int total = 0, rc;
	size_t i;

	if (!ids) {
		total = store_inbox_replay(dl->d->store, ds->name, NULL);
	} else {
		for (i = 0; i < n; i++) {
			rc = store_inbox_replay(dl->d->store, ds->name, ids[i]);
			if (rc < 0)
				return -1;
			total += rc;
		}
	}
	if (total < 0)
		return -1;
	if (total > 0) {
		log_info("dead letters replayed", LOG_STR("subscription", ds->name), LOG_INT("count", total));
		dsub_load(ds);
		/* Replayed records were reset in the open transaction: they may
		 * go out once it commits, which happens at the end of this turn
		 * before the dispatch event runs (same priority, queued later). */
		dsub_schedule(ds);
	}
	return total;
}
