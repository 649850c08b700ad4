#include "props.h"
#include "xmalloc.h"

#include <msgpack.h>
#include <stdlib.h>
#include <string.h>

/* Stored records are tiny; anything bigger is damage, not data. */
#define PROPS_MAX_PACKED (1 << 20)

void
props_set_header(struct props *p, const char *name, const char *value)
{
	size_t i;

	for (i = 0; i < p->n_headers; i++)
		if (strcmp(p->headers[i].name, name) == 0) {
			free(p->headers[i].value);
			p->headers[i].value = xstrdup(value);
			return;
		}
	p->headers = xrealloc(p->headers, (p->n_headers + 1) * sizeof *p->headers);
	p->headers[p->n_headers].name = xstrdup(name);
	p->headers[p->n_headers].value = xstrdup(value);
	p->n_headers++;
}

void
props_del_header(struct props *p, const char *name)
{
	size_t i;

	for (i = 0; i < p->n_headers; i++)
		if (strcmp(p->headers[i].name, name) == 0) {
			free(p->headers[i].name);
			free(p->headers[i].value);
			memmove(&p->headers[i], &p->headers[i + 1],
			    (p->n_headers - i - 1) * sizeof *p->headers);
			p->n_headers--;
			return;
		}
}

const char *
props_get_header(const struct props *p, const char *name)
{
	size_t i;

	for (i = 0; i < p->n_headers; i++)
		if (strcmp(p->headers[i].name, name) == 0)
			return p->headers[i].value;
	return NULL;
}

void
props_free(struct props *p)
{
	size_t i;

	free(p->content_type);
	free(p->correlation_id);
	free(p->type);
	free(p->expiration);
	free(p->reply_to);
	for (i = 0; i < p->n_headers; i++) {
		free(p->headers[i].name);
		free(p->headers[i].value);
	}
	free(p->headers);
	memset(p, 0, sizeof *p);
}

void
msg_free(struct msg *m)
{
	if (!m)
		return;
	free(m->message_id);
	free(m->exchange);
	free(m->routing_key);
	props_free(&m->props);
	free(m->body);
	free(m);
}

static void
props_pack_str(msgpack_packer *pk, const char *s)
{
	size_t n = strlen(s);
	msgpack_pack_str(pk, n);
	msgpack_pack_str_body(pk, s, n);
}

/* Field keys are one byte: the record is stored once per message. */
static const struct {
	const char *key;
	size_t off;
} props_fields[] = {
	{ "c", offsetof(struct props, content_type) },
	{ "i", offsetof(struct props, correlation_id) },
	{ "t", offsetof(struct props, type) },
	{ "e", offsetof(struct props, expiration) },
	{ "r", offsetof(struct props, reply_to) },
};
#define PROPS_NFIELDS (sizeof props_fields / sizeof props_fields[0])

int
props_pack(const struct props *p, char **buf, size_t *len)
{
	msgpack_sbuffer sb;
	msgpack_packer pk;
	size_t i, n = 0;

	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	for (i = 0; i < PROPS_NFIELDS; i++)
		if (*(char **)((char *)p + props_fields[i].off))
			n++;
	msgpack_pack_map(&pk, n + (p->n_headers > 0));
	for (i = 0; i < PROPS_NFIELDS; i++) {
		const char *v = *(char **)((char *)p + props_fields[i].off);
		if (!v)
			continue;
		props_pack_str(&pk, props_fields[i].key);
		props_pack_str(&pk, v);
	}
	if (p->n_headers) {
		props_pack_str(&pk, "h");
		msgpack_pack_map(&pk, p->n_headers);
		for (i = 0; i < p->n_headers; i++) {
			props_pack_str(&pk, p->headers[i].name);
			props_pack_str(&pk, p->headers[i].value);
		}
	}
	*buf = sb.data;		/* ownership moves to the caller */
	*len = sb.size;
	return 0;
}

static char *
props_strdup(const msgpack_object *o)
{
	char *s;

	if (o->type != MSGPACK_OBJECT_STR)
		return NULL;
	if (o->via.str.size == 0)	/* msgpack-c gives it a NULL pointer */
		return xstrdup("");
	if (memchr(o->via.str.ptr, '\0', o->via.str.size))
		return NULL;
	s = xmalloc(o->via.str.size + 1);
	memcpy(s, o->via.str.ptr, o->via.str.size);
	s[o->via.str.size] = '\0';
	return s;
}

static int
props_unpack_headers(const msgpack_object *o, struct props *p)
{
	uint32_t i;

	if (o->type != MSGPACK_OBJECT_MAP)
		return -1;
	for (i = 0; i < o->via.map.size; i++) {
		char *k = props_strdup(&o->via.map.ptr[i].key);
		char *v = props_strdup(&o->via.map.ptr[i].val);
		if (!k || !v || !*k) {
			free(k);
			free(v);
			return -1;
		}
		props_set_header(p, k, v);
		free(k);
		free(v);
	}
	return 0;
}

