/* Unit tests for ingress_parse(): publish path and headers -> message. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include "conf.h"
#include "ingress.h"
#include "props.h"
#include "trace.h"


struct fx {
	struct sagad_conf *open;	/* no exchanges: any valid name */
	struct sagad_conf *strict;	/* exchanges configured */
	struct evkeyvalq h;
	struct msg m;
	const char *error;
	char why[256];
};

static struct sagad_conf *
conf_from(const char *text)
{
	struct conf_errors e = { NULL, 0 };
	struct sagad_conf *c = conf_load_string(text, "test.conf", ".", &e);
	size_t i;

	for (i = 0; i < e.n; i++)
		print_error("conf: %s\n", e.msg[i]);
	conf_errors_clear(&e);
	return c;
}

static int
setup(void **state)
{
	struct fx *f = calloc(1, sizeof *f);

	f->open = conf_from("service = \"orders\";\n");
	f->strict = conf_from("service = \"orders\";\n"
	    "exchanges = ( { name = \"events\"; }, { name = \"commands\"; type = \"direct\"; } );\n");
	if (!f->open || !f->strict)
		return -1;
	TAILQ_INIT(&f->h);
	*state = f;
	return 0;
}

static void
clear_msg(struct msg *m)
{
	free(m->message_id);
	free(m->exchange);
	free(m->routing_key);
	props_free(&m->props);
	free(m->body);
	memset(m, 0, sizeof *m);
}

static int
teardown(void **state)
{
	struct fx *f = *state;

	clear_msg(&f->m);
	evhttp_clear_headers(&f->h);
	conf_free(f->open);
	conf_free(f->strict);
	free(f);
	return 0;
}

/* Parse with conf c; the message of an earlier parse is released first. */
static int
parse(struct fx *f, const struct sagad_conf *c, const char *path)
{
	int rc;

	clear_msg(&f->m);
	f->error = NULL;
	f->why[0] = '\0';
	rc = ingress_parse(c, path, &f->h, &f->m, &f->error, f->why, sizeof f->why);
	if (rc == 0)
		assert_null(f->error);
	else {
		assert_int_equal(rc, -1);
		assert_non_null(f->error);
		assert_true(f->why[0] != '\0');
	}
	return rc;
}

static void
expect_ok(struct fx *f, const struct sagad_conf *c, const char *path,
    const char *exchange, const char *key)
{
	if (parse(f, c, path) != 0)
		fail_msg("%s rejected: %s (%s)", path, f->error, f->why);
	assert_string_equal(f->m.exchange, exchange);
	assert_string_equal(f->m.routing_key, key);
	assert_non_null(f->m.message_id);
}

static void
expect_fail(struct fx *f, const struct sagad_conf *c, const char *path,
    const char *error)
{
	if (parse(f, c, path) != -1)
		fail_msg("%s accepted (exchange '%s', key '%s')", path,
		    f->m.exchange, f->m.routing_key);
	assert_string_equal(f->error, error);
}

static void
add(struct fx *f, const char *k, const char *v)
{
	assert_int_equal(evhttp_add_header(&f->h, k, v), 0);
}

static void
check_uuid7(const char *u)
{
	size_t i;

	assert_int_equal(strlen(u), 36);
	for (i = 0; i < 36; i++)
		if (i == 8 || i == 13 || i == 18 || i == 23)
			assert_int_equal(u[i], '-');
		else
			assert_non_null(strchr("0123456789abcdef", u[i]));
	assert_int_equal(u[14], '7');
	assert_non_null(strchr("89ab", u[19]));
}

/* ---- path ---- */

static void
test_path_simple(void **state)
{
	struct fx *f = *state;

	expect_ok(f, f->open, "/v1/publish/events/order.created", "events", "order.created");
	assert_null(f->m.props.content_type);
	assert_null(f->m.props.correlation_id);
	/* no new trace: tracing.new_traces auto, without an endpoint */
	assert_int_equal(f->m.props.n_headers, 0);
	expect_ok(f, f->open, "/v1/publish/a-b_c.d:e/k", "a-b_c.d:e", "k");
}

