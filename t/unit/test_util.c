/* Unit tests for src/util.c: ids, backoff, names, secrets. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "util.h"


/* ---- util_u64_dec ---- */

static void
test_u64_dec(void **state)
{
	static const uint64_t v[] = { 0, 7, 10, 99, 1234567890123ULL, UINT64_MAX };
	char out[20], want[32];
	size_t i, n;

	(void)state;
	for (i = 0; i < sizeof v / sizeof v[0]; i++) {
		n = util_u64_dec(v[i], out);
		snprintf(want, sizeof want, "%llu", (unsigned long long)v[i]);
		assert_int_equal(n, strlen(want));
		assert_memory_equal(out, want, n);
	}
}

/* ---- util_uuid7 ---- */

static void
check_uuid7_format(const char *u)
{
	size_t i;

	assert_int_equal(strlen(u), 36);
	for (i = 0; i < 36; i++) {
		if (i == 8 || i == 13 || i == 18 || i == 23)
			assert_int_equal(u[i], '-');
		else
			assert_true(isxdigit((unsigned char)u[i]) &&
			    !isupper((unsigned char)u[i]));
	}
	assert_int_equal(u[14], '7');			/* version */
	assert_non_null(strchr("89ab", u[19]));		/* RFC 9562 variant */
}

static void
test_uuid7_format(void **state)
{
	char u[37];
	int i;

	(void)state;
	for (i = 0; i < 100; i++) {
		memset(u, 'Z', sizeof u);
		util_uuid7(u);
		check_uuid7_format(u);
	}
}

