/*
 * The inbox's records: consumed messages per subscription, from the
 * broker's delivery until the service's answer, then kept (without body)
 * for dedup, or dead-lettered for replay. This file owns their schema and
 * statements; the write transaction they join is the engine's (store.c).
 */
#include "store_records.h"

#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "props.h"
#include "util.h"
#include "xmalloc.h"

/* Schema version 2 (store.c: store_migrations). */
const char store_inbox_schema[] =
	"CREATE TABLE inbox("
	"  id INTEGER PRIMARY KEY AUTOINCREMENT,"
	"  subscription TEXT NOT NULL,"
	"  message_id TEXT NOT NULL,"
	"  exchange TEXT NOT NULL,"
	"  routing_key TEXT NOT NULL,"
	"  props BLOB,"
	"  body BLOB,"				/* NULL once delivered */
	"  state INTEGER NOT NULL DEFAULT 0,"	/* enum inbox_state */
	"  attempts INTEGER NOT NULL DEFAULT 0,"
	"  due_at REAL NOT NULL DEFAULT 0,"
	"  received_at REAL NOT NULL,"
	"  finished_at REAL,"
	"  last_status INTEGER NOT NULL DEFAULT 0,"
	"  last_error TEXT,"
	"  dead_reason TEXT);"
	"CREATE UNIQUE INDEX inbox_dedup ON inbox(subscription, message_id);"
	"CREATE INDEX inbox_open ON inbox(subscription, state, id) WHERE state <> 1;"
	"CREATE INDEX inbox_finished ON inbox(finished_at) WHERE state = 1;";

/* Version 4 counted the attempts started per record (inbox.sent), one
 * write per attempt; version 5 keeps what that count told as a flag
 * (in_doubt: the service may have seen the message) and records the
 * attempts in flight once per dispatch run instead (inbox_flight). */
const char store_inbox_sent_schema[] =
	"ALTER TABLE inbox ADD COLUMN sent INTEGER NOT NULL DEFAULT 0;";
const char store_inbox_flight_schema[] =
	"ALTER TABLE inbox RENAME COLUMN sent TO in_doubt;"
	"UPDATE inbox SET in_doubt = (in_doubt > attempts);"
	"CREATE TABLE inbox_flight(subscription TEXT PRIMARY KEY, attempts TEXT NOT NULL)"
	"  WITHOUT ROWID;";

/* Run at every open (store.c): the attempts in flight when sagad stopped
 * (inbox_flight: inbox id -> attempt number) whose outcome was never
 * recorded leave their records in doubt until an outcome is. */
const char store_inbox_settle_sql[] =
	"UPDATE inbox SET in_doubt = 1 FROM (SELECT CAST(j.key AS INTEGER) AS id,"
	"  j.value AS attempt FROM inbox_flight, json_each(inbox_flight.attempts) AS j) AS f"
	"  WHERE inbox.id = f.id AND inbox.state = 0 AND inbox.attempts < f.attempt;"
	"DELETE FROM inbox_flight;";

enum store_inbox_stmt {
	SI_INSERT, SI_LOAD, SI_FLIGHT, SI_DONE, SI_RETRY,
	SI_DEAD, SI_REPLAY_ONE, SI_REPLAY_ALL, SI_COUNT_STATE,
	SI_OLDEST, SI_EXPIRE, SI_FORGET,
	SI_NSTMT
};

static const char *const store_inbox_sql[SI_NSTMT] = {
	[SI_INSERT] = "INSERT OR IGNORE INTO inbox(subscription, message_id, exchange, routing_key,"
	    " props, body, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
	[SI_LOAD] = "SELECT id, message_id, exchange, routing_key, props, body, state, attempts,"
	    " due_at, received_at, coalesce(finished_at, 0), last_status, coalesce(last_error, ''),"
	    " coalesce(dead_reason, ''), in_doubt FROM inbox WHERE subscription = ? AND state = ?"
	    " AND id > ? ORDER BY id LIMIT ?",
	/* The attempts in flight: a JSON object, inbox id -> attempt number. */
	[SI_FLIGHT] = "INSERT OR REPLACE INTO inbox_flight(subscription, attempts) VALUES (?, ?)",
	[SI_DONE] = "UPDATE inbox SET state = 1, body = NULL, finished_at = ?, last_status = ?,"
	    " attempts = attempts + 1, due_at = 0, in_doubt = 0 WHERE id = ?",
	[SI_RETRY] = "UPDATE inbox SET attempts = ?, due_at = ?, last_status = ?, last_error = ?,"
	    " in_doubt = 0 WHERE id = ?",
	[SI_DEAD] = "UPDATE inbox SET state = 2, finished_at = ?, attempts = ?, dead_reason = ?,"
	    " last_status = ?, last_error = ?, due_at = 0, in_doubt = 0 WHERE id = ?",
	[SI_REPLAY_ONE] = "UPDATE inbox SET state = 0, attempts = 0, in_doubt = 0, due_at = 0,"
	    " dead_reason = NULL WHERE subscription = ? AND state = 2 AND message_id = ?",
	[SI_REPLAY_ALL] = "UPDATE inbox SET state = 0, attempts = 0, in_doubt = 0, due_at = 0,"
	    " dead_reason = NULL WHERE subscription = ? AND state = 2",
	[SI_COUNT_STATE] = "SELECT count(*) FROM inbox WHERE subscription = ? AND state = ?",
	[SI_OLDEST] = "SELECT min(received_at) FROM inbox WHERE subscription = ? AND state = 0",
	[SI_EXPIRE] = "DELETE FROM inbox WHERE id IN (SELECT id FROM inbox WHERE state = 1"
	    " AND finished_at < ? LIMIT ?)",
	[SI_FORGET] = "DELETE FROM inbox WHERE id = ?",
};

