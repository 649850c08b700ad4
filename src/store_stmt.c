/*
 * The statements of the store: preparing a family's at store_open, and
 * the steps that every record file (store_outbox.c, store_inbox.c) takes
 * the same way: a write that joins the transaction and notices its loss, a
 * batch of old records deleted, a single value read.
 */
#include "store_records.h"

#include <stdlib.h>

#include "log.h"
#include "xmalloc.h"

void
store_finalize(sqlite3_stmt **stmt, const struct store_family *fam)
{
	int i;

	if (!stmt)
		return;
	for (i = 0; i < fam->n; i++)
		sqlite3_finalize(stmt[i]);
	free(stmt);
}

/* A family's statements, or NULL when one does not prepare (damaged?). */
sqlite3_stmt **
store_prepare(struct store *st, const struct store_family *fam)
{
	sqlite3_stmt **stmt = xcalloc((size_t)fam->n, sizeof *stmt);
	int i;

	for (i = 0; i < fam->n; i++)
		if (sqlite3_prepare_v3(st->db, fam->sql[i], -1, SQLITE_PREPARE_PERSISTENT,
		    &stmt[i], NULL) != SQLITE_OK) {
			store_finalize(stmt, fam);
			return NULL;
		}
	return stmt;
}

int
store_step_done(struct store *st, sqlite3_stmt *s)
{
	int rc = sqlite3_step(s);

	sqlite3_reset(s);
	sqlite3_clear_bindings(s);
	if (rc != SQLITE_DONE && rc != SQLITE_ROW) {
		int code = sqlite3_extended_errcode(st->db) & 0xff;
		log_error("store write failed", LOG_STR("path", st->path),
		    LOG_STR("error", sqlite3_errmsg(st->db)));
		if ((code == SQLITE_IOERR || code == SQLITE_CORRUPT || code == SQLITE_NOTADB ||
		    code == SQLITE_CANTOPEN) && !st->broken) {
			st->broken = 1;
			if (st->fatal)
				st->fatal(st->fatal_arg, sqlite3_errmsg(st->db));
		}
		return -1;
	}
	return 0;
}

int
store_write_step(struct store *st, sqlite3_stmt *s)
{
	if (store_step_done(st, s) < 0) {
		store_check_tx(st);
		return -1;
	}
	return 0;
}

/* A write in the open transaction: how many rows it changed, or -1. */
int
store_write_count(struct store *st, sqlite3_stmt *s)
{
	if (store_write_step(st, s) < 0)
		return -1;
	return sqlite3_changes(st->db);
}

/* A write about one row, whose key is the statement's one parameter:
 * durable (it records something new) or relaxed (finished work). */
int
store_write_row(struct store *st, sqlite3_stmt *s, int64_t row, int durable)
{
	if ((durable ? store_begin(st) : store_begin_relaxed(st)) < 0)
		return -1;
	sqlite3_bind_int64(s, 1, row);
	return store_write_step(st, s);
}

/*
 * Forget old records, a small batch per call: dedup ids (store_expire_ids)
 * and delivered inbox records (store_inbox_expire) alike. s deletes up to
 * ?2 rows older than ?1. Only finished work goes, so the write is relaxed.
 */
int
store_expire(struct store *st, sqlite3_stmt *s, double before, int batch)
{
	if (store_begin_relaxed(st) < 0)
		return -1;
	sqlite3_bind_double(s, 1, before);
	sqlite3_bind_int(s, 2, batch);
	return store_write_count(st, s);
}

/* A single row to read: 1 if there is one. */
static int
store_read_one(sqlite3_stmt *s)
{
	return sqlite3_step(s) == SQLITE_ROW;
}

/* A read is over: the statement is ready for its next bindings. */
static void
store_read_done(sqlite3_stmt *s)
{
	sqlite3_reset(s);
	sqlite3_clear_bindings(s);
}

/* A single value: the first column of the first row, 0 when none. */
int64_t
store_read_int(sqlite3_stmt *s)
{
	int64_t v = store_read_one(s) ? sqlite3_column_int64(s, 0) : 0;

	store_read_done(s);
	return v;
}

double
store_read_double(sqlite3_stmt *s)
{
	double v = store_read_one(s) ? sqlite3_column_double(s, 0) : 0;

	store_read_done(s);
	return v;
}

/* The end of a read: its error as 0 or -1; the statement is reset. */
int
store_read_end(struct store *st, sqlite3_stmt *s)
{
	int rc = sqlite3_errcode(st->db);

	store_read_done(s);
	return rc == SQLITE_OK || rc == SQLITE_DONE || rc == SQLITE_ROW ? 0 : -1;
}
