#include "util.h"
#include "xmalloc.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

double
util_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

struct timeval
util_timeval(double seconds)
{
	struct timeval tv;

	tv.tv_sec = (time_t)seconds;
	tv.tv_usec = (suseconds_t)((seconds - (double)tv.tv_sec) * 1e6);
	return tv;
}

double
util_mono(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

void
util_random(void *buf, size_t len)
{
	size_t got = 0;
	while (got < len) {
		ssize_t n = getrandom((char *)buf + got, len - got, 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			abort();	/* the kernel always has entropy here */
		}
		got += n;
	}
}

uint64_t
util_rand64(void)
{
	static __thread uint64_t state;
	static __thread int seeded;
	uint64_t z;

	if (!seeded) {
		util_random(&state, sizeof state);
		seeded = 1;
	}
	z = (state += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

void
util_uuid7(char buf[37])
{
	/* 48-bit ms timestamp, then a 12-bit counter in rand_a so that ids made
	 * in one millisecond still sort in order (RFC 9562 method 1). */
	static uint64_t last_ms;
	static unsigned seq;
	uint8_t b[16];
	struct timespec ts;
	uint64_t ms;

	clock_gettime(CLOCK_REALTIME, &ts);
	ms = (uint64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
	util_random(b, sizeof b);
	if (ms <= last_ms) {
		ms = last_ms;
		if (++seq > 0xfff) {
			ms = ++last_ms;
			seq = 0;
		}
	} else {
		last_ms = ms;
		seq = b[6] & 0x03;	/* small random start keeps room to count */
	}
	b[0] = ms >> 40; b[1] = ms >> 32; b[2] = ms >> 24;
	b[3] = ms >> 16; b[4] = ms >> 8; b[5] = ms;
	b[6] = 0x70 | ((seq >> 8) & 0x0f);
	b[7] = seq & 0xff;
	b[8] = (b[8] & 0x3f) | 0x80;
	snprintf(buf, 37,
	    "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
	    b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10],
	    b[11], b[12], b[13], b[14], b[15]);
}

size_t
util_u64_dec(uint64_t v, char out[20])
{
	char tmp[20];
	size_t n = 0, i;

	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	for (i = 0; i < n; i++)
		out[i] = tmp[n - 1 - i];
	return n;
}

double
util_backoff(double initial, double max, unsigned attempt)
{
	double base, r;
	uint32_t x;

	if (attempt < 1)
		attempt = 1;
	base = initial * pow(2.0, attempt > 60 ? 60 : attempt - 1);
	if (base > max)
		base = max;
	util_random(&x, sizeof x);
	r = x / (double)UINT32_MAX;
	return base / 2 + r * base / 2;
}

static int
util_hexval(int c)
{
	if (c >= '0' && c <= '9') return c - '0';
	if (c >= 'a' && c <= 'f') return c - 'a' + 10;
	if (c >= 'A' && c <= 'F') return c - 'A' + 10;
	return -1;
}

int
util_pct_decode(const char *in, size_t len, char *out)
{
	size_t i, o = 0;

	for (i = 0; i < len; i++) {
		int c = (unsigned char)in[i];
		if (c == '%') {
			int hi, lo;
			if (i + 2 >= len)
				return -1;
			hi = util_hexval(in[i + 1]);
			lo = util_hexval(in[i + 2]);
			if (hi < 0 || lo < 0)
				return -1;
			c = hi * 16 + lo;
			i += 2;
		}
		if (c == 0)
			return -1;
		out[o++] = c;
	}
	out[o] = '\0';
	return (int)o;
}

int
util_valid_exchange(const char *s)
{
	size_t n = strlen(s);

	if (n == 0 || n > 255)
		return 0;
	for (; *s; s++)
		if (!isalnum((unsigned char)*s) && !strchr("-_.:", *s))
			return 0;
	return 1;
}

int
util_valid_shortstr(const char *s, size_t maxlen)
{
	size_t n = strlen(s);

	if (n > maxlen)
		return 0;
	for (; *s; s++)
		if ((unsigned char)*s < 0x20 || *s == 0x7f)
			return 0;
	return 1;
}

int
util_ct_equal(const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b), i;
	unsigned char d = la != lb;

	for (i = 0; i < la; i++)
		d |= (unsigned char)a[i] ^ (unsigned char)b[lb ? i % lb : 0];
	return d == 0;
}

void
util_mask_url(const char *url, char *out, size_t outlen)
{
	const char *scheme = strstr(url, "://");
	const char *at, *colon, *userinfo;

	snprintf(out, outlen, "%s", url);
	if (!scheme)
		return;
	userinfo = scheme + 3;
	at = strchr(userinfo, '@');
	/* Only an '@' before the path separates user info from the host. */
	if (!at || (strchr(userinfo, '/') && strchr(userinfo, '/') < at))
		return;
	colon = memchr(userinfo, ':', at - userinfo);
	if (!colon)
		return;
	snprintf(out, outlen, "%.*s***%s", (int)(colon + 1 - url), url, at);
}

char *
util_read_secret(const char *path)
{
	FILE *f = fopen(path, "r");
	char buf[4096];
	size_t n;

	if (!f)
		return NULL;
	n = fread(buf, 1, sizeof buf - 1, f);
	fclose(f);
	buf[n] = '\0';
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' '))
		buf[--n] = '\0';
	return xstrdup(buf);
}

int
util_listen_split(const char *spec, char *host, size_t hostlen, const char **port)
{
	const char *colon, *h = spec;
	size_t n;

	if (strncmp(spec, "unix:", 5) == 0)
		return -1;
	colon = strrchr(spec, ':');
	if (!colon)
		return -1;
	n = (size_t)(colon - spec);
	/* Brackets only as a pair around the whole host, with something in
	 * them: "[", "[]", "]" and "[::1" are refused, never trimmed blindly. */
	if (n > 0 && spec[0] == '[') {
		if (n < 3 || spec[n - 1] != ']')
			return -1;
		h = spec + 1;
		n -= 2;
	}
	if (memchr(h, '[', n) || memchr(h, ']', n) || n >= hostlen)
		return -1;
	memcpy(host, h, n);
	host[n] = '\0';
	*port = colon + 1;
	return 0;
}

int
util_listen_is_local(const char *spec)
{
	char host[256];
	const char *port;
	struct in_addr a4;
	struct in6_addr a6;

	if (strncmp(spec, "unix:", 5) == 0)
		return 1;
	if (util_listen_split(spec, host, sizeof host, &port) < 0)
		return 0;
	if (strcmp(host, "localhost") == 0)
		return 1;
	if (inet_pton(AF_INET, host, &a4) == 1)
		return (ntohl(a4.s_addr) >> 24) == 127;
	if (inet_pton(AF_INET6, host, &a6) == 1)
		return IN6_IS_ADDR_LOOPBACK(&a6);
	return 0;
}

uint64_t
util_fnv1a(const char *s)
{
	uint64_t h = 14695981039346656037ULL;

	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 1099511628211ULL;
	return h;
}