static void
test_path_percent_decoded(void **state)
{
	struct fx *f = *state;

	expect_ok(f, f->open, "/v1/publish/events/order%2Fcreated%20now", "events",
	    "order/created now");
	expect_ok(f, f->open, "/v1/publish/ev%65nts/a%2eb", "events", "a.b");
	expect_ok(f, f->open, "/v1/publish/events/caf%C3%A9", "events", "caf\xc3\xa9");
	expect_ok(f, f->open, "/v1/publish/events/a+b", "events", "a+b");
}

static void
test_path_default_exchange(void **state)
{
	struct fx *f = *state;

	expect_ok(f, f->open, "/v1/publish/-/orders.inbox", "", "orders.inbox");
	/* allowed even when the exchanges are listed */
	expect_ok(f, f->strict, "/v1/publish/-/orders.inbox", "", "orders.inbox");
}

static void
test_path_key_with_slashes(void **state)
{
	struct fx *f = *state;

	expect_ok(f, f->open, "/v1/publish/events/a/b/c", "events", "a/b/c");
	expect_ok(f, f->open, "/v1/publish/events/", "events", "");
	expect_ok(f, f->open, "/v1/publish/events//", "events", "/");
}

static void
test_path_query_ignored(void **state)
{
	struct fx *f = *state;

	expect_ok(f, f->open, "/v1/publish/events/order.paid?trace=1", "events", "order.paid");
	expect_ok(f, f->open, "/v1/publish/events/a/b?x=/y", "events", "a/b");
}

static void
test_path_malformed(void **state)
{
	struct fx *f = *state;

	expect_fail(f, f->open, "/v1/publish/events", "bad-path");
	expect_fail(f, f->open, "/v1/publish/", "bad-path");
	expect_fail(f, f->open, "/v1/publish/events?x=/k", "bad-path");
	expect_fail(f, f->open, "/v1/publish/events/bad%zz", "bad-path");
	expect_fail(f, f->open, "/v1/publish/events/bad%2", "bad-path");
	expect_fail(f, f->open, "/v1/publish/events/nul%00", "bad-path");
	expect_fail(f, f->open, "/v1/publish/ev%/k", "bad-path");
}

static void
test_bad_exchange(void **state)
{
	struct fx *f = *state;

	expect_fail(f, f->open, "/v1/publish/bad%20name/k", "bad-exchange");
	expect_fail(f, f->open, "/v1/publish//k", "bad-exchange");
	expect_fail(f, f->open, "/v1/publish/a%2Fb/k", "bad-exchange");
	expect_fail(f, f->open, "/v1/publish/st*r/k", "bad-exchange");
}

static void
test_unknown_exchange_when_configured(void **state)
{
	struct fx *f = *state;

	expect_fail(f, f->strict, "/v1/publish/other/k", "unknown-exchange");
	expect_fail(f, f->strict, "/v1/publish/Events/k", "unknown-exchange");
	expect_ok(f, f->strict, "/v1/publish/events/k", "events", "k");
	expect_ok(f, f->strict, "/v1/publish/commands/k", "commands", "k");
	/* amq.* exist on every broker */
	expect_ok(f, f->strict, "/v1/publish/amq.topic/k", "amq.topic", "k");
	expect_ok(f, f->strict, "/v1/publish/amq.direct/k", "amq.direct", "k");
	/* without a list, any valid name goes */
	expect_ok(f, f->open, "/v1/publish/other/k", "other", "k");
}

static void
test_bad_routing_key(void **state)
{
	struct fx *f = *state;
	char path[600];
	int n;

	expect_fail(f, f->open, "/v1/publish/events/a%0Ab", "bad-routing-key");
	expect_fail(f, f->open, "/v1/publish/events/a%7Fb", "bad-routing-key");
	n = snprintf(path, sizeof path, "/v1/publish/events/");
	memset(path + n, 'k', 255);
	path[n + 255] = '\0';
	parse(f, f->open, path);
	assert_null(f->error);
	assert_int_equal(strlen(f->m.routing_key), 255);
	path[n + 255] = 'k';
	path[n + 256] = '\0';
	expect_fail(f, f->open, path, "bad-routing-key");
}

