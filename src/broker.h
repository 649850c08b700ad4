/*
 * The broker link: one AMQP connection owned by its own thread, because
 * rabbitmq-c blocks and must never stall ingress. The main thread hands it
 * messages (broker_publish) and receives its events (up, down, confirms,
 * returns, blocked) on the main event base, in order.
 */
#ifndef SAGAD_BROKER_H
#define SAGAD_BROKER_H

#include <stddef.h>
#include <stdint.h>

#include "msg.h"
#include "trace.h"

struct event_base;
struct sagad_conf;
struct broker;

enum broker_event_kind {
	BROKER_EV_UP,		/* connected, topology declared; epoch is new */
	BROKER_EV_DOWN,		/* connection lost: everything unconfirmed is void */
	BROKER_EV_ACK,		/* the broker took the message (seq) */
	BROKER_EV_NACK,		/* the broker refused it */
	BROKER_EV_RETURNED,	/* unroutable: returned, then acked */
	BROKER_EV_BLOCKED,	/* connection.blocked: resource alarm */
	BROKER_EV_UNBLOCKED,
	BROKER_EV_DELIVERY,	/* a consumed message: msg, sub */
	BROKER_EV_TOO_LARGE	/* a consumed message over the limit, dead-lettered */
};

struct broker_event {
	enum broker_event_kind kind;
	uint64_t epoch;		/* connection generation it belongs to */
	int64_t seq;		/* the message's outbox seq, for confirms */
	double latency;		/* publish -> confirm, seconds */
	char reason[160];	/* for DOWN, BLOCKED */
	struct msg *msg;	/* DELIVERY: owned by the receiver; seq = delivery tag */
	int sub;		/* DELIVERY: subscription index */
	int redelivered;
	double received;	/* DELIVERY: util_mono() when its last frame came */
	char trace[TRACE_PARENT_LEN + 1];	/* ACK, NACK, RETURNED: the
						 * message's traceparent, or "" */
};

typedef void broker_event_fn(void *arg, const struct broker_event *ev);

/* Publishing and consuming use separate connections: a connection.blocked
 * (resource alarm) stops the publisher's socket, and acks of consumed
 * messages must not wait behind it. */
enum broker_role {
	BROKER_ROLE_PUBLISH,	/* exchanges, confirms, mandatory publishes */
	BROKER_ROLE_CONSUME	/* the subscriptions' queues, bindings, consumers */
};

struct broker *broker_new(struct event_base *main_base,
    const struct sagad_conf *conf, enum broker_role role,
    broker_event_fn *fn, void *arg);
int broker_start(struct broker *b);
/* The node (one of broker.url's entries) the connection is up on, as
 * "host:port"; returns 0 with "" while it is down. Any thread. */
int broker_node_name(struct broker *b, char *out, size_t outlen);
/* Close the connection and join the thread. */
void broker_free(struct broker *b);

/* Queue a message for publishing on connection epoch (from its UP event);
 * the broker takes ownership. A message for an older epoch is dropped:
 * the relay republishes it after the next UP. */
void broker_publish(struct broker *b, uint64_t epoch, struct msg *m);
/* Settle a consumed message of connection epoch: ack, or reject without
 * requeue (the queue's dead-letter setup takes it). */
void broker_ack(struct broker *b, uint64_t epoch, int sub, uint64_t tag);
void broker_reject(struct broker *b, uint64_t epoch, int sub, uint64_t tag);
/* Give a consumed message back to the queue (it could not be stored). */
void broker_requeue(struct broker *b, uint64_t epoch, int sub, uint64_t tag);
/* Take deliveries for subscription sub, or stop (basic.cancel): the local
 * backlog is full or the service is failing. Kept across reconnects. */
void broker_consume(struct broker *b, int sub, int on);
/* Wake the broker thread after a batch of the calls above. */
void broker_kick(struct broker *b);

/* A stored message's AMQP properties (broker_pub.c), for the relay and
 * the front door's deliveries: the header table is local unless m has
 * more than nlocal headers (then allocated: free it if != local). */
struct amqp_basic_properties_t_;
struct amqp_table_entry_t_;
struct amqp_table_entry_t_ *broker_msg_props(const struct msg *m,
    struct amqp_basic_properties_t_ *p, struct amqp_table_entry_t_ *local, size_t nlocal);

#endif
