/*
 * The AMQP front door's connections: the listener, the handshake
 * (connection.start / start-ok with PLAIN / tune / tune-ok / open), the
 * frame loop, heartbeats both ways and the close handshakes. Channels and
 * publishing are amqpd_chan.c's. Frames are read by amqp_frame.c; methods
 * are encoded and decoded by rabbitmq-c's codec (amqp_framing.h).
 */
#include "amqpd.h"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include "amqpd_int.h"
#include "broker.h"
#include "conf.h"
#include "httpd.h"
#include "log.h"
#include "metrics.h"
#include "sagad.h"
#include "util.h"
#include "xmalloc.h"

/* What we propose at tune; the client's lower values are honoured. */
#define AMQPD_FRAME_MAX 131072
#define AMQPD_CHANNEL_MAX 2047
#define AMQPD_HEARTBEAT 60
/* A client that has not opened its connection by then is dropped, and so
 * is one that does not answer our connection.close. */
#define AMQPD_HANDSHAKE_TIMEOUT 10.0
#define AMQPD_CLOSE_TIMEOUT 5.0

static void amqpd_conn_drop(struct amqpd_conn *c);

/* ---- output ---- */

void
amqpd_send_method(struct amqpd_conn *c, uint16_t channel, amqp_method_number_t id,
    void *decoded)
{
	uint8_t buf[8192];
	amqp_bytes_t args = { sizeof buf - 12, buf + 11 };
	int n;

	if (c->state == AMQPD_DEAD)
		return;
	n = amqp_encode_method(id, decoded, args);
	if (n < 0) {
		/* Only our own methods come here, all far below 8 KiB. */
		log_error("amqp: cannot encode a method", LOG_STR("method", amqp_method_name(id)),
		    LOG_STR("peer", c->peer));
		return;
	}
	amqpf_put_header(buf, AMQPF_METHOD, channel, (uint32_t)n + 4);
	buf[7] = (uint8_t)(id >> 24);
	buf[8] = (uint8_t)(id >> 16);
	buf[9] = (uint8_t)(id >> 8);
	buf[10] = (uint8_t)id;
	buf[11 + n] = AMQPF_FRAME_END;
	bufferevent_write(c->bev, buf, (size_t)n + 12);
}

/* The content header (class basic, the body's size, the properties by
 * rabbitmq-c's codec) and the body cut to frame_max. */
void
amqpd_send_content(struct amqpd_conn *c, uint16_t channel, const struct msg *m)
{
	amqp_basic_properties_t p;
	amqp_table_entry_t local[64], *ents;
	uint8_t *buf;
	size_t cap = c->frame_max, off, n;
	int len;

	if (c->state == AMQPD_DEAD)
		return;
	buf = xmalloc(cap);
	ents = broker_msg_props(m, &p, local, sizeof local / sizeof local[0]);
	len = amqp_encode_properties(AMQP_BASIC_CLASS, &p, (amqp_bytes_t){ cap - 20, buf + 19 });
	if (ents != local)
		free(ents);
	if (len < 0) {
		/* The headers came in one frame of the broker's, whose
		 * frame_max sagad chose: they fit ours but for a client that
		 * tuned below it. Close rather than send a message without
		 * its properties. */
		free(buf);
		amqpd_conn_close(c, AMQPF_FRAME_ERROR,
		    "FRAME_ERROR - a message's properties do not fit the frame_max tuned", 0);
		return;
	}
	amqpf_put_header(buf, AMQPF_HEADER, channel, (uint32_t)len + 12);
	buf[7] = 0; buf[8] = AMQP_BASIC_CLASS;	/* class, weight 0 */
	buf[9] = 0; buf[10] = 0;
	for (n = 0; n < 8; n++)
		buf[11 + n] = (uint8_t)((uint64_t)m->body_len >> (56 - 8 * n));
	buf[19 + len] = AMQPF_FRAME_END;
	bufferevent_write(c->bev, buf, (size_t)len + 20);
	for (off = 0; off < m->body_len; off += n) {
		n = m->body_len - off < cap - 8 ? m->body_len - off : cap - 8;
		amqpf_put_header(buf, AMQPF_BODY, channel, (uint32_t)n);
		bufferevent_write(c->bev, buf, 7);
		bufferevent_write(c->bev, m->body + off, n);
		buf[0] = AMQPF_FRAME_END;
		bufferevent_write(c->bev, buf, 1);
	}
	free(buf);
}

