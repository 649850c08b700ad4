/* Unit tests for the PostgreSQL saga store's logic (src/saga_store_pgsql.c,
 * src/saga_pgsql.h) without a server: the batch's cache is filled from
 * PGresults built by hand (as the server sends them: text form, bytea as
 * \x hex), the operations are called on a backend set up by the test (the
 * driver is never started), and what they answer and the statements they
 * queue for the commit round trip are checked. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <libpq-fe.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "conf.h"
#include "dedup.h"
#include "msg.h"
#include "props.h"
#include "saga_pgsql.h"
#include "util.h"
#include "xmalloc.h"

#define OPS saga_store_pgsql_ops

/* ---- stderr captured, to see what is logged ---- */

static char logbuf[16384];
static FILE *logtmp;
static int saved_stderr = -1;

static void
log_capture(void)
{
	fflush(stderr);
	logtmp = tmpfile();
	assert_non_null(logtmp);
	saved_stderr = dup(STDERR_FILENO);
	assert_true(saved_stderr >= 0);
	assert_true(dup2(fileno(logtmp), STDERR_FILENO) >= 0);
}

static const char *
log_captured(void)
{
	size_t n;

	fflush(stderr);
	dup2(saved_stderr, STDERR_FILENO);
	close(saved_stderr);
	saved_stderr = -1;
	rewind(logtmp);
	n = fread(logbuf, 1, sizeof logbuf - 1, logtmp);
	logbuf[n] = '\0';
	fclose(logtmp);
	logtmp = NULL;
	return logbuf;
}

/* ---- PGresults by hand ---- */

static PGresult *
result_new(int ncols, const char *const *names)
{
	PGresult *res = PQmakeEmptyPGresult(NULL, PGRES_TUPLES_OK);
	PGresAttDesc att[16];
	int i;

	assert_non_null(res);
	assert_true(ncols <= 16);
	memset(att, 0, sizeof att);
	for (i = 0; i < ncols; i++) {
		att[i].name = (char *)names[i];
		att[i].format = 0;
		att[i].typid = 25;	/* text */
		att[i].typlen = -1;
		att[i].atttypmod = -1;
	}
	assert_int_equal(PQsetResultAttrs(res, ncols, att), 1);
	return res;
}

static void
result_set(PGresult *res, int row, int col, const char *v)
{
	assert_int_equal(PQsetvalue(res, row, col, (char *)v, v ? (int)strlen(v) : -1), 1);
}

/* Columns 0 .. n - 1 of a row, each the next argument (NULL: SQL NULL). */
static void
result_row(PGresult *res, int row, int n, ...)
{
	va_list ap;
	int k;

	va_start(ap, n);
	for (k = 0; k < n; k++)
		result_set(res, row, k, va_arg(ap, const char *));
	va_end(ap);
}

/* bytea in the server's text form: \x then hex; malloc'd */
static char *
hex_bytea(const void *p, size_t len)
{
	const unsigned char *s = p;
	char *out = xmalloc(2 * len + 3), *o = out;
	size_t i;

	*o++ = '\\';
	*o++ = 'x';
	for (i = 0; i < len; i++)
		o += sprintf(o, "%02x", s[i]);
	*o = '\0';
	return out;
}

static const char *const inst_cols[] = {
	"job", "saga", "id", "state", "started_at", "updated_at", "finished_at", "data"
};

/* One instance row at `row` of a result whose instance columns start at 1
 * (column 0 a job index, as the batch's fetch has something before). */
static void
inst_row(PGresult *res, int row, const char *saga, const char *id, int state,
    const void *data, size_t len)
{
	char st[16], *hex = hex_bytea(data, len);

	snprintf(st, sizeof st, "%d", state);
	result_row(res, row, 8, "0", saga, id, st, "100.5", "200.25", "0", hex);
	free(hex);
}

/* ---- the backend ---- */

struct fx {
	struct saga_backend *b;
	struct sagad_conf *conf;
	PGresult *res;		/* the instances fetched */
	struct pgs_job cur;
};

static void
fetched_id(struct saga_backend *b, const char *id)
{
	*XPUSH(b->ids, b->nids, b->capids) = xstrdup(id);
}

static const char data1[] = { 'd', 0, '\\', '"', (char)0xff, 'x' };	/* 6 bytes, a NUL inside */

/* Fetched: order/s1 (state 1, data1), ship/s1 (state 2), order/s2 (state 3);
 * the batch's saga ids: s1, s2, s3 (s3 has no instance). */
static int
setup(void **state)
{
	struct fx *f = xcalloc(1, sizeof *f);
	struct saga_backend *b = xcalloc(1, sizeof *b);

	f->conf = xcalloc(1, sizeof *f->conf);
	f->conf->saga_store.early_window = 60;
	f->conf->store.dedup_window = 3600;
	b->conf = f->conf;
	b->service = xstrdup("orders");
	b->replica = xstrdup("host:1:1000");
	b->queue_tail = &b->queue;
	f->b = b;
	f->res = result_new(8, inst_cols);
	inst_row(f->res, 0, "order", "s1", 1, data1, sizeof data1);
	inst_row(f->res, 1, "ship", "s1", 2, "", 0);
	inst_row(f->res, 2, "order", "s2", 3, "{}", 2);
	fetched_id(b, "s1");
	fetched_id(b, "s2");
	fetched_id(b, "s3");
	*state = f;
	return 0;
}

static void
fill(struct fx *f)
{
	assert_int_equal(pgs_cache_add(f->b, f->res, 0, 1), 1);
	assert_int_equal(pgs_cache_add(f->b, f->res, 1, 1), 2);
	assert_int_equal(pgs_cache_add(f->b, f->res, 2, 1), 3);
}

static int
teardown(void **state)
{
	struct fx *f = *state;

	OPS.close(f->b);	/* frees what the backend holds: valgrind sees leaks */
	PQclear(f->res);
	free(f->conf);
	free(f);
	return 0;
}

/* ---- helpers on the queued statements ---- */

static struct pgs_stmt *
stmt(struct pgs_stmts *a, size_t i)
{
	assert_true(i < a->n);
	return &a->v[i];
}

static void
assert_sql_starts(const struct pgs_stmt *s, const char *prefix)
{
	if (strncmp(s->sql, prefix, strlen(prefix)) != 0)
		fail_msg("statement \"%s\" does not start with \"%s\"", s->sql, prefix);
}

