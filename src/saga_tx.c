/*
 * The saga engine's part of two-phase commit (sagad(8) TWO-PHASE COMMIT):
 * a transaction is a saga of a fixed shape (conf_tx.c), and what differs
 * from a saga's rules is here: presumed abort at start-up, the answer to
 * a participant in doubt, and the transaction's view for operators.
 *
 * Presumed abort. The decision is the pivot step, written with the COMMIT
 * messages in one store transaction that must be durable before they
 * leave (saga.c: a transaction's sends never go out early). A transaction
 * still preparing when this sagad starts has no decision logged: nobody
 * was told to commit, so it is aborted at once, and a participant that
 * voted yes gets its ABORT. Only with sagad's own store: with a store
 * shared by replicas another replica may be running the transaction right
 * now, and its prepare timeout decides instead.
 */
#include <jansson.h>
#include <stdlib.h>
#include <sys/types.h>
#include <string.h>

#include "conf.h"
#include "log.h"
#include "metrics.h"
#include "props.h"
#include "saga_int.h"
#include "sagad.h"
#include "util.h"
#include "xmalloc.h"

/* Instances looked at per job: the running ones of a transaction, a page
 * at a time (those past the decision stay running: the cursor moves on). */
#define SAGA_TX_BATCH 256

struct saga_tx_recovery {
	struct saga_engine *e;
	size_t def;		/* the transaction in conf->sagas */
	int64_t rows[SAGA_TX_BATCH];
	size_t n, aborted;
	double last_at;		/* the page's cursor: its last instance */
	char *last_saga, *last_id;
};

static void
saga_tx_collect(void *arg, const struct saga_rec *r)
{
	struct saga_tx_recovery *rc = arg;

	if (rc->n == SAGA_TX_BATCH)
		return;
	rc->rows[rc->n++] = r->row;
	rc->last_at = r->started_at;
	free(rc->last_saga);
	free(rc->last_id);
	rc->last_saga = xstrdup(r->saga);
	rc->last_id = xstrdup(r->id);
}

static void
saga_tx_recover_run(void *arg)
{
	struct saga_tx_recovery *rc = arg;
	struct saga_engine *e = rc->e;
	const struct conf_saga *def = &e->d->conf->sagas[rc->def];
	struct saga_list_page page = { .saga = def->name, .state = SAGA_RUNNING,
	    .limit = SAGA_TX_BATCH, .after_at = rc->last_at, .after_saga = rc->last_saga,
	    .after_id = rc->last_id };
	size_t i;

	rc->n = rc->aborted = 0;
	saga_store_list(e->ss, &page, saga_tx_collect, rc);
	for (i = 0; i < rc->n; i++) {
		struct saga_inst *in = saga_load_row(e, rc->rows[i]);

		if (!in)
			continue;
		if (in->def->transaction && in->state == SAGA_RUNNING && !saga_past_pivot(in)) {
			saga_log(e, in, "recovery", "presumed abort", NULL, NULL,
			    "no decision was logged before sagad stopped");
			saga_start_compensation(e, in, "presumed abort: no decision logged "
			    "before the coordinator stopped");
			saga_save(e, in);
			rc->aborted++;
		}
		saga_inst_free(in);
	}
}

static void
saga_tx_recover_done(void *arg, enum saga_job_result r)
{
	struct saga_tx_recovery *rc = arg;

	if (r != SAGA_JOB_DONE)
		log_error("presumed abort at start-up not committed: the prepare timeouts decide",
		    LOG_STR("transaction", rc->e->d->conf->sagas[rc->def].name));
	else if (rc->aborted)
		log_warn("transactions without a decision aborted at start-up (presumed abort)",
		    LOG_STR("transaction", rc->e->d->conf->sagas[rc->def].name),
		    LOG_UINT("count", rc->aborted));
	if (r != SAGA_JOB_DONE)
		rc->n = 0;	/* no further page */
}

/* One listing per transaction definition; a full page is followed by
 * another (the aborted ones are no longer running). */
void
saga_tx_recover(struct saga_engine *e)
{
	struct saga_tx_recovery rc = { .e = e };
	struct saga_job job = { .want = SAGA_WANT_LIST, .run = saga_tx_recover_run,
	    .done = saga_tx_recover_done, .arg = &rc };
	size_t i;

	if (saga_store_shared(e->ss))
		return;
	for (i = 0; i < e->d->conf->n_sagas; i++) {
		if (!e->d->conf->sagas[i].transaction)
			continue;
		rc.def = i;
		rc.last_at = 0;
		free(rc.last_saga);
		free(rc.last_id);
		rc.last_saga = rc.last_id = NULL;
		do	/* SQLite: run and done at once */
			saga_store_submit(e->ss, &job);
		while (rc.n == SAGA_TX_BATCH);
	}
	free(rc.last_saga);
	free(rc.last_id);
}