static void
amqpd_send_heartbeat(struct amqpd_conn *c)
{
	uint8_t buf[8];

	amqpf_put_header(buf, AMQPF_HEARTBEAT, 0, 0);
	buf[7] = AMQPF_FRAME_END;
	bufferevent_write(c->bev, buf, sizeof buf);
	c->last_hb_tx = util_mono();
}

/* ---- state changes ---- */

static amqp_table_entry_t *
amqpd_entry(amqp_table_entry_t *e, const char *key, amqp_field_value_t v)
{
	e->key = amqp_cstring_bytes(key);
	e->value = v;
	return e + 1;
}

/* HEADER -> START_SENT: the client spoke AMQP 0-9-1; we offer PLAIN, and
 * the capabilities pika and the others look for before confirm.select. */
static void
amqpd_conn_started(struct amqpd_conn *c)
{
	amqp_table_entry_t caps[4], props[4], *e;
	amqp_field_value_t t = { .kind = AMQP_FIELD_KIND_BOOLEAN, .value.boolean = 1 };
	amqp_field_value_t s = { .kind = AMQP_FIELD_KIND_UTF8 }, tab = { .kind = AMQP_FIELD_KIND_TABLE };
	amqp_connection_start_t m;

	e = amqpd_entry(caps, "publisher_confirms", t);
	e = amqpd_entry(e, "basic.nack", t);
	e = amqpd_entry(e, "authentication_failure_close", t);
	e = amqpd_entry(e, "connection.blocked", (amqp_field_value_t){ .kind = AMQP_FIELD_KIND_BOOLEAN });
	tab.value.table.num_entries = (int)(e - caps);
	tab.value.table.entries = caps;
	s.value.bytes = amqp_cstring_bytes("sagad");
	e = amqpd_entry(props, "product", s);
	s.value.bytes = amqp_cstring_bytes(PACKAGE_VERSION);
	e = amqpd_entry(e, "version", s);
	s.value.bytes = amqp_cstring_bytes("sagad's AMQP front door: publishing into its outbox");
	e = amqpd_entry(e, "information", s);
	e = amqpd_entry(e, "capabilities", tab);
	memset(&m, 0, sizeof m);
	m.version_major = 0;
	m.version_minor = 9;
	m.server_properties.num_entries = (int)(e - props);
	m.server_properties.entries = props;
	m.mechanisms = amqp_cstring_bytes("PLAIN");
	m.locales = amqp_cstring_bytes("en_US");
	amqpd_send_method(c, 0, AMQP_CONNECTION_START_METHOD, &m);
	c->state = AMQPD_START_SENT;
}

/*
 * PLAIN's response is [authzid] NUL user NUL password. The password is
 * sagad's api token; without a token the HTTP API is open to whoever
 * reaches it, and so is this listener (the same rule, sagad(8)).
 */
static int
amqpd_auth_ok(const struct amqpd_conn *c, const amqp_connection_start_ok_t *m)
{
	const char *token = c->a->d->conf->api.token;
	const char *r = m->response.bytes, *nul1, *nul2;
	size_t len = m->response.len;
	char *pass;
	int ok;

	if (m->mechanism.len != 5 || memcmp(m->mechanism.bytes, "PLAIN", 5) != 0)
		return 0;
	if (!token)
		return 1;
	if (!r || !(nul1 = memchr(r, '\0', len)) ||
	    !(nul2 = memchr(nul1 + 1, '\0', len - (size_t)(nul1 + 1 - r))))
		return 0;
	pass = xmalloc(len - (size_t)(nul2 + 1 - r) + 1);
	memcpy(pass, nul2 + 1, len - (size_t)(nul2 + 1 - r));
	pass[len - (size_t)(nul2 + 1 - r)] = '\0';
	ok = util_ct_equal(pass, token);
	free(pass);
	return ok;
}