static void
assert_text(const struct pgs_stmt *s, int k, const char *want)
{
	assert_true(k < s->n);
	assert_int_equal(s->fmt[k], 0);
	if (!want) {
		assert_null(s->v[k]);
		return;
	}
	assert_non_null(s->v[k]);
	assert_string_equal(s->v[k], want);
}

/* Parameters from .. from + n - 1 in text form, each the next argument
 * (NULL: SQL NULL). */
static void
assert_texts(const struct pgs_stmt *s, int from, int n, ...)
{
	va_list ap;
	int k;

	va_start(ap, n);
	for (k = from; k < from + n; k++)
		assert_text(s, k, va_arg(ap, const char *));
	va_end(ap);
}

/* The i-th statement of a: its SQL begins with prefix, it has n parameters. */
static struct pgs_stmt *
stmt_is(struct pgs_stmts *a, size_t i, const char *prefix, int n)
{
	struct pgs_stmt *s = stmt(a, i);

	assert_sql_starts(s, prefix);
	assert_int_equal(s->n, n);
	return s;
}

static void
assert_bin(const struct pgs_stmt *s, int k, const void *want, size_t len)
{
	assert_true(k < s->n);
	assert_int_equal(s->fmt[k], 1);
	assert_int_equal(s->len[k], (int)len);
	assert_memory_equal(s->v[k], want, len);
}

static double
text_dbl(const struct pgs_stmt *s, int k)
{
	char *end;
	double v;

	assert_true(k < s->n);
	assert_int_equal(s->fmt[k], 0);
	v = strtod(s->v[k], &end);
	assert_true(*end == '\0' && end != s->v[k]);
	return v;
}

/* What log_capture caught since, with each of the (up to two) words in it. */
static void
assert_logged(const char *w1, const char *w2)
{
	const char *log = log_captured();

	assert_non_null(strstr(log, w1));
	if (w2)
		assert_non_null(strstr(log, w2));
}

/* A due timer claimed by the batch's fetch. */
static void
push_due(struct saga_backend *b, int64_t row, int kind, int step)
{
	struct pgs_due *d = XPUSH(b->dues, b->ndues, b->capdues);

	d->row = row;
	d->kind = kind;
	d->step = step;
}

/* ---- pgs_text_array ---- */

static void
check_array(char *const *v, size_t n, const char *want)
{
	char *s = pgs_text_array(v, n);

	assert_string_equal(s, want);
	free(s);
}

static void
test_text_array(void **state)
{
	char *quote[] = { "a\"b", "c\\d" };
	char *empty[] = { "" , "x" };
	char *punct[] = { "a,b", "{x}", " sp ", "NULL" };
	char *one[] = { "s1" };
	char *nasty[] = { "\\\"\\", "\"\"" };

	(void)state;
	/* What PostgreSQL's array input reads back as the same strings:
	 * every element quoted, " and \ escaped by a backslash. */
	check_array(quote, 2, "{\"a\\\"b\",\"c\\\\d\"}");	/* {"a\"b","c\\d"} */
	check_array(empty, 2, "{\"\",\"x\"}");
	/* quoted, commas and braces are the element's, NULL is a string,
	 * spaces are kept */
	check_array(punct, 4, "{\"a,b\",\"{x}\",\" sp \",\"NULL\"}");
	check_array(one, 1, "{\"s1\"}");
	check_array(NULL, 0, "{}");
	/* worst case of the length: every byte escaped */
	check_array(nasty, 2, "{\"\\\\\\\"\\\\\",\"\\\"\\\"\"}");
}

/* ---- the cache ---- */

static void
test_cache_add(void **state)
{
	struct fx *f = *state;
	struct saga_backend *b = f->b;

	fill(f);
	assert_int_equal(b->ninsts, 3);
	/* the same instance again (a second job of the batch): its handle */
	assert_int_equal(pgs_cache_add(b, f->res, 2, 1), 3);
	assert_int_equal(pgs_cache_add(b, f->res, 0, 1), 1);
	assert_int_equal(b->ninsts, 3);
	/* the record: strings copied, numbers parsed, data unescaped */
	assert_string_equal(b->insts[0].rec.saga, "order");
	assert_string_equal(b->insts[0].rec.id, "s1");
	assert_int_equal(b->insts[0].rec.state, 1);
	assert_true(b->insts[0].rec.started_at == 100.5);
	assert_true(b->insts[0].rec.updated_at == 200.25);
	assert_true(b->insts[0].rec.finished_at == 0);
	assert_int_equal(b->insts[0].rec.data_len, sizeof data1);
	assert_memory_equal(b->insts[0].rec.data, data1, sizeof data1);
	assert_int_equal(b->insts[0].rec.data[sizeof data1], '\0');
	assert_int_equal(b->insts[1].rec.data_len, 0);
	assert_string_equal(b->insts[1].rec.data, "");
	assert_string_equal(b->insts[2].rec.data, "{}");
	/* fetched, not fresh, not changed */
	assert_int_equal(b->insts[0].loaded, 1);
	assert_int_equal(b->insts[2].loaded, 3);
	assert_false(b->insts[0].fresh || b->insts[0].dirty);
	/* the same id under another saga definition is another instance */
	assert_int_equal(b->insts[1].rec.row, 2);
	assert_string_equal(b->insts[1].rec.saga, "ship");
	/* reset: the next batch starts empty */
	pgs_cache_reset(b);
	assert_int_equal(b->ninsts, 0);
	assert_int_equal(b->nids, 0);
	assert_int_equal(pgs_cache_add(b, f->res, 2, 1), 1);
}

/* ---- reads ---- */

static void
test_get(void **state)
{
	struct fx *f = *state;
	struct saga_backend *b = f->b;
	struct saga_rec r;

	fill(f);
	assert_int_equal(OPS.get(b, "order", "s2", &r), 1);
	assert_int_equal(r.row, 3);
	assert_int_equal(r.state, 3);
	assert_string_equal(r.data, "{}");
	/* a copy: changing it changes nothing in the cache */
	r.data[0] = 'X';
	saga_rec_clear(&r);
	assert_string_equal(b->insts[2].rec.data, "{}");
	assert_int_equal(OPS.get(b, "order", "s1", &r), 1);
	assert_memory_equal(r.data, data1, sizeof data1);
	assert_int_equal(r.data_len, sizeof data1);
	saga_rec_clear(&r);
	/* fetched, no instance: absent */
	assert_int_equal(OPS.get(b, "order", "s3", &r), 0);
	assert_int_equal(OPS.get(b, "ship", "s2", &r), 0);
	assert_null(r.saga);
	/* not fetched: an error, not "absent", and said */
	log_capture();
	assert_int_equal(OPS.get(b, "order", "zz", &r), -1);
	assert_logged("did not fetch", "zz");
	assert_null(r.saga);
}

