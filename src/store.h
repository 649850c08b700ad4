/*
 * The embedded store: one SQLite file in WAL mode holding the outbox and the
 * ids seen for dedup. Every write joins the current transaction; one commit
 * (one fsync) at the end of the event-loop turn serves every request of the
 * turn: group commit. Callbacks registered with store_on_commit() run after
 * that commit, so an answer that promises durability waits for them.
 *
 * The engine is store.c (with store_room.c); each family of records owns
 * its tables in a file of its own: store_outbox.c, store_inbox.c and
 * saga_store.c, which share store_records.h and nothing else does.
 */
#ifndef SAGAD_STORE_H
#define SAGAD_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "msg.h"

struct event_base;
struct store;


enum store_put {
	STORE_PUT_STORED,
	STORE_PUT_DUPLICATE,
	STORE_PUT_FULL,		/* max_bytes reached or disk (nearly) full */
	STORE_PUT_ERROR
};

/* ok is 1 when the transaction holding the work committed, 0 if it was lost. */
typedef void store_done_fn(void *arg, int ok);

struct store_hooks {
	/* After every durable commit, and after a commit that lets more of
	 * the outbox be published (store_publishable_seq). */
	void (*committed)(void *arg);
	void (*rolled_back)(void *arg);	/* a transaction was lost */
	void *arg;
};

/* Opens (creating or migrating) the store. On error returns NULL and a
 * malloc'd message in *err that names the file. */
struct store *store_open(const char *path, struct event_base *base,
    int64_t max_bytes, char **err);
void store_close(struct store *st);
void store_set_hooks(struct store *st, const struct store_hooks *hooks);
/* Commits made by the event loop are synced by a thread of their own and
 * answered when durable (pipelined group commit); store_flush stays
 * synchronous. */
void store_set_async(struct store *st);
void store_set_max_bytes(struct store *st, int64_t max_bytes);
/* Called once when the file turns unusable (I/O error, corruption): the
 * daemon stops with exit status 3 rather than go on without its store. */
void store_set_fatal(struct store *st, void (*fn)(void *arg, const char *why), void *arg);

/* Run cb after the commit of the current transaction (at once if none). */
void store_on_commit(struct store *st, store_done_fn *cb, void *arg);
/* Run cb as soon as the current transaction is committed to the
 * write-ahead log, before the fsync that makes it durable (store_on_commit
 * waits for that): what it holds then survives a crash of the process, not
 * yet one of the machine. ok 0: the transaction was lost. cb runs inside
 * the commit and must not write to the store. */
void store_on_written(struct store *st, store_done_fn *cb, void *arg);
/*
 * Early work for the open transaction's durability: fn(arg) runs on the
 * syncer's thread the moment the fsync that makes the transaction durable
 * ends, before the store_on_commit callbacks (which run on the loop, and
 * must check whether it ran: it may not, when the transaction needs no
 * fsync of its own, fails, or is synced on the loop). For what must not
 * wait for a busy loop: the broker ack of a consumed message. Returns 1
 * if queued, 0 if not (no durable transaction open).
 */
int store_on_durable_early(struct store *st, void (*fn)(void *), void *arg);
/* Pages of write-ahead log between checkpoints with free_bytes left on the
 * store's file system (1024; 256 below 64 MiB; a 64th of the free space in
 * 4 KiB pages below 16 MiB, at least 16). */
int store_checkpoint_pages(int64_t free_bytes);
/* Bytes that the store keeps free on its file system, refusing new records
 * (STORE_PUT_FULL) rather than use them: the room that deleting confirmed
 * messages and checkpointing need once the disk is full. */
int64_t store_headroom(int ckpt_pages, int64_t page_size);
/* How long the fsyncs of the syncer thread took (empty without one). */
struct histogram;
void store_fsync_histogram(struct store *st, struct histogram *out);
/* Commit now instead of at the end of the loop turn; returns 0 or -1. */
int store_flush(struct store *st);

/* Outbox. put assigns m->seq. flags:
 * STORE_OUT_DEDUP: a message id seen within the dedup window is a duplicate
 *   and stores nothing; sagad's own messages (replies, dead letters, saga
 *   commands) carry ids it chose and skip it.
 * STORE_OUT_EARLY: the message may be published as soon as its transaction
 *   is written to the log, before the fsync that makes it durable (others
 *   wait for it). Only for a message that its cause makes again if a crash
 *   of the machine loses the transaction: one caused by a consumed
 *   message, which the broker delivers again because its ack waits for the
 *   fsync. A crash of the process loses nothing written. */
enum {
	STORE_OUT_DEDUP = 1,
	STORE_OUT_EARLY = 2
};
enum store_put store_outbox_put(struct store *st, struct msg *m, double now,
    unsigned flags);
/* Up to limit messages with after < seq <= upto that are due, in order. */
int store_outbox_fetch(struct store *st, int64_t after, int64_t upto,
    double now, size_t limit, struct msg **out, size_t *n);
