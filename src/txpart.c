/*
 * A participant's view of two-phase commits (txpart.h): the decisions,
 * the records in sagad's store (table tx_participant, written in the
 * store's write transaction with the inbox record of the message that
 * changed them) and the questions of a participant in doubt.
 */
#include "txpart.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <jansson.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "log.h"
#include "metrics.h"
#include "msg.h"
#include "props.h"
#include "sagad.h"
#include "store_records.h"
#include "util.h"
#include "xmalloc.h"

const char *const txp_state_names[TXP_NSTATES] = {
	"none", "prepared", "refused", "committed", "aborted"
};

/* Schema version 8 of the store (store.c). */
const char txpart_schema[] =
	"CREATE TABLE tx_participant("
	"  saga TEXT NOT NULL,"		/* the coordinator's transaction name */
	"  tx TEXT NOT NULL,"		/* the transaction id (correlation id) */
	"  part TEXT NOT NULL,"		/* this participant's name in it */
	"  sub TEXT NOT NULL,"		/* the subscription it came through */
	"  state INTEGER NOT NULL,"	/* enum txp_state */
	"  reply_to TEXT,"		/* the coordinator's queue, from the PREPARE */
	"  voted_at REAL,"
	"  updated_at REAL NOT NULL,"
	"  asked_at REAL NOT NULL DEFAULT 0,"	/* the last status question */
	"  asks INTEGER NOT NULL DEFAULT 0,"
	"  note TEXT,"			/* an operator's resolve, for the record */
	"  gid TEXT,"			/* its PostgreSQL prepared transaction (txpg.c) */
	"  PRIMARY KEY (saga, tx, part));"
	"CREATE INDEX tx_participant_state ON tx_participant(state, voted_at);"
	"CREATE INDEX tx_participant_gid ON tx_participant(gid);";

enum txp_sql {
	TQ_GET, TQ_PUT, TQ_DOUBT, TQ_ASKED, TQ_COUNTS, TQ_OLDEST, TQ_EXPIRE, TQ_LIST, TQ_NOTE,
	TQ_BY_GID, TQ_COUNT
};

#define TXP_COLUMNS "saga, tx, part, sub, state, voted_at, updated_at, asks, note"

static const char *const txp_sql[TQ_COUNT] = {
	[TQ_GET] = "SELECT state FROM tx_participant WHERE saga = ?1 AND tx = ?2 AND part = ?3",
	[TQ_PUT] = "INSERT INTO tx_participant (saga, tx, part, sub, state, reply_to, voted_at,"
	    " updated_at, gid) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8)"
	    " ON CONFLICT (saga, tx, part) DO UPDATE SET state = excluded.state,"
	    " updated_at = excluded.updated_at,"
	    " reply_to = coalesce(tx_participant.reply_to, excluded.reply_to),"
	    " voted_at = coalesce(tx_participant.voted_at, excluded.voted_at)",
	[TQ_DOUBT] = "SELECT saga, tx, part, reply_to FROM tx_participant WHERE state = 1"
	    " AND voted_at < ?1 AND asked_at < ?1 AND reply_to IS NOT NULL LIMIT 64",
	[TQ_ASKED] = "UPDATE tx_participant SET asked_at = ?4, asks = asks + 1"
	    " WHERE saga = ?1 AND tx = ?2 AND part = ?3",
	[TQ_COUNTS] = "SELECT state, count(*) FROM tx_participant GROUP BY state",
	[TQ_OLDEST] = "SELECT count(*), min(voted_at) FROM tx_participant"
	    " WHERE state = 1 AND voted_at < ?1",
	[TQ_EXPIRE] = "DELETE FROM tx_participant WHERE rowid IN (SELECT rowid FROM"
	    " tx_participant WHERE state > 1 AND updated_at < ?1 LIMIT ?2)",
	/* ?1 transaction id or NULL, ?2 state or NULL, ?3 limit; newest first */
	[TQ_LIST] = "SELECT " TXP_COLUMNS " FROM tx_participant WHERE (?1 IS NULL OR tx = ?1)"
	    " AND (?2 IS NULL OR state = ?2) ORDER BY updated_at DESC LIMIT ?3",
	[TQ_NOTE] = "UPDATE tx_participant SET note = ?4 WHERE saga = ?1 AND tx = ?2 AND part = ?3",
	[TQ_BY_GID] = "SELECT state, saga, tx, part, reply_to FROM tx_participant WHERE gid = ?1",
};

