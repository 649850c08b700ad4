/*
 * The relay: outbox -> broker. Publishes committed messages in acceptance
 * order within a confirm window, deletes them on basic.ack, and retries
 * nacked and returned (unroutable) messages after a backoff without holding
 * back the others. After a lost connection it starts again from the oldest
 * unconfirmed message, so order is kept and nothing is skipped.
 */
#ifndef SAGAD_RELAY_H
#define SAGAD_RELAY_H

#include <stdint.h>

#include "broker.h"
#include "metrics.h"

struct event_base;
struct store;
struct sagad_conf;

enum relay_link {
	RELAY_LINK_DOWN,
	RELAY_LINK_UP,
	RELAY_LINK_BLOCKED
};

struct relay_stats {
	uint64_t published;	/* confirmed by the broker */
	uint64_t unroutable;	/* returned by the broker */
	uint64_t nacked;
	uint64_t reconnects;
	struct histogram confirm;	/* publish -> confirm, seconds */
};

struct relay;
struct otel;

struct relay *relay_new(struct event_base *base, struct store *st,
    const struct sagad_conf *conf);
void relay_free(struct relay *r);
/* The broker's events land here (broker_event_fn). */
void relay_broker_event(void *arg, const struct broker_event *ev);
void relay_set_broker(struct relay *r, struct broker *b);
/* Spans of its publishes (otel.h); NULL: none. */
void relay_set_otel(struct relay *r, struct otel *o);
void relay_set_conf(struct relay *r, const struct sagad_conf *conf);
/* Store hooks: new messages are durable; a transaction was lost. */
void relay_committed(void *arg);
void relay_rolled_back(void *arg);
/* Stop taking new messages from the store (drain); in-flight ones settle. */
void relay_pause(struct relay *r);

enum relay_link relay_link(const struct relay *r);
const char *relay_link_reason(const struct relay *r);
unsigned relay_inflight(const struct relay *r);
const struct relay_stats *relay_stats(const struct relay *r);

#endif