static void
test_get_row(void **state)
{
	struct fx *f = *state;
	struct saga_backend *b = f->b;
	struct saga_rec r;

	fill(f);
	assert_int_equal(OPS.get_row(b, 2, &r), 1);
	assert_string_equal(r.saga, "ship");
	assert_string_equal(r.id, "s1");
	assert_int_equal(r.state, 2);
	assert_int_equal(r.row, 2);
	saga_rec_clear(&r);
	assert_int_equal(OPS.get_row(b, 0, &r), 0);
	assert_int_equal(OPS.get_row(b, 4, &r), 0);
	assert_int_equal(OPS.get_row(b, -1, &r), 0);
	assert_null(r.saga);
}

static void
test_by_id(void **state)
{
	struct fx *f = *state;
	struct saga_backend *b = f->b;
	int64_t rows[4] = { 0 };

	fill(f);
	assert_int_equal(OPS.by_id(b, "s1", rows, 4), 2);
	assert_int_equal(rows[0], 1);
	assert_int_equal(rows[1], 2);
	assert_int_equal(OPS.by_id(b, "s1", rows, 1), 1);	/* max */
	assert_int_equal(OPS.by_id(b, "s2", rows, 4), 1);
	assert_int_equal(rows[0], 3);
	assert_int_equal(OPS.by_id(b, "s3", rows, 4), 0);
	log_capture();
	assert_int_equal(OPS.by_id(b, "nope", rows, 4), 0);
	assert_logged("did not fetch", "nope");
}

/* ---- writes: instances ---- */

static void
test_insert_update_flush(void **state)
{
	struct fx *f = *state;
	struct saga_backend *b = f->b;
	struct saga_rec r, u;
	const char fresh_data[] = { 'n', 0, 'w' };
	struct pgs_stmt *s;

	fill(f);
	/* a fresh instance of a fetched id */
	memset(&r, 0, sizeof r);
	r.saga = "order";
	r.id = "s3";
	r.state = 0;
	r.started_at = 1.25;
	r.updated_at = 1.5;
	r.data = (char *)fresh_data;
	r.data_len = sizeof fresh_data;
	assert_int_equal(OPS.insert(b, &r), 0);
	assert_int_equal(r.row, 4);
	/* now readable in the batch */
	assert_int_equal(OPS.get(b, "order", "s3", &u), 1);
	assert_int_equal(u.row, 4);
	saga_rec_clear(&u);
	/* an id the batch did not fetch: refused */
	r.id = "other";
	log_capture();
	assert_int_equal(OPS.insert(b, &r), -1);
	assert_logged("did not fetch", NULL);
	assert_int_equal(b->ninsts, 4);
	/* a fetched one changed, twice: one UPDATE with the last state */
	assert_int_equal(OPS.get(b, "order", "s2", &u), 1);
	u.state = 4;
	u.updated_at = 300;
	assert_int_equal(OPS.update(b, &u), 0);
	u.state = 5;
	u.updated_at = 301.5;
	u.finished_at = 302;
	free(u.data);
	u.data = xstrdup("{\"a\":1}");
	u.data_len = 7;
	assert_int_equal(OPS.update(b, &u), 0);
	saga_rec_clear(&u);
	/* the fresh one changed before the commit: still one INSERT */
	memset(&u, 0, sizeof u);
	u.row = 4;
	u.state = 1;
	u.updated_at = 2.5;
	u.data = (char *)"z";
	u.data_len = 1;
	assert_int_equal(OPS.update(b, &u), 0);
	/* a handle not of the batch */
	u.row = 9;
	assert_int_equal(OPS.update(b, &u), -1);
	u.row = 0;
	assert_int_equal(OPS.update(b, &u), -1);

	pgs_flush_instances(b);
	assert_int_equal(b->writes.n, 2);	/* order/s1 and ship/s1 unchanged */
	/* cache order: order/s2 (3) before order/s3 (4) */
	s = stmt_is(&b->writes, 0, "UPDATE instances SET", 7);
	assert_texts(s, 0, 4, "orders", "order", "s2", "5");
	assert_true(text_dbl(s, 4) == 301.5);
	assert_true(text_dbl(s, 5) == 302);
	assert_bin(s, 6, "{\"a\":1}", 7);
	s = stmt_is(&b->writes, 1, "INSERT INTO instances", 8);
	assert_texts(s, 0, 4, "orders", "order", "s3", "1");
	assert_true(text_dbl(s, 4) == 1.25);
	assert_true(text_dbl(s, 5) == 2.5);
	assert_true(text_dbl(s, 6) == 0);
	assert_bin(s, 7, "z", 1);
	/* flushed: nothing more the next time */
	pgs_flush_instances(b);
	assert_int_equal(b->writes.n, 2);
	/* changed again after a flush: an UPDATE now, not a second INSERT */
	u.row = 4;
	u.state = 2;
	assert_int_equal(OPS.update(b, &u), 0);
	pgs_flush_instances(b);
	assert_int_equal(b->writes.n, 3);
	assert_texts(stmt_is(&b->writes, 2, "UPDATE instances SET", 7), 2, 2, "s3", "2");
}

