/*
 * The outbox's records: messages accepted for publishing (outbox), in seq
 * order until the broker confirms them, and the message ids seen for dedup
 * (outbox_ids). This file owns their schema and statements; the write
 * transaction they join is the engine's (store.c).
 */
#include "store_records.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "props.h"
#include "trace.h"
#include "xmalloc.h"

/* Schema version 1 (store.c: store_migrations). */
const char store_outbox_schema[] =
	"CREATE TABLE outbox("
	"  seq INTEGER PRIMARY KEY AUTOINCREMENT,"	/* never reused: order survives deletes */
	"  message_id TEXT NOT NULL,"
	"  exchange TEXT NOT NULL,"
	"  routing_key TEXT NOT NULL,"
	"  props BLOB,"
	"  body BLOB NOT NULL,"
	"  created_at REAL NOT NULL,"
	"  attempts INTEGER NOT NULL DEFAULT 0,"
	"  due_at REAL NOT NULL DEFAULT 0,"		/* > 0: waits for a retry */
	"  last_error TEXT);"
	"CREATE INDEX outbox_due ON outbox(due_at) WHERE due_at > 0;"
	"CREATE TABLE outbox_ids(message_id TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;"
	"CREATE INDEX outbox_ids_at ON outbox_ids(at);";

enum store_outbox_stmt {
	SO_ID_INSERT, SO_INSERT, SO_FETCH, SO_FETCH_DUE,
	SO_NEXT_DUE, SO_DELETE, SO_RETRY, SO_CLEAR_DUE,
	SO_OLDEST, SO_ID_EXPIRE, SO_ATTEMPTS, SO_LIST,
	SO_DEFER_EX, SO_ID_FORGET,
	SO_NSTMT
};

static const char *const store_outbox_sql[SO_NSTMT] = {
	[SO_ID_INSERT] = "INSERT OR IGNORE INTO outbox_ids(message_id, at) VALUES (?, ?)",
	[SO_INSERT] = "INSERT INTO outbox(message_id, exchange, routing_key, props, body, created_at)"
	    " VALUES (?, ?, ?, ?, ?, ?)",
	[SO_FETCH] = "SELECT seq, message_id, exchange, routing_key, props, body, attempts, created_at"
	    " FROM outbox WHERE seq > ? AND seq <= ? AND due_at <= ? ORDER BY seq LIMIT ?",
	[SO_FETCH_DUE] = "SELECT seq, message_id, exchange, routing_key, props, body, attempts, created_at"
	    " FROM outbox WHERE due_at > 0 AND due_at <= ? AND seq <= ? ORDER BY seq LIMIT ?",
	[SO_NEXT_DUE] = "SELECT min(due_at) FROM outbox WHERE due_at > 0",
	[SO_DELETE] = "DELETE FROM outbox WHERE seq = ?",
	[SO_RETRY] = "UPDATE outbox SET due_at = ?, attempts = ?, last_error = ? WHERE seq = ?",
	[SO_CLEAR_DUE] = "UPDATE outbox SET due_at = 0 WHERE seq = ?",
	[SO_OLDEST] = "SELECT created_at FROM outbox ORDER BY seq LIMIT 1",
	[SO_ID_EXPIRE] = "DELETE FROM outbox_ids WHERE message_id IN"
	    " (SELECT message_id FROM outbox_ids WHERE at < ? ORDER BY at LIMIT ?)",
	[SO_ATTEMPTS] = "SELECT attempts FROM outbox WHERE seq = ?",
	[SO_LIST] = "SELECT seq, message_id, exchange, routing_key, attempts, created_at, due_at,"
	    " coalesce(last_error, ''), length(body), props FROM outbox WHERE seq > ?"
	    " ORDER BY seq LIMIT ?",
	[SO_DEFER_EX] = "UPDATE outbox SET due_at = ?, attempts = attempts + 1, last_error = ?"
	    " WHERE exchange = ?",
	[SO_ID_FORGET] = "DELETE FROM outbox_ids WHERE message_id = ?",
};

const struct store_family store_outbox_family = {
	store_outbox_sql, SO_NSTMT
};

