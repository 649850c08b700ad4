/*
 * Fuzz target: the service's answer to a delivery, as src/hclient.c parses
 * it (hparse_feed, hparse_eof): whatever a broken or hostile service sends.
 *
 * Input: byte 0 the size of the pieces the bytes arrive in (1..64; as
 * recv() may cut them anywhere), byte 1 bit 0: the connection closes after
 * the last byte; then the bytes of the answer.
 *
 * Checks: no crash, leak or undefined behaviour; the same answer in one
 * piece and in small pieces gives the same outcome, status and body (when
 * the whole input is in); a finished answer has a status of 200..599 and a
 * body within the limit; an error says why.
 */
#include <event2/buffer.h>
#include <stdint.h>
#include <string.h>

#include "fuzz_common.h"
#include "hclient.h"

#define FUZZ_MAX_BODY 4096
#define FUZZ_MAX_HEADERS 1024

static enum hparse_state
fuzz_parse(struct hparse *p, const uint8_t *data, size_t size, size_t step, int eof)
{
	struct evbuffer *in = evbuffer_new();
	enum hparse_state st = p->state;
	size_t off = 0;

	while (off < size && st != HP_DONE && st != HP_ERROR) {
		size_t n = size - off < step ? size - off : step;
		evbuffer_add(in, data + off, n);
		off += n;
		st = hparse_feed(p, in);
	}
	if (eof && st != HP_DONE && st != HP_ERROR)
		st = hparse_eof(p);
	evbuffer_free(in);
	return st;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct hparse a, b;
	enum hparse_state sa, sb;
	size_t step;
	int eof;

	if (size < 2)
		return 0;
	step = 1 + data[0] % 64;
	eof = data[1] & 1;
	data += 2;
	size -= 2;
	hparse_init(&a, FUZZ_MAX_BODY, FUZZ_MAX_HEADERS);
	hparse_init(&b, FUZZ_MAX_BODY, FUZZ_MAX_HEADERS);
	sa = fuzz_parse(&a, data, size, size ? size : 1, eof);
	sb = fuzz_parse(&b, data, size, step, eof);
	if (sa == HP_DONE) {
		FUZZ_CHECK(a.status >= 200 && a.status <= 599, "status %d", a.status);
		FUZZ_CHECK(evbuffer_get_length(a.body) <= FUZZ_MAX_BODY, "body over the limit");
	}
	if (sa == HP_ERROR)
		FUZZ_CHECK(a.error != HCLIENT_ANSWERED, "an error without a reason");
	/* Where the pieces are cut must not matter, except for the header
	 * limit: in one piece a too-long block is seen before its end. */
	if (sa != HP_ERROR && sb != HP_ERROR) {
		FUZZ_CHECK(sa == sb, "one piece: state %d, pieces of %zu: state %d", sa, step, sb);
		if (sa == HP_DONE) {
			FUZZ_CHECK(a.status == b.status, "status differs");
			FUZZ_CHECK(evbuffer_get_length(a.body) == evbuffer_get_length(b.body),
			    "body length differs");
		}
	}
	hparse_clear(&a);
	hparse_clear(&b);
	return 0;
}
