/* Unit tests for src/log.c: the one writer of logfmt lines. Every line it
 * writes is read back with a strict logfmt reader; a value must come back
 * byte for byte and can never add a field or a line. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

#define MAXF 40

struct parsed {
	size_t n;
	char key[MAXF][64];
	char val[MAXF][4096];
	int quoted[MAXF];
};

static int
hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

/* A quoted value from *pp (past the opening quote) into out; -1 if bad. */
static int
parse_quoted(const char **pp, char *out, size_t outlen)
{
	const char *p = *pp;
	size_t o = 0;

	for (;; p++) {
		unsigned char c = (unsigned char)*p;
		if (c == '"')
			break;
		if (c < 0x20 || c >= 0x7f || o + 1 >= outlen)
			return -1;	/* raw control or non-ASCII, or unterminated */
		if (c == '\\') {
			p++;
			switch (*p) {
			case '"': case '\\': c = (unsigned char)*p; break;
			case 'n': c = '\n'; break;
			case 'r': c = '\r'; break;
			case 't': c = '\t'; break;
			case 'x':
				if (hexval(p[1]) < 0 || hexval(p[2]) < 0)
					return -1;
				c = (unsigned char)(hexval(p[1]) * 16 + hexval(p[2]));
				p += 2;
				break;
			default:
				return -1;
			}
		}
		out[o++] = (char)c;
	}
	out[o] = '\0';
	*pp = p + 1;
	return 0;
}

/* Strict: one line ending in '\n', msg="..." first, then " key=value"
 * fields with keys of [A-Za-z0-9_.-], bare values of printable ASCII
 * without space, '=', '"' or '\'. Returns 0 when the line is well-formed. */
