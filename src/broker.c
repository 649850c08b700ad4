#include "broker.h"

#include "amqp_headers.h"
#include <event2/event.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "acks.h"
#include "conf.h"
#include "log.h"
#include "util.h"
#include "xmalloc.h"

#define BROKER_CHANNEL 1

enum broker_state {
	BROKER_ST_DOWN,		/* waiting for the reconnect timer */
	BROKER_ST_UP,		/* connected, topology declared, confirms on */
	BROKER_ST_STOPPING
};

/* What the broker is telling us across frames: a basic.return is a method
 * frame, then a header frame, then body frames. */
enum broker_rx {
	BROKER_RX_IDLE,
	BROKER_RX_RETURN_HEADER,
	BROKER_RX_RETURN_BODY,
	BROKER_RX_DELIVER_HEADER,
	BROKER_RX_DELIVER_BODY
};

enum broker_cmd_kind {
	BROKER_CMD_PUBLISH,
	BROKER_CMD_ACK,
	BROKER_CMD_REJECT,
	BROKER_CMD_REQUEUE
};

struct broker_cmd {
	enum broker_cmd_kind kind;
	uint64_t epoch;
	struct msg *msg;	/* PUBLISH */
	int sub;		/* ACK, REJECT */
	uint64_t tag;
};

struct broker_sub {
	char *queue, *dlq, *queue_type;
	int single_active;	/* the saga queue: one sagad consumes at a time */
	struct conf_binding *binds;
	size_t n_binds;
	int prefetch;
	int64_t max_bytes;
	char ctag[300];		/* fresh for every basic.consume */
	unsigned consumes;
	int want;		/* under lock: the main thread's wish */
	int wanted;		/* broker thread: want, as of the last turn */
	int consuming;		/* broker thread: basic.consume is active */
	struct acks acks;	/* broker thread: this channel's settled tags */
};

struct broker_inflight {
	int64_t seq;
	char *message_id;
	double sent;
	int returned;
	int settled;
};

struct broker_exchange {
	char *name, *type;
};

struct broker {
	/* Settings, copied so that a reload never races the thread. */
	char *host, *user, *password, *vhost, *app_id, *conn_name;
	int port, tls, tls_verify;
	char *tls_ca, *tls_cert, *tls_key;
	int heartbeat;
	double connect_timeout, reconnect_initial, reconnect_max;
	struct broker_exchange *exchanges;
	size_t n_exchanges;
	struct broker_sub *subs;
	size_t n_subs;

	enum broker_role role;

	/* Owned by the broker thread. */
	pthread_t thread;
	struct event_base *base;
	struct event *read_ev, *hb_ev, *retry_ev, *wake_ev;
	enum broker_state state;
	amqp_connection_state_t conn;
	uint64_t epoch;
	unsigned failures;
	double connected_at;
	int blocked;
	enum broker_rx rx;
	uint64_t rx_remaining;
	struct msg *rx_msg;		/* delivery being assembled */
	int rx_sub, rx_redelivered, rx_drop;
	size_t rx_have;
	uint64_t next_tag;		/* next publish sequence number */
	uint64_t head_tag;		/* tag of ring[head] */
	struct broker_inflight *ring;
	size_t ring_cap, ring_head, ring_len;
	struct broker_cmd *pending;	/* taken from the main thread, not yet done */
	size_t npending, cappending;
	struct broker_event *outbuf;	/* events to hand over at the end of a turn */
	size_t nout, capout;

	/* Shared, under lock. The broker thread reads these in one place
	 * only, broker_take_shared(), at the start of every turn. */
	pthread_mutex_t lock;
	struct broker_cmd *inq;
	size_t ninq, capinq;
	int subs_changed;
	struct broker_event *outq;
	size_t noutq, capoutq;
	int stop;

	/* Owned by the main thread. */
	struct event *notify_ev;
	broker_event_fn *fn;
	void *arg;
};

static void broker_connect_cb(evutil_socket_t, short, void *);
static void broker_fail(struct broker *b, const char *why, int graceful);

static struct timeval
broker_tv(double s)
{
	struct timeval tv;
	tv.tv_sec = (time_t)s;
	tv.tv_usec = (suseconds_t)((s - (double)tv.tv_sec) * 1e6);
	return tv;
}

static char *
broker_strdup(const char *s)
{
	return s ? xstrdup(s) : NULL;
}

static void
broker_free_binds(struct conf_binding *binds, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++) {
		free(binds[i].exchange);
		free(binds[i].key);
	}
	free(binds);
}

/* ---- events to the main thread ---- */

static void
broker_post(struct broker *b, enum broker_event_kind kind, int64_t seq,
    double latency, const char *reason)
{
	struct broker_event *ev;

	ev = XPUSH(b->outbuf, b->nout, b->capout);
	ev->kind = kind;
	ev->epoch = b->epoch;
	ev->seq = seq;
	ev->latency = latency;
	ev->msg = NULL;		/* broker_free frees what was never taken */
	ev->sub = 0;
	ev->redelivered = 0;
	ev->received = 0;
	ev->reason[0] = '\0';
	if (reason)
		snprintf(ev->reason, sizeof ev->reason, "%s", reason);
}

/* One lock and one wake-up per turn, however many confirms arrived. */
static void
broker_post_flush(struct broker *b)
{
	if (!b->nout)
		return;
	pthread_mutex_lock(&b->lock);
	if (b->noutq + b->nout > b->capoutq) {
		b->capoutq = (b->noutq + b->nout) * 2;
		b->outq = xrealloc(b->outq, b->capoutq * sizeof *b->outq);
	}
	memcpy(b->outq + b->noutq, b->outbuf, b->nout * sizeof *b->outbuf);
	b->noutq += b->nout;
	pthread_mutex_unlock(&b->lock);
	b->nout = 0;
	event_active(b->notify_ev, 0, 0);
}

static void
broker_notify_cb(evutil_socket_t fd, short what, void *arg)
{
	struct broker *b = arg;
	struct broker_event *evs;
	size_t i, n;

	(void)fd;
	(void)what;
	pthread_mutex_lock(&b->lock);
	evs = b->outq;
	n = b->noutq;
	b->outq = NULL;
	b->noutq = b->capoutq = 0;
	pthread_mutex_unlock(&b->lock);
	for (i = 0; i < n; i++)
		b->fn(b->arg, &evs[i]);
	free(evs);
}

/* ---- the confirm window ---- */

static struct broker_inflight *
broker_ring_at(struct broker *b, uint64_t tag)
{
	if (tag < b->head_tag || tag >= b->head_tag + b->ring_len)
		return NULL;
	return &b->ring[(b->ring_head + (tag - b->head_tag)) % b->ring_cap];
}

