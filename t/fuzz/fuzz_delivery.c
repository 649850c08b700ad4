/*
 * Fuzz target: a consumed message's AMQP properties -> the HTTP request
 * that delivers it to the service. The real code end to end: rabbitmq-c
 * decodes the content header (amqp_decode_properties, as for a frame from
 * the socket), the broker link turns it and the body frames into a struct
 * msg (broker_frame, static in broker_conn.c, which this file includes ->
 * broker_delivery_header/body/done in broker_consume.c), delivery.c gives
 * it an id when it has no usable one (delivery_derive_id) and dispatch.c
 * maps it to request headers (dispatch_headers, static: dispatch.c is
 * included too, with delivery.c).
 *
 * Input: byte 0 body length B, byte 1 where the body is split into two
 * frames, byte 2 the attempts so far, then B body bytes, then the encoded
 * basic properties (flags word and fields, as after class/weight/size in a
 * content header frame).
 *
 * Checks: no crash, leak or undefined behaviour; one delivery comes out
 * with the whole body; every request header is a token name with a value
 * free of control characters; Message-Id, Sagad-Subscription,
 * Sagad-Attempt, Sagad-Kind (event, or a saga's or transaction's kind) and Content-Type
 * are always there; the properties survive the inbox's encoding.
 */
#include "broker_conn.c"
#include "delivery.c"
#include "dispatch.c"

#include <event2/keyvalq_struct.h>
#include <sys/queue.h>

#include "fuzz_common.h"

/* dispatch_headers into a list, to check each header. */
static void
fuzz_emit(void *arg, const char *name, const char *value)
{
	evhttp_add_header(arg, name, value);
}

static int
fuzz_token(const char *s)
{
	if (!*s)
		return 0;
	for (; *s; s++)
		if ((unsigned char)*s <= 0x20 || (unsigned char)*s >= 0x7f ||
		    strchr("()<>@,;:\\\"/[]?={}", *s))
			return 0;
	return 1;
}

static void
fuzz_check_request(const struct evkeyvalq *h, const struct msg *m, unsigned attempts)
{
	const struct evkeyval *kv;
	const char *v;
	char num[16];

	TAILQ_FOREACH(kv, h, next) {
		FUZZ_CHECK(fuzz_token(kv->key), "header name is not a token: %s", kv->key);
		FUZZ_CHECK(util_valid_shortstr(kv->value, 65535),
		    "header %s has control characters", kv->key);
	}
	v = evhttp_find_header(h, "Message-Id");
	FUZZ_CHECK(v && strcmp(v, m->message_id) == 0, "Message-Id missing or wrong");
	v = evhttp_find_header(h, "Sagad-Subscription");
	FUZZ_CHECK(v && strcmp(v, "inbox") == 0, "Sagad-Subscription missing");
	snprintf(num, sizeof num, "%u", attempts + 1);
	v = evhttp_find_header(h, "Sagad-Attempt");
	FUZZ_CHECK(v && strcmp(v, num) == 0, "Sagad-Attempt missing or wrong");
	v = evhttp_find_header(h, "Sagad-Kind");
	FUZZ_CHECK(v && strcmp(dispatch_kind(v), v) == 0, "Sagad-Kind missing or unknown");
	FUZZ_CHECK(evhttp_find_header(h, "Content-Type") != NULL ||
	    (m->props.content_type && !util_valid_shortstr(m->props.content_type, 65535)),
	    "Content-Type missing");
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct broker b;
	struct broker_sub sub;
	amqp_pool_t pool;
	amqp_bytes_t enc;
	amqp_frame_t f;
	void *decoded = NULL;
	size_t blen, split;
	unsigned attempts;
	struct msg *m;
	struct dsub ds;
	struct dmsg dm;
	struct inbox_rec rec;
	struct evkeyvalq h;

	if (size < 3)
		return 0;
	blen = data[0];
	split = blen ? data[1] % (blen + 1) : 0;
	attempts = data[2];
	if (size < 3 + blen)
		return 0;
	enc.bytes = (void *)(data + 3 + blen);
	enc.len = size - 3 - blen;

	init_amqp_pool(&pool, 4096);
	if (amqp_decode_properties(AMQP_BASIC_CLASS, &pool, enc, &decoded) < 0) {
		empty_amqp_pool(&pool);
		return 0;
	}

	memset(&b, 0, sizeof b);
	memset(&sub, 0, sizeof sub);
	sub.max_bytes = 1 << 20;
	b.subs = &sub;
	b.n_subs = 1;
	b.rx = BROKER_RX_DELIVER_HEADER;
	b.rx_sub = 0;
	b.rx_msg = calloc(1, sizeof *b.rx_msg);
	b.rx_msg->seq = 1;

	memset(&f, 0, sizeof f);
	f.frame_type = AMQP_FRAME_HEADER;
	f.channel = 2;
	f.payload.properties.class_id = AMQP_BASIC_CLASS;
	f.payload.properties.body_size = blen;
	f.payload.properties.decoded = decoded;
	broker_frame(&b, &f);
	if (blen) {
		const uint8_t *body = data + 3;
		size_t parts[2] = { split, blen - split }, i, off = 0;
		for (i = 0; i < 2; i++) {
			if (!parts[i])
				continue;
			memset(&f, 0, sizeof f);
			f.frame_type = AMQP_FRAME_BODY;
			f.channel = 2;
			f.payload.body_fragment.bytes = (void *)(body + off);
			f.payload.body_fragment.len = parts[i];
			broker_frame(&b, &f);
			off += parts[i];
		}
	}
	empty_amqp_pool(&pool);
	FUZZ_CHECK(b.nout == 1 && b.outbuf[0].kind == BROKER_EV_DELIVERY && b.rx == BROKER_RX_IDLE,
	    "one delivery expected, got %zu events", b.nout);
	m = b.outbuf[0].msg;
	FUZZ_CHECK(m->body_len == blen && (!blen || memcmp(m->body, data + 3, blen) == 0),
	    "body mangled");
	free(b.outbuf);

	/* As delivery_take does before storing it. */
	if (!m->message_id || !*m->message_id || !util_valid_shortstr(m->message_id, 255)) {
		char derived[40];
		delivery_derive_id(m, derived);
		free(m->message_id);
		m->message_id = strdup(derived);
	}
	fuzz_props_roundtrip(&m->props);

	memset(&ds, 0, sizeof ds);
	ds.name = "inbox";
	ds.host = "127.0.0.1";
	memset(&rec, 0, sizeof rec);
	rec.m = m;
	rec.attempts = attempts;
	memset(&dm, 0, sizeof dm);
	dm.rec = &rec;
	TAILQ_INIT(&h);
	dispatch_headers(&ds, &dm, NULL, fuzz_emit, &h);
	fuzz_check_request(&h, m, attempts);
	evhttp_clear_headers(&h);
	msg_free(m);
	return 0;
}
