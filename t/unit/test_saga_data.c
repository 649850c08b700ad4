/* Unit tests for src/saga_data.c: JSON Pointers, templates, conditions. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "saga_data.h"

/* Step "list" replied {"id": 7, "items": ["a", "b"]}; "plain" replied
 * text; every other step has no reply. Checking accepts "list" and
 * "plain" only. */
static int
test_reply(void *arg, const char *step, const char **body, size_t *len)
{
	static const char list[] = "{\"id\": 7, \"items\": [\"a\", \"b\"]}";
	static const char plain[] = "not json";

	(void)arg;
	if (strcmp(step, "list") == 0) {
		if (body) {
			*body = list;
			*len = strlen(list);
		}
		return 1;
	}
	if (strcmp(step, "plain") == 0) {
		if (body) {
			*body = plain;
			*len = strlen(plain);
		}
		return 1;
	}
	return 0;
}

static const char START[] = "{\"order\": {\"id\": \"o-1\", \"total\": 120.5}, \"a/b\": 1, "
	"\"m~n\": 2, \"express\": true, \"tags\": [\"x\"]}";

static struct saga_data_src
src(int check)
{
	struct saga_data_src s = { "sid-1", "create-order", START, sizeof START - 1,
		test_reply, NULL, check };
	return s;
}

/* RFC 6901, section 5's examples. */
static void
test_pointer(void **state)
{
	json_error_t e;
	json_t *doc = json_loads("{\"foo\": [\"bar\", \"baz\"], \"\": 0, \"a/b\": 1, \"c%d\": 2, "
	    "\"e^f\": 3, \"g|h\": 4, \"i\\\\j\": 5, \"k\\\"l\": 6, \" \": 7, \"m~n\": 8}", 0, &e);

	(void)state;
	assert_non_null(doc);
	assert_ptr_equal(saga_data_pointer(doc, ""), doc);
	assert_string_equal(json_string_value(saga_data_pointer(doc, "/foo/0")), "bar");
	assert_int_equal(json_integer_value(saga_data_pointer(doc, "/")), 0);
	assert_int_equal(json_integer_value(saga_data_pointer(doc, "/a~1b")), 1);
	assert_int_equal(json_integer_value(saga_data_pointer(doc, "/c%d")), 2);
	assert_int_equal(json_integer_value(saga_data_pointer(doc, "/i\\j")), 5);
	assert_int_equal(json_integer_value(saga_data_pointer(doc, "/ ")), 7);
	assert_int_equal(json_integer_value(saga_data_pointer(doc, "/m~0n")), 8);
	assert_null(saga_data_pointer(doc, "/foo/2"));
	assert_null(saga_data_pointer(doc, "/foo/01"));	/* no leading zero */
	assert_null(saga_data_pointer(doc, "/foo/-"));
	assert_null(saga_data_pointer(doc, "/m~2n"));	/* bad escape */
	assert_null(saga_data_pointer(doc, "foo"));
	assert_null(saga_data_pointer(doc, "/nothing/deeper"));
	json_decref(doc);
}

static void
render_is(const char *tpl, const char *want)
{
	struct saga_data_src s = src(0);
	char err[SAGA_DATA_ERR] = "", *got = saga_data_render(tpl, &s, err);

	if (!got)
		fail_msg("%s: %s", tpl, err);
	assert_string_equal(got, want);
	free(got);
}

static void
render_fails(const char *tpl, const char *words)
{
	struct saga_data_src s = src(0);
	char err[SAGA_DATA_ERR] = "", *got = saga_data_render(tpl, &s, err);

	assert_null(got);
	if (!strstr(err, words))
		fail_msg("%s: error '%s' lacks '%s'", tpl, err, words);
}

static void
test_render(void **state)
{
	(void)state;
	render_is("{\"order\":\"$start/order/id\",\"shoppingId\":\"$steps.list.reply/id\","
	    "\"n\":3,\"lit\":\"plain\",\"dollar\":\"$$start\"}",
	    "{\"order\":\"o-1\",\"shoppingId\":7,\"n\":3,\"lit\":\"plain\",\"dollar\":\"$start\"}");
	render_is("{\"all\":\"$start/order\",\"first\":[\"$steps.list.reply/items/1\"]}",
	    "{\"all\":{\"id\":\"o-1\",\"total\":120.5},\"first\":[\"b\"]}");
	render_is("{\"escaped\":\"$start/a~1b\",\"tilde\":\"$start/m~0n\"}",
	    "{\"escaped\":1,\"tilde\":2}");
	render_is("{\"id\":\"$saga.id\",\"saga\":\"$saga.name\"}",
	    "{\"id\":\"sid-1\",\"saga\":\"create-order\"}");
	render_is("\"$start/order/total\"", "120.5");
	/* a reply that is not JSON passes whole, as a string */
	render_is("{\"text\":\"$steps.plain.reply\"}", "{\"text\":\"not json\"}");
	render_fails("{\"x\":\"$steps.plain.reply/a\"}", "not JSON");
	render_fails("{\"x\":\"$start/order/missing\"}", "/order/missing");
	render_fails("{\"x\":\"$steps.nope.reply/id\"}", "step nope has no reply");
	render_fails("{\"x\":\"$begin\"}", "unknown reference");
}

