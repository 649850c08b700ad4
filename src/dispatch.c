/*
 * Dispatch: the delivery's outgoing half. Records that delivery.c took in
 * go to the service over HTTP (hclient.c): one attempt per idle
 * connection, its outcome recorded in the store, retries with backoff, the
 * circuit that stops the intake while the service keeps failing, dead
 * letters and their replay. (ARCHITECTURE.md: Inbox: from consume to ack)
 */
#include "dispatch.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "hclient.h"
#include "log.h"
#include "props.h"
#include "sagad.h"
#include "otel.h"
#include "store.h"
#include "trace.h"
#include "txpart.h"
#include "util.h"
#include "xmalloc.h"

const char *const dispatch_outcome_names[OUTCOME_COUNT] = {
	"success", "refused", "retry", "dead-lettered"
};

const char *const dispatch_circuit_names[] = { "closed", "open", "half-open" };

void
dispatch_schedule(struct dsub *ds)
{
	event_active(ds->dispatch_ev, 0, 0);
}

/* ---- the circuit ---- */

/*
 * Every change of a subscription's circuit: CLOSED -> OPEN after
 * circuit_failures consecutive failures, OPEN -> HALF_OPEN once
 * circuit_open seconds passed (dispatch_run), HALF_OPEN -> OPEN when the
 * probe fails, any -> CLOSED on an answer. The log says each one once.
 */
void
dispatch_circuit_set(struct dsub *ds, enum delivery_circuit to)
{
	enum delivery_circuit from = ds->circuit;

	if (to == CIRCUIT_CLOSED && from != CIRCUIT_CLOSED)
		log_info("circuit closed: service answers again", LOG_STR("subscription", ds->name));
	else if (to == CIRCUIT_OPEN && from == CIRCUIT_CLOSED)
		log_warn("circuit open: service keeps failing, taking nothing from the broker",
		    LOG_STR("subscription", ds->name), LOG_UINT("failures", ds->failures));
	else if (to == CIRCUIT_HALF_OPEN)
		log_info("circuit half open: probing the service", LOG_STR("subscription", ds->name));
	if (to == CIRCUIT_OPEN)
		ds->open_until = util_mono() + dsub_conf(ds)->circuit_open;
	ds->circuit = to;
}

static void
dsub_circuit_ok(struct dsub *ds)
{
	ds->failures = 0;
	dispatch_circuit_set(ds, CIRCUIT_CLOSED);
}

static void
dsub_circuit_fail(struct dsub *ds)
{
	const struct conf_subscription *c = dsub_conf(ds);

	ds->failures++;
	if (ds->circuit == CIRCUIT_HALF_OPEN ||
	    (ds->circuit == CIRCUIT_CLOSED && ds->failures >= (unsigned)c->circuit_failures))
		dispatch_circuit_set(ds, CIRCUIT_OPEN);
}

/* ---- outcomes ---- */

static void
dispatch_publish_internal(struct delivery *dl, struct msg *m, unsigned flags)
{
	if (store_outbox_put(dl->d->store, m, util_now(), flags) != STORE_PUT_STORED)
		log_error("cannot store an outgoing message", LOG_STR("message_id", m->message_id),
		    LOG_STR("exchange", m->exchange), LOG_STR("routing_key", m->routing_key));
}

static void
dispatch_copy_props(struct props *dst, const struct props *src)
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
	trace_copy(&m.props, &in->props);	/* the saga's trace goes on */
	m.body_len = evbuffer_get_length(body);
	m.body = xmalloc(m.body_len + 1);
	evbuffer_copyout(body, m.body, m.body_len);
	/* Out once written: if a crash of the machine loses this transaction,
	 * the record is pending again and the service's answer comes again. */
	dispatch_publish_internal(ds->dl, &m, STORE_OUT_EARLY);
	free(m.message_id); free(m.exchange); free(m.routing_key); free(m.body);
	props_free(&m.props);
}

void
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
	dispatch_copy_props(&m.props, &in->props);
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
	dispatch_publish_internal(ds->dl, &m, 0);
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