static void
broker_ring_push(struct broker *b, int64_t seq, const char *message_id)
{
	struct broker_inflight *e;

	if (b->ring_len == b->ring_cap) {
		size_t cap = b->ring_cap ? b->ring_cap * 2 : 1024, i;
		struct broker_inflight *r = xcalloc(cap, sizeof *r);
		for (i = 0; i < b->ring_len; i++)
			r[i] = b->ring[(b->ring_head + i) % b->ring_cap];
		free(b->ring);
		b->ring = r;
		b->ring_cap = cap;
		b->ring_head = 0;
	}
	if (b->ring_len == 0)
		b->head_tag = b->next_tag;
	e = &b->ring[(b->ring_head + b->ring_len) % b->ring_cap];
	e->seq = seq;
	e->message_id = xstrdup(message_id);
	e->sent = util_mono();
	e->returned = 0;
	e->settled = 0;
	b->ring_len++;
	b->next_tag++;
}

static void
broker_ring_settle(struct broker *b, struct broker_inflight *e, int ack)
{
	enum broker_event_kind k = !ack ? BROKER_EV_NACK :
	    e->returned ? BROKER_EV_RETURNED : BROKER_EV_ACK;

	broker_post(b, k, e->seq, util_mono() - e->sent, NULL);
	free(e->message_id);
	e->message_id = NULL;
	e->settled = 1;
}

/* basic.ack / basic.nack: `multiple` settles every tag up to this one. */
static void
broker_confirm(struct broker *b, uint64_t tag, int multiple, int ack)
{
	uint64_t t;

	if (multiple) {
		for (t = b->head_tag; t <= tag; t++) {
			struct broker_inflight *e = broker_ring_at(b, t);
			if (!e)
				break;
			if (!e->settled)
				broker_ring_settle(b, e, ack);
		}
	} else {
		struct broker_inflight *e = broker_ring_at(b, tag);
		if (e && !e->settled)
			broker_ring_settle(b, e, ack);
	}
	while (b->ring_len && b->ring[b->ring_head].settled) {
		b->ring_head = (b->ring_head + 1) % b->ring_cap;
		b->ring_len--;
		b->head_tag++;
	}
}

static void
broker_ring_clear(struct broker *b)
{
	size_t i;

	for (i = 0; i < b->ring_len; i++)
		free(b->ring[(b->ring_head + i) % b->ring_cap].message_id);
	b->ring_len = 0;
	b->ring_head = 0;
}

/* A return carries no delivery tag: find the message by its id. It is
 * followed by the ack of the same message, which then reports RETURNED. */
static void
broker_mark_returned(struct broker *b, const amqp_bytes_t *id)
{
	size_t i;

	for (i = 0; i < b->ring_len; i++) {
		struct broker_inflight *e = &b->ring[(b->ring_head + i) % b->ring_cap];
		if (!e->settled && e->message_id && strlen(e->message_id) == id->len &&
		    memcmp(e->message_id, id->bytes, id->len) == 0) {
			e->returned = 1;
			return;
		}
	}
}

/* ---- frames ---- */

static int
broker_reply_ok(struct broker *b, const char *what)
{
	amqp_rpc_reply_t r = amqp_get_rpc_reply(b->conn);
	char why[160];

	if (r.reply_type == AMQP_RESPONSE_NORMAL)
		return 0;
	if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION)
		snprintf(why, sizeof why, "%s: %s", what, amqp_error_string2(r.library_error));
	else if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD ||
	    r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
		/* Both close methods start with reply_code, reply_text. */
		amqp_connection_close_t *c = r.reply.decoded;
		snprintf(why, sizeof why, "%s: %u %.*s", what, c->reply_code,
		    (int)c->reply_text.len, (char *)c->reply_text.bytes);
	} else
		snprintf(why, sizeof why, "%s: server exception", what);
	broker_fail(b, why, r.reply_type != AMQP_RESPONSE_LIBRARY_EXCEPTION);
	return -1;
}

