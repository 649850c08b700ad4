/*
 * Consuming through the AMQP front door. basic.consume on the queue of a
 * subscription with deliver = "amqp" attaches the client as a consumer of
 * that subscription (dispatch_sink.c): sagad consumes the queue from the
 * broker through its inbox (committed before the broker's ack, message ids
 * deduplicated) and hands the records to its consumers with basic.deliver,
 * within their prefetch. The client's basic.ack records the message
 * delivered; basic.nack and basic.reject with requeue retry it after the
 * subscription's backoff (dead-lettered once max_attempts are spent),
 * without requeue dead-letter it at once with the reason in its headers;
 * a channel or connection that goes with deliveries unacked hands them to
 * the other consumers (or the next one), flagged redelivered.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "amqpd_int.h"
#include "delivery.h"
#include "log.h"
#include "sagad.h"
#include "xmalloc.h"

/* A consumer is a delivery sink (first member: the dispatch's pointer is
 * ours). A cancelled one stays on its channel's list, detached, until the
 * deliveries it made are settled (release). */
struct amqpd_consumer {
	struct delivery_sink sink;
	struct amqpd_chan *ch;		/* NULL once the channel is gone */
	struct amqpd_consumer *next;	/* the channel's */
	char *tag;
	char *queue;
	int no_ack;
	uint16_t prefetch;		/* 0: no limit */
};

/* A delivery the client has not settled yet. */
struct amqpd_unacked {
	uint64_t tag;
	struct dattempt *t;
	struct amqpd_consumer *cons;
};

static struct delivery *
amqpd_delivery(const struct amqpd_chan *ch)
{
	return ch->c->a->d->delivery;
}

/* ---- the sink ---- */

static unsigned
amqpd_held(const struct amqpd_chan *ch)
{
	const struct amqpd_consumer *k;
	unsigned n = 0;

	for (k = ch->consumers; k; k = k->next)
		n += k->sink.held;
	return n;
}

/* What the prefetch leaves, the consumer's and the channel's (global);
 * nothing while the channel is paused, closing or waiting on the broker
 * for a topology call (its frames would overtake the answer), or after
 * our connection.close. */
static unsigned
amqpd_room(struct delivery_sink *s)
{
	struct amqpd_consumer *k = (struct amqpd_consumer *)s;
	struct amqpd_chan *ch = k->ch;
	unsigned room = 65535, held;

	if (!ch || ch->flow_off || ch->state == AMQPD_CH_CLOSING || ch->c->state != AMQPD_OPEN)
		return 0;
	if (k->prefetch)
		room = s->held >= k->prefetch ? 0 : k->prefetch - s->held;
	if (ch->chan_prefetch) {
		held = amqpd_held(ch);
		if (held >= ch->chan_prefetch)
			return 0;
		if (ch->chan_prefetch - held < room)
			room = ch->chan_prefetch - held;
	}
	return room;
}

static void
amqpd_unacked_add(struct amqpd_chan *ch, uint64_t tag, struct dattempt *t,
    struct amqpd_consumer *k)
{
	if (ch->nunacked == ch->capunacked)
		ch->unacked = xgrow(ch->unacked, &ch->capunacked, ch->nunacked + 1,
		    sizeof *ch->unacked);
	ch->unacked[ch->nunacked].tag = tag;
	ch->unacked[ch->nunacked].t = t;
	ch->unacked[ch->nunacked].cons = k;
	ch->nunacked++;
}

static int
amqpd_deliver(struct delivery_sink *s, struct dattempt *t, const struct msg *m, int redelivered)
{
	struct amqpd_consumer *k = (struct amqpd_consumer *)s;
	struct amqpd_chan *ch = k->ch;
	amqp_basic_deliver_t d;

	if (ch->state == AMQPD_CH_CLOSING || ch->c->state != AMQPD_OPEN)
		return -1;	/* closing since the record was marked: not sent */
	d.consumer_tag = amqp_cstring_bytes(k->tag);
	d.delivery_tag = ++ch->deliver_tag;
	d.redelivered = (amqp_boolean_t)redelivered;
	d.exchange = amqp_cstring_bytes(m->exchange ? m->exchange : "");
	d.routing_key = amqp_cstring_bytes(m->routing_key ? m->routing_key : "");
	amqpd_reply_expect(ch->c->a, m);
	amqpd_send_method(ch->c, ch->id, AMQP_BASIC_DELIVER_METHOD, &d);
	amqpd_send_content(ch->c, ch->id, m);
	ch->c->a->stats.delivered++;
	if (redelivered)
		ch->c->a->stats.redelivered++;
	/* no_ack: the client acknowledged it by asking so (at most once). */
	if (k->no_ack)
		delivery_take_settle(t, TAKE_ACK, NULL);
	else
		amqpd_unacked_add(ch, d.delivery_tag, t, k);
	return 0;
}