const struct store_family store_inbox_family = {
	store_inbox_sql, SI_NSTMT
};

void
inbox_rec_free(struct inbox_rec *r)
{
	if (!r)
		return;
	msg_free(r->m);
	free(r->last_error);
	free(r->dead_reason);
	free(r);
}

enum store_put
store_inbox_put(struct store *st, const char *sub, struct msg *m, double now,
    int64_t *id)
{
	sqlite3_stmt *s = st->inbox[SI_INSERT];
	int64_t size = (int64_t)m->body_len + 512;
	char *props = NULL;
	size_t plen = 0;
	int rc;

	if (st->broken)
		return STORE_PUT_ERROR;
	if (!store_room_for(st, size))
		return STORE_PUT_FULL;
	if (store_begin(st) < 0)
		return STORE_PUT_ERROR;
	props_pack(&m->props, &props, &plen);
	sqlite3_bind_text(s, 1, sub, -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 2, m->message_id, -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 3, m->exchange ? m->exchange : "", -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 4, m->routing_key ? m->routing_key : "", -1, SQLITE_STATIC);
	sqlite3_bind_blob(s, 5, props, (int)plen, SQLITE_STATIC);
	sqlite3_bind_blob(s, 6, m->body ? m->body : "", (int)m->body_len, SQLITE_STATIC);
	sqlite3_bind_double(s, 7, now);
	rc = store_step_done(st, s);
	free(props);
	if (rc < 0) {
		int code = sqlite3_extended_errcode(st->db);
		store_check_tx(st);
		return (code & 0xff) == SQLITE_FULL ? STORE_PUT_FULL : STORE_PUT_ERROR;
	}
	if (sqlite3_changes(st->db) == 0)
		return STORE_PUT_DUPLICATE;
	*id = sqlite3_last_insert_rowid(st->db);
	st->tx_bytes += size;
	return STORE_PUT_STORED;
}

static struct inbox_rec *
store_row_inbox(sqlite3_stmt *s)
{
	struct inbox_rec *r = xcalloc(1, sizeof *r);
	struct msg *m = xcalloc(1, sizeof *m);
	const void *blob;
	int n;

	r->m = m;
	r->id = sqlite3_column_int64(s, 0);
	m->seq = r->id;
	m->message_id = xstrdup((const char *)sqlite3_column_text(s, 1));
	m->exchange = xstrdup((const char *)sqlite3_column_text(s, 2));
	m->routing_key = xstrdup((const char *)sqlite3_column_text(s, 3));
	blob = sqlite3_column_blob(s, 4);
	n = sqlite3_column_bytes(s, 4);
	if (props_unpack(blob, n, &m->props) < 0)
		log_error("damaged inbox properties in store", LOG_INT("id", r->id));
	blob = sqlite3_column_blob(s, 5);
	n = sqlite3_column_bytes(s, 5);
	m->body = xmalloc(n ? n : 1);
	if (n)
		memcpy(m->body, blob, n);
	m->body_len = n;
	r->state = sqlite3_column_int(s, 6);
	r->attempts = (unsigned)sqlite3_column_int(s, 7);
	r->due_at = sqlite3_column_double(s, 8);
	r->received_at = sqlite3_column_double(s, 9);
	r->finished_at = sqlite3_column_double(s, 10);
	r->last_status = sqlite3_column_int(s, 11);
	r->last_error = xstrdup((const char *)sqlite3_column_text(s, 12));
	r->dead_reason = xstrdup((const char *)sqlite3_column_text(s, 13));
	r->redelivered = sqlite3_column_int(s, 14) != 0;
	m->created_at = r->received_at;
	return r;
}