static void
broker_method(struct broker *b, amqp_frame_t *f)
{
	amqp_method_t *m = &f->payload.method;
	char why[200];

	switch (m->id) {
	case AMQP_BASIC_ACK_METHOD: {
		amqp_basic_ack_t *a = m->decoded;
		broker_confirm(b, a->delivery_tag, a->multiple, 1);
		break;
	}
	case AMQP_BASIC_NACK_METHOD: {
		amqp_basic_nack_t *n = m->decoded;
		broker_confirm(b, n->delivery_tag, n->multiple, 0);
		break;
	}
	case AMQP_BASIC_RETURN_METHOD:
		b->rx = BROKER_RX_RETURN_HEADER;
		break;
	case AMQP_BASIC_DELIVER_METHOD: {
		amqp_basic_deliver_t *dv = m->decoded;
		int sub = (int)f->channel - 2;
		if (sub < 0 || sub >= (int)b->n_subs)
			break;
		msg_free(b->rx_msg);
		b->rx_msg = xcalloc(1, sizeof *b->rx_msg);
		b->rx_msg->seq = (int64_t)dv->delivery_tag;
		b->rx_msg->exchange = xstrndup(dv->exchange.bytes, dv->exchange.len);
		b->rx_msg->routing_key = xstrndup(dv->routing_key.bytes, dv->routing_key.len);
		b->rx_sub = sub;
		b->rx_redelivered = dv->redelivered;
		b->rx = BROKER_RX_DELIVER_HEADER;
		break;
	}
	case AMQP_BASIC_CANCEL_METHOD: {
		/* The broker cancelled a consumer (queue deleted, node down):
		 * start again on a fresh connection, which re-declares. */
		broker_fail(b, "broker cancelled a consumer", 1);
		break;
	}
	case AMQP_CONNECTION_BLOCKED_METHOD: {
		amqp_connection_blocked_t *bl = m->decoded;
		b->blocked = 1;
		snprintf(why, sizeof why, "%.*s", (int)bl->reason.len, (char *)bl->reason.bytes);
		log_warn("broker blocked the connection", LOG_STR("reason", why));
		broker_post(b, BROKER_EV_BLOCKED, 0, 0, why);
		break;
	}
	case AMQP_CONNECTION_UNBLOCKED_METHOD:
		b->blocked = 0;
		log_info("broker unblocked the connection");
		broker_post(b, BROKER_EV_UNBLOCKED, 0, 0, NULL);
		break;
	case AMQP_CONNECTION_CLOSE_METHOD: {
		amqp_connection_close_t *c = m->decoded;
		amqp_connection_close_ok_t ok;
		snprintf(why, sizeof why, "broker closed the connection: %u %.*s",
		    c->reply_code, (int)c->reply_text.len, (char *)c->reply_text.bytes);
		amqp_send_method(b->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
		broker_fail(b, why, 0);
		break;
	}
	case AMQP_CHANNEL_CLOSE_METHOD: {
		amqp_channel_close_t *c = m->decoded;
		snprintf(why, sizeof why, "broker closed the channel: %u %.*s",
		    c->reply_code, (int)c->reply_text.len, (char *)c->reply_text.bytes);
		broker_fail(b, why, 1);
		break;
	}
	default:
		log_debug("ignored AMQP method", LOG_HEX("id", m->id));
		break;
	}
}

static char *
broker_bytes_dup(amqp_bytes_t v)
{
	return xstrndup(v.bytes ? v.bytes : "", v.len);
}

/* AMQP header values are typed; the service sees them as text. Nested
 * tables and arrays (x-death) are summarised. */
static char *
broker_field_text(const amqp_field_value_t *v)
{
	char buf[64];

	switch (v->kind) {
	case AMQP_FIELD_KIND_UTF8:
	case AMQP_FIELD_KIND_BYTES:
		return broker_bytes_dup(v->value.bytes);
	case AMQP_FIELD_KIND_BOOLEAN:
		return xstrdup(v->value.boolean ? "true" : "false");
	case AMQP_FIELD_KIND_I8: snprintf(buf, sizeof buf, "%d", v->value.i8); break;
	case AMQP_FIELD_KIND_U8: snprintf(buf, sizeof buf, "%u", v->value.u8); break;
	case AMQP_FIELD_KIND_I16: snprintf(buf, sizeof buf, "%d", v->value.i16); break;
	case AMQP_FIELD_KIND_U16: snprintf(buf, sizeof buf, "%u", v->value.u16); break;
	case AMQP_FIELD_KIND_I32: snprintf(buf, sizeof buf, "%d", v->value.i32); break;
	case AMQP_FIELD_KIND_U32: snprintf(buf, sizeof buf, "%u", v->value.u32); break;
	case AMQP_FIELD_KIND_I64: snprintf(buf, sizeof buf, "%lld", (long long)v->value.i64); break;
	case AMQP_FIELD_KIND_U64:
	case AMQP_FIELD_KIND_TIMESTAMP:
		snprintf(buf, sizeof buf, "%llu", (unsigned long long)v->value.u64); break;
	case AMQP_FIELD_KIND_F32: snprintf(buf, sizeof buf, "%g", v->value.f32); break;
	case AMQP_FIELD_KIND_F64: snprintf(buf, sizeof buf, "%g", v->value.f64); break;
	case AMQP_FIELD_KIND_DECIMAL:
		snprintf(buf, sizeof buf, "%uE-%u", v->value.decimal.value, v->value.decimal.decimals);
		break;
	case AMQP_FIELD_KIND_ARRAY:
		snprintf(buf, sizeof buf, "(array of %d)", v->value.array.num_entries);
		break;
	case AMQP_FIELD_KIND_TABLE:
		snprintf(buf, sizeof buf, "(table of %d)", v->value.table.num_entries);
		break;
	default:
		buf[0] = '\0';
		break;
	}
	return xstrdup(buf);
}

static void
broker_delivery_done(struct broker *b)
{
	struct broker_event *ev;

	if (b->rx_drop) {
		/* Over the subscription's size limit: never buffered, straight
		 * to the dead-letter queue through the queue's own setup. */
		log_warn("message too large, dead-lettered", LOG_STR("queue", b->subs[b->rx_sub].queue),
		    LOG_UINT("bytes", b->rx_have));
		amqp_basic_reject(b->conn, 2 + b->rx_sub, (uint64_t)b->rx_msg->seq, 0);
		acks_settled(&b->subs[b->rx_sub].acks, (uint64_t)b->rx_msg->seq);
		broker_post(b, BROKER_EV_TOO_LARGE, 0, 0, NULL);
		b->outbuf[b->nout - 1].sub = b->rx_sub;
		msg_free(b->rx_msg);
	} else {
		broker_post(b, BROKER_EV_DELIVERY, b->rx_msg->seq, 0, NULL);
		ev = &b->outbuf[b->nout - 1];
		ev->msg = b->rx_msg;
		ev->sub = b->rx_sub;
		ev->redelivered = b->rx_redelivered;
		ev->received = util_mono();
	}
	b->rx_msg = NULL;
	b->rx = BROKER_RX_IDLE;
}

static void
broker_delivery_header(struct broker *b, const amqp_basic_properties_t *p,
    uint64_t size)
{
	struct msg *m = b->rx_msg;
	int i;

	if (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG)
		m->message_id = broker_bytes_dup(p->message_id);
	if (p->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG)
		m->props.content_type = broker_bytes_dup(p->content_type);
	if (p->_flags & AMQP_BASIC_CORRELATION_ID_FLAG)
		m->props.correlation_id = broker_bytes_dup(p->correlation_id);
	if (p->_flags & AMQP_BASIC_TYPE_FLAG)
		m->props.type = broker_bytes_dup(p->type);
	if (p->_flags & AMQP_BASIC_REPLY_TO_FLAG)
		m->props.reply_to = broker_bytes_dup(p->reply_to);
	if (p->_flags & AMQP_BASIC_EXPIRATION_FLAG)
		m->props.expiration = broker_bytes_dup(p->expiration);
	if (p->_flags & AMQP_BASIC_TIMESTAMP_FLAG)
		m->created_at = (double)p->timestamp;
	if (p->_flags & AMQP_BASIC_HEADERS_FLAG)
		for (i = 0; i < p->headers.num_entries; i++) {
			char *k = broker_bytes_dup(p->headers.entries[i].key);
			char *v = broker_field_text(&p->headers.entries[i].value);
			if (*k)
				props_set_header(&m->props, k, v);
			free(k);
			free(v);
		}
	b->rx_have = 0;
	b->rx_remaining = size;
	b->rx_drop = size > (uint64_t)b->subs[b->rx_sub].max_bytes;
	if (!b->rx_drop)
		m->body = xmalloc(size ? size : 1);
	m->body_len = 0;
	if (size == 0)
		broker_delivery_done(b);
	else
		b->rx = BROKER_RX_DELIVER_BODY;
}

static void
broker_delivery_body(struct broker *b, const amqp_bytes_t *frag)
{
	size_t n = frag->len < b->rx_remaining ? frag->len : b->rx_remaining;

	if (!b->rx_drop)
		memcpy(b->rx_msg->body + b->rx_have, frag->bytes, n);
	b->rx_have += n;
	b->rx_remaining -= n;
	if (!b->rx_drop)
		b->rx_msg->body_len = b->rx_have;
	if (!b->rx_remaining)
		broker_delivery_done(b);
}

static void
broker_frame(struct broker *b, amqp_frame_t *f)
{
	switch (f->frame_type) {
	case AMQP_FRAME_METHOD:
		broker_method(b, f);
		break;
	case AMQP_FRAME_HEADER:
		if (b->rx == BROKER_RX_DELIVER_HEADER) {
			broker_delivery_header(b, f->payload.properties.decoded,
			    f->payload.properties.body_size);
			break;
		}
		if (b->rx == BROKER_RX_RETURN_HEADER) {
			amqp_basic_properties_t *p = f->payload.properties.decoded;
			if (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG)
				broker_mark_returned(b, &p->message_id);
			b->rx_remaining = f->payload.properties.body_size;
			b->rx = b->rx_remaining ? BROKER_RX_RETURN_BODY : BROKER_RX_IDLE;
		}
		break;
	case AMQP_FRAME_BODY:
		if (b->rx == BROKER_RX_DELIVER_BODY) {
			broker_delivery_body(b, &f->payload.body_fragment);
			break;
		}
		if (b->rx == BROKER_RX_RETURN_BODY) {
			size_t n = f->payload.body_fragment.len;
			b->rx_remaining = n >= b->rx_remaining ? 0 : b->rx_remaining - n;
			if (!b->rx_remaining)
				b->rx = BROKER_RX_IDLE;
		}
		break;
	default:
		/* Heartbeat frames (type 8) land here too: nothing to do, the
		 * library already counted them as traffic. */
		break;
	}
}

/*
 * Read every frame that is available without blocking. Frames can wait
 * inside the library (its read buffer, its decoded-frame queue) while the
 * socket is not readable, so the loop runs until the library itself says
 * there is nothing more (ARCHITECTURE.md: rabbitmq-c: drained buffers). A
 * zero timeout makes it a true poll; it also sends due heartbeats and
 * notices a silent peer (AMQP_STATUS_HEARTBEAT_TIMEOUT).
 */
static int
broker_drain(struct broker *b)
{
	struct timeval zero = { 0, 0 };
	amqp_frame_t f;
	int rc;

	while (b->state == BROKER_ST_UP) {
		rc = amqp_simple_wait_frame_noblock(b->conn, &f, &zero);
		if (rc == AMQP_STATUS_TIMEOUT)
			break;
		if (rc != AMQP_STATUS_OK) {
			char why[160];
			snprintf(why, sizeof why, "read: %s", amqp_error_string2(rc));
			broker_fail(b, why, 0);
			return -1;
		}
		broker_frame(b, &f);
	}
	if (b->state != BROKER_ST_UP)
		return -1;
	/* No pointer into decoded frames survives this point: the return
	 * assembly keeps only counters, the ring keeps copies. */
	if (b->rx == BROKER_RX_IDLE)
		amqp_maybe_release_buffers(b->conn);
	return 0;
}

/* ---- publishing ---- */

static amqp_bytes_t
broker_bytes(const char *s)
{
	return amqp_cstring_bytes(s ? s : "");
}

static int
broker_publish_one(struct broker *b, struct msg *m)
{
	amqp_basic_properties_t p;
	amqp_table_entry_t entries[64];
	amqp_table_entry_t *ents = entries;
	amqp_bytes_t body;
	size_t i;
	int rc;

	memset(&p, 0, sizeof p);
	p._flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_MESSAGE_ID_FLAG |
	    AMQP_BASIC_APP_ID_FLAG | AMQP_BASIC_TIMESTAMP_FLAG;
	p.delivery_mode = 2;
	p.message_id = broker_bytes(m->message_id);
	p.app_id = broker_bytes(b->app_id);
	p.timestamp = (uint64_t)util_now();
	if (m->props.content_type) {
		p._flags |= AMQP_BASIC_CONTENT_TYPE_FLAG;
		p.content_type = broker_bytes(m->props.content_type);
	}
	if (m->props.correlation_id) {
		p._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
		p.correlation_id = broker_bytes(m->props.correlation_id);
	}
	if (m->props.type) {
		p._flags |= AMQP_BASIC_TYPE_FLAG;
		p.type = broker_bytes(m->props.type);
	}
	if (m->props.expiration) {
		p._flags |= AMQP_BASIC_EXPIRATION_FLAG;
		p.expiration = broker_bytes(m->props.expiration);
	}
	if (m->props.reply_to) {
		p._flags |= AMQP_BASIC_REPLY_TO_FLAG;
		p.reply_to = broker_bytes(m->props.reply_to);
	}
	if (m->props.n_headers) {
		if (m->props.n_headers > sizeof entries / sizeof entries[0])
			ents = xcalloc(m->props.n_headers, sizeof *ents);
		for (i = 0; i < m->props.n_headers; i++) {
			ents[i].key = broker_bytes(m->props.headers[i].name);
			ents[i].value.kind = AMQP_FIELD_KIND_UTF8;
			ents[i].value.value.bytes = broker_bytes(m->props.headers[i].value);
		}
		p._flags |= AMQP_BASIC_HEADERS_FLAG;
		p.headers.num_entries = (int)m->props.n_headers;
		p.headers.entries = ents;
	}
	body.bytes = m->body;
	body.len = m->body_len;
	rc = amqp_basic_publish(b->conn, BROKER_CHANNEL, broker_bytes(m->exchange),
	    broker_bytes(m->routing_key), 1, 0, &p, body);
	if (ents != entries)
		free(ents);
	if (rc != AMQP_STATUS_OK) {
		char why[160];
		snprintf(why, sizeof why, "publish: %s", amqp_error_string2(rc));
		broker_fail(b, why, 0);
		return -1;
	}
	broker_ring_push(b, m->seq, m->message_id);
	return 0;
}

static void
broker_pending_clear(struct broker *b)
{
	size_t i;

	for (i = 0; i < b->npending; i++)
		msg_free(b->pending[i].msg);
	b->npending = 0;
}

/* Under lock: take the main thread's commands. One meant for an earlier
 * connection is void: the relay rewinds and republishes, the broker
 * redelivers. */
static void
broker_take_cmds_locked(struct broker *b)
{
	size_t i;

	for (i = 0; i < b->ninq; i++) {
		if (b->inq[i].epoch != b->epoch || b->state != BROKER_ST_UP) {
			msg_free(b->inq[i].msg);
			continue;
		}
		*XPUSH(b->pending, b->npending, b->cappending) = b->inq[i];
	}
	b->ninq = 0;
}

/* What the other threads asked for since the last turn. */
struct broker_wake {
	int stop;
	int subs_changed;
};

/*
 * The only reader of the shared half of struct broker on the broker
 * thread: under one lock it takes every flag (and clears it), copies the
 * consume wishes and moves the queued commands to the thread's own list.
 * Whatever a caller set before its broker_kick() is seen by the turn that
 * kick causes, or by an earlier one; none is read half-updated.
 */
static void
broker_take_shared(struct broker *b, struct broker_wake *w)
{
	size_t i;

	pthread_mutex_lock(&b->lock);
	w->stop = b->stop;
	w->subs_changed = b->subs_changed;
	b->subs_changed = 0;
	if (w->subs_changed)
		for (i = 0; i < b->n_subs; i++)
			b->subs[i].wanted = b->subs[i].want;
	broker_take_cmds_locked(b);
	pthread_mutex_unlock(&b->lock);
}

struct broker_ack_ctx {
	struct broker *b;
	int sub;
};

static int
broker_send_ack(void *arg, uint64_t tag, int multiple)
{
	struct broker_ack_ctx *x = arg;
	struct broker *b = x->b;
	int rc = amqp_basic_ack(b->conn, (amqp_channel_t)(2 + x->sub), tag, multiple);

	if (rc != AMQP_STATUS_OK) {
		char why[160];
		snprintf(why, sizeof why, "ack: %s", amqp_error_string2(rc));
		broker_fail(b, why, 0);
		return -1;
	}
	return 0;
}

/* Acks wait for the end of the batch of commands (acks.h: one frame for a
 * run); a reject goes at once. */
static int
broker_settle(struct broker *b, const struct broker_cmd *c)
{
	int rc;

	if (c->kind == BROKER_CMD_ACK) {
		acks_add(&b->subs[c->sub].acks, c->tag);
		return 0;
	}
	rc = amqp_basic_reject(b->conn, 2 + c->sub, c->tag, c->kind == BROKER_CMD_REQUEUE);
	if (rc != AMQP_STATUS_OK) {
		char why[160];
		snprintf(why, sizeof why, "reject: %s", amqp_error_string2(rc));
		broker_fail(b, why, 0);
		return -1;
	}
	acks_settled(&b->subs[c->sub].acks, c->tag);
	return 0;
}

static void
broker_flush_acks(struct broker *b)
{
	int i;

	for (i = 0; i < (int)b->n_subs && b->state == BROKER_ST_UP; i++) {
		struct broker_ack_ctx x = { b, i };
		acks_flush(&b->subs[i].acks, broker_send_ack, &x);
	}
}

static void
broker_do_pending(struct broker *b)
{
	size_t i;

	if (b->state != BROKER_ST_UP || b->blocked || !b->npending)
		return;
	/* rabbitmq-c 0.11 can hang forever in amqp_basic_publish on a dead
	 * connection (fixed in 0.14): a zero-timeout read first turns a dead
	 * peer into AMQP_STATUS_HEARTBEAT_TIMEOUT (ARCHITECTURE.md: rabbitmq-c:
	 * publish hang). */
	if (broker_drain(b) < 0)
		return;
	for (i = 0; i < b->npending && b->state == BROKER_ST_UP; i++) {
		struct broker_cmd *c = &b->pending[i];
		int rc = c->kind == BROKER_CMD_PUBLISH ?
		    broker_publish_one(b, c->msg) : broker_settle(b, c);
		if (rc < 0)
			break;
		msg_free(c->msg);
		c->msg = NULL;
	}
	broker_flush_acks(b);
	if (b->state == BROKER_ST_UP) {
		b->npending = 0;
		broker_drain(b);
	}
}

/* basic.consume / basic.cancel as the main thread last wished (wanted,
 * from broker_take_shared): after a reconnect every wished consumer starts
 * again. Returns how many consumers changed. */
static int
broker_apply_consume(struct broker *b)
{
	size_t i;
	int changed = 0;

	for (i = 0; i < b->n_subs && b->state == BROKER_ST_UP; i++) {
		struct broker_sub *s = &b->subs[i];

		if (s->wanted == s->consuming)
			continue;
		if (s->wanted) {
			/* A new tag each time: RabbitMQ 3.10 can crash the
			 * channel when a quorum queue consumer is cancelled and
			 * re-registered under the same tag (rabbitmq-server#5927). */
			snprintf(s->ctag, sizeof s->ctag, "sagad.%s.%s.%u", b->app_id,
			    s->queue, ++s->consumes);
			amqp_basic_consume(b->conn, 2 + i, amqp_cstring_bytes(s->queue),
			    amqp_cstring_bytes(s->ctag), 0, 0, 0, amqp_empty_table);
			if (broker_reply_ok(b, "basic.consume") < 0)
				return changed;
		} else {
			amqp_basic_cancel(b->conn, 2 + i, amqp_cstring_bytes(s->ctag));
			if (broker_reply_ok(b, "basic.cancel") < 0)
				return changed;
		}
		s->consuming = s->wanted;
		changed++;
		log_debug(s->wanted ? "consumer started" : "consumer paused", LOG_STR("queue", s->queue));
	}
	return changed;
}

/* Close for good: what the broker already sent is read first so that its
 * confirms reach the main thread. */
static void
broker_stop_now(struct broker *b)
{
	if (b->state == BROKER_ST_UP) {
		broker_drain(b);
		broker_fail(b, "stopping", 1);
	}
	b->state = BROKER_ST_STOPPING;
	event_base_loopbreak(b->base);
	broker_post_flush(b);
}

/*
 * One turn of the broker thread, whatever woke it (a kick, the socket, the
 * heartbeat timer, a new connection): take what the other threads asked
 * for, then stop, or apply the consume wishes, send the commands and hand
 * the events over. Every wake-up goes through here, so a wish is applied
 * on the next turn whether or not publishes are pending.
 */
static void
broker_turn(struct broker *b)
{
	struct broker_wake w;

	broker_take_shared(b, &w);
	if (w.stop) {
		broker_stop_now(b);
		return;
	}
	/* The synchronous basic.consume may have read deliveries into the
	 * library's frame queue; the socket will not say so. */
	if (broker_apply_consume(b) > 0 && b->state == BROKER_ST_UP)
		broker_drain(b);
	broker_do_pending(b);
	broker_post_flush(b);
}

static void
broker_wake_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	broker_turn(arg);
}

