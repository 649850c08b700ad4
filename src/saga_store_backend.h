/*
 * Inside the saga store: the table of operations a backend implements
 * behind saga_store.h (the split of OpenSMTPD's queue.c and
 * queue_backend.c). saga_store.c keeps the public calls and forwards them;
 * saga_store_sqlite.c is the backend on sagad's own SQLite store. The
 * engine never includes this file, so it cannot tell which backend runs.
 * Each backend defines struct saga_backend, its own state, for itself.
 */
#ifndef SAGAD_SAGA_STORE_BACKEND_H
#define SAGAD_SAGA_STORE_BACKEND_H

#include "saga_store.h"

struct saga_backend;
struct evbuffer;

/* One per call of saga_store.h, same arguments and results (saga_store.h
 * says what each means); batch_begin and batch_end may be NULL for a
 * backend with nothing to do at a batch's edges. */
struct saga_store_ops {
	int (*get)(struct saga_backend *b, const char *saga, const char *id,
	    struct saga_rec *r);
	int (*get_row)(struct saga_backend *b, int64_t row, struct saga_rec *r);
	size_t (*by_id)(struct saga_backend *b, const char *id, int64_t *rows, size_t max);
	int (*list)(struct saga_backend *b, const struct saga_list_page *page,
	    saga_rec_fn *fn, void *arg);
	int (*counts)(struct saga_backend *b, saga_rec_fn *fn, void *arg);
	int (*defs)(struct saga_backend *b, const struct saga_def_rec *put, size_t n,
	    void (*fn)(void *arg, const struct saga_def_rec *d), void *arg);
	int (*history)(struct saga_backend *b, int64_t row,
	    void (*fn)(void *arg, const struct saga_hist *h), void *arg);
	int (*insert)(struct saga_backend *b, struct saga_rec *r);
	int (*update)(struct saga_backend *b, const struct saga_rec *r);
	int (*log)(struct saga_backend *b, int64_t row, double at, const char *dir,
	    const char *what, const char *step, const char *message_id, const char *detail);
	int (*send)(struct saga_backend *b, struct msg *m, unsigned flags);
	/* NULL: the outbox needs no help (the SQLite store's one relay). */
	void (*delivered)(struct saga_backend *b, const char *saga_id, const char *message_id);
	/* NULL: no early events (the SQLite store's single consumer). */
	int (*keep_early)(struct saga_backend *b, const struct msg *m, const char *saga,
	    const char *saga_id);
	void (*early_each)(struct saga_backend *b, const char *saga, const char *saga_id,
	    void (*fn)(void *arg, const struct msg *m), void *arg);
	int (*timer_set)(struct saga_backend *b, int64_t row, int kind, int step, double due);
	int (*timer_del)(struct saga_backend *b, int64_t row, int kind, int step);
	int (*timer_del_all)(struct saga_backend *b, int64_t row);
	int (*timer_spent)(struct saga_backend *b, int64_t id);
	double (*timer_next)(struct saga_backend *b);
	size_t (*timers_due)(struct saga_backend *b, double now, struct saga_due *out,
	    size_t max);
	int (*expire)(struct saga_backend *b, double before, unsigned states, int batch,
	    saga_rec_fn *fn, void *arg);
	/* NULL: saga_store.c runs the job at once inside batch_begin/end. */
	void (*submit)(struct saga_backend *b, const struct saga_job *job);
	int shared;
	/* NULL: jobs never run twice. */
	void (*on_batch)(struct saga_backend *b, saga_batch_fn *fn, void *arg);
	/* NULL: nothing of its own to show. */
	void (*metrics)(struct saga_backend *b, struct evbuffer *out);
	void (*batch_begin)(struct saga_backend *b);
	int (*batch_end)(struct saga_backend *b);
	void (*close)(struct saga_backend *b);
};

/* The SQLite backend (saga_store_sqlite.c). */
extern const struct saga_store_ops saga_store_sqlite_ops;
struct saga_backend *saga_store_sqlite_open(struct store *st, char **err);

/* The PostgreSQL backend (saga_store_pgsql.c, saga_pgsql_batch.c). */
extern const struct saga_store_ops saga_store_pgsql_ops;
/* replica_id: the local store's (store_replica_id), which names this
 * sagad's life in PostgreSQL with the time it started. */
struct saga_backend *saga_store_pgsql_open(struct event_base *base,
    const struct sagad_conf *conf, const char *replica_id, struct otel *otel, char **err);

/* A store on any backend, b owned by it (saga_store_open picks the
 * backend; the unit tests give their own). */
struct saga_store *saga_store_new(const struct saga_store_ops *ops, struct saga_backend *b);

#endif
