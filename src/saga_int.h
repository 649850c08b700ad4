/*
 * What the saga engine's files share (not for other modules): the
 * in-memory instance and the engine. saga.c is the engine (classification,
 * the state machine, transitions, messages out, timers); saga_record.c the
 * encoding of an instance for the store; saga_admin.c the operators' views
 * and commands and the metrics. Instance states change only in
 * saga_set_state (saga.c), whoever asks.
 */
#ifndef SAGAD_SAGA_INT_H
#define SAGAD_SAGA_INT_H

#include <msgpack.h>
#include <stdint.h>
#include <sys/types.h>

#include "metrics.h"
#include "saga.h"
#include "saga_data.h"
#include "saga_store.h"

struct conf_saga;
struct sagad_conf;

enum saga_timer_kind {
	TIMER_SAGA,		/* the whole saga's deadline */
	TIMER_STEP,		/* a command's reply is late: resend or fail */
	TIMER_COMPENSATE	/* a compensation's reply is late, or its retry is due */
};

struct saga_step_rt {
	enum saga_step_state state;
	unsigned attempts;	/* command sends */
	unsigned comp_attempts;
	unsigned order;		/* 1-based order of success; 0: never */
	double sent_at;		/* its latest command or compensation, for its span */
	unsigned comp_sends;	/* compensations sent, never reset (an operator's
				 * retry resets comp_attempts): a compensation by
				 * event is a new message id each time */
	char *body;		/* the message that completed the step */
	size_t body_len;
	char *ct;
};

/* A version of a saga definition (saga_version.c): the configuration's
 * (versions[i] for conf->sagas[i]), or an older one from the store. */
struct saga_version {
	char version[16 + 1];		/* SAGA_DEF_VERSION_LEN */
	size_t def_index;		/* the configuration's saga of this name */
	const struct conf_saga *def;
	struct conf_saga *owned;	/* an older version: parsed, freed here */
};

struct saga_inst {
	int64_t row;		/* 0: not stored yet */
	const struct conf_saga *def;	/* the definition of its version */
	const char *version;	/* that version (the engine's) */
	size_t def_index;
	char *id;
	enum saga_state state;
	unsigned cur;		/* orchestrated: the step in progress */
	unsigned order;		/* successes so far */
	char *body;		/* the start event */
	size_t body_len;
	char *ct;
	char *reason;		/* why it compensates or failed */
	char *trace_parent;	/* the start event's W3C context: every */
	char *trace_state;	/* message the saga sends carries it */
	double started_at;
	double updated_at, finished_at;	/* as read, for the admin API */
	enum saga_state loaded;		/* state in the store before this change */
	struct saga_step_rt *steps;
};

struct saga_stats {
	uint64_t started, compensations, failed, orphans, duplicates;
	int64_t states[SAGA_NSTATES];	/* instances in the store, kept as they change */
	struct histogram duration;
	/* A transaction's: its decisions, and the time from start to each
	 * (the prepare phase). */
	uint64_t commits, aborts;
	struct histogram prepare;
};

struct saga_engine {
	struct sagad *d;
	struct saga_store *ss;		/* its records (saga_store.h) */
	struct event *timer_ev;
	double timer_at;
	struct saga_stats *stats;	/* per saga definition */
	uint64_t orphans;
	uint64_t early;		/* events kept for a start not yet applied */
	struct saga_version **versions;	/* the configuration's (versions[i] for
					 * conf->sagas[i]), then the others */
	size_t nversions;
	/* Handling a consumed message (saga_handle): what it sends may go out
	 * before the fsync (SAGA_SEND_CONSUMED), for the broker, not acked yet,
	 * delivers the message again if a crash of the machine loses the
	 * transaction, and the same state and message make the same messages,
	 * with the same ids. Timers and operators' commands wait for it. */
	int consumed;
	int timer_job;		/* a round of timers is submitted, not done */
	/* What the counters were before a shared store's batch ran, put
	 * back if it does not commit (saga_store_on_batch). */
	struct saga_stats *stats_before;
	uint64_t orphans_before, early_before;
};
/* ---- saga_version.c ---- */

