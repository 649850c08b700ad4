#include "amqp_frame.h"

#include <string.h>

static uint16_t
amqpf_u16(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static uint32_t
amqpf_u32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t
amqpf_u64(const uint8_t *p)
{
	return (uint64_t)amqpf_u32(p) << 32 | amqpf_u32(p + 4);
}

static enum amqpf_result
amqpf_fail(struct amqpf_error *err, int code, const char *why)
{
	err->code = code;
	err->why = why;
	return AMQPF_ERROR;
}

enum amqpf_result
amqpf_protocol(const uint8_t *buf, size_t len)
{
	size_t n = len < AMQPF_HEADER_LEN ? len : AMQPF_HEADER_LEN;

	/* A wrong first byte is answered at once: a client speaking another
	 * protocol (HTTP, TLS) may wait for us before it sends 8 bytes. */
	if (memcmp(buf, AMQPF_PROTOCOL_HEADER, n) != 0)
		return AMQPF_ERROR;
	return n < AMQPF_HEADER_LEN ? AMQPF_MORE : AMQPF_OK;
}

static int
amqpf_known_type(uint8_t type)
{
	return type == AMQPF_METHOD || type == AMQPF_HEADER || type == AMQPF_BODY ||
	    type == AMQPF_HEARTBEAT;
}

enum amqpf_result
amqpf_read(const uint8_t *buf, size_t len, uint32_t frame_max,
    struct amqpf_frame *f, size_t *used, struct amqpf_error *err)
{
	uint32_t size;

	if (len < 7)
		return AMQPF_MORE;
	f->type = buf[0];
	f->channel = amqpf_u16(buf + 1);
	size = amqpf_u32(buf + 3);
	/* Checked before waiting for the payload: a huge size must not make
	 * the caller buffer it. */
	if (!amqpf_known_type(f->type))
		return amqpf_fail(err, AMQPF_FRAME_ERROR, "unknown frame type");
	if (frame_max < AMQPF_OVERHEAD || size > frame_max - AMQPF_OVERHEAD)
		return amqpf_fail(err, AMQPF_FRAME_ERROR, "frame larger than frame_max");
	if (f->type == AMQPF_HEARTBEAT && f->channel != 0)
		return amqpf_fail(err, AMQPF_COMMAND_INVALID, "heartbeat on a channel other than 0");
	if (len < (size_t)size + AMQPF_OVERHEAD)
		return AMQPF_MORE;
	if (buf[7 + size] != AMQPF_FRAME_END)
		return amqpf_fail(err, AMQPF_FRAME_ERROR, "frame-end octet is not 0xCE");
	f->size = size;
	f->payload = buf + 7;
	*used = (size_t)size + AMQPF_OVERHEAD;
	return AMQPF_OK;
}

int
amqpf_method(const struct amqpf_frame *f, uint32_t *method,
    const uint8_t **args, size_t *args_len, struct amqpf_error *err)
{
	if (f->type != AMQPF_METHOD || f->size < 4) {
		amqpf_fail(err, AMQPF_FRAME_ERROR, "method frame shorter than its ids");
		return -1;
	}
	*method = amqpf_u32(f->payload);
	*args = f->payload + 4;
	*args_len = f->size - 4;
	return 0;
}

int
amqpf_content(const struct amqpf_frame *f, uint16_t *class_id, uint64_t *body_size,
    const uint8_t **props, size_t *props_len, struct amqpf_error *err)
{
	/* class, weight, body size, and at least the property flags */
	if (f->type != AMQPF_HEADER || f->size < 14) {
		amqpf_fail(err, AMQPF_FRAME_ERROR, "content header frame too short");
		return -1;
	}
	*class_id = amqpf_u16(f->payload);
	*body_size = amqpf_u64(f->payload + 4);
	*props = f->payload + 12;
	*props_len = f->size - 12;
	return 0;
}

void
amqpf_put_header(uint8_t out[7], uint8_t type, uint16_t channel, uint32_t size)
{
	out[0] = type;
	out[1] = (uint8_t)(channel >> 8);
	out[2] = (uint8_t)channel;
	out[3] = (uint8_t)(size >> 24);
	out[4] = (uint8_t)(size >> 16);
	out[5] = (uint8_t)(size >> 8);
	out[6] = (uint8_t)size;
}
