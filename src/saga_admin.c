/*
 * The saga engine as operators see it: the JSON views of the admin API
 * (list, get with history), retry and abort (which change states only
 * through saga_set_state), the Prometheus families and the expiry of
 * finished instances.
 */
#include <event2/buffer.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "metrics.h"
#include "saga_int.h"
#include "saga_store.h"
#include "sagad.h"
#include "xmalloc.h"

/* ---- admin ---- */

static void
saga_hist_json(void *arg, const struct saga_hist *h)
{
	json_array_append_new(arg, json_pack("{s:f,s:s,s:s,s:s,s:s,s:s}", "at", h->at,
	    "dir", h->dir, "what", h->what, "step", h->step, "message_id", h->message_id,
	    "detail", h->detail));
}

/* What a step does going forward (the web page draws each its way). */
static const char *
saga_step_kind(const struct conf_saga_step *cs)
{
	if (cs->notify)
		return "notification";
	if (cs->command.exchange)
		return "command";
	if (cs->success.exchange)
		return "event";
	return "compensation-only";
}

static json_t *
saga_inst_json(struct saga_engine *e, struct saga_inst *in, double updated, double finished,
    int history)
{
	json_t *steps = json_array(), *j;
	size_t i;

	for (i = 0; i < in->def->n_steps; i++)
		json_array_append_new(steps, json_pack("{s:s,s:s,s:s,s:i,s:i}",
		    "name", in->def->steps[i].name, "kind", saga_step_kind(&in->def->steps[i]),
		    "state", saga_step_state_names[in->steps[i].state],
		    "attempts", (int)in->steps[i].attempts,
		    "compensate_attempts", (int)in->steps[i].comp_attempts));
	j = json_pack("{s:s,s:s,s:s,s:s,s:s?,s:f,s:f,s:f,s:o}",
	    "saga", in->def->name, "id", in->id, "state", saga_state_names[in->state],
	    "mode", in->def->mode == SAGA_ORCHESTRATED ? "orchestrated" : "choreographed",
	    "reason", in->reason, "started_at", in->started_at, "updated_at", updated,
	    "finished_at", finished, "steps", steps);
	json_object_set_new(j, "version", json_string(in->version));
	if (in->def->transaction)
		json_object_set_new(j, "transaction", saga_tx_json(in));
	if (in->trace_parent)	/* valid: saga_unpack checked it */
		json_object_set_new(j, "trace_id", json_stringn(in->trace_parent + 3, 32));
	if (history) {
		json_t *h = json_array();
		saga_store_history(e->ss, in->row, saga_hist_json, h);
		json_object_set_new(j, "history", h);
	}
	return j;
}

int
saga_state_from_name(const char *name)
{
	int i;

	for (i = 0; i < SAGA_NSTATES; i++)
		if (strcmp(saga_state_names[i], name) == 0)
			return i;
	return -1;
}

struct saga_list_ctx {
	struct saga_engine *e;
	json_t *list;
	char *last;		/* the next page's cursor */
	size_t n;
	int tx_only;		/* transactions only, */
	const char *tx_state;	/* in this state of theirs (NULL: any) */
};

/* The cursor of the page after the one that ended at r: its
 * (started_at, saga, id), as "STARTED~SAGA~ID" (a saga name has no ~). */
static void
saga_list_one_cursor(struct saga_list_ctx *c, const struct saga_rec *r)
{
	free(c->last);
	c->last = xasprintf("%.17g~%s~%s", r->started_at, r->saga, r->id);
	c->n++;
}

static void
saga_list_one(void *arg, const struct saga_rec *r)
{
	struct saga_list_ctx *c = arg;
	struct saga_inst *in = saga_from_rec(c->e, r);

	saga_list_one_cursor(c, r);
	if (in && c->tx_only && (!in->def->transaction ||
	    (c->tx_state && strcmp(c->tx_state, saga_tx_state(in)) != 0))) {
		saga_inst_free(in);
		return;
	}
	if (in)
		json_array_append_new(c->list, saga_inst_json(c->e, in, in->updated_at,
		    in->finished_at, 0));
	saga_inst_free(in);
}