struct txpart {
	struct sagad *d;
	sqlite3 *db;
	sqlite3_stmt *stmt[TQ_COUNT];
	struct event *timer_ev;
	uint64_t answered, conflicts, asked;	/* counters */
};

/* ---- the rules (pure) ---- */

enum txp_kind
txpart_kind(const struct msg *m)
{
	const char *k = props_get_header(&m->props, "x-sagad-kind");

	if (!k || !m->props.correlation_id || !props_get_header(&m->props, "x-sagad-saga") ||
	    !props_get_header(&m->props, "x-sagad-step"))
		return TXP_NOT_TX;
	if (strcmp(k, "prepare") == 0)
		return TXP_PREPARE;
	if (strcmp(k, "commit") == 0)
		return TXP_COMMIT;
	if (strcmp(k, "abort") == 0)
		return TXP_ABORT;
	return TXP_NOT_TX;
}

enum txp_action
txpart_decide(enum txp_state st, enum txp_kind k)
{
	switch (k) {
	case TXP_PREPARE:
		if (st == TXP_NONE)
			return TXP_DELIVER;
		/* A repeat: the vote again. After the ABORT: no (the service
		 * never sees a PREPARE of a transaction already aborted). */
		return st == TXP_PREPARED || st == TXP_COMMITTED ? TXP_ANSWER_YES : TXP_ANSWER_NO;
	case TXP_COMMIT:
		if (st == TXP_COMMITTED)
			return TXP_ANSWER_YES;
		return st == TXP_NONE || st == TXP_PREPARED ? TXP_DELIVER : TXP_CONFLICT;
	case TXP_ABORT:
		/* Voted no: the service undid its work already. */
		if (st == TXP_ABORTED || st == TXP_REFUSED)
			return TXP_ANSWER_YES;
		return st == TXP_COMMITTED ? TXP_CONFLICT : TXP_DELIVER;
	case TXP_NOT_TX:
		break;
	}
	return TXP_DELIVER;
}

enum txp_state
txpart_next(enum txp_state st, enum txp_kind k, int success)
{
	switch (k) {
	case TXP_PREPARE:
		if (st != TXP_NONE)
			return st;	/* a vote never overrides a decision */
		return success ? TXP_PREPARED : TXP_REFUSED;
	case TXP_COMMIT:
		return success ? TXP_COMMITTED : st;
	case TXP_ABORT:
		return success ? TXP_ABORTED : st;
	case TXP_NOT_TX:
		break;
	}
	return st;
}

/* The participant's name: the step's after "prepare:" or "commit:". */
static const char *
txp_part(const struct msg *m)
{
	const char *step = props_get_header(&m->props, "x-sagad-step");
	const char *colon = step ? strchr(step, ':') : NULL;

	return colon ? colon + 1 : step;
}

/*
 * The gid of a participant's PostgreSQL prepared transaction (PREPARE
 * TRANSACTION takes at most 199 bytes): sagad:SERVICE:SAGA:TX:PART, or
 * when that is too long sagad:SERVICE:h and two FNV-1a hashes of it. The
 * prefix sagad:SERVICE: finds this sagad's own at start-up (txpg.c).
 */
void
txpart_gid(const struct msg *m, const char *service, char out[TXP_GID_MAX])
{
	char full[2048];
	int n = snprintf(full, sizeof full, "sagad:%s:%s:%s:%s", service,
	    props_get_header(&m->props, "x-sagad-saga"), m->props.correlation_id, txp_part(m));

	if (n > 0 && n < TXP_GID_MAX) {
		memcpy(out, full, (size_t)n + 1);
		return;
	}
	snprintf(out, TXP_GID_MAX, "sagad:%.150s:h%016llx%016llx", service,
	    (unsigned long long)util_fnv1a(full),
	    (unsigned long long)util_fnv1a(full + strlen(service)));
}

/* ---- records ---- */

static sqlite3_stmt *
txp_stmt(struct txpart *tp, enum txp_sql q)
{
	sqlite3_stmt *s = tp->stmt[q];

	sqlite3_reset(s);
	sqlite3_clear_bindings(s);
	return s;
}

static void
txp_bind_key(sqlite3_stmt *s, const struct msg *m)
{
	sqlite3_bind_text(s, 1, props_get_header(&m->props, "x-sagad-saga"), -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 2, m->props.correlation_id, -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 3, txp_part(m), -1, SQLITE_STATIC);
}