void
dsub_retry_later(struct dsub *ds, struct dmsg *dm, int status, const char *error)
{
	const struct conf_subscription *c = dsub_conf(ds);
	double delay;

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

/* A failed attempt: retried after the backoff, or dead-lettered once
 * max_attempts are spent; the circuit counts it. */
static void
dsub_retry(struct dsub *ds, struct dmsg *dm, int status, const char *error)
{
	dsub_circuit_fail(ds);
	dsub_retry_or_dead(ds, dm, status, error);
}

int
dsub_exhausted(struct dsub *ds, struct dmsg *dm, int status, const char *error)
{
	if (dm->rec->attempts < (unsigned)dsub_conf(ds)->max_attempts)
		return 0;
	dsub_dead_letter(ds, dm, "attempts-exhausted", status, error);
	dsub_remove(ds, dm);
	return 1;
}

void
dsub_retry_or_dead(struct dsub *ds, struct dmsg *dm, int status, const char *error)
{
	if (dsub_exhausted(ds, dm, status, error))
		return;
	ds->stats.outcomes[OUTCOME_RETRY]++;
	dsub_retry_later(ds, dm, status, error);
}

void
dsub_done(struct dsub *ds, struct dmsg *dm, int status)
{
	store_inbox_done(ds->dl->d->store, dm->rec->id, util_now(), status);
	histogram_observe(&ds->stats.latency, util_now() - dm->rec->received_at);
	dsub_remove(ds, dm);
}

/* 2xx: delivered; a command's answer goes back as its success reply. */
void
dsub_succeeded(struct dsub *ds, struct dmsg *dm, const struct hclient_answer *ans)
{
	dsub_circuit_ok(ds);
	ds->stats.outcomes[OUTCOME_SUCCESS]++;
	txpart_after(ds->dl->txp, ds->name, dm->rec->m, 1);
	if (dm->rec->m->props.reply_to)
		dsub_reply(ds, dm, ans, 1);
	dsub_done(ds, dm, ans->status);
}

/* 409/422: the service said no for business reasons; it is healthy. */
void
dsub_refused(struct dsub *ds, struct dmsg *dm, const struct hclient_answer *ans)
{
	char error[256];

	dsub_circuit_ok(ds);
	txpart_after(ds->dl->txp, ds->name, dm->rec->m, 0);
	if (dm->rec->m->props.reply_to) {
		/* A business refusal of a command is its failure reply. The
		 * record is forgotten: the sender may try the same command
		 * (same id) again later, and then it must reach the service. */
		ds->stats.outcomes[OUTCOME_REFUSED]++;
		dsub_reply(ds, dm, ans, 0);
		store_inbox_forget(ds->dl->d->store, dm->rec->id);
	} else {
		hclient_answer_text(ans, "refused by the service", error, sizeof error);
		dsub_dead_letter(ds, dm, "rejected", ans->status, error);
	}
	dsub_remove(ds, dm);
}

/* Another 4xx: this message will never do; the service is healthy. */
static void
dsub_rejected(struct dsub *ds, struct dmsg *dm, const struct hclient_answer *ans)
{
	char error[256], reason[32];

	dsub_circuit_ok(ds);
	snprintf(reason, sizeof reason, "refused-%d", ans->status);
	hclient_answer_text(ans, "refused by the service", error, sizeof error);
	dsub_dead_letter(ds, dm, reason, ans->status, error);
	dsub_remove(ds, dm);
}

/* No answer, or 5xx (anything else): the service may do better later. */
static void
dsub_failed(struct dsub *ds, struct dmsg *dm, const struct hclient_answer *ans)
{
	char error[256], prefix[32];

	if (ans->result != HCLIENT_ANSWERED) {
		snprintf(error, sizeof error, "%s", hclient_result_name(ans->result));
		dsub_retry(ds, dm, 0, error);
		return;
	}
	snprintf(prefix, sizeof prefix, "HTTP %d", ans->status);
	hclient_answer_text(ans, prefix, error, sizeof error);
	dsub_retry(ds, dm, ans->status, error);
}

static void
dispatch_answered(struct dattempt *a, const struct hclient_answer *ans)
{
	int status = ans->status;

	if (ans->result != HCLIENT_ANSWERED)
		dsub_failed(a->ds, a->dm, ans);
	else if (status >= 200 && status <= 299)
		dsub_succeeded(a->ds, a->dm, ans);
	else if (status == 409 || status == 422)
		dsub_refused(a->ds, a->dm, ans);
	else if (status >= 400 && status <= 499)
		dsub_rejected(a->ds, a->dm, ans);
	else
		dsub_failed(a->ds, a->dm, ans);
}

static void dispatch_span_end(struct dattempt *a, const struct hclient_answer *ans);

static void
dispatch_done_cb(void *arg, const struct hclient_answer *ans)
{
	struct dattempt *a = arg;
	struct dsub *ds = a->ds;

	dmsg_set_state(a->dm, DMSG_READY);
	ds->inflight--;
	dispatch_span_end(a, ans);
	if (ds->dl->d->state == SAGAD_STOPPED || ans->result == HCLIENT_CANCELLED) {
		free(a);
		return;
	}
	dispatch_answered(a, ans);
	free(a);
	dsub_flow(ds);
	dispatch_schedule(ds);
}

/* ---- attempts ---- */

/* Where dispatch_headers puts each header: the request being written, or
 * (the fuzz target) a list. */
typedef void dispatch_emit_fn(void *arg, const char *name, const char *value);

static void
dispatch_add(dispatch_emit_fn *emit, void *arg, const char *k, const char *v)
{
	/* A value with CR/LF or other garbage from the broker is left out
	 * rather than breaking the request. */
	if (v && util_valid_shortstr(v, 65535))
		emit(arg, k, v);
}

/* span_id: the attempt's span, the parent the service is told of (NULL:
 * the message's traceparent as it is). */
static void
dispatch_headers(struct dsub *ds, struct dmsg *dm, const char *span_id,
    dispatch_emit_fn *emit, void *arg)
{
	const struct msg *m = dm->rec->m;
	const char *kind = props_get_header(&m->props, "x-sagad-kind");
	const char *tp = props_get_header(&m->props, TRACE_PARENT);
	char num[16], name[300], child[TRACE_PARENT_LEN + 1];
	size_t i;

	snprintf(name, sizeof name, "%s:%d", ds->host, ds->port);
	emit(arg, "Host", name);
	dispatch_add(emit, arg, "Content-Type", m->props.content_type ?
	    m->props.content_type : "application/octet-stream");
	dispatch_add(emit, arg, "Message-Id", m->message_id);
	dispatch_add(emit, arg, "Correlation-Id", m->props.correlation_id);
	dispatch_add(emit, arg, "Sagad-Subscription", ds->name);
	dispatch_add(emit, arg, "Sagad-Exchange", m->exchange);
	dispatch_add(emit, arg, "Sagad-Routing-Key", m->routing_key);
	snprintf(num, sizeof num, "%u", dm->rec->attempts + 1);
	dispatch_add(emit, arg, "Sagad-Attempt", num);
	if (dm->rec->redelivered)
		dispatch_add(emit, arg, "Sagad-Redelivered", "true");
	kind = dispatch_kind(kind);
	dispatch_add(emit, arg, "Sagad-Kind", kind);
	if (dispatch_tx_kind(kind))
		dispatch_add(emit, arg, "Sagad-Transaction", m->props.correlation_id);
	if (ds->txpg && dm->tx) {	/* the service ends with PREPARE TRANSACTION */
		char gid[TXP_GID_MAX];
		txpart_gid(m, ds->dl->d->conf->service, gid);
		dispatch_add(emit, arg, "Sagad-Gid", gid);
	}
	dispatch_add(emit, arg, "Sagad-Saga", props_get_header(&m->props, "x-sagad-saga"));
	dispatch_add(emit, arg, "Sagad-Step", props_get_header(&m->props, "x-sagad-step"));
	if (tp && span_id) {
		otel_child(tp, span_id, child);
		tp = child;
	}
	dispatch_add(emit, arg, "traceparent", tp);
	dispatch_add(emit, arg, "tracestate", props_get_header(&m->props, TRACE_STATE));
	if (m->props.type)
		dispatch_add(emit, arg, "Amqp-Type", m->props.type);
	for (i = 0; i < m->props.n_headers; i++) {
		const char *k = m->props.headers[i].name;
		const char *c;
		if (strcmp(k, "x-sagad-kind") == 0 || strcmp(k, "x-sagad-saga") == 0 ||
		    strcmp(k, "x-sagad-step") == 0 || strcmp(k, TRACE_PARENT) == 0 ||
		    strcmp(k, TRACE_STATE) == 0)
			continue;
		for (c = k; *c; c++)	/* HTTP field names are tokens */
			if (*c <= 0x20 || *c >= 0x7f || strchr("()<>@,;:\\\"/[]?={}", *c))
				break;
		if (*c)
			continue;
		snprintf(name, sizeof name, "Amqp-Header-%s", k);
		dispatch_add(emit, arg, name, m->props.headers[i].value);
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
dispatch_emit_wire(void *arg, const char *name, const char *value)
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
 * dispatch_headers, Content-Length, the body. */
static void
dispatch_request(struct dsub *ds, struct dmsg *dm, const char *span_id, struct evbuffer *out)
{
	char len[48];

	evbuffer_expand(out, 1024 + dm->rec->m->body_len);
	evbuffer_add(out, "POST ", 5);
	evbuffer_add(out, ds->path, strlen(ds->path));
	evbuffer_add(out, " HTTP/1.1\r\n", 11);
	dispatch_headers(ds, dm, span_id, dispatch_emit_wire, out);
	snprintf(len, sizeof len, "Content-Length: %zu\r\n\r\n", dm->rec->m->body_len);
	evbuffer_add(out, len, strlen(len));
	evbuffer_add(out, dm->rec->m->body, dm->rec->m->body_len);
}

static void dsub_arm(struct dsub *ds, double at);

/* An attempt that will not go out after all: as if never started. */
static void
dattempt_cancel(struct dattempt *a)
{
	if (a->conn)
		a->conn->reserved = 0;
	if (a->sink)
		dsub_sink_cancel(a);
	dmsg_set_state(a->dm, DMSG_READY);
	a->dm->rec->attempts--;
	a->ds->inflight--;
	if (a->req)
		evbuffer_free(a->req);
	otel_span_drop(a->span);
	free(a);
}

/* The attempt's mark is written (or lost): send the request, or give the
 * attempt up without sending. Runs inside a commit: no store writes. */
static void
dispatch_marked_cb(void *arg, int ok)
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
	if (a->sink) {
		dsub_sink_send(a);
		return;
	}
	a->conn->reserved = 0;
	a->req = NULL;
	/* Cannot fail: the connection was idle. Its answer, or failure,
	 * comes from the loop. */
	hclient_send(a->conn->hc, req, dsub_conf(ds)->timeout, dispatch_done_cb, a);
	evbuffer_free(req);
}

/* An attempt's span: the service's request, a child of the consume. */
static struct otel_span *
dispatch_span(struct dsub *ds, struct dmsg *dm)
{
	const struct msg *m = dm->rec->m;
	struct otel_span *s;
	char name[300];

	if (!ds->dl->d->otel)
		return NULL;
	snprintf(name, sizeof name, "deliver %s", ds->name);
	s = otel_span_start(ds->dl->d->otel, props_get_header(&m->props, TRACE_PARENT), name,
	    OTEL_CLIENT, util_now());
	otel_span_message(s, "process", m);
	otel_span_str(s, "http.request.method", "POST");
	otel_span_str(s, "url.full", dsub_conf(ds)->deliver);
	otel_span_str(s, "sagad.subscription", ds->name);
	otel_span_int(s, "sagad.attempt", dm->rec->attempts + 1);
	return s;
}

/* Its end: the service's status, an error unless 2xx. */
static void
dispatch_span_end(struct dattempt *a, const struct hclient_answer *ans)
{
	char why[64];
	const char *error = NULL;

	if (!a->span)
		return;
	if (ans->result == HCLIENT_ANSWERED) {
		otel_span_int(a->span, "http.response.status_code", ans->status);
		if (ans->status < 200 || ans->status > 299) {
			snprintf(why, sizeof why, "answered %d", ans->status);
			error = why;
		}
	} else
		error = hclient_result_name(ans->result);
	otel_span_end(a->ds->dl->d->otel, a->span, util_now(), error);
	a->span = NULL;
}

/*
 * An attempt starts once the store holds that it started (marked in flight,
 * written with the turn's transaction, no fsync of its own): if sagad dies
 * while the service holds the request, the record shows it after the
 * restart and the repeat carries Sagad-Redelivered (sagad(8), DELIVERY
 * GUARANTEES). The request waits for the end of the turn, not for a sync.
 * dsub_attempt prepares one; dsub_mark marks all those of a dispatch run
 * with one write.
 */
static struct dattempt *
dsub_attempt(struct dsub *ds, struct dmsg *dm)
{
	struct dconn *conn = dsub_idle_conn(ds);
	struct dattempt *a;

	if (!conn)
		return NULL;
	a = xcalloc(1, sizeof *a);
	a->ds = ds;
	a->dm = dm;
	a->conn = conn;
	a->req = evbuffer_new();
	a->span = dispatch_span(ds, dm);
	/* Sagad-Attempt: before the count */
	dispatch_request(ds, dm, otel_span_id(a->span), a->req);
	conn->reserved = 1;
	dmsg_set_state(dm, DMSG_INFLIGHT);
	dm->rec->attempts++;
	ds->inflight++;
	return a;
}

/* Every attempt in flight, those just started included, is written (with
 * its number) in one row: the record in the store is of the whole set. */
static void
dsub_mark(struct dsub *ds, struct dattempt **as, size_t n)
{
	struct inbox_attempt *set = xcalloc(ds->npending, sizeof *set);
	size_t i, nset = 0;
	int rc;

	for (i = 0; i < ds->npending; i++) {
		if (ds->pending[i]->state != DMSG_INFLIGHT)
			continue;
		set[nset].id = ds->pending[i]->rec->id;
		set[nset++].attempt = ds->pending[i]->rec->attempts;
	}
	rc = store_inbox_in_flight(ds->dl->d->store, ds->name, set, nset);
	free(set);
	for (i = 0; i < n; i++) {
		if (rc < 0)
			dattempt_cancel(as[i]);	/* unmarked: not sent (dispatch_marked_cb) */
		else
			store_on_written(ds->dl->d->store, dispatch_marked_cb, as[i]);
	}
	if (rc < 0)
		dsub_arm(ds, util_now() + 1);
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
dispatch_run(struct dsub *ds)
{
	const struct conf_subscription *c = dsub_conf(ds);
	double now = util_now(), next = 0;
	const char **busy = NULL;
	size_t nbusy = 0, nstarted = 0, answered = 0, i;
	unsigned limit = (unsigned)c->concurrency;
	int full = 0;
	struct dattempt **started, *a;

	/* Draining starts nothing new: what waits stays in the store. */
	if (ds->dl->d->state != SAGAD_RUNNING)
		return;
	if (ds->circuit == CIRCUIT_OPEN) {
		if (util_mono() < ds->open_until) {
			dsub_arm(ds, now + (ds->open_until - util_mono()));
			return;
		}
		dispatch_circuit_set(ds, CIRCUIT_HALF_OPEN);
	}
	if (ds->circuit == CIRCUIT_HALF_OPEN)
		limit = 1;
	if (c->frontdoor)	/* the consumers' prefetch limits it (dsub_sink_attempt) */
		limit = (unsigned)ds->npending;
	started = xcalloc(limit > ds->inflight ? limit - ds->inflight : 1, sizeof *started);
	for (i = 0; i < ds->npending && ds->inflight < limit; i++) {
		struct dmsg *dm = ds->pending[i];
		const char *cid = dm->rec->m->props.correlation_id;
		int blocked = dm->state != DMSG_READY || dm->rec->due_at > now;

		if (dm->rec->due_at > now && dm->state != DMSG_INFLIGHT && (next == 0 || dm->rec->due_at < next))
			next = dm->rec->due_at;
		/* A transaction's messages go one at a time too, whatever
		 * `ordered` says: its record decides each after the one before
		 * (txpart.h). The list is made only when a message needs it. */
		if ((c->ordered || dm->tx) && cid) {
			if (!busy)
				busy = xcalloc(ds->npending + 1, sizeof *busy);
			if (dsub_cid_busy(busy, nbusy, cid))
				continue;
			busy[nbusy++] = cid;
		}
		if (blocked)
			continue;
		if (dm->tx && dsub_tx_answered(ds, dm)) {
			nbusy--;	/* its id was freed with it */
			i--;		/* dsub_remove moved the next one here */
			answered++;
			continue;
		}
		if (dm->tx && ds->txpg && dsub_tx_finish(ds, dm))
			continue;
		/* Once no connection or consumer takes one, none will in this
		 * run: the rest is only scanned for the next due time. */
		if (full)
			continue;
		a = c->frontdoor ? dsub_sink_attempt(ds, dm) : dsub_attempt(ds, dm);
		if (a != NULL)
			started[nstarted++] = a;
		else
			full = 1;
	}
	if (nstarted)
		dsub_mark(ds, started, nstarted);
	free(started);
	free(busy);
	if (answered)
		dsub_flow(ds);
	if (next > 0)
		dsub_arm(ds, next);
}

void
dispatch_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	dispatch_run(arg);
}


/* ---- dead letters ---- */

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
		char tid[33];
		json_array_append_new(list, json_pack(
		    "{s:I,s:s,s:s,s:s,s:s?,s:s,s:i,s:i,s:s,s:f,s:f,s:I,s:s?}",
		    "id", (json_int_t)r->id, "message_id", r->m->message_id,
		    "exchange", r->m->exchange, "routing_key", r->m->routing_key,
		    "correlation_id", r->m->props.correlation_id,
		    "reason", r->dead_reason, "attempts", (int)r->attempts,
		    "last_status", r->last_status, "last_error", r->last_error,
		    "received_at", r->received_at, "dead_at", r->finished_at,
		    "bytes", (json_int_t)r->m->body_len,
		    "trace_id", trace_id(&r->m->props, tid)));
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
		dispatch_schedule(ds);
	}
	return total;
}
