/*
 * The sqlite source: the transactional outbox in the service's own SQLite
 * database file (sagad-plugins(7), schema in schema.sql).
 *
 * The service inserts rows into an outbox table in the transaction that
 * changes its business data. This plugin opens the same file, notices
 * commits through inotify on the file's directory (the -wal file in WAL
 * mode, the file itself otherwise) confirmed by PRAGMA data_version, with
 * a slow poll as the fallback; it reads a batch in seq order, hands it to
 * sagad's outbox, and once sagad's store says the batch is durable deletes
 * it in a short write transaction. A crash in between leaves the rows in
 * the table: they are read again and sagad's Message-Id dedup drops them.
 *
 * SQLite calls are synchronous, so none may wait: busy_timeout is 0 and a
 * busy database is retried from a timer. Reads in WAL mode never wait for
 * the service; the write lock is held for one BEGIN IMMEDIATE ... COMMIT
 * of a few deletes, without an fsync (synchronous=NORMAL: a delete lost to
 * a power failure only means rows read again and dropped as duplicates).
 *
 * States (enum sq_state): CLOSED -> IDLE -> DURABLE_WAIT -> DELETING
 * (waiting for the write lock) -> IDLE; any database error -> CLOSED, and
 * the file is opened again after a backoff.
 */
#include <errno.h>
#include <event2/event.h>
#include <limits.h>
#include <math.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <time.h>
#include <unistd.h>

#include "sagad/plugin.h"

#include "../codec.h"

enum sq_state {
	SQ_CLOSED,		/* no database handle; the timer opens it */
	SQ_IDLE,		/* waiting for a change (inotify, poll) */
	SQ_DURABLE_WAIT,	/* batch handed over, rows still in the table */
	SQ_DELETING		/* durable; waiting for the write lock */
};

enum { COL_SEQ, COL_ID, COL_EXCHANGE, COL_KEY, COL_CT, COL_CORR, COL_HEADERS, COL_BODY,
	COL_AGE, COL_BAD_HEADERS };

static const char *const sq_columns[] = {
	"seq", "message_id", "exchange", "routing_key", "content_type", "correlation_id",
	"headers", "body", "created_at"
};
#define N_TABLE_COLS (sizeof sq_columns / sizeof sq_columns[0])

struct sqsrc {
	const struct sagad_host_api *api;
	struct sagad_host *h;
	struct event_base *base;

	/* configuration */
	const char *path, *table;
	double poll_interval, retry_initial, retry_max;
	long batch_size;

	enum sq_state state;
	sqlite3 *db;
	sqlite3_stmt *fetch, *del, *begin, *commit, *rollback, *version;
	int64_t data_version;	/* at the last read */
	int wal;

	int ino;		/* inotify fd, -1 without */
	struct event *ino_ev;
	char *base_name;	/* the file's name in its directory */
	size_t base_len;

	struct event *timer;	/* reopen after a failure */
	struct event *poll;	/* persistent slow poll */
	struct event *lock_retry;	/* the write lock was busy */
	struct event *soon;	/* read again (busy reader, next batch) */
	struct event *recheck;	/* a file changed, the commit not visible yet */
	double recheck_delay;
	double backoff, lock_wait;
	double lock_since;

	unsigned long batch;
	struct codec_rows rows;	/* taken and skipped rows (codec.h) */
	int more, dirty, stalled;
	double stall;
	char skip_json[CODEC_MAX_SKIP * 21 + 3];

	char reason[400];
	int ready, logged_down;
	double max_lock;	/* longest write lock held, seconds */
};

static const char *const sqlite_keys[] = {
	"path", "table", "poll_interval", "batch", "retry_initial", "retry_max", NULL
};

static void sq_read(struct sqsrc *s);

/* ---- opening, checking, closing ---- */