/* START_SENT -> TUNE_SENT: credentials good, our limits proposed. */
static void
amqpd_conn_tuned(struct amqpd_conn *c, amqp_connection_start_ok_t *m)
{
	amqp_connection_tune_t t = { AMQPD_CHANNEL_MAX, AMQPD_FRAME_MAX, AMQPD_HEARTBEAT };

	if (!amqpd_auth_ok(c, m)) {
		c->a->stats.auth_failures++;
		log_warn("amqp: login refused", LOG_STR("peer", c->peer));
		amqpd_conn_close(c, AMQPF_ACCESS_REFUSED,
		    "ACCESS_REFUSED - PLAIN login with the api token as the password required",
		    AMQP_CONNECTION_START_OK_METHOD);
		return;
	}
	amqpd_send_method(c, 0, AMQP_CONNECTION_TUNE_METHOD, &t);
	c->state = AMQPD_TUNE_SENT;
}

/* TUNE_SENT -> TUNED: the client's choice within ours (0: no limit). */
static void
amqpd_conn_tune_ok(struct amqpd_conn *c, const amqp_connection_tune_ok_t *m)
{
	if (m->frame_max != 0 && m->frame_max < AMQPF_FRAME_MIN) {
		amqpd_conn_close(c, AMQPF_NOT_ALLOWED, "NOT_ALLOWED - frame_max below 4096",
		    AMQP_CONNECTION_TUNE_OK_METHOD);
		return;
	}
	c->frame_max = m->frame_max && m->frame_max < AMQPD_FRAME_MAX ? m->frame_max :
	    AMQPD_FRAME_MAX;
	c->channel_max = m->channel_max && m->channel_max < AMQPD_CHANNEL_MAX ? m->channel_max :
	    AMQPD_CHANNEL_MAX;
	c->heartbeat = m->heartbeat;
	c->chans = xcalloc((size_t)c->channel_max + 1, sizeof *c->chans);
	c->state = AMQPD_TUNED;
}

/* TUNED -> OPEN. The virtual host is not ours to choose: sagad publishes
 * on broker.url's (sagad(8)). */
static void
amqpd_conn_opened(struct amqpd_conn *c)
{
	amqp_connection_open_ok_t ok = { amqp_empty_bytes };

	amqpd_send_method(c, 0, AMQP_CONNECTION_OPEN_OK_METHOD, &ok);
	c->state = AMQPD_OPEN;
	log_debug("amqp: connection open", LOG_STR("peer", c->peer),
	    LOG_UINT("frame_max", c->frame_max), LOG_UINT("heartbeat", c->heartbeat));
}

/* Any state -> CLOSING: our connection.close, answered by close-ok or
 * dropped after AMQPD_CLOSE_TIMEOUT. */
void
amqpd_conn_close(struct amqpd_conn *c, int code, const char *text, uint32_t method)
{
	amqp_connection_close_t m;

	if (c->state == AMQPD_CLOSING || c->state == AMQPD_DEAD)
		return;
	if (code != AMQPF_REPLY_SUCCESS && code != AMQPF_ACCESS_REFUSED)
		log_warn("amqp: closing a connection", LOG_STR("peer", c->peer),
		    LOG_INT("code", code), LOG_STR("reason", text));
	m.reply_code = (uint16_t)code;
	m.reply_text = amqp_cstring_bytes(text);
	m.class_id = (uint16_t)(method >> 16);
	m.method_id = (uint16_t)method;
	amqpd_send_method(c, 0, AMQP_CONNECTION_CLOSE_METHOD, &m);
	c->state = AMQPD_CLOSING;
	c->deadline = util_mono() + AMQPD_CLOSE_TIMEOUT;
}

/* The client's connection.close: close-ok, then go once it is written. */
static void
amqpd_conn_closed_by_peer(struct amqpd_conn *c)
{
	amqp_connection_close_ok_t ok = { 0 };

	amqpd_send_method(c, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
	c->flush_then_drop = 1;
}

static void
amqpd_tell_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	amqpd_chan_tell_all(arg);
}

/*
 * One group commit settles many publishes, each by its own store
 * callback: telling the client once they all ran (this event is at the
 * default priority, the store's callbacks at 0) lets one basic.ack with
 * multiple cover them.
 */
void
amqpd_conn_tell_soon(struct amqpd_conn *c)
{
	if (c->state != AMQPD_DEAD)
		event_active(c->tell_ev, 0, 0);
}