/* A page of instances; tx_only: of transactions (in tx_state, NULL: any),
 * filtered after the store's page, so that a page may hold fewer than
 * the limit and still have a next one. */
static json_t *
saga_list_json(struct saga_engine *e, const struct saga_list_page *page, int tx_only,
    const char *tx_state)
{
	struct saga_list_ctx c = { e, json_array(), NULL, 0, tx_only, tx_state };
	json_t *j;

	saga_store_list(e->ss, page, saga_list_one, &c);
	/* A full page may have a next one; a short one is the last. */
	j = json_pack("{s:o,s:s?}", tx_only ? "transactions" : "sagas", c.list, "next",
	    c.n == page->limit && page->limit ? c.last : NULL);
	free(c.last);
	return j;
}

int
saga_list_cursor(const char *cursor, struct saga_list_page *page, char **saga, char **id)
{
	const char *t1 = strchr(cursor, '~'), *t2 = t1 ? strchr(t1 + 1, '~') : NULL;
	char *end;

	if (!t1 || !t2 || t2 == t1 + 1)
		return -1;
	page->after_at = strtod(cursor, &end);
	if (end != t1)
		return -1;
	*saga = xstrndup(t1 + 1, (size_t)(t2 - t1 - 1));
	*id = xstrdup(t2 + 1);
	page->after_saga = *saga;
	page->after_id = *id;
	return 0;
}

static json_t *
saga_get_json(struct saga_engine *e, const char *id)
{
	int64_t rows[64];
	size_t n = saga_store_by_id(e->ss, id, rows, 64), i;
	json_t *list = json_array();

	for (i = 0; i < n; i++) {
		struct saga_inst *in = saga_load_row(e, rows[i]);
		if (!in)
			continue;
		json_array_append_new(list, saga_inst_json(e, in, in->updated_at, in->finished_at, 1));
		saga_inst_free(in);
	}
	if (!json_array_size(list)) {
		json_decref(list);
		return NULL;
	}
	return json_pack("{s:s,s:o}", "id", id, "instances", list);
}

static int
saga_retry(struct saga_engine *e, const char *id)
{
	int64_t rows[64];
	size_t n = saga_store_by_id(e->ss, id, rows, 64), i, j;
	int done = 0;

	for (i = 0; i < n; i++) {
		struct saga_inst *in = saga_load_row(e, rows[i]);
		if (!in)
			continue;
		if (in->state == SAGA_FAILED && saga_past_pivot(in)) {
			/* Forward again: the steps given up are sent again. */
			saga_log(e, in, "admin", "retry", NULL, NULL, "sagactl saga retry");
			saga_set_state(e, in, SAGA_RUNNING, NULL, "retried by an operator");
			saga_resume_forward(e, in, (size_t)-1);
			saga_save(e, in);
			done++;
		} else if (in->state == SAGA_FAILED) {
			saga_log(e, in, "admin", "retry", NULL, NULL, "sagactl saga retry");
			saga_set_state(e, in, SAGA_COMPENSATING, NULL, "retried by an operator");
			for (j = 0; j < in->def->n_steps; j++)
				if (in->steps[j].state == STEP_COMPENSATING) {
					in->steps[j].comp_attempts = 0;
					in->steps[j].state = STEP_SUCCEEDED;
				}
			saga_compensate_next(e, in);
			saga_save(e, in);
			done++;
		}
		saga_inst_free(in);
	}
	return done;
}

static int
saga_abort(struct saga_engine *e, const char *id)
{
	int64_t rows[64];
	size_t n = saga_store_by_id(e->ss, id, rows, 64), i;
	int done = 0;

	for (i = 0; i < n; i++) {
		struct saga_inst *in = saga_load_row(e, rows[i]);
		if (!in)
			continue;
		if (in->state == SAGA_RUNNING && !saga_past_pivot(in)) {
			saga_log(e, in, "admin", "abort", NULL, NULL, "sagactl saga abort");
			saga_start_compensation(e, in, "aborted by an operator");
			saga_save(e, in);
			done++;
		}
		saga_inst_free(in);
	}
	return done;
}