static void
sq_close_db(struct sqsrc *s)
{
	sqlite3_stmt **st[] = { &s->fetch, &s->del, &s->begin, &s->commit, &s->rollback, &s->version };
	size_t i;

	for (i = 0; i < sizeof st / sizeof st[0]; i++) {
		sqlite3_finalize(*st[i]);
		*st[i] = NULL;
	}
	if (s->db) {
		if (!sqlite3_get_autocommit(s->db))
			sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
		sqlite3_close_v2(s->db);
		s->db = NULL;
	}
}

/* Close the file and open it again after the backoff. */
static void
sq_down(struct sqsrc *s, const char *fmt, ...)
{
	char why[400];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, sizeof why, fmt, ap);
	va_end(ap);
	codec_clean(why);
	s->ready = 0;
	codec_report_down(s->api, s->h, why, s->reason, sizeof s->reason, &s->logged_down,
	    "path", s->path, s->backoff);
	sq_close_db(s);
	event_del(s->lock_retry);
	event_del(s->soon);
	s->rows.nseqs = 0;
	s->state = SQ_CLOSED;
	codec_reconnect_later(s->timer, &s->backoff, s->retry_max);
}

static int
sq_prepare(struct sqsrc *s, const char *sql, sqlite3_stmt **out)
{
	if (sqlite3_prepare_v3(s->db, sql, -1, SQLITE_PREPARE_PERSISTENT, out, NULL) != SQLITE_OK) {
		sq_down(s, "preparing a statement: %s", sqlite3_errmsg(s->db));
		return -1;
	}
	return 0;
}

static char *
sq_quote(const char *table)
{
	return sqlite3_mprintf("\"%w\"", table);
}

