#include "store.h"

#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "log.h"
#include "saga_store.h"
#include "metrics.h"
#include "syncer.h"
#include "xmalloc.h"

/* Commits between two counts of the pages in use (store_commit). */
#define STORE_COUNT_EVERY 64
/* The write-ahead log is checkpointed (inside a COMMIT, on the loop, with
 * its fsyncs) every STORE_CKPT_PAGES pages; every STORE_CKPT_PAGES_TIGHT when
 * the disk has less than STORE_CKPT_ROOM free, where a big log could fill
 * it. */
#define STORE_CKPT_PAGES 1024
#define STORE_CKPT_PAGES_TIGHT 256
#define STORE_CKPT_PAGES_MIN 16
#define STORE_CKPT_ROOM ((int64_t)64 << 20)
/* Pages kept free beyond two checkpoint windows (store_headroom). */
#define STORE_ROOM_PAGES 32

enum store_stmt {
	ST_BEGIN, ST_COMMIT, ST_ROLLBACK,
	ST_ID_INSERT, ST_OUT_INSERT, ST_OUT_FETCH, ST_OUT_FETCH_DUE,
	ST_OUT_NEXT_DUE, ST_OUT_DELETE, ST_OUT_RETRY, ST_OUT_CLEAR_DUE,
	ST_OUT_OLDEST, ST_ID_EXPIRE, ST_PAGES, ST_OUT_ATTEMPTS, ST_OUT_LIST,
	ST_IN_INSERT, ST_IN_LOAD, ST_IN_DONE, ST_IN_RETRY, ST_IN_DEAD,
	ST_IN_REPLAY_ONE, ST_IN_REPLAY_ALL, ST_IN_COUNT, ST_IN_OLDEST, ST_IN_EXPIRE,
	ST_IN_FORGET, ST_OUT_DEFER_EX, ST_ID_FORGET, ST_IN_SENT,
	ST_COUNT
};

static const char *const store_sql[ST_COUNT] = {
	[ST_BEGIN] = "BEGIN IMMEDIATE",
	[ST_COMMIT] = "COMMIT",
	[ST_ROLLBACK] = "ROLLBACK",
	[ST_ID_INSERT] = "INSERT OR IGNORE INTO outbox_ids(message_id, at) VALUES (?, ?)",
	[ST_OUT_INSERT] = "INSERT INTO outbox(message_id, exchange, routing_key, props, body, created_at)"
	    " VALUES (?, ?, ?, ?, ?, ?)",
	[ST_OUT_FETCH] = "SELECT seq, message_id, exchange, routing_key, props, body, attempts, created_at"
	    " FROM outbox WHERE seq > ? AND seq <= ? AND due_at <= ? ORDER BY seq LIMIT ?",
	[ST_OUT_FETCH_DUE] = "SELECT seq, message_id, exchange, routing_key, props, body, attempts, created_at"
	    " FROM outbox WHERE due_at > 0 AND due_at <= ? AND seq <= ? ORDER BY seq LIMIT ?",
	[ST_OUT_NEXT_DUE] = "SELECT min(due_at) FROM outbox WHERE due_at > 0",
	[ST_OUT_DELETE] = "DELETE FROM outbox WHERE seq = ?",
	[ST_OUT_RETRY] = "UPDATE outbox SET due_at = ?, attempts = ?, last_error = ? WHERE seq = ?",
	[ST_OUT_CLEAR_DUE] = "UPDATE outbox SET due_at = 0 WHERE seq = ?",
	[ST_OUT_OLDEST] = "SELECT created_at FROM outbox ORDER BY seq LIMIT 1",
	[ST_ID_EXPIRE] = "DELETE FROM outbox_ids WHERE message_id IN"
	    " (SELECT message_id FROM outbox_ids WHERE at < ? ORDER BY at LIMIT ?)",
	[ST_OUT_ATTEMPTS] = "SELECT attempts FROM outbox WHERE seq = ?",
	[ST_OUT_LIST] = "SELECT seq, message_id, exchange, routing_key, attempts, created_at, due_at,"
	    " coalesce(last_error, ''), length(body) FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
	[ST_IN_INSERT] = "INSERT OR IGNORE INTO inbox(subscription, message_id, exchange, routing_key,"
	    " props, body, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
	[ST_IN_LOAD] = "SELECT id, message_id, exchange, routing_key, props, body, state, attempts,"
	    " due_at, received_at, coalesce(finished_at, 0), last_status, coalesce(last_error, ''),"
	    " coalesce(dead_reason, ''), sent FROM inbox WHERE subscription = ? AND state = ?"
	    " AND id > ? ORDER BY id LIMIT ?",
	[ST_IN_SENT] = "UPDATE inbox SET sent = ? WHERE id = ?",
	[ST_IN_DONE] = "UPDATE inbox SET state = 1, body = NULL, finished_at = ?, last_status = ?,"
	    " attempts = attempts + 1, due_at = 0 WHERE id = ?",
	[ST_IN_RETRY] = "UPDATE inbox SET attempts = ?, due_at = ?, last_status = ?, last_error = ?"
	    " WHERE id = ?",
	[ST_IN_DEAD] = "UPDATE inbox SET state = 2, finished_at = ?, attempts = ?, dead_reason = ?,"
	    " last_status = ?, last_error = ?, due_at = 0 WHERE id = ?",
	[ST_IN_REPLAY_ONE] = "UPDATE inbox SET state = 0, attempts = 0, sent = 0, due_at = 0,"
	    " dead_reason = NULL WHERE subscription = ? AND state = 2 AND message_id = ?",
	[ST_IN_REPLAY_ALL] = "UPDATE inbox SET state = 0, attempts = 0, sent = 0, due_at = 0,"
	    " dead_reason = NULL WHERE subscription = ? AND state = 2",
	[ST_IN_COUNT] = "SELECT count(*) FROM inbox WHERE subscription = ? AND state = ?",
	[ST_IN_OLDEST] = "SELECT min(received_at) FROM inbox WHERE subscription = ? AND state = 0",
	[ST_IN_EXPIRE] = "DELETE FROM inbox WHERE id IN (SELECT id FROM inbox WHERE state = 1"
	    " AND finished_at < ? LIMIT ?)",
	[ST_OUT_DEFER_EX] = "UPDATE outbox SET due_at = ?, attempts = attempts + 1, last_error = ?"
	    " WHERE exchange = ?",
	[ST_ID_FORGET] = "DELETE FROM outbox_ids WHERE message_id = ?",
	[ST_IN_FORGET] = "DELETE FROM inbox WHERE id = ?",
	[ST_PAGES] = "SELECT (SELECT page_count FROM pragma_page_count),"
	    " (SELECT freelist_count FROM pragma_freelist_count)",
};

