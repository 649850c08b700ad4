/* A message as sagad stores and publishes it, and its packed properties. */
#ifndef SAGAD_PROPS_H
#define SAGAD_PROPS_H

#include <stddef.h>
#include <stdint.h>

struct props_header {
	char *name;
	char *value;
};

/* The AMQP properties a service may set; sagad adds the rest on publish. */
struct props {
	char *content_type;
	char *correlation_id;
	char *type;
	char *expiration;
	char *reply_to;
	struct props_header *headers;
	size_t n_headers;
};

struct msg {
	int64_t seq;		/* outbox order */
	char *message_id;
	char *exchange;		/* "" is the default exchange */
	char *routing_key;
	struct props props;
	char *body;
	size_t body_len;
	unsigned attempts;
	double created_at;
};

/* Add a header (copies); replaces an earlier one of the same name. */
void props_set_header(struct props *p, const char *name, const char *value);
const char *props_get_header(const struct props *p, const char *name);
void props_free(struct props *p);

/* Pack to msgpack (malloc'd buffer), unpack from a stored record. Unpack
 * checks every field and returns -1 on anything malformed. */
int props_pack(const struct props *p, char **buf, size_t *len);
int props_unpack(const char *buf, size_t len, struct props *p);

/* Whether a msgpack encoding is whole and announces no more objects than
 * it has bytes (check before msgpack_unpack_next: it allocates first). */
int props_msgpack_sane(const char *buf, size_t len);

void msg_free(struct msg *m);

#endif
