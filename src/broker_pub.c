/*
 * The broker link, publishing (the publish role): mandatory, persistent
 * publishes on channel 1, the confirm ring that matches the broker's
 * basic.ack/basic.nack to outbox seqs, basic.return, and connection.blocked
 * (ARCHITECTURE.md: rabbitmq-c: confirms and returns). Broker thread only.
 */
#include "broker_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "props.h"
#include "util.h"
#include "xmalloc.h"

/* ---- the confirm window ---- */

static struct broker_inflight *
broker_ring_at(struct broker *b, uint64_t tag)
{
	if (tag < b->head_tag || tag >= b->head_tag + b->ring_len)
		return NULL;
	return &b->ring[(b->ring_head + (tag - b->head_tag)) % b->ring_cap];
}

static void
broker_ring_push(struct broker *b, int64_t seq, const char *message_id, const char *trace)
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
	if (trace && strnlen(trace, TRACE_PARENT_LEN + 1) == TRACE_PARENT_LEN)
		memcpy(e->trace, trace, TRACE_PARENT_LEN + 1);
	else
		e->trace[0] = '\0';
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

	struct broker_event *ev = broker_post(b, k, e->seq, util_mono() - e->sent, NULL);

	memcpy(ev->trace, e->trace, sizeof ev->trace);
	free(e->message_id);
	e->message_id = NULL;
	e->settled = 1;
}

/* basic.ack / basic.nack: `multiple` settles every tag up to this one. */
void
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

void
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

/* The header of a basic.return: the message id says which ring entry came
 * back; only counters are kept of the body (ARCHITECTURE.md: rabbitmq-c:
 * frame memory). */
void
broker_return_header(struct broker *b, const amqp_basic_properties_t *p,
    uint64_t size)
{
	if (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG)
		broker_mark_returned(b, &p->message_id);
	b->rx_remaining = size;
	b->rx = b->rx_remaining ? BROKER_RX_RETURN_BODY : BROKER_RX_IDLE;
}

void
broker_return_body(struct broker *b, const amqp_bytes_t *frag)
{
	size_t n = frag->len;

	b->rx_remaining = n >= b->rx_remaining ? 0 : b->rx_remaining - n;
	if (!b->rx_remaining)
		b->rx = BROKER_RX_IDLE;
}

/* A resource alarm: publishes wait (broker_do_pending) until it ends
 * (ARCHITECTURE.md: rabbitmq-c: connection.blocked). */
void
broker_blocked(struct broker *b, const amqp_connection_blocked_t *bl)
{
	char why[200];

	b->blocked = 1;
	snprintf(why, sizeof why, "%.*s", (int)bl->reason.len, (char *)bl->reason.bytes);
	log_warn("broker blocked the connection", LOG_STR("reason", why));
	broker_post(b, BROKER_EV_BLOCKED, 0, 0, why);
}

void
broker_unblocked(struct broker *b)
{
	b->blocked = 0;
	log_info("broker unblocked the connection");
	broker_post(b, BROKER_EV_UNBLOCKED, 0, 0, NULL);
}

/* ---- publishing ---- */

static amqp_bytes_t
broker_bytes(const char *s)
{
	return amqp_cstring_bytes(s ? s : "");
}

/* An optional property goes out only when the message has it: its flag
 * says so. */
static void
broker_prop_out(amqp_basic_properties_t *p, amqp_flags_t flag, amqp_bytes_t *field,
    const char *v)
{
	if (!v)
		return;
	p->_flags |= flag;
	*field = broker_bytes(v);
}

/* A stored message's properties as rabbitmq-c takes them; header values
 * are kept as text in the store, so they go out as strings. Returns the
 * header table: local, or allocated when m has more than nlocal headers
 * (the caller frees it then). */
amqp_table_entry_t *
broker_msg_props(const struct msg *m, amqp_basic_properties_t *p, amqp_table_entry_t *local,
    size_t nlocal)
{
	amqp_table_entry_t *ents = local;
	size_t i;

	memset(p, 0, sizeof *p);
	p->_flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_MESSAGE_ID_FLAG;
	p->delivery_mode = 2;
	p->message_id = broker_bytes(m->message_id);
	broker_prop_out(p, AMQP_BASIC_CONTENT_TYPE_FLAG, &p->content_type, m->props.content_type);
	broker_prop_out(p, AMQP_BASIC_CORRELATION_ID_FLAG, &p->correlation_id,
	    m->props.correlation_id);
	broker_prop_out(p, AMQP_BASIC_TYPE_FLAG, &p->type, m->props.type);
	broker_prop_out(p, AMQP_BASIC_EXPIRATION_FLAG, &p->expiration, m->props.expiration);
	broker_prop_out(p, AMQP_BASIC_REPLY_TO_FLAG, &p->reply_to, m->props.reply_to);
	if (!m->props.n_headers)
		return ents;
	if (m->props.n_headers > nlocal)
		ents = xcalloc(m->props.n_headers, sizeof *ents);
	for (i = 0; i < m->props.n_headers; i++) {
		ents[i].key = broker_bytes(m->props.headers[i].name);
		ents[i].value.kind = AMQP_FIELD_KIND_UTF8;
		ents[i].value.value.bytes = broker_bytes(m->props.headers[i].value);
	}
	p->_flags |= AMQP_BASIC_HEADERS_FLAG;
	p->headers.num_entries = (int)m->props.n_headers;
	p->headers.entries = ents;
	return ents;
}

int
broker_publish_one(struct broker *b, struct msg *m)
{
	amqp_basic_properties_t p;
	amqp_table_entry_t entries[64];
	amqp_table_entry_t *ents;
	amqp_bytes_t body;
	int rc;

	ents = broker_msg_props(m, &p, entries, sizeof entries / sizeof entries[0]);
	p._flags |= AMQP_BASIC_APP_ID_FLAG | AMQP_BASIC_TIMESTAMP_FLAG;
	p.app_id = broker_bytes(b->app_id);
	p.timestamp = (uint64_t)util_now();
	body.bytes = m->body;
	body.len = m->body_len;
	rc = amqp_basic_publish(b->conn, BROKER_CHANNEL, broker_bytes(m->exchange),
	    broker_bytes(m->routing_key), 1, 0, &p, body);
	if (ents != entries)
		free(ents);
	if (rc != AMQP_STATUS_OK)
		return broker_fail_status(b, "publish", rc);
	broker_ring_push(b, m->seq, m->message_id, props_get_header(&m->props, TRACE_PARENT));
	return 0;
}
