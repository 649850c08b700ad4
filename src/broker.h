/*
 * The broker link: one AMQP connection owned by its own thread, because
 * rabbitmq-c blocks and must never stall ingress. The main thread hands it
 * messages (broker_publish) and receives its events (up, down, confirms,
 * returns, blocked) on the main event base, in order.
 */
#ifndef SAGAD_BROKER_H
#define SAGAD_BROKER_H

#include <stdint.h>

#include "props.h"

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
	BROKER_EV_UNBLOCKED
};

struct broker_event {
	enum broker_event_kind kind;
	uint64_t epoch;		/* connection generation it belongs to */
	int64_t seq;		/* the message's outbox seq, for confirms */
	double latency;		/* publish -> confirm, seconds */
	char reason[160];	/* for DOWN, BLOCKED */
};

typedef void broker_event_fn(void *arg, const struct broker_event *ev);

struct broker *broker_new(struct event_base *main_base,
    const struct sagad_conf *conf, broker_event_fn *fn, void *arg);
int broker_start(struct broker *b);
/* Close the connection and join the thread. */
void broker_free(struct broker *b);

/* Queue a message for publishing on connection epoch (from its UP event);
 * the broker takes ownership. A message for an older epoch is dropped:
 * the relay republishes it after the next UP. */
void broker_publish(struct broker *b, uint64_t epoch, struct msg *m);
/* Wake the broker thread after a batch of broker_publish calls. */
void broker_kick(struct broker *b);

#endif
