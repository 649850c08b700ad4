/*
 * Delivery: broker -> inbox -> service. A consumed message is committed to
 * the store before it is acked to the broker, then POSTed to the
 * subscription's deliver URL with retries and backoff, dead-lettered when
 * hopeless, never delivered twice once its success is recorded.
 */
#ifndef SAGAD_DELIVERY_H
#define SAGAD_DELIVERY_H

#include <stddef.h>
#include <stdint.h>

#include "broker.h"
#include "metrics.h"

struct sagad;
struct delivery;
struct evbuffer;

enum delivery_circuit {
	CIRCUIT_CLOSED,		/* deliveries flow */
	CIRCUIT_OPEN,		/* the service keeps failing: wait, take nothing */
	CIRCUIT_HALF_OPEN	/* one probe delivery decides */
};

enum delivery_outcome {
	OUTCOME_SUCCESS,	/* 2xx */
	OUTCOME_REFUSED,	/* 409/422 answered as a failure reply */
	OUTCOME_RETRY,		/* 5xx, timeout, connection error: tried again later */
	OUTCOME_DEAD,		/* dead-lettered */
	OUTCOME_COUNT
};

struct delivery_sub_stats {
	uint64_t outcomes[OUTCOME_COUNT];
	uint64_t duplicates, dead_lettered, too_large;
	struct histogram latency;	/* received -> done */
	struct histogram ack;		/* received -> ack handed to the broker thread */
};

struct delivery *delivery_new(struct sagad *d);
void delivery_free(struct delivery *dl);
void delivery_set_broker(struct delivery *dl, struct broker *b);
/* The consuming connection's events (broker_event_fn). */
void delivery_broker_event(void *arg, const struct broker_event *ev);
/* Drain: take nothing more; deliveries in flight finish. */
void delivery_stop(struct delivery *dl);
unsigned delivery_inflight(const struct delivery *dl);
int delivery_connected(const struct delivery *dl);

/* Admin: metrics, dead letters, replay. */
void delivery_metrics(struct delivery *dl, struct evbuffer *out);
int delivery_sub_index(const struct delivery *dl, const char *name);
/* The participant's two-phase commit records (txpart.h): a jansson array
 * of those of tx (NULL: all) in state (a record state name; NULL: any; an
 * unknown name: none); and an operator's decision for tx in doubt: how
 * many records it resolved, or -1. */
void *delivery_tx_json(struct delivery *dl, const char *tx, const char *state, size_t limit);
int delivery_tx_resolve(struct delivery *dl, const char *tx, int commit);
void *delivery_sub_json(struct delivery *dl, int sub);	/* json_t * */
void *delivery_dlq_json(struct delivery *dl, int sub, size_t limit);
/* Put dead letters back through delivery; ids NULL: all. Returns count. */
int delivery_replay(struct delivery *dl, int sub, const char *const *ids, size_t n);

/* Internal subscriptions (the saga engine) are handled in the loop, inside
 * the transaction that records the inbox entry, instead of over HTTP. */
typedef void delivery_handler_fn(void *arg, const struct msg *m);
void delivery_set_handler(struct delivery *dl, int sub, delivery_handler_fn *fn,
    void *arg);

/* With a shared saga store the internal subscription's messages skip the
 * inbox (the store deduplicates them in its own transaction): fn takes m
 * (owned from then on) and settles it with the broker later, once. */
struct delivery_ticket;
typedef void delivery_take_fn(void *arg, struct msg *m, struct delivery_ticket *t);
void delivery_set_taker(struct delivery *dl, int sub, delivery_take_fn *fn, void *arg);
enum delivery_verdict {
	DELIVERY_ACK,		/* committed */
	DELIVERY_DUPLICATE,	/* taken before: acked, counted, dropped */
	DELIVERY_REQUEUE,	/* not committed: the broker delivers it again */
	DELIVERY_REJECT		/* refused for good: dead-lettered */
};
void delivery_settle(struct delivery_ticket *t, enum delivery_verdict v);

/*
 * Subscriptions with deliver = "amqp" go to the AMQP front door's
 * consumers (amqpd_consume.c) instead of over HTTP. A sink is one such
 * consumer: the dispatch asks how many more records it may take (room,
 * from its prefetch and held), hands it each record once its attempt is
 * marked in the store (deliver), and the sink settles every record it was
 * handed exactly once (delivery_take_settle). A detached sink is freed
 * (release) once it holds nothing. The subscription consumes from the
 * broker only while it has a sink.
 */
struct dattempt;
struct delivery_sink;
struct delivery_sink_ops {
	unsigned (*room)(struct delivery_sink *s);
	/* 0: sent, settled later; -1: cannot take it now (closing), as if
	 * the attempt had not started */
	int (*deliver)(struct delivery_sink *s, struct dattempt *t, const struct msg *m,
	    int redelivered);
	void (*release)(struct delivery_sink *s);
};
struct delivery_sink {
	const struct delivery_sink_ops *ops;
	struct delivery_sink *next;	/* the subscription's, in turn */
	int sub;
	int exclusive;
	int detached;
	unsigned held;			/* records handed or about to be, not settled */
};
/* The front-door subscription of queue, or -1 (also when dl is NULL). */
int delivery_frontdoor_sub(const struct delivery *dl, const char *queue);
/* 0, or -1 when an exclusive consumer holds the queue or exclusive is
 * asked of a queue with consumers. */
int delivery_attach(struct delivery *dl, int sub, struct delivery_sink *s);
void delivery_detach(struct delivery *dl, struct delivery_sink *s);
/* Say the sink has room again (an ack, a larger prefetch, flow on). */
void delivery_sink_kick(struct delivery *dl, int sub);
enum delivery_take_result {
	TAKE_ACK,		/* basic.ack, or sent with no_ack: delivered */
	TAKE_REQUEUE,		/* nack/reject with requeue: retried after the backoff */
	TAKE_REJECT,		/* nack/reject without requeue: dead-lettered */
	TAKE_RETURNED		/* channel or connection gone: again at once, redelivered */
};
void delivery_take_settle(struct dattempt *t, enum delivery_take_result r, const char *why);

/* A stable id for a message that came without one (see sagad.8). */
void delivery_derive_id(const struct msg *m, char out[40]);

#endif