/* Retries waiting for their time (seq <= upto, due_at in (0, now]). */
int store_outbox_fetch_due(struct store *st, int64_t upto, double now,
    size_t limit, struct msg **out, size_t *n);
double store_outbox_next_due(struct store *st);	/* 0 when none */
int store_outbox_done(struct store *st, int64_t seq);
unsigned store_outbox_attempts(struct store *st, int64_t seq);
int store_outbox_retry(struct store *st, int64_t seq, double due_at,
    unsigned attempts, const char *error);
int store_outbox_clear_due(struct store *st, int64_t seq);
/* Hold back every message for one exchange until due_at (it does not exist
 * on the broker): the others go on. Returns how many. */
int store_outbox_defer_exchange(struct store *st, const char *exchange,
    double due_at, const char *error);

/* The inbox: consumed messages, per subscription, until delivered. */
enum inbox_state {
	INBOX_PENDING = 0,	/* waiting for (another) delivery attempt */
	INBOX_DONE = 1,		/* delivered; kept (without body) for dedup */
	INBOX_DEAD = 2		/* dead-lettered; kept for dlq list / replay */
};

struct inbox_rec {
	int64_t id;		/* broker order within the store */
	struct msg *m;		/* message_id, exchange, routing_key, props, body */
	enum inbox_state state;
	unsigned attempts;
	double due_at, received_at, finished_at;
	int last_status;
	char *last_error, *dead_reason;
	/* In doubt: an attempt was in flight when sagad stopped, and none
	 * has been recorded since (store_inbox_in_flight); the service may
	 * have seen the message. */
	int redelivered;
};

void inbox_rec_free(struct inbox_rec *r);

/* Record a consumed message; a message id seen before on this subscription
 * (within the dedup window) is a DUPLICATE and stores nothing. */
enum store_put store_inbox_put(struct store *st, const char *sub, struct msg *m,
    double now, int64_t *id);
/* Records of one state in broker order, after id `after`. */
int store_inbox_load(struct store *st, const char *sub, enum inbox_state state,
    int64_t after, size_t limit, struct inbox_rec **out, size_t *n);
int store_inbox_done(struct store *st, int64_t id, double now, int status);
/* The attempts of sub in flight, all of them, each with its number: those
 * without a recorded outcome when the store is next opened leave their
 * records in doubt (inbox_rec.redelivered) until an outcome is recorded.
 * Joins the transaction without an fsync of its own (a crash of the
 * process keeps it); requests go out once it is written (store_on_written). */
struct inbox_attempt {
	int64_t id;
	unsigned attempt;
};
int store_inbox_in_flight(struct store *st, const char *sub,
    const struct inbox_attempt *a, size_t n);
/* Forget a record so that the same message id is accepted again: a
 * command refused by the service (409/422) may be retried by its sender
 * with the same id. */
int store_inbox_forget(struct store *st, int64_t id);
int store_inbox_retry(struct store *st, int64_t id, unsigned attempts,
    double due_at, int status, const char *error);
int store_inbox_dead(struct store *st, int64_t id, double now, unsigned attempts,
    const char *reason, int status, const char *error);
/* Dead -> pending again (message_id NULL: all of the subscription). */
int store_inbox_replay(struct store *st, const char *sub, const char *message_id);
int64_t store_inbox_count(struct store *st, const char *sub, enum inbox_state state);
double store_inbox_oldest(struct store *st, const char *sub);	/* pending */
/* Forget delivered records older than before, a small batch per call. */
int store_inbox_expire(struct store *st, double before, int batch);

/* A listing for operators (no bodies). */
struct store_row {
	int64_t seq;
	char message_id[256], exchange[256], routing_key[256], last_error[64];
	char trace_id[33];	/* "" when it has no (valid) traceparent */
	unsigned attempts;
	double created_at, due_at;
	int64_t body_len;
};
int store_outbox_list(struct store *st, int64_t after, size_t limit,
    struct store_row *rows, size_t *n);

/* Figures. committed_seq: the highest outbox seq durable on disk;
 * publishable_seq: the relay may publish every message up to it (durable,
 * or written and put with STORE_OUT_EARLY). */
int64_t store_committed_seq(const struct store *st);
int64_t store_publishable_seq(const struct store *st);
int64_t store_outbox_count(const struct store *st);
double store_outbox_oldest(struct store *st);	/* created_at, 0 if empty */
int64_t store_bytes(const struct store *st);
int store_writable(const struct store *st);
const char *store_path(const struct store *st);
/* This store's replica id: 32 hex digits, random, made when the store was
 * created (or first opened by a sagad that has it) and kept in it, so a
 * restart keeps it and every other store has its own. It names this sagad
 * to its replicas in PostgreSQL (shared dedup's claims, the saga store's
 * replicas table). A copy of the file (a restored image) has the same id. */
const char *store_replica_id(const struct store *st);

/* Forget dedup ids older than now - window, a small batch per call. */
int store_expire_ids(struct store *st, double before, int batch);

#endif
