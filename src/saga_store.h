/*
 * The saga engine's records: instances, their history, their timers and
 * the messages the steps send. The engine (saga.c, saga_record.c,
 * saga_admin.c) sees only this interface, never the database: an
 * instance is a few columns and an opaque blob (the engine's encoding of
 * its state), so that another backend (PostgreSQL, for replicas sharing
 * their sagas) can stand behind the same calls.
 *
 * saga_store.c forwards each call to the backend's table of operations
 * (saga_store_backend.h). The SQLite backend (saga_store_sqlite.c) keeps
 * the records in sagad's own store: every write joins the store's write
 * transaction (store_join_write), so that a state change, the messages it
 * sends and the consumed message that caused it commit together.
 *
 * Batches (REPLICAS.md: One batch, one transaction). The engine brackets
 * the handling of one consumed message, and one round of due timers, with
 * saga_store_batch_begin and saga_store_batch_end. A backend may assume:
 * - the reads between them see the batch's own writes;
 * - every write between them (instances, history, timers, sends) joins
 *   one transaction, so that none is durable without the others;
 * - batch_end is the commit point of a transactional backend (-1: the
 *   batch's writes are lost; the engine only logs it, so the backend must
 *   itself keep the cause from being acked); the SQLite backend commits at
 *   the end of the loop turn instead, its batch calls doing nothing;
 * - batches do not nest, and a write outside a batch (an operator's
 *   command, retention) is a transaction of its own for a transactional
 *   backend.
 */
#ifndef SAGAD_SAGA_STORE_H
#define SAGAD_SAGA_STORE_H

#include <stddef.h>
#include <stdint.h>

struct msg;
struct store;
struct saga_store;

/* The store's schema migration that creates the SQLite backend's tables
 * (store.c; defined in saga_store_sqlite.c). */
extern const char saga_store_schema[];
extern const char saga_store_def_schema[];

/* A version of a saga definition (saga_def.h) as the store keeps it. */
struct saga_def_rec {
	const char *saga, *version, *json;
};

struct saga_rec {
	int64_t row;		/* 0: not stored yet */
	char *saga, *id;	/* definition name and saga id */
	int state;		/* enum saga_state */
	double started_at, updated_at, finished_at;	/* finished_at 0: not */
	char *data;		/* the engine's encoding */
	size_t data_len;
};

void saga_rec_clear(struct saga_rec *r);

struct saga_hist {
	double at;
	const char *dir, *what, *step, *message_id, *detail;	/* "" when none */
};

struct saga_due {
	int64_t id, row;
	int kind, step;
};

typedef void saga_rec_fn(void *arg, const struct saga_rec *r);

struct event_base;
struct otel;
struct sagad_conf;

/* The backend the configuration names (saga_store.backend); otel: the
 * exporter of the spans of its relay's publishes (NULL: none). */
struct saga_store *saga_store_open(struct event_base *base, struct store *st,
    const struct sagad_conf *conf, struct otel *otel, char **err);
void saga_store_close(struct saga_store *ss);

/*
 * Jobs. Everything the engine does to its records outside the SQLite
 * store's own delivery path (timer rounds, operators' views and commands,
 * and with a shared backend every consumed saga message) is a job:
 * run(arg) is called inside a batch, where the reads of the job's saga ids
 * and what `want` asks for are answered; done(arg, result) follows once
 * the batch's writes committed, or are known lost. The SQLite backend runs
 * a job at once, done included, before saga_store_submit returns. A shared
 * backend (PostgreSQL) queues it: the jobs of one batch have their
 * instances fetched and locked in one round trip, run in order, and
 * commit in a second (REPLICAS.md: One batch, one transaction).
 */
enum saga_job_result {
	SAGA_JOB_DONE,		/* committed */
	SAGA_JOB_DUPLICATE,	/* the consumed message was taken before: not run */
	SAGA_JOB_RETRY,		/* not committed (store unreachable, a conflict): may come again */
	SAGA_JOB_FAILED		/* not committed, and never will be: the job itself is refused */
};

enum {
	SAGA_WANT_TIMERS = 1,	/* saga_store_timers_due answers the due timers */
	SAGA_WANT_HISTORY = 2,	/* saga_store_history answers for the ids' instances */
	SAGA_WANT_LIST = 4	/* saga_store_list answers (the job's list) */
};

/* A page of the instances' listing, newest first: (started_at, saga, id)
 * descending, from just after the cursor (after_saga NULL: the start). */
struct saga_list_page {
	const char *saga;	/* NULL: all */
	int state;		/* < 0: all */
	size_t limit;
	double after_at;
	const char *after_saga, *after_id;
};

struct saga_job {
	const char *ids[2];	/* saga ids whose instances run may read and change */
	size_t n_ids;
	/* The consumed message's id: a shared backend records it in the
	 * batch's transaction and answers SAGA_JOB_DUPLICATE for one taken
	 * before (SQLite's inbox deduplicates before the engine sees it). */
	const char *consumed;
	unsigned want;
	struct saga_list_page list;	/* SAGA_WANT_LIST */
	void (*run)(void *arg);
	void (*done)(void *arg, enum saga_job_result r);
	void *arg;
};

/* The job is copied; run and done are always called, in that order (run
 * not for DUPLICATE, RETRY or FAILED before it ran). */
void saga_store_submit(struct saga_store *ss, const struct saga_job *job);
/* Whether other processes change the records too (a shared backend):
 * then counts must be read from the store, not kept in memory, and the
 * consumed saga messages go through jobs. */