static uint64_t
props_be(const unsigned char *p, int k)
{
	uint64_t v = 0;
	int i;

	for (i = 0; i < k; i++)
		v = v << 8 | p[i];
	return v;
}

/*
 * msgpack-c allocates a container's elements from the count in its header
 * before reading them, so a few damaged bytes can ask for gigabytes. Walk
 * the encoding first without allocating: every object still to read takes
 * at least one byte, so more announced objects than bytes left is damage.
 */
int
props_msgpack_sane(const char *buf, size_t len)
{
	const unsigned char *p = (const unsigned char *)buf;
	size_t pos = 0;
	uint64_t todo = 1;	/* objects still to read */

	while (todo > 0) {
		uint64_t skip = 0, n = 0;	/* n: elements of a container */
		unsigned b;
		int k = 0;

		if (pos >= len)
			return 0;
		b = p[pos++];
		todo--;
		if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3)
			continue;	/* fixint, nil, booleans */
		if (b >= 0x80 && b <= 0x8f)
			n = 2 * (uint64_t)(b & 0x0f);
		else if (b >= 0x90 && b <= 0x9f)
			n = b & 0x0f;
		else if (b >= 0xa0 && b <= 0xbf)
			skip = b & 0x1f;
		else switch (b) {
		case 0xc4: case 0xd9: k = 1; break;		/* bin8, str8 */
		case 0xc5: case 0xda: k = 2; break;
		case 0xc6: case 0xdb: k = 4; break;
		case 0xc7: k = 1; skip = 1; break;		/* ext: + type byte */
		case 0xc8: k = 2; skip = 1; break;
		case 0xc9: k = 4; skip = 1; break;
		case 0xca: skip = 4; break;
		case 0xcb: skip = 8; break;
		case 0xcc: case 0xd0: skip = 1; break;
		case 0xcd: case 0xd1: skip = 2; break;
		case 0xce: case 0xd2: skip = 4; break;
		case 0xcf: case 0xd3: skip = 8; break;
		case 0xd4: skip = 2; break;			/* fixext */
		case 0xd5: skip = 3; break;
		case 0xd6: skip = 5; break;
		case 0xd7: skip = 9; break;
		case 0xd8: skip = 17; break;
		case 0xdc: case 0xdd: case 0xde: case 0xdf: {	/* array16/32, map16/32 */
			int w = (b == 0xdc || b == 0xde) ? 2 : 4;
			if (len - pos < (size_t)w)
				return 0;
			n = props_be(p + pos, w) * (b >= 0xde ? 2 : 1);
			pos += w;
			break;
		}
		default:
			return 0;	/* 0xc1 is never used */
		}
		if (k) {
			if (len - pos < (size_t)k)
				return 0;
			skip += props_be(p + pos, k);
			pos += k;
		}
		if (skip > len - pos || todo + n > len - pos - skip)
			return 0;
		pos += skip;
		todo += n;
	}
	return 1;
}

int
props_unpack(const char *buf, size_t len, struct props *p)
{
	msgpack_unpacked u;
	size_t off = 0;
	uint32_t i;
	int rc = -1;

	memset(p, 0, sizeof *p);
	if (len == 0)
		return 0;
	if (len > PROPS_MAX_PACKED || !props_msgpack_sane(buf, len))
		return -1;
	msgpack_unpacked_init(&u);
	if (msgpack_unpack_next(&u, buf, len, &off) != MSGPACK_UNPACK_SUCCESS ||
	    off != len || u.data.type != MSGPACK_OBJECT_MAP)
		goto out;
	for (i = 0; i < u.data.via.map.size; i++) {
		const msgpack_object *k = &u.data.via.map.ptr[i].key;
		const msgpack_object *v = &u.data.via.map.ptr[i].val;
		size_t f;

		if (k->type != MSGPACK_OBJECT_STR || k->via.str.size != 1)
			goto out;
		if (k->via.str.ptr[0] == 'h') {
			if (props_unpack_headers(v, p) < 0)
				goto out;
			continue;
		}
		for (f = 0; f < PROPS_NFIELDS; f++)
			if (props_fields[f].key[0] == k->via.str.ptr[0])
				break;
		if (f == PROPS_NFIELDS)
			goto out;
		{
			char **dst = (char **)((char *)p + props_fields[f].off);
			free(*dst);
			if (!(*dst = props_strdup(v)))
				goto out;
		}
	}
	rc = 0;
out:
	msgpack_unpacked_destroy(&u);
	if (rc < 0)
		props_free(p);
	return rc;
}
