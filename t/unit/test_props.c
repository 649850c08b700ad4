/* Unit tests for src/props.c: headers, msgpack pack/unpack. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <msgpack.h>
#include <stdlib.h>
#include <string.h>

#include "props.h"

static void
assert_props_empty(const struct props *p)
{
	assert_null(p->content_type);
	assert_null(p->correlation_id);
	assert_null(p->type);
	assert_null(p->expiration);
	assert_null(p->reply_to);
	assert_null(p->headers);
	assert_int_equal(p->n_headers, 0);
}

static void
fill_all(struct props *p)
{
	memset(p, 0, sizeof *p);
	p->content_type = strdup("application/json");
	p->correlation_id = strdup("corr-42");
	p->type = strdup("order.created");
	p->expiration = strdup("60000");
	p->reply_to = strdup("orders.replies");
	props_set_header(p, "x-causation-id", "cause-1");
	props_set_header(p, "tenant", "acme");
	props_set_header(p, "empty", "");
}

/* ---- headers ---- */

static void
test_set_get_header(void **state)
{
	struct props p;

	(void)state;
	memset(&p, 0, sizeof p);
	assert_null(props_get_header(&p, "a"));
	props_set_header(&p, "a", "1");
	props_set_header(&p, "b", "2");
	assert_int_equal(p.n_headers, 2);
	assert_string_equal(props_get_header(&p, "a"), "1");
	assert_string_equal(props_get_header(&p, "b"), "2");
	assert_null(props_get_header(&p, "c"));
	assert_null(props_get_header(&p, "A"));		/* names are exact */
	props_free(&p);
	assert_props_empty(&p);
}

static void
test_set_header_replaces(void **state)
{
	struct props p;
	char name[8] = "a", value[8] = "3";

	(void)state;
	memset(&p, 0, sizeof p);
	props_set_header(&p, "a", "1");
	props_set_header(&p, "b", "2");
	props_set_header(&p, name, value);
	assert_int_equal(p.n_headers, 2);
	assert_string_equal(p.headers[0].name, "a");
	assert_string_equal(props_get_header(&p, "a"), "3");
	assert_string_equal(props_get_header(&p, "b"), "2");
	/* copies were taken */
	value[0] = 'X';
	name[0] = 'Y';
	assert_string_equal(props_get_header(&p, "a"), "3");
	props_free(&p);
}

/* ---- pack / unpack ---- */

static void
test_roundtrip_all_fields(void **state)
{
	struct props p, q;
	char *buf = NULL;
	size_t len = 0;

	(void)state;
	fill_all(&p);
	assert_int_equal(props_pack(&p, &buf, &len), 0);
	assert_non_null(buf);
	assert_true(len > 0);
	assert_int_equal(props_unpack(buf, len, &q), 0);
	assert_string_equal(q.content_type, "application/json");
	assert_string_equal(q.correlation_id, "corr-42");
	assert_string_equal(q.type, "order.created");
	assert_string_equal(q.expiration, "60000");
	assert_string_equal(q.reply_to, "orders.replies");
	assert_int_equal(q.n_headers, 3);
	assert_string_equal(props_get_header(&q, "x-causation-id"), "cause-1");
	assert_string_equal(props_get_header(&q, "tenant"), "acme");
	assert_string_equal(props_get_header(&q, "empty"), "");
	props_free(&p);
	props_free(&q);
	free(buf);
}

static void
test_roundtrip_some_fields(void **state)
{
	struct props p, q;
	char *buf = NULL;
	size_t len = 0;

	(void)state;
	memset(&p, 0, sizeof p);
	p.correlation_id = strdup("only-this");
	assert_int_equal(props_pack(&p, &buf, &len), 0);
	assert_int_equal(props_unpack(buf, len, &q), 0);
	assert_string_equal(q.correlation_id, "only-this");
	assert_null(q.content_type);
	assert_null(q.type);
	assert_null(q.expiration);
	assert_null(q.reply_to);
	assert_int_equal(q.n_headers, 0);
	props_free(&p);
	props_free(&q);
	free(buf);
}