/* Open the file, check the table, prepare. 0 when ready. */
static int
sq_open(struct sqsrc *s)
{
	sqlite3_stmt *st = NULL;
	char *sql, *qt;
	int found[N_TABLE_COLS] = { 0 }, rc, seq_pk = 0, ncols = 0;
	size_t i;
	const char *mode;

	rc = sqlite3_open_v2(s->path, &s->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
	if (rc != SQLITE_OK) {
		if (access(s->path, F_OK) != 0)
			sq_down(s, "database file %s does not exist (the service creates it)", s->path);
		else
			sq_down(s, "cannot open %s: %s", s->path, s->db ? sqlite3_errmsg(s->db) : sqlite3_errstr(rc));
		return -1;
	}
	sqlite3_extended_result_codes(s->db, 1);
	/* Never wait inside SQLite on the event loop. Let the service's
	 * connections checkpoint (a checkpoint fsyncs). */
	sqlite3_busy_timeout(s->db, 0);
	if (sqlite3_exec(s->db, "PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 0", NULL, NULL,
	    NULL) != SQLITE_OK) {
		sq_down(s, "%s: %s", s->path, sqlite3_errmsg(s->db));
		return -1;
	}
	if (sqlite3_prepare_v2(s->db, "PRAGMA journal_mode", -1, &st, NULL) != SQLITE_OK ||
	    sqlite3_step(st) != SQLITE_ROW) {
		sq_down(s, "%s: %s", s->path, sqlite3_errmsg(s->db));
		sqlite3_finalize(st);
		return -1;
	}
	mode = (const char *)sqlite3_column_text(st, 0);
	s->wal = mode && strcmp(mode, "wal") == 0;
	if (!s->wal)
		SAGAD_LOG(s->api, s->h, SAGAD_LOG_WARN,
		    "database not in WAL mode: sagad's reads briefly block the service's commits",
		    SAGAD_STR("path", s->path), SAGAD_STR("journal_mode", mode ? mode : "?"));
	sqlite3_finalize(st);
	st = NULL;

	if (sqlite3_prepare_v2(s->db, "SELECT name, upper(type), pk FROM pragma_table_info(?1)", -1, &st,
	    NULL) != SQLITE_OK) {
		sq_down(s, "%s: %s", s->path, sqlite3_errmsg(s->db));
		return -1;
	}
	sqlite3_bind_text(st, 1, s->table, -1, SQLITE_STATIC);
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		const char *name = (const char *)sqlite3_column_text(st, 0);
		const char *type = (const char *)sqlite3_column_text(st, 1);
		ncols++;
		for (i = 0; i < N_TABLE_COLS; i++)
			if (name && strcmp(name, sq_columns[i]) == 0)
				found[i] = 1;
		if (name && strcmp(name, "seq") == 0 && type && strcmp(type, "INTEGER") == 0 &&
		    sqlite3_column_int(st, 2) == 1)
			seq_pk = 1;
	}
	sqlite3_finalize(st);
	if (rc != SQLITE_DONE) {
		sq_down(s, "%s: reading the schema: %s", s->path, sqlite3_errmsg(s->db));
		return -1;
	}
	if (!ncols) {
		sq_down(s, "table %s does not exist in %s (create it with schema.sql, see sagad-plugins(7))",
		    s->table, s->path);
		return -1;
	}
	for (i = 0; i < N_TABLE_COLS; i++)
		if (!found[i]) {
			sq_down(s, "table %s in %s: column %s is missing", s->table, s->path, sq_columns[i]);
			return -1;
		}
	if (!seq_pk) {
		sq_down(s, "table %s in %s: column seq must be INTEGER PRIMARY KEY", s->table, s->path);
		return -1;
	}

	qt = sq_quote(s->table);
	/* Headers become "HEX(name):HEX(value),..." so that nothing needs
	 * quoting; a JSON null is left out. */
	sql = sqlite3_mprintf(
	    "SELECT seq, CAST(message_id AS TEXT), coalesce(CAST(exchange AS TEXT), ''),"
	    " CAST(routing_key AS TEXT), CAST(content_type AS TEXT), CAST(correlation_id AS TEXT),"
	    " CASE WHEN json_valid(headers) THEN CASE WHEN json_type(headers) = 'object' THEN"
	    "  (SELECT group_concat(hex(key) || ':' || hex(CAST(value AS TEXT)), ',')"
	    "   FROM json_each(headers) WHERE type <> 'null') END END,"
	    " body,"
	    " (julianday('now') - 2440587.5) * 86400.0 - CASE typeof(created_at)"
	    "  WHEN 'text' THEN (julianday(created_at) - 2440587.5) * 86400.0 ELSE created_at END,"
	    " headers IS NOT NULL AND NOT coalesce(CASE WHEN json_valid(headers) THEN"
	    "  json_type(headers) = 'object' END, 0)"
	    " FROM %s WHERE seq NOT IN (SELECT value FROM json_each(?1)) ORDER BY seq LIMIT %ld",
	    qt, s->batch_size);
	rc = sq_prepare(s, sql, &s->fetch);
	sqlite3_free(sql);
	if (rc < 0) {
		sqlite3_free(qt);
		return -1;
	}
	sql = sqlite3_mprintf("DELETE FROM %s WHERE seq = ?1", qt);
	sqlite3_free(qt);
	rc = sq_prepare(s, sql, &s->del);
	sqlite3_free(sql);
	if (rc < 0 || sq_prepare(s, "BEGIN IMMEDIATE", &s->begin) < 0 ||
	    sq_prepare(s, "COMMIT", &s->commit) < 0 || sq_prepare(s, "ROLLBACK", &s->rollback) < 0 ||
	    sq_prepare(s, "PRAGMA data_version", &s->version) < 0)
		return -1;
	s->data_version = -1;
	s->state = SQ_IDLE;
	s->backoff = s->retry_initial;
	SAGAD_LOG(s->api, s->h, SAGAD_LOG_INFO, "relaying from SQLite", SAGAD_STR("path", s->path),
	    SAGAD_STR("table", s->table), SAGAD_STR("journal_mode", s->wal ? "wal" : "other"),
	    SAGAD_STR("notify", s->ino >= 0 ? "inotify" : "poll"));
	s->ready = 1;
	codec_report_up(s->api, s->h, s->reason, &s->logged_down);
	return 0;
}

