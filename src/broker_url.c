/*
 * broker.url as a list of nodes (broker_url.h): split on commas, each entry
 * trimmed and parsed by rabbitmq-c's own URL parser.
 */
#include "broker_url.h"

#include "amqp_headers.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"
#include "xmalloc.h"

static int
broker_url_is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* The entry [s, e) trimmed, as a new string. */
static char *
broker_url_entry(const char *s, const char *e)
{
	while (s < e && broker_url_is_space(*s))
		s++;
	while (e > s && broker_url_is_space(e[-1]))
		e--;
	return xstrndup(s, (size_t)(e - s));
}

static int
broker_url_has_password(const char *url)
{
	const char *u = strstr(url, "://"), *at;

	if (!u)
		return 0;
	u += 3;
	at = strchr(u, '@');
	return at && memchr(u, ':', (size_t)(at - u)) != NULL;
}

/* Parse one trimmed entry into n; 0 or -1 with why. */
static int
broker_url_node(const char *entry, int idx, struct broker_node *n, char *why, size_t whylen)
{
	struct amqp_connection_info info;
	char masked[512], *copy;

	util_mask_url(entry, masked, sizeof masked);
	if (!*entry) {
		snprintf(why, whylen, "broker url entry %d is empty", idx + 1);
		return -1;
	}
	if (strncmp(entry, "amqp://", 7) != 0 && strncmp(entry, "amqps://", 8) != 0) {
		snprintf(why, whylen, "broker url entry %d (%s) must start with amqp:// or amqps://",
		    idx + 1, masked);
		return -1;
	}
	copy = xstrdup(entry);
	if (amqp_parse_url(copy, &info) != AMQP_STATUS_OK) {
		snprintf(why, whylen, "broker url entry %d (%s) is malformed "
		    "(amqp://user:password@host:port/vhost)", idx + 1, masked);
		free(copy);
		return -1;
	}
	n->host = xstrdup(info.host);
	n->user = xstrdup(info.user);
	n->password = xstrdup(info.password);
	n->vhost = xstrdup(info.vhost);
	n->port = info.port;
	n->tls = info.ssl;
	n->has_password = broker_url_has_password(entry);
	free(copy);
	return 0;
}

int
broker_url_parse(const char *list, struct broker_node **out, char *why, size_t whylen)
{
	struct broker_node *nodes = xcalloc(BROKER_URL_MAX_NODES, sizeof *nodes);
	const char *s = list, *comma;
	int n = 0;

	for (;;) {
		char *entry;
		int rc;

		comma = strchr(s, ',');
		if (n == BROKER_URL_MAX_NODES) {
			snprintf(why, whylen, "broker url lists more than %d nodes",
			    BROKER_URL_MAX_NODES);
			broker_url_free(nodes, (size_t)n);
			return -1;
		}
		entry = broker_url_entry(s, comma ? comma : s + strlen(s));
		rc = broker_url_node(entry, n, &nodes[n], why, whylen);
		free(entry);
		if (rc < 0) {
			broker_url_free(nodes, (size_t)n);
			return -1;
		}
		n++;
		if (!comma)
			break;
		s = comma + 1;
	}
	*out = nodes;
	return n;
}

void
broker_url_free(struct broker_node *nodes, size_t n)
{
	size_t i;

	if (!nodes)
		return;
	for (i = 0; i < n; i++) {
		free(nodes[i].host);
		free(nodes[i].user);
		free(nodes[i].password);
		free(nodes[i].vhost);
	}
	free(nodes);
}

void
broker_url_mask(const char *list, char *out, size_t outlen)
{
	const char *s = list, *comma;
	size_t used = 0;

	if (outlen == 0)
		return;
	out[0] = '\0';
	for (;;) {
		char *entry, masked[512];

		comma = strchr(s, ',');
		entry = broker_url_entry(s, comma ? comma : s + strlen(s));
		util_mask_url(entry, masked, sizeof masked);
		free(entry);
		if (used < outlen)
			used += (size_t)snprintf(out + used, outlen - used, "%s%s",
			    used ? "," : "", masked);
		if (!comma)
			break;
		s = comma + 1;
	}
}

/* Shared by the broker threads and the front door's topology thread
 * (amqpd_topo.c), so that both reach a node the same way. */
amqp_socket_t *
broker_url_socket(amqp_connection_state_t conn, const struct broker_node *n, int verify,
    const char *ca, const char *cert, const char *key, char *why, size_t whylen)
{
	amqp_socket_t *s;

	if (!n->tls)
		return amqp_tcp_socket_new(conn);
	s = amqp_ssl_socket_new(conn);
	if (!s)
		return NULL;
	amqp_ssl_socket_set_verify_peer(s, verify);
	amqp_ssl_socket_set_verify_hostname(s, verify);
	if (ca && amqp_ssl_socket_set_cacert(s, ca) != AMQP_STATUS_OK) {
		snprintf(why, whylen, "tls: cannot load ca %s", ca);
		return NULL;
	}
	if (cert && amqp_ssl_socket_set_key(s, cert, key) != AMQP_STATUS_OK) {
		snprintf(why, whylen, "tls: cannot load cert %s / key %s", cert, key);
		return NULL;
	}
	return s;
}
