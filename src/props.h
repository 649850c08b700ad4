/* A message's AMQP properties: headers, and the packed form the store keeps. */
#ifndef SAGAD_PROPS_H
#define SAGAD_PROPS_H

#include <stddef.h>

#include "msg.h"

/* Add a header (copies); replaces an earlier one of the same name. */
void props_set_header(struct props *p, const char *name, const char *value);
void props_del_header(struct props *p, const char *name);	/* if there */
const char *props_get_header(const struct props *p, const char *name);
void props_free(struct props *p);

/* Pack to msgpack (malloc'd buffer), unpack from a stored record. Unpack
 * checks every field and returns -1 on anything malformed. */
int props_pack(const struct props *p, char **buf, size_t *len);
int props_unpack(const char *buf, size_t len, struct props *p);

/* Whether a msgpack encoding is whole and announces no more objects than
 * it has bytes (check before msgpack_unpack_next: it allocates first). */
int props_msgpack_sane(const char *buf, size_t len);

#endif
