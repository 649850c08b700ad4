/* Unit tests for src/checkpointer.c: the write-ahead log is copied into
 * the database by another thread while the writer goes on, and restarts
 * from its beginning afterwards. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "checkpointer.h"

struct fx {
	char dir[64], path[96], wal[100];
	sqlite3 *db;
};

static void
exec_ok(sqlite3 *db, const char *sql)
{
	char *err = NULL;
	int rc = sqlite3_exec(db, sql, NULL, NULL, &err);

	if (rc != SQLITE_OK)
		fail_msg("%s: %s", sql, err ? err : "?");
}

static int
setup(void **state)
{
	struct fx *f = calloc(1, sizeof *f);

	snprintf(f->dir, sizeof f->dir, "/tmp/sagad-test-ckpt-XXXXXX");
	assert_non_null(mkdtemp(f->dir));
	snprintf(f->path, sizeof f->path, "%s/s.db", f->dir);
	snprintf(f->wal, sizeof f->wal, "%s-wal", f->path);
	assert_int_equal(sqlite3_open(f->path, &f->db), SQLITE_OK);
	/* As the store: WAL, and no automatic checkpoint in the writer. */
	exec_ok(f->db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
	    "PRAGMA wal_autocheckpoint=0;"
	    "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)");
	*state = f;
	return 0;
}

static int
teardown(void **state)
{
	struct fx *f = *state;

	if (f->db)
		sqlite3_close(f->db);
	unlink(f->wal);
	unlink(f->path);
	{
		char shm[110];
		snprintf(shm, sizeof shm, "%s-shm", f->path);
		unlink(shm);
	}
	rmdir(f->dir);
	free(f);
	return 0;
}

static off_t
size_of(const char *path)
{
	struct stat sb;

	return stat(path, &sb) == 0 ? sb.st_size : -1;
}

/* n commits of one 4 KiB row each: at least n pages in the log. */
static void
write_rows(sqlite3 *db, int n)
{
	sqlite3_stmt *s;
	int i;

	assert_int_equal(sqlite3_prepare_v2(db, "INSERT INTO t(v) VALUES (zeroblob(4000))",
	    -1, &s, NULL), SQLITE_OK);
	for (i = 0; i < n; i++) {
		assert_int_equal(sqlite3_step(s), SQLITE_DONE);
		sqlite3_reset(s);
	}
	sqlite3_finalize(s);
}

static void
wait_count(struct checkpointer *c, unsigned long want)
{
	int i;

	for (i = 0; i < 500 && checkpointer_count(c) < want; i++)
		usleep(10000);
	assert_true(checkpointer_count(c) >= want);
}

static void
test_copies_the_log(void **state)
{
	struct fx *f = *state;
	struct checkpointer *c;
	char *err = NULL;
	off_t db_before, wal_full;
	sqlite3_stmt *s;

	c = checkpointer_new(f->path, &err);
	assert_non_null(c);
	assert_null(err);
	write_rows(f->db, 300);
	db_before = size_of(f->path);
	wal_full = size_of(f->wal);
	assert_true(wal_full > 300 * 4096);
	checkpointer_poke(c);
	wait_count(c, 1);
	/* the rows now live in the database file itself */
	assert_true(size_of(f->path) > db_before + 200 * 4096);
	/* the next commit restarts the log from its beginning: it does not grow */
	write_rows(f->db, 10);
	assert_int_equal(size_of(f->wal), wal_full);
	assert_int_equal(sqlite3_prepare_v2(f->db, "PRAGMA wal_checkpoint(PASSIVE)", -1, &s, NULL),
	    SQLITE_OK);
	assert_int_equal(sqlite3_step(s), SQLITE_ROW);
	/* frames in the log: only those of the 10 new commits (a few pages
	 * each), not the 300 before them */
	assert_true(sqlite3_column_int(s, 1) < 100);
	sqlite3_finalize(s);
	checkpointer_free(c);
	/* and everything is there */
	assert_int_equal(sqlite3_prepare_v2(f->db, "SELECT count(*) FROM t", -1, &s, NULL),
	    SQLITE_OK);
	assert_int_equal(sqlite3_step(s), SQLITE_ROW);
	assert_int_equal(sqlite3_column_int(s, 0), 310);
	sqlite3_finalize(s);
}

/* The writer commits all along while checkpoints run; nothing fails,
 * nothing is lost, and the log stays bounded. */
static void
test_writer_goes_on(void **state)
{
	struct fx *f = *state;
	struct checkpointer *c;
	char *err = NULL;
	sqlite3_stmt *s;
	int round;

	c = checkpointer_new(f->path, &err);
	assert_non_null(c);
	for (round = 0; round < 40; round++) {
		write_rows(f->db, 50);
		checkpointer_poke(c);
	}
	wait_count(c, 2);
	checkpointer_free(c);
	assert_int_equal(sqlite3_prepare_v2(f->db, "SELECT count(*) FROM t", -1, &s, NULL),
	    SQLITE_OK);
	assert_int_equal(sqlite3_step(s), SQLITE_ROW);
	assert_int_equal(sqlite3_column_int(s, 0), 2000);
	sqlite3_finalize(s);
}

static void
test_pokes_coalesce(void **state)
{
	struct fx *f = *state;
	struct checkpointer *c;
	char *err = NULL;
	int i;

	c = checkpointer_new(f->path, &err);
	assert_non_null(c);
	write_rows(f->db, 20);
	for (i = 0; i < 1000; i++)
		checkpointer_poke(c);
	wait_count(c, 1);
	usleep(100000);
	/* a thousand pokes, a handful of checkpoints */
	assert_true(checkpointer_count(c) <= 3);
	checkpointer_free(c);
}

static void
test_missing_database(void **state)
{
	struct fx *f = *state;
	char path[128], *err = NULL;

	snprintf(path, sizeof path, "%s/none/x.db", f->dir);
	assert_null(checkpointer_new(path, &err));
	assert_non_null(err);
	assert_non_null(strstr(err, "checkpoints"));
	free(err);
	/* freeing nothing is fine, so is freeing one that never ran */
	checkpointer_free(NULL);
	{
		struct checkpointer *c = checkpointer_new(f->path, &err);
		assert_non_null(c);
		checkpointer_free(c);
	}
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_copies_the_log, setup, teardown),
		cmocka_unit_test_setup_teardown(test_writer_goes_on, setup, teardown),
		cmocka_unit_test_setup_teardown(test_pokes_coalesce, setup, teardown),
		cmocka_unit_test_setup_teardown(test_missing_database, setup, teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
