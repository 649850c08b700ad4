/*
 * What amqpd.c (connections: handshake, frames, heartbeats, close),
 * amqpd_chan.c (channels: open/close/flow, publishing, confirms, the
 * refusals) and amqpd_topo.c (topology passed through to the broker)
 * share. Included by these three files only.
 */
#ifndef SAGAD_AMQPD_INT_H
#define SAGAD_AMQPD_INT_H

#include <stddef.h>
#include <stdint.h>

#include "amqp_frame.h"
#include "amqp_headers.h"
#include "amqpd.h"
#include "msg.h"

struct bufferevent;
struct evconnlistener;
struct event;

struct amqpd {
	struct sagad *d;
	struct evconnlistener *listener;
	struct amqpd_topo *topo;	/* topology pass-through (amqpd_topo.c) */
	struct amqpd_conn *conns;	/* every live connection */
	struct amqpd_stats stats;
	uint64_t ctag_seq;		/* server-named consumer tags */
	struct amqpd_reply *replies;	/* saga commands delivered, awaiting their reply */
	size_t nreplies, capreplies;
};

/*
 * A connection's life (one function per change, amqpd.c):
 * HEADER -> START_SENT (amqpd_conn_started) -> TUNE_SENT (amqpd_conn_tuned)
 * -> TUNED (amqpd_conn_tune_ok) -> OPEN (amqpd_conn_opened); from any state
 * CLOSING (amqpd_conn_close: our connection.close sent, waiting for
 * close-ok) and DEAD (amqpd_conn_drop: socket gone, the struct kept until
 * the store's callbacks that name it have run).
 */
enum amqpd_conn_state {
	AMQPD_HEADER,
	AMQPD_START_SENT,
	AMQPD_TUNE_SENT,
	AMQPD_TUNED,
	AMQPD_OPEN,
	AMQPD_CLOSING,
	AMQPD_DEAD
};

struct amqpd_conn {
	struct amqpd *a;		/* NULL once amqpd_free ran */
	struct amqpd_conn *next, *prev;
	struct bufferevent *bev;
	enum amqpd_conn_state state;
	uint32_t frame_max;		/* whole frames, as tuned */
	uint16_t channel_max;
	uint16_t heartbeat;		/* seconds, 0: none */
	double last_rx, last_hb_tx, deadline;	/* monotonic */
	struct event *tick_ev;		/* heartbeats and deadlines, once a second */
	struct event *tell_ev;		/* confirms settled: tell them (amqpd_chan_tell_all) */
	struct amqpd_chan **chans;	/* [channel_max + 1], after tune-ok */
	uint32_t chan_gen;		/* bumped at each channel.open */
	amqp_pool_t pool;		/* decoded methods and properties, one frame's */
	unsigned refs;			/* store callbacks still to come */
	int flush_then_drop;		/* connection.close-ok sent: go once written */
	int paused;			/* a topology call is in flight: frames wait */
	char peer[64];
};

/* A channel (amqpd_chan.c): OPEN, or a publish waiting for its content
 * header (HEADER) and body (BODY), or a topology call on the broker
 * (TOPO: amqpd_chan_forward -> amqpd_chan_topo_done), or our
 * channel.close sent (CLOSING). */
enum amqpd_chan_state {
	AMQPD_CH_OPEN,
	AMQPD_CH_HEADER,
	AMQPD_CH_BODY,
	AMQPD_CH_TOPO,
	AMQPD_CH_CLOSING
};

struct amqpd_chan {
	struct amqpd_conn *c;
	uint16_t id;
	uint32_t gen;			/* amqpd_wait names the channel by it */
	enum amqpd_chan_state state;
	int confirm;			/* confirm.select received */
	uint64_t next_tag;		/* the last delivery tag given */
	uint64_t told;			/* every tag <= told is acked or nacked */
	uint8_t *outcome;		/* of tags told+1 ...: enum amqpd_outcome */
	size_t noutcome, capoutcome;
	uint16_t prefetch_count;	/* basic.qos: of each new consumer (global: of the channel) */
	uint32_t prefetch_size;
	int qos_global;
	uint16_t chan_prefetch;		/* basic.qos with global: all consumers together */
	int flow_off;			/* channel.flow active=false: no deliveries */
	struct amqpd_consumer *consumers;	/* amqpd_consume.c, cancelled ones too until settled */
	uint64_t deliver_tag;		/* the last basic.deliver's tag */
	struct amqpd_unacked *unacked;	/* by tag */
	size_t nunacked, capunacked;
	struct msg m;			/* the publish being assembled */
	uint64_t body_size;
	size_t body_got;
};