/* The struct goes when nothing names it any more. */
static void
amqpd_conn_release(struct amqpd_conn *c)
{
	if (c->refs || c->state != AMQPD_DEAD)
		return;
	empty_amqp_pool(&c->pool);
	free(c);
}

void
amqpd_conn_unref(struct amqpd_conn *c)
{
	c->refs--;
	amqpd_conn_release(c);
}

/* Any state -> DEAD: the socket and the channels go; a publish not yet
 * confirmed stays in the store (it was put) but is told to nobody. */
static void
amqpd_conn_drop(struct amqpd_conn *c)
{
	unsigned i;

	if (c->state == AMQPD_DEAD)
		return;
	if (c->chans)
		for (i = 0; i <= c->channel_max; i++)
			if (c->chans[i])
				amqpd_chan_free(c->chans[i]);
	free(c->chans);
	c->chans = NULL;
	bufferevent_free(c->bev);
	event_free(c->tick_ev);
	event_free(c->tell_ev);
	if (c->a) {
		c->a->stats.connections--;
		if (c->prev)
			c->prev->next = c->next;
		else
			c->a->conns = c->next;
		if (c->next)
			c->next->prev = c->prev;
	}
	c->state = AMQPD_DEAD;
	amqpd_conn_release(c);
}

/* ---- input ---- */

/* A method on channel 0, by state. */
static void
amqpd_conn_method(struct amqpd_conn *c, amqp_method_number_t id, void *m)
{
	if (c->state == AMQPD_START_SENT && id == AMQP_CONNECTION_START_OK_METHOD)
		amqpd_conn_tuned(c, m);
	else if (c->state == AMQPD_TUNE_SENT && id == AMQP_CONNECTION_TUNE_OK_METHOD)
		amqpd_conn_tune_ok(c, m);
	else if (c->state == AMQPD_TUNED && id == AMQP_CONNECTION_OPEN_METHOD)
		amqpd_conn_opened(c);
	else if (id == AMQP_CONNECTION_CLOSE_METHOD)
		amqpd_conn_closed_by_peer(c);
	else if (id == AMQP_CONNECTION_CLOSE_OK_METHOD)
		amqpd_conn_drop(c);
	else if (c->state != AMQPD_CLOSING)	/* CLOSING: the rest is dropped until close-ok */
		amqpd_conn_close(c, AMQPF_COMMAND_INVALID,
		    "COMMAND_INVALID - unexpected method on channel 0", id);
}

/* A frame on channel 0 (the connection's own). */
static void
amqpd_conn_frame(struct amqpd_conn *c, const struct amqpf_frame *f)
{
	struct amqpf_error err;
	const uint8_t *args;
	size_t alen;
	uint32_t id;
	void *m;

	if (f->type == AMQPF_HEARTBEAT)
		return;		/* last_rx is already set */
	if (f->type != AMQPF_METHOD) {
		if (c->state != AMQPD_CLOSING)
			amqpd_conn_close(c, AMQPF_UNEXPECTED_FRAME,
			    "UNEXPECTED_FRAME - content on channel 0", 0);
		return;
	}
	if (amqpf_method(f, &id, &args, &alen, &err) < 0) {
		amqpd_conn_close(c, err.code, err.why, 0);
		return;
	}
	if (amqp_decode_method(id, &c->pool, (amqp_bytes_t){ alen, (void *)args }, &m) < 0) {
		amqpd_conn_close(c, AMQPF_SYNTAX_ERROR,
		    "SYNTAX_ERROR - cannot decode the method", id);
		return;
	}
	amqpd_conn_method(c, id, m);
}

/* Frames on other channels exist only once the connection is open. */
static void
amqpd_frame(struct amqpd_conn *c, const struct amqpf_frame *f)
{
	if (f->channel == 0)
		amqpd_conn_frame(c, f);
	else if (c->state == AMQPD_OPEN || c->state == AMQPD_CLOSING)
		amqpd_chan_frame(c, f);
	else
		amqpd_conn_close(c, AMQPF_CHANNEL_ERROR,
		    "CHANNEL_ERROR - the connection is not open yet", 0);
	recycle_amqp_pool(&c->pool);
}

/* The protocol header; a wrong one gets ours and the door (the spec's
 * answer, which tells the client the version we speak). */