static void
amqpd_consumer_unlink(struct amqpd_consumer *k)
{
	struct amqpd_consumer **p;

	if (!k->ch)
		return;
	for (p = &k->ch->consumers; *p; p = &(*p)->next)
		if (*p == k) {
			*p = k->next;
			break;
		}
	k->ch = NULL;
}

/* Detached and holding nothing: gone. */
static void
amqpd_release(struct delivery_sink *s)
{
	struct amqpd_consumer *k = (struct amqpd_consumer *)s;

	amqpd_consumer_unlink(k);
	free(k->tag);
	free(k->queue);
	free(k);
}

static const struct delivery_sink_ops amqpd_sink_ops = {
	amqpd_room, amqpd_deliver, amqpd_release
};

/* ---- basic.consume and basic.cancel ---- */

static struct amqpd_consumer *
amqpd_consumer_find(struct amqpd_chan *ch, const char *tag)
{
	struct amqpd_consumer *k;

	for (k = ch->consumers; k; k = k->next)
		if (!k->sink.detached && strcmp(k->tag, tag) == 0)
			return k;
	return NULL;
}

static void
amqpd_consumer_detach(struct amqpd_chan *ch, struct amqpd_consumer *k)
{
	ch->c->a->stats.consumers--;
	log_info("amqp: consumer cancelled", LOG_STR("peer", ch->c->peer),
	    LOG_UINT("channel", ch->id), LOG_STR("consumer_tag", k->tag),
	    LOG_STR("queue", k->queue));
	delivery_detach(amqpd_delivery(ch), &k->sink);	/* may release k */
}

/* A server-named tag, none of the channel's: a client may have chosen
 * one of this form itself, and must not get a 530 for a reuse it never
 * made. */
static char *
amqpd_ctag_new(struct amqpd_chan *ch)
{
	char *tag = NULL;

	do {
		free(tag);
		tag = xasprintf("amq.ctag-sagad-%" PRIu64, ++ch->c->a->ctag_seq);
	} while (amqpd_consumer_find(ch, tag));
	return tag;
}

/* A queue that is no front-door subscription's is refused rather than
 * passed through: a consumer of the broker's queue behind sagad's back
 * would skip the inbox, which is what the service came for. */
static void
amqpd_consume(struct amqpd_chan *ch, const amqp_basic_consume_t *m)
{
	struct amqpd_consumer *k;
	amqp_basic_consume_ok_t ok;
	char *queue = amqpd_cstr(m->queue), *tag = amqpd_cstr(m->consumer_tag);
	char text[512];
	int sub = queue ? delivery_frontdoor_sub(amqpd_delivery(ch), queue) : -1;

	if (sub < 0) {
		snprintf(text, sizeof text, "NOT_FOUND - no front-door subscription consumes "
		    "queue '%.200s' (sagad.conf(5): a subscription with deliver = \"amqp\")",
		    queue ? queue : "?");
		text[255] = '\0';
		log_info("amqp: basic.consume of a queue without a front-door subscription",
		    LOG_STR("peer", ch->c->peer), LOG_STR("queue", queue));
		amqpd_chan_close(ch, 404, text, AMQP_BASIC_CONSUME_METHOD);
		goto out;
	}
	if (!tag || !*tag) {
		free(tag);
		tag = amqpd_ctag_new(ch);
	}
	if (amqpd_consumer_find(ch, tag)) {
		snprintf(text, sizeof text, "NOT_ALLOWED - attempt to reuse consumer tag '%.200s'",
		    tag);
		text[255] = '\0';
		amqpd_conn_close(ch->c, 530, text, AMQP_BASIC_CONSUME_METHOD);
		goto out;
	}
	k = xcalloc(1, sizeof *k);
	k->sink.ops = &amqpd_sink_ops;
	k->sink.exclusive = m->exclusive;
	k->ch = ch;
	k->tag = tag;
	k->queue = queue;
	k->no_ack = m->no_ack;
	k->prefetch = ch->qos_global ? 0 : ch->prefetch_count;
	if (delivery_attach(amqpd_delivery(ch), sub, &k->sink) < 0) {
		snprintf(text, sizeof text, "ACCESS_REFUSED - queue '%.200s' in exclusive use",
		    queue);
		text[255] = '\0';
		free(k);
		amqpd_chan_close(ch, 403, text, AMQP_BASIC_CONSUME_METHOD);
		goto out;
	}
	k->next = ch->consumers;
	ch->consumers = k;
	ch->c->a->stats.consumers++;
	log_info("amqp: consumer started", LOG_STR("peer", ch->c->peer),
	    LOG_UINT("channel", ch->id), LOG_STR("consumer_tag", tag), LOG_STR("queue", queue),
	    LOG_UINT("prefetch", k->prefetch), LOG_INT("no_ack", k->no_ack));
	/* The deliveries come from the dispatch event, after this answer. */
	if (!m->nowait) {
		ok.consumer_tag = amqp_cstring_bytes(tag);
		amqpd_send_method(ch->c, ch->id, AMQP_BASIC_CONSUME_OK_METHOD, &ok);
	}
	return;
out:
	free(queue);
	free(tag);
}

