/*
 * The store's engine: opening and migrating the file, the write
 * transaction and its group commit, the syncer that makes it durable, and
 * the callbacks that wait for it. The records live in files of their own
 * (store_outbox.c, store_inbox.c, saga_store_sqlite.c), the room on the disk in
 * store_room.c, the steps they share in store_stmt.c (ARCHITECTURE.md:
 * The store's transactions).
 */
#include "store_records.h"

#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#include "log.h"
#include "saga_store.h"
#include "metrics.h"
#include "syncer.h"
#include "xmalloc.h"

/* Commits between two counts of the pages in use (store_commit). */
#define STORE_COUNT_EVERY 64

/* The engine's own settings, key and value: the store's replica id
 * (store_replica_id). */
static const char store_meta_schema[] =
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);";

/* Schema migrations: entry i takes the store from version i to i + 1.
 * Each family of records owns its schema; the order is the versions'. */
static const char *const store_migrations[] = {
	store_outbox_schema,	/* outbox, outbox_ids (store_outbox.c) */
	store_inbox_schema,	/* inbox (store_inbox.c) */
	saga_store_schema,	/* the saga engine's records (saga_store_sqlite.c) */
	store_inbox_sent_schema,	/* inbox.sent (store_inbox.c) */
	store_inbox_flight_schema,	/* inbox.in_doubt, inbox_flight */
	store_meta_schema,	/* meta (this file) */
	saga_store_def_schema,	/* saga_def: definitions' versions (saga_store_sqlite.c) */
	txpart_schema,		/* tx_participant: a participant's 2PC records (txpart.c) */
};

/*
 * The replica id: 128 random bits, made the first time the store is opened
 * and kept in it, so that a restart keeps it and no two stores share it
 * (a name made of host and path did: every pod of a Deployment has the
 * same path, often the same host name). SQLite's randomblob() is seeded
 * from the operating system's random source (/dev/urandom). In the
 * transaction that settles the inbox (store_migrate).
 */
static const char store_replica_id_sql[] =
    "INSERT OR IGNORE INTO meta (key, value) VALUES ('replica_id', lower(hex(randomblob(16))));";

static const char *const store_engine_sql[ST_COUNT] = {
	[ST_BEGIN] = "BEGIN IMMEDIATE",
	[ST_COMMIT] = "COMMIT",
	[ST_ROLLBACK] = "ROLLBACK",
	[ST_PAGES] = "SELECT (SELECT page_count FROM pragma_page_count),"
	    " (SELECT freelist_count FROM pragma_freelist_count)",
};
static const struct store_family store_engine = { store_engine_sql, ST_COUNT };

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

/* The replica id made by store_migrate, into st->replica_id. */
static int
store_read_replica_id(struct store *st)
{
	sqlite3_stmt *s;
	int ok = 0;

	if (sqlite3_prepare_v2(st->db, "SELECT value FROM meta WHERE key = 'replica_id'", -1, &s,
	    NULL) != SQLITE_OK)
		return -1;
	if (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_text(s, 0)) {
		snprintf(st->replica_id, sizeof st->replica_id, "%s",
		    (const char *)sqlite3_column_text(s, 0));
		ok = st->replica_id[0] != '\0';
	}
	sqlite3_finalize(s);
	return ok ? 0 : -1;
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
	if (store_exec(st, "BEGIN", err) < 0)
		return -1;
	if (store_exec(st, store_inbox_settle_sql, err) < 0 ||
	    store_exec(st, store_replica_id_sql, err) < 0 || store_exec(st, "COMMIT", err) < 0) {
		sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
		return -1;
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

struct store *
store_open(const char *path, struct event_base *base, int64_t max_bytes, char **err)
{
	struct store *st = xcalloc(1, sizeof *st);

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
	if (!(st->stmt = store_prepare(st, &store_engine)) ||
	    !(st->outbox = store_prepare(st, &store_outbox_family)) ||
	    !(st->inbox = store_prepare(st, &store_inbox_family))) {
		store_fail(st, err, "cannot prepare statements (damaged?)");
		return NULL;
	}
	st->page_size = store_query_int(st, "PRAGMA page_size");
	st->committed_seq = store_query_int(st, "SELECT coalesce(max(seq), 0) FROM outbox");
	st->count = store_query_int(st, "SELECT count(*) FROM outbox");
	if (st->page_size <= 0 || st->committed_seq < 0 || st->count < 0 ||
	    store_read_replica_id(st) < 0) {
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
	if (!st)
		return;
	if (st->in_tx || st->nbatches)
		store_flush(st);
	syncer_free(st->syncer);
	if (st->wal_fd >= 0)
		close(st->wal_fd);
	free(st->batches);
	store_finalize(st->inbox, &store_inbox_family);
	store_finalize(st->outbox, &store_outbox_family);
	store_finalize(st->stmt, &store_engine);
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
int
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
int
store_begin_relaxed(struct store *st)
{
	return store_begin_tx(st, 0);
}

/* A failed statement may have rolled the whole transaction back. */
void
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

const char *
store_replica_id(const struct store *st)
{
	return st->replica_id;
}

sqlite3 *
store_db(struct store *st)
{
	return st->db;
}

int
store_join_write(struct store *st)
{
	return st->broken ? -1 : store_begin(st);
}
