/* Logging: one logfmt line per event on stderr. */
#ifndef SAGAD_LOG_H
#define SAGAD_LOG_H

#include <stddef.h>

enum log_level { LOG_LVL_ERROR, LOG_LVL_WARN, LOG_LVL_INFO, LOG_LVL_DEBUG };

void log_set_level(int verbosity);	/* 0 = info, 1+ = debug */
int log_enabled(enum log_level lvl);
/* fmt is the logfmt tail after ts= and level=, e.g. "msg=\"x\" key=%s". */
void log_emit(enum log_level lvl, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#define log_error(...) log_emit(LOG_LVL_ERROR, __VA_ARGS__)
#define log_warn(...)  log_emit(LOG_LVL_WARN, __VA_ARGS__)
#define log_info(...)  log_emit(LOG_LVL_INFO, __VA_ARGS__)
#define log_debug(...) do { if (log_enabled(LOG_LVL_DEBUG)) log_emit(LOG_LVL_DEBUG, __VA_ARGS__); } while (0)

/* Quote a value for logfmt into buf (always quoted, escapes " and \ and controls). */
const char *log_quote(char *buf, size_t len, const char *s);

#endif
