#include "metrics.h"

#include <event2/buffer.h>
#include <math.h>
#include <string.h>

const double metrics_latency_bounds[] = {
	0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
	1, 2.5, 5, 10, 30, 60
};
const size_t metrics_latency_nbounds =
    sizeof metrics_latency_bounds / sizeof metrics_latency_bounds[0];

void
histogram_init(struct histogram *h, const double *bounds, size_t n)
{
	memset(h, 0, sizeof *h);
	h->bounds = bounds;
	h->n = n < METRICS_MAX_BUCKETS - 1 ? n : METRICS_MAX_BUCKETS - 1;
}

void
histogram_observe(struct histogram *h, double v)
{
	size_t i;

	for (i = 0; i < h->n && v > h->bounds[i]; i++)
		;
	h->counts[i]++;		/* i == n is the +Inf bucket */
	h->count++;
	h->sum += v;
}

double
histogram_quantile(const struct histogram *h, double q)
{
	double rank = q * h->count, seen = 0, lo = 0;
	size_t i;

	if (!h->count)
		return NAN;
	for (i = 0; i <= h->n; i++) {
		double hi = i < h->n ? h->bounds[i] : lo;
		if (seen + h->counts[i] >= rank && h->counts[i]) {
			if (i == h->n)
				return lo;
			return lo + (hi - lo) * (rank - seen) / h->counts[i];
		}
		seen += h->counts[i];
		lo = hi;
	}
	return lo;
}

void
metrics_family(struct evbuffer *out, const char *name, const char *type,
    const char *help)
{
	evbuffer_add_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void
metrics_sample(struct evbuffer *out, const char *name, const char *labels, double v)
{
	if (labels && *labels)
		evbuffer_add_printf(out, "%s{%s} %.17g\n", name, labels, v);
	else
		evbuffer_add_printf(out, "%s %.17g\n", name, v);
}

void
metrics_histogram(struct evbuffer *out, const char *name, const char *labels,
    const struct histogram *h)
{
	const char *sep = labels && *labels ? "," : "";
	uint64_t cum = 0;
	size_t i;

	if (!labels)
		labels = "";
	for (i = 0; i < h->n; i++) {
		cum += h->counts[i];
		evbuffer_add_printf(out, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, sep,
		    h->bounds[i], (unsigned long long)cum);
	}
	evbuffer_add_printf(out, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, sep,
	    (unsigned long long)h->count);
	if (*labels) {
		evbuffer_add_printf(out, "%s_sum{%s} %.17g\n", name, labels, h->sum);
		evbuffer_add_printf(out, "%s_count{%s} %llu\n", name, labels,
		    (unsigned long long)h->count);
	} else {
		evbuffer_add_printf(out, "%s_sum %.17g\n", name, h->sum);
		evbuffer_add_printf(out, "%s_count %llu\n", name, (unsigned long long)h->count);
	}
}
