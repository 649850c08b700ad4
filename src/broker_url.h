/*
 * broker.url as a list of nodes: "amqp://u:p@h1:5672/v, amqp://u:p@h2:5672/v".
 * One entry is one RabbitMQ node (a cluster member, or the only node); each
 * entry carries its own credentials, vhost and scheme, as amqp_parse_url()
 * reads them. Used by the configuration checks (which name a bad entry) and
 * by the broker threads (which walk the list on connection loss).
 */
#ifndef SAGAD_BROKER_URL_H
#define SAGAD_BROKER_URL_H

#include <stddef.h>

#include "amqp_headers.h"

#define BROKER_URL_MAX_NODES 16

struct broker_node {
	char *host, *user, *password, *vhost;
	int port, tls;
	int has_password;	/* the entry itself gave one (user:password@) */
};

/* Split and parse the list. Returns the number of nodes (>= 1) and sets
 * *out; on error returns -1, writes why (naming the entry, never its
 * password) and sets nothing. */
int broker_url_parse(const char *list, struct broker_node **out, char *why, size_t whylen);
void broker_url_free(struct broker_node *nodes, size_t n);
/* The list with every password replaced by ***. */
void broker_url_mask(const char *list, char *out, size_t outlen);

/* A socket for node n on conn: TCP, or TLS (amqps://) with these
 * settings (broker.tls_*); NULL with why set (or empty) on failure. */
amqp_socket_t *broker_url_socket(amqp_connection_state_t conn, const struct broker_node *n,
    int verify, const char *ca, const char *cert, const char *key, char *why, size_t whylen);

#endif
