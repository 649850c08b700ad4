#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static enum log_level log_level = LOG_LVL_INFO;

static const char *const log_names[] = { "error", "warn", "info", "debug" };

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

void
log_emit(enum log_level lvl, const char *fmt, ...)
{
	char line[2048];
	struct timeval tv;
	struct tm tm;
	va_list ap;
	int n, m;

	if (!log_enabled(lvl))
		return;
	gettimeofday(&tv, NULL);
	gmtime_r(&tv.tv_sec, &tm);
	n = snprintf(line, sizeof line,
	    "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03dZ level=%s ",
	    tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
	    tm.tm_min, tm.tm_sec, (int)(tv.tv_usec / 1000), log_names[lvl]);
	va_start(ap, fmt);
	m = vsnprintf(line + n, sizeof line - n - 1, fmt, ap);
	va_end(ap);
	if (m < 0)
		m = 0;
	n += m;
	if (n > (int)sizeof line - 2)
		n = sizeof line - 2;
	line[n++] = '\n';
	/* One write per line so that threads never interleave within a line. */
	if (write(STDERR_FILENO, line, n) < 0)
		return;
}

const char *
log_quote(char *buf, size_t len, const char *s)
{
	size_t o = 0;

	if (len < 3)
		return "\"\"";
	buf[o++] = '"';
	for (; s && *s && o + 5 < len; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\') {
			buf[o++] = '\\';
			buf[o++] = c;
		} else if (c < 0x20 || c == 0x7f) {
			o += snprintf(buf + o, len - o, "\\x%02x", c);
		} else
			buf[o++] = c;
	}
	buf[o++] = '"';
	buf[o] = '\0';
	return buf;
}
