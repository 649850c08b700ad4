/*
 * The AMQP front door's channels: channel.open/close/flow, publishing into
 * the outbox (basic.publish + content header + body -> store_outbox_put,
 * the HTTP API's rules), publisher confirms sent in order once the store
 * says durable, exchange and queue methods passed through to the broker
 * (amqpd_topo.c), basic.qos kept, and 540 NOT_IMPLEMENTED for every other
 * method.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "amqpd_int.h"
#include "conf.h"
#include "ingress.h"
#include "log.h"
#include "props.h"
#include "sagad.h"
#include "store.h"
#include "trace.h"
#include "util.h"
#include "xmalloc.h"

/* What a confirm-mode publish has come to, by delivery tag. */
enum amqpd_outcome {
	AMQPD_WAITING,		/* put, its commit not done yet */
	AMQPD_DURABLE,		/* basic.ack */
	AMQPD_REFUSED		/* basic.nack: not stored */
};

/* A confirm waiting for the store's commit; names its channel by number
 * and generation, since the channel may be gone by then. */
struct amqpd_wait {
	struct amqpd_conn *c;
	uint16_t channel;
	uint32_t gen;
	uint64_t tag;
};

/* ---- channel life ---- */

static void
amqpd_chan_reset_msg(struct amqpd_chan *ch)
{
	free(ch->m.message_id);
	free(ch->m.exchange);
	free(ch->m.routing_key);
	props_free(&ch->m.props);
	free(ch->m.body);
	memset(&ch->m, 0, sizeof ch->m);
	ch->body_size = 0;
	ch->body_got = 0;
}

/* Confirms still waiting are dropped with the channel: the client sees
 * them unconfirmed, as with RabbitMQ, and the messages stay stored. */
void
amqpd_chan_free(struct amqpd_chan *ch)
{
	amqpd_consume_chan_gone(ch);	/* unacked deliveries go to other consumers */
	ch->c->chans[ch->id] = NULL;
	amqpd_chan_reset_msg(ch);
	free(ch->outcome);
	free(ch);
}

static void
amqpd_chan_open(struct amqpd_conn *c, uint16_t id)
{
	struct amqpd_chan *ch = xcalloc(1, sizeof *ch);
	amqp_channel_open_ok_t ok = { amqp_empty_bytes };

	ch->c = c;
	ch->id = id;
	ch->gen = ++c->chan_gen;
	ch->state = AMQPD_CH_OPEN;
	c->chans[id] = ch;
	amqpd_send_method(c, id, AMQP_CHANNEL_OPEN_OK_METHOD, &ok);
}

/* OPEN, HEADER or BODY -> CLOSING: our channel.close, until close-ok. */
void
amqpd_chan_close(struct amqpd_chan *ch, int code, const char *text, uint32_t method)
{
	amqp_channel_close_t m;

	m.reply_code = (uint16_t)code;
	m.reply_text = amqp_cstring_bytes(text);
	m.class_id = (uint16_t)(method >> 16);
	m.method_id = (uint16_t)method;
	amqpd_send_method(ch->c, ch->id, AMQP_CHANNEL_CLOSE_METHOD, &m);
	amqpd_chan_reset_msg(ch);
	ch->state = AMQPD_CH_CLOSING;
}