/* Schema migrations: entry i takes the store from version i to i + 1. */
static const char *const store_migrations[] = {
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
	"CREATE INDEX outbox_ids_at ON outbox_ids(at);",

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
	"CREATE INDEX inbox_finished ON inbox(finished_at) WHERE state = 1;",

	saga_store_schema,	/* the saga engine's records (saga_store.c) */

	/* Attempts started (store_inbox_sent); attempts counts those whose
	 * outcome is recorded. More started than recorded: one was in flight
	 * when sagad stopped, and the service may have seen the message. */
	"ALTER TABLE inbox ADD COLUMN sent INTEGER NOT NULL DEFAULT 0;",
};

struct store_cb {
	store_done_fn *fn;
	void *arg;
};

struct store {
	sqlite3 *db;
	char *path;
	int lock_fd;
	sqlite3_stmt *stmt[ST_COUNT];
	struct event *commit_ev;
	struct event *sync_ev;		/* commit now: the syncer waits for work */
	int in_tx;
	int broken;		/* a fatal error: the store can no longer write */
	struct store_cb *cbs;
	size_t ncbs, capcbs;
	struct store_cb *wcbs;	/* store_on_written: at the commit itself */
	size_t nwcbs, capwcbs;
	struct syncer_job *jobs;	/* store_on_durable_early, of the open transaction */
	size_t njobs, capjobs;
	struct store_hooks hooks;
	void (*fatal)(void *, const char *);
	void *fatal_arg;
	int64_t max_bytes;
	int64_t page_size;
	int64_t bytes;		/* pages in use at the last count, plus what was added since */
	int64_t counted;	/* pages in use at the last count, in bytes */
	int64_t reusable;	/* free pages inside the file at the last count, in bytes */
	int64_t fs_free;	/* free on its file system at the last count; -1: unknown */
	int refusing;		/* new records refused to keep the headroom (logged once) */
	int uncounted;		/* commits since the last count of pages */
	int64_t tx_bytes;	/* rough size of what the open transaction adds */
	int64_t committed_seq, tx_seq;
	int64_t written_seq;	/* tx_seq at the last commit, durable or not yet */
	int64_t visible_seq;	/* the relay may publish up to it (store_publishable_seq) */
	int tx_hold;		/* the open transaction holds a message that waits for the fsync */
	int64_t count, tx_count;
	int full_seen;		/* SQLITE_FULL in this transaction: checkpoint after */
	int ckpt_pages;		/* the log's checkpoint size now (store_tune_checkpoint) */
	int tx_durable;		/* the open transaction holds a write that needs an fsync */
	struct syncer *syncer;	/* store_set_async: fsyncs off the event loop */
	int wal_fd;
	struct store_batch *batches;	/* committed, waiting for their sync */
	size_t nbatches, capbatches;
};

static void store_commit_cb(evutil_socket_t fd, short what, void *arg);

static int
store_exec(struct store *st, const char *sql, char **err)
{
	char *msg = NULL;

	if (sqlite3_exec(st->db, sql, NULL, NULL, &msg) != SQLITE_OK) {
		if (err)
			*err = xasprintf("store %s: %s", st->path,
		    msg ? msg : sqlite3_errmsg(st->db));
		sqlite3_free(msg);
		return -1;
	}
	return 0;
}

static int64_t
store_query_int(struct store *st, const char *sql)
{
	sqlite3_stmt *s;
	int64_t v = -1;

	if (sqlite3_prepare_v2(st->db, sql, -1, &s, NULL) != SQLITE_OK)
		return -1;
	if (sqlite3_step(s) == SQLITE_ROW)
		v = sqlite3_column_int64(s, 0);
	sqlite3_finalize(s);
	return v;
}

static int
store_migrate(struct store *st, char **err)
{
	int64_t v = store_query_int(st, "PRAGMA user_version");
	size_t n = sizeof store_migrations / sizeof store_migrations[0];
	char sql[64];

	if (v < 0) {
		*err = xasprintf("store %s: not a sagad store or damaged: %s",
		    st->path, sqlite3_errmsg(st->db));
		return -1;
	}
	if (v > (int64_t)n) {
		*err = xasprintf("store %s: schema version %lld is newer than this sagad (%zu)",
		    st->path, (long long)v, n);
		return -1;
	}
	for (; v < (int64_t)n; v++) {
		if (store_exec(st, "BEGIN", err) < 0)
			return -1;
		snprintf(sql, sizeof sql, "PRAGMA user_version = %lld", (long long)v + 1);
		if (store_exec(st, store_migrations[v], err) < 0 ||
		    store_exec(st, sql, err) < 0 || store_exec(st, "COMMIT", err) < 0) {
			sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
			return -1;
		}
		log_info("store migrated", LOG_STR("path", st->path), LOG_INT("version", v + 1));
	}
	return 0;
}

static int
store_fail(struct store *st, char **err, const char *what)
{
	*err = xasprintf("store %s: %s: %s", st->path, what,
	    st->db ? sqlite3_errmsg(st->db) : strerror(errno));
	store_close(st);
	return -1;
}

