/*
 * The saga store's SQLite backend (saga_store_backend.h): the records in
 * sagad's own store. Every write joins the store's write transaction
 * (store_join_write), which spans the loop turn, so that a state change,
 * the messages it sends (store_outbox_put) and the consumed message that
 * caused it commit together; a batch has nothing to add to that, hence
 * no batch_begin or batch_end.
 */
#include "saga_store_backend.h"

#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "msg.h"
#include "store_records.h"
#include "util.h"
#include "xmalloc.h"

/* Sagas: one row per instance (its state packed in data), durable timers,
 * and the history shown by sagactl saga ID. Schema version 3 of the store. */
const char saga_store_schema[] =
	"CREATE TABLE saga("
	"  row INTEGER PRIMARY KEY,"
	"  saga TEXT NOT NULL,"
	"  id TEXT NOT NULL,"
	"  state INTEGER NOT NULL,"
	"  started_at REAL NOT NULL,"
	"  updated_at REAL NOT NULL,"
	"  finished_at REAL,"
	"  data BLOB NOT NULL,"
	"  UNIQUE(saga, id));"
	"CREATE INDEX saga_by_state ON saga(saga, state);"
	"CREATE INDEX saga_by_id ON saga(id);"
	"CREATE INDEX saga_finished ON saga(finished_at) WHERE finished_at IS NOT NULL;"
	"CREATE TABLE saga_timer("
	"  id INTEGER PRIMARY KEY,"
	"  due REAL NOT NULL,"
	"  row INTEGER NOT NULL,"
	"  kind INTEGER NOT NULL,"
	"  step INTEGER NOT NULL);"
	"CREATE INDEX saga_timer_due ON saga_timer(due);"
	"CREATE INDEX saga_timer_row ON saga_timer(row);"
	"CREATE TABLE saga_log("
	"  id INTEGER PRIMARY KEY,"
	"  row INTEGER NOT NULL,"
	"  at REAL NOT NULL,"
	"  dir TEXT NOT NULL,"
	"  what TEXT NOT NULL,"
	"  step TEXT,"
	"  message_id TEXT,"
	"  detail TEXT);"
	"CREATE INDEX saga_log_row ON saga_log(row);";

/* Every version of every saga definition the store has had running
 * instances of (saga_def.h). Schema version 7 of the store. */
const char saga_store_def_schema[] =
	"CREATE TABLE saga_def("
	"  saga TEXT NOT NULL,"
	"  version TEXT NOT NULL,"
	"  def TEXT NOT NULL,"
	"  created_at REAL NOT NULL,"
	"  PRIMARY KEY (saga, version));";

enum saga_sql {
	SQ_GET, SQ_GET_ROW, SQ_INSERT, SQ_UPDATE, SQ_LOG, SQ_TIMER_ADD, SQ_TIMER_DEL,
	SQ_TIMER_DEL_ALL, SQ_TIMER_DEL_ID, SQ_TIMER_NEXT, SQ_TIMER_DUE, SQ_BY_ID, SQ_LIST,
	SQ_HISTORY, SQ_COUNTS, SQ_EXPIRE, SQ_EXPIRE_ROW, SQ_EXPIRE_LOG, SQ_DEF_PUT, SQ_DEF_ALL,
	SQ_COUNT
};

#define SAGA_COLUMNS "row, saga, id, state, started_at, updated_at, coalesce(finished_at, 0), data"