static void
test_uuid7_timestamp_is_now(void **state)
{
	char u[37], hex[13];
	struct timespec ts;
	uint64_t ms, now;

	(void)state;
	util_uuid7(u);
	memcpy(hex, u, 8);
	memcpy(hex + 8, u + 9, 4);
	hex[12] = '\0';
	ms = strtoull(hex, NULL, 16);
	clock_gettime(CLOCK_REALTIME, &ts);
	now = (uint64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
	/* The 48-bit prefix is the Unix time in ms (a few ms of lead are
	 * allowed: a burst of ids may borrow from the next milliseconds). */
	assert_true(ms + 5000 >= now);
	assert_true(ms <= now + 5000);
}

static void
test_uuid7_strictly_increasing(void **state)
{
	char prev[37], cur[37];
	int i;

	(void)state;
	util_uuid7(prev);
	for (i = 0; i < 10000; i++) {
		util_uuid7(cur);
		check_uuid7_format(cur);
		if (strcmp(prev, cur) >= 0)
			fail_msg("uuid7 not increasing at %d: %s then %s", i, prev, cur);
		memcpy(prev, cur, sizeof cur);
	}
}

/* ---- util_backoff ---- */

static void
check_backoff_range(double initial, double max, unsigned attempt, double lo,
    double hi)
{
	double mn = 1e300, mx = -1e300;
	int i;

	for (i = 0; i < 2000; i++) {
		double v = util_backoff(initial, max, attempt);
		if (v < lo || v > hi)
			fail_msg("backoff(%g, %g, %u) = %g not in [%g, %g]",
			    initial, max, attempt, v, lo, hi);
		if (v < mn)
			mn = v;
		if (v > mx)
			mx = v;
	}
	/* jitter: the values spread over the range, not a constant */
	assert_true(mx - mn > (hi - lo) * 0.5);
}

static void
test_backoff_first_attempts(void **state)
{
	(void)state;
	check_backoff_range(1, 30, 1, 0.5, 1);
	check_backoff_range(1, 30, 2, 1, 2);
	check_backoff_range(1, 30, 3, 2, 4);
	check_backoff_range(0.1, 30, 4, 0.4, 0.8);
}

static void
test_backoff_attempt_zero_is_one(void **state)
{
	(void)state;
	check_backoff_range(2, 30, 0, 1, 2);
}

static void
test_backoff_capped(void **state)
{
	(void)state;
	check_backoff_range(1, 30, 6, 15, 30);		/* 32 > 30 */
	check_backoff_range(1, 30, 100, 15, 30);
	check_backoff_range(0.1, 5, 1000000, 2.5, 5);
	check_backoff_range(1, 30, 0xffffffffu, 15, 30);
}

/* ---- util_pct_decode ---- */

static int
pct(const char *in, char *out)
{
	return util_pct_decode(in, strlen(in), out);
}

static void
test_pct_decode_valid(void **state)
{
	char out[64];

	(void)state;
	assert_int_equal(pct("order.created", out), 13);
	assert_string_equal(out, "order.created");
	assert_int_equal(pct("a%2Fb", out), 3);
	assert_string_equal(out, "a/b");
	assert_int_equal(pct("%2f", out), 1);
	assert_string_equal(out, "/");
	assert_int_equal(pct("%41%62%7e", out), 3);
	assert_string_equal(out, "Ab~");
	assert_int_equal(pct("a+b%20c", out), 5);
	assert_string_equal(out, "a+b c");
	assert_int_equal(pct("%C3%A9", out), 2);
	assert_string_equal(out, "\xc3\xa9");
	assert_int_equal(pct("", out), 0);
	assert_string_equal(out, "");
}

static void
test_pct_decode_respects_len(void **state)
{
	char out[64];

	(void)state;
	/* only the first len bytes count, the rest is the next path part */
	assert_int_equal(util_pct_decode("ab%2Fcd", 5, out), 3);
	assert_string_equal(out, "ab/");
	assert_int_equal(util_pct_decode("ab%2Fcd", 4, out), -1);	/* "ab%2" */
	assert_int_equal(util_pct_decode("events/key", 6, out), 6);
	assert_string_equal(out, "events");
}

static void
test_pct_decode_malformed(void **state)
{
	char out[64];

	(void)state;
	assert_int_equal(pct("%", out), -1);
	assert_int_equal(pct("abc%", out), -1);
	assert_int_equal(pct("%0", out), -1);
	assert_int_equal(pct("abc%0", out), -1);
	assert_int_equal(pct("%zz", out), -1);
	assert_int_equal(pct("%g1", out), -1);
	assert_int_equal(pct("%1g", out), -1);
	assert_int_equal(pct("% 1", out), -1);
}

static void
test_pct_decode_nul_rejected(void **state)
{
	char out[64];

	(void)state;
	assert_int_equal(pct("%00", out), -1);
	assert_int_equal(pct("abc%00def", out), -1);
	assert_int_equal(util_pct_decode("ab\0cd", 5, out), -1);
}

/* ---- names ---- */

static void
test_valid_exchange(void **state)
{
	char name[300];

	(void)state;
	assert_true(util_valid_exchange("events"));
	assert_true(util_valid_exchange("a-b_c.d:E9"));
	assert_true(util_valid_exchange("amq.topic"));
	assert_true(util_valid_exchange("x"));
	memset(name, 'a', 255);
	name[255] = '\0';
	assert_true(util_valid_exchange(name));
	name[255] = 'a';
	name[256] = '\0';
	assert_false(util_valid_exchange(name));
	assert_false(util_valid_exchange(""));
	assert_false(util_valid_exchange("a b"));
	assert_false(util_valid_exchange("a/b"));
	assert_false(util_valid_exchange("a*"));
	assert_false(util_valid_exchange("caf\xc3\xa9"));
	assert_false(util_valid_exchange("tab\t"));
}

static void
test_valid_shortstr(void **state)
{
	char s[300];

	(void)state;
	assert_true(util_valid_shortstr("order.created", 255));
	assert_true(util_valid_shortstr("", 255));
	assert_true(util_valid_shortstr("a/b c#*", 255));
	assert_true(util_valid_shortstr("caf\xc3\xa9", 255));
	memset(s, 'k', 255);
	s[255] = '\0';
	assert_true(util_valid_shortstr(s, 255));
	s[255] = 'k';
	s[256] = '\0';
	assert_false(util_valid_shortstr(s, 255));
	assert_true(util_valid_shortstr(s, 256));
	assert_false(util_valid_shortstr("abc", 2));
	assert_false(util_valid_shortstr("a\nb", 255));
	assert_false(util_valid_shortstr("a\tb", 255));
	assert_false(util_valid_shortstr("\x01", 255));
	assert_false(util_valid_shortstr("del\x7f", 255));
}

static void
test_ct_equal(void **state)
{
	(void)state;
	assert_true(util_ct_equal("s3cret-token", "s3cret-token"));
	assert_true(util_ct_equal("", ""));
	assert_false(util_ct_equal("s3cret-token", "s3cret-tokeN"));
	assert_false(util_ct_equal("s3cret-token", "x3cret-token"));
	assert_false(util_ct_equal("s3cret", "s3cret-token"));
	assert_false(util_ct_equal("s3cret-token", "s3cret"));
	assert_false(util_ct_equal("", "a"));
	assert_false(util_ct_equal("a", ""));
	/* same length, repeated pattern: the index wrap must not hide a change */
	assert_false(util_ct_equal("abab", "abaa"));
}

/* ---- util_mask_url ---- */

static void
test_mask_url_password(void **state)
{
	char out[256];

	(void)state;
	util_mask_url("amqp://guest:s3cret@rabbit:5672/%2f", out, sizeof out);
	assert_string_equal(out, "amqp://guest:***@rabbit:5672/%2f");
	util_mask_url("amqps://u:p:q@h/v", out, sizeof out);
	assert_string_equal(out, "amqps://u:***@h/v");
	util_mask_url("amqp://:pw@h", out, sizeof out);
	assert_string_equal(out, "amqp://:***@h");
}

static void
test_mask_url_untouched(void **state)
{
	char out[256];

	(void)state;
	util_mask_url("amqp://guest@rabbit:5672/v", out, sizeof out);
	assert_string_equal(out, "amqp://guest@rabbit:5672/v");
	util_mask_url("amqp://rabbit:5672/v", out, sizeof out);
	assert_string_equal(out, "amqp://rabbit:5672/v");
	util_mask_url("amqp://rabbit", out, sizeof out);
	assert_string_equal(out, "amqp://rabbit");
	util_mask_url("not a url", out, sizeof out);
	assert_string_equal(out, "not a url");
}

static void
test_mask_url_truncated_never_leaks(void **state)
{
	const char *url = "amqp://guest:topsecret@rabbit.example:5672/%2f";
	char out[64];
	size_t n;

	(void)state;
	for (n = 1; n <= sizeof out; n++) {
		memset(out, 'X', sizeof out);
		util_mask_url(url, out, n);
		assert_true(strlen(out) < n);
		assert_null(strstr(out, "top"));
	}
}

static void
test_mask_url_at_in_path(void **state)
{
	char out[256];

	(void)state;
	/*
	 * Regression (fixed): util_mask_url looks for the first '@' anywhere after "://",
	 * not only in the authority. "amqp://rabbit:5672/vh@x" has no
	 * userinfo ('@' is a legal path character, RFC 3986 pchar), yet the
	 * port and path are masked: it prints "amqp://rabbit:***@x".
	 */
	util_mask_url("amqp://rabbit:5672/vh@x", out, sizeof out);
	assert_string_equal(out, "amqp://rabbit:5672/vh@x");
}

/* ---- util_read_secret ---- */

struct tmpdir {
	char dir[64];
};

static int
setup_tmp(void **state)
{
	struct tmpdir *t = calloc(1, sizeof *t);

	snprintf(t->dir, sizeof t->dir, "/tmp/sagad-test-util-XXXXXX");
	if (!mkdtemp(t->dir)) {
		free(t);
		return -1;
	}
	*state = t;
	return 0;
}

static int
teardown_tmp(void **state)
{
	struct tmpdir *t = *state;
	char path[128];
	const char *names[] = { "s1", "s2", "s3", "s4", "s5", NULL };
	int i;

	for (i = 0; names[i]; i++) {
		snprintf(path, sizeof path, "%s/%s", t->dir, names[i]);
		unlink(path);
	}
	rmdir(t->dir);
	free(t);
	return 0;
}

static char *
secret_from(struct tmpdir *t, const char *name, const char *content, size_t len)
{
	char path[128];
	FILE *f;

	snprintf(path, sizeof path, "%s/%s", t->dir, name);
	f = fopen(path, "w");
	assert_non_null(f);
	assert_int_equal(fwrite(content, 1, len, f), len);
	fclose(f);
	return util_read_secret(path);
}

static void
test_read_secret(void **state)
{
	struct tmpdir *t = *state;
	char *s;

	s = secret_from(t, "s1", "tok3n\n", 6);
	assert_non_null(s);
	assert_string_equal(s, "tok3n");
	free(s);
	s = secret_from(t, "s2", "tok3n", 5);
	assert_string_equal(s, "tok3n");
	free(s);
	s = secret_from(t, "s3", "tok3n\r\n\n", 8);
	assert_string_equal(s, "tok3n");
	free(s);
	s = secret_from(t, "s4", "two\nlines\n", 10);
	assert_string_equal(s, "two\nlines");
	free(s);
	s = secret_from(t, "s5", "", 0);
	assert_non_null(s);
	assert_string_equal(s, "");
	free(s);
}

static void
test_read_secret_missing(void **state)
{
	struct tmpdir *t = *state;
	char path[128];

	snprintf(path, sizeof path, "%s/does-not-exist", t->dir);
	assert_null(util_read_secret(path));
}

/* ---- clocks ---- */

static void
test_clocks(void **state)
{
	double a, b, w = util_now();

	(void)state;
	assert_true(w > 1.6e9 && w < 4.2e9);	/* seconds since the epoch */
	assert_true(fabs(w - (double)time(NULL)) < 2.0);
	a = util_mono();
	usleep(20000);
	b = util_mono();
	assert_true(b - a >= 0.015 && b - a < 5.0);
}

/* ---- util_listen_split / util_listen_is_local ---- */

static void
test_listen_split_valid(void **state)
{
	char host[64];
	const char *port;

	(void)state;
	assert_int_equal(util_listen_split("127.0.0.1:7600", host, sizeof host, &port), 0);
	assert_string_equal(host, "127.0.0.1");
	assert_string_equal(port, "7600");
	assert_int_equal(util_listen_split("[::1]:7600", host, sizeof host, &port), 0);
	assert_string_equal(host, "::1");
	assert_string_equal(port, "7600");
	assert_int_equal(util_listen_split(":7600", host, sizeof host, &port), 0);
	assert_string_equal(host, "");
	assert_string_equal(port, "7600");
}

/* Each of these once reached a bracket strip that wrote before or past the
 * host buffer, or was trimmed into some other address. */
static void
test_listen_split_hostile(void **state)
{
	static const char *const bad[] = {
		"[", "[:80", "[]", "[]:80", "]", "]:80", "[::1", "[::1:80", "::1]:80",
		"[[::1]]:80", "[a]b]:80", "", "unix:/tmp/s", "unix:", "nocolon",
	};
	char host[64];
	const char *port = NULL;
	size_t i;

	(void)state;
	for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		assert_int_equal(util_listen_split(bad[i], host, sizeof host, &port), -1);
		assert_int_equal(util_listen_is_local(bad[i]), strncmp(bad[i], "unix:", 5) == 0);
	}
	/* ":" is a spec with an empty host and an empty port. */
	assert_int_equal(util_listen_split(":", host, sizeof host, &port), 0);
	assert_string_equal(host, "");
	assert_string_equal(port, "");
	assert_int_equal(util_listen_is_local(":"), 0);
}

