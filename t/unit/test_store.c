/* Unit tests for src/store.c: schema, outbox, dedup, group commit. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <event2/event.h>
#include <fcntl.h>
#include <ftw.h>
#include <sqlite3.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "props.h"
#include "store.h"

#define BIG (INT64_C(1) << 30)


struct fx {
	char dir[64];
	char path[128];
	struct event_base *base;
	struct store *st;
};

static int
rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
	(void)sb;
	(void)flag;
	(void)ftw;
	return remove(path);
}

static struct store *
open_ok(struct fx *f, int64_t max_bytes)
{
	char *err = NULL;
	struct store *st = store_open(f->path, f->base, max_bytes, &err);

	if (!st)
		fail_msg("store_open(%s): %s", f->path, err ? err : "(no message)");
	assert_null(err);
	return st;
}

static int
setup(void **state)
{
	struct fx *f = calloc(1, sizeof *f);

	snprintf(f->dir, sizeof f->dir, "/tmp/sagad-test-store-XXXXXX");
	if (!mkdtemp(f->dir)) {
		free(f);
		return -1;
	}
	snprintf(f->path, sizeof f->path, "%s/outbox.db", f->dir);
	f->base = event_base_new();
	if (!f->base || event_base_priority_init(f->base, 3) < 0)
		return -1;
	f->st = open_ok(f, BIG);
	*state = f;
	return 0;
}

static int
teardown(void **state)
{
	struct fx *f = *state;

	store_close(f->st);
	event_base_free(f->base);
	nftw(f->dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
	free(f);
	return 0;
}

static void
reopen(struct fx *f)
{
	store_close(f->st);
	f->st = open_ok(f, BIG);
}

static struct msg *
new_msg(const char *id, const char *ex, const char *key, const char *body, size_t len)
{
	struct msg *m = calloc(1, sizeof *m);

	m->message_id = strdup(id);
	m->exchange = strdup(ex);
	m->routing_key = strdup(key);
	if (body) {
		m->body = malloc(len ? len : 1);
		memcpy(m->body, body, len);
		m->body_len = len;
	}
	return m;
}

/* Put a small message; returns the result and its seq in *seq. */
static enum store_put
put(struct fx *f, const char *id, double now, int64_t *seq)
{
	struct msg *m = new_msg(id, "events", "order.created", "{}", 2);
	enum store_put r = store_outbox_put(f->st, m, now, STORE_OUT_DEDUP);

	if (seq)
		*seq = m->seq;
	msg_free(m);
	return r;
}

static void
free_msgs(struct msg **v, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		msg_free(v[i]);
}

/* Rows in the outbox as another connection sees them: what is on disk. */
static int64_t
disk_count(const char *path)
{
	sqlite3 *db;
	sqlite3_stmt *s;
	int64_t v = -1;

	assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
	if (sqlite3_prepare_v2(db, "SELECT count(*) FROM outbox", -1, &s, NULL) == SQLITE_OK) {
		if (sqlite3_step(s) == SQLITE_ROW)
			v = sqlite3_column_int64(s, 0);
		sqlite3_finalize(s);
	}
	sqlite3_close(db);
	return v;
}

/* ---- open ---- */