enum store_put
store_outbox_put(struct store *st, struct msg *m, double now, unsigned flags)
{
	int dedup = flags & STORE_OUT_DEDUP;
	sqlite3_stmt *s;
	char *props = NULL;
	size_t plen = 0;
	int64_t size = (int64_t)m->body_len + 256;

	if (st->broken)
		return STORE_PUT_ERROR;
	if (!store_room_for(st, size))
		return STORE_PUT_FULL;
	if (store_begin(st) < 0)
		return STORE_PUT_ERROR;
	if (dedup) {
		s = st->outbox[SO_ID_INSERT];
		sqlite3_bind_text(s, 1, m->message_id, -1, SQLITE_STATIC);
		sqlite3_bind_double(s, 2, now);
		if (store_step_done(st, s) < 0)
			goto fail;
		if (sqlite3_changes(st->db) == 0)
			return STORE_PUT_DUPLICATE;
	}
	props_pack(&m->props, &props, &plen);
	s = st->outbox[SO_INSERT];
	sqlite3_bind_text(s, 1, m->message_id, -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 2, m->exchange, -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 3, m->routing_key, -1, SQLITE_STATIC);
	sqlite3_bind_blob(s, 4, props, (int)plen, SQLITE_STATIC);
	sqlite3_bind_blob(s, 5, m->body ? m->body : "", (int)m->body_len, SQLITE_STATIC);
	sqlite3_bind_double(s, 6, now);
	if (store_step_done(st, s) < 0) {
		free(props);
		/* The id must not outlive the failed row: a retry of the same
		 * request would look like a duplicate and be lost. */
		if (dedup && !sqlite3_get_autocommit(st->db)) {
			sqlite3_stmt *d = st->outbox[SO_ID_FORGET];
			sqlite3_bind_text(d, 1, m->message_id, -1, SQLITE_STATIC);
			store_step_done(st, d);
		}
		goto fail;
	}
	free(props);
	m->seq = sqlite3_last_insert_rowid(st->db);
	m->created_at = now;
	st->tx_seq = m->seq;
	if (!(flags & STORE_OUT_EARLY))
		st->tx_hold = 1;
	st->tx_count++;
	st->tx_bytes += size;
	return STORE_PUT_STORED;
fail:
	{
		int code = sqlite3_extended_errcode(st->db);

			st->full_seen = 1;
		store_check_tx(st);
		return (code & 0xff) == SQLITE_FULL ? STORE_PUT_FULL : STORE_PUT_ERROR;
	}
}

static struct msg *
store_row_msg(sqlite3_stmt *s)
{
	struct msg *m = xcalloc(1, sizeof *m);
	const void *blob;
	int n;

	m->seq = sqlite3_column_int64(s, 0);
	m->message_id = xstrdup((const char *)sqlite3_column_text(s, 1));
	m->exchange = xstrdup((const char *)sqlite3_column_text(s, 2));
	m->routing_key = xstrdup((const char *)sqlite3_column_text(s, 3));
	blob = sqlite3_column_blob(s, 4);
	n = sqlite3_column_bytes(s, 4);
	if (props_unpack(blob, n, &m->props) < 0)
		log_error("damaged message properties in store, publishing without them",
		    LOG_INT("seq", m->seq));
	blob = sqlite3_column_blob(s, 5);
	n = sqlite3_column_bytes(s, 5);
	m->body = xmalloc(n ? n : 1);
	if (n)
		memcpy(m->body, blob, n);
	m->body_len = n;
	m->attempts = sqlite3_column_int(s, 6);
	m->created_at = sqlite3_column_double(s, 7);
	return m;
}

static int
store_collect(struct store *st, sqlite3_stmt *s, size_t limit, struct msg **out,
    size_t *n)
{
	*n = 0;
	while (*n < limit && sqlite3_step(s) == SQLITE_ROW)
		out[(*n)++] = store_row_msg(s);
	if (store_read_end(st, s) < 0) {
		log_error("store read failed", LOG_STR("path", st->path),
		    LOG_STR("error", sqlite3_errmsg(st->db)));
		return -1;
	}
	return 0;
}

int
store_outbox_fetch(struct store *st, int64_t after, int64_t upto, double now,
    size_t limit, struct msg **out, size_t *n)
{
	sqlite3_stmt *s = st->outbox[SO_FETCH];

	sqlite3_bind_int64(s, 1, after);
	sqlite3_bind_int64(s, 2, upto);
	sqlite3_bind_double(s, 3, now);
	sqlite3_bind_int64(s, 4, (sqlite3_int64)limit);
	return store_collect(st, s, limit, out, n);
}