static void
test_listen_split_long(void **state)
{
	char spec[2048], host[16];
	const char *port;

	(void)state;
	memset(spec, 'a', sizeof spec - 8);
	strcpy(spec + sizeof spec - 8, ":7600");
	assert_int_equal(util_listen_split(spec, host, sizeof host, &port), -1);
	assert_int_equal(util_listen_is_local(spec), 0);
	/* 15 characters fit a 16-byte buffer, 16 do not. */
	assert_int_equal(util_listen_split("aaaaaaaaaaaaaaa:1", host, sizeof host, &port), 0);
	assert_int_equal(util_listen_split("aaaaaaaaaaaaaaaa:1", host, sizeof host, &port), -1);
	spec[0] = '[';
	spec[sizeof spec - 9] = ']';
	assert_int_equal(util_listen_is_local(spec), 0);
}

static void
test_listen_is_local(void **state)
{
	(void)state;
	assert_int_equal(util_listen_is_local("unix:/run/sagad/api.sock"), 1);
	assert_int_equal(util_listen_is_local("127.0.0.1:7600"), 1);
	assert_int_equal(util_listen_is_local("127.9.9.9:7600"), 1);
	assert_int_equal(util_listen_is_local("localhost:7600"), 1);
	assert_int_equal(util_listen_is_local("[::1]:7600"), 1);
	assert_int_equal(util_listen_is_local("0.0.0.0:7600"), 0);
	assert_int_equal(util_listen_is_local("[::]:7600"), 0);
	assert_int_equal(util_listen_is_local(":7600"), 0);
	assert_int_equal(util_listen_is_local("10.0.0.1:7600"), 0);
	assert_int_equal(util_listen_is_local("[127.0.0.1]:7600"), 1);
	assert_int_equal(util_listen_is_local("example.com:7600"), 0);
}

