/*
 * The saga engine's part of two-phase commit (sagad(8) TWO-PHASE COMMIT):
 * a transaction is a saga of a fixed shape (conf_tx.c), and what differs
 * from a saga's rules is here.
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
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "log.h"
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