/* A statement failed: busy (retry soon) or broken (reopen). */
static int
sq_busy(int rc)
{
	return (rc & 0xff) == SQLITE_BUSY || (rc & 0xff) == SQLITE_LOCKED;
}

/* ---- reading ---- */

static int64_t
sq_data_version(struct sqsrc *s)
{
	int64_t v = -1;

	if (sqlite3_step(s->version) == SQLITE_ROW)
		v = sqlite3_column_int64(s->version, 0);
	sqlite3_reset(s->version);
	return v;
}

/* The rows left in the table, as the JSON array the fetch skips. */
static void
sq_skip_json(struct sqsrc *s)
{
	size_t len;

	s->skip_json[0] = '[';
	len = 1 + codec_skip_list(&s->rows, s->skip_json + 1);
	strcpy(s->skip_json + len, "]");
}

static void
sq_durable(void *cookie, int ok);

/* One row to sagad: 1 taken, 0 left in the table, -1 the store refused. */
static int
sq_row(struct sqsrc *s, sqlite3_stmt *r)
{
	struct sagad_message m;
	struct codec_hdrs hd;
	const char *why;
	int64_t seq = sqlite3_column_int64(r, COL_SEQ);
	int ret;

	memset(&m, 0, sizeof m);
	m.message_id = (const char *)sqlite3_column_text(r, COL_ID);
	m.exchange = (const char *)sqlite3_column_text(r, COL_EXCHANGE);
	m.routing_key = (const char *)sqlite3_column_text(r, COL_KEY);
	m.content_type = (const char *)sqlite3_column_text(r, COL_CT);
	m.correlation_id = (const char *)sqlite3_column_text(r, COL_CORR);
	why = codec_row_headers(&m, &hd, sqlite3_column_int(r, COL_BAD_HEADERS),
	    (const char *)sqlite3_column_text(r, COL_HEADERS));
	m.body = sqlite3_column_blob(r, COL_BODY);
	m.body_len = (size_t)sqlite3_column_bytes(r, COL_BODY);
	if (!m.exchange)
		m.exchange = "";
	ret = codec_take_row(s->api, s->h, &s->rows, &m, seq, s->table, why);
	codec_hdrs_free(&hd);
	return ret;
}

/* Read a batch (state IDLE) and hand it over. */
static void
sq_read(struct sqsrc *s)
{
	int rc, n = 0;
	double lag = 0;

	if (s->state != SQ_IDLE)
		return;
	s->dirty = 0;
	s->data_version = sq_data_version(s);
	sq_skip_json(s);
	sqlite3_bind_text(s->fetch, 1, s->skip_json, -1, SQLITE_STATIC);
	s->rows.nseqs = 0;
	s->stalled = 0;
	while ((rc = sqlite3_step(s->fetch)) == SQLITE_ROW) {
		if (n++ == 0)
			lag = fmax(0, sqlite3_column_double(s->fetch, COL_AGE));
		if (sq_row(s, s->fetch) < 0) {
			s->stalled = 1;
			rc = SQLITE_DONE;
			break;
		}
	}
	sqlite3_reset(s->fetch);
	if (rc != SQLITE_DONE) {
		if (sq_busy(rc)) {
			/* The rows handed over so far stay taken (their
			 * batch is still deleted once durable). */
			s->dirty = 1;
		} else {
			sq_down(s, "reading table %s in %s: %s", s->table, s->path, sqlite3_errmsg(s->db));
			return;
		}
	}
	s->more = n == s->batch_size;
	s->api->gauge_set(s->h, "lag_seconds", lag);
	if (!s->rows.nseqs) {
		if (s->stalled) {
			codec_timer(s->soon, codec_backoff(&s->stall, s->retry_initial, s->retry_max));
		} else if (s->dirty)
			codec_timer(s->soon, 0.01);
		return;
	}
	s->stall = 0;
	s->state = SQ_DURABLE_WAIT;
	codec_when_durable(s->api, s->h, sq_durable, s, ++s->batch);
}