/* An unknown tag is answered too, as RabbitMQ does. */
static void
amqpd_cancel(struct amqpd_chan *ch, const amqp_basic_cancel_t *m)
{
	char *tag = amqpd_cstr(m->consumer_tag);
	struct amqpd_consumer *k = tag ? amqpd_consumer_find(ch, tag) : NULL;
	amqp_basic_cancel_ok_t ok;

	if (k)
		amqpd_consumer_detach(ch, k);
	if (!m->nowait) {
		ok.consumer_tag = m->consumer_tag;
		amqpd_send_method(ch->c, ch->id, AMQP_BASIC_CANCEL_OK_METHOD, &ok);
	}
	free(tag);
}

/* ---- the client's verdicts ---- */

/* Settle unacked[i] and take it off the list. */
static void
amqpd_settle_at(struct amqpd_chan *ch, size_t i, enum delivery_take_result r,
    const char *why)
{
	struct dattempt *t = ch->unacked[i].t;

	memmove(&ch->unacked[i], &ch->unacked[i + 1],
	    (ch->nunacked - i - 1) * sizeof *ch->unacked);
	ch->nunacked--;
	switch (r) {
	case TAKE_ACK: ch->c->a->stats.client_acks++; break;
	case TAKE_REQUEUE: ch->c->a->stats.client_requeues++; break;
	case TAKE_REJECT: ch->c->a->stats.client_rejects++; break;
	case TAKE_RETURNED: break;
	}
	delivery_take_settle(t, r, why);
}

/*
 * basic.ack, basic.nack, basic.reject: the tag, or with multiple every
 * unacked tag up to it (tag 0 with multiple: all of them). A tag never
 * given or settled already is a channel error 406, as with RabbitMQ; the
 * deliveries settled before it stay settled.
 */
static void
amqpd_verdict(struct amqpd_chan *ch, amqp_method_number_t id, uint64_t tag, int multiple,
    enum delivery_take_result r, const char *why)
{
	char text[200];
	size_t i = 0;
	int found = 0;

	while (i < ch->nunacked) {
		uint64_t t = ch->unacked[i].tag;
		if (t == tag || (multiple && (tag == 0 || t < tag))) {
			found |= t == tag || tag == 0;
			amqpd_settle_at(ch, i, r, why);
			continue;
		}
		if (t > tag && tag != 0)
			break;
		i++;
	}
	if (found || (multiple && tag == 0))
		return;
	snprintf(text, sizeof text, "PRECONDITION_FAILED - unknown delivery tag %" PRIu64, tag);
	amqpd_chan_close(ch, 406, text, id);
}

/* basic.recover (requeue or not: sagad cannot hand a record back to the
 * same consumer only): every unacked delivery again, redelivered. */
static void
amqpd_recover(struct amqpd_chan *ch, amqp_method_number_t id)
{
	amqp_basic_recover_ok_t ok = { 0 };

	while (ch->nunacked)
		amqpd_settle_at(ch, 0, TAKE_RETURNED, NULL);
	if (id == AMQP_BASIC_RECOVER_METHOD)
		amqpd_send_method(ch->c, ch->id, AMQP_BASIC_RECOVER_OK_METHOD, &ok);
}

/* basic.get would take one record outside any consumer; sagad's inbox
 * hands records to consumers only. Refused with a hint. */