static void
test_roundtrip_empty(void **state)
{
	struct props p, q;
	char *buf = NULL;
	size_t len = 0;

	(void)state;
	memset(&p, 0, sizeof p);
	assert_int_equal(props_pack(&p, &buf, &len), 0);
	assert_true(len >= 1);
	memset(&q, 0xa5, sizeof q);	/* unpack must initialise everything */
	assert_int_equal(props_unpack(buf, len, &q), 0);
	assert_props_empty(&q);
	props_free(&q);
	free(buf);
	/* a record without properties at all (NULL blob) */
	memset(&q, 0xa5, sizeof q);
	assert_int_equal(props_unpack(NULL, 0, &q), 0);
	assert_props_empty(&q);
}

/* Build a msgpack buffer with a callback; returns the sbuffer. */
typedef void build_fn(msgpack_packer *pk);

static int
unpack_built(build_fn *fn)
{
	msgpack_sbuffer sb;
	msgpack_packer pk;
	struct props q;
	int rc;

	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	fn(&pk);
	memset(&q, 0xa5, sizeof q);
	rc = props_unpack(sb.data, sb.size, &q);
	if (rc < 0)
		assert_props_empty(&q);	/* nothing half-filled is left behind */
	props_free(&q);
	msgpack_sbuffer_destroy(&sb);
	return rc;
}

static void
str(msgpack_packer *pk, const char *s)
{
	msgpack_pack_str(pk, strlen(s));
	msgpack_pack_str_body(pk, s, strlen(s));
}

static void b_valid(msgpack_packer *pk)
{
	msgpack_pack_map(pk, 2);
	str(pk, "c"); str(pk, "text/plain");
	str(pk, "h"); msgpack_pack_map(pk, 1); str(pk, "k"); str(pk, "v");
}
static void b_array(msgpack_packer *pk)
{
	msgpack_pack_array(pk, 1);
	str(pk, "c");
}
static void b_int(msgpack_packer *pk) { msgpack_pack_int(pk, 7); }
static void b_field_not_str(msgpack_packer *pk)
{
	msgpack_pack_map(pk, 1);
	str(pk, "c"); msgpack_pack_int(pk, 5);
}
static void b_field_bin(msgpack_packer *pk)
{
	msgpack_pack_map(pk, 1);
	str(pk, "i"); msgpack_pack_bin(pk, 3); msgpack_pack_bin_body(pk, "abc", 3);
}
static void b_key_long(msgpack_packer *pk)
{
	msgpack_pack_map(pk, 1);
	str(pk, "ct"); str(pk, "x");
}
static void b_key_unknown(msgpack_packer *pk)
{
	msgpack_pack_map(pk, 1);
	str(pk, "z"); str(pk, "x");
}
static void b_key_int(msgpack_packer *pk)
{
	msgpack_pack_map(pk, 1);
	msgpack_pack_int(pk, 1); str(pk, "x");
}
static void b_headers_not_map(msgpack_packer *pk)
{
	msgpack_pack_map(pk, 1);
	str(pk, "h"); str(pk, "k=v");
}
static void b_header_value_int(msgpack_packer *pk)
{
	msgpack_pack_map(pk, 1);
	str(pk, "h"); msgpack_pack_map(pk, 1); str(pk, "k"); msgpack_pack_int(pk, 1);
}
static void b_header_empty_name(msgpack_packer *pk)
{
	msgpack_pack_map(pk, 1);
	str(pk, "h"); msgpack_pack_map(pk, 1); str(pk, ""); str(pk, "v");
}
static void b_embedded_nul(msgpack_packer *pk)
{
	msgpack_pack_map(pk, 1);
	str(pk, "t"); msgpack_pack_str(pk, 3); msgpack_pack_str_body(pk, "a\0b", 3);
}
static void b_nil_value(msgpack_packer *pk)
{
	msgpack_pack_map(pk, 1);
	str(pk, "e"); msgpack_pack_nil(pk);
}
/* good fields and headers first, a bad one last: all must be released */
static void b_bad_after_good(msgpack_packer *pk)
{
	msgpack_pack_map(pk, 4);
	str(pk, "c"); str(pk, "text/plain");
	str(pk, "r"); str(pk, "replies");
	str(pk, "h"); msgpack_pack_map(pk, 2); str(pk, "a"); str(pk, "1"); str(pk, "b"); str(pk, "2");
	str(pk, "i"); msgpack_pack_true(pk);
}
static void b_trailing(msgpack_packer *pk)
{
	b_valid(pk);
	msgpack_pack_int(pk, 0);
}