/* The socket is readable: read what came, then a turn (publishes that
 * waited for an unblock go now). */
static void
broker_read_cb(evutil_socket_t fd, short what, void *arg)
{
	struct broker *b = arg;

	(void)fd;
	(void)what;
	broker_drain(b);
	broker_turn(b);
}

/* Heartbeats are serviced only inside library calls: poll at half the
 * interval (ARCHITECTURE.md: rabbitmq-c: heartbeats). */
static void
broker_hb_cb(evutil_socket_t fd, short what, void *arg)
{
	broker_read_cb(fd, what, arg);
}

/* ---- connection life ---- */

static void
broker_schedule_retry(struct broker *b)
{
	double d;
	struct timeval tv;

	/* A connection that fails soon after it came up (a channel error on
	 * declare or publish) keeps backing off; one that lived counts as
	 * healthy and starts the backoff again. */
	if (b->connected_at > 0 && util_mono() - b->connected_at > 10)
		b->failures = 0;
	b->connected_at = 0;
	d = util_backoff(b->reconnect_initial, b->reconnect_max, ++b->failures);
	tv = broker_tv(d);

	log_info("broker reconnect scheduled", LOG_DBL("in_seconds", d), LOG_UINT("attempt", b->failures));
	evtimer_add(b->retry_ev, &tv);
}

