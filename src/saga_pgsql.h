/*
 * Inside the PostgreSQL saga store (REPLICAS.md): what its two files
 * share. saga_store_pgsql.c holds the operations the engine calls
 * (saga_store_backend.h), answered from the batch's cache of fetched
 * rows, its writes queued as statements; saga_pgsql_batch.c drives the
 * batches on an asynchronous connection: jobs queued, their instances
 * fetched and locked in one round trip, the jobs run, the queued writes
 * and the COMMIT sent in a second, and only then the jobs' done.
 */
#ifndef SAGAD_SAGA_PGSQL_H
#define SAGAD_SAGA_PGSQL_H

#include <libpq-fe.h>
#include <stdint.h>

#include "metrics.h"
#include "pgconn.h"
#include "saga_store_backend.h"

struct event;
struct event_base;
struct evbuffer;
struct msg;
struct pgs_fetch;
struct saga_pg_relay;
struct sagad_conf;

/* Jobs per batch: one round trip's worth, and a bounded lock set. */
#define PGS_BATCH_MAX 128
/* Heartbeat and counts, seconds. */
#define PGS_TICK 5

/* A statement queued for the commit round trip; it owns its values. */
#define PGS_MAXPARAM 10
struct pgs_stmt {
	const char *sql;
	int n;
	char *v[PGS_MAXPARAM];
	int len[PGS_MAXPARAM], fmt[PGS_MAXPARAM];
};

/* An instance of the batch: fetched (and locked), or inserted by a job.
 * Its handle (saga_rec.row for the engine) is its place in the cache + 1:
 * it means something only within the batch, which is all the engine
 * needs of a row. */
struct pgs_inst {
	struct saga_rec rec;
	int fresh;		/* inserted in this batch: INSERT, not UPDATE */
	int loaded;		/* its state as fetched; -1 fresh */
	int dirty;
};

/* A due timer claimed by the batch (saga_due.id is its place + 1). */
struct pgs_due {
	int64_t row;
	int kind, step;
};

struct pgs_job {
	struct saga_job j;	/* its strings point into the copies below */
	char *ids[2], *consumed, *list_saga, *after_saga, *after_id;
	int alone;		/* failed in a batch: runs in one of its own */
	int duplicate;
	PGresult *list;		/* SAGA_WANT_LIST: its rows */
	struct pgs_job *next;
};

enum pgs_state {
	PGS_DOWN,		/* connecting, or waiting to connect again */
	PGS_IDLE,
	PGS_FETCH,		/* round trip 1 of a batch in flight */
	PGS_COMMIT,		/* round trip 2 */
	PGS_ROLLBACK,		/* a failed batch's transaction being ended */
	PGS_WAIT		/* after a transient error: the backoff */
};

struct saga_backend {
	struct event_base *base;
	const struct sagad_conf *conf;
	char *conninfo, *schema, *service, *replica;
	char *replica_host;
	double started_at;
	struct pgc_conf cfg;
	struct pgc *pg;
	enum pgs_state state;
	struct pgs_fetch *fetch;	/* round trip 1's statements */
	struct otel *otel;		/* its relay's spans; NULL: none */
	struct event *start_ev;		/* a batch at the end of this loop turn */
	struct event *tick_ev;		/* heartbeat, counts, expiry */
	struct event *wait_ev;		/* the end of PGS_WAIT */
	int transient;			/* the failed batch's error was transient */
	double wait;			/* the next transient backoff, seconds */
	struct saga_pg_relay *relay;

	/* jobs waiting, and those of the batch in flight */
	struct pgs_job *queue, **queue_tail;
	struct pgs_job *batch;
	size_t nbatch;
	struct pgs_job *cur;		/* the job running */
	int ran;			/* the batch's jobs ran: undo if not committed */
	saga_batch_fn *batch_fn;	/* the engine's (saga_store_on_batch) */
	void *batch_arg;
	int fatal;			/* the batch failed for a statement, not the link */

	/* the batch's cache (reset at each batch) */
	struct pgs_inst *insts;
	size_t ninsts, capinsts;
	struct pgs_due *dues;
	size_t ndues, capdues;
	char **ids;			/* the saga ids fetched */
	size_t nids, capids;
	PGresult *history;
	PGresult *early;		/* early events of the batch's saga ids
					 * (columns as PGS_EARLY_COLUMNS) */
	char *early_taken;		/* per row: handed to a start */
	struct pgs_early *early_new;	/* kept by this batch's jobs */
	size_t nearly_new, capearly_new;
	int want_timers, want_counts;
	double counts_wanted;		/* util_mono() want_counts was set */