/* ---- headers ---- */

static void
test_header_mapping(void **state)
{
	struct fx *f = *state;

	add(f, "Host", "127.0.0.1:7600");
	add(f, "Authorization", "Bearer secret");
	add(f, "Content-Type", "application/json");
	add(f, "Message-Id", "order-1234");
	add(f, "Correlation-Id", "saga-77");
	add(f, "Causation-Id", "evt-5");
	add(f, "Amqp-Header-Foo", "bar");
	add(f, "AMQP-HEADER-Tenant-ID", "Acme Corp");
	add(f, "Amqp-Type", "order.created.v1");
	add(f, "Amqp-Expiration", "60000");
	add(f, "X-Other", "ignored");
	expect_ok(f, f->open, "/v1/publish/events/order.created", "events", "order.created");
	assert_string_equal(f->m.message_id, "order-1234");
	assert_string_equal(f->m.props.content_type, "application/json");
	assert_string_equal(f->m.props.correlation_id, "saga-77");
	assert_string_equal(f->m.props.type, "order.created.v1");
	assert_string_equal(f->m.props.expiration, "60000");
	assert_null(f->m.props.reply_to);
	assert_int_equal(f->m.props.n_headers, 3);
	assert_string_equal(props_get_header(&f->m.props, "x-causation-id"), "evt-5");
	assert_string_equal(props_get_header(&f->m.props, "foo"), "bar");
	/* the name lower-case, the value as sent */
	assert_string_equal(props_get_header(&f->m.props, "tenant-id"), "Acme Corp");
	assert_null(props_get_header(&f->m.props, "Foo"));
	assert_null(props_get_header(&f->m.props, "authorization"));
	assert_null(props_get_header(&f->m.props, "x-other"));
	assert_null(props_get_header(&f->m.props, "host"));
}

/* W3C Trace Context: kept as sent when well formed, refused when not
 * (also through Amqp-Header-traceparent), a new trace when absent if
 * tracing.new_traces says so. */
static void
test_trace_context(void **state)
{
	struct fx *f = *state;
	const char *tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

	add(f, "TraceParent", tp);
	add(f, "tracestate", "rojo=00f067aa0ba902b7");
	expect_ok(f, f->open, "/v1/publish/events/k", "events", "k");
	assert_string_equal(props_get_header(&f->m.props, TRACE_PARENT), tp);
	assert_string_equal(props_get_header(&f->m.props, TRACE_STATE), "rojo=00f067aa0ba902b7");
	evhttp_clear_headers(&f->h);

	add(f, "traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01");
	expect_fail(f, f->open, "/v1/publish/events/k", "bad-header");
	evhttp_clear_headers(&f->h);
	add(f, "Amqp-Header-traceparent", "not-a-traceparent");
	expect_fail(f, f->open, "/v1/publish/events/k", "bad-header");
	evhttp_clear_headers(&f->h);
	add(f, "tracestate", "k=v");		/* without its traceparent */
	expect_fail(f, f->open, "/v1/publish/events/k", "bad-header");
	evhttp_clear_headers(&f->h);
	add(f, "traceparent", tp);
	add(f, "tracestate", "k=v\x01");
	expect_fail(f, f->open, "/v1/publish/events/k", "bad-header");
	evhttp_clear_headers(&f->h);

	expect_ok(f, f->open, "/v1/publish/events/k", "events", "k");
	assert_null(props_get_header(&f->m.props, TRACE_PARENT));
	f->open->tracing.start = 1;		/* new_traces = "always" */
	expect_ok(f, f->open, "/v1/publish/events/k", "events", "k");
	assert_int_equal(f->m.props.n_headers, 1);
	assert_true(trace_parent_valid(props_get_header(&f->m.props, TRACE_PARENT)));
	assert_null(props_get_header(&f->m.props, TRACE_STATE));
}