static enum txp_state
txp_get(struct txpart *tp, const struct msg *m)
{
	sqlite3_stmt *s = txp_stmt(tp, TQ_GET);
	enum txp_state st = TXP_NONE;

	txp_bind_key(s, m);
	if (sqlite3_step(s) == SQLITE_ROW) {
		int v = sqlite3_column_int(s, 0);
		st = v > TXP_NONE && v < TXP_NSTATES ? (enum txp_state)v : TXP_NONE;
	}
	sqlite3_reset(s);
	return st;
}

static int
txp_put(struct txpart *tp, const char *sub, const struct msg *m, enum txp_state st)
{
	char gid[TXP_GID_MAX];
	sqlite3_stmt *s;
	int rc;

	if (store_join_write(tp->d->store) < 0)
		return -1;
	s = txp_stmt(tp, TQ_PUT);
	txp_bind_key(s, m);
	sqlite3_bind_text(s, 4, sub, -1, SQLITE_STATIC);
	sqlite3_bind_int(s, 5, (int)st);
	if (m->props.reply_to)
		sqlite3_bind_text(s, 6, m->props.reply_to, -1, SQLITE_STATIC);
	sqlite3_bind_double(s, 7, util_now());
	txpart_gid(m, tp->d->conf->service, gid);
	sqlite3_bind_text(s, 8, gid, -1, SQLITE_STATIC);
	rc = sqlite3_step(s);
	sqlite3_reset(s);
	if (rc != SQLITE_DONE) {
		log_error("transaction record not written", LOG_STR("error", sqlite3_errmsg(tp->db)),
		    LOG_STR("transaction", m->props.correlation_id));
		return -1;
	}
	return 0;
}

static void
txp_log(const char *what, const char *sub, const struct msg *m, enum txp_state st)
{
	log_info(what, LOG_STR("subscription", sub),
	    LOG_STR("transaction", m->props.correlation_id),
	    LOG_STR("saga", props_get_header(&m->props, "x-sagad-saga")),
	    LOG_STR("kind", props_get_header(&m->props, "x-sagad-kind")),
	    LOG_STR("message_id", m->message_id), LOG_STR("record", txp_state_names[st]));
}

enum txp_action
txpart_before(struct txpart *tp, const char *sub, const struct msg *m)
{
	enum txp_kind k = txpart_kind(m);
	enum txp_state st;
	enum txp_action a;

	if (k == TXP_NOT_TX)
		return TXP_DELIVER;
	st = txp_get(tp, m);
	a = txpart_decide(st, k);
	if (a == TXP_CONFLICT) {
		tp->conflicts++;
		log_error("a transaction's decision contradicts this participant's record: "
		    "answered no, not delivered", LOG_STR("subscription", sub),
		    LOG_STR("transaction", m->props.correlation_id),
		    LOG_STR("kind", props_get_header(&m->props, "x-sagad-kind")),
		    LOG_STR("record", txp_state_names[st]));
	} else if (a != TXP_DELIVER) {
		tp->answered++;
		txp_log("answered from the transaction record, not delivered", sub, m, st);
	}
	return a;
}

void
txpart_after(struct txpart *tp, const char *sub, const struct msg *m, int success)
{
	enum txp_kind k = txpart_kind(m);
	enum txp_state st, next;

	if (k == TXP_NOT_TX)
		return;
	st = txp_get(tp, m);
	next = txpart_next(st, k, success);
	if (next != st && txp_put(tp, sub, m, next) == 0)
		log_debug("transaction record", LOG_STR("transaction", m->props.correlation_id),
		    LOG_STR("from", txp_state_names[st]), LOG_STR("to", txp_state_names[next]));
}

/* ---- in doubt: the question to the coordinator ---- */

static void
txp_col(sqlite3_stmt *s, int i, char **out)
{
	const unsigned char *t = sqlite3_column_text(s, i);

	*out = xstrdup(t ? (const char *)t : "");
}

/* A status message to the coordinator's queue: it answers by sending its
 * decision again (saga_tx.c). Sent once the question is durable. */