static void
test_open_creates_schema(void **state)
{
	struct fx *f = *state;
	sqlite3 *db;
	sqlite3_stmt *s;
	int version;

	assert_string_equal(store_path(f->st), f->path);
	assert_int_equal(store_outbox_count(f->st), 0);
	assert_int_equal(store_committed_seq(f->st), 0);
	assert_true(store_outbox_oldest(f->st) == 0);
	assert_true(store_outbox_next_due(f->st) == 0);
	assert_true(store_bytes(f->st) > 0);
	assert_true(store_writable(f->st));
	store_close(f->st);
	f->st = NULL;

	assert_int_equal(access(f->path, F_OK), 0);
	assert_int_equal(sqlite3_open_v2(f->path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
	assert_int_equal(sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &s, NULL), SQLITE_OK);
	assert_int_equal(sqlite3_step(s), SQLITE_ROW);
	version = sqlite3_column_int(s, 0);
	assert_true(version >= 1);
	sqlite3_finalize(s);
	assert_int_equal(sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &s, NULL), SQLITE_OK);
	assert_int_equal(sqlite3_step(s), SQLITE_ROW);
	assert_string_equal((const char *)sqlite3_column_text(s, 0), "wal");
	sqlite3_finalize(s);
	assert_int_equal(sqlite3_prepare_v2(db, "SELECT count(*) FROM sqlite_master WHERE"
	    " type = 'table' AND name IN ('outbox', 'outbox_ids')", -1, &s, NULL), SQLITE_OK);
	assert_int_equal(sqlite3_step(s), SQLITE_ROW);
	assert_int_equal(sqlite3_column_int(s, 0), 2);
	sqlite3_finalize(s);
	sqlite3_close(db);

	/* opening an existing store migrates nothing */
	f->st = open_ok(f, BIG);
	assert_int_equal(store_outbox_count(f->st), 0);
	store_close(f->st);
	f->st = NULL;
	assert_int_equal(sqlite3_open_v2(f->path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
	assert_int_equal(sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &s, NULL), SQLITE_OK);
	assert_int_equal(sqlite3_step(s), SQLITE_ROW);
	assert_int_equal(sqlite3_column_int(s, 0), version);
	sqlite3_finalize(s);
	sqlite3_close(db);
	f->st = open_ok(f, BIG);
}

static void
test_reopen_keeps_data(void **state)
{
	struct fx *f = *state;
	struct msg *m, *out[8];
	size_t n;
	int64_t s1, s2, s3, s4;

	m = new_msg("id-1", "events", "order.created", "payload-1", 9);
	m->props.content_type = strdup("application/json");
	props_set_header(&m->props, "tenant", "acme");
	assert_int_equal(store_outbox_put(f->st, m, 1000.0, STORE_OUT_DEDUP), STORE_PUT_STORED);
	s1 = m->seq;
	msg_free(m);
	assert_int_equal(put(f, "id-2", 1001.0, &s2), STORE_PUT_STORED);
	assert_int_equal(put(f, "id-3", 1002.0, &s3), STORE_PUT_STORED);
	assert_true(s1 > 0 && s1 < s2 && s2 < s3);
	assert_int_equal(store_flush(f->st), 0);

	reopen(f);
	assert_int_equal(store_outbox_count(f->st), 3);
	assert_int_equal(store_committed_seq(f->st), s3);
	assert_true(store_outbox_oldest(f->st) == 1000.0);
	assert_int_equal(store_outbox_fetch(f->st, 0, store_committed_seq(f->st), 5000.0, 8, out, &n), 0);
	assert_int_equal(n, 3);
	assert_int_equal(out[0]->seq, s1);
	assert_string_equal(out[0]->message_id, "id-1");
	assert_string_equal(out[0]->exchange, "events");
	assert_string_equal(out[0]->routing_key, "order.created");
	assert_int_equal(out[0]->body_len, 9);
	assert_memory_equal(out[0]->body, "payload-1", 9);
	assert_string_equal(out[0]->props.content_type, "application/json");
	assert_string_equal(props_get_header(&out[0]->props, "tenant"), "acme");
	assert_true(out[0]->created_at == 1000.0);
	assert_string_equal(out[2]->message_id, "id-3");
	free_msgs(out, n);

	/* seqs go on after a restart, and the ids are still remembered */
	assert_int_equal(put(f, "id-1", 1003.0, NULL), STORE_PUT_DUPLICATE);
	assert_int_equal(put(f, "id-4", 1003.0, &s4), STORE_PUT_STORED);
	assert_true(s4 > s3);
}

static void
test_seq_not_reused(void **state)
{
	struct fx *f = *state;
	int64_t s1, s2, s3;

	assert_int_equal(put(f, "a", 1, &s1), STORE_PUT_STORED);
	assert_int_equal(put(f, "b", 1, &s2), STORE_PUT_STORED);
	assert_int_equal(store_flush(f->st), 0);
	assert_int_equal(store_outbox_done(f->st, s1), 0);
	assert_int_equal(store_outbox_done(f->st, s2), 0);
	assert_int_equal(store_flush(f->st), 0);
	assert_int_equal(store_outbox_count(f->st), 0);
	reopen(f);
	assert_int_equal(store_outbox_count(f->st), 0);
	/* order must survive deletes: a new message never gets an old seq */
	assert_int_equal(put(f, "c", 1, &s3), STORE_PUT_STORED);
	assert_true(s3 > s2);
}

static void
test_second_open_in_use(void **state)
{
	struct fx *f = *state;
	char *err = NULL;
	struct store *st2;

	st2 = store_open(f->path, f->base, BIG, &err);
	assert_null(st2);
	assert_non_null(err);
	assert_non_null(strstr(err, f->path));
	assert_non_null(strstr(err, "in use"));
	free(err);
	/* the first one goes on working */
	assert_int_equal(put(f, "still-mine", 1, NULL), STORE_PUT_STORED);
	assert_int_equal(store_flush(f->st), 0);
	assert_int_equal(disk_count(f->path), 1);
}

static void
assert_replica_id(const char *id)
{
	assert_int_equal(strlen(id), 32);
	assert_int_equal(strspn(id, "0123456789abcdef"), 32);
}

/* The replica id: random, made once, kept by a restart; a new store at
 * the same path (same host: another pod of a Deployment) has its own,
 * and a store older than ids gets one when migrated. */
static void
test_replica_id(void **state)
{
	struct fx *f = *state;
	char first[33], path[160], *err = NULL;
	struct store *other;
	sqlite3 *db;

	snprintf(first, sizeof first, "%s", store_replica_id(f->st));
	assert_replica_id(first);
	reopen(f);
	assert_string_equal(store_replica_id(f->st), first);

	snprintf(path, sizeof path, "%s/other.db", f->dir);
	other = store_open(path, f->base, BIG, &err);
	assert_non_null(other);
	assert_replica_id(store_replica_id(other));
	assert_string_not_equal(store_replica_id(other), first);
	store_close(other);

	store_close(f->st);
	f->st = NULL;
	nftw(f->dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
	assert_int_equal(mkdir(f->dir, 0700), 0);
	f->st = open_ok(f, BIG);
	assert_replica_id(store_replica_id(f->st));
	assert_string_not_equal(store_replica_id(f->st), first);

	/* a version 5 store: no meta table yet */
	store_close(f->st);
	f->st = NULL;
	assert_int_equal(sqlite3_open(f->path, &db), SQLITE_OK);
	assert_int_equal(sqlite3_exec(db, "DROP TABLE tx_participant; DROP TABLE saga_def; DROP TABLE meta; PRAGMA user_version = 5;",
	    NULL, NULL, NULL), SQLITE_OK);
	sqlite3_close(db);
	f->st = open_ok(f, BIG);
	assert_replica_id(store_replica_id(f->st));
}

static void
test_open_not_sqlite(void **state)
{
	struct fx *f = *state;
	char path[160], buf[8192], back[8192];
	char *err = NULL;
	struct stat sb;
	FILE *fp;

	snprintf(path, sizeof path, "%s/notes.txt", f->dir);
	memset(buf, 'x', sizeof buf);
	memcpy(buf, "these are my notes, not a database\n", 35);
	fp = fopen(path, "w");
	assert_non_null(fp);
	assert_int_equal(fwrite(buf, 1, sizeof buf, fp), sizeof buf);
	fclose(fp);

	assert_null(store_open(path, f->base, BIG, &err));
	assert_non_null(err);
	assert_non_null(strstr(err, path));
	free(err);
	/* and the file is left as it was */
	assert_int_equal(stat(path, &sb), 0);
	assert_int_equal(sb.st_size, sizeof buf);
	fp = fopen(path, "r");
	assert_int_equal(fread(back, 1, sizeof back, fp), sizeof back);
	fclose(fp);
	assert_memory_equal(buf, back, sizeof buf);
}

static void
test_open_newer_schema(void **state)
{
	struct fx *f = *state;
	char path[160], *err = NULL;
	sqlite3 *db;

	snprintf(path, sizeof path, "%s/future.db", f->dir);
	assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
	assert_int_equal(sqlite3_exec(db, "CREATE TABLE t(x); PRAGMA user_version = 99;",
	    NULL, NULL, NULL), SQLITE_OK);
	sqlite3_close(db);
	assert_null(store_open(path, f->base, BIG, &err));
	assert_non_null(err);
	assert_non_null(strstr(err, path));
	assert_non_null(strstr(err, "newer"));
	free(err);
}

static void
test_open_missing_dir(void **state)
{
	struct fx *f = *state;
	char path[160], *err = NULL;

	snprintf(path, sizeof path, "%s/no/such/dir/s.db", f->dir);
	assert_null(store_open(path, f->base, BIG, &err));
	assert_non_null(err);
	assert_non_null(strstr(err, path));
	free(err);
}

/* ---- put ---- */

static void
test_put_and_duplicate(void **state)
{
	struct fx *f = *state;
	struct msg *m;
	int64_t s1;

	m = new_msg("dup-1", "events", "k", "x", 1);
	assert_int_equal(store_outbox_put(f->st, m, 500.0, STORE_OUT_DEDUP), STORE_PUT_STORED);
	s1 = m->seq;
	assert_true(s1 > 0);
	assert_true(m->created_at == 500.0);
	msg_free(m);
	assert_int_equal(store_outbox_count(f->st), 1);

	/* same id in the same transaction: nothing stored, seq untouched */
	m = new_msg("dup-1", "other", "k2", "y", 1);
	m->seq = -7;
	assert_int_equal(store_outbox_put(f->st, m, 501.0, STORE_OUT_DEDUP), STORE_PUT_DUPLICATE);
	assert_int_equal(m->seq, -7);
	msg_free(m);
	assert_int_equal(store_outbox_count(f->st), 1);

	/* after the commit, and after the message was published (done) */
	assert_int_equal(store_flush(f->st), 0);
	assert_int_equal(put(f, "dup-1", 502.0, NULL), STORE_PUT_DUPLICATE);
	assert_int_equal(store_outbox_done(f->st, s1), 0);
	assert_int_equal(store_flush(f->st), 0);
	assert_int_equal(put(f, "dup-1", 503.0, NULL), STORE_PUT_DUPLICATE);
	assert_int_equal(store_outbox_count(f->st), 0);
	assert_int_equal(put(f, "dup-2", 503.0, NULL), STORE_PUT_STORED);
	assert_int_equal(store_flush(f->st), 0);
	assert_int_equal(disk_count(f->path), 1);
}

static void
test_put_without_dedup(void **state)
{
	struct fx *f = *state;
	struct msg *m;
	int64_t s1, s2;

	/* sagad's own messages skip the dedup ids: both are stored */
	m = new_msg("own-1", "events", "k", "x", 1);
	assert_int_equal(store_outbox_put(f->st, m, 1, 0), STORE_PUT_STORED);
	s1 = m->seq;
	assert_int_equal(store_outbox_put(f->st, m, 2, 0), STORE_PUT_STORED);
	s2 = m->seq;
	msg_free(m);
	assert_true(s2 > s1);
	assert_int_equal(store_outbox_count(f->st), 2);
	/* and they leave no id behind that would refuse a service message */
	assert_int_equal(put(f, "own-1", 3, NULL), STORE_PUT_STORED);
	assert_int_equal(store_outbox_count(f->st), 3);
}

static void
test_failed_put_leaves_no_id(void **state)
{
	struct fx *f = *state;
	struct msg *m;

	/*
	 * Regression (fixed): store_outbox_put() is not atomic. It inserts the dedup id,
	 * then the outbox row; when the second INSERT fails with an error
	 * that SQLite rolls back per statement only (a constraint such as
	 * the NOT NULL exchange here, or SQLITE_FULL), the id stays in the
	 * open transaction and is committed. put answered "not stored"
	 * (ingress: 500/507), yet the client's retry with the same
	 * Message-Id is a DUPLICATE (200) and the message is never stored.
	 */
	m = new_msg("half", "events", "k", "x", 1);
	free(m->exchange);
	m->exchange = NULL;
	assert_int_not_equal(store_outbox_put(f->st, m, 1, STORE_OUT_DEDUP), STORE_PUT_STORED);
	msg_free(m);
	assert_int_equal(store_outbox_count(f->st), 0);
	assert_int_equal(store_flush(f->st), 0);
	/* the retry must be stored */
	assert_int_equal(put(f, "half", 2, NULL), STORE_PUT_STORED);
	assert_int_equal(store_outbox_count(f->st), 1);
}

static void
test_put_full(void **state)
{
	struct fx *f = *state;
	int64_t base_bytes = store_bytes(f->st);
	struct msg *m;
	char big[1000];

	store_close(f->st);
	f->st = open_ok(f, 1);
	assert_false(store_writable(f->st));
	assert_int_equal(put(f, "full-1", 1, NULL), STORE_PUT_FULL);
	assert_int_equal(store_outbox_count(f->st), 0);
	assert_int_equal(store_flush(f->st), 0);
	assert_int_equal(disk_count(f->path), 0);

	/* room for one small message, not for a larger one */
	store_set_max_bytes(f->st, base_bytes + 1000);
	assert_true(store_writable(f->st));
	assert_int_equal(put(f, "small", 1, NULL), STORE_PUT_STORED);
	memset(big, 'b', sizeof big);
	m = new_msg("large", "events", "k", big, sizeof big);
	assert_int_equal(store_outbox_put(f->st, m, 1, STORE_OUT_DEDUP), STORE_PUT_FULL);
	msg_free(m);
	assert_int_equal(store_outbox_count(f->st), 1);
	/* a refused id is not remembered: it may come back when there is room */
	store_set_max_bytes(f->st, BIG);
	m = new_msg("large", "events", "k", big, sizeof big);
	assert_int_equal(store_outbox_put(f->st, m, 1, STORE_OUT_DEDUP), STORE_PUT_STORED);
	msg_free(m);
	assert_int_equal(store_outbox_count(f->st), 2);
}

/* ---- fetch ---- */

static void
test_fetch_order_and_upto(void **state)
{
	struct fx *f = *state;
	struct msg *out[16];
	int64_t seq[7];
	char id[16];
	size_t n;
	int i;

	for (i = 1; i <= 5; i++) {
		snprintf(id, sizeof id, "m%d", i);
		assert_int_equal(put(f, id, 100 + i, &seq[i]), STORE_PUT_STORED);
	}
	/* not committed yet: nothing is visible below committed_seq */
	assert_int_equal(store_committed_seq(f->st), 0);
	assert_int_equal(store_outbox_fetch(f->st, 0, store_committed_seq(f->st), 1e9, 16, out, &n), 0);
	assert_int_equal(n, 0);
	assert_int_equal(store_flush(f->st), 0);
	assert_int_equal(store_committed_seq(f->st), seq[5]);

	assert_int_equal(store_outbox_fetch(f->st, 0, seq[5], 1e9, 16, out, &n), 0);
	assert_int_equal(n, 5);
	for (i = 0; i < 5; i++) {
		snprintf(id, sizeof id, "m%d", i + 1);
		assert_int_equal(out[i]->seq, seq[i + 1]);
		assert_string_equal(out[i]->message_id, id);
	}
	free_msgs(out, n);

	/* after < seq <= upto */
	assert_int_equal(store_outbox_fetch(f->st, seq[2], seq[4], 1e9, 16, out, &n), 0);
	assert_int_equal(n, 2);
	assert_int_equal(out[0]->seq, seq[3]);
	assert_int_equal(out[1]->seq, seq[4]);
	free_msgs(out, n);

	/* limit */
	assert_int_equal(store_outbox_fetch(f->st, 0, seq[5], 1e9, 2, out, &n), 0);
	assert_int_equal(n, 2);
	assert_int_equal(out[0]->seq, seq[1]);
	assert_int_equal(out[1]->seq, seq[2]);
	free_msgs(out, n);

	/* a sixth, not committed: bounded by committed_seq */
	assert_int_equal(put(f, "m6", 106, &seq[6]), STORE_PUT_STORED);
	assert_int_equal(store_committed_seq(f->st), seq[5]);
	assert_int_equal(store_outbox_fetch(f->st, seq[4], store_committed_seq(f->st), 1e9, 16, out, &n), 0);
	assert_int_equal(n, 1);
	assert_int_equal(out[0]->seq, seq[5]);
	free_msgs(out, n);
	assert_int_equal(store_flush(f->st), 0);
	assert_int_equal(store_committed_seq(f->st), seq[6]);
	assert_int_equal(store_outbox_count(f->st), 6);
}

static void
test_fetch_body_and_props(void **state)
{
	struct fx *f = *state;
	static const char bin[] = { 'a', 0, 'b', (char)0xff, 0, '\n' };
	struct msg *m, *out[4];
	size_t n;
	int64_t s1, s2;

	m = new_msg("bin", "", "queue-direct", bin, sizeof bin);
	m->props.content_type = strdup("application/octet-stream");
	m->props.correlation_id = strdup("corr");
	m->props.type = strdup("t");
	m->props.expiration = strdup("1000");
	props_set_header(&m->props, "x-causation-id", "cause");
	assert_int_equal(store_outbox_put(f->st, m, 1, STORE_OUT_DEDUP), STORE_PUT_STORED);
	s1 = m->seq;
	msg_free(m);
	m = new_msg("empty", "events", "", NULL, 0);
	assert_int_equal(store_outbox_put(f->st, m, 1, STORE_OUT_DEDUP), STORE_PUT_STORED);
	s2 = m->seq;
	msg_free(m);
	assert_int_equal(store_flush(f->st), 0);

	assert_int_equal(store_outbox_fetch(f->st, 0, s2, 10, 4, out, &n), 0);
	assert_int_equal(n, 2);
	assert_int_equal(out[0]->seq, s1);
	assert_string_equal(out[0]->exchange, "");
	assert_string_equal(out[0]->routing_key, "queue-direct");
	assert_int_equal(out[0]->body_len, sizeof bin);
	assert_memory_equal(out[0]->body, bin, sizeof bin);
	assert_string_equal(out[0]->props.content_type, "application/octet-stream");
	assert_string_equal(out[0]->props.correlation_id, "corr");
	assert_string_equal(out[0]->props.type, "t");
	assert_string_equal(out[0]->props.expiration, "1000");
	assert_null(out[0]->props.reply_to);
	assert_int_equal(out[0]->props.n_headers, 1);
	assert_string_equal(props_get_header(&out[0]->props, "x-causation-id"), "cause");
	assert_int_equal(out[0]->attempts, 0);
	assert_int_equal(out[1]->seq, s2);
	assert_string_equal(out[1]->routing_key, "");
	assert_int_equal(out[1]->body_len, 0);
	assert_non_null(out[1]->body);
	assert_null(out[1]->props.content_type);
	assert_int_equal(out[1]->props.n_headers, 0);
	free_msgs(out, n);
}

static void
test_retry_due_clear(void **state)
{
	struct fx *f = *state;
	struct msg *out[8];
	struct store_row rows[8];
	int64_t s[4];
	size_t n;
	int i;

	for (i = 1; i <= 3; i++) {
		char id[8];
		snprintf(id, sizeof id, "r%d", i);
		assert_int_equal(put(f, id, 10, &s[i]), STORE_PUT_STORED);
	}
	assert_int_equal(store_flush(f->st), 0);
	assert_int_equal(store_outbox_attempts(f->st, s[2]), 0);

	/* s2 was returned by the broker: retry at t=200 */
	assert_int_equal(store_outbox_retry(f->st, s[2], 200.0, 1, "unroutable"), 0);
	assert_int_equal(store_flush(f->st), 0);
	assert_int_equal(store_outbox_attempts(f->st, s[2]), 1);
	assert_true(store_outbox_next_due(f->st) == 200.0);

	/* at t=100 the main fetch skips it and nothing is due */
	assert_int_equal(store_outbox_fetch(f->st, 0, s[3], 100.0, 8, out, &n), 0);
	assert_int_equal(n, 2);
	assert_int_equal(out[0]->seq, s[1]);
	assert_int_equal(out[1]->seq, s[3]);
	free_msgs(out, n);
	assert_int_equal(store_outbox_fetch_due(f->st, s[3], 100.0, 8, out, &n), 0);
	assert_int_equal(n, 0);

	/* at t=250 it is due, with its attempts */
	assert_int_equal(store_outbox_fetch_due(f->st, s[3], 250.0, 8, out, &n), 0);
	assert_int_equal(n, 1);
	assert_int_equal(out[0]->seq, s[2]);
	assert_int_equal(out[0]->attempts, 1);
	free_msgs(out, n);
	/* ... but not beyond upto */
	assert_int_equal(store_outbox_fetch_due(f->st, s[1], 250.0, 8, out, &n), 0);
	assert_int_equal(n, 0);

	assert_int_equal(store_outbox_list(f->st, 0, 8, rows, &n), 0);
	assert_int_equal(n, 3);
	assert_int_equal(rows[1].seq, s[2]);
	assert_string_equal(rows[1].last_error, "unroutable");
	assert_true(rows[1].due_at == 200.0);
	assert_int_equal(rows[1].attempts, 1);
	assert_string_equal(rows[0].last_error, "");
	assert_true(rows[0].due_at == 0);

	/* taken for publishing again: no longer waits, attempts kept */
	assert_int_equal(store_outbox_clear_due(f->st, s[2]), 0);
	assert_int_equal(store_flush(f->st), 0);
	assert_true(store_outbox_next_due(f->st) == 0);
	assert_int_equal(store_outbox_fetch_due(f->st, s[3], 1e9, 8, out, &n), 0);
	assert_int_equal(n, 0);
	assert_int_equal(store_outbox_fetch(f->st, 0, s[3], 100.0, 8, out, &n), 0);
	assert_int_equal(n, 3);
	assert_int_equal(out[1]->seq, s[2]);
	assert_int_equal(out[1]->attempts, 1);
	free_msgs(out, n);
	assert_int_equal(store_outbox_attempts(f->st, s[2]), 1);
	assert_int_equal(store_outbox_attempts(f->st, 999999), 0);
}

static void
test_next_due_is_earliest(void **state)
{
	struct fx *f = *state;
	int64_t a, b;

	assert_int_equal(put(f, "a", 1, &a), STORE_PUT_STORED);
	assert_int_equal(put(f, "b", 1, &b), STORE_PUT_STORED);
	assert_int_equal(store_outbox_retry(f->st, a, 300.0, 2, "x"), 0);
	assert_int_equal(store_outbox_retry(f->st, b, 150.0, 1, "y"), 0);
	assert_true(store_outbox_next_due(f->st) == 150.0);
	assert_int_equal(store_outbox_done(f->st, b), 0);
	assert_true(store_outbox_next_due(f->st) == 300.0);
}

/* ---- done, count, oldest, list ---- */

static void
test_done_count_oldest(void **state)
{
	struct fx *f = *state;
	struct msg *out[4];
	int64_t a, b, c;
	size_t n;

	assert_true(store_outbox_oldest(f->st) == 0);
	assert_int_equal(put(f, "a", 1000.0, &a), STORE_PUT_STORED);
	assert_int_equal(put(f, "b", 2000.0, &b), STORE_PUT_STORED);
	assert_int_equal(put(f, "c", 3000.0, &c), STORE_PUT_STORED);
	assert_int_equal(store_outbox_count(f->st), 3);
	assert_true(store_outbox_oldest(f->st) == 1000.0);
	assert_int_equal(store_flush(f->st), 0);

	assert_int_equal(store_outbox_done(f->st, a), 0);
	assert_int_equal(store_outbox_count(f->st), 2);
	assert_true(store_outbox_oldest(f->st) == 2000.0);
	/* an unknown seq (already done) changes nothing */
	assert_int_equal(store_outbox_done(f->st, a), 0);
	assert_int_equal(store_outbox_done(f->st, 424242), 0);
	assert_int_equal(store_outbox_count(f->st), 2);
	assert_int_equal(store_flush(f->st), 0);
	assert_int_equal(store_outbox_count(f->st), 2);
	assert_int_equal(disk_count(f->path), 2);

	assert_int_equal(store_outbox_fetch(f->st, 0, c, 1e9, 4, out, &n), 0);
	assert_int_equal(n, 2);
	assert_int_equal(out[0]->seq, b);
	assert_int_equal(out[1]->seq, c);
	free_msgs(out, n);

	/* put and done within one transaction */
	assert_int_equal(put(f, "d", 4000.0, &a), STORE_PUT_STORED);
	assert_int_equal(store_outbox_done(f->st, a), 0);
	assert_int_equal(store_outbox_done(f->st, b), 0);
	assert_int_equal(store_outbox_done(f->st, c), 0);
	assert_int_equal(store_outbox_count(f->st), 0);
	assert_int_equal(store_flush(f->st), 0);
	assert_int_equal(store_outbox_count(f->st), 0);
	assert_true(store_outbox_oldest(f->st) == 0);
	reopen(f);
	assert_int_equal(store_outbox_count(f->st), 0);
}

static void
test_list(void **state)
{
	struct fx *f = *state;
	struct store_row rows[4];
	struct msg *m;
	int64_t s1, s2, s3;
	size_t n;

	m = new_msg("list-1", "events", "a.b", "12345", 5);
	assert_int_equal(store_outbox_put(f->st, m, 11.5, STORE_OUT_DEDUP), STORE_PUT_STORED);
	s1 = m->seq;
	msg_free(m);
	assert_int_equal(put(f, "list-2", 12, &s2), STORE_PUT_STORED);
	assert_int_equal(put(f, "list-3", 13, &s3), STORE_PUT_STORED);

	assert_int_equal(store_outbox_list(f->st, 0, 4, rows, &n), 0);
	assert_int_equal(n, 3);
	assert_int_equal(rows[0].seq, s1);
	assert_string_equal(rows[0].message_id, "list-1");
	assert_string_equal(rows[0].exchange, "events");
	assert_string_equal(rows[0].routing_key, "a.b");
	assert_int_equal(rows[0].body_len, 5);
	assert_true(rows[0].created_at == 11.5);
	assert_int_equal(rows[0].attempts, 0);
	assert_int_equal(rows[2].seq, s3);

	assert_int_equal(store_outbox_list(f->st, s1, 1, rows, &n), 0);
	assert_int_equal(n, 1);
	assert_int_equal(rows[0].seq, s2);
	assert_string_equal(rows[0].message_id, "list-2");
	assert_int_equal(store_outbox_list(f->st, s3, 4, rows, &n), 0);
	assert_int_equal(n, 0);
}

/* ---- dedup window ---- */

static void
test_expire_ids(void **state)
{
	struct fx *f = *state;

	assert_int_equal(put(f, "t100", 100, NULL), STORE_PUT_STORED);
	assert_int_equal(put(f, "t200", 200, NULL), STORE_PUT_STORED);
	assert_int_equal(put(f, "t300", 300, NULL), STORE_PUT_STORED);
	assert_int_equal(store_flush(f->st), 0);

	assert_int_equal(store_expire_ids(f->st, 50, 10), 0);
	assert_int_equal(store_expire_ids(f->st, 250, 1), 1);	/* batch bound */
	assert_int_equal(store_expire_ids(f->st, 250, 10), 1);
	assert_int_equal(store_expire_ids(f->st, 250, 10), 0);
	assert_int_equal(store_flush(f->st), 0);

	/* forgotten ids may be stored again; remembered ones may not */
	assert_int_equal(put(f, "t100", 400, NULL), STORE_PUT_STORED);
	assert_int_equal(put(f, "t200", 400, NULL), STORE_PUT_STORED);
	assert_int_equal(put(f, "t300", 400, NULL), STORE_PUT_DUPLICATE);
	assert_int_equal(store_outbox_count(f->st), 5);
}

/* ---- group commit ---- */

struct counters {
	int calls, ok, failed;
	int committed, rolled_back;
	int64_t on_disk;	/* rows another connection saw inside the callback */
	const char *path;
	struct fx *f;
};

static void
count_cb(void *arg, int ok)
{
	struct counters *c = arg;

	c->calls++;
	if (ok)
		c->ok++;
	else
		c->failed++;
	if (c->path)
		c->on_disk = disk_count(c->path);
}

static void
hook_committed(void *arg)
{
	((struct counters *)arg)->committed++;
}

static void
hook_rolled_back(void *arg)
{
	((struct counters *)arg)->rolled_back++;
}

static void
set_hooks(struct fx *f, struct counters *c)
{
	struct store_hooks h = { hook_committed, hook_rolled_back, c };

	store_set_hooks(f->st, &h);
}

static void
test_commit_on_flush(void **state)
{
	struct fx *f = *state;
	struct counters c = { 0 }, hooks = { 0 };

	set_hooks(f, &hooks);
	c.path = f->path;
	assert_int_equal(put(f, "gc-1", 1, NULL), STORE_PUT_STORED);
	store_on_commit(f->st, count_cb, &c);
	/* nothing answered, nothing on disk yet */
	assert_int_equal(c.calls, 0);
	assert_int_equal(hooks.committed, 0);
	assert_int_equal(disk_count(f->path), 0);

	assert_int_equal(store_flush(f->st), 0);
	assert_int_equal(c.calls, 1);
	assert_int_equal(c.ok, 1);
	assert_int_equal(c.on_disk, 1);		/* durable before the answer */
	assert_int_equal(hooks.committed, 1);
	assert_int_equal(hooks.rolled_back, 0);

	/* the loop turn finds nothing more to commit */
	assert_true(event_base_loop(f->base, EVLOOP_NONBLOCK) >= 0);
	assert_int_equal(c.calls, 1);
	assert_int_equal(hooks.committed, 1);
}

static void
test_commit_at_end_of_loop_turn(void **state)
{
	struct fx *f = *state;
	struct counters c = { 0 }, hooks = { 0 };
	int i;

	set_hooks(f, &hooks);
	c.path = f->path;
	assert_int_equal(put(f, "turn-1", 1, NULL), STORE_PUT_STORED);
	store_on_commit(f->st, count_cb, &c);
	assert_int_equal(c.calls, 0);
	for (i = 0; i < 5 && !c.calls; i++)
		assert_true(event_base_loop(f->base, EVLOOP_NONBLOCK) >= 0);
	assert_int_equal(c.calls, 1);
	assert_int_equal(c.ok, 1);
	assert_int_equal(c.on_disk, 1);
	assert_int_equal(hooks.committed, 1);
	assert_int_equal(store_committed_seq(f->st), store_outbox_count(f->st));
}

/* A request event of the loop turn: puts one message and waits for it. */
struct request {
	struct fx *f;
	const char *id;
	struct counters *c;
	int64_t seq;
};

static void
request_cb(evutil_socket_t fd, short what, void *arg)
{
	struct request *r = arg;
	struct msg *m = new_msg(r->id, "events", "k", "b", 1);

	(void)fd;
	(void)what;
	assert_int_equal(store_outbox_put(r->f->st, m, 1, STORE_OUT_DEDUP), STORE_PUT_STORED);
	r->seq = m->seq;
	msg_free(m);
	store_on_commit(r->f->st, count_cb, r->c);
}

/* Three request events ready in the same turn, at priority 1. */
static void
requests_ready(struct fx *f, struct request *r, struct event **ev)
{
	int i;

	for (i = 0; i < 3; i++) {
		ev[i] = event_new(f->base, -1, 0, request_cb, &r[i]);
		assert_int_equal(event_priority_set(ev[i], 1), 0);
		event_active(ev[i], 0, 0);
	}
}

static void
test_group_commit_one_fsync_per_turn(void **state)
{
	struct fx *f = *state;
	struct counters c = { 0 }, hooks = { 0 };
	struct request r[3] = {
		{ f, "req-a", &c, 0 }, { f, "req-b", &c, 0 }, { f, "req-c", &c, 0 }
	};
	struct event *ev[3];
	int i;

	set_hooks(f, &hooks);
	c.path = f->path;
	/* three requests ready in the same turn, above the commit's priority */
	requests_ready(f, r, ev);
	for (i = 0; i < 10 && c.calls < 3; i++)
		assert_true(event_base_loop(f->base, EVLOOP_NONBLOCK) >= 0);
	assert_int_equal(c.calls, 3);
	assert_int_equal(c.ok, 3);
	assert_int_equal(hooks.committed, 1);	/* one commit served all three */
	assert_int_equal(c.on_disk, 3);		/* the first answer already saw all */
	assert_true(r[0].seq < r[1].seq && r[1].seq < r[2].seq);
	assert_int_equal(store_committed_seq(f->st), r[2].seq);
	for (i = 0; i < 3; i++)
		event_free(ev[i]);
}

static void
test_on_commit_without_transaction(void **state)
{
	struct fx *f = *state;
	struct counters c = { 0 }, hooks = { 0 };
	int i;

	set_hooks(f, &hooks);
	/* already durable, but answered from the loop, not from the caller */
	store_on_commit(f->st, count_cb, &c);
	assert_int_equal(c.calls, 0);
	for (i = 0; i < 5 && !c.calls; i++)
		assert_true(event_base_loop(f->base, EVLOOP_NONBLOCK) >= 0);
	assert_int_equal(c.calls, 1);
	assert_int_equal(c.ok, 1);
	assert_int_equal(hooks.committed, 0);	/* no transaction, no commit */
}

/* A callback that starts new work, as an answer that triggers a publish. */
static void
chain_cb(void *arg, int ok)
{
	struct counters *c = arg;

	c->calls++;
	if (ok)
		c->ok++;
	if (c->calls == 1) {
		assert_int_equal(put(c->f, "chained", 2, NULL), STORE_PUT_STORED);
		store_on_commit(c->f->st, chain_cb, c);
	}
}

static void
test_callback_starts_new_work(void **state)
{
	struct fx *f = *state;
	struct counters c = { 0 }, hooks = { 0 };
	int i;

	set_hooks(f, &hooks);
	c.f = f;
	assert_int_equal(put(f, "first", 1, NULL), STORE_PUT_STORED);
	store_on_commit(f->st, chain_cb, &c);
	for (i = 0; i < 10 && c.calls < 2; i++)
		assert_true(event_base_loop(f->base, EVLOOP_NONBLOCK) >= 0);
	assert_int_equal(c.calls, 2);
	assert_int_equal(c.ok, 2);
	assert_int_equal(hooks.committed, 2);
	assert_int_equal(disk_count(f->path), 2);
}

/* Turn the loop until *flag is set (the syncer's thread answers), 1 s at
 * most. */
static void
turn_until(struct fx *f, const int *flag)
{
	int i;

	for (i = 0; i < 1000 && !*flag; i++) {
		assert_true(event_base_loop(f->base, EVLOOP_NONBLOCK) >= 0);
		usleep(1000);
	}
}

/* store_on_written: at the commit itself, before the fsync and before the
 * store_on_commit callbacks; the row is then visible to other readers. */
struct order {
	int seq, written_at, durable_at, written_ok, durable_ok;
	int64_t on_disk;
	const char *path;
};

static void
order_written(void *arg, int ok)
{
	struct order *o = arg;

	o->written_at = ++o->seq;
	o->written_ok = ok;
	o->on_disk = disk_count(o->path);
}

static void
order_durable(void *arg, int ok)
{
	struct order *o = arg;

	o->durable_at = ++o->seq;
	o->durable_ok = ok;
}

static void
test_written_before_durable(void **state)
{
	struct fx *f = *state;
	struct order o = { 0 };

	o.path = f->path;
	store_set_async(f->st);		/* the daemon's pipelined commits */
	assert_int_equal(put(f, "w-1", 1, NULL), STORE_PUT_STORED);
	store_on_written(f->st, order_written, &o);
	store_on_commit(f->st, order_durable, &o);
	assert_int_equal(o.seq, 0);	/* nothing from inside the caller */
	turn_until(f, &o.durable_at);
	assert_int_equal(o.written_at, 1);
	assert_int_equal(o.written_ok, 1);
	assert_int_equal(o.on_disk, 1);		/* committed when told "written" */
	assert_int_equal(o.durable_at, 2);
	assert_int_equal(o.durable_ok, 1);

	/* without an open transaction: both at the next commit event, in order */
	memset(&o, 0, sizeof o);
	o.path = f->path;
	store_on_written(f->st, order_written, &o);
	store_on_commit(f->st, order_durable, &o);
	turn_until(f, &o.durable_at);
	assert_int_equal(o.written_at, 1);
	assert_int_equal(o.durable_at, 2);
	assert_int_equal(o.written_ok + o.durable_ok, 2);

	/* the synchronous path (store_flush) keeps the same order */
	memset(&o, 0, sizeof o);
	o.path = f->path;
	assert_int_equal(put(f, "w-2", 1, NULL), STORE_PUT_STORED);
	store_on_written(f->st, order_written, &o);
	store_on_commit(f->st, order_durable, &o);
	assert_int_equal(store_flush(f->st), 0);
	assert_int_equal(o.written_at, 1);
	assert_int_equal(o.durable_at, 2);
	assert_int_equal(o.on_disk, 2);
}

/* store_on_durable_early: on the syncer's thread, once, before the loop's
 * callbacks; only for a durable transaction synced by the thread. */
struct early {
	int ran;		/* times the job ran */
	int seen_by_cb;		/* ran, as the store_on_commit callback saw it */
	int cb_done, cb_ok;
	pthread_t thread;
};

static void
early_job(void *arg)
{
	struct early *e = arg;

	e->thread = pthread_self();
	e->ran++;
}

static void
early_cb(void *arg, int ok)
{
	struct early *e = arg;

	e->seen_by_cb = e->ran;
	e->cb_ok = ok;
	e->cb_done = 1;
}

static void
test_early_jobs(void **state)
{
	struct fx *f = *state;
	struct early e;
	int64_t seq = 0;

	/* the synchronous store has no thread: nothing is queued */
	assert_int_equal(put(f, "e-0", 1, &seq), STORE_PUT_STORED);
	assert_int_equal(store_on_durable_early(f->st, early_job, &e), 0);
	assert_int_equal(store_flush(f->st), 0);

	store_set_async(f->st);
	memset(&e, 0, sizeof e);
	assert_int_equal(put(f, "e-1", 1, NULL), STORE_PUT_STORED);
	assert_int_equal(store_on_durable_early(f->st, early_job, &e), 1);
	store_on_commit(f->st, early_cb, &e);
	assert_int_equal(e.ran, 0);	/* nothing from inside the caller */
	turn_until(f, &e.cb_done);
	assert_int_equal(e.cb_ok, 1);
	assert_int_equal(e.ran, 1);
	assert_int_equal(e.seen_by_cb, 1);
	assert_false(pthread_equal(e.thread, pthread_self()));

	/* no transaction open, or one that needs no fsync: not queued */
	assert_int_equal(store_on_durable_early(f->st, early_job, &e), 0);
	store_outbox_done(f->st, seq);
	assert_int_equal(store_on_durable_early(f->st, early_job, &e), 0);
	assert_int_equal(store_flush(f->st), 0);

	/* synced on the loop (store_flush): dropped, the callback does the work */
	memset(&e, 0, sizeof e);
	assert_int_equal(put(f, "e-2", 1, NULL), STORE_PUT_STORED);
	assert_int_equal(store_on_durable_early(f->st, early_job, &e), 1);
	store_on_commit(f->st, early_cb, &e);
	assert_int_equal(store_flush(f->st), 0);
	assert_int_equal(e.cb_ok, 1);
	assert_int_equal(e.ran, 0);
	assert_int_equal(disk_count(f->path), 2);
}

/* One pending inbox record of sub "s" loaded: is it marked redelivered? */
static int
inbox_redelivered(struct fx *f)
{
	struct inbox_rec *r[2];
	size_t n = 0;
	int v;

	assert_int_equal(store_inbox_load(f->st, "s", INBOX_PENDING, 0, 2, r, &n), 0);
	assert_int_equal(n, 1);
	v = r[0]->redelivered;
	inbox_rec_free(r[0]);
	return v;
}

/* A dispatch run's set of attempts in flight written, then sagad restarted. */
static void
in_flight_then_restart(struct fx *f, const struct inbox_attempt *a, size_t n)
{
	assert_int_equal(store_inbox_in_flight(f->st, "s", a, n), 0);
	assert_int_equal(store_flush(f->st), 0);
	reopen(f);
}

/* An attempt started and not recorded (sagad killed while the service held
 * the request) leaves the record in doubt after a restart (issue 14, A8),
 * until an outcome is recorded; an outcome recorded before the stop, or no
 * attempt at all, does not. */
static void
test_inbox_in_flight_marks_redelivered(void **state)
{
	struct fx *f = *state;
	struct msg *m = new_msg("in-1", "events", "order.created", "{}", 2);
	struct inbox_attempt a = { 0, 1 };

	assert_int_equal(store_inbox_put(f->st, "s", m, 1, &a.id), STORE_PUT_STORED);
	msg_free(m);
	assert_int_equal(store_flush(f->st), 0);
	reopen(f);
	assert_false(inbox_redelivered(f));
	in_flight_then_restart(f, &a, 1);
	assert_true(inbox_redelivered(f));
	/* Still in doubt after another restart, and after a set without it. */
	in_flight_then_restart(f, NULL, 0);
	assert_true(inbox_redelivered(f));
	/* An outcome recorded (a retry): no longer in doubt. */
	assert_int_equal(store_inbox_retry(f->st, a.id, 1, 0, 503, "HTTP 503"), 0);
	assert_int_equal(store_flush(f->st), 0);
	reopen(f);
	assert_false(inbox_redelivered(f));
	/* Attempt 1 still in the set, its outcome recorded: not in doubt;
	 * attempt 2 in flight: in doubt. */
	in_flight_then_restart(f, &a, 1);
	assert_false(inbox_redelivered(f));
	a.attempt = 2;
	in_flight_then_restart(f, &a, 1);
	assert_true(inbox_redelivered(f));
}

/* The set of one subscription, rewritten at each dispatch run: the last
 * one written counts, other subscriptions' sets are their own. */
static void
test_inbox_in_flight_set(void **state)
{
	struct fx *f = *state;
	struct inbox_rec *r[40];
	struct inbox_attempt set[40];
	char mid[32];
	size_t n = 0, i;

	for (i = 0; i < 40; i++) {
		struct msg *m;

		snprintf(mid, sizeof mid, "in-%zu", i);
		m = new_msg(mid, "events", "k", "{}", 2);
		assert_int_equal(store_inbox_put(f->st, i < 30 ? "s" : "t", m, 1, &set[i].id),
		    STORE_PUT_STORED);
		set[i].attempt = 1;
		msg_free(m);
	}
	assert_int_equal(store_inbox_in_flight(f->st, "s", set, 20), 0);
	assert_int_equal(store_inbox_in_flight(f->st, "s", set + 3, 25), 0);
	assert_int_equal(store_inbox_in_flight(f->st, "t", set + 30, 2), 0);
	assert_int_equal(store_flush(f->st), 0);
	reopen(f);
	assert_int_equal(store_inbox_load(f->st, "s", INBOX_PENDING, 0, 40, r, &n), 0);
	assert_int_equal(n, 30);
	for (i = 0; i < n; i++) {
		assert_int_equal(r[i]->redelivered, i >= 3 && i < 28);
		inbox_rec_free(r[i]);
	}
	assert_int_equal(store_inbox_load(f->st, "t", INBOX_PENDING, 0, 40, r, &n), 0);
	assert_int_equal(n, 10);
	for (i = 0; i < n; i++) {
		assert_int_equal(r[i]->redelivered, i < 2);
		inbox_rec_free(r[i]);
	}
}

/* A version 4 store counted attempts started (sent) against those
 * recorded: the migration keeps exactly the records in doubt. */
static void
test_inbox_in_flight_migration(void **state)
{
	struct fx *f = *state;
	struct msg *m = new_msg("in-1", "events", "k", "{}", 2);
	sqlite3 *db;
	int64_t id = 0;

	assert_int_equal(store_inbox_put(f->st, "s", m, 1, &id), STORE_PUT_STORED);
	msg_free(m);
	assert_int_equal(store_flush(f->st), 0);
	store_close(f->st);
	f->st = NULL;
	assert_int_equal(sqlite3_open(f->path, &db), SQLITE_OK);
	assert_int_equal(sqlite3_exec(db, "ALTER TABLE inbox RENAME COLUMN in_doubt TO sent; DROP TABLE inbox_flight; DROP TABLE meta; DROP TABLE saga_def; DROP TABLE tx_participant;"
	    "UPDATE inbox SET attempts = 2, sent = 3; PRAGMA user_version = 4;",
	    NULL, NULL, NULL), SQLITE_OK);
	sqlite3_close(db);
	f->st = open_ok(f, BIG);
	assert_true(inbox_redelivered(f));
	store_close(f->st);
	f->st = NULL;
	assert_int_equal(sqlite3_open(f->path, &db), SQLITE_OK);
	assert_int_equal(sqlite3_exec(db, "ALTER TABLE inbox RENAME COLUMN in_doubt TO sent; DROP TABLE inbox_flight; DROP TABLE meta; DROP TABLE saga_def; DROP TABLE tx_participant;"
	    "UPDATE inbox SET attempts = 3, sent = 3; PRAGMA user_version = 4;",
	    NULL, NULL, NULL), SQLITE_OK);
	sqlite3_close(db);
	f->st = open_ok(f, BIG);
	assert_false(inbox_redelivered(f));
}

/* A big log between checkpoints, a small one near a full disk. */
static void
test_checkpoint_pages(void **state)
{
	(void)state;
	assert_int_equal(store_checkpoint_pages((int64_t)10 << 30), 1024);
	assert_int_equal(store_checkpoint_pages((int64_t)64 << 20), 1024);
	assert_int_equal(store_checkpoint_pages(((int64_t)64 << 20) - 1), 256);
	assert_int_equal(store_checkpoint_pages((int64_t)16 << 20), 256);
	assert_int_equal(store_checkpoint_pages((int64_t)8 << 20), 128);
	assert_int_equal(store_checkpoint_pages((int64_t)2 << 20), 32);
	assert_int_equal(store_checkpoint_pages(0), 16);
}

/* The room kept free for deletes and checkpoints: two windows and a
 * margin, a fraction of a small disk (issue 14, A7). */
static void
test_headroom(void **state)
{
	int64_t free_bytes;

	(void)state;
	assert_int_equal(store_headroom(16, 4096), (2 * 16 + 32) * 4096);
	for (free_bytes = (int64_t)1 << 20; free_bytes <= (int64_t)1 << 30; free_bytes *= 2) {
		int64_t room = store_headroom(store_checkpoint_pages(free_bytes), 4096);
		assert_true(room <= free_bytes / 4 || free_bytes >= (int64_t)64 << 20);
		assert_true(room <= (int64_t)9 << 20);
	}
}

/* What the relay may publish, seen from inside the commit. */
struct vis {
	struct store *st;
	int64_t publishable, committed;
	int durable;
};

static void
vis_written(void *arg, int ok)
{
	struct vis *v = arg;

	assert_int_equal(ok, 1);
	v->publishable = store_publishable_seq(v->st);
	v->committed = store_committed_seq(v->st);
}

static void
vis_durable(void *arg, int ok)
{
	((struct vis *)arg)->durable = ok;
}

static int64_t
put_flags(struct fx *f, const char *id, unsigned flags)
{
	struct msg *m = new_msg(id, "commands", "stock.reserve", "{}", 2);
	int64_t seq;

	assert_int_equal(store_outbox_put(f->st, m, 1, flags), STORE_PUT_STORED);
	seq = m->seq;
	msg_free(m);
	return seq;
}

static void
vis_watch(struct fx *f, struct vis *v)
{
	memset(v, 0, sizeof *v);
	v->st = f->st;
	store_on_written(f->st, vis_written, v);
	store_on_commit(f->st, vis_durable, v);
}

static void
vis_wait(struct fx *f, struct vis *v)
{
	turn_until(f, &v->durable);
	assert_int_equal(v->durable, 1);
}

static void
test_publish_early(void **state)
{
	struct fx *f = *state;
	struct vis v;
	int64_t s1, s2, s3, s4, s5;

	store_set_async(f->st);
	/* an early message may go out once written, before its fsync */
	s1 = put_flags(f, "e-1", STORE_OUT_EARLY);
	vis_watch(f, &v);
	vis_wait(f, &v);
	assert_int_equal(v.publishable, s1);
	assert_true(v.committed < s1);
	assert_int_equal(store_publishable_seq(f->st), s1);
	assert_int_equal(store_committed_seq(f->st), s1);

	/* in one transaction with a message that waits, both wait */
	s2 = put_flags(f, "h-2", STORE_OUT_DEDUP);
	s3 = put_flags(f, "e-3", STORE_OUT_EARLY);
	assert_true(s3 > s2);
	vis_watch(f, &v);
	vis_wait(f, &v);
	assert_int_equal(v.publishable, s1);
	assert_int_equal(store_publishable_seq(f->st), s3);

	/* an early message never passes one before it that waits: published
	 * in seq order, it would hold the waiting one back or go out first */
	s4 = put_flags(f, "h-4", 0);
	assert_true(event_base_loop(f->base, EVLOOP_NONBLOCK) >= 0);	/* commit, sync runs */
	s5 = put_flags(f, "e-5", STORE_OUT_EARLY);
	vis_watch(f, &v);
	vis_wait(f, &v);
	assert_true(v.publishable < s4 || v.committed >= s4);
	assert_true(v.publishable == s5 || v.publishable < s4);
	assert_int_equal(store_publishable_seq(f->st), s5);

	/* the synchronous path: publishable is committed */
	s1 = put_flags(f, "e-6", STORE_OUT_EARLY);
	assert_int_equal(store_flush(f->st), 0);
	assert_int_equal(store_publishable_seq(f->st), s1);
	assert_int_equal(store_committed_seq(f->st), s1);
}

/* What a lower-priority event of the same turn sees: the rows committed. */
struct probe {
	struct fx *f;
	int64_t committed_rows;
	int ran;
};

static void
probe_cb(evutil_socket_t fd, short what, void *arg)
{
	struct probe *p = arg;

	(void)fd;
	(void)what;
	p->committed_rows = disk_count(p->f->path);
	p->ran = 1;
}

/*
 * With the syncer idle, a durable write is committed at once (priority 0,
 * which libevent runs before the rest of a lower-priority turn), so that
 * the fsync starts: an event of the end-of-turn commit's priority (2),
 * ready since the same turn as the writes, finds the first one committed.
 * The writes that come while that sync runs wait in the open transaction
 * for its end, and are then committed and synced together.
 */
static void
test_sync_starts_at_once(void **state)
{
	struct fx *f = *state;
	struct counters c = { 0 };
	struct request r[3] = {
		{ f, "soon-a", &c, 0 }, { f, "soon-b", &c, 0 }, { f, "soon-c", &c, 0 }
	};
	struct probe p = { f, -1, 0 };
	struct event *ev[3], *pev;
	int i;

	store_set_async(f->st);
	c.path = f->path;
	requests_ready(f, r, ev);
	pev = event_new(f->base, -1, 0, probe_cb, &p);
	assert_int_equal(event_priority_set(pev, 2), 0);
	event_active(pev, 0, 0);
	for (i = 0; i < 10 && !p.ran; i++)
		assert_true(event_base_loop(f->base, EVLOOP_NONBLOCK) >= 0);
	assert_true(p.ran);
	assert_true(p.committed_rows >= 1);
	for (i = 0; i < 1000 && c.calls < 3; i++) {
		assert_true(event_base_loop(f->base, EVLOOP_NONBLOCK) >= 0);
		usleep(1000);
	}
	assert_int_equal(c.calls, 3);
	assert_int_equal(c.ok, 3);
	assert_int_equal(disk_count(f->path), 3);
	assert_int_equal(store_committed_seq(f->st), r[2].seq);
	for (i = 0; i < 3; i++)
		event_free(ev[i]);
	event_free(pev);
}

static void
test_close_commits_pending(void **state)
{
	struct fx *f = *state;
	struct counters c = { 0 };

	assert_int_equal(put(f, "pending", 1, NULL), STORE_PUT_STORED);
	store_on_commit(f->st, count_cb, &c);
	store_close(f->st);
	f->st = NULL;
	assert_int_equal(c.calls, 1);
	assert_int_equal(c.ok, 1);
	assert_int_equal(disk_count(f->path), 1);
	f->st = open_ok(f, BIG);
	assert_int_equal(store_outbox_count(f->st), 1);
}

int
main(void)
{
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
	const struct CMUnitTest tests[] = {
		T(test_open_creates_schema),
		T(test_reopen_keeps_data),
		T(test_seq_not_reused),
		T(test_second_open_in_use),
		T(test_replica_id),
		T(test_open_not_sqlite),
		T(test_open_newer_schema),
		T(test_open_missing_dir),
		T(test_put_and_duplicate),
		T(test_put_without_dedup),
		T(test_failed_put_leaves_no_id),
		T(test_put_full),
		T(test_fetch_order_and_upto),
		T(test_fetch_body_and_props),
		T(test_retry_due_clear),
		T(test_next_due_is_earliest),
		T(test_done_count_oldest),
		T(test_list),
		T(test_expire_ids),
		T(test_commit_on_flush),
		T(test_commit_at_end_of_loop_turn),
		T(test_group_commit_one_fsync_per_turn),
		T(test_on_commit_without_transaction),
		T(test_callback_starts_new_work),
		T(test_close_commits_pending),
		T(test_written_before_durable),
		T(test_early_jobs),
		T(test_checkpoint_pages),
		T(test_headroom),
		T(test_inbox_in_flight_marks_redelivered),
		T(test_inbox_in_flight_set),
		T(test_inbox_in_flight_migration),
		T(test_publish_early),
		T(test_sync_starts_at_once),
	};
#undef T

	return cmocka_run_group_tests(tests, NULL, NULL);
}