static void
test_header_names_case_insensitive(void **state)
{
	struct fx *f = *state;

	add(f, "content-type", "text/plain");
	add(f, "MESSAGE-ID", "m-1");
	add(f, "correlation-id", "c-1");
	add(f, "amqp-type", "t");
	add(f, "causation-ID", "k");
	expect_ok(f, f->open, "/v1/publish/events/k", "events", "k");
	assert_string_equal(f->m.props.content_type, "text/plain");
	assert_string_equal(f->m.message_id, "m-1");
	assert_string_equal(f->m.props.correlation_id, "c-1");
	assert_string_equal(f->m.props.type, "t");
	assert_string_equal(props_get_header(&f->m.props, "x-causation-id"), "k");
}

static void
test_generated_message_id(void **state)
{
	struct fx *f = *state;
	char first[37];

	expect_ok(f, f->open, "/v1/publish/events/k", "events", "k");
	check_uuid7(f->m.message_id);
	snprintf(first, sizeof first, "%s", f->m.message_id);
	expect_ok(f, f->open, "/v1/publish/events/k", "events", "k");
	check_uuid7(f->m.message_id);
	/* a fresh one each time, in order */
	assert_true(strcmp(first, f->m.message_id) < 0);
}

static void
test_message_id_limits(void **state)
{
	struct fx *f = *state;
	char id[300];

	memset(id, 'i', 255);
	id[255] = '\0';
	add(f, "Message-Id", id);
	expect_ok(f, f->open, "/v1/publish/events/k", "events", "k");
	assert_string_equal(f->m.message_id, id);
	evhttp_clear_headers(&f->h);

	id[255] = 'i';
	id[256] = '\0';
	add(f, "Message-Id", id);
	expect_fail(f, f->open, "/v1/publish/events/k", "bad-header");
	evhttp_clear_headers(&f->h);

	add(f, "Message-Id", "has space");
	expect_fail(f, f->open, "/v1/publish/events/k", "bad-header");
	evhttp_clear_headers(&f->h);

	add(f, "Message-Id", "");
	expect_fail(f, f->open, "/v1/publish/events/k", "bad-header");
	evhttp_clear_headers(&f->h);

	add(f, "Message-Id", "caf\xc3\xa9");
	expect_fail(f, f->open, "/v1/publish/events/k", "bad-header");
}

static void
test_expiration_digits_only(void **state)
{
	static const char *const bad[] = { "10s", "-1", "", "1.5", " 10", "0x10",
		"12345678901" };
	struct fx *f = *state;
	size_t i;

	for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		add(f, "Amqp-Expiration", bad[i]);
		if (parse(f, f->open, "/v1/publish/events/k") != -1)
			fail_msg("Amqp-Expiration '%s' accepted", bad[i]);
		assert_string_equal(f->error, "bad-header");
		evhttp_clear_headers(&f->h);
	}
	add(f, "Amqp-Expiration", "0");
	expect_ok(f, f->open, "/v1/publish/events/k", "events", "k");
	assert_string_equal(f->m.props.expiration, "0");
}

static void
test_expiration_within_broker_limit(void **state)
{
	struct fx *f = *state;

	add(f, "Amqp-Expiration", "4294967295");
	expect_ok(f, f->open, "/v1/publish/events/k", "events", "k");
	assert_string_equal(f->m.props.expiration, "4294967295");
	evhttp_clear_headers(&f->h);
	/*
	 * Regression (fixed): ingress_digits() accepts any 1-10 digits, so "4294967296" and
	 * "9999999999" are stored and answered 202. RabbitMQ refuses an
	 * expiration above 4294967295 ms (rabbit_misc:check_expiry,
	 * MAX_EXPIRY_TIMER): basic.publish fails with PRECONDITION_FAILED
	 * "invalid expiration" and the channel is closed, so the accepted
	 * message can never be published. It should be a 400 bad-header.
	 */
	add(f, "Amqp-Expiration", "4294967296");
	expect_fail(f, f->open, "/v1/publish/events/k", "bad-header");
	evhttp_clear_headers(&f->h);
	add(f, "Amqp-Expiration", "9999999999");
	expect_fail(f, f->open, "/v1/publish/events/k", "bad-header");
}