/* Precision: a time goes out as it is (%.17g), not rounded. */
static void
test_params(void **state)
{
	struct fx *f = *state;
	struct pgs_stmts a = { 0 };
	struct pgs_stmt *s = pgs_stmt_add(&a, "X");
	double t = 1733390000.123456789;
	int k;

	(void)f;
	pgs_param_dbl(s, t);
	pgs_param_int(s, INT64_C(-9007199254740993));
	pgs_param(s, NULL);
	pgs_param_bin(s, "", 0);
	assert_true(strtod(s->v[0], NULL) == t);
	assert_string_equal(s->v[1], "-9007199254740993");
	assert_null(s->v[2]);
	assert_int_equal(s->fmt[3], 1);
	assert_int_equal(s->len[3], 0);
	assert_non_null(s->v[3]);
	/* at most PGS_MAXPARAM: more are refused and said */
	for (k = s->n; k < PGS_MAXPARAM; k++)
		pgs_param(s, "p");
	log_capture();
	pgs_param(s, "over");
	assert_logged("too many parameters", NULL);
	assert_int_equal(s->n, PGS_MAXPARAM);
	pgs_stmts_clear(&a);
	assert_int_equal(a.n, 0);
	free(a.v);
}

/* ---- history, timers ---- */

static void
test_log_stmt(void **state)
{
	struct fx *f = *state;
	struct saga_backend *b = f->b;
	struct pgs_stmt *s;

	fill(f);
	assert_int_equal(OPS.log(b, 2, 12.5, "out", "command", "pack", "m-1", ""), 0);
	assert_int_equal(b->writes.n, 1);
	s = stmt_is(&b->writes, 0, "INSERT INTO history", 9);
	assert_texts(s, 0, 3, "orders", "ship", "s1");
	assert_true(text_dbl(s, 3) == 12.5);
	assert_texts(s, 4, 5, "out", "command", "pack", "m-1", "");
	assert_int_equal(OPS.log(b, 7, 1, "in", "x", "", "", ""), -1);
	assert_int_equal(b->writes.n, 1);
}

static void
test_timer_stmts(void **state)
{
	struct fx *f = *state;
	struct saga_backend *b = f->b;
	struct pgs_stmt *s;

	fill(f);
	assert_int_equal(OPS.timer_set(b, 1, 2, 3, 99.75), 0);
	assert_int_equal(OPS.timer_del(b, 3, 1, 0), 0);
	assert_int_equal(OPS.timer_del_all(b, 2), 0);
	assert_int_equal(b->writes.n, 3);
	s = stmt_is(&b->writes, 0, "INSERT INTO timers", 6);
	assert_non_null(strstr(s->sql, "ON CONFLICT"));
	assert_texts(s, 0, 5, "orders", "order", "s1", "2", "3");
	assert_true(text_dbl(s, 5) == 99.75);
	assert_texts(stmt_is(&b->writes, 1, "DELETE FROM timers", 5), 1, 4, "order", "s2", "1", "0");
	s = stmt_is(&b->writes, 2, "DELETE FROM timers", 3);
	assert_null(strstr(s->sql, "kind"));
	assert_texts(s, 1, 2, "ship", "s1");
	/* rows not of the batch */
	assert_int_equal(OPS.timer_set(b, 0, 1, 1, 1), -1);
	assert_int_equal(OPS.timer_del(b, 4, 1, 1), -1);
	assert_int_equal(OPS.timer_del_all(b, 5), -1);
	assert_int_equal(b->writes.n, 3);
	/* a claimed due timer spent: its own row deleted */
	push_due(b, 3, 4, 1);
	push_due(b, 1, 5, 2);
	assert_int_equal(OPS.timer_spent(b, 2), 0);
	assert_int_equal(b->writes.n, 4);
	assert_texts(stmt_is(&b->writes, 3, "DELETE FROM timers", 5), 1, 4, "order", "s1", "5", "2");
	assert_int_equal(OPS.timer_spent(b, 0), -1);
	assert_int_equal(OPS.timer_spent(b, 3), -1);
	assert_int_equal(b->writes.n, 4);
	/* every replica looks once a second */
	assert_true(OPS.timer_next(b) > util_now() + 0.5);
	assert_true(OPS.timer_next(b) < util_now() + 1.5);
}

static void
assert_due(const struct saga_due *d, int64_t id, int64_t row, int kind, int step)
{
	assert_int_equal(d->id, id);
	assert_int_equal(d->row, row);
	assert_int_equal(d->kind, kind);
	assert_int_equal(d->step, step);
}

static void
test_timers_due_only_for_timer_job(void **state)
{
	struct fx *f = *state;
	struct saga_backend *b = f->b;
	struct saga_due out[4];

	fill(f);
	push_due(b, 3, 4, 1);
	push_due(b, 1, 5, 2);
	/* no job running, or a job that did not ask: nothing */
	assert_int_equal(OPS.timers_due(b, util_now(), out, 4), 0);
	memset(&f->cur, 0, sizeof f->cur);
	b->cur = &f->cur;
	f->cur.j.want = SAGA_WANT_HISTORY;
	assert_int_equal(OPS.timers_due(b, util_now(), out, 4), 0);
	f->cur.j.want = SAGA_WANT_TIMERS | SAGA_WANT_HISTORY;
	assert_int_equal(OPS.timers_due(b, util_now(), out, 4), 2);
	assert_due(&out[0], 1, 3, 4, 1);
	assert_due(&out[1], 2, 1, 5, 2);
	assert_int_equal(OPS.timers_due(b, util_now(), out, 1), 1);
	b->cur = NULL;
}

/* ---- counts ---- */

struct counted {
	char saga[16];
	int state;
	int64_t n;
};

static struct counted counted[16];
static size_t ncounted;

static void
count_cb(void *arg, const struct saga_rec *r)
{
	(void)arg;
	assert_true(ncounted < 16);
	snprintf(counted[ncounted].saga, sizeof counted[ncounted].saga, "%s", r->saga);
	counted[ncounted].state = r->state;
	counted[ncounted].n = r->row;
	ncounted++;
}

#define NOT_REPORTED INT64_MIN

/* The count of (saga, state), NOT_REPORTED if absent; fails if reported twice. */
static int64_t
count_of(struct saga_backend *b, const char *saga, int state)
{
	int64_t n = NOT_REPORTED;
	size_t i;

	ncounted = 0;
	assert_int_equal(OPS.counts(b, count_cb, NULL), 0);
	for (i = 0; i < ncounted; i++)
		if (strcmp(counted[i].saga, saga) == 0 && counted[i].state == state) {
			assert_true(n == NOT_REPORTED);
			n = counted[i].n;
		}
	return n;
}

static PGresult *
counts_result(const char *o1, const char *o3)
{
	static const char *const cols[] = { "saga", "state", "n" };
	PGresult *res = result_new(3, cols);

	result_row(res, 0, 3, "order", "1", o1);
	result_row(res, 1, 3, "order", "3", o3);
	return res;
}