static int
parse_line(const char *line, struct parsed *r)
{
	const char *p = line, *nl = strchr(line, '\n');
	size_t k;

	memset(r, 0, sizeof *r);
	if (!nl || nl[1] != '\0')
		return -1;
	for (;;) {
		if (*p == '\n')
			return r->n > 0 ? 0 : -1;
		if (r->n > 0 && *p++ != ' ')
			return -1;
		if (r->n == MAXF)
			return -1;
		for (k = 0; strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-", *p) && *p; p++)
			if (k < sizeof r->key[0] - 1)
				r->key[r->n][k++] = *p;
		if (k == 0 || *p++ != '=')
			return -1;
		if (r->n == 0 && strcmp(r->key[0], "msg") != 0)
			return -1;
		if (*p == '"') {
			p++;
			r->quoted[r->n] = 1;
			if (parse_quoted(&p, r->val[r->n], sizeof r->val[0]) < 0)
				return -1;
		} else {
			for (k = 0; *p > 0x20 && *p < 0x7f && *p != '=' && *p != '"' && *p != '\\'; p++)
				r->val[r->n][k++] = *p;
			if (k == 0)
				return -1;
		}
		r->n++;
	}
}

static void
format_parse(const char *msg, const struct sagad_log_field *f, size_t n, struct parsed *r,
    char *buf, size_t len)
{
	size_t w = log_format(buf, len, msg, NULL, 0, f, n);

	assert_int_equal(w, strlen(buf));
	if (parse_line(buf, r) != 0)
		fail_msg("not strict logfmt: %s", buf);
}

static const char *const hostile[] = {
	"plain",
	"",
	"two words",
	"a\" forged=1",
	"x\nts=2026-01-01T00:00:00.000Z level=error msg=\"forged line\"",
	"back\\slash\\",
	"\\\" level=error",
	"cr\rlf\r\n",
	"tab\there",
	"k=v",
	"\"",
	"\\",
	"=",
	" ",
	"caf\xc3\xa9",
	"line\xe2\x80\xa8separator",
	"nel\xc2\x85",
	"del\x7f bell\x07 esc\x1b[31m",
	"\x01\x02\x1f",
	"\\x41 looks escaped",
};

static void
test_hostile_values_round_trip(void **state)
{
	static char buf[8192];
	static struct parsed r;
	size_t i;

	(void)state;
	for (i = 0; i < sizeof hostile / sizeof hostile[0]; i++) {
		const struct sagad_log_field f[] = {
			LOG_STR("message_id", hostile[i]),
			LOG_STR("routing_key", hostile[i]),
			LOG_INT("n", 7),
		};
		format_parse(hostile[i], f, 3, &r, buf, sizeof buf);
		assert_int_equal(r.n, 4);
		assert_string_equal(r.val[0], hostile[i]);
		assert_string_equal(r.key[1], "message_id");
		assert_string_equal(r.val[1], hostile[i]);
		assert_string_equal(r.key[2], "routing_key");
		assert_string_equal(r.val[2], hostile[i]);
		assert_string_equal(r.key[3], "n");
		assert_string_equal(r.val[3], "7");
	}
}

static void
test_bare_only_when_safe(void **state)
{
	char buf[512];
	const struct sagad_log_field f[] = {
		LOG_STR("a", "orders.created"),
		LOG_STR("b", "two words"),
		LOG_STR("c", ""),
		LOG_STR("d", NULL),
		LOG_STR("e", "x=y"),
	};

	(void)state;
	log_format(buf, sizeof buf, "m", NULL, 0, f, 5);
	assert_string_equal(buf, "msg=\"m\" a=orders.created b=\"two words\" c=\"\" d=\"\" e=\"x=y\"\n");
}

static void
test_escapes(void **state)
{
	char buf[512];
	const struct sagad_log_field f[] = { LOG_STR("v", "q\"b\\n\nr\rt\tc\x01u\xc3\xa9") };

	(void)state;
	log_format(buf, sizeof buf, "m", NULL, 0, f, 1);
	assert_string_equal(buf, "msg=\"m\" v=\"q\\\"b\\\\n\\nr\\rt\\tc\\x01u\\xc3\\xa9\"\n");
}

static void
test_numbers(void **state)
{
	char buf[512];
	const struct sagad_log_field f[] = {
		LOG_INT("i", -42), LOG_UINT("u", 18446744073709551615ULL),
		LOG_DBL("d", 0.25), LOG_HEX("x", 0x3c0028),
	};

	(void)state;
	log_format(buf, sizeof buf, "m", NULL, 0, f, 4);
	assert_string_equal(buf, "msg=\"m\" i=-42 u=18446744073709551615 d=0.25 x=0x003c0028\n");
}

static void
test_prefix_fields_first(void **state)
{
	char buf[512];
	const struct sagad_log_field pre[] = { LOG_STR("source", "pg\" x=1") };
	const struct sagad_log_field f[] = { LOG_INT("rows", 3) };

	(void)state;
	log_format(buf, sizeof buf, "batch", pre, 1, f, 1);
	assert_string_equal(buf, "msg=\"batch\" source=\"pg\\\" x=1\" rows=3\n");
}

/* Keys come from literals, but one with a stray character still cannot
 * forge a field. */
static void
test_bad_key_sanitized(void **state)
{
	char buf[512];
	struct parsed r;
	struct sagad_log_field f = { .key = "a b=\"c\n", .type = SAGAD_LOG_T_INT, .v.i = 1 };

	(void)state;
	format_parse("m", &f, 1, &r, buf, sizeof buf);
	assert_int_equal(r.n, 2);
	assert_string_equal(r.key[1], "a_b__c_");
}

/* A line too long for the buffer is cut, still well-formed, and says so. */
static void
test_truncation_well_formed(void **state)
{
	static char big[6000], buf[2048];
	static struct parsed r;
	size_t len, cut;

	(void)state;
	memset(big, '"', sizeof big - 1);
	for (len = 40; len <= sizeof buf; len += 37) {
		for (cut = 0; cut < 3; cut++) {
			const struct sagad_log_field f[] = {
				LOG_STR("a", "short"), LOG_STR("big", big + cut), LOG_INT("after", 1),
			};
			format_parse("m", f, 3, &r, buf, len);
			assert_true(strlen(buf) < len);
			assert_string_equal(r.key[r.n - 1], "truncated");
			assert_string_equal(r.val[r.n - 1], "true");
		}
	}
}

static void
test_many_fields_truncated(void **state)
{
	static char buf[300];
	static struct parsed r;
	struct sagad_log_field f[MAXF];
	size_t i;

	(void)state;
	for (i = 0; i < MAXF; i++) {
		f[i].key = "field_with_a_long_name";
		f[i].type = SAGAD_LOG_T_STR;
		f[i].v.s = "value\nwith newline";
	}
	format_parse("m", f, MAXF, &r, buf, sizeof buf);
	assert_string_equal(r.key[r.n - 1], "truncated");
	assert_string_equal(r.val[1], "value\nwith newline");
}

static void
test_tiny_buffer(void **state)
{
	char buf[8] = "xxxxxxx";

	(void)state;
	assert_int_equal(log_format(buf, sizeof buf, "m", NULL, 0, NULL, 0), 0);
	assert_string_equal(buf, "");
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_hostile_values_round_trip),
		cmocka_unit_test(test_bare_only_when_safe),
		cmocka_unit_test(test_escapes),
		cmocka_unit_test(test_numbers),
		cmocka_unit_test(test_prefix_fields_first),
		cmocka_unit_test(test_bad_key_sanitized),
		cmocka_unit_test(test_truncation_well_formed),
		cmocka_unit_test(test_many_fields_truncated),
		cmocka_unit_test(test_tiny_buffer),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