static void
txp_ask(struct txpart *tp, const char *saga, const char *tx, const char *part,
    const char *reply_to)
{
	char id[37], step[300];
	struct msg m;
	sqlite3_stmt *s;

	memset(&m, 0, sizeof m);
	util_uuid7(id);
	snprintf(step, sizeof step, "prepare:%s", part);
	m.message_id = id;
	m.exchange = (char *)"";
	m.routing_key = (char *)reply_to;
	m.props.correlation_id = xstrdup(tx);
	props_set_header(&m.props, "x-sagad-saga", saga);
	props_set_header(&m.props, "x-sagad-step", step);
	props_set_header(&m.props, "x-sagad-kind", "status");
	if (store_outbox_put(tp->d->store, &m, util_now(), 0) == STORE_PUT_STORED &&
	    store_join_write(tp->d->store) == 0) {
		s = txp_stmt(tp, TQ_ASKED);
		sqlite3_bind_text(s, 1, saga, -1, SQLITE_STATIC);
		sqlite3_bind_text(s, 2, tx, -1, SQLITE_STATIC);
		sqlite3_bind_text(s, 3, part, -1, SQLITE_STATIC);
		sqlite3_bind_double(s, 4, util_now());
		sqlite3_step(s);
		sqlite3_reset(s);
		tp->asked++;
		log_warn("transaction in doubt: the coordinator is asked for its decision",
		    LOG_STR("transaction", tx), LOG_STR("saga", saga), LOG_STR("participant", part),
		    LOG_STR("coordinator_queue", reply_to));
	}
	props_free(&m.props);
}

static void
txp_ask_all(struct txpart *tp, double before)
{
	struct txp_doubt_key q[64];
	sqlite3_stmt *s = txp_stmt(tp, TQ_DOUBT);
	size_t n = 0, i;

	sqlite3_bind_double(s, 1, before);
	while (n < 64 && sqlite3_step(s) == SQLITE_ROW) {
		txp_col(s, 0, &q[n].saga);
		txp_col(s, 1, &q[n].tx);
		txp_col(s, 2, &q[n].part);
		txp_col(s, 3, &q[n].reply_to);
		n++;
	}
	sqlite3_reset(s);
	for (i = 0; i < n; i++) {
		txp_ask(tp, q[i].saga, q[i].tx, q[i].part, q[i].reply_to);
		txpart_key_free(&q[i]);
	}
}

/* Finished records go after the retention of finished sagas. */
static void
txp_expire(struct txpart *tp)
{
	sqlite3_stmt *s;

	if (store_join_write(tp->d->store) < 0)
		return;
	s = txp_stmt(tp, TQ_EXPIRE);
	sqlite3_bind_double(s, 1, util_now() - tp->d->conf->store.saga_retention);
	sqlite3_bind_int(s, 2, 500);
	sqlite3_step(s);
	sqlite3_reset(s);
}

static double
txp_period(const struct txpart *tp)
{
	double p = tp->d->conf->in_doubt_timeout / 4;

	return p < 0.25 ? 0.25 : p > 30 ? 30 : p;
}

static void
txp_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct txpart *tp = arg;
	struct timeval tv;
	double p = txp_period(tp);

	(void)fd;
	(void)what;
	if (tp->d->state == SAGAD_RUNNING && store_writable(tp->d->store)) {
		txp_ask_all(tp, util_now() - tp->d->conf->in_doubt_timeout);
		txp_expire(tp);
	}
	tv = util_timeval(p);
	evtimer_add(tp->timer_ev, &tv);
}

/* ---- set-up and metrics ---- */

struct txpart *
txpart_new(struct sagad *d)
{
	struct txpart *tp = xcalloc(1, sizeof *tp);
	size_t i;

	tp->d = d;
	tp->db = store_db(d->store);
	for (i = 0; i < TQ_COUNT; i++)
		if (sqlite3_prepare_v3(tp->db, txp_sql[i], -1, SQLITE_PREPARE_PERSISTENT,
		    &tp->stmt[i], NULL) != SQLITE_OK) {
			log_error("transaction records: cannot prepare a statement",
			    LOG_STR("error", sqlite3_errmsg(tp->db)));
			txpart_free(tp);
			return NULL;
		}
	tp->timer_ev = evtimer_new(d->base, txp_timer_cb, tp);
	txp_timer_cb(-1, 0, tp);
	return tp;
}

void
txpart_free(struct txpart *tp)
{
	size_t i;

	if (!tp)
		return;
	if (tp->timer_ev)
		event_free(tp->timer_ev);
	for (i = 0; i < TQ_COUNT; i++)
		sqlite3_finalize(tp->stmt[i]);
	free(tp);
}