static void
test_headers(void **state)
{
	struct saga_data_src s = src(0);
	char err[SAGA_DATA_ERR], *got;

	(void)state;
	got = saga_data_headers("{\"x-shopping\":\"$steps.list.reply/id\",\"x-order\":"
	    "\"$start/order/id\",\"x-tags\":\"$start/tags\"}", &s, err);
	assert_non_null(got);
	assert_string_equal(got, "{\"x-shopping\":\"7\",\"x-order\":\"o-1\",\"x-tags\":\"[\\\"x\\\"]\"}");
	free(got);
}

static void
test_checks(void **state)
{
	struct saga_data_src c = src(1);
	char err[SAGA_DATA_ERR];

	(void)state;
	assert_int_equal(saga_data_check_template("{\"a\":\"$steps.list.reply/id\"}", &c, err), 0);
	assert_int_equal(saga_data_check_template("{\"a\":[\"$steps.later.reply\"]}", &c, err), -1);
	assert_non_null(strstr(err, "no earlier step"));
	assert_int_equal(saga_data_check_template("{\"a\":\"$start\",\"b\":\"$x\"}", &c, err), -1);
	assert_int_equal(saga_data_check("$start/order/total > 100", &c, err), 0);
	assert_int_equal(saga_data_check("$steps.list.reply/id exists", &c, err), 0);
	assert_int_equal(saga_data_check("$start/a ~ 1", &c, err), -1);
	assert_non_null(strstr(err, "operator"));
	assert_int_equal(saga_data_check("$start/a == [1]", &c, err), -1);
	assert_int_equal(saga_data_check("$start/a == bare", &c, err), -1);
	assert_int_equal(saga_data_check("$start/a exists 1", &c, err), -1);
	assert_int_equal(saga_data_check("start/a == 1", &c, err), -1);
	assert_int_equal(saga_data_check("$start", &c, err), -1);
	assert_int_equal(saga_data_check("$steps.later.reply missing", &c, err), -1);
}

static void
test_when(void **state)
{
	struct saga_data_src s = src(0);

	(void)state;
	assert_true(saga_data_when("$start/order/total > 100", &s));
	assert_false(saga_data_when("$start/order/total > 200", &s));
	assert_true(saga_data_when("$start/order/total <= 120.5", &s));
	assert_true(saga_data_when("$start/order/total >= 120.5", &s));
	assert_false(saga_data_when("$start/order/total < 120.5", &s));
	assert_true(saga_data_when("$steps.list.reply/id == 7.0", &s));	/* numbers as numbers */
	assert_true(saga_data_when("$start/order/id == \"o-1\"", &s));
	assert_true(saga_data_when("$start/order/id != \"o-2\"", &s));
	assert_true(saga_data_when("$start/order/id < \"p\"", &s));
	assert_true(saga_data_when("$start/express == true", &s));
	assert_false(saga_data_when("$start/express == \"true\"", &s));
	assert_false(saga_data_when("$start/express > 1", &s));	/* not ordered */
	assert_true(saga_data_when("$start/express != 1", &s));
	assert_true(saga_data_when("$start/order/id exists", &s));
	assert_false(saga_data_when("$start/order/zip exists", &s));
	assert_true(saga_data_when("$start/order/zip missing", &s));
	/* a missing value makes every comparison false, != too */
	assert_false(saga_data_when("$start/order/zip == 1", &s));
	assert_false(saga_data_when("$start/order/zip != 1", &s));
	assert_false(saga_data_when("$steps.nope.reply/id == 1", &s));
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_pointer),
		cmocka_unit_test(test_render),
		cmocka_unit_test(test_headers),
		cmocka_unit_test(test_checks),
		cmocka_unit_test(test_when),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
