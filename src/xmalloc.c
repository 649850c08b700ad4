#include "xmalloc.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* One logfmt line written without allocating (there may be no memory
 * left), then exit 3: sagad(8) EXIT STATUS. */
static void __attribute__((noreturn))
xmalloc_fatal(const char *what, size_t size)
{
	char line[160];
	int n = snprintf(line, sizeof line,
	    "level=error msg=\"out of memory, stopping\" call=%s bytes=%zu\n", what, size);

	if (n > 0 && write(STDERR_FILENO, line, (size_t)n) < 0)
		n = 0;
	_exit(3);
}

void *
xmalloc(size_t size)
{
	void *p = malloc(size ? size : 1);

	if (!p)
		xmalloc_fatal("malloc", size);
	return p;
}

void *
xcalloc(size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size ? size : 1);

	if (!p)
		xmalloc_fatal("calloc", n * size);
	return p;
}

void *
xrealloc(void *p, size_t size)
{
	return xreallocarray(p, 1, size);
}

void *
xreallocarray(void *p, size_t n, size_t size)
{
	void *q;

	if (size && n > SIZE_MAX / size)
		xmalloc_fatal("reallocarray", SIZE_MAX);
	q = realloc(p, n && size ? n * size : 1);
	if (!q)
		xmalloc_fatal("realloc", n * size);
	return q;
}

char *
xstrdup(const char *s)
{
	char *p = strdup(s);

	if (!p)
		xmalloc_fatal("strdup", strlen(s) + 1);
	return p;
}

char *
xstrndup(const char *s, size_t n)
{
	char *p = strndup(s, n);

	if (!p)
		xmalloc_fatal("strndup", n + 1);
	return p;
}

char *
xasprintf(const char *fmt, ...)
{
	va_list ap;
	char *p;
	int n;

	va_start(ap, fmt);
	n = vasprintf(&p, fmt, ap);
	va_end(ap);
	if (n < 0)
		xmalloc_fatal("asprintf", 0);
	return p;
}

void *
xgrow(void *v, size_t *cap, size_t need, size_t size)
{
	size_t c = *cap ? *cap : 16;

	while (c < need)
		c *= 2;
	if (c == *cap)
		return v;
	*cap = c;
	return xreallocarray(v, c, size);
}
