/* Unit tests for src/amqp_frame.c: the front door's frame reader, with the
 * reply codes the AMQP 0-9-1 spec asks for. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "amqp_frame.h"

/* A frame as a client writes it: header, payload, frame-end. */
static size_t
frame(uint8_t *out, uint8_t type, uint16_t channel, const void *payload, uint32_t size)
{
	amqpf_put_header(out, type, channel, size);
	memcpy(out + 7, payload, size);
	out[7 + size] = AMQPF_FRAME_END;
	return (size_t)size + 8;
}

static void
test_protocol_header(void **state)
{
	(void)state;
	assert_int_equal(amqpf_protocol((const uint8_t *)"AMQP\0\0\x09\x01", 8), AMQPF_OK);
	assert_int_equal(amqpf_protocol((const uint8_t *)"AMQP\0\0\x09", 7), AMQPF_MORE);
	assert_int_equal(amqpf_protocol((const uint8_t *)"", 0), AMQPF_MORE);
	/* 0-10, 1-0 and HTTP are refused, HTTP at its first byte */
	assert_int_equal(amqpf_protocol((const uint8_t *)"AMQP\1\1\0\x0a", 8), AMQPF_ERROR);
	assert_int_equal(amqpf_protocol((const uint8_t *)"AMQP\0\1\0\0", 8), AMQPF_ERROR);
	assert_int_equal(amqpf_protocol((const uint8_t *)"G", 1), AMQPF_ERROR);
}

static void
test_whole_frame_and_more(void **state)
{
	uint8_t buf[64];
	struct amqpf_frame f;
	struct amqpf_error err;
	size_t n = frame(buf, AMQPF_METHOD, 3, "\0\x14\0\x0a", 4), used = 0, k;

	(void)state;
	for (k = 0; k < n; k++)
		assert_int_equal(amqpf_read(buf, k, 4096, &f, &used, &err), AMQPF_MORE);
	assert_int_equal(amqpf_read(buf, n, 4096, &f, &used, &err), AMQPF_OK);
	assert_int_equal(used, n);
	assert_int_equal(f.type, AMQPF_METHOD);
	assert_int_equal(f.channel, 3);
	assert_int_equal(f.size, 4);
	assert_ptr_equal(f.payload, buf + 7);
}

static void
test_errors_and_codes(void **state)
{
	uint8_t buf[64];
	struct amqpf_frame f;
	struct amqpf_error err;
	size_t n, used;

	(void)state;
	n = frame(buf, AMQPF_BODY, 1, "abc", 3);
	buf[n - 1] = 0xCD;
	assert_int_equal(amqpf_read(buf, n, 4096, &f, &used, &err), AMQPF_ERROR);
	assert_int_equal(err.code, AMQPF_FRAME_ERROR);
	n = frame(buf, 9, 1, "abc", 3);
	assert_int_equal(amqpf_read(buf, n, 4096, &f, &used, &err), AMQPF_ERROR);
	assert_int_equal(err.code, AMQPF_FRAME_ERROR);
	n = frame(buf, AMQPF_HEARTBEAT, 1, "", 0);
	assert_int_equal(amqpf_read(buf, n, 4096, &f, &used, &err), AMQPF_ERROR);
	assert_int_equal(err.code, AMQPF_COMMAND_INVALID);
	/* Over frame_max: refused from the header alone, before the payload
	 * is there (a client must not make us buffer 4 GiB). */
	amqpf_put_header(buf, AMQPF_BODY, 1, 4089);
	assert_int_equal(amqpf_read(buf, 7, 4096, &f, &used, &err), AMQPF_ERROR);
	assert_int_equal(err.code, AMQPF_FRAME_ERROR);
	amqpf_put_header(buf, AMQPF_BODY, 1, 4088);	/* exactly frame_max */
	assert_int_equal(amqpf_read(buf, 7, 4096, &f, &used, &err), AMQPF_MORE);
	amqpf_put_header(buf, AMQPF_BODY, 1, 0xffffffffu);
	assert_int_equal(amqpf_read(buf, 7, 0xffffffffu, &f, &used, &err), AMQPF_ERROR);
}

static void
test_method_and_content(void **state)
{
	uint8_t buf[64], hdr[14] = { 0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0x80, 0 };
	struct amqpf_frame f;
	struct amqpf_error err;
	const uint8_t *p;
	size_t n, used, len;
	uint32_t id;
	uint16_t cls;
	uint64_t size;

	(void)state;
	n = frame(buf, AMQPF_METHOD, 1, "\0\x3c\0\x28xyz", 7);
	assert_int_equal(amqpf_read(buf, n, 4096, &f, &used, &err), AMQPF_OK);
	assert_int_equal(amqpf_method(&f, &id, &p, &len, &err), 0);
	assert_int_equal(id, 0x003c0028);	/* basic.publish */
	assert_int_equal(len, 3);
	assert_memory_equal(p, "xyz", 3);
	n = frame(buf, AMQPF_METHOD, 1, "\0\x3c", 2);
	assert_int_equal(amqpf_read(buf, n, 4096, &f, &used, &err), AMQPF_OK);
	assert_int_equal(amqpf_method(&f, &id, &p, &len, &err), -1);
	assert_int_equal(err.code, AMQPF_FRAME_ERROR);
	n = frame(buf, AMQPF_HEADER, 1, hdr, sizeof hdr);
	assert_int_equal(amqpf_read(buf, n, 4096, &f, &used, &err), AMQPF_OK);
	assert_int_equal(amqpf_content(&f, &cls, &size, &p, &len, &err), 0);
	assert_int_equal(cls, 60);
	assert_int_equal(size, 256);
	assert_int_equal(len, 2);
	assert_int_equal(p[0], 0x80);
	n = frame(buf, AMQPF_HEADER, 1, hdr, 13);
	assert_int_equal(amqpf_read(buf, n, 4096, &f, &used, &err), AMQPF_OK);
	assert_int_equal(amqpf_content(&f, &cls, &size, &p, &len, &err), -1);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_protocol_header),
		cmocka_unit_test(test_whole_frame_and_more),
		cmocka_unit_test(test_errors_and_codes),
		cmocka_unit_test(test_method_and_content),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
