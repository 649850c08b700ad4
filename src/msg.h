/*
 * A message as sagad stores and publishes it: its routing, its AMQP
 * properties and its body. Packing the properties for the store is
 * props.h's; msg_free is in props.c beside props_free.
 */
#ifndef SAGAD_MSG_H
#define SAGAD_MSG_H

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

void msg_free(struct msg *m);

#endif
