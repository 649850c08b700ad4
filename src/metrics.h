/* Prometheus text exposition: counters, gauges and histograms. */
#ifndef SAGAD_METRICS_H
#define SAGAD_METRICS_H

#include <stddef.h>
#include <stdint.h>

struct evbuffer;

#define METRICS_MAX_BUCKETS 20

struct histogram {
	const double *bounds;	/* upper bounds, ascending; +Inf is implied */
	size_t n;
	uint64_t counts[METRICS_MAX_BUCKETS];	/* per bucket, not cumulative */
	uint64_t count;
	double sum;
};

/* Bounds for latencies from 0.5 ms to 60 s. */
extern const double metrics_latency_bounds[];
extern const size_t metrics_latency_nbounds;

void histogram_init(struct histogram *h, const double *bounds, size_t n);
void histogram_observe(struct histogram *h, double v);
/* The q-quantile (0..1) by linear interpolation inside its bucket. */
double histogram_quantile(const struct histogram *h, double q);

/* # HELP and # TYPE lines of a family; type is counter, gauge, histogram. */
void metrics_family(struct evbuffer *out, const char *name, const char *type,
    const char *help);
/* One sample; labels is "" or like "subscription=\"inbox\"". */
void metrics_sample(struct evbuffer *out, const char *name, const char *labels,
    double v);
void metrics_histogram(struct evbuffer *out, const char *name,
    const char *labels, const struct histogram *h);

#endif