void
store_fsync_histogram(struct store *st, struct histogram *out)
{
	if (st->syncer)
		syncer_took(st->syncer, out);
	else
		histogram_init(out, metrics_latency_bounds, metrics_latency_nbounds);
}

/*
 * A bigger log means fewer checkpoints, and the loop waits for the fsyncs
 * of each (a quarter of them: at 1 MiB, 23 a second under a full inbox
 * load), and hot pages are copied once instead of four times. Near a full
 * disk the log stays small, and shrinks back after each checkpoint, so
 * that it cannot be what fills the disk; below 16 MiB free it shrinks with
 * the free space (a 64th of it), because the store keeps two windows of
 * it free (store_headroom).
 */
int
store_checkpoint_pages(int64_t free_bytes)
{
	int64_t pages = free_bytes >> 16;

	if (free_bytes >= STORE_CKPT_ROOM)
		return STORE_CKPT_PAGES;
	if (pages > STORE_CKPT_PAGES_TIGHT)
		return STORE_CKPT_PAGES_TIGHT;
	return pages < STORE_CKPT_PAGES_MIN ? STORE_CKPT_PAGES_MIN : (int)pages;
}

/*
 * What the file system must keep free for the store itself: once a disk
 * is full, deleting a confirmed message still writes to the write-ahead
 * log, and the checkpoint that empties the log copies its pages into the
 * database file, which may have to grow. A store that used that room for
 * new messages wedges for good: nothing can be deleted, so nothing frees
 * room (issue 14, A7). Two checkpoint windows (the log's pages waiting to
 * be copied, and the log of the deletes that follow) and a margin.
 */
int64_t
store_headroom(int ckpt_pages, int64_t page_size)
{
	return (2 * (int64_t)ckpt_pages + STORE_ROOM_PAGES) * page_size;
}

/*
 * Room for size more bytes? Within max_bytes, and without eating into the
 * headroom. What counts as free: the file system's free space and the free
 * pages inside the file (reused without growing it), less twice what was
 * added since the count (a new page is written to the log, then copied to
 * the file).
 */
static int
store_has_room(const struct store *st, int64_t size)
{
	int64_t added = st->bytes - st->counted + st->tx_bytes + size;

	if (st->bytes + st->tx_bytes + size > st->max_bytes)
		return 0;
	if (st->fs_free < 0)
		return 1;
	return st->fs_free + st->reusable - 2 * added >=
	    store_headroom(st->ckpt_pages, st->page_size);
}

/* A new record refused or accepted again: an operator sees why. */
static void
store_note_room(struct store *st, int room)
{
	if (room == !st->refusing)
		return;
	st->refusing = !room;
	if (room)
		log_info("store has room again", LOG_STR("path", st->path));
	else
		log_warn("store refuses new messages: file system nearly full",
		    LOG_STR("path", st->path), LOG_INT("free_bytes", st->fs_free),
		    LOG_INT("headroom_bytes", store_headroom(st->ckpt_pages, st->page_size)));
}

/* Room for a new record of size bytes (logged when that changes). */
static int
store_room_for(struct store *st, int64_t size)
{
	int room = store_has_room(st, size);

	store_note_room(st, room);
	return room;
}

static void
store_tune_checkpoint(struct store *st)
{
	int pages;
	char sql[64];

	if (st->fs_free >= 0)
		pages = store_checkpoint_pages(st->fs_free);
	else if (st->ckpt_pages)
		return;		/* unknown: as it is */
	else
		pages = STORE_CKPT_PAGES_TIGHT;
	if (pages == st->ckpt_pages)
		return;
	st->ckpt_pages = pages;
	sqlite3_wal_autocheckpoint(st->db, pages);
	/* Kept above the checkpoint size, the log's file is reused as it
	 * is: truncated at every restart, it would grow again and each fsync
	 * would also commit the file system's journal (1.0-1.7 -> 0.7-1.0
	 * ms per fdatasync under full inbox load). */
	snprintf(sql, sizeof sql, "PRAGMA journal_size_limit=%lld",
	    (long long)pages * 4 * (st->page_size > 0 ? st->page_size : 4096));
	sqlite3_exec(st->db, sql, NULL, NULL, NULL);
}

/* Count the pages in use and free, and the free space of the file system;
 * then size the checkpoints for it. */
static void
store_count(struct store *st)
{
	sqlite3_stmt *s = st->stmt[ST_PAGES];
	struct statvfs sv;

	if (sqlite3_step(s) == SQLITE_ROW) {
		int64_t pages = sqlite3_column_int64(s, 0), unused = sqlite3_column_int64(s, 1);
		st->bytes = st->counted = (pages - unused) * st->page_size;
		st->reusable = unused * st->page_size;
	}
	sqlite3_reset(s);
	st->uncounted = 0;
	if (fstatvfs(st->lock_fd, &sv) == 0)
		st->fs_free = (int64_t)sv.f_bavail * (int64_t)sv.f_frsize;
	else
		st->fs_free = -1;
	store_tune_checkpoint(st);
}

/* Close to the headroom, or to max_bytes, where the count decides between
 * 202 and 507: counted at every commit. */
static int
store_count_near(const struct store *st)
{
	int64_t added = st->bytes - st->counted;

	return st->bytes >= st->max_bytes - st->max_bytes / 4 ||
	    (st->fs_free >= 0 && st->fs_free - 2 * added < STORE_CKPT_ROOM);
}

