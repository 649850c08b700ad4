/*
 * The broker link, its connection: connect (TCP or TLS), log in, declare
 * the topology, read frames, and tear down on any error, then reconnect
 * with backoff. Broker thread only; rabbitmq-c blocks, with bounded
 * timeouts (ARCHITECTURE.md: rabbitmq-c: blocking).
 */
#include "broker_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "util.h"
#include "xmalloc.h"


/* ---- frames ---- */

int
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

/*
 * A channel whose publishes the broker only nacks does not recover by
 * itself (seen with RabbitMQ 3.10 quorum queues when the channel's first
 * publish raced a leader election after a node was lost): after
 * BROKER_NACK_RESET seconds of nacks with no ack in between, start again on
 * a fresh connection, on the next node. The nacked messages are retried by
 * the outbox as usual.
 */
#define BROKER_NACK_RESET 5.0

static void
broker_nack_watch(struct broker *b, int ack)
{
	double now;

	if (ack) {
		b->nacking_since = 0;
		return;
	}
	now = util_mono();
	if (b->nacking_since == 0) {
		b->nacking_since = now;
		return;
	}
	if (now - b->nacking_since >= BROKER_NACK_RESET)
		broker_fail(b, "every publish nacked for 5 s: reconnecting", 1);
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
		broker_nack_watch(b, 1);
		break;
	}
	case AMQP_BASIC_NACK_METHOD: {
		amqp_basic_nack_t *n = m->decoded;
		broker_confirm(b, n->delivery_tag, n->multiple, 0);
		broker_nack_watch(b, 0);
		break;
	}
	case AMQP_BASIC_RETURN_METHOD:
		b->rx = BROKER_RX_RETURN_HEADER;
		break;
	case AMQP_BASIC_DELIVER_METHOD:
		broker_delivery_start(b, f->channel, m->decoded);
		break;
	case AMQP_BASIC_CANCEL_METHOD: {
		/* The broker cancelled a consumer (queue deleted, node down):
		 * start again on a fresh connection, which re-declares. */
		broker_fail(b, "broker cancelled a consumer", 1);
		break;
	}
	case AMQP_CONNECTION_BLOCKED_METHOD:
		broker_blocked(b, m->decoded);
		break;
	case AMQP_CONNECTION_UNBLOCKED_METHOD:
		broker_unblocked(b);
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
		if (b->rx == BROKER_RX_RETURN_HEADER)
			broker_return_header(b, f->payload.properties.decoded,
			    f->payload.properties.body_size);
		break;
	case AMQP_FRAME_BODY:
		if (b->rx == BROKER_RX_DELIVER_BODY) {
			broker_delivery_body(b, &f->payload.body_fragment);
			break;
		}
		if (b->rx == BROKER_RX_RETURN_BODY)
			broker_return_body(b, &f->payload.body_fragment);
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
int
broker_drain(struct broker *b)
{
	struct timeval zero = { 0, 0 };
	amqp_frame_t f;
	int rc;

	while (b->state == BROKER_ST_UP) {
		rc = amqp_simple_wait_frame_noblock(b->conn, &f, &zero);
		if (rc == AMQP_STATUS_TIMEOUT)
			break;
		if (rc != AMQP_STATUS_OK)
			return broker_fail_status(b, "read", rc);
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

/* ---- connection life ---- */

/* After a loss or a failed attempt, the next attempt goes to the next node
 * of broker.url (round robin; a one-node list stays where it is). */
static void
broker_next_node(struct broker *b)
{
	const struct broker_node *from = &b->nodes[b->node];

	__atomic_store_n(&b->node_up, -1, __ATOMIC_RELEASE);
	if (b->n_nodes < 2)
		return;
	b->node = (b->node + 1) % b->n_nodes;
	log_info("broker moving to the next node", LOG_STR("role", broker_role_name(b)),
	    LOG_STR("from_host", from->host), LOG_INT("from_port", from->port),
	    LOG_STR("to_host", b->nodes[b->node].host), LOG_INT("to_port", b->nodes[b->node].port));
}

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
	tv = util_timeval(d);

	log_info("broker reconnect scheduled", LOG_DBL("in_seconds", d), LOG_UINT("attempt", b->failures));
	evtimer_add(b->retry_ev, &tv);
}

/*
 * Tear the connection down. After a socket error, a heartbeat timeout or a
 * close from the peer, a graceful close can hang on a dead peer: skip it,
 * remove the fd event first, then destroy (ARCHITECTURE.md: rabbitmq-c: close
 * hangs).
 */
void
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
		log_warn("broker connection lost", LOG_STR("role", broker_role_name(b)),
		    LOG_STR("reason", why));
		broker_post(b, BROKER_EV_DOWN, 0, 0, why);
		broker_next_node(b);
		broker_schedule_retry(b);
	} else
		__atomic_store_n(&b->node_up, -1, __ATOMIC_RELEASE);
}

/* A library call failed with status rc: the connection is gone (no
 * graceful close, it could hang). Returns -1 for the caller to pass on. */
int
broker_fail_status(struct broker *b, const char *what, int rc)
{
	char why[160];

	snprintf(why, sizeof why, "%s: %s", what, amqp_error_string2(rc));
	broker_fail(b, why, 0);
	return -1;
}

