/*
 * The admin API's two-phase commit views (sagad(8) ADMIN API, TWO-PHASE
 * COMMIT): a sagad is a coordinator (its transactions, kept by the saga
 * engine), a participant (its records, txpart.h), or both, and each view
 * shows both sides.
 *
 *   GET  /v1/admin/transactions[?state=S][&limit=N]
 *   GET  /v1/admin/transactions/{id}
 *   POST /v1/admin/transactions/{id}/resolve?decision=commit|abort
 */
#include <event2/http.h>
#include <sys/queue.h>
#include <event2/keyvalq_struct.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "admin.h"
#include "delivery.h"
#include "httpd.h"
#include "saga.h"
#include "saga_store.h"
#include "sagad.h"
#include "util.h"
#include "xmalloc.h"

#define ADMIN_TX_MAX 1000

/* A coordinator's states, and the saga state each is found in. */
static const struct {
	const char *name;
	int saga_state;
} admin_tx_states[] = {
	{ "preparing", SAGA_RUNNING }, { "committing", SAGA_RUNNING },
	{ "committed", SAGA_COMPLETED }, { "aborting", SAGA_COMPENSATING },
	{ "aborted", SAGA_COMPENSATED }, { "failed", SAGA_FAILED },
};

/* A participant's states (txpart.h). */
static const char *const admin_tx_part_states[] = {
	"prepared", "refused", "committed", "aborted"
};

struct admin_tx_req {
	struct evhttp_request *req;
	struct sagad *d;
	char *id, *state;	/* the transaction (get), the filter (list) */
	int coordinator_state;	/* the filter is a coordinator's state */
	size_t limit;
};

static void
admin_tx_req_free(struct admin_tx_req *q)
{
	free(q->id);
	free(q->state);
	free(q);
}

/* The participant's records, for both views. */
static json_t *
admin_tx_records(struct admin_tx_req *q, int list)
{
	int part_state = 0;
	size_t i;

	if (!q->d->delivery)
		return json_array();
	if (list && q->state) {
		for (i = 0; i < sizeof admin_tx_part_states / sizeof *admin_tx_part_states; i++)
			part_state |= strcmp(q->state, admin_tx_part_states[i]) == 0;
		if (!part_state)
			return json_array();
	}
	return delivery_tx_json(q->d->delivery, list ? NULL : q->id, list ? q->state : NULL,
	    q->limit);
}

static void
admin_tx_list_answer(void *arg, int status, void *json)
{
	struct admin_tx_req *q = arg;
	json_t *j = json;

	if (status != 200) {
		httpd_error(q->req, 503, "store-unavailable",
		    "the saga store did not answer; see the log");
		admin_tx_req_free(q);
		return;
	}
	if (!j)
		j = json_pack("{s:[],s:n}", "transactions", "next");
	json_object_set_new(j, "participant", admin_tx_records(q, 1));
	httpd_reply_json(q->req, 200, j);
	admin_tx_req_free(q);
}

void
admin_transactions(struct sagad *d, struct evhttp_request *req)
{
	const char *qs = evhttp_uri_get_query(evhttp_request_get_evhttp_uri(req));
	struct admin_tx_req *q = xcalloc(1, sizeof *q);
	struct saga_list_page page = { .state = -1 };
	struct evkeyvalq params;
	const char *state, *limit;
	size_t i;
	int known = 0;

	q->req = req;
	q->d = d;
	TAILQ_INIT(&params);
	if (qs)
		evhttp_parse_query_str(qs, &params);
	state = evhttp_find_header(&params, "state");
	limit = evhttp_find_header(&params, "limit");
	q->limit = limit ? (size_t)strtoul(limit, NULL, 10) : 100;
	if (q->limit == 0 || q->limit > ADMIN_TX_MAX)
		q->limit = ADMIN_TX_MAX;
	if (state) {
		q->state = xstrdup(state);
		for (i = 0; i < sizeof admin_tx_states / sizeof *admin_tx_states; i++)
			if (strcmp(state, admin_tx_states[i].name) == 0) {
				page.state = admin_tx_states[i].saga_state;
				q->coordinator_state = known = 1;
			}
		for (i = 0; i < sizeof admin_tx_part_states / sizeof *admin_tx_part_states; i++)
			known |= strcmp(state, admin_tx_part_states[i]) == 0;
	}
	evhttp_clear_headers(&params);
	if (state && !known) {
		httpd_error(req, 400, "bad-request", "state must be preparing, committing, "
		    "committed, aborting, aborted or failed (a coordinator's), or prepared, "
		    "refused, committed or aborted (a participant's)");
		admin_tx_req_free(q);
		return;
	}
	page.limit = q->limit;
	if (!d->saga || (state && !q->coordinator_state)) {
		admin_tx_list_answer(q, 200, NULL);
		return;
	}
	saga_list_tx(d->saga, &page, q->state, admin_tx_list_answer, q);
}