static void
test_counts(void **state)
{
	struct fx *f = *state;
	struct saga_backend *b = f->b;
	struct saga_rec r;

	/* nothing fetched yet, nothing changed: nothing */
	ncounted = 0;
	assert_int_equal(OPS.counts(b, count_cb, NULL), 0);
	assert_int_equal(ncounted, 0);
	pgs_counts_fetched(b, counts_result("5", "2"));
	assert_int_equal(count_of(b, "order", 1), 5);
	assert_int_equal(count_of(b, "order", 3), 2);
	fill(f);
	/* order/s1: 1 -> 3, a fresh order/s3 in state 1, ship/s1 2 -> 4 */
	assert_int_equal(OPS.get(b, "order", "s1", &r), 1);
	r.state = 3;
	assert_int_equal(OPS.update(b, &r), 0);
	saga_rec_clear(&r);
	memset(&r, 0, sizeof r);
	r.saga = "order";
	r.id = "s3";
	r.state = 1;
	r.data = (char *)"";
	assert_int_equal(OPS.insert(b, &r), 0);
	assert_int_equal(OPS.get_row(b, 2, &r), 1);
	r.state = 4;
	assert_int_equal(OPS.update(b, &r), 0);
	saga_rec_clear(&r);
	/* not committed yet: not counted */
	assert_int_equal(count_of(b, "order", 1), 5);
	assert_int_equal(count_of(b, "order", 3), 2);
	pgs_flush_instances(b);
	pgs_counts_commit(b);
	assert_int_equal(count_of(b, "order", 1), 5);	/* -1 +1 */
	assert_int_equal(count_of(b, "order", 3), 3);
	/* not in the refresh: the delta alone, never below zero (another
	 * replica moved it since the count) */
	assert_int_equal(count_of(b, "ship", 2), 0);
	assert_true(count_of(b, "nosuch", 1) == NOT_REPORTED);
	assert_int_equal(count_of(b, "ship", 4), 1);
	/* a second commit of the same batch counts nothing twice */
	pgs_counts_commit(b);
	assert_int_equal(count_of(b, "order", 3), 3);
	assert_int_equal(count_of(b, "ship", 4), 1);
	/* a refresh: the store's numbers, the deltas start again */
	pgs_counts_fetched(b, counts_result("7", "4"));
	assert_int_equal(count_of(b, "order", 1), 7);
	assert_int_equal(count_of(b, "order", 3), 4);
	assert_int_equal(count_of(b, "ship", 4), 0);
	assert_int_equal(count_of(b, "ship", 2), 0);
	/* a change after the refresh counts on top of it */
	assert_int_equal(OPS.get(b, "order", "s2", &r), 1);
	r.state = 1;
	assert_int_equal(OPS.update(b, &r), 0);
	saga_rec_clear(&r);
	pgs_counts_commit(b);
	assert_int_equal(count_of(b, "order", 1), 8);
	assert_int_equal(count_of(b, "order", 3), 3);
}

/* ---- the outbox ---- */

static void
test_send(void **state)
{
	struct fx *f = *state;
	struct saga_backend *b = f->b;
	struct msg m;
	struct pgs_stmt *s;
	struct props back;
	double before = util_now();

	memset(&m, 0, sizeof m);
	m.seq = 42;
	m.message_id = "out-1";
	m.exchange = "commands";
	m.routing_key = "stock.reserve";
	m.props.correlation_id = "s1";
	m.props.content_type = "application/json";
	m.body = "{\"x\":\0}";
	m.body_len = 7;
	assert_int_equal(OPS.send(b, &m, 0), 0);
	assert_int_equal(m.seq, 0);
	assert_int_equal(b->writes.n, 1);
	/* a copy kept for the relay, with the INSERT's index for its seq */
	assert_int_equal(b->nhands, 1);
	assert_int_equal(b->hands[0].stmt, 0);
	assert_ptr_not_equal(b->hands[0].m->body, m.body);
	assert_string_equal(b->hands[0].m->message_id, "out-1");
	assert_string_equal(b->hands[0].m->props.correlation_id, "s1");
	assert_memory_equal(b->hands[0].m->body, "{\"x\":\0}", 7);
	s = stmt_is(&b->writes, 0, "WITH c AS (SELECT EXISTS (SELECT 1 FROM outbox o", 9);
	assert_texts(s, 0, 4, "orders", "out-1", "commands", "stock.reserve");
	assert_int_equal(s->fmt[4], 1);
	memset(&back, 0, sizeof back);
	assert_int_equal(props_unpack(s->v[4], (size_t)s->len[4], &back), 0);
	assert_string_equal(back.content_type, "application/json");
	assert_string_equal(back.correlation_id, "s1");
	props_free(&back);
	assert_bin(s, 5, "{\"x\":\0}", 7);
	assert_text(s, 6, "s1");
	assert_true(text_dbl(s, 7) >= before && text_dbl(s, 7) <= util_now());
	assert_text(s, 8, "host:1:1000");	/* claimed by this replica */
	/* unless an earlier row of the saga is not this replica's */
	assert_non_null(strstr(s->sql, "claimed_by IS DISTINCT FROM $9"));
	assert_non_null(strstr(s->sql, "RETURNING seq, claimed_by IS NOT NULL"));
	assert_non_null(strstr(s->sql, "AS alone"));
	pgs_hands_free(b);
	assert_int_equal(b->nhands, 0);
}

/* A reply: the saga's rows up to its command's are deleted in the batch,
 * never waiting for a relay's lock on one of them. */
static void
test_delivered(void **state)
{
	struct fx *f = *state;
	struct pgs_stmt *s;

	OPS.delivered(f->b, "s1", "s1:order:pay:command");
	s = stmt_is(&f->b->writes, 0, "DELETE FROM outbox WHERE service = $1 AND saga_id = $2", 3);
	assert_texts(s, 0, 3, "orders", "s1", "s1:order:pay:command");
	assert_non_null(strstr(s->sql, "seq <= (SELECT min(seq) FROM outbox"));
	assert_non_null(strstr(s->sql, "FOR UPDATE SKIP LOCKED"));
}

/* ---- early events ---- */

