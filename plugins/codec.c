/* The row encoding shared by the source plugins (see codec.h). */
#include "codec.h"

#include <event2/event.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int
codec_hexval(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Decodes n hex digits at s into out (n/2 bytes); -1 if not hex. */
int
codec_unhex(const char *s, size_t n, char *out)
{
	size_t i;

	if (n % 2)
		return -1;
	for (i = 0; i < n; i += 2) {
		int a = codec_hexval(s[i]), b = codec_hexval(s[i + 1]);
		if (a < 0 || b < 0)
			return -1;
		out[i / 2] = (char)(a << 4 | b);
	}
	return 0;
}

/* "hexname:hexvalue,..." (what headers_expr produces) -> arrays of
 * NUL-terminated strings in one allocation. -1 on a malformed string or a
 * name or value with a NUL byte. */
int
codec_headers(const char *s, char ***names, char ***values, size_t *n, char **mem)
{
	size_t len = strlen(s), cnt = 1, i;
	const char *q;
	char *buf, *w;

	*n = 0;
	*names = *values = NULL;
	*mem = NULL;
	if (!len)
		return 0;
	for (q = s; *q; q++)
		cnt += *q == ',';
	*mem = buf = xmalloc(len + cnt * 2 + 1);
	*names = xcalloc(cnt, sizeof **names);
	*values = xcalloc(cnt, sizeof **values);
	w = buf;
	for (i = 0; i < cnt; i++) {
		const char *end = strchr(s, ','), *colon = strchr(s, ':');
		size_t total = end ? (size_t)(end - s) : strlen(s);
		size_t nl, vl;
		if (!colon || colon > s + total)
			return -1;
		nl = (size_t)(colon - s);
		vl = total - nl - 1;
		(*names)[i] = w;
		if (codec_unhex(s, nl, w) < 0 || memchr(w, 0, nl / 2))
			return -1;
		w += nl / 2;
		*w++ = '\0';
		(*values)[i] = w;
		if (codec_unhex(colon + 1, vl, w) < 0 || memchr(w, 0, vl / 2))
			return -1;
		w += vl / 2;
		*w++ = '\0';
		s += total + 1;
	}
	*n = cnt;
	return 0;
}

int
codec_publish_row(const struct sagad_host_api *api, struct sagad_host *h,
    const struct sagad_message *m, long long seq, const char *table, const char *why)
{
	enum sagad_publish_result pr;

	if (!why) {
		pr = api->publish(h, m);
		switch (pr) {
		case SAGAD_PUBLISH_STORED:
			api->counter_add(h, "rows_read", 1);
			return 1;
		case SAGAD_PUBLISH_DUPLICATE:
			api->counter_add(h, "rows_read", 1);
			api->counter_add(h, "duplicates", 1);
			SAGAD_LOG(api, h, SAGAD_LOG_DEBUG, "duplicate row dropped", SAGAD_INT("seq", seq),
			    SAGAD_STR("message_id", m->message_id));
			return 1;
		case SAGAD_PUBLISH_INVALID:
			why = "a value sagad cannot publish (missing message_id or routing_key, "
			    "bad exchange name, control characters, or too long)";
			break;
		default:
			SAGAD_LOG(api, h, pr == SAGAD_PUBLISH_FULL ? SAGAD_LOG_WARN : SAGAD_LOG_ERROR,
			    "sagad's store refused a row, retrying later", SAGAD_INT("seq", seq),
			    SAGAD_STR("reason", pr == SAGAD_PUBLISH_FULL ? "full" : "error"));
			api->counter_add(h, "errors", 1);
			return -1;
		}
	}
	SAGAD_LOG(api, h, SAGAD_LOG_ERROR, "row left in the table", SAGAD_STR("reason", why),
	    SAGAD_STR("table", table), SAGAD_INT("seq", seq), SAGAD_STR("message_id", m->message_id));
	api->counter_add(h, "errors", 1);
	return 0;
}

/* ---- a row -> a message ---- */

const char *
codec_row_headers(struct sagad_message *m, struct codec_hdrs *hd, int bad, const char *hx)
{
	const char *why = NULL;

	memset(hd, 0, sizeof *hd);
	if (bad)
		why = "headers is not a JSON object";
	else if (hx && codec_headers(hx, &hd->names, &hd->values, &hd->n, &hd->mem) < 0)
		why = "a header name or value holds a NUL character";
	m->header_names = (const char *const *)hd->names;
	m->header_values = (const char *const *)hd->values;
	m->n_headers = hd->n;
	return why;
}

void
codec_hdrs_free(struct codec_hdrs *hd)
{
	free(hd->names);
	free(hd->values);
	free(hd->mem);
}

/* ---- the books of a batch ---- */

int
codec_take_row(const struct sagad_host_api *api, struct sagad_host *h,
    struct codec_rows *rs, const struct sagad_message *m, int64_t seq, const char *table,
    const char *why)
{
	int ret = codec_publish_row(api, h, m, (long long)seq, table, why);

	if (ret == 0 && rs->nskip < CODEC_MAX_SKIP)
		rs->skip[rs->nskip++] = seq;
	if (ret == 1)
		*XPUSH(rs->seqs, rs->nseqs, rs->capseqs) = seq;
	return ret;
}

size_t
codec_skip_list(struct codec_rows *rs, char *out)
{
	size_t i, len = 0;

	if (rs->nskip && time(NULL) - rs->skip_since > 60)
		rs->nskip = 0;	/* look at them again: they may have been fixed */
	if (!rs->nskip)
		rs->skip_since = time(NULL);
	out[0] = '\0';
	for (i = 0; i < rs->nskip; i++)
		len += (size_t)sprintf(out + len, "%s%lld", i ? "," : "", (long long)rs->skip[i]);
	return len;
}

struct codec_ticket {
	void *src;
	unsigned long batch;
};

void
codec_when_durable(const struct sagad_host_api *api, struct sagad_host *h,
    sagad_durable_fn *fn, void *src, unsigned long batch)
{
	struct codec_ticket *t = xmalloc(sizeof *t);

	t->src = src;
	t->batch = batch;
	api->when_durable(h, fn, t);
}

void *
codec_ticket_take(void *cookie, unsigned long *batch)
{
	struct codec_ticket *t = cookie;
	void *src = t->src;

	*batch = t->batch;
	free(t);
	return src;
}

void
codec_lost_batch(const struct sagad_host_api *api, struct sagad_host *h, size_t rows)
{
	SAGAD_LOG(api, h, SAGAD_LOG_WARN, "sagad's store lost a batch, reading it again",
	    SAGAD_UINT("rows", rows));
	api->counter_add(h, "errors", 1);
}

/* ---- settings, time, reports ---- */

double
codec_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void
codec_timer(struct event *ev, double sec)
{
	struct timeval tv;

	if (sec < 0)
		sec = 0;
	tv.tv_sec = (time_t)sec;
	tv.tv_usec = (suseconds_t)((sec - (double)tv.tv_sec) * 1e6);
	event_add(ev, &tv);
}

void
codec_clean(char *s)
{
	for (; *s; s++)
		if (*s == '\n' || *s == '\r' || *s == '\t')
			*s = ' ';
		else if (*s == '"')
			*s = '\'';
}

double
codec_backoff(double *cur, double initial, double max)
{
	*cur = *cur ? fmin(*cur * 2, max) : initial;
	return *cur;
}

void
codec_reconnect_later(struct event *ev, double *backoff, double max)
{
	/* Jitter, so that replicas do not reconnect in step. */
	codec_timer(ev, *backoff * (0.75 + 0.5 * ((double)rand() / RAND_MAX)));
	*backoff = fmin(*backoff * 2, max);
}

int
codec_conf_number(const struct sagad_host_api *api, struct sagad_host *h, const char *key,
    double *out, double min, char *err, size_t errlen)
{
	double v;
	const char *str;
	int b;

	if (api->conf_number(h, key, &v) < 0) {
		if (api->conf_string(h, key, &str) == 0 || api->conf_bool(h, key, &b) == 0) {
			snprintf(err, errlen, "'%s' must be a number", key);
			return -1;
		}
		return 0;
	}
	if (!(v >= min) || !isfinite(v)) {
		snprintf(err, errlen, "'%s' must be a number of at least %g", key, min);
		return -1;
	}
	*out = v;
	return 0;
}

int
codec_conf_pacing(const struct sagad_host_api *api, struct sagad_host *h, double *poll,
    double *batch, double *retry_initial, double *retry_max, char *err, size_t errlen)
{
	if (codec_conf_number(api, h, "poll_interval", poll, 0.01, err, errlen) < 0 ||
	    codec_conf_number(api, h, "batch", batch, 1, err, errlen) < 0 ||
	    codec_conf_number(api, h, "retry_initial", retry_initial, 0.01, err, errlen) < 0 ||
	    codec_conf_number(api, h, "retry_max", retry_max, 0.01, err, errlen) < 0)
		return -1;
	return 0;
}

int
codec_conf_batch(double batch, long *batch_size, double retry_initial, double *retry_max,
    char *err, size_t errlen)
{
	if (batch > 10000 || batch != floor(batch)) {
		snprintf(err, errlen, "'batch' must be a whole number from 1 to 10000");
		return -1;
	}
	*batch_size = (long)batch;
	if (*retry_max < retry_initial)
		*retry_max = retry_initial;
	return 0;
}

int
codec_conf_table(const struct sagad_host_api *api, struct sagad_host *h, const char **table,
    char *err, size_t errlen)
{
	const char *str;

	if (api->conf_string(h, "table", &str) < 0)
		return 0;
	if (!*str) {
		snprintf(err, errlen, "'table' must not be empty");
		return -1;
	}
	*table = str;
	return 0;
}

int
codec_abi_check(const struct sagad_host_api *api, char *err, size_t errlen)
{
	if (api->abi == SAGAD_PLUGIN_ABI)
		return 0;
	snprintf(err, errlen, "host ABI %u, plugin ABI %u", api->abi, SAGAD_PLUGIN_ABI);
	return -1;
}

void
codec_report_down(const struct sagad_host_api *api, struct sagad_host *h, const char *why,
    char *reason, size_t reason_len, int *logged_down, const char *key, const char *val,
    double retry_in)
{
	/* Built by hand: SAGAD_STR wants a literal key. */
	struct sagad_log_field f[2] = {
		{ .key = key, .type = SAGAD_LOG_T_STR, .v.s = val },
		{ .key = "retry_in", .type = SAGAD_LOG_T_DBL, .v.d = retry_in },
	};

	api->counter_add(h, "errors", 1);
	api->log(h, !*logged_down || strcmp(reason, why) != 0 ? SAGAD_LOG_ERROR : SAGAD_LOG_DEBUG,
	    why, f, 2);
	*logged_down = 1;
	snprintf(reason, reason_len, "%s", why);
	api->set_ready(h, 0, reason);
}

void
codec_report_up(const struct sagad_host_api *api, struct sagad_host *h, char *reason,
    int *logged_down)
{
	*logged_down = 0;
	reason[0] = '\0';
	api->set_ready(h, 1, NULL);
}
