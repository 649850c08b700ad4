/*
 * The AMQP 0-9-1 frame reader of the front door (amqpd.c): the protocol
 * header, the frame header (type, channel, size), the size limit and the
 * frame-end octet, and the fixed fields that open a method or a content
 * header frame. No I/O and no allocation: it reads bytes the caller holds,
 * so that it can be unit-tested and fuzzed (t/fuzz/fuzz_amqp_frame.c).
 * Methods and properties are decoded by rabbitmq-c's codec, not here.
 */
#ifndef SAGAD_AMQP_FRAME_H
#define SAGAD_AMQP_FRAME_H

#include <stddef.h>
#include <stdint.h>

#define AMQPF_PROTOCOL_HEADER "AMQP\0\0\x09\x01"
#define AMQPF_HEADER_LEN 8		/* the protocol header */
#define AMQPF_OVERHEAD 8		/* type, channel, size, frame-end */
#define AMQPF_FRAME_MIN 4096		/* frame_max before tune (the spec's frame-min-size) */
#define AMQPF_FRAME_END 0xCE

enum amqpf_type {
	AMQPF_METHOD = 1,
	AMQPF_HEADER = 2,
	AMQPF_BODY = 3,
	AMQPF_HEARTBEAT = 8
};

/* The AMQP reply codes the reader and the server answer with. */
enum amqpf_code {
	AMQPF_REPLY_SUCCESS = 200,
	AMQPF_ACCESS_REFUSED = 403,
	AMQPF_PRECONDITION_FAILED = 406,
	AMQPF_FRAME_ERROR = 501,
	AMQPF_SYNTAX_ERROR = 502,
	AMQPF_COMMAND_INVALID = 503,
	AMQPF_CHANNEL_ERROR = 504,
	AMQPF_UNEXPECTED_FRAME = 505,
	AMQPF_RESOURCE_ERROR = 506,
	AMQPF_NOT_ALLOWED = 530,
	AMQPF_NOT_IMPLEMENTED = 540,
	AMQPF_INTERNAL_ERROR = 541
};

enum amqpf_result {
	AMQPF_OK,		/* a whole frame (or header) is there */
	AMQPF_MORE,		/* not enough bytes yet */
	AMQPF_ERROR		/* malformed: code and why say how */
};

/* One frame, pointing into the caller's bytes. */
struct amqpf_frame {
	uint8_t type;
	uint16_t channel;
	uint32_t size;			/* of the payload */
	const uint8_t *payload;
};

/* An error: the AMQP reply code to close the connection with, and a text. */
struct amqpf_error {
	int code;
	const char *why;		/* a static string */
};

/*
 * The protocol header a client opens with. AMQPF_ERROR when it is not
 * AMQP 0-9-1: the spec's answer is our header, then close (amqpd.c).
 */
enum amqpf_result amqpf_protocol(const uint8_t *buf, size_t len);

/*
 * The frame at the start of buf. frame_max is the largest whole frame
 * (header and frame-end included), as negotiated by tune. On AMQPF_OK,
 * *used is the frame's length in buf.
 */
enum amqpf_result amqpf_read(const uint8_t *buf, size_t len, uint32_t frame_max,
    struct amqpf_frame *f, size_t *used, struct amqpf_error *err);

/* A method frame's class and method ids (as one rabbitmq-c method number)
 * and where its arguments start. -1 with err when too short. */
int amqpf_method(const struct amqpf_frame *f, uint32_t *method,
    const uint8_t **args, size_t *args_len, struct amqpf_error *err);

/* A content header frame's class, body size and property bytes (flags
 * first, as amqp_decode_properties reads them). -1 with err when short. */
int amqpf_content(const struct amqpf_frame *f, uint16_t *class_id, uint64_t *body_size,
    const uint8_t **props, size_t *props_len, struct amqpf_error *err);

/* The 7-byte header of an outgoing frame (the caller adds payload and
 * frame-end). */
void amqpf_put_header(uint8_t out[7], uint8_t type, uint16_t channel, uint32_t size);

#endif