static int
amqpd_read_header(struct amqpd_conn *c, struct evbuffer *in)
{
	size_t len = evbuffer_get_length(in);
	const uint8_t *p = evbuffer_pullup(in, len < AMQPF_HEADER_LEN ? (ssize_t)len :
	    AMQPF_HEADER_LEN);

	switch (amqpf_protocol(p, len)) {
	case AMQPF_MORE:
		return 0;
	case AMQPF_ERROR:
		log_info("amqp: not an AMQP 0-9-1 client", LOG_STR("peer", c->peer));
		bufferevent_write(c->bev, AMQPF_PROTOCOL_HEADER, AMQPF_HEADER_LEN);
		c->flush_then_drop = 1;
		return 0;
	case AMQPF_OK:
		break;
	}
	evbuffer_drain(in, AMQPF_HEADER_LEN);
	amqpd_conn_started(c);
	return 1;
}

/* One frame from in; 0 when there is none yet or reading must stop. */
static int
amqpd_read_frame(struct amqpd_conn *c, struct evbuffer *in)
{
	size_t len = evbuffer_get_length(in), used = 0;
	uint32_t max = c->state >= AMQPD_TUNED ? c->frame_max : AMQPF_FRAME_MIN;
	struct amqpf_frame f;
	struct amqpf_error err;
	const uint8_t *p = evbuffer_pullup(in, (ssize_t)(len < max ? len : max));

	switch (amqpf_read(p, len < max ? len : max, max, &f, &used, &err)) {
	case AMQPF_MORE:
		return 0;
	case AMQPF_ERROR:
		evbuffer_drain(in, len);
		if (c->state == AMQPD_CLOSING)
			amqpd_conn_drop(c);
		else
			amqpd_conn_close(c, err.code, err.why, 0);
		return 0;
	case AMQPF_OK:
		break;
	}
	amqpd_frame(c, &f);
	if (c->state != AMQPD_DEAD)
		evbuffer_drain(in, used);
	return c->state != AMQPD_DEAD && !c->flush_then_drop;
}

static void
amqpd_flushed_cb(struct bufferevent *bev, void *arg)
{
	struct amqpd_conn *c = arg;

	(void)bev;
	if (c->flush_then_drop)
		amqpd_conn_drop(c);
}

/* After a turn of input: go now if asked to once written. */
static void
amqpd_maybe_flushed(struct amqpd_conn *c)
{
	if (c->state == AMQPD_DEAD || !c->flush_then_drop)
		return;
	bufferevent_disable(c->bev, EV_READ);
	if (evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
		amqpd_conn_drop(c);
}

/* The frames in the input buffer, until one starts a topology call: the
 * frames behind it wait for its answer (amqpd_conn_resume), since a
 * channel's methods are ordered and the connection's reader is one. */
static void
amqpd_conn_input(struct amqpd_conn *c)
{
	struct evbuffer *in = bufferevent_get_input(c->bev);

	c->refs++;		/* a drop inside must not free c under us */
	if (c->state != AMQPD_HEADER || amqpd_read_header(c, in))
		while (c->state != AMQPD_DEAD && !c->flush_then_drop && !c->paused &&
		    amqpd_read_frame(c, in))
			;
	amqpd_maybe_flushed(c);
	amqpd_conn_unref(c);
}

void
amqpd_conn_resume(struct amqpd_conn *c)
{
	c->paused = 0;
	if (c->state != AMQPD_DEAD)
		amqpd_conn_input(c);
}

static void
amqpd_read_cb(struct bufferevent *bev, void *arg)
{
	struct amqpd_conn *c = arg;

	(void)bev;
	/* Bytes count as life even while paused: a client waiting for a
	 * topology answer keeps sending heartbeats, read or not. */
	c->last_rx = util_mono();
	amqpd_conn_input(c);
}

static void
amqpd_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct amqpd_conn *c = arg;

	(void)bev;
	if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR)) {
		log_debug("amqp: connection gone", LOG_STR("peer", c->peer));
		amqpd_conn_drop(c);
	}
}

/* Once a second: our heartbeats (at half the interval, as RabbitMQ), the
 * client's (dropped after two silent intervals), and the deadlines. */
