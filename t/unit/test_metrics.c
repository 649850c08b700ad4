/* Unit tests for src/metrics.c: histograms and the Prometheus text format. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <event2/buffer.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "metrics.h"

static const double b3[] = { 1, 2, 4 };

static void
assert_near(double got, double want)
{
	if (fabs(got - want) > 1e-9)
		fail_msg("got %.17g, want %.17g", got, want);
}

/* The whole text of an evbuffer, NUL-terminated; the caller frees it. */
static char *
text_of(struct evbuffer *b)
{
	size_t n = evbuffer_get_length(b);
	char *s = malloc(n + 1);

	evbuffer_copyout(b, s, n);
	s[n] = '\0';
	return s;
}

static void
test_observe_buckets(void **state)
{
	struct histogram h;

	(void)state;
	histogram_init(&h, b3, 3);
	assert_int_equal(h.n, 3);
	assert_int_equal(h.count, 0);
	histogram_observe(&h, 0.5);
	histogram_observe(&h, 1);	/* le="1" includes 1 */
	histogram_observe(&h, 1.5);
	histogram_observe(&h, 2);
	histogram_observe(&h, 4.0001);
	histogram_observe(&h, 100);
	histogram_observe(&h, 0);
	assert_int_equal(h.counts[0], 3);	/* 0, 0.5, 1 */
	assert_int_equal(h.counts[1], 2);	/* 1.5, 2 */
	assert_int_equal(h.counts[2], 0);
	assert_int_equal(h.counts[3], 2);	/* +Inf */
	assert_int_equal(h.count, 7);
	assert_near(h.sum, 0.5 + 1 + 1.5 + 2 + 4.0001 + 100);
}

static void
test_init_resets(void **state)
{
	struct histogram h;

	(void)state;
	histogram_init(&h, b3, 3);
	histogram_observe(&h, 3);
	histogram_init(&h, b3, 3);
	assert_int_equal(h.count, 0);
	assert_int_equal(h.counts[2], 0);
	assert_near(h.sum, 0);
}

static void
test_too_many_bounds_clamped(void **state)
{
	double many[30];
	struct histogram h;
	int i;

	(void)state;
	for (i = 0; i < 30; i++)
		many[i] = i + 1;
	histogram_init(&h, many, 30);
	/* one slot stays for +Inf */
	assert_int_equal(h.n, METRICS_MAX_BUCKETS - 1);
	histogram_observe(&h, 1e9);
	assert_int_equal(h.counts[METRICS_MAX_BUCKETS - 1], 1);
	assert_int_equal(h.count, 1);
}

static void
test_quantile(void **state)
{
	struct histogram h;

	(void)state;
	histogram_init(&h, b3, 3);
	assert_true(isnan(histogram_quantile(&h, 0.5)));
	/* 2 in (0,1], 1 in (1,2], 1 in (2,4], 1 above 4 */
	histogram_observe(&h, 0.2);
	histogram_observe(&h, 0.9);
	histogram_observe(&h, 1.7);
	histogram_observe(&h, 3);
	histogram_observe(&h, 9);
	assert_near(histogram_quantile(&h, 0.2), 0.5);	/* rank 1 of 2 in [0,1] */
	assert_near(histogram_quantile(&h, 0.4), 1.0);	/* rank 2: top of bucket 1 */
	assert_near(histogram_quantile(&h, 0.5), 1.5);	/* rank 2.5: half of (1,2] */
	assert_near(histogram_quantile(&h, 0.7), 3.0);	/* rank 3.5: half of (2,4] */
	/* in the +Inf bucket: the highest finite bound, as Prometheus does */
	assert_near(histogram_quantile(&h, 0.99), 4.0);
	assert_near(histogram_quantile(&h, 1.0), 4.0);
}

static void
test_quantile_skips_empty_buckets(void **state)
{
	struct histogram h;

	(void)state;
	histogram_init(&h, b3, 3);
	for (int i = 0; i < 4; i++)
		histogram_observe(&h, 3.5);	/* all in (2,4] */
	assert_near(histogram_quantile(&h, 0.5), 3.0);
	assert_near(histogram_quantile(&h, 1.0), 4.0);
	assert_near(histogram_quantile(&h, 0.25), 2.5);
}

static void
test_latency_bounds(void **state)
{
	size_t i;

	(void)state;
	assert_true(metrics_latency_nbounds >= 2);
	assert_true(metrics_latency_nbounds < METRICS_MAX_BUCKETS);
	assert_near(metrics_latency_bounds[0], 0.0005);
	assert_near(metrics_latency_bounds[metrics_latency_nbounds - 1], 60);
	for (i = 1; i < metrics_latency_nbounds; i++)
		assert_true(metrics_latency_bounds[i] > metrics_latency_bounds[i - 1]);
}