static void
amqpd_chan_closed_by_peer(struct amqpd_chan *ch)
{
	amqp_channel_close_ok_t ok = { 0 };

	amqpd_send_method(ch->c, ch->id, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
	amqpd_chan_free(ch);
}

/* "AMQP_QUEUE_DECLARE_METHOD" -> "queue.declare", as the spec names it. */
void
amqpd_method_text(amqp_method_number_t id, char *out, size_t len)
{
	const char *n = amqp_method_name(id);
	size_t i = 0, k;
	int dot = 0;

	if (!n || strncmp(n, "AMQP_", 5) != 0) {
		snprintf(out, len, "method %u.%u", (unsigned)(id >> 16), (unsigned)(id & 0xffff));
		return;
	}
	for (k = 5; n[k] && strcmp(n + k, "_METHOD") != 0 && i + 1 < len; k++, i++)
		out[i] = n[k] == '_' ? (dot++ ? '-' : '.') : (char)(n[k] | 0x20);
	out[i] = '\0';
}

/* Methods of later slices (consuming) and those never planned
 * (tx.*): the channel goes with 540, naming the method. */
static void
amqpd_chan_refuse(struct amqpd_chan *ch, amqp_method_number_t id)
{
	char name[64], text[200];

	amqpd_method_text(id, name, sizeof name);
	snprintf(text, sizeof text,
	    "NOT_IMPLEMENTED - %s is not supported by sagad's AMQP front door", name);
	log_info("amqp: method not implemented, channel closed", LOG_STR("method", name),
	    LOG_STR("peer", ch->c->peer), LOG_UINT("channel", ch->id));
	if (ch->c->a)
		ch->c->a->stats.refused++;
	amqpd_chan_close(ch, AMQPF_NOT_IMPLEMENTED, text, id);
}

/* ---- confirms ---- */

static void
amqpd_send_ack(struct amqpd_chan *ch, uint64_t tag, int multiple)
{
	amqp_basic_ack_t m = { tag, (amqp_boolean_t)multiple };

	amqpd_send_method(ch->c, ch->id, AMQP_BASIC_ACK_METHOD, &m);
}

static void
amqpd_send_nack(struct amqpd_chan *ch, uint64_t tag)
{
	amqp_basic_nack_t m = { tag, 0, 0 };

	amqpd_send_method(ch->c, ch->id, AMQP_BASIC_NACK_METHOD, &m);
}

/*
 * Tell what is settled, in tag order: a run of durable tags is one
 * basic.ack with multiple (every earlier tag is told already, so multiple
 * names exactly the run); a refused one is its own basic.nack. A tag
 * still waiting stops the walk, so that nothing is told out of order.
 */
static void
amqpd_chan_tell(struct amqpd_chan *ch)
{
	struct amqpd_stats *st = ch->c->a ? &ch->c->a->stats : NULL;
	size_t i = 0, j;

	while (i < ch->noutcome && ch->outcome[i] != AMQPD_WAITING) {
		if (ch->outcome[i] == AMQPD_REFUSED) {
			amqpd_send_nack(ch, ch->told + i + 1);
			if (st)
				st->nacked++;
			i++;
			continue;
		}
		for (j = i; j < ch->noutcome && ch->outcome[j] == AMQPD_DURABLE; j++)
			;
		amqpd_send_ack(ch, ch->told + j, j - i > 1);
		if (st)
			st->acked += j - i;
		i = j;
	}
	memmove(ch->outcome, ch->outcome + i, ch->noutcome - i);
	ch->noutcome -= i;
	ch->told += i;
}

static void
amqpd_chan_settle(struct amqpd_chan *ch, uint64_t tag, enum amqpd_outcome o)
{
	if (tag <= ch->told || tag - ch->told > ch->noutcome)
		return;		/* not ours: cannot happen, and must not be told */
	ch->outcome[tag - ch->told - 1] = (uint8_t)o;
	amqpd_conn_tell_soon(ch->c);
}

void
amqpd_chan_tell_all(struct amqpd_conn *c)
{
	unsigned i;

	/* Nothing goes on a channel, or a connection, whose close we sent:
	 * the client sees those publishes unconfirmed. */
	if (c->state != AMQPD_OPEN || !c->chans)
		return;
	for (i = 1; i <= c->channel_max; i++)
		if (c->chans[i] && c->chans[i]->noutcome && c->chans[i]->state != AMQPD_CH_CLOSING)
			amqpd_chan_tell(c->chans[i]);
}

/* The store's commit: the message is durable (ok) or lost with its
 * transaction (nack: the client publishes it again). */
static void
amqpd_chan_committed(void *arg, int ok)
{
	struct amqpd_wait *w = arg;
	struct amqpd_conn *c = w->c;
	struct amqpd_chan *ch;

	if (c->state != AMQPD_DEAD && c->chans && (ch = c->chans[w->channel]) && ch->gen == w->gen)
		amqpd_chan_settle(ch, w->tag, ok ? AMQPD_DURABLE : AMQPD_REFUSED);
	free(w);
	amqpd_conn_unref(c);
}

/* ---- publishing ---- */

/* AMQP short strings may hold NUL; sagad's strings may not. */
char *
amqpd_cstr(amqp_bytes_t b)
{
	if (b.len && memchr(b.bytes, '\0', b.len))
		return NULL;
	return xstrndup(b.len ? b.bytes : "", b.len);
}

static void
amqpd_chan_publish(struct amqpd_chan *ch, const amqp_basic_publish_t *p)
{
	const char *error;
	char why[256], text[300];

	if (p->immediate) {	/* RabbitMQ 3 refuses it the same way */
		amqpd_chan_close(ch, AMQPF_NOT_IMPLEMENTED, "NOT_IMPLEMENTED - immediate=true",
		    AMQP_BASIC_PUBLISH_METHOD);
		return;
	}
	ch->m.exchange = amqpd_cstr(p->exchange);
	ch->m.routing_key = amqpd_cstr(p->routing_key);
	if (!ch->m.exchange || !ch->m.routing_key) {
		snprintf(why, sizeof why, "exchange and routing key must not contain NUL");
		error = "bad-route";
	} else if (ingress_check_route(ch->c->a->d->conf, ch->m.exchange, ch->m.routing_key,
	    &error, why, sizeof why) == 0) {
		ch->state = AMQPD_CH_HEADER;
		return;
	}
	/* RabbitMQ's codes: an unknown exchange is 404, a bad name 406. */
	snprintf(text, sizeof text, "%s - %s", strcmp(error, "unknown-exchange") == 0 ?
	    "NOT_FOUND" : "PRECONDITION_FAILED", why);
	amqpd_chan_close(ch, strcmp(error, "unknown-exchange") == 0 ? 404 :
	    AMQPF_PRECONDITION_FAILED, text, AMQP_BASIC_PUBLISH_METHOD);
}

/* One header-table value as text; -1 for the kinds sagad cannot carry
 * (its headers are strings, as the HTTP API's Amqp-Header-<name>). */
static int
amqpd_header_text(const amqp_field_value_t *v, char *num, size_t numlen, const char **out,
    size_t *outlen)
{
	switch (v->kind) {
	case AMQP_FIELD_KIND_UTF8:
	case AMQP_FIELD_KIND_BYTES:
		*out = v->value.bytes.len ? v->value.bytes.bytes : "";
		*outlen = v->value.bytes.len;
		return 0;
	case AMQP_FIELD_KIND_BOOLEAN:
		snprintf(num, numlen, "%s", v->value.boolean ? "true" : "false");
		break;
	case AMQP_FIELD_KIND_I8: snprintf(num, numlen, "%d", v->value.i8); break;
	case AMQP_FIELD_KIND_U8: snprintf(num, numlen, "%u", v->value.u8); break;
	case AMQP_FIELD_KIND_I16: snprintf(num, numlen, "%d", v->value.i16); break;
	case AMQP_FIELD_KIND_U16: snprintf(num, numlen, "%u", v->value.u16); break;
	case AMQP_FIELD_KIND_I32: snprintf(num, numlen, "%" PRId32, v->value.i32); break;
	case AMQP_FIELD_KIND_U32: snprintf(num, numlen, "%" PRIu32, v->value.u32); break;
	case AMQP_FIELD_KIND_I64: snprintf(num, numlen, "%" PRId64, v->value.i64); break;
	case AMQP_FIELD_KIND_U64: snprintf(num, numlen, "%" PRIu64, v->value.u64); break;
	default:
		return -1;
	}
	*out = num;
	*outlen = strlen(num);
	return 0;
}

static int
amqpd_headers(struct props *pr, const amqp_table_t *t, char *why, size_t whylen)
{
	char num[32], *name, *value;
	const char *v;
	size_t vlen;
	int i, ok;

	for (i = 0; i < t->num_entries; i++) {
		const amqp_table_entry_t *e = &t->entries[i];

		if (!e->key.len || e->key.len > 128 || !(name = amqpd_cstr(e->key))) {
			snprintf(why, whylen, "header names are 1-128 bytes without NUL");
			return -1;
		}
		if (amqpd_header_text(&e->value, num, sizeof num, &v, &vlen) < 0) {
			snprintf(why, whylen, "header '%s': only strings, numbers and booleans are carried",
			    name);
			free(name);
			return -1;
		}
		value = memchr(v, '\0', vlen) ? NULL : xstrndup(v, vlen);
		ok = value && util_valid_shortstr(value, 65535);
		if (ok)
			props_set_header(pr, name, value);
		else
			snprintf(why, whylen, "header '%s': control characters in its value", name);
		free(name);
		free(value);
		if (!ok)
			return -1;
	}
	return 0;
}

/* A short-string property into *dst, with the HTTP API's rule (at most 255
 * bytes, no control characters). */
static int
amqpd_prop(char **dst, amqp_bytes_t b, const char *name, char *why, size_t whylen)
{
	char *s = amqpd_cstr(b);

	if (!s || !util_valid_shortstr(s, 255)) {
		snprintf(why, whylen, "property %s: control characters", name);
		free(s);
		return -1;
	}
	*dst = s;
	return 0;
}

/*
 * The basic properties a service may set, mapped as the HTTP API maps its
 * headers (sagad(8) THE AMQP FRONT DOOR): message_id, content_type,
 * correlation_id, type, expiration, reply_to and the headers table.
 * delivery_mode is sagad's (always persistent); the others are not carried.
 */
static int
amqpd_props(struct amqpd_chan *ch, const amqp_basic_properties_t *bp, char *why, size_t whylen)
{
	struct msg *m = &ch->m;
	const char *bad;

	if ((bp->_flags & AMQP_BASIC_MESSAGE_ID_FLAG) &&
	    (amqpd_prop(&m->message_id, bp->message_id, "message_id", why, whylen) < 0 ||
	    !ingress_valid_message_id(m->message_id))) {
		snprintf(why, whylen, "message_id must be 1-255 visible ASCII characters");
		return -1;
	}
	if (((bp->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG) &&
	    amqpd_prop(&m->props.content_type, bp->content_type, "content_type", why, whylen) < 0) ||
	    ((bp->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) &&
	    amqpd_prop(&m->props.correlation_id, bp->correlation_id, "correlation_id", why,
	    whylen) < 0) ||
	    ((bp->_flags & AMQP_BASIC_TYPE_FLAG) &&
	    amqpd_prop(&m->props.type, bp->type, "type", why, whylen) < 0) ||
	    ((bp->_flags & AMQP_BASIC_REPLY_TO_FLAG) &&
	    amqpd_prop(&m->props.reply_to, bp->reply_to, "reply_to", why, whylen) < 0))
		return -1;
	if (bp->_flags & AMQP_BASIC_EXPIRATION_FLAG) {
		if (amqpd_prop(&m->props.expiration, bp->expiration, "expiration", why, whylen) < 0 ||
		    !ingress_valid_expiration(m->props.expiration)) {
			snprintf(why, whylen, "expiration must be a number of milliseconds up to 4294967295");
			return -1;
		}
	}
	if ((bp->_flags & AMQP_BASIC_HEADERS_FLAG) && amqpd_headers(&m->props, &bp->headers,
	    why, whylen) < 0)
		return -1;
	if (trace_check(&m->props, ch->c->a->d->conf, &bad) < 0) {
		snprintf(why, whylen, "%s", bad);
		return -1;
	}
	if (!m->message_id) {
		char id[37];

		util_uuid7(id);
		m->message_id = xstrdup(id);
	}
	return 0;
}

/* The whole message is here: into the outbox, confirmed once durable. */
static void
amqpd_chan_store(struct amqpd_chan *ch)
{
	struct amqpd *a = ch->c->a;
	struct amqpd_wait *w;
	enum store_put put;
	uint64_t tag = 0;

	amqpd_reply_decorate(a, &ch->m);	/* a saga command's reply */
	put = store_outbox_put(a->d->store, &ch->m, util_now(), STORE_OUT_DEDUP);
	if (ch->confirm) {
		tag = ch->told + ch->noutcome + 1;
		*XPUSH(ch->outcome, ch->noutcome, ch->capoutcome) = AMQPD_WAITING;
	}
	if (put == STORE_PUT_STORED || put == STORE_PUT_DUPLICATE) {
		a->stats.published++;
		if (put == STORE_PUT_DUPLICATE)
			a->stats.duplicates++;
		if (ch->confirm) {
			w = xcalloc(1, sizeof *w);
			w->c = ch->c;
			w->channel = ch->id;
			w->gen = ch->gen;
			w->tag = tag;
			ch->c->refs++;
			store_on_commit(a->d->store, amqpd_chan_committed, w);
		}
	} else {
		log_warn("amqp: publish not stored", LOG_STR("peer", ch->c->peer),
		    LOG_STR("message_id", ch->m.message_id),
		    LOG_STR("reason", put == STORE_PUT_FULL ? "store full" : "store error"));
		if (ch->confirm)
			amqpd_chan_settle(ch, tag, AMQPD_REFUSED);
	}
	amqpd_chan_reset_msg(ch);
	ch->state = AMQPD_CH_OPEN;
}

/* HEADER -> BODY (or stored at once for an empty body). */
static void
amqpd_chan_header(struct amqpd_chan *ch, const struct amqpf_frame *f)
{
	const struct sagad_conf *conf = ch->c->a->d->conf;
	struct amqpf_error err;
	const uint8_t *pb;
	size_t plen;
	uint16_t cls;
	uint64_t size;
	void *decoded;
	char why[300], text[340];

	if (amqpf_content(f, &cls, &size, &pb, &plen, &err) < 0) {
		amqpd_conn_close(ch->c, err.code, err.why, 0);
		return;
	}
	if (cls != AMQP_BASIC_CLASS) {
		amqpd_conn_close(ch->c, AMQPF_UNEXPECTED_FRAME,
		    "UNEXPECTED_FRAME - content header of another class than basic", 0);
		return;
	}
	if (amqp_decode_properties(cls, &ch->c->pool, (amqp_bytes_t){ plen, (void *)pb },
	    &decoded) < 0) {
		amqpd_conn_close(ch->c, AMQPF_SYNTAX_ERROR,
		    "SYNTAX_ERROR - cannot decode the content header's properties", 0);
		return;
	}
	if (size > (uint64_t)conf->api.max_message_bytes) {
		snprintf(text, sizeof text, "PRECONDITION_FAILED - message of %" PRIu64
		    " bytes is over max_message_bytes (%lld)", size,
		    (long long)conf->api.max_message_bytes);
		amqpd_chan_close(ch, AMQPF_PRECONDITION_FAILED, text,
		    AMQP_BASIC_PUBLISH_METHOD);
		return;
	}
	if (amqpd_props(ch, decoded, why, sizeof why) < 0) {
		snprintf(text, sizeof text, "PRECONDITION_FAILED - %s", why);
		amqpd_chan_close(ch, AMQPF_PRECONDITION_FAILED, text,
		    AMQP_BASIC_PUBLISH_METHOD);
		return;
	}
	ch->body_size = size;
	ch->m.body = xmalloc(size ? (size_t)size : 1);
	if (size == 0) {
		amqpd_chan_store(ch);
		return;
	}
	ch->state = AMQPD_CH_BODY;
}

static void
amqpd_chan_body(struct amqpd_chan *ch, const struct amqpf_frame *f)
{
	if (f->size > ch->body_size - ch->body_got) {
		amqpd_conn_close(ch->c, AMQPF_FRAME_ERROR,
		    "FRAME_ERROR - body frames longer than the content header's body size", 0);
		return;
	}
	memcpy(ch->m.body + ch->body_got, f->payload, f->size);
	ch->body_got += f->size;
	ch->m.body_len = ch->body_got;
	if (ch->body_got == ch->body_size)
		amqpd_chan_store(ch);
}

/* ---- topology, passed through to the broker (amqpd_topo.c) ---- */

/* OPEN -> TOPO: the method goes to the broker as it came, but with nowait
 * cleared, so that the broker's answer is always awaited (and the client
 * told only if it asked); the connection reads nothing more until then. */
static void
amqpd_chan_forward(struct amqpd_chan *ch, amqp_method_number_t id, void *m)
{
	struct amqpd_topo_call *call = xcalloc(1, sizeof *call);
	amqp_boolean_t *nowait = amqpd_topo_nowait(id, m);
	char name[64];
	int n;

	call->nowait = nowait && *nowait;
	if (nowait)
		*nowait = 0;
	amqpd_consume_declare(ch, id, m);
	/* Decoded from one frame, it encodes again into no more than that. */
	call->args = xmalloc(ch->c->frame_max);
	n = amqp_encode_method(id, m, (amqp_bytes_t){ ch->c->frame_max, call->args });
	if (n < 0) {	/* cannot happen, as said */
		amqpd_topo_call_free(call);
		amqpd_conn_close(ch->c, AMQPF_INTERNAL_ERROR,
		    "INTERNAL_ERROR - cannot encode the method again", id);
		return;
	}
	call->c = ch->c;
	call->channel = ch->id;
	call->gen = ch->gen;
	call->id = id;
	call->alen = (size_t)n;
	amqpd_method_text(id, name, sizeof name);
	log_debug("amqp: topology call passed to the broker", LOG_STR("method", name),
	    LOG_STR("peer", ch->c->peer), LOG_UINT("channel", ch->id));
	ch->c->refs++;
	ch->c->paused = 1;
	ch->state = AMQPD_CH_TOPO;
	ch->c->a->stats.forwarded++;
	amqpd_topo_call(ch->c->a->topo, call);
}

/* The broker's -ok, decoded by rabbitmq-c's codec and sent on. */
static void
amqpd_chan_topo_ok(struct amqpd_chan *ch, const struct amqpd_topo_call *call)
{
	amqp_pool_t pool;
	void *m;

	if (call->nowait)
		return;
	init_amqp_pool(&pool, 1024);
	if (amqp_decode_method(call->reply_id, &pool, (amqp_bytes_t){ call->reply_len,
	    (void *)call->reply }, &m) == 0)
		amqpd_send_method(ch->c, ch->id, call->reply_id, m);
	empty_amqp_pool(&pool);
}

/*
 * Broker unreachable (cannot connect, no answer within the timeout, the
 * socket failed): the connection is closed with 320 CONNECTION_FORCED, as
 * RabbitMQ closes its clients' connections when a node goes away. No
 * channel error fits: 404 or 405 would tell the client something about the
 * exchange or queue that nobody knows; clients treat 320 as "reconnect
 * later". Publishes stored so far stay stored.
 */
static void
amqpd_chan_topo_unreachable(struct amqpd_chan *ch, const struct amqpd_topo_call *call,
    const char *name)
{
	char text[512];

	log_warn("amqp: broker unreachable, topology call not passed through",
	    LOG_STR("method", name), LOG_STR("peer", ch->c->peer),
	    LOG_STR("reason", call->text));
	snprintf(text, sizeof text, "CONNECTION_FORCED - broker unreachable, %s not "
	    "passed through: %s", name, call->text);
	text[255] = '\0';	/* reply_text is a short string */
	amqpd_conn_close(ch->c, 320, text, call->id);
}

/* TOPO -> OPEN (or CLOSING): the broker's answer, or its error with the
 * same code and text, to the client; then the frames that waited. */
void
amqpd_chan_topo_done(struct amqpd_topo_call *call)
{
	struct amqpd_conn *c = call->c;
	struct amqpd_chan *ch = NULL;
	char name[64];

	/* Nothing goes out after our connection.close, nor to a channel
	 * that is not the one that asked. */
	if (c->state == AMQPD_OPEN && c->chans)
		ch = c->chans[call->channel];
	if (ch && ch->gen == call->gen && ch->state == AMQPD_CH_TOPO) {
		ch->state = AMQPD_CH_OPEN;
		amqpd_method_text(call->id, name, sizeof name);
		switch (call->result) {
		case AMQPD_TOPO_OK:
			amqpd_chan_topo_ok(ch, call);
			break;
		case AMQPD_TOPO_CHANNEL_ERROR:
			log_info("amqp: broker refused a topology call, channel closed",
			    LOG_STR("method", name), LOG_STR("peer", c->peer),
			    LOG_UINT("code", call->code), LOG_STR("text", call->text));
			amqpd_chan_close(ch, call->code, call->text, call->method);
			break;
		case AMQPD_TOPO_CONNECTION_ERROR:
			log_warn("amqp: broker closed the topology connection, closing the client's",
			    LOG_STR("method", name), LOG_STR("peer", c->peer),
			    LOG_UINT("code", call->code), LOG_STR("text", call->text));
			amqpd_conn_close(c, call->code, call->text, call->method);
			break;
		case AMQPD_TOPO_UNREACHABLE:
			amqpd_chan_topo_unreachable(ch, call, name);
			break;
		}
	}
	amqpd_topo_call_free(call);
	amqpd_conn_resume(c);
	amqpd_conn_unref(c);
}

/* Answered here: sagad, not the client, consumes from the broker (with
 * the subscription's prefetch). Applied to the front door's deliveries:
 * prefetch_count for each consumer started after it, or with global for
 * the channel's consumers together (RabbitMQ's meaning of the flag). */
static void
amqpd_chan_qos(struct amqpd_chan *ch, const amqp_basic_qos_t *q)
{
	amqp_basic_qos_ok_t ok = { 0 };

	ch->prefetch_count = q->prefetch_count;
	ch->prefetch_size = q->prefetch_size;
	ch->qos_global = q->global;
	if (q->global)
		ch->chan_prefetch = q->prefetch_count;
	amqpd_consume_flow(ch, !ch->flow_off);	/* more room, maybe */
	log_debug("amqp: basic.qos kept", LOG_STR("peer", ch->c->peer),
	    LOG_UINT("channel", ch->id), LOG_UINT("prefetch_count", q->prefetch_count));
	amqpd_send_method(ch->c, ch->id, AMQP_BASIC_QOS_OK_METHOD, &ok);
}

/* ---- dispatch ---- */

static void
amqpd_chan_method(struct amqpd_chan *ch, amqp_method_number_t id, void *m)
{
	amqp_channel_flow_ok_t flow;
	amqp_confirm_select_ok_t sel = { 0 };

	switch (id) {
	case AMQP_CHANNEL_CLOSE_METHOD:
		amqpd_chan_closed_by_peer(ch);
		return;
	case AMQP_CHANNEL_OPEN_METHOD:
		amqpd_conn_close(ch->c, AMQPF_CHANNEL_ERROR,
		    "CHANNEL_ERROR - channel already open", id);
		return;
	case AMQP_CHANNEL_FLOW_METHOD:
		flow.active = ((amqp_channel_flow_t *)m)->active;
		amqpd_send_method(ch->c, ch->id, AMQP_CHANNEL_FLOW_OK_METHOD, &flow);
		amqpd_consume_flow(ch, flow.active);
		return;
	case AMQP_CHANNEL_FLOW_OK_METHOD:
		return;
	case AMQP_CONFIRM_SELECT_METHOD:
		ch->confirm = 1;
		if (!((amqp_confirm_select_t *)m)->nowait)
			amqpd_send_method(ch->c, ch->id, AMQP_CONFIRM_SELECT_OK_METHOD, &sel);
		return;
	case AMQP_BASIC_PUBLISH_METHOD:
		if (ch->c->a->d->state != SAGAD_RUNNING) {
			amqpd_conn_close(ch->c, 320,
			    "CONNECTION_FORCED - sagad is stopping; publish to its successor", id);
			return;
		}
		amqpd_chan_publish(ch, m);
		return;
	case AMQP_BASIC_QOS_METHOD:
		amqpd_chan_qos(ch, m);
		return;
	default:
		if (amqpd_consume_method(ch, id, m))
			return;
		if (amqpd_topo_ok_id(id))
			amqpd_chan_forward(ch, id, m);
		else
			amqpd_chan_refuse(ch, id);
		return;
	}
}

/* CLOSING: only the close handshake counts; the rest is dropped, as the
 * spec asks, content of a refused publish included. */
static void
amqpd_chan_closing(struct amqpd_chan *ch, amqp_method_number_t id)
{
	if (id == AMQP_CHANNEL_CLOSE_OK_METHOD)
		amqpd_chan_free(ch);
	else if (id == AMQP_CHANNEL_CLOSE_METHOD)
		amqpd_chan_closed_by_peer(ch);
}

static int
amqpd_decode(struct amqpd_conn *c, const struct amqpf_frame *f, amqp_method_number_t *id,
    void **m)
{
	struct amqpf_error err;
	const uint8_t *args;
	size_t alen;

	if (amqpf_method(f, id, &args, &alen, &err) < 0) {
		amqpd_conn_close(c, err.code, err.why, 0);
		return -1;
	}
	if (amqp_decode_method(*id, &c->pool, (amqp_bytes_t){ alen, (void *)args }, m) < 0) {
		amqpd_conn_close(c, AMQPF_SYNTAX_ERROR, "SYNTAX_ERROR - cannot decode the method",
		    *id);
		return -1;
	}
	return 0;
}

void
amqpd_chan_frame(struct amqpd_conn *c, const struct amqpf_frame *f)
{
	struct amqpd_chan *ch;
	amqp_method_number_t id = 0;
	void *m = NULL;

	if (c->state == AMQPD_CLOSING)
		return;		/* discarded until our close is answered */
	if (f->channel > c->channel_max) {
		amqpd_conn_close(c, AMQPF_CHANNEL_ERROR,
		    "CHANNEL_ERROR - channel number over channel_max", 0);
		return;
	}
	ch = c->chans[f->channel];
	if (f->type == AMQPF_HEARTBEAT)
		return;
	if (f->type == AMQPF_METHOD && amqpd_decode(c, f, &id, &m) < 0)
		return;
	if (!ch) {
		if (id == AMQP_CHANNEL_OPEN_METHOD) {
			amqpd_chan_open(c, f->channel);
			return;
		}
		amqpd_conn_close(c, AMQPF_CHANNEL_ERROR, "CHANNEL_ERROR - channel not open",
		    id);
		return;
	}
	switch (ch->state) {
	case AMQPD_CH_CLOSING:
		if (f->type == AMQPF_METHOD)
			amqpd_chan_closing(ch, id);
		return;
	case AMQPD_CH_HEADER:
		if (f->type == AMQPF_HEADER) {
			amqpd_chan_header(ch, f);
			return;
		}
		break;
	case AMQPD_CH_BODY:
		if (f->type == AMQPF_BODY) {
			amqpd_chan_body(ch, f);
			return;
		}
		break;
	case AMQPD_CH_OPEN:
		if (f->type == AMQPF_METHOD) {
			amqpd_chan_method(ch, id, m);
			return;
		}
		break;
	case AMQPD_CH_TOPO:
		/* Cannot happen: the connection reads no frame while a
		 * topology call is in flight (amqpd_conn_input). */
		break;
	}
	amqpd_conn_close(c, AMQPF_UNEXPECTED_FRAME,
	    "UNEXPECTED_FRAME - frame out of the publish's method, header, body order", id);
}