static void
amqpd_tick_cb(evutil_socket_t fd, short what, void *arg)
{
	struct amqpd_conn *c = arg;
	double now = util_mono();

	(void)fd;
	(void)what;
	/* Without a heartbeat (0 at tune) nothing else would end a client
	 * that stops half-way through the handshake or the close. */
	if ((c->state < AMQPD_OPEN || c->state == AMQPD_CLOSING) && now > c->deadline) {
		log_info("amqp: dropping a connection past its deadline",
		    LOG_STR("peer", c->peer), LOG_STR("in", c->state == AMQPD_CLOSING ?
		    "close" : "handshake"));
		amqpd_conn_drop(c);
		return;
	}
	if (c->state < AMQPD_TUNED || c->state == AMQPD_CLOSING || !c->heartbeat)
		return;
	if (now - c->last_rx > 2.0 * c->heartbeat) {
		log_warn("amqp: client missed two heartbeats, dropping it", LOG_STR("peer", c->peer));
		amqpd_conn_drop(c);
		return;
	}
	if (now - c->last_hb_tx >= c->heartbeat / 2.0)
		amqpd_send_heartbeat(c);
}

static void
amqpd_peer_name(struct sockaddr *sa, char *out, size_t len)
{
	char host[INET6_ADDRSTRLEN];

	if (sa->sa_family == AF_UNIX ||
	    evutil_inet_ntop(sa->sa_family, sa->sa_family == AF_INET ?
	    (void *)&((struct sockaddr_in *)sa)->sin_addr :
	    (void *)&((struct sockaddr_in6 *)sa)->sin6_addr, host, sizeof host) == NULL)
		snprintf(out, len, "unix");
	else
		snprintf(out, len, "%s:%u", host, ntohs(sa->sa_family == AF_INET ?
		    ((struct sockaddr_in *)sa)->sin_port : ((struct sockaddr_in6 *)sa)->sin6_port));
}

/* Confirms are small writes, often two in a row (the end of a burst, a
 * multiple ack then a single one): with Nagle's algorithm the second waits
 * for the client's TCP ack of the first, which a client with nothing more
 * to send delays by up to 40 ms. The broker's own listener sets this too. */
static void
amqpd_nodelay(evutil_socket_t fd)
{
	int one = 1;

	if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0)
		log_debug("amqp: TCP_NODELAY not set", LOG_INT("fd", fd));
}

static void
amqpd_accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa,
    int salen, void *arg)
{
	struct amqpd *a = arg;
	struct amqpd_conn *c = xcalloc(1, sizeof *c);
	struct timeval sec = { 1, 0 };

	(void)l;
	(void)salen;
	amqpd_nodelay(fd);
	c->a = a;
	c->state = AMQPD_HEADER;
	c->frame_max = AMQPF_FRAME_MIN;
	c->last_rx = util_mono();
	c->deadline = c->last_rx + AMQPD_HANDSHAKE_TIMEOUT;
	amqpd_peer_name(sa, c->peer, sizeof c->peer);
	c->bev = bufferevent_socket_new(a->d->base, fd, BEV_OPT_CLOSE_ON_FREE);
	if (!c->bev) {		/* out of memory in libevent: refuse this one */
		log_warn("amqp: cannot set up a connection", LOG_STR("peer", c->peer));
		evutil_closesocket(fd);
		free(c);
		return;
	}
	init_amqp_pool(&c->pool, 4096);
	bufferevent_setcb(c->bev, amqpd_read_cb, amqpd_flushed_cb, amqpd_event_cb, c);
	bufferevent_enable(c->bev, EV_READ | EV_WRITE);
	c->tick_ev = event_new(a->d->base, -1, EV_PERSIST, amqpd_tick_cb, c);
	event_add(c->tick_ev, &sec);
	c->tell_ev = event_new(a->d->base, -1, 0, amqpd_tell_cb, c);
	c->next = a->conns;
	if (a->conns)
		a->conns->prev = c;
	a->conns = c;
	a->stats.connections++;
	a->stats.accepted++;
	log_debug("amqp: connection accepted", LOG_STR("peer", c->peer));
}

/* ---- the listener ---- */