static void
amqpd_get_refused(struct amqpd_chan *ch)
{
	log_info("amqp: basic.get refused", LOG_STR("peer", ch->c->peer),
	    LOG_UINT("channel", ch->id));
	ch->c->a->stats.refused++;
	amqpd_chan_close(ch, 540, "NOT_IMPLEMENTED - basic.get is not supported by sagad's "
	    "AMQP front door; use basic.consume (with basic.qos prefetch_count 1 for one at a time)",
	    AMQP_BASIC_GET_METHOD);
}

int
amqpd_consume_method(struct amqpd_chan *ch, amqp_method_number_t id, void *m)
{
	const amqp_basic_ack_t *ack = m;
	const amqp_basic_nack_t *nack = m;
	const amqp_basic_reject_t *rej = m;

	switch (id) {
	case AMQP_BASIC_CONSUME_METHOD:
		amqpd_consume(ch, m);
		return 1;
	case AMQP_BASIC_CANCEL_METHOD:
		amqpd_cancel(ch, m);
		return 1;
	case AMQP_BASIC_ACK_METHOD:
		amqpd_verdict(ch, id, ack->delivery_tag, ack->multiple, TAKE_ACK, NULL);
		return 1;
	case AMQP_BASIC_NACK_METHOD:
		amqpd_verdict(ch, id, nack->delivery_tag, nack->multiple,
		    nack->requeue ? TAKE_REQUEUE : TAKE_REJECT, nack->requeue ?
		    "nacked by the consumer (requeue)" : "nacked by the consumer");
		return 1;
	case AMQP_BASIC_REJECT_METHOD:
		amqpd_verdict(ch, id, rej->delivery_tag, 0,
		    rej->requeue ? TAKE_REQUEUE : TAKE_REJECT, rej->requeue ?
		    "rejected by the consumer (requeue)" : "rejected by the consumer");
		return 1;
	case AMQP_BASIC_RECOVER_METHOD:
	case AMQP_BASIC_RECOVER_ASYNC_METHOD:
		amqpd_recover(ch, id);
		return 1;
	case AMQP_BASIC_GET_METHOD:
		amqpd_get_refused(ch);
		return 1;
	default:
		return 0;
	}
}

/* sagad declares a front-door subscription's queue itself (type, dead
 * letters); the client's declare of it, whatever its arguments, only
 * checks that it is there, as a passive one: the counts come back, and no
 * 406 for arguments that differ from sagad's. */
void
amqpd_consume_declare(struct amqpd_chan *ch, amqp_method_number_t id, void *m)
{
	amqp_queue_declare_t *q = m;
	char *queue;

	if (id != AMQP_QUEUE_DECLARE_METHOD || q->passive)
		return;
	queue = amqpd_cstr(q->queue);
	if (queue && *queue && delivery_frontdoor_sub(amqpd_delivery(ch), queue) >= 0) {
		q->passive = 1;
		q->durable = 1;
		q->exclusive = 0;
		q->auto_delete = 0;
		q->arguments = amqp_empty_table;
	}
	free(queue);
}

/* Flow on again, or more room: the consumers' subscriptions dispatch. */
void
amqpd_consume_flow(struct amqpd_chan *ch, int active)
{
	struct amqpd_consumer *k;

	ch->flow_off = !active;
	if (!active)
		return;
	for (k = ch->consumers; k; k = k->next)
		if (!k->sink.detached)
			delivery_sink_kick(amqpd_delivery(ch), k->sink.sub);
}

/* The channel goes (closed, or its connection): its unacked deliveries go
 * back, flagged redelivered; its consumers are detached and freed once
 * nothing they were handed is in flight. */
void
amqpd_consume_chan_gone(struct amqpd_chan *ch)
{
	struct amqpd_consumer *k;

	if (!ch->c->a) {
		/* sagad stops (amqpd_free, after the delivery is gone): what
		 * was unacked stays in flight in the store and is delivered
		 * again, redelivered, at the next start. */
		free(ch->unacked);
		while ((k = ch->consumers) != NULL) {
			ch->consumers = k->next;
			free(k->tag);
			free(k->queue);
			free(k);
		}
		return;
	}
	while (ch->nunacked)
		amqpd_settle_at(ch, 0, TAKE_RETURNED, NULL);
	free(ch->unacked);
	ch->unacked = NULL;
	ch->capunacked = 0;
	while ((k = ch->consumers) != NULL) {
		ch->consumers = k->next;
		k->ch = NULL;
		if (!k->sink.detached) {
			ch->c->a->stats.consumers--;
			delivery_detach(amqpd_delivery(ch), &k->sink);
		}
	}
}