/* ---- a participant in doubt asks ---- */

/* No record of the transaction: it never started here, or it ended and
 * was forgotten after saga_retention. Never committed without a record,
 * so the answer is ABORT (presumed abort), with the id the ABORT of the
 * instance would have had, and no reply awaited. */
static void
saga_tx_abort_unknown(struct saga_engine *e, const struct conf_saga *def, const char *step,
    const char *id)
{
	const struct conf_saga_step *cs = NULL;
	char mid[512];
	struct msg m;
	size_t i;

	for (i = 0; i < def->n_steps; i++)
		if (strcmp(def->steps[i].name, step) == 0)
			cs = &def->steps[i];
	if (!cs || !cs->compensate.exchange) {
		log_warn("status question for a step that has no ABORT: ignored",
		    LOG_STR("transaction", def->name), LOG_STR("id", id), LOG_STR("step", step));
		return;
	}
	memset(&m, 0, sizeof m);
	saga_message_id_of(id, def->name, step, "compensate", mid, sizeof mid);
	m.message_id = mid;
	m.exchange = cs->compensate.exchange;
	m.routing_key = cs->compensate.key;
	m.props.correlation_id = xstrdup(id);
	props_set_header(&m.props, "x-sagad-saga", def->name);
	props_set_header(&m.props, "x-sagad-step", step);
	props_set_header(&m.props, "x-sagad-kind", "abort");
	if (saga_store_send(e->ss, &m, 0) == 0)
		log_warn("status question for an unknown transaction: ABORT sent (presumed abort)",
		    LOG_STR("transaction", def->name), LOG_STR("id", id), LOG_STR("step", step));
	props_free(&m.props);
}

static ssize_t
saga_tx_step(const struct conf_saga *def, const char *phase, const char *part)
{
	size_t i, n = strlen(phase);

	for (i = 0; i < def->n_steps; i++)
		if (strncmp(def->steps[i].name, phase, n) == 0 &&
		    strcmp(def->steps[i].name + n, part) == 0)
			return (ssize_t)i;
	return -1;
}

/* The decision is sent again to the participant that asks (the same
 * message as before: its inbox drops it if it has it already). */
void
saga_tx_status(struct saga_engine *e, const struct saga_match *k, const char *id)
{
	const struct conf_saga *def = &e->d->conf->sagas[k->saga];
	const char *part = strchr(k->step_name, ':');
	struct saga_inst *in;
	ssize_t prep, commit;
	char why[SAGA_DATA_ERR];

	if (!def->transaction || !part)
		return;
	part++;
	if (!(in = saga_load(e, k->saga, id))) {
		saga_tx_abort_unknown(e, def, k->step_name, id);
		return;
	}
	prep = saga_tx_step(in->def, "prepare:", part);
	commit = saga_tx_step(in->def, "commit:", part);
	if (prep < 0 || commit < 0) {
		saga_log(e, in, "in", "status: no such participant", k->step_name, NULL, NULL);
	} else if (saga_past_pivot(in)) {
		saga_log(e, in, "in", "status: COMMIT sent again", in->def->steps[commit].name,
		    NULL, NULL);
		if (saga_send_step(e, in, (size_t)commit, 0, why) < 0)
			saga_log(e, in, "in", "status: COMMIT not made", NULL, NULL, why);
	} else if (in->state == SAGA_RUNNING) {
		saga_log(e, in, "in", "status: no decision yet", k->step_name, NULL, NULL);
	} else {
		saga_log(e, in, "in", "status: ABORT sent again", k->step_name, NULL, NULL);
		if (saga_send_step(e, in, (size_t)prep, 1, why) < 0)
			saga_log(e, in, "in", "status: ABORT not made", NULL, NULL, why);
	}
	saga_save(e, in);
	saga_inst_free(in);
}

/* ---- as operators see it ---- */

const char *
saga_tx_state(const struct saga_inst *in)
{
	switch (in->state) {
	case SAGA_RUNNING:
		return saga_past_pivot(in) ? "committing" : "preparing";
	case SAGA_COMPLETED:
		return "committed";
	case SAGA_COMPENSATING:
		return "aborting";
	case SAGA_COMPENSATED:
		return "aborted";
	default:
		return "failed";
	}
}

/* A participant's vote, from its prepare step: one aborted before it
 * voted was never won (order 0). */
static const char *
saga_tx_vote(const struct saga_step_rt *st)
{
	switch (st->state) {
	case STEP_SUCCEEDED:
	case STEP_COMPENSATING:
	case STEP_COMPENSATED:
		return st->order ? "yes" : "none";
	case STEP_FAILED:
		return "no";
	case STEP_ACTIVE:
		return "awaited";
	default:
		return "none";
	}
}

