/* Unit tests for src/otel.c: the endpoint, spans and their contexts, the
 * bounded queue. The export itself is tested against a collector in
 * t/integration/tracing.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "otel.h"

#define TP "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

static void
test_endpoint(void **state)
{
	char host[256], *path = NULL;
	int port = 0;

	(void)state;
	assert_int_equal(otel_parse_endpoint("http://127.0.0.1:4318/v1/traces", host,
	    sizeof host, &port, &path), 0);
	assert_string_equal(host, "127.0.0.1");
	assert_int_equal(port, 4318);
	assert_string_equal(path, "/v1/traces");
	free(path);
	assert_int_equal(otel_parse_endpoint("http://collector", host, sizeof host, &port, &path), 0);
	assert_string_equal(host, "collector");
	assert_int_equal(port, 4318);				/* OTLP/HTTP's */
	assert_string_equal(path, "/v1/traces");
	free(path);
	assert_int_equal(otel_parse_endpoint("http://[::1]:9000/otlp/v1/traces", host,
	    sizeof host, &port, &path), 0);
	assert_string_equal(host, "::1");
	assert_int_equal(port, 9000);
	assert_string_equal(path, "/otlp/v1/traces");
	free(path);
	assert_int_equal(otel_parse_endpoint("https://h/v1/traces", host, sizeof host, &port,
	    &path), -1);					/* no TLS */
	assert_int_equal(otel_parse_endpoint("http://h:0/", host, sizeof host, &port, &path), -1);
	assert_int_equal(otel_parse_endpoint("http://h:70000", host, sizeof host, &port, &path), -1);
	assert_int_equal(otel_parse_endpoint("http://h:12x/", host, sizeof host, &port, &path), -1);
	assert_int_equal(otel_parse_endpoint("http://:80/", host, sizeof host, &port, &path), -1);
	assert_int_equal(otel_parse_endpoint("http://[::1/", host, sizeof host, &port, &path), -1);
}

static void
test_child(void **state)
{
	char out[TRACE_PARENT_LEN + 1];

	(void)state;
	otel_child(TP, "1111222233334444", out);
	assert_string_equal(out, "00-4bf92f3577b34da6a3ce929d0e0e4736-1111222233334444-01");
	/* a later version goes on as 00, without its extra fields */
	otel_child("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more",
	    "1111222233334444", out);
	assert_string_equal(out, "00-4bf92f3577b34da6a3ce929d0e0e4736-1111222233334444-01");
}

struct fx {
	struct event_base *base;
	struct sagad_conf conf;
	struct otel *o;
};

static int
setup(void **state)
{
	struct fx *f = calloc(1, sizeof *f);
	char *err = NULL;

	f->base = event_base_new();
	f->conf.service = "orders";
	f->conf.tracing.endpoint = "http://127.0.0.1:9/v1/traces";	/* nobody */
	f->conf.tracing.sampling = 1;
	f->conf.tracing.queue = 4;
	f->conf.tracing.batch = 2;
	f->conf.tracing.interval = 60;
	f->conf.tracing.timeout = 5;
	f->o = otel_new(f->base, &f->conf, &err);
	assert_non_null(f->o);
	assert_null(err);
	*state = f;
	return 0;
}

static int
teardown(void **state)
{
	struct fx *f = *state;

	otel_free(f->o);
	event_base_free(f->base);
	free(f);
	return 0;
}

static double
metric(struct otel *o, const char *name)
{
	struct evbuffer *b = evbuffer_new();
	char *text, *p;
	double v = -1;

	otel_metrics(o, b);
	evbuffer_add(b, "", 1);
	text = (char *)evbuffer_pullup(b, -1);
	for (p = text; p; p = strchr(p, '\n'))	/* a sample line, not # HELP */
		if (*p == '\n' && !strncmp(++p, name, strlen(name))) {
			v = strtod(p + strlen(name), NULL);
			break;
		}
	evbuffer_free(b);
	return v;
}

static void
test_off(void **state)
{
	struct sagad_conf c;
	char *err = NULL;

	(void)state;
	memset(&c, 0, sizeof c);
	assert_null(otel_new(NULL, &c, &err));		/* no endpoint */
	assert_null(err);
	assert_null(otel_span_start(NULL, TP, "x", OTEL_INTERNAL, 1));
	otel_span_str(NULL, "k", "v");			/* NULL spans are fine */
	otel_span_end(NULL, NULL, 2, NULL);
	otel_span_drop(NULL);
	c.tracing.endpoint = "ftp://x";
	assert_null(otel_new(NULL, &c, &err));
	assert_non_null(err);
	free(err);
}

static void
test_sampled_only(void **state)
{
	struct fx *f = *state;
	struct otel_span *s;

	assert_null(otel_span_start(f->o, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
	    "x", OTEL_INTERNAL, 1));
	assert_null(otel_span_start(f->o, "garbage", "x", OTEL_INTERNAL, 1));
	assert_null(otel_span_start(f->o, NULL, "x", OTEL_INTERNAL, 1));
	s = otel_span_start(f->o, TP, "x", OTEL_PRODUCER, 1);
	assert_non_null(s);
	assert_int_equal(strlen(otel_span_id(s)), 16);
	assert_string_not_equal(otel_span_id(s), "00f067aa0ba902b7");
	otel_span_set_id(s, "aaaabbbbccccdddd");
	assert_string_equal(otel_span_id(s), "aaaabbbbccccdddd");
	otel_span_drop(s);
}

/* The queue holds tracing.queue spans: a batch goes out (it cannot be
 * answered: the loop does not run), the next fill the queue, the rest are
 * dropped and counted. */
static void
test_queue_bound(void **state)
{
	struct fx *f = *state;
	int i;

	for (i = 0; i < 9; i++) {
		struct otel_span *s = otel_span_start(f->o, TP, "x", OTEL_INTERNAL, 1);
		otel_span_str(s, "k", "v");
		otel_span_int(s, "n", i);
		otel_span_end(f->o, s, 2, i % 2 ? "failed" : NULL);
	}
	/* 2 in the request, 4 queued, 3 dropped */
	assert_true(metric(f->o, "sagad_trace_queue ") == 4);
	assert_true(metric(f->o, "sagad_trace_spans_total{result=\"dropped\"} ") == 3);
	assert_true(metric(f->o, "sagad_trace_spans_total{result=\"exported\"} ") == 0);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_endpoint),
		cmocka_unit_test(test_child),
		cmocka_unit_test(test_off),
		cmocka_unit_test_setup_teardown(test_sampled_only, setup, teardown),
		cmocka_unit_test_setup_teardown(test_queue_bound, setup, teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