/* ---- deleting ---- */

static void
sq_done_batch(struct sqsrc *s)
{
	s->state = SQ_IDLE;
	s->rows.nseqs = 0;
	if (s->stalled) {
		codec_timer(s->soon, codec_backoff(&s->stall, s->retry_initial, s->retry_max));
	} else if (s->more || s->dirty)
		sq_read(s);
}

/* Take the write lock, delete the batch, commit: all in this call, so
 * the lock is held for microseconds. Busy: try again a little later. */
static void
sq_delete(struct sqsrc *s)
{
	double t0;
	size_t i;
	int rc;

	rc = sqlite3_step(s->begin);
	sqlite3_reset(s->begin);
	if (rc != SQLITE_DONE) {
		if (sq_busy(rc)) {
			double waited = codec_now() - s->lock_since;
			if (waited > 10 && s->lock_wait >= 0.05)
				SAGAD_LOG(s->api, s->h, SAGAD_LOG_WARN,
				    "the write lock has been busy: rows are not deleted yet",
				    SAGAD_DBL("busy_seconds", waited), SAGAD_STR("path", s->path));
			s->lock_wait = s->lock_wait ? fmin(s->lock_wait * 2, 0.05) : 0.001;
			codec_timer(s->lock_retry, s->lock_wait);
			return;
		}
		sq_down(s, "deleting from %s in %s: %s", s->table, s->path, sqlite3_errmsg(s->db));
		return;
	}
	t0 = codec_now();
	for (i = 0; i < s->rows.nseqs; i++) {
		sqlite3_bind_int64(s->del, 1, s->rows.seqs[i]);
		rc = sqlite3_step(s->del);
		sqlite3_reset(s->del);
		if (rc != SQLITE_DONE)
			break;
	}
	if (rc == SQLITE_DONE) {
		rc = sqlite3_step(s->commit);
		sqlite3_reset(s->commit);
	}
	if (rc != SQLITE_DONE) {
		int busy = sq_busy(rc);
		char msg[300];
		snprintf(msg, sizeof msg, "%s", sqlite3_errmsg(s->db));
		if (!sqlite3_get_autocommit(s->db)) {
			sqlite3_step(s->rollback);
			sqlite3_reset(s->rollback);
		}
		if (busy) {
			/* Rollback journal: COMMIT waits for the service's
			 * readers. Do not hold the lock; start over. */
			s->lock_wait = s->lock_wait ? fmin(s->lock_wait * 2, 0.05) : 0.001;
			codec_timer(s->lock_retry, s->lock_wait);
			return;
		}
		sq_down(s, "deleting from %s in %s: %s", s->table, s->path, msg);
		return;
	}
	t0 = codec_now() - t0;
	if (t0 > s->max_lock) {
		s->max_lock = t0;
		s->api->gauge_set(s->h, "lock_max_seconds", t0);
	}
	s->api->counter_add(s->h, "rows_deleted", (double)s->rows.nseqs);
	s->lock_wait = 0;
	sq_done_batch(s);
}

static void
sq_lock_retry_cb(evutil_socket_t fd, short what, void *arg)
{
	struct sqsrc *s = arg;

	(void)fd;
	(void)what;
	if (s->state == SQ_DELETING)
		sq_delete(s);
}

static void
sq_durable(void *cookie, int ok)
{
	unsigned long batch;
	struct sqsrc *s = codec_ticket_take(cookie, &batch);

	if (s->state != SQ_DURABLE_WAIT || batch != s->batch)
		return;		/* the file was reopened meanwhile: rows come again */
	if (!ok) {
		codec_lost_batch(s->api, s->h, s->rows.nseqs);
		s->stalled = 1;
		sq_done_batch(s);
		return;
	}
	s->state = SQ_DELETING;
	s->lock_since = codec_now();
	s->lock_wait = 0;
	sq_delete(s);
}