/* An operator's question or command is one job of the store (saga_store.h):
 * answered at once with SQLite, after the round trips with a shared
 * store, and only once what it changed committed. */
enum saga_ask_kind {
	ASK_LIST,
	ASK_GET,
	ASK_RETRY,
	ASK_ABORT
};

struct saga_ask {
	struct saga_engine *e;
	enum saga_ask_kind kind;
	int tx_only;		/* ASK_LIST: transactions only */
	char *id, *name, *after_saga, *after_id, *tx_state;
	struct saga_list_page page;	/* ASK_LIST, pointing into the strings above */
	json_t *json;		/* the answer, built by run */
	int status;
	saga_answer_fn *fn;
	void *arg;
};

static void
saga_ask_run(void *arg)
{
	struct saga_ask *q = arg;
	int n;

	json_decref(q->json);	/* a batch run again after a lost connection */
	q->json = NULL;
	q->status = 200;
	switch (q->kind) {
	case ASK_LIST:
		q->json = saga_list_json(q->e, &q->page, q->tx_only, q->tx_state);
		break;
	case ASK_GET:
		q->json = saga_get_json(q->e, q->id);
		if (!q->json)
			q->status = 404;
		break;
	case ASK_RETRY:
	case ASK_ABORT:
		n = q->kind == ASK_RETRY ? saga_retry(q->e, q->id) : saga_abort(q->e, q->id);
		if (n == 0)
			q->status = 409;
		else
			q->json = json_pack("{s:s,s:s,s:i}", "id", q->id,
			    "action", q->kind == ASK_RETRY ? "retry" : "abort", "instances", n);
		break;
	}
}

static void
saga_ask_done(void *arg, enum saga_job_result r)
{
	struct saga_ask *q = arg;

	if (r != SAGA_JOB_DONE) {
		json_decref(q->json);
		q->json = NULL;
		q->status = 503;
	}
	q->fn(q->arg, q->status, q->json);
	free(q->id);
	free(q->name);
	free(q->after_saga);
	free(q->after_id);
	free(q->tx_state);
	free(q);
}

static void
saga_ask(struct saga_engine *e, struct saga_ask *q, saga_answer_fn *fn, void *arg)
{
	struct saga_job job = { .run = saga_ask_run, .done = saga_ask_done, .arg = q };

	q->e = e;
	q->fn = fn;
	q->arg = arg;
	if (q->id) {
		job.ids[job.n_ids++] = q->id;
		job.want = q->kind == ASK_GET ? SAGA_WANT_HISTORY : 0;
	}
	if (q->kind == ASK_LIST) {
		job.want = SAGA_WANT_LIST;
		job.list = q->page;
	}
	saga_store_submit(e->ss, &job);
}

static void saga_list_ask(struct saga_engine *e, const struct saga_list_page *page,
    struct saga_ask *q, saga_answer_fn *fn, void *arg);

void
saga_list(struct saga_engine *e, const struct saga_list_page *page, saga_answer_fn *fn,
    void *arg)
{
	saga_list_ask(e, page, xcalloc(1, sizeof(struct saga_ask)), fn, arg);
}

void
saga_list_tx(struct saga_engine *e, const struct saga_list_page *page, const char *tx_state,
    saga_answer_fn *fn, void *arg)
{
	struct saga_ask *q = xcalloc(1, sizeof *q);

	q->tx_only = 1;
	q->tx_state = tx_state ? xstrdup(tx_state) : NULL;
	saga_list_ask(e, page, q, fn, arg);
}

static void
saga_list_ask(struct saga_engine *e, const struct saga_list_page *page, struct saga_ask *q,
    saga_answer_fn *fn, void *arg)
{
	q->kind = ASK_LIST;
	q->page = *page;
	q->name = page->saga ? xstrdup(page->saga) : NULL;
	q->page.saga = q->name;
	if (page->after_saga) {
		q->after_saga = xstrdup(page->after_saga);
		q->after_id = xstrdup(page->after_id);
		q->page.after_saga = q->after_saga;
		q->page.after_id = q->after_id;
	}
	saga_ask(e, q, fn, arg);
}