/* Stores the configured versions, reads back the older ones: 0 or -1. */
int saga_versions_load(struct saga_engine *e);
/* The version of saga def named version (NULL: the current); NULL when
 * the store has no such version. */
const struct saga_version *saga_version_find(struct saga_engine *e, size_t def,
    const char *version);
void saga_versions_free(struct saga_engine *e);

/* ---- saga_record.c: an instance and its encoding ---- */

struct saga_inst *saga_inst_new(const struct saga_version *v, const char *id);
/* The version a stored instance names: 1 (into out), 0 none (written before
 * versions: the current one), -1 malformed. */
int saga_peek_version(const char *buf, size_t len, char out[16 + 1]);
void saga_inst_free(struct saga_inst *in);
/* sb is initialised here; the caller destroys it. */
void saga_pack(const struct saga_inst *in, msgpack_sbuffer *sb);
/* Decode a stored instance; -1 on anything malformed (damage). */
int saga_unpack(struct saga_inst *in, const char *buf, size_t len);

/* Completed or compensated (failed waits for an operator). */
static inline int
saga_finished(enum saga_state s)
{
	return s == SAGA_COMPLETED || s == SAGA_COMPENSATED;
}

/* ---- saga_record.c: an instance's record in the store ---- */

ssize_t saga_def_index(const struct sagad_conf *c, const char *name);
/* NULL: the definition is gone or the record is damaged (logged). */
struct saga_inst *saga_from_rec(struct saga_engine *e, const struct saga_rec *r);
struct saga_inst *saga_load(struct saga_engine *e, size_t def, const char *id);
struct saga_inst *saga_load_row(struct saga_engine *e, int64_t row);
/* What the instance offers the templates and conditions of its steps. */
struct saga_data_src;
void saga_data_of(const struct saga_inst *in, struct saga_data_src *src);
/* Inserts or updates the record and the per-state counts. */
void saga_save(struct saga_engine *e, struct saga_inst *in);
/* One line of the instance's history (saved first if new). */
void saga_log(struct saga_engine *e, struct saga_inst *in, const char *dir, const char *what,
    const char *step, const char *message_id, const char *detail);

/* ---- saga.c: the engine, as its other files use it ---- */

struct conf_binding;
struct msg;
int saga_set_state(struct saga_engine *e, struct saga_inst *in, enum saga_state to,
    const char *step, const char *why);
/* Completed or compensated: the outcome event, then the state. */
void saga_finish(struct saga_engine *e, struct saga_inst *in, enum saga_state state);
/* A message of the saga (kind: x-sagad-kind; what: the history's and the
 * message id's word), stored to go out with the state change; reply:
 * with reply_to the saga's queue. */
void saga_send(struct saga_engine *e, struct saga_inst *in, const struct conf_binding *to,
    const char *kind, const char *step, const char *what, const char *body,
    size_t len, const char *ct, int reply);
/* Step i succeeded with m (its reply or event), kept for its compensation. */
void saga_step_succeeded(struct saga_engine *e, struct saga_inst *in, size_t i,
    const struct msg *m);
/* Like saga_send, with extra headers (a JSON object of strings, or NULL). */
void saga_send_with(struct saga_engine *e, struct saga_inst *in, const struct conf_binding *to,
    const char *kind, const char *step, const char *what, const char *body,
    size_t len, const char *ct, const char *headers, int reply);
/* Step i's command (comp 0) or compensation (comp 1), made from its
 * templates (saga_data.h): 0, or -1 with why, nothing sent. */
int saga_send_step(struct saga_engine *e, struct saga_inst *in, size_t i, int comp,
    char why[SAGA_DATA_ERR]);
/* The saga's pivot step succeeded: no compensation any more. */
int saga_past_pivot(const struct saga_inst *in);
/* After the pivot: step i refused (refused 1) or unanswered: sent again
 * after a backoff, or the saga is failed once retry_attempts are spent. */