/* Whether the participant acknowledged the decision: the commit step
 * succeeded, or the ABORT (the prepare's compensation) was confirmed;
 * "none" when the decision is not for it (it voted no, or never voted). */
static const char *
saga_tx_ack(const struct saga_inst *in, size_t prep, ssize_t commit, int decided, int past)
{
	enum saga_step_state p = in->steps[prep].state;

	if (!decided)
		return "none";
	if (past)
		return commit >= 0 && in->steps[commit].state == STEP_SUCCEEDED ?
		    "acknowledged" : "awaited";
	if (p == STEP_COMPENSATED)
		return "acknowledged";
	return p == STEP_COMPENSATING || p == STEP_SUCCEEDED ? "awaited" : "none";
}

/* The transaction's view of an instance (its state, decision, and each
 * participant's vote and acknowledgement), added to the saga's JSON. */
void *
saga_tx_json(const struct saga_inst *in)
{
	int past = saga_past_pivot(in);
	int decided = past || in->state == SAGA_COMPENSATING || in->state == SAGA_COMPENSATED ||
	    in->state == SAGA_FAILED;
	json_t *parts = json_array();
	size_t i;

	for (i = 0; i < in->def->n_steps; i++) {
		const char *name = in->def->steps[i].name;
		if (strncmp(name, "prepare:", 8) != 0)
			continue;
		json_array_append_new(parts, json_pack("{s:s,s:s,s:s}", "name", name + 8,
		    "vote", saga_tx_vote(&in->steps[i]),
		    "decision", saga_tx_ack(in, i, saga_tx_step(in->def, "commit:", name + 8),
		    decided, past)));
	}
	return json_pack("{s:s,s:s?,s:o}", "state", saga_tx_state(in),
	    "decision", past ? "commit" : decided ? "abort" : NULL, "participants", parts);
}

/* ---- abort ---- */

void
saga_tx_abort_all(struct saga_engine *e, struct saga_inst *in)
{
	int waiting = 0;
	size_t i;

	for (i = 0; i < in->def->n_steps && in->state == SAGA_COMPENSATING; i++) {
		struct saga_step_rt *st = &in->steps[i];
		if (st->state == STEP_SUCCEEDED && !in->def->steps[i].compensate.exchange)
			st->state = STEP_COMPENSATED;	/* the decision: nothing to undo */
		else if (st->state == STEP_SUCCEEDED)
			saga_send_compensation(e, in, i);
		waiting |= st->state == STEP_COMPENSATING;
	}
	if (in->state == SAGA_COMPENSATING && !waiting)
		saga_finish(e, in, SAGA_COMPENSATED);
}

/* ---- the decision's figures ---- */

void
saga_tx_decided(struct saga_engine *e, struct saga_inst *in, int commit)
{
	struct saga_stats *st = &e->stats[in->def_index];

	if (commit)
		st->commits++;
	else
		st->aborts++;
	histogram_observe(&st->prepare, util_now() - in->started_at);
	saga_log(e, in, "decision", commit ? "commit" : "abort", NULL, NULL,
	    commit ? "every participant voted yes" : in->reason);
}

void
saga_tx_metrics(struct saga_engine *e, struct evbuffer *out)
{
	const struct sagad_conf *c = e->d->conf;
	char labels[600];
	size_t i;

	metrics_family(out, "sagad_transactions_decided_total", "counter",
	    "Two-phase commits decided, by decision (logged before any COMMIT or ABORT left).");
	for (i = 0; i < c->n_sagas; i++) {
		if (!c->sagas[i].transaction)
			continue;
		snprintf(labels, sizeof labels, "transaction=\"%s\",decision=\"commit\"",
		    c->sagas[i].name);
		metrics_sample(out, "sagad_transactions_decided_total", labels,
		    (double)e->stats[i].commits);
		snprintf(labels, sizeof labels, "transaction=\"%s\",decision=\"abort\"",
		    c->sagas[i].name);
		metrics_sample(out, "sagad_transactions_decided_total", labels,
		    (double)e->stats[i].aborts);
	}
	metrics_family(out, "sagad_transaction_prepare_seconds", "histogram",
	    "Time from a transaction's start to its decision (the prepare phase).");
	for (i = 0; i < c->n_sagas; i++) {
		if (!c->sagas[i].transaction)
			continue;
		snprintf(labels, sizeof labels, "transaction=\"%s\"", c->sagas[i].name);
		metrics_histogram(out, "sagad_transaction_prepare_seconds", labels,
		    &e->stats[i].prepare);
	}
}