/* Table entries, as the client properties and the queue arguments need
 * them; the strings are borrowed, not copied. */
static void
broker_entry_bool(amqp_table_entry_t *e, const char *key, int v)
{
	e->key = amqp_cstring_bytes(key);
	e->value.kind = AMQP_FIELD_KIND_BOOLEAN;
	e->value.value.boolean = v;
}

static void
broker_entry_str(amqp_table_entry_t *e, const char *key, const char *v)
{
	e->key = amqp_cstring_bytes(key);
	e->value.kind = AMQP_FIELD_KIND_UTF8;
	e->value.value.bytes = amqp_cstring_bytes(v);
}

static amqp_table_t
broker_client_props(struct broker *b, amqp_table_entry_t *e, amqp_table_entry_t *caps)
{
	amqp_table_t t;

	/* Ask to be told about resource alarms instead of meeting them as TCP
	 * back-pressure inside amqp_basic_publish (ARCHITECTURE.md: rabbitmq-c:
	 * connection.blocked). */
	broker_entry_bool(&caps[0], "connection.blocked", 1);
	broker_entry_bool(&caps[1], "publisher_confirms", 1);
	broker_entry_bool(&caps[2], "consumer_cancel_notify", 1);
	e[0].key = amqp_cstring_bytes("capabilities");
	e[0].value.kind = AMQP_FIELD_KIND_TABLE;
	e[0].value.value.table.num_entries = 3;
	e[0].value.value.table.entries = caps;
	broker_entry_str(&e[1], "connection_name", b->conn_name);
	broker_entry_str(&e[2], "product", "sagad");
	broker_entry_str(&e[3], "version", PACKAGE_VERSION);
	t.num_entries = 4;
	t.entries = e;
	return t;
}

static amqp_socket_t *
broker_socket(struct broker *b, char *why, size_t whylen)
{
	return broker_url_socket(b->conn, &b->nodes[b->node], b->tls_verify, b->tls_ca,
	    b->tls_cert, b->tls_key, why, whylen);
}

static void
broker_queue_args(struct broker_sub *s, const char *dlq, amqp_table_entry_t *e,
    amqp_table_t *t)
{
	t->num_entries = 0;
	t->entries = e;
	broker_entry_str(&e[t->num_entries++], "x-queue-type", s->queue_type);
	if (!dlq)
		return;
	if (s->single_active)
		/* Saga state lives in one sagad's store: replicas of the
		 * orchestrator stand by instead of splitting the replies. */
		broker_entry_bool(&e[t->num_entries++], "x-single-active-consumer", 1);
	/* Dead-lettering through the default exchange straight to <queue>.dlq
	 * works on quorum and classic queues alike; sagad uses it for what it
	 * cannot even store (too large) — everything else it dead-letters
	 * itself, with reason headers. */
	broker_entry_str(&e[t->num_entries++], "x-dead-letter-exchange", "");
	broker_entry_str(&e[t->num_entries++], "x-dead-letter-routing-key", dlq);
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
	const struct broker_node *n = &b->nodes[b->node];
	struct timeval ct = util_timeval(b->connect_timeout);
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
	rc = amqp_socket_open_noblock(s, n->host, n->port, &ct);
	if (rc != AMQP_STATUS_OK) {
		snprintf(why, whylen, "connect %s:%d: %s", n->host, n->port, amqp_error_string2(rc));
		return -1;
	}
	client = broker_client_props(b, props, caps);
	r = amqp_login_with_properties(b->conn, n->vhost, 0, 131072, b->heartbeat,
	    &client, AMQP_SASL_METHOD_PLAIN, n->user, n->password);
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

void
broker_connect_cb(evutil_socket_t fd, short what, void *arg)
{
	struct broker *b = arg;
	const struct broker_node *n = &b->nodes[b->node];
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
		log_warn("broker connect failed", LOG_STR("host", n->host), LOG_INT("port", n->port),
		    LOG_STR("reason", why));
		broker_post(b, BROKER_EV_DOWN, 0, 0, why);
		broker_post_flush(b);
		broker_next_node(b);
		broker_schedule_retry(b);
		return;
	}
	b->connected_at = util_mono();
	b->nacking_since = 0;
	__atomic_store_n(&b->node_up, (int)b->node, __ATOMIC_RELEASE);
	b->epoch++;
	b->next_tag = 1;	/* confirm sequence numbers restart per channel */
	b->head_tag = 1;
	b->read_ev = event_new(b->base, amqp_get_sockfd(b->conn), EV_READ | EV_PERSIST,
	    broker_read_cb, b);
	event_add(b->read_ev, NULL);
	hb = util_timeval(b->heartbeat > 0 ? b->heartbeat / 2.0 : 1.0);
	evtimer_add(b->hb_ev, &hb);
	log_info("broker connected", LOG_STR("role", broker_role_name(b)),
	    LOG_STR("host", n->host), LOG_INT("port", n->port), LOG_STR("vhost", n->vhost),
	    LOG_UINT("exchanges", b->n_exchanges), LOG_UINT("queues", b->n_subs),
	    LOG_UINT("epoch", b->epoch));
	broker_post(b, BROKER_EV_UP, 0, 0, NULL);
	broker_drain(b);
	broker_turn(b);
}