static void
test_histogram_text(void **state)
{
	static const double bounds[] = { 0.5, 1, 2.5 };
	struct evbuffer *b = evbuffer_new();
	struct histogram h;
	char *s;

	(void)state;
	histogram_init(&h, bounds, 3);
	histogram_observe(&h, 0.25);
	histogram_observe(&h, 0.75);
	histogram_observe(&h, 2);
	histogram_observe(&h, 10);
	metrics_histogram(b, "sagad_publish_seconds", "", &h);
	s = text_of(b);
	assert_string_equal(s,
	    "sagad_publish_seconds_bucket{le=\"0.5\"} 1\n"
	    "sagad_publish_seconds_bucket{le=\"1\"} 2\n"
	    "sagad_publish_seconds_bucket{le=\"2.5\"} 3\n"
	    "sagad_publish_seconds_bucket{le=\"+Inf\"} 4\n"
	    "sagad_publish_seconds_sum 13\n"
	    "sagad_publish_seconds_count 4\n");
	free(s);
	evbuffer_free(b);
}

static void
test_histogram_text_labels(void **state)
{
	static const double bounds[] = { 0.001, 1 };
	struct evbuffer *b = evbuffer_new();
	struct histogram h;
	char *s;

	(void)state;
	histogram_init(&h, bounds, 2);
	histogram_observe(&h, 0.5);
	histogram_observe(&h, 1.5);
	metrics_histogram(b, "lat", "subscription=\"inbox\"", &h);
	s = text_of(b);
	assert_string_equal(s,
	    "lat_bucket{subscription=\"inbox\",le=\"0.001\"} 0\n"
	    "lat_bucket{subscription=\"inbox\",le=\"1\"} 1\n"
	    "lat_bucket{subscription=\"inbox\",le=\"+Inf\"} 2\n"
	    "lat_sum{subscription=\"inbox\"} 2\n"
	    "lat_count{subscription=\"inbox\"} 2\n");
	free(s);
	evbuffer_free(b);
}

static void
test_histogram_text_null_labels_empty(void **state)
{
	struct evbuffer *b = evbuffer_new();
	struct histogram h;
	char *s;

	(void)state;
	histogram_init(&h, b3, 3);
	metrics_histogram(b, "x", NULL, &h);
	s = text_of(b);
	assert_string_equal(s,
	    "x_bucket{le=\"1\"} 0\n"
	    "x_bucket{le=\"2\"} 0\n"
	    "x_bucket{le=\"4\"} 0\n"
	    "x_bucket{le=\"+Inf\"} 0\n"
	    "x_sum 0\n"
	    "x_count 0\n");
	free(s);
	evbuffer_free(b);
}

static void
test_family_and_sample(void **state)
{
	struct evbuffer *b = evbuffer_new();
	char *s;

	(void)state;
	metrics_family(b, "sagad_outbox_messages", "gauge", "Messages in the outbox.");
	metrics_sample(b, "sagad_outbox_messages", "", 42);
	metrics_sample(b, "sagad_outbox_messages", NULL, 1.5);
	metrics_sample(b, "sagad_deliveries_total", "subscription=\"inbox\",outcome=\"ok\"", 7);
	s = text_of(b);
	assert_string_equal(s,
	    "# HELP sagad_outbox_messages Messages in the outbox.\n"
	    "# TYPE sagad_outbox_messages gauge\n"
	    "sagad_outbox_messages 42\n"
	    "sagad_outbox_messages 1.5\n"
	    "sagad_deliveries_total{subscription=\"inbox\",outcome=\"ok\"} 7\n");
	free(s);
	evbuffer_free(b);
}

static void
test_sample_large_counter_exact(void **state)
{
	struct evbuffer *b = evbuffer_new();
	char *s;

	(void)state;
	/* counters above 2^32 print as integers, without losing digits */
	metrics_sample(b, "c", "", 123456789012.0);
	s = text_of(b);
	assert_string_equal(s, "c 123456789012\n");
	free(s);
	evbuffer_free(b);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_observe_buckets),
		cmocka_unit_test(test_init_resets),
		cmocka_unit_test(test_too_many_bounds_clamped),
		cmocka_unit_test(test_quantile),
		cmocka_unit_test(test_quantile_skips_empty_buckets),
		cmocka_unit_test(test_latency_bounds),
		cmocka_unit_test(test_histogram_text),
		cmocka_unit_test(test_histogram_text_labels),
		cmocka_unit_test(test_histogram_text_null_labels_empty),
		cmocka_unit_test(test_family_and_sample),
		cmocka_unit_test(test_sample_large_counter_exact),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