struct store *
store_open(const char *path, struct event_base *base, int64_t max_bytes, char **err)
{
	struct store *st = xcalloc(1, sizeof *st);
	int i;

	*err = NULL;
	st->path = xstrdup(path);
	st->max_bytes = max_bytes;
	st->wal_fd = -1;
	st->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (st->lock_fd < 0) {
		store_fail(st, err, "cannot open");
		return NULL;
	}
	/* Two daemons on one store would publish everything twice. flock is
	 * independent of SQLite's own fcntl locks on Linux. */
	if (flock(st->lock_fd, LOCK_EX | LOCK_NB) < 0) {
		store_fail(st, err, "in use by another process");
		return NULL;
	}
	if (sqlite3_open_v2(path, &st->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE |
	    SQLITE_OPEN_NOMUTEX, NULL) != SQLITE_OK) {
		store_fail(st, err, "cannot open");
		return NULL;
	}
	sqlite3_extended_result_codes(st->db, 1);
	/* synchronous=NORMAL, and store_flush syncs the WAL itself after every
	 * commit that must be durable (store_sync_wal): durable before 202.
	 * A bounded page cache keeps memory flat with a large backlog.
	 * secure_delete=FAST: a delete zeroes what it frees only on pages it
	 * writes anyway. With it ON (Debian's default) deleting a message
	 * writes its freed overflow pages to the log, as big as the message:
	 * the room that a full disk no longer has (store_headroom). */
	if (store_exec(st, "PRAGMA journal_mode=WAL", err) < 0 ||
	    store_exec(st, "PRAGMA synchronous=NORMAL", err) < 0 ||
	    store_exec(st, "PRAGMA cache_size=-4096", err) < 0 ||
	    store_exec(st, "PRAGMA secure_delete=FAST", err) < 0 ||
	    store_exec(st, "PRAGMA foreign_keys=ON", err) < 0) {
		store_close(st);
		return NULL;
	}
	if (store_migrate(st, err) < 0) {
		store_close(st);
		return NULL;
	}
	for (i = 0; i < ST_COUNT; i++)
		if (sqlite3_prepare_v3(st->db, store_sql[i], -1, SQLITE_PREPARE_PERSISTENT,
		    &st->stmt[i], NULL) != SQLITE_OK) {
			store_fail(st, err, "cannot prepare statements (damaged?)");
			return NULL;
		}
	st->page_size = store_query_int(st, "PRAGMA page_size");
	st->committed_seq = store_query_int(st, "SELECT coalesce(max(seq), 0) FROM outbox");
	st->count = store_query_int(st, "SELECT count(*) FROM outbox");
	if (st->page_size <= 0 || st->committed_seq < 0 || st->count < 0) {
		store_fail(st, err, "cannot read (damaged?)");
		return NULL;
	}
	st->tx_seq = st->written_seq = st->visible_seq = st->committed_seq;
	store_count(st);
	store_note_room(st, store_has_room(st, 0));
	st->commit_ev = event_new(base, -1, 0, store_commit_cb, st);
	/* Lowest priority: the commit runs after every ready request of the
	 * turn has joined the transaction. */
	event_priority_set(st->commit_ev, 2);
	return st;
}

void
store_close(struct store *st)
{
	int i;

	if (!st)
		return;
	if (st->in_tx || st->nbatches)
		store_flush(st);
	syncer_free(st->syncer);
	if (st->wal_fd >= 0)
		close(st->wal_fd);
	free(st->batches);
	for (i = 0; i < ST_COUNT; i++)
		sqlite3_finalize(st->stmt[i]);
	if (st->db)
		sqlite3_close(st->db);
	if (st->commit_ev)
		event_free(st->commit_ev);
	if (st->sync_ev)
		event_free(st->sync_ev);
	if (st->lock_fd >= 0)
		close(st->lock_fd);
	free(st->cbs);
	free(st->wcbs);
	free(st->jobs);
	free(st->path);
	free(st);
}

void
store_set_hooks(struct store *st, const struct store_hooks *hooks)
{
	st->hooks = *hooks;
}

void
store_set_fatal(struct store *st, void (*fn)(void *, const char *), void *arg)
{
	st->fatal = fn;
	st->fatal_arg = arg;
}

void
store_set_max_bytes(struct store *st, int64_t max_bytes)
{
	st->max_bytes = max_bytes;
}

static int
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

/* Run a callback list and empty it; callbacks may start new work, so
 * they get a fresh list. */
static void
store_run_list(struct store_cb **list, size_t *n, size_t *cap, int ok)
{
	struct store_cb *cbs = *list;
	size_t i, count = *n;

	*list = NULL;
	*n = *cap = 0;
	for (i = 0; i < count; i++)
		cbs[i].fn(cbs[i].arg, ok);
	free(cbs);
}

static void
store_run_callbacks(struct store *st, int ok)
{
	store_run_list(&st->cbs, &st->ncbs, &st->capcbs, ok);
}

static void
store_run_written(struct store *st, int ok)
{
	store_run_list(&st->wcbs, &st->nwcbs, &st->capwcbs, ok);
}

/* The early jobs will not run: their store_on_commit callbacks do the work. */
static void
store_drop_jobs(struct store *st)
{
	st->njobs = 0;
}

/* The transaction was lost (disk full, I/O error): forget its work. */
static void
store_lost(struct store *st)
{
	int full = (sqlite3_extended_errcode(st->db) & 0xff) == SQLITE_FULL;

	if (!sqlite3_get_autocommit(st->db))
		store_step_done(st, st->stmt[ST_ROLLBACK]);
	/* Disk full: give the log's space back so that the next transaction
	 * (deletes of confirmed messages, above all) can go through. */
	if (full)
		sqlite3_exec(st->db, "PRAGMA wal_checkpoint(TRUNCATE)", NULL, NULL, NULL);
	st->in_tx = 0;
	st->tx_durable = 0;
	st->tx_hold = 0;
	st->tx_seq = st->written_seq;
	st->tx_count = 0;
	st->tx_bytes = 0;
	store_drop_jobs(st);
	/* Written ones first: they may look at what the others free. */
	store_run_written(st, 0);
	store_run_callbacks(st, 0);
	if (st->hooks.rolled_back)
		st->hooks.rolled_back(st->hooks.arg);
}