static void
test_property_header_limits(void **state)
{
	struct fx *f = *state;
	char v[300];

	memset(v, 'c', 256);
	v[256] = '\0';
	add(f, "Content-Type", v);
	expect_fail(f, f->open, "/v1/publish/events/k", "bad-header");
	evhttp_clear_headers(&f->h);

	add(f, "Correlation-Id", "a\x01z");
	expect_fail(f, f->open, "/v1/publish/events/k", "bad-header");
	evhttp_clear_headers(&f->h);

	add(f, "Amqp-Type", "tab\there");
	expect_fail(f, f->open, "/v1/publish/events/k", "bad-header");
}

static void
test_amqp_header_names(void **state)
{
	struct fx *f = *state;
	char name[160];
	int n;

	add(f, "Amqp-Header-", "nameless");
	expect_fail(f, f->open, "/v1/publish/events/k", "bad-header");
	evhttp_clear_headers(&f->h);

	n = snprintf(name, sizeof name, "Amqp-Header-");
	memset(name + n, 'h', 129);
	name[n + 129] = '\0';
	add(f, name, "v");
	expect_fail(f, f->open, "/v1/publish/events/k", "bad-header");
	evhttp_clear_headers(&f->h);

	name[n + 128] = '\0';
	add(f, name, "v");
	expect_ok(f, f->open, "/v1/publish/events/k", "events", "k");
	assert_int_equal(f->m.props.n_headers, 1);
	assert_int_equal(strlen(f->m.props.headers[0].name), 128);
	evhttp_clear_headers(&f->h);

	add(f, "Amqp-Header-X", "bad\x02value");
	expect_fail(f, f->open, "/v1/publish/events/k", "bad-header");
	evhttp_clear_headers(&f->h);

	/* the same header twice: the last one wins, once */
	add(f, "Amqp-Header-Dup", "one");
	add(f, "amqp-header-dup", "two");
	expect_ok(f, f->open, "/v1/publish/events/k", "events", "k");
	assert_int_equal(f->m.props.n_headers, 1);
	assert_string_equal(props_get_header(&f->m.props, "dup"), "two");
}

static void
test_error_after_partial_parse_frees(void **state)
{
	struct fx *f = *state;

	/* good values first, then a bad one: everything taken so far must be
	 * released by the caller's usual cleanup (valgrind checks) */
	add(f, "Content-Type", "application/json");
	add(f, "Amqp-Header-A", "1");
	add(f, "Causation-Id", "c");
	add(f, "Message-Id", "m");
	add(f, "Amqp-Expiration", "soon");
	expect_fail(f, f->open, "/v1/publish/events/k", "bad-header");
	/* the path was parsed before the headers */
	assert_string_equal(f->m.exchange, "events");
}

int
main(void)
{
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
	const struct CMUnitTest tests[] = {
		T(test_path_simple),
		T(test_path_percent_decoded),
		T(test_path_default_exchange),
		T(test_path_key_with_slashes),
		T(test_path_query_ignored),
		T(test_path_malformed),
		T(test_bad_exchange),
		T(test_unknown_exchange_when_configured),
		T(test_bad_routing_key),
		T(test_header_mapping),
		T(test_trace_context),
		T(test_header_names_case_insensitive),
		T(test_generated_message_id),
		T(test_message_id_limits),
		T(test_expiration_digits_only),
		T(test_expiration_within_broker_limit),
		T(test_property_header_limits),
		T(test_amqp_header_names),
		T(test_error_after_partial_parse_frees),
	};
#undef T

	return cmocka_run_group_tests(tests, NULL, NULL);
}