/*
 * Tear the connection down. After a socket error, a heartbeat timeout or a
 * close from the peer, a graceful close can hang on a dead peer: skip it,
 * remove the fd event first, then destroy (ARCHITECTURE.md: rabbitmq-c: close
 * hangs).
 */
static void
broker_fail(struct broker *b, const char *why, int graceful)
{
	if (b->state != BROKER_ST_UP)
		return;
	if (b->read_ev) {
		event_free(b->read_ev);
		b->read_ev = NULL;
	}
	evtimer_del(b->hb_ev);
	if (graceful) {
		struct timeval tv = { 2, 0 };
		amqp_set_rpc_timeout(b->conn, &tv);
		amqp_connection_close(b->conn, AMQP_REPLY_SUCCESS);
	}
	amqp_destroy_connection(b->conn);
	b->conn = NULL;
	b->state = BROKER_ST_DOWN;
	b->blocked = 0;
	b->rx = BROKER_RX_IDLE;
	msg_free(b->rx_msg);
	b->rx_msg = NULL;
	broker_ring_clear(b);
	broker_pending_clear(b);
	for (size_t i = 0; i < b->n_subs; i++) {
		b->subs[i].consuming = 0;
		acks_reset(&b->subs[i].acks);
	}
	if (strcmp(why, "stopping") != 0) {
		log_warn("broker connection lost",
		    LOG_STR("role", b->role == BROKER_ROLE_PUBLISH ? "publish" : "consume"),
		    LOG_STR("reason", why));
		broker_post(b, BROKER_EV_DOWN, 0, 0, why);
		broker_schedule_retry(b);
	}
}