/*
 * A durable write while no sync is running: commit first thing in the
 * turn (the broker's and the syncer's priority) instead of at its end, so
 * that the fsync starts at once. While one runs, writes gather in the open
 * transaction; the end of that sync commits them (store_settle). The disk
 * is kept busy with back-to-back syncs, each covering all that came during
 * the one before, and a consumed message waits about one sync for its ack.
 */
static void
store_sync_soon(struct store *st)
{
	if (st->sync_ev && st->in_tx && st->tx_durable && !st->nbatches)
		event_active(st->sync_ev, 0, 0);
}

static int
store_begin_tx(struct store *st, int durable)
{
	if (durable && !st->tx_durable) {
		st->tx_durable = 1;
		if (st->in_tx)
			store_sync_soon(st);
	}
	if (st->in_tx)
		return 0;
	if (store_step_done(st, st->stmt[ST_BEGIN]) < 0)
		return -1;
	st->in_tx = 1;
	event_active(st->commit_ev, 0, 0);
	store_sync_soon(st);
	return 0;
}

/* Every write that records something new (a message accepted, consumed or
 * caused, a saga step) must reach the disk before anyone is told. */
static int
store_begin(struct store *st)
{
	return store_begin_tx(st, 1);
}

/*
 * Writes that only record that work is finished (a publish confirmed, a
 * delivery answered, a retry scheduled, old ids expired). Losing one makes
 * sagad do the work again, never lose it; and only a crash of the machine
 * can lose it (SQLite's WAL with synchronous=NORMAL: a process crash keeps
 * every commit). A transaction holding nothing else commits without an
 * fsync; the next durable commit makes it durable too.
 */
static int
store_begin_relaxed(struct store *st)
{
	return store_begin_tx(st, 0);
}

/* A failed statement may have rolled the whole transaction back. */
static void
store_check_tx(struct store *st)
{
	if (st->in_tx && sqlite3_get_autocommit(st->db))
		store_lost(st);
}

/* A committed transaction whose answers wait for its sync. */
struct store_batch {
	uint64_t gen;		/* the syncer generation that makes it durable */
	int64_t seq;		/* the outbox seq it commits up to */
	struct store_cb *cbs;
	size_t ncbs;
};

static void
store_fsync_failed(struct store *st)
{
	/* fsync failed: what the kernel dropped cannot be known (fsyncgate);
	 * nobody is told "durable", the daemon stops. */
	log_error("store write failed", LOG_STR("path", st->path),
	    LOG_STR("error", "fsync of the write-ahead log failed"));
	if (!st->broken) {
		st->broken = 1;
		if (st->fatal)
			st->fatal(st->fatal_arg, "fsync of the write-ahead log failed");
	}
}

/* More of the outbox may be published (the relay's hook). */
static void
store_notify_committed(struct store *st)
{
	if (st->hooks.committed)
		st->hooks.committed(st->hooks.arg);
}

/* Everything up to seq is durable: it may all be published. */
static void
store_set_committed(struct store *st, int64_t seq)
{
	st->committed_seq = seq;
	if (st->visible_seq < seq)
		st->visible_seq = seq;
}

/* Answer the batches made durable up to gen (all of them, as failed, when
 * the sync failed). */
static void
store_settle(struct store *st, uint64_t gen, int err)
{
	size_t i, n = 0, j;
	int done = 0;

	while (n < st->nbatches && (err || st->batches[n].gen <= gen))
		n++;
	if (!n)
		return;
	/* Detach first: callbacks may commit more and add batches. */
	struct store_batch *b = xmalloc(n * sizeof *b);
	memcpy(b, st->batches, n * sizeof *b);
	memmove(st->batches, st->batches + n, (st->nbatches - n) * sizeof *b);
	st->nbatches -= n;
	for (i = 0; i < n; i++) {
		if (!err) {
			store_set_committed(st, b[i].seq);
			done = 1;
		}
		for (j = 0; j < b[i].ncbs; j++)
			b[i].cbs[j].fn(b[i].cbs[j].arg, !err);
		free(b[i].cbs);
	}
	free(b);
	if (err)
		store_fsync_failed(st);
	else if (done)
		store_notify_committed(st);
	if (!err)
		store_sync_soon(st);
}

static void
store_synced_cb(void *arg, uint64_t gen, int err)
{
	store_settle(arg, gen, err);
}

/* Wait for the syncer and answer what it made durable. */
static int
store_drain_syncs(struct store *st)
{
	uint64_t gen;
	int err;

	if (!st->syncer || !st->nbatches)
		return 0;
	err = syncer_wait(st->syncer, &gen);
	store_settle(st, gen, err);
	return err ? -1 : 0;
}

void
store_set_async(struct store *st)
{
	char *wal;

	if (st->syncer || asprintf(&wal, "%s-wal", st->path) < 0)
		return;
	/* Our own descriptor of the write-ahead log: fsync acts on the file,
	 * whichever descriptor wrote. The log lives as long as our connection
	 * (SQLite removes it only when the last connection closes). */
	st->wal_fd = open(wal, O_RDONLY | O_CLOEXEC);
	if (st->wal_fd >= 0)
		st->syncer = syncer_new(event_get_base(st->commit_ev), st->wal_fd,
		    store_synced_cb, st);
	if (st->syncer) {
		st->sync_ev = event_new(event_get_base(st->commit_ev), -1, 0, store_commit_cb, st);
		event_priority_set(st->sync_ev, 0);
	} else {
		log_warn("store: syncing on the event loop", LOG_STR("path", wal),
		    LOG_STR("error", st->wal_fd < 0 ? strerror(errno) : "cannot start a thread"));
	}
	free(wal);
}

