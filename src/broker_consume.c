/*
 * The broker link, consuming (the consume role): channel 2 + i belongs to
 * subscription i. Deliveries are assembled frame by frame into a struct msg
 * (ARCHITECTURE.md: rabbitmq-c: frame memory), settled tags leave as few
 * basic.ack frames as possible (acks.c), and consumers start and stop as
 * the main thread wishes. Broker thread only.
 */
#include "broker_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "props.h"
#include "util.h"
#include "xmalloc.h"

/* ---- deliveries ---- */

/* basic.deliver: a message begins; its header and body frames follow. */
void
broker_delivery_start(struct broker *b, amqp_channel_t channel,
    const amqp_basic_deliver_t *dv)
{
	int sub = (int)channel - 2;

	if (sub < 0 || sub >= (int)b->n_subs)
		return;
	msg_free(b->rx_msg);
	b->rx_msg = xcalloc(1, sizeof *b->rx_msg);
	b->rx_msg->seq = (int64_t)dv->delivery_tag;
	b->rx_msg->exchange = xstrndup(dv->exchange.bytes, dv->exchange.len);
	b->rx_msg->routing_key = xstrndup(dv->routing_key.bytes, dv->routing_key.len);
	b->rx_sub = sub;
	b->rx_redelivered = dv->redelivered;
	b->rx = BROKER_RX_DELIVER_HEADER;
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

/* An optional property is copied only when its flag says it came. */
static void
broker_prop_in(const amqp_basic_properties_t *p, amqp_flags_t flag, amqp_bytes_t v,
    char **dst)
{
	if (p->_flags & flag)
		*dst = broker_bytes_dup(v);
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

void
broker_delivery_header(struct broker *b, const amqp_basic_properties_t *p,
    uint64_t size)
{
	struct msg *m = b->rx_msg;
	int i;

	broker_prop_in(p, AMQP_BASIC_MESSAGE_ID_FLAG, p->message_id, &m->message_id);
	broker_prop_in(p, AMQP_BASIC_CONTENT_TYPE_FLAG, p->content_type, &m->props.content_type);
	broker_prop_in(p, AMQP_BASIC_CORRELATION_ID_FLAG, p->correlation_id, &m->props.correlation_id);
	broker_prop_in(p, AMQP_BASIC_TYPE_FLAG, p->type, &m->props.type);
	broker_prop_in(p, AMQP_BASIC_REPLY_TO_FLAG, p->reply_to, &m->props.reply_to);
	broker_prop_in(p, AMQP_BASIC_EXPIRATION_FLAG, p->expiration, &m->props.expiration);
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

void
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

/* ---- settling and consumers ---- */

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

	if (rc != AMQP_STATUS_OK)
		return broker_fail_status(b, "ack", rc);
	return 0;
}

/* Acks wait for the end of the batch of commands (acks.h: one frame for a
 * run); a reject goes at once. */
int
broker_settle(struct broker *b, const struct broker_cmd *c)
{
	int rc;

	if (c->kind == BROKER_CMD_ACK) {
		acks_add(&b->subs[c->sub].acks, c->tag);
		return 0;
	}
	rc = amqp_basic_reject(b->conn, 2 + c->sub, c->tag, c->kind == BROKER_CMD_REQUEUE);
	if (rc != AMQP_STATUS_OK)
		return broker_fail_status(b, "reject", rc);
	acks_settled(&b->subs[c->sub].acks, c->tag);
	return 0;
}

void
broker_flush_acks(struct broker *b)
{
	int i;

	for (i = 0; i < (int)b->n_subs && b->state == BROKER_ST_UP; i++) {
		struct broker_ack_ctx x = { b, i };
		acks_flush(&b->subs[i].acks, broker_send_ack, &x);
	}
}

/* basic.consume / basic.cancel as the main thread last wished (wanted,
 * from broker_take_shared): after a reconnect every wished consumer starts
 * again. Returns how many consumers changed. */
int
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
