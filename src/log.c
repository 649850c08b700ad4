#include "log.h"

#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define LOG_LINE_MAX 2048
/* Kept free at the end of every line for the truncation mark. */
#define LOG_TRUNC_MARK " truncated=true"

static enum log_level log_level = LOG_LVL_INFO;

static const char *const log_names[] = { "error", "warn", "info", "debug" };

/* A line being written: cap excludes the room kept for the mark and '\n'. */
struct log_buf {
	char *s;
	size_t n, cap;
};

void
log_set_level(int verbosity)
{
	log_level = verbosity > 0 ? LOG_LVL_DEBUG : LOG_LVL_INFO;
}

int
log_enabled(enum log_level lvl)
{
	return lvl <= log_level;
}

static int
log_put(struct log_buf *b, const char *s, size_t len)
{
	if (len > b->cap - b->n)
		return -1;
	memcpy(b->s + b->n, s, len);
	b->n += len;
	return 0;
}

/* A value goes bare when a logfmt reader cannot misread it: printable
 * ASCII without space, '=', '"' or '\'. */
static int
log_bare_ok(const char *s)
{
	if (!*s)
		return 0;
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c <= 0x20 || c >= 0x7f || c == '=' || c == '"' || c == '\\')
			return 0;
	}
	return 1;
}

/* The escape of one byte into e (at most 4 bytes); returns its length.
 * Bytes above 0x7f are escaped too: the log stays ASCII, and no reader can
 * take a U+2028 or a NEL for the end of a line. */
static size_t
log_escape(unsigned char c, char e[5])
{
	static const char hex[] = "0123456789abcdef";

	switch (c) {
	case '"': case '\\':
		e[0] = '\\'; e[1] = (char)c;
		return 2;
	case '\n':
		memcpy(e, "\\n", 2);
		return 2;
	case '\r':
		memcpy(e, "\\r", 2);
		return 2;
	case '\t':
		memcpy(e, "\\t", 2);
		return 2;
	}
	if (c < 0x20 || c >= 0x7f) {
		e[0] = '\\'; e[1] = 'x'; e[2] = hex[c >> 4]; e[3] = hex[c & 15];
		return 4;
	}
	e[0] = (char)c;
	return 1;
}

/* A quoted value; cut (still closed) when it does not fit: returns 1 then. */
static int
log_put_quoted(struct log_buf *b, const char *s)
{
	char e[5];
	size_t k;

	if (b->cap - b->n < 2)
		return -1;
	b->s[b->n++] = '"';
	for (; *s; s++) {
		k = log_escape((unsigned char)*s, e);
		if (k + 1 > b->cap - b->n)
			break;
		memcpy(b->s + b->n, e, k);
		b->n += k;
	}
	b->s[b->n++] = '"';
	return *s ? 1 : 0;
}

static int
log_put_string(struct log_buf *b, const char *s)
{
	if (!s)
		s = "";
	if (log_bare_ok(s) && log_put(b, s, strlen(s)) == 0)
		return 0;
	return log_put_quoted(b, s);
}

/* Keys are literals in the code, but a stray character must still not
 * forge a field: anything outside [A-Za-z0-9_.-] becomes '_'. */
static int
log_put_key(struct log_buf *b, const char *key)
{
	size_t len = strlen(key), i;

	if (len == 0 || len + 2 > b->cap - b->n)
		return -1;
	b->s[b->n++] = ' ';
	for (i = 0; i < len; i++) {
		char c = key[i];
		int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		    (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-';
		b->s[b->n++] = ok ? c : '_';
	}
	b->s[b->n++] = '=';
	return 0;
}

static int
log_put_number(struct log_buf *b, const struct sagad_log_field *f)
{
	char num[64];
	int k = 0;

	switch (f->type) {
	case SAGAD_LOG_T_INT:
		k = snprintf(num, sizeof num, "%lld", f->v.i);
		break;
	case SAGAD_LOG_T_UINT:
		k = snprintf(num, sizeof num, "%llu", f->v.u);
		break;
	case SAGAD_LOG_T_HEX:
		k = snprintf(num, sizeof num, "0x%08llx", f->v.u);
		break;
	case SAGAD_LOG_T_DBL:
		k = snprintf(num, sizeof num, "%.6g", f->v.d);
		break;
	default:
		k = snprintf(num, sizeof num, "?");
	}
	return log_put(b, num, (size_t)k);
}

/* One field; a field that does not fit is taken back whole, except a
 * string, which is cut inside its quotes. 0, or 1 when the line is full. */
static int
log_put_field(struct log_buf *b, const struct sagad_log_field *f)
{
	size_t n0 = b->n;
	int rc;

	if (log_put_key(b, f->key) < 0)
		return 1;
	if (f->type == SAGAD_LOG_T_STR)
		rc = log_put_string(b, f->v.s);
	else
		rc = log_put_number(b, f);
	if (rc < 0)
		b->n = n0;
	return rc != 0;
}

size_t
log_format(char *buf, size_t len, const char *msg,
    const struct sagad_log_field *pre, size_t npre,
    const struct sagad_log_field *f, size_t n)
{
	const size_t mark = sizeof LOG_TRUNC_MARK - 1;
	struct log_buf b = { buf, 0, 0 };
	int full;
	size_t i;

	if (len < mark + 2 + 8) {
		if (len)
			buf[0] = '\0';
		return 0;
	}
	b.cap = len - mark - 2;		/* the mark, '\n' and NUL */
	full = log_put(&b, "msg=", 4) < 0 || log_put_quoted(&b, msg ? msg : "") != 0;
	for (i = 0; !full && i < npre; i++)
		full = log_put_field(&b, &pre[i]);
	for (i = 0; !full && i < n; i++)
		full = log_put_field(&b, &f[i]);
	if (full) {
		memcpy(b.s + b.n, LOG_TRUNC_MARK, mark);
		b.n += mark;
	}
	buf[b.n++] = '\n';
	buf[b.n] = '\0';
	return b.n;
}

void
log_fields(enum log_level lvl, const char *msg,
    const struct sagad_log_field *pre, size_t npre,
    const struct sagad_log_field *f, size_t n)
{
	char line[LOG_LINE_MAX];
	struct timeval tv;
	struct tm tm;
	int k;

	if (!log_enabled(lvl))
		return;
	gettimeofday(&tv, NULL);
	gmtime_r(&tv.tv_sec, &tm);
	k = snprintf(line, sizeof line,
	    "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03dZ level=%s ",
	    tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
	    tm.tm_min, tm.tm_sec, (int)(tv.tv_usec / 1000), log_names[lvl]);
	k += (int)log_format(line + k, sizeof line - (size_t)k, msg, pre, npre, f, n);
	/* One write per line so that threads never interleave within a line. */
	if (write(STDERR_FILENO, line, (size_t)k) < 0)
		return;
}
