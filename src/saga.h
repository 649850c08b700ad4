/*
 * The saga engine: correlates saga events by saga id (the AMQP
 * correlation_id), keeps each instance's state in the store, sends commands
 * (orchestrated) or watches events (choreographed), and compensates the
 * succeeded steps in reverse order on failure or timeout.
 *
 * Instance states:
 *
 *   running --all steps succeeded--> completed
 *      |  ^
 *      |  +--sagactl saga retry (failed after the pivot)--+
 *      |                                                  |
 *      +--a step after the pivot given up---------------> failed
 *      |
 *      +--failure, timeout, abort--> compensating --all confirmed--> compensated
 *                                        |    ^                          |
 *                   attempts exhausted   v    | sagactl saga retry,      | late success
 *                                      failed   late confirmation       v
 *                                                                  compensating
 *
 * Past its pivot step (sagad.conf(5): pivot) a saga no longer compensates:
 * the steps after the pivot are retried until they succeed, or the saga is
 * failed for an operator.
 *
 * These edges, and only they, are taken: saga_set_state (saga.c) refuses any
 * other, loudly. An instance is born running.
 */
#ifndef SAGAD_SAGA_H
#define SAGAD_SAGA_H

#include <stddef.h>

#include "msg.h"

struct sagad;
struct saga_engine;
struct evbuffer;
struct sagad_conf;

enum saga_state {
	SAGA_RUNNING,
	SAGA_COMPLETED,
	SAGA_COMPENSATING,
	SAGA_COMPENSATED,
	SAGA_FAILED,
	SAGA_NSTATES
};

enum saga_step_state {
	STEP_PENDING,		/* not started */
	STEP_ACTIVE,		/* command sent / waiting for its event */
	STEP_SUCCEEDED,
	STEP_FAILED,
	STEP_COMPENSATING,	/* compensation sent, waiting for success */
	STEP_COMPENSATED,
	STEP_SKIPPED,		/* its `when` was false: never run nor compensated */
	STEP_NSTATES
};

extern const char *const saga_state_names[SAGA_NSTATES];
extern const char *const saga_step_state_names[STEP_NSTATES];

/* What an incoming message means to the sagas (pure: tested and fuzzed). */
enum saga_input {
	SAGA_IN_START,		/* a saga's start event */
	SAGA_IN_REPLY,		/* a reply to a command or a compensation */
	SAGA_IN_SUCCESS,	/* a choreographed step's success event */
	SAGA_IN_FAILURE,	/* a choreographed step's failure event */
	SAGA_IN_COMP_SUCCESS,	/* its compensation's success event */
	SAGA_IN_COMP_FAILURE,	/* its compensation's failure event */
	SAGA_IN_STATUS		/* a transaction's participant in doubt asks */
};

struct saga_match {
	enum saga_input input;
	size_t saga;		/* index in conf->sagas */
	size_t step;		/* for REPLY, SUCCESS, FAILURE, COMP_*: in the
				 * definition it matched (SAGA_STEP_BY_NAME: none) */
	const char *step_name;	/* the same step (the message's or the conf's) */
	int compensation;	/* REPLY: to a compensation; COMP_* */
	int success;		/* REPLY: x-sagad-outcome = success */
};

#define SAGA_STEP_BY_NAME ((size_t)-1)

/* Fills up to max matches; returns how many (0: not a saga message). */
size_t saga_classify(const struct sagad_conf *conf, const struct msg *m,
    struct saga_match *out, size_t max);
/* The choreographed step events of one definition sg (of index in
 * conf->sagas, by name): an older version's, whose bindings may differ. */
struct conf_saga;
struct conf_binding;
size_t saga_classify_events(const struct conf_saga *sg, size_t index, const struct msg *m,
    struct saga_match *out, size_t max);
int saga_binding_is(const struct conf_binding *b, const struct msg *m);

struct saga_engine *saga_new(struct sagad *d, char **err);
void saga_free(struct saga_engine *e);
/* The delivery handler of the internal subscription (the SQLite store:
 * in the inbox's transaction). */
void saga_handle(void *arg, const struct msg *m);
/* With a shared store (saga_store_shared): the consumed message m (owned
 * from here) is handled in a job; settle says whether it committed
 * (enum saga_job_result). */
typedef void saga_settle_fn(void *arg, int result);
void saga_take(struct saga_engine *e, struct msg *m, saga_settle_fn *settle, void *arg);
int saga_shared(const struct saga_engine *e);

/* Admin. The answer comes through fn: at once with the SQLite store, after
 * the store's round trips with a shared one. status 200 with json (a
 * jansson json_t *, fn owns it); 404 no instance with this id (get); 409
 * none in the state the command needs (retry: failed, abort: running);
 * 503 the store did not answer or commit. */
typedef void saga_answer_fn(void *arg, int status, void *json);
struct saga_list_page;
/* A page of instances (saga_store.h: struct saga_list_page, copied); the
 * answer's "next" is the cursor of the page after it, null at the end. */
void saga_list(struct saga_engine *e, const struct saga_list_page *page, saga_answer_fn *fn,
    void *arg);
/* The same, of transactions only (the key "transactions"), in tx_state
 * (preparing, committing, committed, aborting, aborted, failed; NULL: any). */
void saga_list_tx(struct saga_engine *e, const struct saga_list_page *page, const char *tx_state,
    saga_answer_fn *fn, void *arg);
/* A "next" cursor into page's after_* (malloc'd into *saga and *id): 0, or
 * -1 when it is malformed. */
int saga_list_cursor(const char *cursor, struct saga_list_page *page, char **saga, char **id);
void saga_get(struct saga_engine *e, const char *id, saga_answer_fn *fn, void *arg);
/* retry (1) a failed saga's compensation or abort (0) a running saga. */
void saga_command(struct saga_engine *e, const char *id, int retry, saga_answer_fn *fn,
    void *arg);
void saga_metrics(struct saga_engine *e, struct evbuffer *out);
int saga_state_from_name(const char *name);
/* Whether the diagram above has the edge from -> to. */
int saga_edge_allowed(enum saga_state from, enum saga_state to);
int saga_expire(struct saga_engine *e, double before, int batch);

#endif