static const char *const saga_sql[SQ_COUNT] = {
	[SQ_GET] = "SELECT " SAGA_COLUMNS " FROM saga WHERE saga = ? AND id = ?",
	[SQ_GET_ROW] = "SELECT " SAGA_COLUMNS " FROM saga WHERE row = ?",
	[SQ_INSERT] = "INSERT INTO saga(saga, id, state, started_at, updated_at, finished_at, data)"
	    " VALUES (?, ?, ?, ?, ?, nullif(?, 0), ?)",
	[SQ_UPDATE] = "UPDATE saga SET state = ?, updated_at = ?, finished_at = nullif(?, 0), data = ?"
	    " WHERE row = ?",
	[SQ_LOG] = "INSERT INTO saga_log(row, at, dir, what, step, message_id, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
	[SQ_TIMER_ADD] = "INSERT INTO saga_timer(due, row, kind, step) VALUES (?, ?, ?, ?)",
	[SQ_TIMER_DEL] = "DELETE FROM saga_timer WHERE row = ? AND kind = ? AND step = ?",
	[SQ_TIMER_DEL_ALL] = "DELETE FROM saga_timer WHERE row = ?",
	[SQ_TIMER_DEL_ID] = "DELETE FROM saga_timer WHERE id = ?",
	[SQ_TIMER_NEXT] = "SELECT min(due) FROM saga_timer",
	[SQ_TIMER_DUE] = "SELECT id, row, kind, step FROM saga_timer WHERE due <= ? ORDER BY due LIMIT ?",
	[SQ_BY_ID] = "SELECT row FROM saga WHERE id = ? ORDER BY row",
	/* ?1 NULL: any saga; ?2 < 0: any state */
	[SQ_LIST] = "SELECT " SAGA_COLUMNS " FROM saga WHERE (?1 IS NULL OR saga = ?1)"
	    " AND (?2 < 0 OR state = ?2) AND (?4 IS NULL OR (started_at, saga, id) < (?5, ?4, ?6))"
	    " ORDER BY started_at DESC, saga DESC, id DESC LIMIT ?3",
	[SQ_HISTORY] = "SELECT at, dir, what, coalesce(step, ''), coalesce(message_id, ''), coalesce(detail, '')"
	    " FROM saga_log WHERE row = ? ORDER BY id",
	[SQ_COUNTS] = "SELECT saga, state, count(*) FROM saga GROUP BY saga, state",
	[SQ_EXPIRE] = "SELECT row, saga, state FROM saga WHERE finished_at < ?"
	    " AND ((1 << state) & ?) != 0 LIMIT ?",
	[SQ_EXPIRE_ROW] = "DELETE FROM saga WHERE row = ?",
	[SQ_EXPIRE_LOG] = "DELETE FROM saga_log WHERE row = ?",
	[SQ_DEF_PUT] = "INSERT OR IGNORE INTO saga_def(saga, version, def, created_at)"
	    " VALUES (?, ?, ?, ?)",
	[SQ_DEF_ALL] = "SELECT saga, version, def FROM saga_def ORDER BY saga, created_at",
};

struct saga_backend {
	struct store *st;
	sqlite3 *db;
	sqlite3_stmt *stmt[SQ_COUNT];
};

static void
ssq_close(struct saga_backend *ss)
{
	size_t i;

	if (!ss)
		return;
	for (i = 0; i < SQ_COUNT; i++)
		sqlite3_finalize(ss->stmt[i]);
	free(ss);
}

struct saga_backend *
saga_store_sqlite_open(struct store *st, char **err)
{
	struct saga_backend *ss = xcalloc(1, sizeof *ss);
	size_t i;

	*err = NULL;
	ss->st = st;
	ss->db = store_db(st);
	for (i = 0; i < SQ_COUNT; i++)
		if (sqlite3_prepare_v3(ss->db, saga_sql[i], -1, SQLITE_PREPARE_PERSISTENT,
		    &ss->stmt[i], NULL) != SQLITE_OK) {
			*err = xasprintf("saga store: %s", sqlite3_errmsg(ss->db));
			ssq_close(ss);
			return NULL;
		}
	return ss;
}

/* ---- statements ---- */

static sqlite3_stmt *
ss_stmt(struct saga_backend *ss, enum saga_sql q)
{
	sqlite3_stmt *s = ss->stmt[q];

	sqlite3_reset(s);
	sqlite3_clear_bindings(s);
	return s;
}

/* A statement for a write: the store's write transaction joined first
 * (NULL when the store refuses: it is broken). */
static sqlite3_stmt *
ss_write_stmt(struct saga_backend *ss, enum saga_sql q)
{
	return store_join_write(ss->st) < 0 ? NULL : ss_stmt(ss, q);
}

/* Runs a write in the store's write transaction. */
static int
ss_exec(struct saga_backend *ss, sqlite3_stmt *s)
{
	int rc = sqlite3_step(s);

	sqlite3_reset(s);
	if (rc != SQLITE_DONE && rc != SQLITE_ROW) {
		log_error("saga store write failed", LOG_STR("error", sqlite3_errmsg(ss->db)));
		return -1;
	}
	return 0;
}

/* A statement on one row id, in the write transaction. */
static int
ss_exec_row(struct saga_backend *ss, enum saga_sql q, int64_t row)
{
	sqlite3_stmt *s = ss_write_stmt(ss, q);

	if (!s)
		return -1;
	sqlite3_bind_int64(s, 1, row);
	return ss_exec(ss, s);
}