/* Commit the open transaction; 0, or -1 when it was lost. */
static int
store_commit(struct store *st)
{
	int early = 0;

	if (store_step_done(st, st->stmt[ST_COMMIT]) < 0) {
		st->tx_durable = 0;
		store_lost(st);
		return -1;
	}
	st->in_tx = 0;
	/* Messages put with STORE_OUT_EARLY may go out now, unless one that
	 * waits for the fsync comes before them (the relay keeps seq order). */
	if (!st->tx_hold && st->visible_seq == st->written_seq && st->tx_seq > st->written_seq) {
		st->visible_seq = st->tx_seq;
		early = 1;
	}
	st->tx_hold = 0;
	st->written_seq = st->tx_seq;
	store_run_written(st, 1);
	if (early)
		store_notify_committed(st);
	st->count += st->tx_count;
	st->tx_count = 0;
	/* Counting the pages is a query of its own, a tenth of a small
	 * commit: between counts the size grows by what was added (deletes
	 * show at the next count), and near the limit, where the answer
	 * decides between 202 and 507, every commit counts. */
	st->bytes += st->tx_bytes;
	st->tx_bytes = 0;
	if (++st->uncounted >= STORE_COUNT_EVERY || store_count_near(st))
		store_count(st);
	if (st->full_seen) {
		/* The disk filled up: give the log's space back now. */
		sqlite3_exec(st->db, "PRAGMA wal_checkpoint(TRUNCATE)", NULL, NULL, NULL);
		st->full_seen = 0;
	}
	return 0;
}

/* The commit event, with a syncer: the transaction is committed now and
 * answered when the syncer has made it durable; the loop does not wait. */
static void
store_commit_async(struct store *st)
{
	struct store_batch *b;
	int durable = st->tx_durable;

	if (!st->in_tx)
		store_run_written(st, 1);	/* nothing open: already written */
	else if (store_commit(st) < 0)
		return;
	st->tx_durable = 0;
	if (!durable)
		store_drop_jobs(st);
	if (!durable && !st->nbatches) {
		/* Nothing waits for a sync: answer at once, in order. */
		store_set_committed(st, st->tx_seq);
		store_run_callbacks(st, 1);
		store_notify_committed(st);
		return;
	}
	if (!durable && !st->ncbs && st->tx_seq == st->batches[st->nbatches - 1].seq)
		return;
	b = XPUSH(st->batches, st->nbatches, st->capbatches);
	/* A batch that needs no sync of its own still waits for those before
	 * it: answers go out in commit order. */
	if (durable) {
		b->gen = syncer_request_jobs(st->syncer, st->jobs, st->njobs);
		st->jobs = NULL;
		st->njobs = st->capjobs = 0;
	} else {
		b->gen = st->batches[st->nbatches - 2].gen;
	}
	b->seq = st->tx_seq;
	b->cbs = st->cbs;
	b->ncbs = st->ncbs;
	st->cbs = NULL;
	st->ncbs = st->capcbs = 0;
}

/*
 * The connection runs with synchronous=NORMAL: a commit writes the WAL but
 * does not fsync it. A transaction that records something new is then made
 * durable by syncing the WAL: here, through SQLite's own handle, or by the
 * syncer thread (store_set_async); one that only records finished work
 * (store_begin_relaxed) is not. This is synchronous=FULL for the first kind
 * (SQLite refuses to change the level inside a transaction, and only the
 * end of one knows what it held).
 */
static int
store_sync_wal(struct store *st)
{
	sqlite3_file *wal = NULL;
	int rc;

	if (sqlite3_file_control(st->db, "main", SQLITE_FCNTL_JOURNAL_POINTER, &wal) != SQLITE_OK ||
	    !wal || !wal->pMethods)
		rc = SQLITE_IOERR;
	else
		rc = wal->pMethods->xSync(wal, SQLITE_SYNC_NORMAL);
	if (rc != SQLITE_OK) {
		store_fsync_failed(st);
		return -1;
	}
	return 0;
}

/* Commit and sync now, and answer everything: for stopping and tests. */
int
store_flush(struct store *st)
{
	int durable;

	if (store_drain_syncs(st) < 0) {
		store_drop_jobs(st);
		store_run_written(st, 0);
		store_run_callbacks(st, 0);
		return -1;
	}
	durable = st->tx_durable;
	if (!st->in_tx) {
		store_run_written(st, 1);
		store_run_callbacks(st, 1);
		return 0;
	}
	if (store_commit(st) < 0)
		return -1;
	st->tx_durable = 0;
	store_drop_jobs(st);	/* synced here, on the loop */
	if (durable && store_sync_wal(st) < 0) {
		store_run_callbacks(st, 0);
		return -1;
	}
	store_set_committed(st, st->tx_seq);
	store_run_callbacks(st, 1);
	store_notify_committed(st);
	return 0;
}

static void
store_commit_cb(evutil_socket_t fd, short what, void *arg)
{
	struct store *st = arg;

	(void)fd;
	(void)what;
	if (st->syncer)
		store_commit_async(st);
	else
		store_flush(st);
}

void
store_on_commit(struct store *st, store_done_fn *cb, void *arg)
{
	*XPUSH(st->cbs, st->ncbs, st->capcbs) = (struct store_cb){ cb, arg };
	/* Without an open transaction the work is already durable; still answer
	 * from the loop, never from inside the caller. */
	event_active(st->commit_ev, 0, 0);
}

int
store_on_durable_early(struct store *st, void (*fn)(void *), void *arg)
{
	if (!st->syncer || !st->in_tx || !st->tx_durable)
		return 0;
	*XPUSH(st->jobs, st->njobs, st->capjobs) = (struct syncer_job){ fn, arg };
	return 1;
}