static amqp_table_t
broker_client_props(struct broker *b, amqp_table_entry_t *e, amqp_table_entry_t *caps)
{
	amqp_table_t t;

	/* Ask to be told about resource alarms instead of meeting them as TCP
	 * back-pressure inside amqp_basic_publish (ARCHITECTURE.md: rabbitmq-c:
	 * connection.blocked). */
	caps[0].key = amqp_cstring_bytes("connection.blocked");
	caps[0].value.kind = AMQP_FIELD_KIND_BOOLEAN;
	caps[0].value.value.boolean = 1;
	caps[1].key = amqp_cstring_bytes("publisher_confirms");
	caps[1].value.kind = AMQP_FIELD_KIND_BOOLEAN;
	caps[1].value.value.boolean = 1;
	caps[2].key = amqp_cstring_bytes("consumer_cancel_notify");
	caps[2].value.kind = AMQP_FIELD_KIND_BOOLEAN;
	caps[2].value.value.boolean = 1;
	e[0].key = amqp_cstring_bytes("capabilities");
	e[0].value.kind = AMQP_FIELD_KIND_TABLE;
	e[0].value.value.table.num_entries = 3;
	e[0].value.value.table.entries = caps;
	e[1].key = amqp_cstring_bytes("connection_name");
	e[1].value.kind = AMQP_FIELD_KIND_UTF8;
	e[1].value.value.bytes = amqp_cstring_bytes(b->conn_name);
	e[2].key = amqp_cstring_bytes("product");
	e[2].value.kind = AMQP_FIELD_KIND_UTF8;
	e[2].value.value.bytes = amqp_cstring_bytes("sagad");
	e[3].key = amqp_cstring_bytes("version");
	e[3].value.kind = AMQP_FIELD_KIND_UTF8;
	e[3].value.value.bytes = amqp_cstring_bytes(PACKAGE_VERSION);
	t.num_entries = 4;
	t.entries = e;
	return t;
}

static amqp_socket_t *
broker_socket(struct broker *b, char *why, size_t whylen)
{
	amqp_socket_t *s;

	if (!b->tls)
		return amqp_tcp_socket_new(b->conn);
	s = amqp_ssl_socket_new(b->conn);
	if (!s)
		return NULL;
	amqp_ssl_socket_set_verify_peer(s, b->tls_verify);
	amqp_ssl_socket_set_verify_hostname(s, b->tls_verify);
	if (b->tls_ca && amqp_ssl_socket_set_cacert(s, b->tls_ca) != AMQP_STATUS_OK) {
		snprintf(why, whylen, "tls: cannot load ca %s", b->tls_ca);
		return NULL;
	}
	if (b->tls_cert && amqp_ssl_socket_set_key(s, b->tls_cert, b->tls_key) != AMQP_STATUS_OK) {
		snprintf(why, whylen, "tls: cannot load cert %s / key %s", b->tls_cert, b->tls_key);
		return NULL;
	}
	return s;
}

static void
broker_queue_args(struct broker_sub *s, const char *dlq, amqp_table_entry_t *e,
    amqp_table_t *t)
{
	t->num_entries = 0;
	t->entries = e;
	e[t->num_entries].key = amqp_cstring_bytes("x-queue-type");
	e[t->num_entries].value.kind = AMQP_FIELD_KIND_UTF8;
	e[t->num_entries++].value.value.bytes = amqp_cstring_bytes(s->queue_type);
	if (!dlq)
		return;
	if (s->single_active) {
		/* Saga state lives in one sagad's store: replicas of the
		 * orchestrator stand by instead of splitting the replies. */
		e[t->num_entries].key = amqp_cstring_bytes("x-single-active-consumer");
		e[t->num_entries].value.kind = AMQP_FIELD_KIND_BOOLEAN;
		e[t->num_entries++].value.value.boolean = 1;
	}
	/* Dead-lettering through the default exchange straight to <queue>.dlq
	 * works on quorum and classic queues alike; sagad uses it for what it
	 * cannot even store (too large) — everything else it dead-letters
	 * itself, with reason headers. */
	e[t->num_entries].key = amqp_cstring_bytes("x-dead-letter-exchange");
	e[t->num_entries].value.kind = AMQP_FIELD_KIND_UTF8;
	e[t->num_entries++].value.value.bytes = amqp_cstring_bytes("");
	e[t->num_entries].key = amqp_cstring_bytes("x-dead-letter-routing-key");
	e[t->num_entries].value.kind = AMQP_FIELD_KIND_UTF8;
	e[t->num_entries++].value.value.bytes = amqp_cstring_bytes(dlq);
}