static char *
ss_text(sqlite3_stmt *s, int col)
{
	const unsigned char *t = sqlite3_column_text(s, col);

	return xstrdup(t ? (const char *)t : "");
}

/* A row of SAGA_COLUMNS. */
static void
ss_read_rec(sqlite3_stmt *s, struct saga_rec *r)
{
	int n = sqlite3_column_bytes(s, 7);

	r->row = sqlite3_column_int64(s, 0);
	r->saga = ss_text(s, 1);
	r->id = ss_text(s, 2);
	r->state = sqlite3_column_int(s, 3);
	r->started_at = sqlite3_column_double(s, 4);
	r->updated_at = sqlite3_column_double(s, 5);
	r->finished_at = sqlite3_column_double(s, 6);
	r->data = xmalloc((size_t)n + 1);
	if (n)
		memcpy(r->data, sqlite3_column_blob(s, 7), (size_t)n);
	r->data_len = (size_t)n;
}

static int
ss_get(struct saga_backend *ss, sqlite3_stmt *s, struct saga_rec *r)
{
	int rc = sqlite3_step(s);

	memset(r, 0, sizeof *r);
	if (rc == SQLITE_ROW)
		ss_read_rec(s, r);
	sqlite3_reset(s);
	if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
		log_error("saga store read failed", LOG_STR("error", sqlite3_errmsg(ss->db)));
		return -1;
	}
	return rc == SQLITE_ROW;
}

/* ---- instances ---- */

static int
ssq_get(struct saga_backend *ss, const char *saga, const char *id, struct saga_rec *r)
{
	sqlite3_stmt *s = ss_stmt(ss, SQ_GET);

	sqlite3_bind_text(s, 1, saga, -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 2, id, -1, SQLITE_STATIC);
	return ss_get(ss, s, r);
}

static int
ssq_get_row(struct saga_backend *ss, int64_t row, struct saga_rec *r)
{
	sqlite3_stmt *s = ss_stmt(ss, SQ_GET_ROW);

	sqlite3_bind_int64(s, 1, row);
	return ss_get(ss, s, r);
}

static size_t
ssq_by_id(struct saga_backend *ss, const char *id, int64_t *rows, size_t max)
{
	sqlite3_stmt *s = ss_stmt(ss, SQ_BY_ID);
	size_t n = 0;

	sqlite3_bind_text(s, 1, id, -1, SQLITE_TRANSIENT);
	while (n < max && sqlite3_step(s) == SQLITE_ROW)
		rows[n++] = sqlite3_column_int64(s, 0);
	sqlite3_reset(s);
	return n;
}

static int
ssq_list(struct saga_backend *ss, const struct saga_list_page *page, saga_rec_fn *fn,
    void *arg)
{
	sqlite3_stmt *s = ss_stmt(ss, SQ_LIST);

	sqlite3_clear_bindings(s);
	if (page->saga)
		sqlite3_bind_text(s, 1, page->saga, -1, SQLITE_TRANSIENT);
	sqlite3_bind_int(s, 2, page->state);
	sqlite3_bind_int64(s, 3, (sqlite3_int64)page->limit);
	if (page->after_saga) {
		sqlite3_bind_text(s, 4, page->after_saga, -1, SQLITE_TRANSIENT);
		sqlite3_bind_double(s, 5, page->after_at);
		sqlite3_bind_text(s, 6, page->after_id, -1, SQLITE_TRANSIENT);
	}
	while (sqlite3_step(s) == SQLITE_ROW) {
		struct saga_rec r;
		ss_read_rec(s, &r);
		fn(arg, &r);
		saga_rec_clear(&r);
	}
	sqlite3_reset(s);
	return 0;
}

static int
ssq_defs(struct saga_backend *ss, const struct saga_def_rec *put, size_t n,
    void (*fn)(void *arg, const struct saga_def_rec *d), void *arg)
{
	sqlite3_stmt *s;
	size_t i;

	for (i = 0; i < n; i++) {
		if (!(s = ss_write_stmt(ss, SQ_DEF_PUT)))
			return -1;
		sqlite3_bind_text(s, 1, put[i].saga, -1, SQLITE_STATIC);
		sqlite3_bind_text(s, 2, put[i].version, -1, SQLITE_STATIC);
		sqlite3_bind_text(s, 3, put[i].json, -1, SQLITE_STATIC);
		sqlite3_bind_double(s, 4, util_now());
		if (ss_exec(ss, s) < 0)
			return -1;
	}
	s = ss_stmt(ss, SQ_DEF_ALL);
	while (sqlite3_step(s) == SQLITE_ROW) {
		struct saga_def_rec d = { (const char *)sqlite3_column_text(s, 0),
		    (const char *)sqlite3_column_text(s, 1), (const char *)sqlite3_column_text(s, 2) };
		fn(arg, &d);
	}
	sqlite3_reset(s);
	return 0;
}