/* What the broker made of a forwarded method (amqpd_topo.c). */
enum amqpd_topo_result {
	AMQPD_TOPO_OK,			/* reply_id, reply: its -ok, encoded */
	AMQPD_TOPO_CHANNEL_ERROR,	/* the broker closed its channel: code, text, method */
	AMQPD_TOPO_CONNECTION_ERROR,	/* the broker closed the connection: code, text, method */
	AMQPD_TOPO_UNREACHABLE		/* no answer (down, timeout, socket): text says why */
};

/*
 * One forwarded method. The main thread sets the first group and queues it
 * (amqpd_topo_call); the topology thread sets the second and hands it back;
 * amqpd_chan_topo_done, on the main thread, tells the client and frees it.
 * The mutex of the queues orders the two.
 */
struct amqpd_topo_call {
	struct amqpd_topo_call *next;
	struct amqpd_conn *c;		/* referenced (c->refs) until done */
	uint16_t channel;
	uint32_t gen;
	amqp_method_number_t id;
	uint8_t *args;			/* the method's arguments, nowait cleared */
	size_t alen;
	int nowait;			/* the client asked for no answer */

	enum amqpd_topo_result result;
	amqp_method_number_t reply_id;
	uint8_t reply[1024];		/* every -ok is far smaller */
	size_t reply_len;
	uint16_t code;
	uint32_t method;
	char text[300];
};

/* amqpd_topo.c, for amqpd.c and amqpd_chan.c */
struct amqpd_topo *amqpd_topo_new(struct sagad *d, char **err);
void amqpd_topo_free(struct amqpd_topo *t);
/* The -ok of a method passed through, 0 for the others. */
amqp_method_number_t amqpd_topo_ok_id(amqp_method_number_t id);
amqp_boolean_t *amqpd_topo_nowait(amqp_method_number_t id, void *m);
void amqpd_topo_call(struct amqpd_topo *t, struct amqpd_topo_call *call);
void amqpd_topo_call_free(struct amqpd_topo_call *call);

/* amqpd_consume.c, for amqpd_chan.c: basic.consume, cancel, ack, nack,
 * reject, recover (1: handled); queue.declare of a front-door
 * subscription's queue made passive; the channel's consumers and unacked
 * deliveries handed back when it goes. */
int amqpd_consume_method(struct amqpd_chan *ch, amqp_method_number_t id, void *m);
void amqpd_consume_declare(struct amqpd_chan *ch, amqp_method_number_t id, void *m);
void amqpd_consume_flow(struct amqpd_chan *ch, int active);
void amqpd_consume_chan_gone(struct amqpd_chan *ch);

/* A saga command delivered through the front door, until its reply
 * (amqpd_reply.c). values: saga, step, kind, traceparent, tracestate. */
#define AMQPD_REPLY_NKEYS 5
struct amqpd_reply {
	char *reply_to;
	char *correlation_id;		/* NULL: the command had none */
	char *message_id;
	char *values[AMQPD_REPLY_NKEYS];	/* NULL: absent */
};

/* amqpd_reply.c: a saga command delivered (its reply_to, correlation id
 * and saga headers remembered), a publish that answers one (given the
 * headers the saga engine needs), and the list freed. */
void amqpd_reply_expect(struct amqpd *a, const struct msg *cmd);
void amqpd_reply_decorate(struct amqpd *a, struct msg *m);
void amqpd_reply_free_all(struct amqpd *a);

/* amqpd.c, for amqpd_chan.c */
void amqpd_send_method(struct amqpd_conn *c, uint16_t channel, amqp_method_number_t id,
    void *decoded);
void amqpd_conn_close(struct amqpd_conn *c, int code, const char *text, uint32_t method);
/* A message's content header and body frames, after its method. */
void amqpd_send_content(struct amqpd_conn *c, uint16_t channel, const struct msg *m);
void amqpd_conn_unref(struct amqpd_conn *c);
void amqpd_conn_tell_soon(struct amqpd_conn *c);
/* The topology call is answered: read the frames that waited. */
void amqpd_conn_resume(struct amqpd_conn *c);

/* amqpd_chan.c, for amqpd_consume.c */
void amqpd_chan_close(struct amqpd_chan *ch, int code, const char *text, uint32_t method);
void amqpd_method_text(amqp_method_number_t id, char *out, size_t len);
char *amqpd_cstr(amqp_bytes_t b);

/* amqpd_chan.c, for amqpd.c */
void amqpd_chan_frame(struct amqpd_conn *c, const struct amqpf_frame *f);
void amqpd_chan_free(struct amqpd_chan *ch);
void amqpd_chan_tell_all(struct amqpd_conn *c);
/* amqpd_chan.c, for amqpd_topo.c: a call is answered (frees it). */
void amqpd_chan_topo_done(struct amqpd_topo_call *call);

#endif