/* ---- noticing changes ---- */

/* 1 when a read was started or is due anyway, 0 when nothing changed. */
static int
sq_kick(struct sqsrc *s, int check_version)
{
	if (s->state != SQ_IDLE) {
		s->dirty = 1;
		return 1;
	}
	if (event_pending(s->soon, EV_TIMEOUT, NULL))
		return 1;
	/* Our own deletes touch the files too; only another connection's
	 * commit changes data_version. */
	if (check_version && s->data_version >= 0 && sq_data_version(s) == s->data_version)
		return 0;
	event_del(s->recheck);
	sq_read(s);
	return 1;
}

/* inotify reports the writes of a commit, which becomes visible only
 * after them (and after the writer's fsync, with synchronous=FULL): look
 * again after 1, 2, 4 ... 512 ms. */
static void
sq_recheck_cb(evutil_socket_t fd, short what, void *arg)
{
	struct sqsrc *s = arg;

	(void)fd;
	(void)what;
	if (sq_kick(s, 1) || s->recheck_delay >= 0.5)
		return;
	s->recheck_delay *= 2;
	codec_timer(s->recheck, s->recheck_delay);
}

static void
sq_changed(struct sqsrc *s)
{
	if (sq_kick(s, 1))
		return;
	s->recheck_delay = 0.001;
	codec_timer(s->recheck, s->recheck_delay);
}

static void
sq_inotify_cb(evutil_socket_t fd, short what, void *arg)
{
	struct sqsrc *s = arg;
	char buf[8192] __attribute__((aligned(__alignof__(struct inotify_event))));
	ssize_t n;
	int hit = 0;

	(void)what;
	while ((n = read(fd, buf, sizeof buf)) > 0) {
		char *p = buf;
		while (p < buf + n) {
			struct inotify_event *ev = (struct inotify_event *)p;
			/* name, name-wal, name-journal: a commit; not -shm */
			if (ev->len && strncmp(ev->name, s->base_name, s->base_len) == 0 &&
			    (ev->name[s->base_len] == '\0' || strcmp(ev->name + s->base_len, "-wal") == 0 ||
			    strcmp(ev->name + s->base_len, "-journal") == 0))
				hit = 1;
			if (ev->mask & IN_Q_OVERFLOW)
				hit = 1;
			p += sizeof *ev + ev->len;
		}
	}
	if (hit)
		sq_changed(s);
}

static void
sq_poll_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	sq_kick(arg, 1);
}


static void
sq_soon_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	sq_kick(arg, 0);
}

static void
sq_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct sqsrc *s = arg;

	(void)fd;
	(void)what;
	if (s->state == SQ_CLOSED && sq_open(s) == 0)
		sq_read(s);
}

static void
sq_watch(struct sqsrc *s)
{
	char dir[PATH_MAX];
	const char *slash = strrchr(s->path, '/');

	if (slash) {
		snprintf(dir, sizeof dir, "%.*s", (int)(slash - s->path) ? (int)(slash - s->path) : 1,
		    s->path);
		s->base_name = xstrdup(slash + 1);
	} else {
		snprintf(dir, sizeof dir, ".");
		s->base_name = xstrdup(s->path);
	}
	s->base_len = strlen(s->base_name);
	s->ino = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
	if (s->ino < 0 ||
	    inotify_add_watch(s->ino, dir, IN_MODIFY | IN_CLOSE_WRITE | IN_CREATE | IN_MOVED_TO) < 0) {
		SAGAD_LOG(s->api, s->h, SAGAD_LOG_WARN, "cannot watch the database's directory, polling",
		    SAGAD_STR("dir", dir), SAGAD_STR("error", strerror(errno)),
		    SAGAD_DBL("poll_interval", s->poll_interval));
		if (s->ino >= 0)
			close(s->ino);
		s->ino = -1;
		return;
	}
	s->ino_ev = event_new(s->base, s->ino, EV_READ | EV_PERSIST, sq_inotify_cb, s);
	event_add(s->ino_ev, NULL);
}

