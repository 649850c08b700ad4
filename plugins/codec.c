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
	*mem = buf = malloc(len + cnt * 2 + 1);
	*names = calloc(cnt, sizeof **names);
	*values = calloc(cnt, sizeof **values);
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