int saga_store_shared(const struct saga_store *ss);
/* A shared backend may run a batch's jobs again (after a rollback or a
 * lost connection): it calls fn(arg, SAGA_BATCH_RUN) before the jobs of a
 * batch run and fn(arg, SAGA_BATCH_UNDO) when what they did was not
 * committed, so that the engine takes back what it counted. */
enum saga_batch_event {
	SAGA_BATCH_RUN,
	SAGA_BATCH_UNDO
};
typedef void saga_batch_fn(void *arg, enum saga_batch_event ev);
void saga_store_on_batch(struct saga_store *ss, saga_batch_fn *fn, void *arg);
/* The backend's own Prometheus families (its connection, its batches). */
struct evbuffer;
void saga_store_metrics(struct saga_store *ss, struct evbuffer *out);

/* A batch's edges (above): batch_end returns 0, or -1 when its writes did
 * not commit. */
void saga_store_batch_begin(struct saga_store *ss);
int saga_store_batch_end(struct saga_store *ss);

/* Reads: 1 found (r filled, saga_rec_clear it), 0 none, -1 error. */
int saga_store_get(struct saga_store *ss, const char *saga, const char *id,
    struct saga_rec *r);
int saga_store_get_row(struct saga_store *ss, int64_t row, struct saga_rec *r);
/* Every instance with this saga id (one per definition), oldest first. */
size_t saga_store_by_id(struct saga_store *ss, const char *id, int64_t *rows, size_t max);
/* Newest first; saga NULL and state < 0 match all. */
/* At start: stores the versions in put (those it has are kept as they
 * are), then calls fn for every version it has: 0, or -1. */
int saga_store_defs(struct saga_store *ss, const struct saga_def_rec *put, size_t n,
    void (*fn)(void *arg, const struct saga_def_rec *d), void *arg);
int saga_store_list(struct saga_store *ss, const struct saga_list_page *page,
    saga_rec_fn *fn, void *arg);
/* Instances by definition and state: fn gets saga, state and count in r. */
int saga_store_counts(struct saga_store *ss, saga_rec_fn *fn, void *arg);
int saga_store_history(struct saga_store *ss, int64_t row,
    void (*fn)(void *arg, const struct saga_hist *h), void *arg);

/* Writes, in the open write transaction: 0 or -1. insert sets r->row. */
int saga_store_insert(struct saga_store *ss, struct saga_rec *r);
int saga_store_update(struct saga_store *ss, const struct saga_rec *r);
int saga_store_log(struct saga_store *ss, int64_t row, double at, const char *dir,
    const char *what, const char *step, const char *message_id, const char *detail);

/* A message a step sends, stored to go out once the state change that
 * sent it commits (with it, in the same transaction); put assigns m->seq.
 * SAGA_SEND_CONSUMED: sent while handling a consumed message, which the
 * broker delivers again if a crash loses the transaction, so that it may
 * go out before the commit is durable (store.h: STORE_OUT_EARLY). */
enum {
	SAGA_SEND_CONSUMED = 1
};
int saga_store_send(struct saga_store *ss, struct msg *m, unsigned flags);

/* A reply to message_id (a command or compensation of saga_id) came, so
 * it went out, and every earlier message of the saga before it (a saga's
 * messages go out in order): a store whose relay deletes rows only after
 * their confirm may forget them now, in the batch's transaction (the
 * PostgreSQL store: the replica taking the saga's next step then hands
 * its row to its own relay at once, instead of leaving it to a claim
 * behind another replica's row). No-op in the SQLite store. */
void saga_store_delivered(struct saga_store *ss, const char *saga_id, const char *message_id);

/* Choreographed events that came before their saga's start, which with
 * competing replicas (a shared store) another replica may still hold:
 * keep returns 0 when the event is kept for the instance (saga, the
 * definition's name, and saga_id) for early_window, -1 when this store
 * keeps none (then it is an orphan); early_each hands the start's job each
 * event kept for that instance, once, and forgets it with the batch's
 * commit. Keyed by the definition too: an event that matches two
 * definitions is kept for each, and each start applies its own. */
int saga_store_keep_early(struct saga_store *ss, const struct msg *m, const char *saga,
    const char *saga_id);
void saga_store_early_each(struct saga_store *ss, const char *saga, const char *saga_id,
    void (*fn)(void *arg, const struct msg *m), void *arg);

/* Timers: one per (row, kind, step); set replaces it. */
int saga_store_timer_set(struct saga_store *ss, int64_t row, int kind, int step, double due);
int saga_store_timer_del(struct saga_store *ss, int64_t row, int kind, int step);
int saga_store_timer_del_all(struct saga_store *ss, int64_t row);
int saga_store_timer_spent(struct saga_store *ss, int64_t id);
/* The earliest due time, 0 when none. */
double saga_store_timer_next(struct saga_store *ss);
/* Timers due at now, earliest first. */
size_t saga_store_timers_due(struct saga_store *ss, double now, struct saga_due *out,
    size_t max);

/* Forget up to batch instances finished before `before` whose state is in
 * states (a mask: 1 << state), with their history and timers; fn sees
 * each (saga and state only) first. Returns how many went, or -1. */
int saga_store_expire(struct saga_store *ss, double before, unsigned states, int batch,
    saga_rec_fn *fn, void *arg);

#endif