int
store_outbox_fetch_due(struct store *st, int64_t upto, double now, size_t limit,
    struct msg **out, size_t *n)
{
	sqlite3_stmt *s = st->outbox[SO_FETCH_DUE];

	sqlite3_bind_double(s, 1, now);
	sqlite3_bind_int64(s, 2, upto);
	sqlite3_bind_int64(s, 3, (sqlite3_int64)limit);
	return store_collect(st, s, limit, out, n);
}

double
store_outbox_next_due(struct store *st)
{
	return store_read_double(st->outbox[SO_NEXT_DUE]);
}

int
store_outbox_done(struct store *st, int64_t seq)
{
	if (store_write_row(st, st->outbox[SO_DELETE], seq, 0) < 0)
		return -1;
	if (sqlite3_changes(st->db) > 0)
		st->tx_count--;
	return 0;
}

unsigned
store_outbox_attempts(struct store *st, int64_t seq)
{
	sqlite3_stmt *s = st->outbox[SO_ATTEMPTS];

	sqlite3_bind_int64(s, 1, seq);
	return (unsigned)store_read_int(s);
}

int
store_outbox_retry(struct store *st, int64_t seq, double due_at, unsigned attempts,
    const char *error)
{
	sqlite3_stmt *s = st->outbox[SO_RETRY];

	if (store_begin_relaxed(st) < 0)
		return -1;
	sqlite3_bind_double(s, 1, due_at);
	sqlite3_bind_int(s, 2, (int)attempts);
	sqlite3_bind_text(s, 3, error, -1, SQLITE_STATIC);
	sqlite3_bind_int64(s, 4, seq);
	return store_write_step(st, s);
}

int
store_outbox_clear_due(struct store *st, int64_t seq)
{
	return store_write_row(st, st->outbox[SO_CLEAR_DUE], seq, 0);
}

int64_t
store_outbox_count(const struct store *st)
{
	return st->count + st->tx_count;
}

double
store_outbox_oldest(struct store *st)
{
	return store_read_double(st->outbox[SO_OLDEST]);
}

int
store_expire_ids(struct store *st, double before, int batch)
{
	return store_expire(st, st->outbox[SO_ID_EXPIRE], before, batch);
}

/* The listing's trace id, from the row's properties (damaged: none). */
static void
store_row_trace(struct store_row *r, const void *blob, int len)
{
	struct props p;

	r->trace_id[0] = '\0';
	memset(&p, 0, sizeof p);
	if (blob && len > 0 && props_unpack(blob, (size_t)len, &p) == 0 && !trace_id(&p, r->trace_id))
		r->trace_id[0] = '\0';
	props_free(&p);
}

int
store_outbox_list(struct store *st, int64_t after, size_t limit,
    struct store_row *rows, size_t *n)
{
	sqlite3_stmt *s = st->outbox[SO_LIST];

	*n = 0;
	sqlite3_bind_int64(s, 1, after);
	sqlite3_bind_int64(s, 2, (sqlite3_int64)limit);
	while (*n < limit && sqlite3_step(s) == SQLITE_ROW) {
		struct store_row *r = &rows[(*n)++];
		r->seq = sqlite3_column_int64(s, 0);
		snprintf(r->message_id, sizeof r->message_id, "%s", sqlite3_column_text(s, 1));
		snprintf(r->exchange, sizeof r->exchange, "%s", sqlite3_column_text(s, 2));
		snprintf(r->routing_key, sizeof r->routing_key, "%s", sqlite3_column_text(s, 3));
		r->attempts = (unsigned)sqlite3_column_int(s, 4);
		r->created_at = sqlite3_column_double(s, 5);
		r->due_at = sqlite3_column_double(s, 6);
		snprintf(r->last_error, sizeof r->last_error, "%s", sqlite3_column_text(s, 7));
		r->body_len = sqlite3_column_int64(s, 8);
		store_row_trace(r, sqlite3_column_blob(s, 9), sqlite3_column_bytes(s, 9));
	}
	return store_read_end(st, s);
}

int
store_outbox_defer_exchange(struct store *st, const char *exchange, double due_at,
    const char *error)
{
	sqlite3_stmt *s = st->outbox[SO_DEFER_EX];

	if (store_begin(st) < 0)
		return -1;
	sqlite3_bind_double(s, 1, due_at);
	sqlite3_bind_text(s, 2, error, -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 3, exchange, -1, SQLITE_STATIC);
	return store_write_count(st, s);
}