/* Channel 2 + i belongs to subscription i: its dead-letter queue, queue,
 * bindings and prefetch. */
static int
broker_declare_sub(struct broker *b, int i)
{
	struct broker_sub *s = &b->subs[i];
	amqp_channel_t ch = 2 + i;
	amqp_table_entry_t e[5];
	amqp_table_t args;
	size_t j;

	amqp_channel_open(b->conn, ch);
	if (broker_reply_ok(b, "channel.open") < 0)
		return -1;
	broker_queue_args(s, NULL, e, &args);
	amqp_queue_declare(b->conn, ch, amqp_cstring_bytes(s->dlq), 0, 1, 0, 0, args);
	if (broker_reply_ok(b, "queue.declare (dead letters)") < 0)
		return -1;
	broker_queue_args(s, s->dlq, e, &args);
	amqp_queue_declare(b->conn, ch, amqp_cstring_bytes(s->queue), 0, 1, 0, 0, args);
	if (broker_reply_ok(b, "queue.declare") < 0)
		return -1;
	for (j = 0; j < s->n_binds; j++) {
		amqp_queue_bind(b->conn, ch, amqp_cstring_bytes(s->queue),
		    amqp_cstring_bytes(s->binds[j].exchange),
		    amqp_cstring_bytes(s->binds[j].key), amqp_empty_table);
		if (broker_reply_ok(b, "queue.bind") < 0)
			return -1;
	}
	amqp_basic_qos(b->conn, ch, 0, (uint16_t)s->prefetch, 0);
	if (broker_reply_ok(b, "basic.qos") < 0)
		return -1;
	return 0;
}

/* Connect, log in, open the channel, declare, confirm.select. Blocking with
 * bounded timeouts: this thread has nothing else to do meanwhile. */
static int
broker_connect(struct broker *b, char *why, size_t whylen)
{
	struct timeval ct = broker_tv(b->connect_timeout);
	amqp_table_entry_t props[4], caps[3];
	amqp_table_t client;
	amqp_socket_t *s;
	amqp_rpc_reply_t r;
	size_t i;
	int rc;

	b->conn = amqp_new_connection();
	s = broker_socket(b, why, whylen);
	if (!s) {
		if (!*why)
			snprintf(why, whylen, "cannot create socket");
		return -1;
	}
	amqp_set_handshake_timeout(b->conn, &ct);
	amqp_set_rpc_timeout(b->conn, &ct);
	rc = amqp_socket_open_noblock(s, b->host, b->port, &ct);
	if (rc != AMQP_STATUS_OK) {
		snprintf(why, whylen, "connect %s:%d: %s", b->host, b->port, amqp_error_string2(rc));
		return -1;
	}
	client = broker_client_props(b, props, caps);
	r = amqp_login_with_properties(b->conn, b->vhost, 0, 131072, b->heartbeat,
	    &client, AMQP_SASL_METHOD_PLAIN, b->user, b->password);
	if (r.reply_type != AMQP_RESPONSE_NORMAL) {
		if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION)
			snprintf(why, whylen, "login: %s", amqp_error_string2(r.library_error));
		else
			snprintf(why, whylen, "login refused by the broker (user, password or vhost)");
		return -1;
	}
	b->state = BROKER_ST_UP;	/* from here broker_reply_ok() tears down */
	amqp_channel_open(b->conn, BROKER_CHANNEL);
	if (broker_reply_ok(b, "channel.open") < 0)
		return -2;
	for (i = 0; i < b->n_exchanges; i++) {
		amqp_exchange_declare(b->conn, BROKER_CHANNEL,
		    amqp_cstring_bytes(b->exchanges[i].name),
		    amqp_cstring_bytes(b->exchanges[i].type), 0, 1, 0, 0, amqp_empty_table);
		if (broker_reply_ok(b, "exchange.declare") < 0)
			return -2;
	}
	if (b->role == BROKER_ROLE_CONSUME) {
		for (i = 0; i < b->n_subs; i++)
			if (broker_declare_sub(b, (int)i) < 0)
				return -2;
		return 0;
	}
	amqp_confirm_select(b->conn, BROKER_CHANNEL);
	if (broker_reply_ok(b, "confirm.select") < 0)
		return -2;
	return 0;
}

static void
broker_connect_cb(evutil_socket_t fd, short what, void *arg)
{
	struct broker *b = arg;
	char why[200] = "";
	struct timeval hb;
	int rc;

	(void)fd;
	(void)what;
	rc = broker_connect(b, why, sizeof why);
	if (rc == -2) {		/* broker_fail() already logged and rescheduled */
		broker_post_flush(b);
		return;
	}
	if (rc < 0) {
		amqp_destroy_connection(b->conn);
		b->conn = NULL;
		b->state = BROKER_ST_DOWN;
		log_warn("broker connect failed", LOG_STR("host", b->host), LOG_INT("port", b->port),
		    LOG_STR("reason", why));
		broker_post(b, BROKER_EV_DOWN, 0, 0, why);
		broker_post_flush(b);
		broker_schedule_retry(b);
		return;
	}
	b->connected_at = util_mono();
	b->epoch++;
	b->next_tag = 1;	/* confirm sequence numbers restart per channel */
	b->head_tag = 1;
	b->read_ev = event_new(b->base, amqp_get_sockfd(b->conn), EV_READ | EV_PERSIST,
	    broker_read_cb, b);
	event_add(b->read_ev, NULL);
	hb = broker_tv(b->heartbeat > 0 ? b->heartbeat / 2.0 : 1.0);
	evtimer_add(b->hb_ev, &hb);
	log_info("broker connected",
	    LOG_STR("role", b->role == BROKER_ROLE_PUBLISH ? "publish" : "consume"),
	    LOG_STR("host", b->host), LOG_INT("port", b->port), LOG_STR("vhost", b->vhost),
	    LOG_UINT("exchanges", b->n_exchanges), LOG_UINT("queues", b->n_subs),
	    LOG_UINT("epoch", b->epoch));
	broker_post(b, BROKER_EV_UP, 0, 0, NULL);
	broker_drain(b);
	broker_turn(b);
}

static void *
broker_main(void *arg)
{
	struct broker *b = arg;

	/* Named for top -H and perf: which connection spends the CPU. */
	pthread_setname_np(pthread_self(),
	    b->role == BROKER_ROLE_PUBLISH ? "sagad-publish" : "sagad-consume");
	event_base_dispatch(b->base);
	return NULL;
}

