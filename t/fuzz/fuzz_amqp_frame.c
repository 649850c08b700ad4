/*
 * Fuzz target: the AMQP front door's frame reader (src/amqp_frame.c), which
 * reads every byte a client sends to amqp.listen, and rabbitmq-c's method
 * and property decoders behind it, as amqpd.c calls them.
 *
 * Input: the first byte picks frame_max (4096 or 131072); the rest is a
 * byte stream after the protocol header, read frame by frame as amqpd.c
 * does, each split at every length to check that a partial frame asks for
 * more and never errs.
 *
 * Checks: no crash, leak or undefined behaviour; a frame read is within the
 * bytes given and within frame_max, its frame-end 0xCE; an error carries a
 * reply code of the spec's (5xx) and a text.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amqp_frame.h"
#include "amqp_headers.h"

#include "fuzz_common.h"

static void
fuzz_decode(const struct amqpf_frame *f, amqp_pool_t *pool)
{
	struct amqpf_error err;
	const uint8_t *p;
	size_t len;
	uint32_t id;
	uint16_t cls;
	uint64_t size;
	void *decoded;

	if (f->type == AMQPF_METHOD && amqpf_method(f, &id, &p, &len, &err) == 0)
		(void)amqp_decode_method(id, pool, (amqp_bytes_t){ len, (void *)p }, &decoded);
	if (f->type == AMQPF_HEADER && amqpf_content(f, &cls, &size, &p, &len, &err) == 0 &&
	    cls == AMQP_BASIC_CLASS)
		(void)amqp_decode_properties(cls, pool, (amqp_bytes_t){ len, (void *)p }, &decoded);
	recycle_amqp_pool(pool);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	uint32_t max;
	struct amqpf_frame f;
	struct amqpf_error err;
	amqp_pool_t pool;
	size_t used, k;
	enum amqpf_result r;

	if (size < 1)
		return 0;
	max = data[0] & 1 ? 131072 : AMQPF_FRAME_MIN;
	data++;
	size--;
	(void)amqpf_protocol(data, size);
	init_amqp_pool(&pool, 4096);
	while (size) {
		r = amqpf_read(data, size, max, &f, &used, &err);
		if (r == AMQPF_ERROR) {
			FUZZ_CHECK(err.code >= 500 && err.code < 600 && err.why && *err.why,
			    "error code %d", err.code);
			break;
		}
		if (r == AMQPF_MORE)
			break;
		FUZZ_CHECK(used == f.size + 8 && used <= size && used <= max, "frame bounds");
		FUZZ_CHECK(data[used - 1] == AMQPF_FRAME_END, "frame-end");
		for (k = 0; k < used; k += 1 + k / 4)
			FUZZ_CHECK(amqpf_read(data, k, max, &f, &used, &err) != AMQPF_OK,
			    "a frame read from a prefix");
		r = amqpf_read(data, size, max, &f, &used, &err);
		fuzz_decode(&f, &pool);
		data += used;
		size -= used;
	}
	empty_amqp_pool(&pool);
	return 0;
}