int
store_inbox_load(struct store *st, const char *sub, enum inbox_state state,
    int64_t after, size_t limit, struct inbox_rec **out, size_t *n)
{
	sqlite3_stmt *s = st->inbox[SI_LOAD];

	*n = 0;
	sqlite3_bind_text(s, 1, sub, -1, SQLITE_STATIC);
	sqlite3_bind_int(s, 2, state);
	sqlite3_bind_int64(s, 3, after);
	sqlite3_bind_int64(s, 4, (sqlite3_int64)limit);
	while (*n < limit && sqlite3_step(s) == SQLITE_ROW)
		out[(*n)++] = store_row_inbox(s);
	return store_read_end(st, s);
}

int
store_inbox_done(struct store *st, int64_t id, double now, int status)
{
	sqlite3_stmt *s = st->inbox[SI_DONE];

	if (store_begin_relaxed(st) < 0)
		return -1;
	sqlite3_bind_double(s, 1, now);
	sqlite3_bind_int(s, 2, status);
	sqlite3_bind_int64(s, 3, id);
	return store_write_step(st, s);
}

/* The whole set in one small row: one write per dispatch run, however
 * many attempts it starts (a mark per record cost a row rewrite each). */
int
store_inbox_in_flight(struct store *st, const char *sub, const struct inbox_attempt *a,
    size_t n)
{
	sqlite3_stmt *s = st->inbox[SI_FLIGHT];
	/* ,"id":attempt is at most 1 + 22 + 1 + 20 bytes */
	char *json = xmalloc(n * 44 + 2), *p = json;
	size_t i;
	int rc;

	if (store_begin_relaxed(st) < 0) {
		free(json);
		return -1;
	}
	*p++ = '{';
	for (i = 0; i < n; i++) {
		if (i)
			*p++ = ',';
		*p++ = '"';
		p += util_u64_dec((uint64_t)a[i].id, p);
		*p++ = '"';
		*p++ = ':';
		p += util_u64_dec(a[i].attempt, p);
	}
	*p++ = '}';
	sqlite3_bind_text(s, 1, sub, -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 2, json, (int)(p - json), SQLITE_STATIC);
	rc = store_write_step(st, s);
	free(json);
	return rc;
}

int
store_inbox_retry(struct store *st, int64_t id, unsigned attempts, double due_at,
    int status, const char *error)
{
	sqlite3_stmt *s = st->inbox[SI_RETRY];

	if (store_begin_relaxed(st) < 0)
		return -1;
	sqlite3_bind_int(s, 1, (int)attempts);
	sqlite3_bind_double(s, 2, due_at);
	sqlite3_bind_int(s, 3, status);
	sqlite3_bind_text(s, 4, error, -1, SQLITE_STATIC);
	sqlite3_bind_int64(s, 5, id);
	return store_write_step(st, s);
}

int
store_inbox_dead(struct store *st, int64_t id, double now, unsigned attempts,
    const char *reason, int status, const char *error)
{
	sqlite3_stmt *s = st->inbox[SI_DEAD];

	if (store_begin(st) < 0)
		return -1;
	sqlite3_bind_double(s, 1, now);
	sqlite3_bind_int(s, 2, (int)attempts);
	sqlite3_bind_text(s, 3, reason, -1, SQLITE_STATIC);
	sqlite3_bind_int(s, 4, status);
	sqlite3_bind_text(s, 5, error, -1, SQLITE_STATIC);
	sqlite3_bind_int64(s, 6, id);
	return store_write_step(st, s);
}

int
store_inbox_replay(struct store *st, const char *sub, const char *message_id)
{
	sqlite3_stmt *s = st->inbox[message_id ? SI_REPLAY_ONE : SI_REPLAY_ALL];

	if (store_begin(st) < 0)
		return -1;
	sqlite3_bind_text(s, 1, sub, -1, SQLITE_STATIC);
	if (message_id)
		sqlite3_bind_text(s, 2, message_id, -1, SQLITE_STATIC);
	return store_write_count(st, s);
}

int64_t
store_inbox_count(struct store *st, const char *sub, enum inbox_state state)
{
	sqlite3_stmt *s = st->inbox[SI_COUNT_STATE];

	sqlite3_bind_text(s, 1, sub, -1, SQLITE_STATIC);
	sqlite3_bind_int(s, 2, state);
	return store_read_int(s);
}

double
store_inbox_oldest(struct store *st, const char *sub)
{
	sqlite3_stmt *s = st->inbox[SI_OLDEST];

	sqlite3_bind_text(s, 1, sub, -1, SQLITE_STATIC);
	return store_read_double(s);
}

int
store_inbox_expire(struct store *st, double before, int batch)
{
	return store_expire(st, st->inbox[SI_EXPIRE], before, batch);
}

int
store_inbox_forget(struct store *st, int64_t id)
{
	/* Durable: the sender's retry with the same id must find it gone. */
	return store_write_row(st, st->inbox[SI_FORGET], id, 1);
}
