/*
 * The PostgreSQL saga store's outbox relay (REPLICAS.md: One batch, one
 * transaction, two round trips, step 5): publishes the rows of the
 * `outbox` table of the saga store's schema to RabbitMQ with publisher
 * confirms, on a broker connection of its own, and deletes them once
 * confirmed.
 *
 * Which rows: those claimed by this replica (the batch that inserted them
 * set claimed_by to it), and those whose claim is older than grace
 * seconds (a dead replica's) or that nobody claimed, which it claims
 * (UPDATE ... FOR UPDATE SKIP LOCKED). Claims are sagad's clock,
 * util_now() (wall, epoch seconds), written by the relay and compared by
 * the relay: replicas' clocks must agree to well within grace (NTP). The
 * relay refreshes the claim of all rows claimed by it (held or not yet
 * read) every grace / 2, checked at its 1 s poll, so that no live
 * replica's rows are taken: grace should be 3 s or more (REPLICAS.md's
 * relay_grace defaults to 2 s). The store side's batch writes claimed_at
 * with util_now() too.
 *
 * Delivery is at least once: a row taken over from a replica that was slow
 * rather than dead, a delete lost with PostgreSQL, a confirm lost with the
 * broker connection all publish a row again. Receivers drop copies by
 * Message-Id (the saga engine derives it from saga, step and kind).
 *
 * Order: per saga (saga_id), rows go out in seq order, one at a time: a
 * row is published only once every earlier row of its saga is confirmed,
 * so a nacked or returned (unroutable) row, retried after a backoff, is
 * never overtaken by a later one of its saga; rows of other sagas go on.
 * Across replicas a row is not claimed while an earlier row of its saga is
 * held by another live replica. Rows without a saga_id have no order.
 *
 * Everything runs on the thread of the event base; PostgreSQL is
 * asynchronous (pgconn.c), the broker is its own thread (broker.c).
 */
#ifndef SAGAD_SAGA_PG_RELAY_H
#define SAGAD_SAGA_PG_RELAY_H

#include <stddef.h>
#include <stdint.h>

#include "metrics.h"

struct event_base;
struct evbuffer;
struct sagad_conf;
struct saga_pg_relay;

struct saga_pg_relay_stats {
	uint64_t published;	/* confirmed by the broker */
	uint64_t nacked;	/* basic.nack: retried after a backoff */
	uint64_t unroutable;	/* returned: retried after a backoff */
	uint64_t claimed_from_others;	/* rows taken over (stale or unclaimed) */
	uint64_t handed;	/* rows handed by this replica's batches, no claim */
	uint64_t claimed;	/* rows read by a claim (own, unclaimed, stale) */
	uint64_t deleted;	/* rows deleted after their confirm */
	uint64_t gone;		/* of those, by their reply's batch */
	uint64_t pg_errors;	/* queries that failed (the work is retried) */
	uint64_t reconnects;	/* broker connections after the first */
	struct histogram confirm;	/* publish -> confirm, seconds */
};

/*
 * A relay, not started. conf gives the broker (url, exchanges declared,
 * heartbeat...), the confirm window (outbox.max_inflight, at most 256) and
 * the retry backoff (outbox.retry_initial, retry_max); it must outlive the
 * relay. schema: the saga store's (NULL: "sagad"), migrated already;
 * service: the outbox rows' service; replica: this sagad's id (claimed_by);
 * grace: seconds after which another replica's claim is stale.
 */
struct saga_pg_relay *saga_pg_relay_new(struct event_base *base,
    const struct sagad_conf *conf, const char *conninfo, const char *schema,
    const char *service, const char *replica, double grace);
/* Connects to PostgreSQL and starts the broker's thread (publish role);
 * -1 if the thread cannot start. Both reconnect by themselves. */
int saga_pg_relay_start(struct saga_pg_relay *r);
/* A batch committed rows it could not hand (unclaimed: an earlier row of
 * their saga is another replica's): look now rather than at the next poll
 * (1 s). */
void saga_pg_relay_kick(struct saga_pg_relay *r);
/*
 * A batch committed the row m (m->seq set), claimed by this replica: the
 * relay takes m and saga_id (NULL: no order) and publishes it with no
 * query, if it holds every row this replica has claimed; otherwise it
 * drops them and its next claim reads the row (saga_pg_relay_int.h).
 * alone: the batch saw no earlier row of the saga in the table.
 */
void saga_pg_relay_hand(struct saga_pg_relay *r, struct msg *m, char *saga_id, int alone);
/* A batch with outbox rows may or may not have committed (the connection
 * was lost during its COMMIT): hand nothing until a claim has read them. */
void saga_pg_relay_lost(struct saga_pg_relay *r);
/* A batch committed the delete of these rows (saga_store_delivered: a
 * reply shows that they went): those held are forgotten with no delete of
 * the relay's, once their publish is confirmed or needs no retry. */
void saga_pg_relay_gone(struct saga_pg_relay *r, const int64_t *seqs, size_t n);
/* A copy of m for the relay (saga_pg_relay_hand), malloc'd throughout. */
struct msg *saga_pg_relay_msg_copy(const struct msg *m);
/* Stops the broker (unconfirmed rows stay in the table, claimed: another
 * replica takes them after grace, or this one after its restart) and
 * waits up to 2 s for the deletes of confirmed rows. */
void saga_pg_relay_free(struct saga_pg_relay *r);

const struct saga_pg_relay_stats *saga_pg_relay_stats(const struct saga_pg_relay *r);
/* Published, not yet confirmed. */
unsigned saga_pg_relay_inflight(const struct saga_pg_relay *r);
/* Rows in memory: waiting, in flight, or confirmed and not yet deleted. */
size_t saga_pg_relay_held(const struct saga_pg_relay *r);
/* 1 while PostgreSQL, and the broker, are connected. */
int saga_pg_relay_pg_up(const struct saga_pg_relay *r);
int saga_pg_relay_broker_up(const struct saga_pg_relay *r);
/* The sagad_saga_outbox_* metrics (Prometheus text). */
void saga_pg_relay_metrics(const struct saga_pg_relay *r, struct evbuffer *out);

/* Spans of its publishes (otel.h); NULL: none. */
struct otel;
void saga_pg_relay_set_otel(struct saga_pg_relay *r, struct otel *o);

#endif
