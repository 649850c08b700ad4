/* Unit tests for src/trace.c: W3C traceparent/tracestate on messages. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "props.h"
#include "trace.h"

#define TP "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

/* tracing.new_traces always (start), and never; no endpoint: sampled */
static struct sagad_conf conf_start = { .tracing = { .start = 1 } };
static struct sagad_conf conf_none = { .tracing = { .start = 0 } };

static void
test_parent_valid(void **state)
{
	(void)state;
	assert_true(trace_parent_valid(TP));
	assert_true(trace_parent_valid("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"));
	/* a later version: more fields after a dash are allowed */
	assert_true(trace_parent_valid("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
	assert_true(trace_parent_valid(
	    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-next"));
	assert_false(trace_parent_valid(
	    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"));
	/* version 00 has nothing more */
	assert_false(trace_parent_valid(TP "-x"));
	assert_false(trace_parent_valid("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
	assert_false(trace_parent_valid("00-00000000000000000000000000000000-00f067aa0ba902b7-01"));
	assert_false(trace_parent_valid("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"));
	assert_false(trace_parent_valid("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"));
	assert_false(trace_parent_valid("00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01"));
	assert_false(trace_parent_valid("00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
	assert_false(trace_parent_valid("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0"));
	assert_false(trace_parent_valid(""));
	assert_false(trace_parent_valid("0"));
}

static void
test_state_valid(void **state)
{
	char big[TRACE_STATE_MAX + 2];

	(void)state;
	assert_true(trace_state_valid("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"));
	assert_true(trace_state_valid(""));
	assert_false(trace_state_valid("a=1\r\nb=2"));
	assert_false(trace_state_valid("a=\xc3\xa9"));	/* ASCII only */
	memset(big, 'a', sizeof big - 1);
	big[sizeof big - 1] = '\0';
	assert_false(trace_state_valid(big));
	big[TRACE_STATE_MAX] = '\0';
	assert_true(trace_state_valid(big));
}

static void
test_new(void **state)
{
	char a[TRACE_PARENT_LEN + 1], b[TRACE_PARENT_LEN + 1];
	int i;

	(void)state;
	for (i = 0; i < 1000; i++) {
		trace_new(a, 1);
		assert_int_equal(strlen(a), TRACE_PARENT_LEN);
		assert_true(trace_parent_valid(a));
		assert_memory_equal(a, "00-", 3);
		assert_string_equal(a + 52, "-01");	/* sampled */
	}
	trace_new(b, 0);
	assert_memory_not_equal(a + 3, b + 3, 32);	/* new trace ids */
	assert_memory_not_equal(a + 36, b + 36, 16);
	assert_true(trace_parent_valid(b));
	assert_string_equal(b + 52, "-00");		/* not sampled */
}

static void
test_check(void **state)
{
	struct props p;
	const char *why = NULL;

	(void)state;
	memset(&p, 0, sizeof p);
	assert_int_equal(trace_check(&p, &conf_start, &why), 0);		/* none: a new one */
	assert_true(trace_parent_valid(props_get_header(&p, TRACE_PARENT)));
	assert_null(props_get_header(&p, TRACE_STATE));
	props_free(&p);

	props_set_header(&p, TRACE_PARENT, TP);
	props_set_header(&p, TRACE_STATE, "k=v");
	assert_int_equal(trace_check(&p, &conf_start, &why), 0);		/* kept as it is */
	assert_string_equal(props_get_header(&p, TRACE_PARENT), TP);
	assert_string_equal(props_get_header(&p, TRACE_STATE), "k=v");
	props_free(&p);

	props_set_header(&p, TRACE_PARENT, "00-xyz");
	assert_int_equal(trace_check(&p, &conf_start, &why), -1);
	assert_non_null(strstr(why, "traceparent"));
	props_free(&p);

	props_set_header(&p, TRACE_PARENT, TP);
	props_set_header(&p, TRACE_STATE, "a\tb");
	why = NULL;
	assert_int_equal(trace_check(&p, &conf_start, &why), -1);
	assert_non_null(strstr(why, "tracestate"));
	props_free(&p);

	props_set_header(&p, TRACE_STATE, "k=v");		/* state alone */
	assert_int_equal(trace_check(&p, &conf_start, &why), -1);
	props_free(&p);
}

static void
test_ensure(void **state)
{
	struct props p;

	(void)state;
	memset(&p, 0, sizeof p);
	props_set_header(&p, TRACE_PARENT, TP);
	props_set_header(&p, TRACE_STATE, "k=v");
	assert_int_equal(trace_ensure(&p, &conf_start), 0);
	assert_string_equal(props_get_header(&p, TRACE_PARENT), TP);
	assert_string_equal(props_get_header(&p, TRACE_STATE), "k=v");
	props_free(&p);

	/* a broken traceparent restarts the trace, without its state */
	props_set_header(&p, "other", "1");
	props_set_header(&p, TRACE_PARENT, "garbage");
	props_set_header(&p, TRACE_STATE, "k=v");
	assert_int_equal(trace_ensure(&p, &conf_start), 1);
	assert_true(trace_parent_valid(props_get_header(&p, TRACE_PARENT)));
	assert_null(props_get_header(&p, TRACE_STATE));
	assert_string_equal(props_get_header(&p, "other"), "1");
	assert_int_equal(p.n_headers, 2);
	props_free(&p);

	assert_int_equal(trace_ensure(&p, &conf_start), 1);			/* none */
	assert_int_equal(p.n_headers, 1);
	props_free(&p);
}

/* tracing.new_traces never (or auto without an endpoint): a context that
 * came is kept, none is started, a malformed one is dropped. */
static void
test_no_new_traces(void **state)
{
	struct props p;
	const char *why = NULL;

	(void)state;
	memset(&p, 0, sizeof p);
	assert_int_equal(trace_check(&p, &conf_none, &why), 0);
	assert_int_equal(p.n_headers, 0);
	props_set_header(&p, TRACE_PARENT, TP);
	props_set_header(&p, TRACE_STATE, "k=v");
	assert_int_equal(trace_check(&p, &conf_none, &why), 0);
	assert_string_equal(props_get_header(&p, TRACE_PARENT), TP);
	assert_string_equal(props_get_header(&p, TRACE_STATE), "k=v");
	props_free(&p);

	props_set_header(&p, TRACE_PARENT, "00-xyz");		/* still refused */
	assert_int_equal(trace_check(&p, &conf_none, &why), -1);
	props_free(&p);

	assert_int_equal(trace_ensure(&p, &conf_none), 0);	/* none */
	assert_int_equal(p.n_headers, 0);
	props_set_header(&p, TRACE_PARENT, TP);
	assert_int_equal(trace_ensure(&p, &conf_none), 0);
	assert_string_equal(props_get_header(&p, TRACE_PARENT), TP);
	props_free(&p);

	props_set_header(&p, "other", "1");
	props_set_header(&p, TRACE_PARENT, "garbage");
	props_set_header(&p, TRACE_STATE, "k=v");
	assert_int_equal(trace_ensure(&p, &conf_none), 0);
	assert_int_equal(p.n_headers, 1);
	assert_string_equal(props_get_header(&p, "other"), "1");
	props_free(&p);
}

static void
test_copy_and_id(void **state)
{
	struct props a, b;
	char id[33];

	(void)state;
	memset(&a, 0, sizeof a);
	memset(&b, 0, sizeof b);
	assert_null(trace_id(&a, id));
	trace_copy(&b, &a);
	assert_int_equal(b.n_headers, 0);
	props_set_header(&a, TRACE_PARENT, TP);
	props_set_header(&a, TRACE_STATE, "k=v");
	trace_copy(&b, &a);
	assert_string_equal(props_get_header(&b, TRACE_PARENT), TP);
	assert_string_equal(props_get_header(&b, TRACE_STATE), "k=v");
	assert_string_equal(trace_id(&b, id), "4bf92f3577b34da6a3ce929d0e0e4736");
	props_free(&a);
	props_free(&b);
}

static void
test_take_put(void **state)
{
	struct props a, b;
	char *tp, *ts;

	(void)state;
	memset(&a, 0, sizeof a);
	memset(&b, 0, sizeof b);
	trace_take(&a, &tp, &ts);
	assert_null(tp);
	assert_null(ts);
	props_set_header(&a, TRACE_PARENT, "bad");
	props_set_header(&a, TRACE_STATE, "k=v");
	trace_take(&a, &tp, &ts);		/* a bad parent: nothing */
	assert_null(tp);
	assert_null(ts);
	props_set_header(&a, TRACE_PARENT, TP);
	trace_take(&a, &tp, &ts);
	assert_string_equal(tp, TP);
	assert_string_equal(ts, "k=v");
	trace_put(&b, NULL, "x=y");		/* no parent: nothing */
	assert_int_equal(b.n_headers, 0);
	trace_put(&b, tp, ts);
	assert_string_equal(props_get_header(&b, TRACE_PARENT), TP);
	assert_string_equal(props_get_header(&b, TRACE_STATE), "k=v");
	free(tp);
	free(ts);
	props_free(&a);
	props_free(&b);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_parent_valid),
		cmocka_unit_test(test_state_valid),
		cmocka_unit_test(test_new),
		cmocka_unit_test(test_check),
		cmocka_unit_test(test_ensure),
		cmocka_unit_test(test_no_new_traces),
		cmocka_unit_test(test_copy_and_id),
		cmocka_unit_test(test_take_put),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