static int
ssq_counts(struct saga_backend *ss, saga_rec_fn *fn, void *arg)
{
	sqlite3_stmt *s = ss_stmt(ss, SQ_COUNTS);

	while (sqlite3_step(s) == SQLITE_ROW) {
		struct saga_rec r = { 0 };
		r.saga = (char *)sqlite3_column_text(s, 0);
		r.state = sqlite3_column_int(s, 1);
		r.row = sqlite3_column_int64(s, 2);	/* the count */
		fn(arg, &r);
	}
	sqlite3_reset(s);
	return 0;
}

static int
ssq_history(struct saga_backend *ss, int64_t row,
    void (*fn)(void *arg, const struct saga_hist *h), void *arg)
{
	sqlite3_stmt *s = ss_stmt(ss, SQ_HISTORY);

	sqlite3_bind_int64(s, 1, row);
	while (sqlite3_step(s) == SQLITE_ROW) {
		struct saga_hist h;
		h.at = sqlite3_column_double(s, 0);
		h.dir = (const char *)sqlite3_column_text(s, 1);
		h.what = (const char *)sqlite3_column_text(s, 2);
		h.step = (const char *)sqlite3_column_text(s, 3);
		h.message_id = (const char *)sqlite3_column_text(s, 4);
		h.detail = (const char *)sqlite3_column_text(s, 5);
		fn(arg, &h);
	}
	sqlite3_reset(s);
	return 0;
}

static int
ssq_insert(struct saga_backend *ss, struct saga_rec *r)
{
	sqlite3_stmt *s;

	if (!(s = ss_write_stmt(ss, SQ_INSERT)))
		return -1;
	sqlite3_bind_text(s, 1, r->saga, -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 2, r->id, -1, SQLITE_STATIC);
	sqlite3_bind_int(s, 3, r->state);
	sqlite3_bind_double(s, 4, r->started_at);
	sqlite3_bind_double(s, 5, r->updated_at);
	sqlite3_bind_double(s, 6, r->finished_at);
	sqlite3_bind_blob(s, 7, r->data, (int)r->data_len, SQLITE_STATIC);
	if (ss_exec(ss, s) < 0)
		return -1;
	r->row = sqlite3_last_insert_rowid(ss->db);
	return 0;
}

static int
ssq_update(struct saga_backend *ss, const struct saga_rec *r)
{
	sqlite3_stmt *s;

	if (!(s = ss_write_stmt(ss, SQ_UPDATE)))
		return -1;
	sqlite3_bind_int(s, 1, r->state);
	sqlite3_bind_double(s, 2, r->updated_at);
	sqlite3_bind_double(s, 3, r->finished_at);
	sqlite3_bind_blob(s, 4, r->data, (int)r->data_len, SQLITE_STATIC);
	sqlite3_bind_int64(s, 5, r->row);
	return ss_exec(ss, s);
}

static int
ssq_log(struct saga_backend *ss, int64_t row, double at, const char *dir,
    const char *what, const char *step, const char *message_id, const char *detail)
{
	sqlite3_stmt *s;

	if (!(s = ss_write_stmt(ss, SQ_LOG)))
		return -1;
	sqlite3_bind_int64(s, 1, row);
	sqlite3_bind_double(s, 2, at);
	sqlite3_bind_text(s, 3, dir, -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 4, what, -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 5, step, -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 6, message_id, -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 7, detail, -1, SQLITE_STATIC);
	return ss_exec(ss, s);
}

/* ---- messages ---- */

/* Into sagad's outbox, in the same write transaction as the state change.
 * One caused by a consumed message may go out before the fsync (store.h:
 * STORE_OUT_EARLY). */
static int
ssq_send(struct saga_backend *ss, struct msg *m, unsigned flags)
{
	unsigned out = flags & SAGA_SEND_CONSUMED ? STORE_OUT_EARLY : 0;

	return store_outbox_put(ss->st, m, util_now(), out) == STORE_PUT_STORED ? 0 : -1;
}

/* ---- timers ---- */