	/* statements for the commit round trip; loose ones (written outside
	 * a batch: expiry, heartbeat) wait for the next batch */
	struct pgs_stmts {
		struct pgs_stmt *v;
		size_t n, cap;
	} writes, loose;
	/* the batch's outbox rows, for the relay once committed, and the
	 * rows its replies deleted (m NULL: the seqs its DELETE returns) */
	struct pgs_hand {
		size_t stmt;		/* its INSERT or DELETE in writes */
		struct msg *m;
	} *hands;
	size_t nhands, caphands;

	/* counts, refreshed every few seconds for the gauges, and this
	 * replica's changes committed since */
	PGresult *counts;
	struct pgs_count {
		char *saga;
		int state;
		int64_t n;
	} *deltas;
	size_t ndeltas, capdeltas;
	double counts_at, heartbeat_at, expire_at;
	uint64_t batches, commits, retries, failures, transient_failures;
	double batch_at;		/* util_mono() the batch in flight began */
	struct histogram batch_seconds;	/* BEGIN sent -> COMMIT's answer */
};

/* saga_pgsql_batch.c: frees the batch's outbox rows kept for the relay. */
void pgs_hands_free(struct saga_backend *b);

/* saga_store_pgsql.c: the cache and the statements. */
void pgs_cache_reset(struct saga_backend *b);
/* Rows of (saga, id, state, started_at, updated_at, finished_at, data)
 * from column `at` on, into the cache unless already there; returns the
 * handle of row i. */
int64_t pgs_cache_add(struct saga_backend *b, const PGresult *res, int i, int at);
struct pgs_stmt *pgs_stmt_add(struct pgs_stmts *a, const char *sql);
void pgs_param(struct pgs_stmt *s, const char *v);
void pgs_param_bin(struct pgs_stmt *s, const char *v, size_t len);
void pgs_param_dbl(struct pgs_stmt *s, double v);
void pgs_param_int(struct pgs_stmt *s, int64_t v);
void pgs_stmts_clear(struct pgs_stmts *a);
/* The batch committed: its state changes count until the next refresh;
 * a refresh (counts fetched) starts them again. */
void pgs_counts_commit(struct saga_backend *b);
void pgs_counts_fetched(struct saga_backend *b, PGresult *res);
/* The batch's changed instances as statements (before the rest). */
void pgs_flush_instances(struct saga_backend *b);
/* A text[] literal of n strings, for = ANY($k::text[]). */
char *pgs_text_array(char *const *v, size_t n);

/* saga_pgsql_early.c: choreographed events kept before their start,
 * each for one definition (saga) and saga id. The rows round trip 1
 * fetches have these columns, in this order. */
#define PGS_EARLY_COLUMNS "saga_id, message_id, exchange, routing_key, props, body, saga"
struct pgs_early {
	char *saga, *saga_id, *message_id, *exchange, *routing_key;
	char *props, *body;
	size_t plen, blen;
	int taken;
};
int pgs_early_keep(struct saga_backend *b, const struct msg *m, const char *saga,
    const char *saga_id);
void pgs_early_each(struct saga_backend *b, const char *saga, const char *saga_id,
    void (*fn)(void *arg, const struct msg *m), void *arg);
/* With the batch's cache: the events fetched, and those kept since. */
void pgs_early_reset(struct saga_backend *b);

/* saga_pgsql_batch.c: the driver. */
int pgs_driver_start(struct saga_backend *b);
void pgs_driver_submit(struct saga_backend *b, const struct saga_job *job);
void pgs_driver_stop(struct saga_backend *b);

/* saga_pgsql_fetch.c: round trip 1, its statements (the at_* fields: the
 * index of each kind's statement, -1 when not sent). */
struct pgs_fetch {
	struct pgc_stmt st[8 + PGS_BATCH_MAX];
	const char *v[8 + PGS_BATCH_MAX][8];	/* up to 8 parameters a statement */
	char *own[8 + PGS_BATCH_MAX][8];
	int n, at_consumed, at_insts, at_early, at_timers, at_history, at_list, at_counts;
};
void pgs_fetch_send(struct saga_backend *b);
void pgs_fetch_free(struct saga_backend *b);
/* The batch's consumed ids in strcmp order: one lock order for all. */
void pgs_sort_ids(char **v, size_t n);
void pgs_metrics(struct saga_backend *b, struct evbuffer *out);

#endif