struct amqpd *
amqpd_new(struct sagad *d, char **err)
{
	struct amqpd *a;
	int fd;

	*err = NULL;
	fd = httpd_bind(d->conf->amqp.listen, d->conf->api.socket_mode, err);
	if (fd < 0)
		return NULL;
	a = xcalloc(1, sizeof *a);
	a->d = d;
	a->listener = evconnlistener_new(d->base, amqpd_accept_cb, a,
	    LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC, -1, fd);
	if (!a->listener) {
		*err = xasprintf("cannot accept on %s", d->conf->amqp.listen);
		close(fd);
		free(a);
		return NULL;
	}
	if (!(a->topo = amqpd_topo_new(d, err))) {
		evconnlistener_free(a->listener);
		free(a);
		return NULL;
	}
	log_info("amqp front door listening", LOG_STR("listen", d->conf->amqp.listen));
	return a;
}

void
amqpd_free(struct amqpd *a)
{
	struct amqpd_conn *c, *next;

	if (!a)
		return;
	evconnlistener_free(a->listener);
	for (c = a->conns; c; c = next) {
		next = c->next;
		/* The store's callbacks still to come must not touch a. */
		c->a = NULL;
		c->prev = c->next = NULL;
		amqpd_conn_drop(c);
	}
	amqpd_topo_free(a->topo);
	amqpd_reply_free_all(a);
	free(a);
}

const struct amqpd_stats *
amqpd_stats(const struct amqpd *a)
{
	return &a->stats;
}

void
amqpd_metrics(const struct amqpd *a, struct evbuffer *out)
{
	static const struct {
		const char *name, *type, *help;
		size_t off;
	} rows[] = {
#define AMQPD_ROW(n, t, h, f) { n, t, h, offsetof(struct amqpd_stats, f) }
		AMQPD_ROW("sagad_amqp_connections", "gauge",
		    "Connections open on the AMQP front door.", connections),
		AMQPD_ROW("sagad_amqp_connections_total", "counter",
		    "Connections accepted by the AMQP front door.", accepted),
		AMQPD_ROW("sagad_amqp_login_failures_total", "counter",
		    "AMQP logins refused (403).", auth_failures),
		AMQPD_ROW("sagad_amqp_published_total", "counter",
		    "Messages published through the AMQP front door and stored (duplicates included).",
		    published),
		AMQPD_ROW("sagad_amqp_duplicates_total", "counter",
		    "AMQP publishes whose message id was already in the outbox.", duplicates),
		AMQPD_ROW("sagad_amqp_acks_total", "counter",
		    "AMQP publishes confirmed to the client (durable in the store).", acked),
		AMQPD_ROW("sagad_amqp_nacks_total", "counter",
		    "AMQP publishes refused with basic.nack (store full or failing).", nacked),
		AMQPD_ROW("sagad_amqp_refused_total", "counter",
		    "AMQP channels closed with 540 NOT_IMPLEMENTED.", refused),
		AMQPD_ROW("sagad_amqp_topology_calls_total", "counter",
		    "Exchange and queue methods passed through to the broker.", forwarded),
		AMQPD_ROW("sagad_amqp_consumers", "gauge",
		    "Consumers (basic.consume) active on the AMQP front door.", consumers),
		AMQPD_ROW("sagad_amqp_delivered_total", "counter",
		    "Messages sent to front-door consumers (basic.deliver).", delivered),
		AMQPD_ROW("sagad_amqp_redelivered_total", "counter",
		    "Front-door deliveries flagged redelivered.", redelivered),
		AMQPD_ROW("sagad_amqp_client_acks_total", "counter",
		    "Front-door deliveries acked by the client (recorded delivered).", client_acks),
		AMQPD_ROW("sagad_amqp_client_requeues_total", "counter",
		    "Front-door deliveries nacked or rejected with requeue (retried).",
		    client_requeues),
		AMQPD_ROW("sagad_amqp_client_rejects_total", "counter",
		    "Front-door deliveries nacked or rejected without requeue (dead-lettered).",
		    client_rejects),
#undef AMQPD_ROW
	};
	size_t i;

	if (!a)
		return;
	for (i = 0; i < sizeof rows / sizeof rows[0]; i++) {
		metrics_family(out, rows[i].name, rows[i].type, rows[i].help);
		metrics_sample(out, rows[i].name, "",
		    (double)*(const uint64_t *)((const char *)&a->stats + rows[i].off));
	}
}
