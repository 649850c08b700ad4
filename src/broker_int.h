/*
 * The broker link's insides, shared by its files and included by them only
 * (broker.c, broker_conn.c, broker_pub.c, broker_consume.c; and the fuzz
 * target that includes broker_conn.c). Everyone else sees broker.h.
 *
 * Who may touch what is the rule of struct broker below: the fields under
 * "Shared, under lock" are read by the broker thread in one place only,
 * broker_take_shared() in broker.c (ARCHITECTURE.md: How the threads talk).
 */
#ifndef SAGAD_BROKER_INT_H
#define SAGAD_BROKER_INT_H

#include "broker.h"
#include "broker_url.h"

#include "amqp_headers.h"
#include <event2/event.h>
#include <pthread.h>
#include <sys/time.h>

#include "acks.h"
#include "conf.h"

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
	char trace[TRACE_PARENT_LEN + 1];	/* its traceparent, or "" */
	double sent;
	int returned;
	int settled;
};

struct broker_exchange {
	char *name, *type;
};

struct broker {
	/* Settings, copied so that a reload never races the thread. */
	struct broker_node *nodes;	/* broker.url, in order */
	size_t n_nodes;
	char *app_id, *conn_name;
	int tls_verify;
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
	double nacking_since;		/* first nack since the last ack, or 0 */
	size_t node;			/* the node tried or connected now */
	int node_up;			/* node index while up, else -1 (atomic) */
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

/* broker.c: the thread, its one wake-up path, events to the main thread. */
struct broker_event *broker_post(struct broker *b, enum broker_event_kind kind, int64_t seq,
    double latency, const char *reason);
void broker_post_flush(struct broker *b);
void broker_turn(struct broker *b);
void broker_read_cb(evutil_socket_t fd, short what, void *arg);
void broker_pending_clear(struct broker *b);

/* broker_conn.c: the connection, its frames, its end. */
void broker_connect_cb(evutil_socket_t fd, short what, void *arg);
int broker_reply_ok(struct broker *b, const char *what);
int broker_drain(struct broker *b);
void broker_fail(struct broker *b, const char *why, int graceful);
int broker_fail_status(struct broker *b, const char *what, int rc);

/* broker_pub.c: publishing with confirms, returns, blocked. */
int broker_publish_one(struct broker *b, struct msg *m);
void broker_confirm(struct broker *b, uint64_t tag, int multiple, int ack);
void broker_ring_clear(struct broker *b);
void broker_return_header(struct broker *b, const amqp_basic_properties_t *p,
    uint64_t size);
void broker_return_body(struct broker *b, const amqp_bytes_t *frag);
void broker_blocked(struct broker *b, const amqp_connection_blocked_t *bl);
void broker_unblocked(struct broker *b);

/* broker_consume.c: consumers, deliveries, acks. */
void broker_delivery_start(struct broker *b, amqp_channel_t channel,
    const amqp_basic_deliver_t *dv);
void broker_delivery_header(struct broker *b, const amqp_basic_properties_t *p,
    uint64_t size);
void broker_delivery_body(struct broker *b, const amqp_bytes_t *frag);
int broker_settle(struct broker *b, const struct broker_cmd *c);
void broker_flush_acks(struct broker *b);
int broker_apply_consume(struct broker *b);

/* For log lines and the connection's name. */
static inline const char *
broker_role_name(const struct broker *b)
{
	return b->role == BROKER_ROLE_PUBLISH ? "publish" : "consume";
}

#endif