static void
test_unpack_wrong_types(void **state)
{
	(void)state;
	assert_int_equal(unpack_built(b_valid), 0);	/* the builder works */
	assert_int_equal(unpack_built(b_array), -1);
	assert_int_equal(unpack_built(b_int), -1);
	assert_int_equal(unpack_built(b_field_not_str), -1);
	assert_int_equal(unpack_built(b_field_bin), -1);
	assert_int_equal(unpack_built(b_key_long), -1);
	assert_int_equal(unpack_built(b_key_unknown), -1);
	assert_int_equal(unpack_built(b_key_int), -1);
	assert_int_equal(unpack_built(b_headers_not_map), -1);
	assert_int_equal(unpack_built(b_header_value_int), -1);
	assert_int_equal(unpack_built(b_header_empty_name), -1);
	assert_int_equal(unpack_built(b_embedded_nul), -1);
	assert_int_equal(unpack_built(b_nil_value), -1);
	assert_int_equal(unpack_built(b_bad_after_good), -1);
	assert_int_equal(unpack_built(b_trailing), -1);
}

static void
test_unpack_garbage(void **state)
{
	static const char *const junk[] = {
		"\xc1",				/* never-used type byte */
		"hello world",			/* fixints, not a map */
		"\xde\xff\xff",			/* map16 of 65535 entries, no data */
		"\xdf\xff\xff\xff\xff",		/* map32 of 4G entries, no data */
		"\x81\xa1h\xdf\xff\xff\xff\xff",	/* headers: map32 of 4G entries */
		"\x81\xa1" "c\xdb\xff\xff\xff\xff",	/* str32 of 4 GiB, no data */
		"\x81\xa1" "c\xa5" "ab",		/* str of 5, only 2 bytes */
	};
	struct props q;
	size_t i;

	(void)state;
	for (i = 0; i < sizeof junk / sizeof junk[0]; i++) {
		memset(&q, 0xa5, sizeof q);
		if (props_unpack(junk[i], strlen(junk[i]), &q) != -1)
			fail_msg("junk %zu was accepted", i);
		assert_props_empty(&q);
	}
}

static void
test_unpack_every_truncation(void **state)
{
	struct props p, q;
	char *buf = NULL;
	size_t len = 0, cut;

	(void)state;
	fill_all(&p);
	assert_int_equal(props_pack(&p, &buf, &len), 0);
	for (cut = 1; cut < len; cut++) {
		memset(&q, 0xa5, sizeof q);
		if (props_unpack(buf, cut, &q) != -1)
			fail_msg("a record cut to %zu of %zu bytes was accepted", cut, len);
		assert_props_empty(&q);
	}
	assert_int_equal(props_unpack(buf, len, &q), 0);
	props_free(&q);
	props_free(&p);
	free(buf);
}

static void
test_unpack_oversized(void **state)
{
	struct props p, q;
	char *small = NULL, *big;
	size_t slen = 0, blen = (1u << 20) + 1;

	(void)state;
	/* a valid record followed by padding, over the 1 MiB limit */
	fill_all(&p);
	assert_int_equal(props_pack(&p, &small, &slen), 0);
	big = calloc(1, blen);
	memcpy(big, small, slen);
	memset(&q, 0xa5, sizeof q);
	assert_int_equal(props_unpack(big, blen, &q), -1);
	assert_props_empty(&q);
	free(big);
	free(small);
	props_free(&p);
}

static void
test_msg_free(void **state)
{
	struct msg *m = calloc(1, sizeof *m);

	(void)state;
	m->message_id = strdup("id");
	m->exchange = strdup("ex");
	m->routing_key = strdup("rk");
	m->body = malloc(4);
	memcpy(m->body, "body", 4);
	m->body_len = 4;
	fill_all(&m->props);
	msg_free(m);		/* valgrind checks that everything went */
	msg_free(NULL);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_set_get_header),
		cmocka_unit_test(test_set_header_replaces),
		cmocka_unit_test(test_roundtrip_all_fields),
		cmocka_unit_test(test_roundtrip_some_fields),
		cmocka_unit_test(test_roundtrip_empty),
		cmocka_unit_test(test_unpack_wrong_types),
		cmocka_unit_test(test_unpack_garbage),
		cmocka_unit_test(test_unpack_every_truncation),
		cmocka_unit_test(test_unpack_oversized),
		cmocka_unit_test(test_msg_free),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