void
store_on_written(struct store *st, store_done_fn *cb, void *arg)
{
	*XPUSH(st->wcbs, st->nwcbs, st->capwcbs) = (struct store_cb){ cb, arg };
	event_active(st->commit_ev, 0, 0);
}

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
		s = st->stmt[ST_ID_INSERT];
		sqlite3_bind_text(s, 1, m->message_id, -1, SQLITE_STATIC);
		sqlite3_bind_double(s, 2, now);
		if (store_step_done(st, s) < 0)
			goto fail;
		if (sqlite3_changes(st->db) == 0)
			return STORE_PUT_DUPLICATE;
	}
	props_pack(&m->props, &props, &plen);
	s = st->stmt[ST_OUT_INSERT];
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
			sqlite3_stmt *d = st->stmt[ST_ID_FORGET];
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
		if ((code & 0xff) == SQLITE_FULL)
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
	int rc;

	*n = 0;
	while (*n < limit && (rc = sqlite3_step(s)) == SQLITE_ROW)
		out[(*n)++] = store_row_msg(s);
	rc = sqlite3_errcode(st->db);
	sqlite3_reset(s);
	sqlite3_clear_bindings(s);
	if (rc != SQLITE_OK && rc != SQLITE_DONE && rc != SQLITE_ROW) {
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
	sqlite3_stmt *s = st->stmt[ST_OUT_FETCH];

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
	sqlite3_stmt *s = st->stmt[ST_OUT_FETCH_DUE];

	sqlite3_bind_double(s, 1, now);
	sqlite3_bind_int64(s, 2, upto);
	sqlite3_bind_int64(s, 3, (sqlite3_int64)limit);
	return store_collect(st, s, limit, out, n);
}

double
store_outbox_next_due(struct store *st)
{
	sqlite3_stmt *s = st->stmt[ST_OUT_NEXT_DUE];
	double v = 0;

	if (sqlite3_step(s) == SQLITE_ROW)
		v = sqlite3_column_double(s, 0);
	sqlite3_reset(s);
	return v;
}

static int
store_write_seq(struct store *st, sqlite3_stmt *s)
{
	if (store_step_done(st, s) < 0) {
		store_check_tx(st);
		return -1;
	}
	return 0;
}

int
store_outbox_done(struct store *st, int64_t seq)
{
	sqlite3_stmt *s = st->stmt[ST_OUT_DELETE];

	if (store_begin_relaxed(st) < 0)
		return -1;
	sqlite3_bind_int64(s, 1, seq);
	if (store_write_seq(st, s) < 0)
		return -1;
	if (sqlite3_changes(st->db) > 0)
		st->tx_count--;
	return 0;
}

unsigned
store_outbox_attempts(struct store *st, int64_t seq)
{
	sqlite3_stmt *s = st->stmt[ST_OUT_ATTEMPTS];
	unsigned v = 0;

	sqlite3_bind_int64(s, 1, seq);
	if (sqlite3_step(s) == SQLITE_ROW)
		v = (unsigned)sqlite3_column_int(s, 0);
	sqlite3_reset(s);
	return v;
}

int
store_outbox_retry(struct store *st, int64_t seq, double due_at, unsigned attempts,
    const char *error)
{
	sqlite3_stmt *s = st->stmt[ST_OUT_RETRY];

	if (store_begin_relaxed(st) < 0)
		return -1;
	sqlite3_bind_double(s, 1, due_at);
	sqlite3_bind_int(s, 2, (int)attempts);
	sqlite3_bind_text(s, 3, error, -1, SQLITE_STATIC);
	sqlite3_bind_int64(s, 4, seq);
	return store_write_seq(st, s);
}

int
store_outbox_clear_due(struct store *st, int64_t seq)
{
	sqlite3_stmt *s = st->stmt[ST_OUT_CLEAR_DUE];

	if (store_begin_relaxed(st) < 0)
		return -1;
	sqlite3_bind_int64(s, 1, seq);
	return store_write_seq(st, s);
}

int64_t
store_committed_seq(const struct store *st)
{
	return st->committed_seq;
}

int64_t
store_publishable_seq(const struct store *st)
{
	return st->visible_seq;
}

int64_t
store_outbox_count(const struct store *st)
{
	return st->count + st->tx_count;
}

double
store_outbox_oldest(struct store *st)
{
	sqlite3_stmt *s = st->stmt[ST_OUT_OLDEST];
	double v = 0;

	if (sqlite3_step(s) == SQLITE_ROW)
		v = sqlite3_column_double(s, 0);
	sqlite3_reset(s);
	return v;
}

int64_t
store_bytes(const struct store *st)
{
	return st->bytes;
}

int
store_writable(const struct store *st)
{
	return !st->broken && st->bytes < st->max_bytes && store_has_room(st, 0);
}

const char *
store_path(const struct store *st)
{
	return st->path;
}

int
store_expire_ids(struct store *st, double before, int batch)
{
	sqlite3_stmt *s = st->stmt[ST_ID_EXPIRE];

	if (store_begin_relaxed(st) < 0)
		return -1;
	sqlite3_bind_double(s, 1, before);
	sqlite3_bind_int(s, 2, batch);
	if (store_write_seq(st, s) < 0)
		return -1;
	return sqlite3_changes(st->db);
}

int
store_outbox_list(struct store *st, int64_t after, size_t limit,
    struct store_row *rows, size_t *n)
{
	sqlite3_stmt *s = st->stmt[ST_OUT_LIST];
	int rc;

	*n = 0;
	sqlite3_bind_int64(s, 1, after);
	sqlite3_bind_int64(s, 2, (sqlite3_int64)limit);
	while (*n < limit && (rc = sqlite3_step(s)) == SQLITE_ROW) {
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
	}
	rc = sqlite3_errcode(st->db);
	sqlite3_reset(s);
	sqlite3_clear_bindings(s);
	return rc == SQLITE_OK || rc == SQLITE_DONE || rc == SQLITE_ROW ? 0 : -1;
}

/* ---- inbox ---- */

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
	sqlite3_stmt *s = st->stmt[ST_IN_INSERT];
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
	r->redelivered = (unsigned)sqlite3_column_int(s, 14) > r->attempts;
	m->created_at = r->received_at;
	return r;
}