static int
ssq_timer_del(struct saga_backend *ss, int64_t row, int kind, int step)
{
	sqlite3_stmt *s;

	if (!(s = ss_write_stmt(ss, SQ_TIMER_DEL)))
		return -1;
	sqlite3_bind_int64(s, 1, row);
	sqlite3_bind_int(s, 2, kind);
	sqlite3_bind_int(s, 3, step);
	return ss_exec(ss, s);
}

static int
ssq_timer_set(struct saga_backend *ss, int64_t row, int kind, int step, double due)
{
	sqlite3_stmt *s;

	if (ssq_timer_del(ss, row, kind, step) < 0)
		return -1;
	s = ss_stmt(ss, SQ_TIMER_ADD);
	sqlite3_bind_double(s, 1, due);
	sqlite3_bind_int64(s, 2, row);
	sqlite3_bind_int(s, 3, kind);
	sqlite3_bind_int(s, 4, step);
	return ss_exec(ss, s);
}

static int
ssq_timer_del_all(struct saga_backend *ss, int64_t row)
{
	return ss_exec_row(ss, SQ_TIMER_DEL_ALL, row);
}

static int
ssq_timer_spent(struct saga_backend *ss, int64_t id)
{
	return ss_exec_row(ss, SQ_TIMER_DEL_ID, id);
}

static double
ssq_timer_next(struct saga_backend *ss)
{
	sqlite3_stmt *s = ss_stmt(ss, SQ_TIMER_NEXT);
	double due = 0;

	if (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_type(s, 0) != SQLITE_NULL)
		due = sqlite3_column_double(s, 0);
	sqlite3_reset(s);
	return due;
}

static size_t
ssq_timers_due(struct saga_backend *ss, double now, struct saga_due *out, size_t max)
{
	sqlite3_stmt *s = ss_stmt(ss, SQ_TIMER_DUE);
	size_t n = 0;

	sqlite3_bind_double(s, 1, now);
	sqlite3_bind_int64(s, 2, (sqlite3_int64)max);
	while (n < max && sqlite3_step(s) == SQLITE_ROW) {
		out[n].id = sqlite3_column_int64(s, 0);
		out[n].row = sqlite3_column_int64(s, 1);
		out[n].kind = sqlite3_column_int(s, 2);
		out[n].step = sqlite3_column_int(s, 3);
		n++;
	}
	sqlite3_reset(s);
	return n;
}

/* ---- retention ---- */

static int
ssq_expire(struct saga_backend *ss, double before, unsigned states, int batch,
    saga_rec_fn *fn, void *arg)
{
	sqlite3_stmt *s;
	int64_t rows[512];
	int n = 0, i;

	if (batch > 512)
		batch = 512;
	if (!(s = ss_write_stmt(ss, SQ_EXPIRE)))
		return -1;
	sqlite3_bind_double(s, 1, before);
	sqlite3_bind_int64(s, 2, states);
	sqlite3_bind_int(s, 3, batch);
	while (n < batch && sqlite3_step(s) == SQLITE_ROW) {
		struct saga_rec r = { 0 };
		r.row = rows[n++] = sqlite3_column_int64(s, 0);
		r.saga = (char *)sqlite3_column_text(s, 1);
		r.state = sqlite3_column_int(s, 2);
		fn(arg, &r);
	}
	sqlite3_reset(s);
	for (i = 0; i < n; i++)
		if (ss_exec_row(ss, SQ_EXPIRE_LOG, rows[i]) < 0 ||
		    ss_exec_row(ss, SQ_TIMER_DEL_ALL, rows[i]) < 0 ||
		    ss_exec_row(ss, SQ_EXPIRE_ROW, rows[i]) < 0)
			return -1;
	return n;
}

const struct saga_store_ops saga_store_sqlite_ops = {
	.get = ssq_get,
	.get_row = ssq_get_row,
	.by_id = ssq_by_id,
	.list = ssq_list,
	.counts = ssq_counts,
	.defs = ssq_defs,
	.history = ssq_history,
	.insert = ssq_insert,
	.update = ssq_update,
	.log = ssq_log,
	.send = ssq_send,
	.timer_set = ssq_timer_set,
	.timer_del = ssq_timer_del,
	.timer_del_all = ssq_timer_del_all,
	.timer_spent = ssq_timer_spent,
	.timer_next = ssq_timer_next,
	.timers_due = ssq_timers_due,
	.expire = ssq_expire,
	.close = ssq_close,
};