static struct {
	unsigned n;
	char ids[8][32];
	char ctype[8][32];
	char hdr[8][32];
	size_t body_len[8];
	char body[8][16];
} early_seen;

static void
early_cb(void *arg, const struct msg *m)
{
	unsigned i = early_seen.n++;
	const char *h;

	(void)arg;
	assert_true(i < 8);
	snprintf(early_seen.ids[i], 32, "%s", m->message_id);
	snprintf(early_seen.ctype[i], 32, "%s", m->props.content_type ? m->props.content_type : "-");
	h = props_get_header(&m->props, "x-trace");
	snprintf(early_seen.hdr[i], 32, "%s", h ? h : "-");
	early_seen.body_len[i] = m->body_len;
	assert_true(m->body_len < 16);
	memcpy(early_seen.body[i], m->body, m->body_len);
	assert_int_equal(m->body[m->body_len], '\0');
}

/* The columns of PGS_EARLY_COLUMNS. */
static const char *const early_cols[] = {
	"saga_id", "message_id", "exchange", "routing_key", "props", "body", "saga"
};

static void
early_row_of(PGresult *res, int row, const char *saga, const char *saga_id, const char *mid,
    const char *props_hex, const void *body, size_t blen)
{
	char *hex = hex_bytea(body, blen);

	result_row(res, row, 7, saga_id, mid, "events", "packed", props_hex, hex, saga);
	free(hex);
}

static void
early_row(PGresult *res, int row, const char *saga_id, const char *mid, const char *props_hex,
    const void *body, size_t blen)
{
	early_row_of(res, row, "pay", saga_id, mid, props_hex, body, blen);
}

static void
test_early(void **state)
{
	struct fx *f = *state;
	struct saga_backend *b = f->b;
	struct msg m;
	struct pgs_stmt *s;
	char *packed = NULL, *phex;
	size_t plen = 0;

	/* kept: an INSERT of the message, its props packed */
	memset(&m, 0, sizeof m);
	m.message_id = "e-1";
	m.exchange = "events";
	m.routing_key = "packed";
	m.props.content_type = xstrdup("application/json");
	props_set_header(&m.props, "x-trace", "t-9");
	m.body = "b\0dy";
	m.body_len = 4;
	assert_int_equal(OPS.keep_early(b, &m, "pay", "s9"), 0);
	assert_int_equal(b->writes.n, 1);
	s = stmt_is(&b->writes, 0, "INSERT INTO early", 9);
	assert_texts(s, 0, 5, "orders", "s9", "e-1", "events", "packed");
	assert_int_equal(props_pack(&m.props, &packed, &plen), 0);
	assert_bin(s, 5, packed, plen);
	assert_bin(s, 6, "b\0dy", 4);
	assert_true(fabs(text_dbl(s, 7) - util_now()) < 5);
	assert_text(s, 8, "pay");
	props_free(&m.props);
	pgs_stmts_clear(&b->writes);

	/* fetched for the batch: two for s1, one for s2, one damaged for s1 */
	phex = hex_bytea(packed, plen);
	b->early = result_new(7, early_cols);
	early_row(b->early, 0, "s1", "e-a", phex, "A\0", 2);
	early_row(b->early, 1, "s2", "e-b", phex, "B", 1);
	early_row(b->early, 2, "s1", "e-c", phex, "", 0);
	early_row(b->early, 3, "s1", "e-bad", "\\x00ff", "x", 1);
	b->early_taken = xcalloc(4, 1);
	free(phex);
	free(packed);

	memset(&early_seen, 0, sizeof early_seen);
	log_capture();
	OPS.early_each(b, "pay", "s1", early_cb, NULL);
	/* the damaged one: said, dropped (deleted too) */
	assert_logged("damaged early event", "e-bad");
	assert_int_equal(early_seen.n, 2);
	assert_string_equal(early_seen.ids[0], "e-a");
	assert_string_equal(early_seen.ids[1], "e-c");
	assert_string_equal(early_seen.ctype[0], "application/json");
	assert_string_equal(early_seen.hdr[0], "t-9");
	assert_string_equal(early_seen.hdr[1], "t-9");
	assert_int_equal(early_seen.body_len[0], 2);
	assert_memory_equal(early_seen.body[0], "A\0", 2);
	assert_int_equal(early_seen.body_len[1], 0);
	assert_int_equal(b->writes.n, 3);
	assert_texts(stmt_is(&b->writes, 0, "DELETE FROM early", 4), 0, 4, "orders", "s1", "e-a",
	    "pay");
	assert_text(stmt(&b->writes, 1), 2, "e-c");
	assert_text(stmt(&b->writes, 2), 2, "e-bad");
	/* each handed once: the second start of s1 in the batch gets nothing */
	OPS.early_each(b, "pay", "s1", early_cb, NULL);
	assert_int_equal(early_seen.n, 2);
	assert_int_equal(b->writes.n, 3);
	OPS.early_each(b, "pay", "s2", early_cb, NULL);
	assert_int_equal(early_seen.n, 3);
	assert_string_equal(early_seen.ids[2], "e-b");
	assert_int_equal(b->writes.n, 4);
	assert_text(stmt(&b->writes, 3), 1, "s2");
	OPS.early_each(b, "pay", "s3", early_cb, NULL);
	assert_int_equal(early_seen.n, 3);
	assert_int_equal(b->writes.n, 4);
	/* s9 was kept by an earlier job of this batch (above): its start in
	 * the same batch gets it too, once, its DELETE after the INSERT */
	OPS.early_each(b, "pay", "s9", early_cb, NULL);
	assert_int_equal(early_seen.n, 4);
	assert_string_equal(early_seen.ids[3], "e-1");
	assert_string_equal(early_seen.hdr[3], "t-9");
	assert_int_equal(early_seen.body_len[3], 4);
	assert_memory_equal(early_seen.body[3], "b\0dy", 4);
	assert_int_equal(b->writes.n, 5);
	assert_text(stmt_is(&b->writes, 4, "DELETE FROM early", 4), 2, "e-1");
	OPS.early_each(b, "pay", "s9", early_cb, NULL);
	assert_int_equal(early_seen.n, 4);
	/* the cache reset forgets them */
	pgs_cache_reset(b);
	assert_int_equal(b->nearly_new, 0);
	assert_null(b->early);
}