void
txpart_metrics(struct txpart *tp, struct evbuffer *out)
{
	double n[TXP_NSTATES] = { 0 }, oldest = 0, doubt = 0;
	sqlite3_stmt *s;
	char labels[64];
	int i;

	s = txp_stmt(tp, TQ_COUNTS);
	while (sqlite3_step(s) == SQLITE_ROW)
		if ((i = sqlite3_column_int(s, 0)) > TXP_NONE && i < TXP_NSTATES)
			n[i] = sqlite3_column_double(s, 1);
	sqlite3_reset(s);
	s = txp_stmt(tp, TQ_OLDEST);
	sqlite3_bind_double(s, 1, util_now() - tp->d->conf->in_doubt_timeout);
	if (sqlite3_step(s) == SQLITE_ROW) {
		doubt = sqlite3_column_double(s, 0);
		if (sqlite3_column_type(s, 1) != SQLITE_NULL)
			oldest = util_now() - sqlite3_column_double(s, 1);
	}
	sqlite3_reset(s);
	metrics_family(out, "sagad_tx_participant_records", "gauge",
	    "This participant's two-phase commit records by state");
	for (i = TXP_NONE + 1; i < TXP_NSTATES; i++) {
		snprintf(labels, sizeof labels, "state=\"%s\"", txp_state_names[i]);
		metrics_sample(out, "sagad_tx_participant_records", labels, n[i]);
	}
	metrics_family(out, "sagad_tx_in_doubt", "gauge",
	    "Transactions voted yes with no decision for longer than in_doubt_timeout");
	metrics_sample(out, "sagad_tx_in_doubt", "", doubt);
	metrics_family(out, "sagad_tx_in_doubt_oldest_seconds", "gauge",
	    "Age of the oldest vote in doubt (0: none)");
	metrics_sample(out, "sagad_tx_in_doubt_oldest_seconds", "", oldest);
	metrics_family(out, "sagad_tx_participant_answers_total", "counter",
	    "PREPARE, COMMIT and ABORT answered from the record, not delivered again");
	metrics_sample(out, "sagad_tx_participant_answers_total", "", (double)tp->answered);
	metrics_family(out, "sagad_tx_participant_conflicts_total", "counter",
	    "Decisions that contradicted this participant's record (answered no)");
	metrics_sample(out, "sagad_tx_participant_conflicts_total", "", (double)tp->conflicts);
	metrics_family(out, "sagad_tx_status_questions_total", "counter",
	    "Status questions sent to coordinators by transactions in doubt");
	metrics_sample(out, "sagad_tx_status_questions_total", "", (double)tp->asked);
}

/* ---- operators: the records, and a decision for one in doubt ---- */

int
txpart_state_from_name(const char *name)
{
	int i;

	for (i = TXP_NONE + 1; i < TXP_NSTATES; i++)
		if (strcmp(txp_state_names[i], name) == 0)
			return i;
	return -1;
}

static json_t *
txp_row_json(struct txpart *tp, sqlite3_stmt *s)
{
	int st = sqlite3_column_int(s, 4);
	double voted = sqlite3_column_double(s, 5);
	int doubt = st == TXP_PREPARED && voted < util_now() - tp->d->conf->in_doubt_timeout;

	return json_pack("{s:s,s:s,s:s,s:s,s:s,s:b,s:f,s:f,s:i,s:s?}",
	    "saga", (const char *)sqlite3_column_text(s, 0),
	    "id", (const char *)sqlite3_column_text(s, 1),
	    "participant", (const char *)sqlite3_column_text(s, 2),
	    "subscription", (const char *)sqlite3_column_text(s, 3),
	    "state", st > TXP_NONE && st < TXP_NSTATES ? txp_state_names[st] : "?",
	    "in_doubt", doubt, "voted_at", voted, "updated_at", sqlite3_column_double(s, 6),
	    "asks", sqlite3_column_int(s, 7), "note", (const char *)sqlite3_column_text(s, 8));
}

void *
txpart_list_json(struct txpart *tp, const char *tx, int state, size_t limit)
{
	sqlite3_stmt *s = txp_stmt(tp, TQ_LIST);
	json_t *list = json_array();

	if (tx)
		sqlite3_bind_text(s, 1, tx, -1, SQLITE_STATIC);
	if (state > TXP_NONE)
		sqlite3_bind_int(s, 2, state);
	sqlite3_bind_int64(s, 3, (sqlite3_int64)limit);
	while (sqlite3_step(s) == SQLITE_ROW)
		json_array_append_new(list, txp_row_json(tp, s));
	sqlite3_reset(s);
	return list;
}

/* The decision, as if the coordinator had sent it: a COMMIT or ABORT put
 * in the subscription's inbox (no reply_to: nobody to answer), delivered
 * and recorded as any other; the record keeps who decided. */
