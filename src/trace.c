#include "trace.h"
#include "conf.h"
#include "props.h"
#include "util.h"
#include "xmalloc.h"

#include <stdint.h>
#include <string.h>

/* n lowercase hex digits at s, not all zeros when nonzero is set. */
static int
trace_hex(const char *s, size_t n, int nonzero)
{
	size_t i;
	int any = 0;

	for (i = 0; i < n; i++) {
		if (!strchr("0123456789abcdef", s[i]) || !s[i])
			return 0;
		any |= s[i] != '0';
	}
	return any || !nonzero;
}

int
trace_parent_valid(const char *s)
{
	size_t n = strlen(s);

	if (n < TRACE_PARENT_LEN || !trace_hex(s, 2, 0) || strncmp(s, "ff", 2) == 0)
		return 0;
	if (s[2] != '-' || s[35] != '-' || s[52] != '-')
		return 0;
	if (!trace_hex(s + 3, 32, 1) || !trace_hex(s + 36, 16, 1) || !trace_hex(s + 53, 2, 0))
		return 0;
	/* Version 00 has nothing after the flags; a later one may, after a
	 * dash, and is read as 00 (the spec's rule for unknown versions). */
	if (strncmp(s, "00", 2) == 0)
		return n == TRACE_PARENT_LEN;
	return n == TRACE_PARENT_LEN || s[TRACE_PARENT_LEN] == '-';
}

int
trace_state_valid(const char *s)
{
	size_t n = 0;

	for (; *s; s++, n++)	/* W3C: list members of printable ASCII */
		if (*s < 0x20 || *s > 0x7e || n >= TRACE_STATE_MAX)
			return 0;
	return 1;
}

/* v as 16 lowercase hex digits at out (no NUL). */
static void
trace_hex64(char *out, uint64_t v)
{
	static const char hex[] = "0123456789abcdef";
	int i;

	for (i = 15; i >= 0; i--, v >>= 4)
		out[i] = hex[v & 15];
}

void
trace_new(char out[TRACE_PARENT_LEN + 1], int sampled)
{
	uint64_t hi = util_rand64(), lo = util_rand64(), parent;

	while (!(parent = util_rand64()))
		;	/* never zero (nor is a 128-bit trace id, in practice) */
	/* By hand: snprintf's %016llx was a tenth of a publish's
	 * instructions (callgrind). */
	memcpy(out, "00-", 3);
	trace_hex64(out + 3, hi);
	trace_hex64(out + 19, lo);
	out[35] = '-';
	trace_hex64(out + 36, parent);
	memcpy(out + 52, sampled ? "-01" : "-00", 4);
}

int
trace_sample(const struct sagad_conf *conf)
{
	unsigned char r[4];
	uint32_t x;

	if (!conf->tracing.endpoint || conf->tracing.sampling >= 1)
		return 1;
	util_random(r, sizeof r);
	x = (uint32_t)r[0] << 24 | (uint32_t)r[1] << 16 | (uint32_t)r[2] << 8 | r[3];
	return x < conf->tracing.sampling * 4294967296.0;
}

/* A new trace on a message that has none, if sagad starts them: 1 when
 * it did. */
static int
trace_start(struct props *p, const struct sagad_conf *conf)
{
	char fresh[TRACE_PARENT_LEN + 1];

	if (!conf->tracing.start)
		return 0;
	trace_new(fresh, trace_sample(conf));
	props_set_header(p, TRACE_PARENT, fresh);
	return 1;
}

int
trace_check(struct props *p, const struct sagad_conf *conf, const char **why)
{
	const char *tp = props_get_header(p, TRACE_PARENT);
	const char *ts = props_get_header(p, TRACE_STATE);

	if (tp && !trace_parent_valid(tp)) {
		*why = "traceparent must be version-traceid-parentid-flags in lowercase hex "
		    "(W3C Trace Context), ids not all zeros";
		return -1;
	}
	if (ts && !trace_state_valid(ts)) {
		*why = "tracestate must be at most 512 printable ASCII characters";
		return -1;
	}
	if (!tp && ts) {
		*why = "tracestate without a traceparent";
		return -1;
	}
	if (!tp)
		trace_start(p, conf);
	return 0;
}

int
trace_ensure(struct props *p, const struct sagad_conf *conf)
{
	const char *tp = props_get_header(p, TRACE_PARENT);
	const char *ts = props_get_header(p, TRACE_STATE);

	if (tp && trace_parent_valid(tp)) {
		if (ts && !trace_state_valid(ts))
			props_del_header(p, TRACE_STATE);
		return 0;
	}
	/* Only what is there is deleted: most messages carry neither, and
	 * with no trace to start they cost nothing here. */
	if (ts)
		props_del_header(p, TRACE_STATE);
	if (tp)
		props_del_header(p, TRACE_PARENT);
	return trace_start(p, conf);
}

void
trace_take(const struct props *p, char **parent, char **state)
{
	const char *tp = props_get_header(p, TRACE_PARENT);
	const char *ts = props_get_header(p, TRACE_STATE);

	*parent = *state = NULL;
	if (!tp || !trace_parent_valid(tp))
		return;
	*parent = xstrdup(tp);
	if (ts && trace_state_valid(ts))
		*state = xstrdup(ts);
}

void
trace_put(struct props *p, const char *parent, const char *state)
{
	if (!parent)
		return;
	props_set_header(p, TRACE_PARENT, parent);
	if (state)
		props_set_header(p, TRACE_STATE, state);
}

void
trace_copy(struct props *dst, const struct props *src)
{
	const char *tp = props_get_header(src, TRACE_PARENT);

	trace_put(dst, tp, tp ? props_get_header(src, TRACE_STATE) : NULL);
}

const char *
trace_id(const struct props *p, char out[33])
{
	const char *tp = props_get_header(p, TRACE_PARENT);

	if (!tp || !trace_parent_valid(tp))
		return NULL;
	memcpy(out, tp + 3, 32);
	out[32] = '\0';
	return out;
}