/* An event that matches two definitions is kept for each; each start
 * gets the one kept for its definition, once; one that matches two steps
 * of one definition is kept once. */
static void
test_early_per_definition(void **state)
{
	struct fx *f = *state;
	struct saga_backend *b = f->b;
	struct msg m;
	char *packed = NULL, *phex;
	size_t plen = 0;

	memset(&m, 0, sizeof m);
	m.message_id = "e-1";
	m.exchange = "events";
	m.routing_key = "paid";
	m.body = "x";
	m.body_len = 1;
	assert_int_equal(OPS.keep_early(b, &m, "pay", "s1"), 0);
	assert_int_equal(OPS.keep_early(b, &m, "ship", "s1"), 0);
	assert_int_equal(OPS.keep_early(b, &m, "pay", "s1"), 0);	/* a second step */
	assert_int_equal(b->writes.n, 2);
	assert_int_equal(b->nearly_new, 2);
	assert_text(stmt(&b->writes, 0), 8, "pay");
	assert_text(stmt(&b->writes, 1), 8, "ship");

	memset(&early_seen, 0, sizeof early_seen);
	OPS.early_each(b, "pay", "s1", early_cb, NULL);
	assert_int_equal(early_seen.n, 1);
	assert_int_equal(b->writes.n, 3);
	assert_sql_starts(stmt(&b->writes, 2), "DELETE FROM early");
	assert_text(stmt(&b->writes, 2), 3, "pay");
	OPS.early_each(b, "pay", "s1", early_cb, NULL);
	assert_int_equal(early_seen.n, 1);
	OPS.early_each(b, "ship", "s1", early_cb, NULL);
	assert_int_equal(early_seen.n, 2);
	assert_text(stmt(&b->writes, 3), 3, "ship");
	OPS.early_each(b, "ship", "s1", early_cb, NULL);
	assert_int_equal(early_seen.n, 2);
	assert_int_equal(b->writes.n, 4);

	/* fetched: the same message for both, and one kept before the
	 * column (saga ''), which the first start takes */
	assert_int_equal(props_pack(&m.props, &packed, &plen), 0);
	phex = hex_bytea(packed, plen);
	b->early = result_new(7, early_cols);
	early_row_of(b->early, 0, "ship", "s2", "e-2", phex, "S", 1);
	early_row_of(b->early, 1, "pay", "s2", "e-2", phex, "P", 1);
	early_row_of(b->early, 2, "", "s2", "e-old", phex, "O", 1);
	b->early_taken = xcalloc(3, 1);
	free(phex);
	free(packed);
	memset(&early_seen, 0, sizeof early_seen);
	OPS.early_each(b, "pay", "s2", early_cb, NULL);
	assert_int_equal(early_seen.n, 2);
	assert_memory_equal(early_seen.body[0], "P", 1);
	assert_string_equal(early_seen.ids[1], "e-old");
	assert_text(stmt(&b->writes, 4), 3, "pay");
	assert_text(stmt(&b->writes, 5), 3, "");
	OPS.early_each(b, "ship", "s2", early_cb, NULL);
	assert_int_equal(early_seen.n, 3);
	assert_memory_equal(early_seen.body[2], "S", 1);
	assert_text(stmt(&b->writes, 6), 3, "ship");
	OPS.early_each(b, "ship", "s2", early_cb, NULL);
	assert_int_equal(early_seen.n, 3);
}

/* A callback that keeps the event again while it is applied (as the
 * engine did for the event's other definition): the start applies what
 * was kept before it, and stops. */
static struct saga_backend *early_again_b;
static unsigned early_again_n;

static void
early_again_cb(void *arg, const struct msg *m)
{
	(void)arg;
	assert_true(++early_again_n < 4);	/* before the fix: for ever */
	assert_int_equal(OPS.keep_early(early_again_b, m, "pay", "s1"), 0);
}

static void
test_early_no_loop(void **state)
{
	struct fx *f = *state;
	struct saga_backend *b = f->b;
	struct msg m;

	memset(&m, 0, sizeof m);
	m.message_id = "e-1";
	m.exchange = "events";
	m.routing_key = "paid";
	m.body = "x";
	m.body_len = 1;
	assert_int_equal(OPS.keep_early(b, &m, "pay", "s1"), 0);
	early_again_b = b;
	early_again_n = 0;
	OPS.early_each(b, "pay", "s1", early_again_cb, NULL);
	assert_int_equal(early_again_n, 1);
	/* kept again after the start: an INSERT after its DELETE */
	assert_int_equal(b->nearly_new, 2);
	assert_int_equal(b->writes.n, 3);
	assert_sql_starts(stmt(&b->writes, 2), "INSERT INTO early");
}

/* Consumed ids in one order for every replica (no 40P01 between two
 * batches with overlapping ids); dedup's claims as pairs. */
static void
test_sort_ids(void **state)
{
	char *v[] = { "m-3", "m-1", "m-20", "m-1", "m-2" };
	char *subs[] = { "b", "a", "b", "a", "a" };
	char *ids[] = { "m-1", "m-9", "m-0", "m-2", "m-9" };
	char *arr;

	(void)state;
	pgs_sort_ids(v, 5);
	assert_string_equal(v[0], "m-1");
	assert_string_equal(v[1], "m-1");
	assert_string_equal(v[2], "m-2");
	assert_string_equal(v[3], "m-20");
	assert_string_equal(v[4], "m-3");
	arr = pgs_text_array(v, 5);
	assert_string_equal(arr, "{\"m-1\",\"m-1\",\"m-2\",\"m-20\",\"m-3\"}");
	free(arr);
	pgs_sort_ids(v, 0);
	dedup_sort(subs, ids, 5);
	assert_string_equal(subs[0], "a");
	assert_string_equal(ids[0], "m-2");
	assert_string_equal(subs[1], "a");
	assert_string_equal(ids[1], "m-9");
	assert_string_equal(subs[2], "a");
	assert_string_equal(ids[2], "m-9");
	assert_string_equal(subs[3], "b");
	assert_string_equal(ids[3], "m-0");
	assert_string_equal(subs[4], "b");
	assert_string_equal(ids[4], "m-1");
}

/* ---- retention ---- */

