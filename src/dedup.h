/*
 * Shared deduplication of consumed messages (a subscription's dedup =
 * "shared"; REPLICAS.md: Inbox deduplication across replicas). Replicas
 * of a service consume one queue; each keeps its inbox in its own store,
 * so a message redelivered to another replica (the first died before its
 * ack) would reach the service twice. A claim in the PostgreSQL store
 * (the consumed table, keyed by subscription and message id) names the
 * one replica that delivers it:
 *
 *   the record is durable in the local inbox  -->  claim
 *      claimed by nobody, or by this store   -->  MINE: deliver, ack
 *      claimed by another replica's store    -->  OTHER: the other one
 *          has it durably (it delivered it, or will when it comes back):
 *          recorded as a duplicate here, acked, never delivered
 *
 * Claims name a replica by its store's replica id (store_replica_id),
 * which a restart keeps: records reloaded at start are claimed again, and those
 * another replica took meanwhile are dropped. Claims are batched into one
 * statement per round trip on an asynchronous connection of their own;
 * while PostgreSQL is away they wait (their messages unacked, not
 * delivered).
 */
#ifndef SAGAD_DEDUP_H
#define SAGAD_DEDUP_H

#include <stddef.h>

struct event_base;
struct sagad_conf;
struct dedup;

enum dedup_claim {
	DEDUP_MINE,		/* deliver it */
	DEDUP_OTHER,		/* another replica has it */
	DEDUP_CANCELLED		/* sagad is stopping: neither */
};

typedef void dedup_claim_fn(void *arg, enum dedup_claim r);

/* replica_id: this replica's store's id, which names it in the claims. */
struct dedup *dedup_new(struct event_base *base, const struct sagad_conf *conf,
    const char *replica_id);
/* Answers fn once, later (never before this returns). */
void dedup_claim(struct dedup *dd, const char *sub, const char *message_id, dedup_claim_fn *fn,
    void *arg);
/* Claims still waiting are answered DEDUP_CANCELLED. */
void dedup_free(struct dedup *dd);
/* This replica's name in the claims. */
const char *dedup_replica(const struct dedup *dd);
/* A batch of claims, n pairs, in (subscription, message id) order: one
 * lock order for every replica. */
void dedup_sort(char **subs, char **ids, size_t n);

#endif
