/* Logging: one logfmt line per event on stderr.
 *
 * A line is a message and typed fields, never a format string:
 *
 *	log_warn("broker connect failed", LOG_STR("host", host),
 *	    LOG_INT("port", port), LOG_STR("reason", why));
 *
 * Every value goes through one writer (log_format) that quotes and escapes
 * strings, so a Message-Id, a routing key or an error text cannot end the
 * line or forge a field, and a call site has no way to write key="%s" by
 * hand. Keys must be string literals (the macros refuse anything else). The
 * field type is the plugins' one, so that sagad and its plugins share the
 * writer too. */
#ifndef SAGAD_LOG_H
#define SAGAD_LOG_H

#include <stddef.h>

#include <sagad/plugin.h>

enum log_level { LOG_LVL_ERROR, LOG_LVL_WARN, LOG_LVL_INFO, LOG_LVL_DEBUG };

#define LOG_STR(k, v)  SAGAD_STR(k, v)
#define LOG_INT(k, v)  SAGAD_INT(k, v)
#define LOG_UINT(k, v) SAGAD_UINT(k, v)
#define LOG_DBL(k, v)  SAGAD_DBL(k, v)
#define LOG_HEX(k, v)  SAGAD_HEX(k, v)

void log_set_level(int verbosity);	/* 0 = info, 1+ = debug */
int log_enabled(enum log_level lvl);

/* One line: msg, the n fields of pre (may be 0: the plugins' source=NAME)
 * and the n fields of f. */
void log_fields(enum log_level lvl, const char *msg,
    const struct sagad_log_field *pre, size_t npre,
    const struct sagad_log_field *f, size_t n);

/* The line after ts= and level=, newline included, into buf (NUL-terminated).
 * A line that does not fit is cut between fields or inside a quoted value,
 * always well-formed, and ends with truncated=true. Returns its length. */
size_t log_format(char *buf, size_t len, const char *msg,
    const struct sagad_log_field *pre, size_t npre,
    const struct sagad_log_field *f, size_t n);

#define log_at_(lvl, msg, ...) \
	log_fields((lvl), (msg), NULL, 0, SAGAD_LOG_FIELDS_(__VA_ARGS__) + 1, \
	    SAGAD_LOG_NFIELDS_(__VA_ARGS__))

#define log_error(...) log_at_(LOG_LVL_ERROR, __VA_ARGS__)
#define log_warn(...)  log_at_(LOG_LVL_WARN, __VA_ARGS__)
#define log_info(...)  log_at_(LOG_LVL_INFO, __VA_ARGS__)
/* The fields are not even built when debug is off: the hot path pays a
 * comparison. */
#define log_debug(...) do { if (log_enabled(LOG_LVL_DEBUG)) \
	log_at_(LOG_LVL_DEBUG, __VA_ARGS__); } while (0)

#endif