void saga_retry_later(struct saga_engine *e, struct saga_inst *in, size_t i, int refused);
/* Past the pivot, a failed saga running again (an operator's retry, or a
 * late success of step except; (size_t)-1: none): the steps still active
 * are sent again with a fresh count, and the steps still pending run from
 * the first of them (the rest of the group in progress, or the next
 * group once nothing waits). */
void saga_resume_forward(struct saga_engine *e, struct saga_inst *in, size_t except);
/* Step i's command (again): the step is active, its reply awaited. */
void saga_send_command(struct saga_engine *e, struct saga_inst *in, unsigned i);

/* ---- saga_timer.c: timers ---- */

void saga_timer_add(struct saga_engine *e, struct saga_inst *in, enum saga_timer_kind kind,
    int step, double due);
void saga_timer_del(struct saga_engine *e, struct saga_inst *in, enum saga_timer_kind kind,
    int step);
void saga_timer_del_all(struct saga_engine *e, struct saga_inst *in);
/* The libevent timer armed again for the store's earliest timer. */
void saga_rearm(struct saga_engine *e);
/* The libevent timer's callback: a round of due timers, as one job. */
void saga_timer_cb(int fd, short what, void *arg);

/* ---- saga_compensate.c: the backward path ---- */

void saga_start_compensation(struct saga_engine *e, struct saga_inst *in, const char *reason);
/* The id of a saga's message: the same for one saga, step and purpose. */
void saga_message_id_of(const char *saga_id, const char *saga, const char *step,
    const char *what, char *out, size_t len);
/* saga_tx.c: at start-up, the transactions without a logged decision are
 * aborted (presumed abort; sagad's own store only). */
void saga_tx_recover(struct saga_engine *e);
/* saga_tx.c: a participant in doubt asks for transaction id's decision. */
struct saga_match;
void saga_tx_status(struct saga_engine *e, const struct saga_match *k, const char *id);
/* saga_tx.c: a transaction's ABORTs, to every participant that voted yes
 * or has not voted, all at once (a saga compensates one step at a time);
 * aborted once all are acknowledged. */
void saga_tx_abort_all(struct saga_engine *e, struct saga_inst *in);
/* saga_tx.c: a transaction's decision is taken (counted, timed, logged). */
void saga_tx_decided(struct saga_engine *e, struct saga_inst *in, int commit);
/* saga_tx.c: its Prometheus families. */
void saga_tx_metrics(struct saga_engine *e, struct evbuffer *out);
/* saga_tx.c: preparing, committing, committed, aborting, aborted, failed;
 * and the transaction's JSON view (a jansson json_t *). */
const char *saga_tx_state(const struct saga_inst *in);
void *saga_tx_json(const struct saga_inst *in);
/* The next step to undo, or compensated when none is left. */
void saga_compensate_next(struct saga_engine *e, struct saga_inst *in);
void saga_send_compensation(struct saga_engine *e, struct saga_inst *in, size_t i);
/* Failed, for an operator: the compensation of step i is given up. */
void saga_compensation_exhausted(struct saga_engine *e, struct saga_inst *in, size_t i,
    const char *how);
void saga_on_compensation_reply(struct saga_engine *e, struct saga_inst *in, size_t i,
    int success, const struct msg *m);
/* Step i succeeded after the compensation started: undone too. */
void saga_late_success(struct saga_engine *e, struct saga_inst *in, size_t i,
    const struct msg *m);
/* The per-state gauges read from the store again. */
void saga_counts_refresh(struct saga_engine *e);

/* saga_trace.c: the saga's spans (otel.h), and the context of the
 * messages it sends (kind "command", "compensation" or "event"). */
struct props;
void saga_trace_out(struct saga_engine *e, const struct saga_inst *in, struct props *p,
    const char *kind, const char *step);
void saga_trace_step(struct saga_engine *e, const struct saga_inst *in, size_t i,
    int compensation, const char *error);
void saga_trace_end(struct saga_engine *e, const struct saga_inst *in);

#endif