/* FNV-1a, 64 bits: the published test values (advisory lock keys and
 * prepared statement slots depend on them staying put). */
static void
test_fnv1a(void **state)
{
	(void)state;
	assert_true(util_fnv1a("") == 0xcbf29ce484222325ULL);
	assert_true(util_fnv1a("a") == 0xaf63dc4c8601ec8cULL);
	assert_true(util_fnv1a("foobar") == 0x85944171f73967e8ULL);
}

static int
cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* util_rand64: no repeats and every bit used, in 100,000 draws. */
static void
test_rand64(void **state)
{
	enum { N = 100000 };
	uint64_t *v = malloc(N * sizeof *v), ones = 0, zeros = 0;
	size_t i;

	(void)state;
	for (i = 0; i < N; i++) {
		v[i] = util_rand64();
		ones |= v[i];
		zeros |= ~v[i];
	}
	assert_true(ones == UINT64_MAX && zeros == UINT64_MAX);
	qsort(v, N, sizeof *v, cmp_u64);
	for (i = 1; i < N; i++)
		assert_true(v[i] != v[i - 1]);
	free(v);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_rand64),
		cmocka_unit_test(test_u64_dec),
		cmocka_unit_test(test_fnv1a),
		cmocka_unit_test(test_uuid7_format),
		cmocka_unit_test(test_uuid7_timestamp_is_now),
		cmocka_unit_test(test_uuid7_strictly_increasing),
		cmocka_unit_test(test_backoff_first_attempts),
		cmocka_unit_test(test_backoff_attempt_zero_is_one),
		cmocka_unit_test(test_backoff_capped),
		cmocka_unit_test(test_pct_decode_valid),
		cmocka_unit_test(test_pct_decode_respects_len),
		cmocka_unit_test(test_pct_decode_malformed),
		cmocka_unit_test(test_pct_decode_nul_rejected),
		cmocka_unit_test(test_valid_exchange),
		cmocka_unit_test(test_valid_shortstr),
		cmocka_unit_test(test_ct_equal),
		cmocka_unit_test(test_mask_url_password),
		cmocka_unit_test(test_mask_url_untouched),
		cmocka_unit_test(test_mask_url_truncated_never_leaks),
		cmocka_unit_test(test_mask_url_at_in_path),
		cmocka_unit_test_setup_teardown(test_read_secret, setup_tmp, teardown_tmp),
		cmocka_unit_test_setup_teardown(test_read_secret_missing, setup_tmp, teardown_tmp),
		cmocka_unit_test(test_clocks),
		cmocka_unit_test(test_listen_split_valid),
		cmocka_unit_test(test_listen_split_hostile),
		cmocka_unit_test(test_listen_split_long),
		cmocka_unit_test(test_listen_is_local),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
