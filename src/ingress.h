/* The service-facing API: POST /v1/publish/{exchange}/{routing_key}. */
#ifndef SAGAD_INGRESS_H
#define SAGAD_INGRESS_H

#include <stdint.h>

#include "msg.h"

struct sagad;
struct ingress;
struct evkeyvalq;
struct sagad_conf;

struct ingress_stats {
	uint64_t accepted, duplicates, rejected, full;
};

struct ingress *ingress_new(struct sagad *d, char **err);
void ingress_free(struct ingress *in);
void ingress_apply_conf(struct ingress *in);
const struct ingress_stats *ingress_stats(const struct ingress *in);

/*
 * Request -> message, without I/O (so that it can be tested and fuzzed):
 * path is the raw request path after the host, headers the request headers.
 * On error returns -1 with an error code name and message. The message id is
 * generated when absent.
 */
int ingress_parse(const struct sagad_conf *conf, const char *path,
    const struct evkeyvalq *headers, struct msg *m, const char **error,
    char *why, size_t whylen);

/*
 * The publish rules the AMQP front door (amqpd_chan.c) shares with the
 * HTTP API: an exchange ("" the default one) and routing key, -1 with an
 * error code name and message as ingress_parse; a Message-Id (1-255
 * visible ASCII); an expiration (milliseconds, at most 2^32-1, as
 * RabbitMQ takes it).
 */
int ingress_check_route(const struct sagad_conf *conf, const char *exchange,
    const char *routing_key, const char **error, char *why, size_t whylen);
int ingress_valid_message_id(const char *v);
int ingress_valid_expiration(const char *v);

#endif