static void
test_expire_rate_limited(void **state)
{
	struct fx *f = *state;
	struct saga_backend *b = f->b;
	struct pgs_stmt *s;
	double now = util_now();

	assert_int_equal(OPS.expire(b, 1000.5, (1u << 3) | (1u << 4) | (1u << 6), 50, NULL, NULL), 0);
	assert_int_equal(b->writes.n, 0);	/* loose: for the next batch */
	assert_int_equal(b->loose.n, 3);
	s = stmt(&b->loose, 0);
	assert_non_null(strstr(s->sql, "DELETE FROM instances"));
	assert_int_equal(s->n, 4);
	assert_text(s, 0, "orders");
	assert_true(text_dbl(s, 1) == 1000.5);
	assert_text(s, 2, "{3,4,6}");
	assert_text(s, 3, "50");
	s = stmt(&b->loose, 1);
	assert_sql_starts(s, "DELETE FROM early");
	assert_true(fabs(text_dbl(s, 1) - (now - 60)) < 2);	/* early_window */
	s = stmt(&b->loose, 2);
	assert_sql_starts(s, "DELETE FROM consumed");
	assert_true(fabs(text_dbl(s, 1) - (now - 3600)) < 2);	/* dedup_window */
	/* asked again within 10 s (the engine asks every second): nothing */
	assert_int_equal(OPS.expire(b, 1001, 1u << 3, 50, NULL, NULL), 0);
	assert_int_equal(b->loose.n, 3);
	assert_true(b->expire_at >= now + 9 && b->expire_at <= util_now() + 10);
	/* ten seconds on */
	b->expire_at = util_now() - 0.001;
	assert_int_equal(OPS.expire(b, 1001, 1u << 0, 1, NULL, NULL), 0);
	assert_int_equal(b->loose.n, 6);
	assert_text(stmt(&b->loose, 3), 2, "{0}");
}

/* Any set of states makes a whole int[] literal (its buffer is sized for
 * every bit the loop looks at). */
static void
test_expire_all_states(void **state)
{
	struct fx *f = *state;
	struct saga_backend *b = f->b;
	char want[128] = "{";
	int k;

	for (k = 0; k < 31; k++)
		snprintf(want + strlen(want), sizeof want - strlen(want), "%s%d", k ? "," : "", k);
	strcat(want, "}");
	assert_int_equal(OPS.expire(b, 1, 0x7fffffffu, 10, NULL, NULL), 0);
	assert_int_equal(b->loose.n, 3);
	assert_text(stmt(&b->loose, 0), 2, want);
}

/* ---- history and list answered from the batch ---- */

struct hseen {
	unsigned n;
	char what[4][16];
};

static void
hist_cb(void *arg, const struct saga_hist *h)
{
	struct hseen *hs = arg;

	assert_true(hs->n < 4);
	snprintf(hs->what[hs->n++], 16, "%s", h->what);
}

static void
rec_cb(void *arg, const struct saga_rec *r)
{
	unsigned *n = arg;

	assert_string_equal(r->id, *n ? "s2" : "s1");
	(*n)++;
}

static void
test_history_and_list(void **state)
{
	static const char *const cols[] = {
		"saga", "id", "at", "dir", "what", "step", "message_id", "detail"
	};
	struct fx *f = *state;
	struct saga_backend *b = f->b;
	struct hseen hs = { 0 };
	unsigned n = 0;
	int i;

	fill(f);
	assert_int_equal(OPS.history(b, 1, hist_cb, &hs), -1);	/* not asked for */
	b->history = result_new(8, cols);
	for (i = 0; i < 3; i++)
		result_row(b->history, i, 8, i == 1 ? "ship" : "order", "s1", "1.5", "in",
		    i == 0 ? "started" : i == 1 ? "other" : "step", "", "", "");
	assert_int_equal(OPS.history(b, 1, hist_cb, &hs), 0);
	assert_int_equal(hs.n, 2);
	assert_string_equal(hs.what[0], "started");
	assert_string_equal(hs.what[1], "step");
	assert_int_equal(OPS.history(b, 9, hist_cb, &hs), -1);

	/* list: the running job's own rows, columns from 0 */
	struct saga_list_page page = { NULL, -1, 10, 0, NULL, NULL };

	assert_int_equal(OPS.list(b, &page, rec_cb, &n), -1);
	memset(&f->cur, 0, sizeof f->cur);
	b->cur = &f->cur;
	assert_int_equal(OPS.list(b, &page, rec_cb, &n), -1);
	f->cur.list = result_new(7, inst_cols + 1);
	for (i = 0; i < 2; i++)
		result_row(f->cur.list, i, 7, "order", i ? "s2" : "s1", "1", "1", "1", "0",
		    "\\x7b7d");
	assert_int_equal(OPS.list(b, &page, rec_cb, &n), 0);
	assert_int_equal(n, 2);
	PQclear(f->cur.list);
	b->cur = NULL;
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_text_array),
		cmocka_unit_test_setup_teardown(test_cache_add, setup, teardown),
		cmocka_unit_test_setup_teardown(test_get, setup, teardown),
		cmocka_unit_test_setup_teardown(test_get_row, setup, teardown),
		cmocka_unit_test_setup_teardown(test_by_id, setup, teardown),
		cmocka_unit_test_setup_teardown(test_insert_update_flush, setup, teardown),
		cmocka_unit_test_setup_teardown(test_params, setup, teardown),
		cmocka_unit_test_setup_teardown(test_log_stmt, setup, teardown),
		cmocka_unit_test_setup_teardown(test_timer_stmts, setup, teardown),
		cmocka_unit_test_setup_teardown(test_timers_due_only_for_timer_job, setup, teardown),
		cmocka_unit_test_setup_teardown(test_counts, setup, teardown),
		cmocka_unit_test_setup_teardown(test_send, setup, teardown),
		cmocka_unit_test_setup_teardown(test_delivered, setup, teardown),
		cmocka_unit_test_setup_teardown(test_early, setup, teardown),
		cmocka_unit_test_setup_teardown(test_early_per_definition, setup, teardown),
		cmocka_unit_test_setup_teardown(test_early_no_loop, setup, teardown),
		cmocka_unit_test(test_sort_ids),
		cmocka_unit_test_setup_teardown(test_expire_rate_limited, setup, teardown),
		cmocka_unit_test_setup_teardown(test_expire_all_states, setup, teardown),
		cmocka_unit_test_setup_teardown(test_history_and_list, setup, teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