static int
txp_resolve_one(struct txpart *tp, const char *saga, const char *tx, const char *part,
    const char *sub, int commit, txpart_inject_fn *inject, void *arg)
{
	char id[600], step[300], note[128];
	struct msg *m = xcalloc(1, sizeof *m);
	sqlite3_stmt *s;
	int rc;

	snprintf(id, sizeof id, "resolve:%s:%s:%s:%s", saga, tx, part, commit ? "commit" : "abort");
	snprintf(step, sizeof step, "%s:%s", commit ? "commit" : "prepare", part);
	m->message_id = xstrdup(id);
	m->exchange = xstrdup("");
	m->routing_key = xstrdup(sub);
	m->props.correlation_id = xstrdup(tx);
	props_set_header(&m->props, "x-sagad-saga", saga);
	props_set_header(&m->props, "x-sagad-step", step);
	props_set_header(&m->props, "x-sagad-kind", commit ? "commit" : "abort");
	props_set_header(&m->props, "x-sagad-resolved-by", "operator");
	rc = inject(arg, sub, m);	/* takes m */
	if (rc < 0 || store_join_write(tp->d->store) < 0)
		return -1;
	snprintf(note, sizeof note, "resolved %s by an operator (sagactl tx resolve)",
	    commit ? "commit" : "abort");
	s = txp_stmt(tp, TQ_NOTE);
	sqlite3_bind_text(s, 1, saga, -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 2, tx, -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 3, part, -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 4, note, -1, SQLITE_STATIC);
	sqlite3_step(s);
	sqlite3_reset(s);
	log_warn("TRANSACTION RESOLVED BY AN OPERATOR, not by its coordinator: if the "
	    "coordinator decided otherwise, the participants now disagree",
	    LOG_STR("transaction", tx), LOG_STR("saga", saga), LOG_STR("participant", part),
	    LOG_STR("decision", commit ? "commit" : "abort"));
	return 0;
}

int
txpart_resolve(struct txpart *tp, const char *tx, int commit, txpart_inject_fn *inject,
    void *arg)
{
	sqlite3_stmt *s = txp_stmt(tp, TQ_LIST);
	char *rows[16][3], *subs[16];
	size_t n = 0, i;
	int done = 0;

	sqlite3_bind_text(s, 1, tx, -1, SQLITE_STATIC);
	sqlite3_bind_int(s, 2, TXP_PREPARED);
	sqlite3_bind_int(s, 3, 16);
	while (n < 16 && sqlite3_step(s) == SQLITE_ROW) {
		txp_col(s, 0, &rows[n][0]);
		txp_col(s, 1, &rows[n][1]);
		txp_col(s, 2, &rows[n][2]);
		txp_col(s, 3, &subs[n]);
		n++;
	}
	sqlite3_reset(s);
	for (i = 0; i < n; i++) {
		if (done >= 0 && txp_resolve_one(tp, rows[i][0], rows[i][1], rows[i][2], subs[i],
		    commit, inject, arg) == 0)
			done++;
		else
			done = -1;
		free(rows[i][0]); free(rows[i][1]); free(rows[i][2]); free(subs[i]);
	}
	return done;
}

enum txp_state
txpart_by_gid(struct txpart *tp, const char *gid, struct txp_doubt_key *key)
{
	sqlite3_stmt *s = txp_stmt(tp, TQ_BY_GID);
	enum txp_state st = TXP_NONE;
	int v;

	sqlite3_bind_text(s, 1, gid, -1, SQLITE_STATIC);
	if (sqlite3_step(s) == SQLITE_ROW) {
		v = sqlite3_column_int(s, 0);
		st = v > TXP_NONE && v < TXP_NSTATES ? (enum txp_state)v : TXP_NONE;
		if (key) {
			txp_col(s, 1, &key->saga);
			txp_col(s, 2, &key->tx);
			txp_col(s, 3, &key->part);
			txp_col(s, 4, &key->reply_to);
		}
	}
	sqlite3_reset(s);
	return st;
}

void
txpart_ask_now(struct txpart *tp, const struct txp_doubt_key *key)
{
	if (*key->reply_to)
		txp_ask(tp, key->saga, key->tx, key->part, key->reply_to);
}

void
txpart_key_free(struct txp_doubt_key *key)
{
	free(key->saga);
	free(key->tx);
	free(key->part);
	free(key->reply_to);
}