/* ---- life ---- */

static int
sqlite_init(const struct sagad_host_api *api, struct sagad_host *h, void **state,
    char *err, size_t errlen)
{
	struct sqsrc *s;
	double batch = 100;

	if (codec_abi_check(api, err, errlen) < 0)
		return -1;
	s = xcalloc(1, sizeof *s);
	s->api = api;
	s->h = h;
	s->base = api->event_base(h);
	s->ino = -1;
	s->table = "sagad_outbox";
	s->poll_interval = 1;
	s->retry_initial = 0.5;
	s->retry_max = 30;
	if (api->conf_string(h, "path", &s->path) < 0 || !*s->path) {
		snprintf(err, errlen, "'path' (a string: the service's database file) is required");
		goto fail;
	}
	if (codec_conf_table(api, h, &s->table, err, errlen) < 0)
		goto fail;
	if (codec_conf_pacing(api, h, &s->poll_interval, &batch, &s->retry_initial, &s->retry_max,
	    err, errlen) < 0 ||
	    codec_conf_batch(batch, &s->batch_size, s->retry_initial, &s->retry_max, err, errlen) < 0)
		goto fail;
	if (sqlite3_libversion_number() < 3038000 && sqlite3_compileoption_used("OMIT_JSON")) {
		snprintf(err, errlen, "this SQLite has no JSON functions");
		goto fail;
	}
	s->backoff = s->retry_initial;
	s->timer = evtimer_new(s->base, sq_timer_cb, s);
	s->lock_retry = evtimer_new(s->base, sq_lock_retry_cb, s);
	s->soon = evtimer_new(s->base, sq_soon_cb, s);
	s->recheck = evtimer_new(s->base, sq_recheck_cb, s);
	s->poll = event_new(s->base, -1, EV_PERSIST, sq_poll_cb, s);
	codec_timer(s->poll, s->poll_interval);
	srand((unsigned)(time(NULL) ^ (uintptr_t)s));
	sq_watch(s);
	api->set_ready(h, 0, "opening the database");
	SAGAD_LOG(api, h, SAGAD_LOG_INFO, "sqlite source starting", SAGAD_STR("path", s->path),
	    SAGAD_STR("table", s->table), SAGAD_DBL("poll_interval", s->poll_interval),
	    SAGAD_INT("batch", s->batch_size));
	/* Open from the loop, like every later attempt. */
	s->state = SQ_CLOSED;
	codec_timer(s->timer, 0);
	*state = s;
	return 0;
fail:
	free(s);
	return -1;
}

static void
sqlite_stop(void *state)
{
	struct sqsrc *s = state;

	/* sagad's last commit may have made a batch durable just now. */
	if (s->state == SQ_DELETING && s->db) {
		sqlite3_busy_timeout(s->db, 1000);	/* the loop has stopped */
		sq_delete(s);
	}
	sq_close_db(s);
	if (s->ino_ev)
		event_free(s->ino_ev);
	if (s->ino >= 0)
		close(s->ino);
	event_free(s->timer);
	event_free(s->lock_retry);
	event_free(s->soon);
	event_free(s->recheck);
	event_free(s->poll);
	free(s->base_name);
	free(s->rows.seqs);
	free(s);
}

const struct sagad_plugin sagad_plugin = {
	.abi = SAGAD_PLUGIN_ABI,
	.name = "sqlite",
	.version = "1",
	.keys = sqlite_keys,
	.init = sqlite_init,
	.stop = sqlite_stop,
};