/* saga_get's answer: only the transactions among the instances of this
 * id, with the participant's records of it. */
static void
admin_tx_get_answer(void *arg, int status, void *json)
{
	struct admin_tx_req *q = arg;
	json_t *inst = json ? json_object_get(json, "instances") : NULL, *out = json_array();
	json_t *recs, *j;
	size_t i;

	if (status != 200 && status != 404) {
		json_decref(json);
		httpd_error(q->req, 503, "store-unavailable",
		    "the saga store did not answer; see the log");
		admin_tx_req_free(q);
		return;
	}
	json_array_foreach(inst, i, j)
		if (json_object_get(j, "transaction"))
			json_array_append(out, j);
	json_decref(json);
	recs = admin_tx_records(q, 0);
	if (!json_array_size(out) && !json_array_size(recs)) {
		json_decref(out);
		json_decref(recs);
		httpd_error(q->req, 404, "unknown-transaction",
		    "no transaction with this id, as coordinator or participant");
	} else
		httpd_reply_json(q->req, 200, json_pack("{s:s,s:o,s:o}", "id", q->id,
		    "coordinator", out, "participant", recs));
	admin_tx_req_free(q);
}

static void
admin_tx_resolve(struct sagad *d, struct evhttp_request *req, const char *id)
{
	const char *qs = evhttp_uri_get_query(evhttp_request_get_evhttp_uri(req));
	struct evkeyvalq params;
	const char *decision;
	int commit, n;

	TAILQ_INIT(&params);
	if (qs)
		evhttp_parse_query_str(qs, &params);
	decision = evhttp_find_header(&params, "decision");
	if (!decision || (strcmp(decision, "commit") != 0 && strcmp(decision, "abort") != 0)) {
		evhttp_clear_headers(&params);
		httpd_error(req, 400, "bad-request", "decision must be commit or abort");
		return;
	}
	commit = strcmp(decision, "commit") == 0;
	evhttp_clear_headers(&params);
	n = d->delivery ? delivery_tx_resolve(d->delivery, id, commit) : 0;
	if (n < 0)
		httpd_error(req, 503, "store-unavailable",
		    "the decision could not be stored; see the log");
	else if (n == 0)
		httpd_error(req, 409, "not-in-doubt",
		    "this sagad has no record of this transaction that voted yes and has no decision");
	else
		httpd_reply_json(req, 200, json_pack("{s:s,s:s,s:i}", "id", id,
		    "decision", commit ? "commit" : "abort", "records", n));
}

void
admin_transaction(struct sagad *d, struct evhttp_request *req, const char *rest)
{
	const char *slash = strchr(rest, '/');
	size_t len = slash ? (size_t)(slash - rest) : strlen(rest);
	int post = evhttp_request_get_command(req) == EVHTTP_REQ_POST;
	struct admin_tx_req *q;
	char *id = xmalloc(len + 1);

	if (util_pct_decode(rest, len, id) <= 0) {
		free(id);
		httpd_error(req, 400, "bad-request", "malformed transaction id");
		return;
	}
	if (slash && post && strcmp(slash, "/resolve") == 0) {
		admin_tx_resolve(d, req, id);
		free(id);
		return;
	}
	if (slash || post) {
		free(id);
		evhttp_add_header(evhttp_request_get_output_headers(req), "Allow",
		    slash ? "POST" : "GET");
		httpd_error(req, 405, "method-not-allowed", "use GET /v1/admin/transactions/{id} "
		    "or POST /v1/admin/transactions/{id}/resolve?decision=commit|abort");
		return;
	}
	q = xcalloc(1, sizeof *q);
	q->req = req;
	q->d = d;
	q->id = id;
	q->limit = ADMIN_TX_MAX;
	if (d->saga)
		saga_get(d->saga, id, admin_tx_get_answer, q);
	else
		admin_tx_get_answer(q, 404, NULL);
}
