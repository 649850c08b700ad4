/*
 * Inside the store: what the files that own a family of records
 * (store_outbox.c, store_inbox.c, saga_store_sqlite.c) need from the engine
 * (store.c, store_room.c, store_stmt.c). Nothing else includes it, so no
 * SQLite type leaves the store (ARCHITECTURE.md: The store's transactions).
 */
#ifndef SAGAD_STORE_RECORDS_H
#define SAGAD_STORE_RECORDS_H

#include <sqlite3.h>
#include <stdint.h>

#include "store.h"

struct event;

/* The engine's own statements (store.c). */
enum store_stmt {
	ST_BEGIN, ST_COMMIT, ST_ROLLBACK, ST_PAGES,
	ST_COUNT
};

/* A family of records' statements, in the order of its own enum; the
 * engine prepares them at store_open (persistent) and finalizes them at
 * store_close, so a record file has no set-up of its own. */
struct store_family {
	const char *const *sql;
	int n;
};
extern const struct store_family store_outbox_family;	/* store_outbox.c */
extern const struct store_family store_inbox_family;	/* store_inbox.c */
extern const char txpart_schema[];	/* txpart.c */
/* NULL when one statement does not prepare (damaged?); finalize takes
 * NULL. */
sqlite3_stmt **store_prepare(struct store *st, const struct store_family *fam);
void store_finalize(sqlite3_stmt **stmt, const struct store_family *fam);

struct store_cb {
	store_done_fn *fn;
	void *arg;
};

/* The engine's state. The record files read db, path and broken, and
 * account what their writes add (tx_seq, tx_hold, tx_count, tx_bytes,
 * full_seen); the rest is the engine's alone. */
struct store {
	sqlite3 *db;
	char *path;
	char replica_id[33];	/* 32 hex digits (store_replica_id) */
	int lock_fd;
	sqlite3_stmt **stmt;	/* enum store_stmt */
	sqlite3_stmt **outbox;	/* enum store_outbox_stmt (store_outbox.c) */
	sqlite3_stmt **inbox;	/* enum store_inbox_stmt (store_inbox.c) */
	struct event *commit_ev;
	struct event *sync_ev;		/* commit now: the syncer waits for work */
	int in_tx;
	int broken;		/* a fatal error: the store can no longer write */
	struct store_cb *cbs;
	size_t ncbs, capcbs;
	struct store_cb *wcbs;	/* store_on_written: at the commit itself */
	size_t nwcbs, capwcbs;
	struct syncer_job *jobs;	/* store_on_durable_early, of the open transaction */
	size_t njobs, capjobs;
	struct store_hooks hooks;
	void (*fatal)(void *, const char *);
	void *fatal_arg;
	int64_t max_bytes;
	int64_t page_size;
	int64_t bytes;		/* pages in use at the last count, plus what was added since */
	int64_t counted;	/* pages in use at the last count, in bytes */
	int64_t reusable;	/* free pages inside the file at the last count, in bytes */
	int64_t fs_free;	/* free on its file system at the last count; -1: unknown */
	int refusing;		/* new records refused to keep the headroom (logged once) */
	int uncounted;		/* commits since the last count of pages */
	int64_t tx_bytes;	/* rough size of what the open transaction adds */
	int64_t committed_seq, tx_seq;
	int64_t written_seq;	/* tx_seq at the last commit, durable or not yet */
	int64_t visible_seq;	/* the relay may publish up to it (store_publishable_seq) */
	int tx_hold;		/* the open transaction holds a message that waits for the fsync */
	int64_t count, tx_count;
	int full_seen;		/* SQLITE_FULL in this transaction: checkpoint after */
	int ckpt_pages;		/* the log's checkpoint size now (store_tune_checkpoint) */
	int tx_durable;		/* the open transaction holds a write that needs an fsync */
	struct syncer *syncer;	/* store_set_async: fsyncs off the event loop */
	int wal_fd;
	struct store_batch *batches;	/* committed, waiting for their sync */
	size_t nbatches, capbatches;
};

/* The migrations that create each family's tables (store.c runs them). */
extern const char store_outbox_schema[];
extern const char store_inbox_schema[];
extern const char store_inbox_sent_schema[];
extern const char store_inbox_flight_schema[];
extern const char store_inbox_settle_sql[];

/* For record files outside the store's own (saga_store_sqlite.c): the connection,
 * and joining the current write transaction (committed with the turn);
 * store_join_write refuses once the store is broken. */
sqlite3 *store_db(struct store *st);
int store_join_write(struct store *st);

/* Join the write transaction: durable (what records something new) or
 * relaxed (what records finished work); 0 or -1. */
int store_begin(struct store *st);
int store_begin_relaxed(struct store *st);

/* Step a statement and reset it; 0 or -1 (logged, and fatal errors
 * reported). store_write_step also notices a transaction that the failure
 * rolled back; store_write_count returns how many rows changed (or -1). */
int store_step_done(struct store *st, sqlite3_stmt *s);
int store_write_step(struct store *st, sqlite3_stmt *s);
int store_write_count(struct store *st, sqlite3_stmt *s);
/* A write whose one parameter is a row's key; durable or relaxed. */
int store_write_row(struct store *st, sqlite3_stmt *s, int64_t row, int durable);
/* Delete a batch of old records: s takes (before, batch); how many went. */
int store_expire(struct store *st, sqlite3_stmt *s, double before, int batch);
/* A failed statement may have rolled the whole transaction back. */
void store_check_tx(struct store *st);
/* Reading: the step's error (after its rows) as 0 or -1, and reset.
 * store_read_int and store_read_double: the first column of the one row
 * of a bound statement (0 when none), and reset. */
int store_read_end(struct store *st, sqlite3_stmt *s);
int64_t store_read_int(sqlite3_stmt *s);
double store_read_double(sqlite3_stmt *s);

/* The room (store_room.c): a new record of size bytes fits without eating
 * into the headroom kept for deletes and checkpoints. */
int store_has_room(const struct store *st, int64_t size);
int store_room_for(struct store *st, int64_t size);
void store_note_room(struct store *st, int room);
void store_count(struct store *st);
int store_count_near(const struct store *st);

#endif