static void
broker_copy_subs(struct broker *b, const struct sagad_conf *c)
{
	size_t i, j;

	b->n_subs = c->n_subs;
	b->subs = xcalloc(c->n_subs + 1, sizeof *b->subs);
	for (i = 0; i < c->n_subs; i++) {
		const struct conf_subscription *cs = &c->subs[i];
		struct broker_sub *s = &b->subs[i];
		s->queue = xstrdup(cs->queue);
		s->dlq = xasprintf("%s.dlq", cs->queue);
		s->queue_type = xstrdup(cs->queue_type);
		s->n_binds = cs->n_binds;
		s->binds = xcalloc(cs->n_binds + 1, sizeof *s->binds);
		for (j = 0; j < cs->n_binds; j++) {
			s->binds[j].exchange = xstrdup(cs->binds[j].exchange);
			s->binds[j].key = xstrdup(cs->binds[j].key);
		}
		s->prefetch = cs->prefetch;
		s->single_active = cs->internal;
		s->max_bytes = cs->max_message_bytes;
	}
}

struct broker *
broker_new(struct event_base *main_base, const struct sagad_conf *c,
    enum broker_role role, broker_event_fn *fn, void *arg)
{
	struct broker *b = xcalloc(1, sizeof *b);
	struct timeval hb;
	size_t i;

	b->host = xstrdup(c->broker.host);
	b->user = xstrdup(c->broker.user);
	b->password = xstrdup(c->broker.password);
	b->vhost = xstrdup(c->broker.vhost);
	b->port = c->broker.port;
	b->tls = c->broker.tls;
	b->tls_verify = c->broker.tls_verify;
	b->tls_ca = broker_strdup(c->broker.tls_ca);
	b->tls_cert = broker_strdup(c->broker.tls_cert);
	b->tls_key = broker_strdup(c->broker.tls_key);
	b->heartbeat = (int)(c->broker.heartbeat + 0.5);
	b->connect_timeout = c->broker.connect_timeout;
	b->reconnect_initial = c->broker.reconnect_initial;
	b->reconnect_max = c->broker.reconnect_max;
	b->app_id = xstrdup(c->service);
	b->role = role;
	if (asprintf(&b->conn_name, "sagad %s %s", c->service,
	    role == BROKER_ROLE_PUBLISH ? "publish" : "consume") < 0)
		b->conn_name = xstrdup("sagad");
	if (role == BROKER_ROLE_CONSUME)
		broker_copy_subs(b, c);
	b->n_exchanges = c->n_exchanges;
	b->exchanges = xcalloc(c->n_exchanges + 1, sizeof *b->exchanges);
	for (i = 0; i < c->n_exchanges; i++) {
		b->exchanges[i].name = xstrdup(c->exchanges[i].name);
		b->exchanges[i].type = xstrdup(c->exchanges[i].type);
	}
	b->fn = fn;
	b->arg = arg;
	pthread_mutex_init(&b->lock, NULL);
	b->notify_ev = event_new(main_base, -1, 0, broker_notify_cb, b);
	event_priority_set(b->notify_ev, 0);
	b->base = event_base_new();
	b->retry_ev = evtimer_new(b->base, broker_connect_cb, b);
	b->wake_ev = event_new(b->base, -1, 0, broker_wake_cb, b);
	hb.tv_sec = 0;
	hb.tv_usec = 0;
	b->hb_ev = event_new(b->base, -1, EV_PERSIST, broker_hb_cb, b);
	evtimer_add(b->retry_ev, &hb);	/* connect at once */
	return b;
}

int
broker_start(struct broker *b)
{
	return pthread_create(&b->thread, NULL, broker_main, b) == 0 ? 0 : -1;
}

static void
broker_push(struct broker *b, const struct broker_cmd *c)
{
	pthread_mutex_lock(&b->lock);
	*XPUSH(b->inq, b->ninq, b->capinq) = *c;
	pthread_mutex_unlock(&b->lock);
}

void
broker_publish(struct broker *b, uint64_t epoch, struct msg *m)
{
	struct broker_cmd c = { BROKER_CMD_PUBLISH, epoch, m, 0, 0 };
	broker_push(b, &c);
}

void
broker_ack(struct broker *b, uint64_t epoch, int sub, uint64_t tag)
{
	struct broker_cmd c = { BROKER_CMD_ACK, epoch, NULL, sub, tag };
	broker_push(b, &c);
}

void
broker_reject(struct broker *b, uint64_t epoch, int sub, uint64_t tag)
{
	struct broker_cmd c = { BROKER_CMD_REJECT, epoch, NULL, sub, tag };
	broker_push(b, &c);
}

void
broker_requeue(struct broker *b, uint64_t epoch, int sub, uint64_t tag)
{
	struct broker_cmd c = { BROKER_CMD_REQUEUE, epoch, NULL, sub, tag };
	broker_push(b, &c);
}

void
broker_consume(struct broker *b, int sub, int on)
{
	pthread_mutex_lock(&b->lock);
	if (b->subs[sub].want != on) {
		b->subs[sub].want = on;
		b->subs_changed = 1;
	}
	pthread_mutex_unlock(&b->lock);
}

void
broker_kick(struct broker *b)
{
	event_active(b->wake_ev, 0, 0);
}

void
broker_free(struct broker *b)
{
	size_t i;

	if (!b)
		return;
	pthread_mutex_lock(&b->lock);
	b->stop = 1;
	pthread_mutex_unlock(&b->lock);
	event_active(b->wake_ev, 0, 0);
	pthread_join(b->thread, NULL);
	broker_pending_clear(b);
	for (i = 0; i < b->ninq; i++)
		msg_free(b->inq[i].msg);
	free(b->inq);
	for (i = 0; i < b->noutq; i++)
		msg_free(b->outq[i].msg);
	msg_free(b->rx_msg);
	for (i = 0; i < b->n_subs; i++) {
		free(b->subs[i].queue);
		free(b->subs[i].dlq);
		free(b->subs[i].queue_type);
		acks_free(&b->subs[i].acks);
		broker_free_binds(b->subs[i].binds, b->subs[i].n_binds);
	}
	free(b->subs);
	free(b->outq);
	free(b->outbuf);
	free(b->pending);
	free(b->ring);
	event_free(b->retry_ev);
	event_free(b->wake_ev);
	event_free(b->hb_ev);
	event_free(b->notify_ev);
	event_base_free(b->base);
	for (i = 0; i < b->n_exchanges; i++) {
		free(b->exchanges[i].name);
		free(b->exchanges[i].type);
	}
	free(b->exchanges);
	free(b->host); free(b->user); free(b->password); free(b->vhost);
	free(b->app_id); free(b->conn_name);
	free(b->tls_ca); free(b->tls_cert); free(b->tls_key);
	pthread_mutex_destroy(&b->lock);
	free(b);
}
