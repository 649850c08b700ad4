/*
 * The allocation policy (as OpenBSD's daemons have it): an allocation that
 * fails ends the process at once, with one log line, exit status 3 (a fatal
 * error while running, sagad(8) EXIT STATUS). Nothing committed is lost:
 * the store is the state, and a restart resumes from it. So no caller
 * checks for NULL, and no half-done path hides a failed allocation.
 *
 * The plugins compile this file in too (plugins/codec.h), so that they
 * follow the same policy.
 */
#ifndef SAGAD_XMALLOC_H
#define SAGAD_XMALLOC_H

#include <stddef.h>

void *xmalloc(size_t size);
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t size);
/* realloc of n elements of size, with the multiplication checked. */
void *xreallocarray(void *p, size_t n, size_t size);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);
char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Grows the array v of elements of size so that it holds at least need:
 * doubling, from 16; *cap is updated. */
void *xgrow(void *v, size_t *cap, size_t need, size_t size);

/* The one growable array: a pointer, a count and a capacity, of any type.
 * XPUSH makes room for one more element and yields its address:
 *     *XPUSH(p->seqs, p->nseqs, p->capseqs) = seq;
 */
#define XPUSH(v, n, cap)							\
	((n) == (cap) ? (void)((v) = xgrow((v), &(cap), (n) + 1, sizeof *(v))) : (void)0, \
	 &(v)[(n)++])

#endif