void
saga_get(struct saga_engine *e, const char *id, saga_answer_fn *fn, void *arg)
{
	struct saga_ask *q = xcalloc(1, sizeof *q);

	q->kind = ASK_GET;
	q->id = xstrdup(id);
	saga_ask(e, q, fn, arg);
}

void
saga_command(struct saga_engine *e, const char *id, int retry, saga_answer_fn *fn, void *arg)
{
	struct saga_ask *q = xcalloc(1, sizeof *q);

	q->kind = retry ? ASK_RETRY : ASK_ABORT;
	q->id = xstrdup(id);
	saga_ask(e, q, fn, arg);
}

void
saga_metrics(struct saga_engine *e, struct evbuffer *out)
{
	const struct sagad_conf *c = e->d->conf;
	char labels[600];
	size_t i;
	int k;

	if (saga_store_shared(e->ss))
		saga_counts_refresh(e);
	metrics_family(out, "sagad_sagas", "gauge", "Saga instances in the store by state.");
	for (i = 0; i < c->n_sagas; i++)
		for (k = 0; k < SAGA_NSTATES; k++) {
			snprintf(labels, sizeof labels, "saga=\"%s\",state=\"%s\"", c->sagas[i].name,
			    saga_state_names[k]);
			metrics_sample(out, "sagad_sagas", labels, (double)e->stats[i].states[k]);
		}
#define PER_SAGA(mname, help, field)						\
	do {									\
		metrics_family(out, mname, "counter", help);			\
		for (i = 0; i < c->n_sagas; i++) {				\
			snprintf(labels, sizeof labels, "saga=\"%s\"", c->sagas[i].name); \
			metrics_sample(out, mname, labels, (double)e->stats[i].field); \
		}								\
	} while (0)
	PER_SAGA("sagad_sagas_started_total", "Saga instances started.", started);
	PER_SAGA("sagad_saga_compensations_total", "Compensations started.", compensations);
	PER_SAGA("sagad_saga_failed_total", "Sagas whose compensation was exhausted.", failed);
	PER_SAGA("sagad_saga_duplicates_total", "Saga messages that changed nothing (repeats).",
	    duplicates);
#undef PER_SAGA
	metrics_family(out, "sagad_saga_orphans_total", "counter",
	    "Messages for unknown or finished sagas, acked and ignored.");
	metrics_sample(out, "sagad_saga_orphans_total", "", (double)e->orphans);
	metrics_family(out, "sagad_saga_early_total", "counter",
	    "Choreographed events kept until their saga's start (shared store).");
	metrics_sample(out, "sagad_saga_early_total", "", (double)e->early);
	saga_store_metrics(e->ss, out);
	metrics_family(out, "sagad_saga_duration_seconds", "histogram",
	    "Time from start to completed or compensated.");
	for (i = 0; i < c->n_sagas; i++) {
		snprintf(labels, sizeof labels, "saga=\"%s\"", c->sagas[i].name);
		metrics_histogram(out, "sagad_saga_duration_seconds", labels, &e->stats[i].duration);
	}
	saga_tx_metrics(e, out);
}

/* Forget finished (completed or compensated) sagas and their history
 * after the retention, a small batch per call; failed ones stay until an
 * operator acts. Returns how many went. */
static void
saga_expired_one(void *arg, const struct saga_rec *r)
{
	struct saga_engine *e = arg;
	ssize_t def = saga_def_index(e->d->conf, r->saga);

	if (def >= 0 && r->state >= 0 && r->state < SAGA_NSTATES)
		e->stats[def].states[r->state]--;
}

int
saga_expire(struct saga_engine *e, double before, int batch)
{
	int n = saga_store_expire(e->ss, before, 1u << SAGA_COMPLETED | 1u << SAGA_COMPENSATED,
	    batch, saga_expired_one, e);

	return n < 0 ? 0 : n;
}

