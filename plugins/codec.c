/* The row encoding shared by the source plugins (see codec.h). */
#include "codec.h"

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