int
store_inbox_load(struct store *st, const char *sub, enum inbox_state state,
    int64_t after, size_t limit, struct inbox_rec **out, size_t *n)
{
	sqlite3_stmt *s = st->stmt[ST_IN_LOAD];
	int rc;

	*n = 0;
	sqlite3_bind_text(s, 1, sub, -1, SQLITE_STATIC);
	sqlite3_bind_int(s, 2, state);
	sqlite3_bind_int64(s, 3, after);
	sqlite3_bind_int64(s, 4, (sqlite3_int64)limit);
	while (*n < limit && (rc = sqlite3_step(s)) == SQLITE_ROW)
		out[(*n)++] = store_row_inbox(s);
	rc = sqlite3_errcode(st->db);
	sqlite3_reset(s);
	sqlite3_clear_bindings(s);
	return rc == SQLITE_OK || rc == SQLITE_DONE || rc == SQLITE_ROW ? 0 : -1;
}

int
store_inbox_done(struct store *st, int64_t id, double now, int status)
{
	sqlite3_stmt *s = st->stmt[ST_IN_DONE];

	if (store_begin_relaxed(st) < 0)
		return -1;
	sqlite3_bind_double(s, 1, now);
	sqlite3_bind_int(s, 2, status);
	sqlite3_bind_int64(s, 3, id);
	return store_write_seq(st, s);
}

int
store_inbox_sent(struct store *st, int64_t id, unsigned sent)
{
	sqlite3_stmt *s = st->stmt[ST_IN_SENT];

	if (store_begin_relaxed(st) < 0)
		return -1;
	sqlite3_bind_int(s, 1, (int)sent);
	sqlite3_bind_int64(s, 2, id);
	return store_write_seq(st, s);
}

int
store_inbox_retry(struct store *st, int64_t id, unsigned attempts, double due_at,
    int status, const char *error)
{
	sqlite3_stmt *s = st->stmt[ST_IN_RETRY];

	if (store_begin_relaxed(st) < 0)
		return -1;
	sqlite3_bind_int(s, 1, (int)attempts);
	sqlite3_bind_double(s, 2, due_at);
	sqlite3_bind_int(s, 3, status);
	sqlite3_bind_text(s, 4, error, -1, SQLITE_STATIC);
	sqlite3_bind_int64(s, 5, id);
	return store_write_seq(st, s);
}

int
store_inbox_dead(struct store *st, int64_t id, double now, unsigned attempts,
    const char *reason, int status, const char *error)
{
	sqlite3_stmt *s = st->stmt[ST_IN_DEAD];

	if (store_begin(st) < 0)
		return -1;
	sqlite3_bind_double(s, 1, now);
	sqlite3_bind_int(s, 2, (int)attempts);
	sqlite3_bind_text(s, 3, reason, -1, SQLITE_STATIC);
	sqlite3_bind_int(s, 4, status);
	sqlite3_bind_text(s, 5, error, -1, SQLITE_STATIC);
	sqlite3_bind_int64(s, 6, id);
	return store_write_seq(st, s);
}

int
store_inbox_replay(struct store *st, const char *sub, const char *message_id)
{
	sqlite3_stmt *s = st->stmt[message_id ? ST_IN_REPLAY_ONE : ST_IN_REPLAY_ALL];

	if (store_begin(st) < 0)
		return -1;
	sqlite3_bind_text(s, 1, sub, -1, SQLITE_STATIC);
	if (message_id)
		sqlite3_bind_text(s, 2, message_id, -1, SQLITE_STATIC);
	if (store_write_seq(st, s) < 0)
		return -1;
	return sqlite3_changes(st->db);
}

int64_t
store_inbox_count(struct store *st, const char *sub, enum inbox_state state)
{
	sqlite3_stmt *s = st->stmt[ST_IN_COUNT];
	int64_t v = 0;

	sqlite3_bind_text(s, 1, sub, -1, SQLITE_STATIC);
	sqlite3_bind_int(s, 2, state);
	if (sqlite3_step(s) == SQLITE_ROW)
		v = sqlite3_column_int64(s, 0);
	sqlite3_reset(s);
	sqlite3_clear_bindings(s);
	return v;
}

double
store_inbox_oldest(struct store *st, const char *sub)
{
	sqlite3_stmt *s = st->stmt[ST_IN_OLDEST];
	double v = 0;

	sqlite3_bind_text(s, 1, sub, -1, SQLITE_STATIC);
	if (sqlite3_step(s) == SQLITE_ROW)
		v = sqlite3_column_double(s, 0);
	sqlite3_reset(s);
	sqlite3_clear_bindings(s);
	return v;
}

int
store_inbox_expire(struct store *st, double before, int batch)
{
	sqlite3_stmt *s = st->stmt[ST_IN_EXPIRE];

	if (store_begin_relaxed(st) < 0)
		return -1;
	sqlite3_bind_double(s, 1, before);
	sqlite3_bind_int(s, 2, batch);
	if (store_write_seq(st, s) < 0)
		return -1;
	return sqlite3_changes(st->db);
}

int
store_inbox_forget(struct store *st, int64_t id)
{
	sqlite3_stmt *s = st->stmt[ST_IN_FORGET];

	if (store_begin(st) < 0)
		return -1;
	sqlite3_bind_int64(s, 1, id);
	return store_write_seq(st, s);
}

struct sqlite3 *
store_db(struct store *st)
{
	return st->db;
}

int
store_write(struct store *st)
{
	return st->broken ? -1 : store_begin(st);
}

int
store_outbox_defer_exchange(struct store *st, const char *exchange, double due_at,
    const char *error)
{
	sqlite3_stmt *s = st->stmt[ST_OUT_DEFER_EX];

	if (store_begin(st) < 0)
		return -1;
	sqlite3_bind_double(s, 1, due_at);
	sqlite3_bind_text(s, 2, error, -1, SQLITE_STATIC);
	sqlite3_bind_text(s, 3, exchange, -1, SQLITE_STATIC);
	if (store_write_seq(st, s) < 0)
		return -1;
	return sqlite3_changes(st->db);
}
