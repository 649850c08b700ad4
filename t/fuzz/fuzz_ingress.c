/*
 * Fuzz target: publish request validation and header mapping
 * (ingress_parse: POST /v1/publish/{exchange}/{routing_key} and its
 * Message-Id, Content-Type, Correlation-Id, Causation-Id, Amqp-Type,
 * Amqp-Expiration and Amqp-Header-<name> headers -> struct msg).
 *
 * Input: byte 0 picks the configuration (bit 0: exchanges configured, so
 * unknown exchanges are refused); the rest is split on '\n': the first line
 * is the path after "/v1/publish/", each further line a header "Name:value"
 * (split at the first ':'; a line without ':' is a header with an empty
 * value). NUL ends a string, as it does for libevent.
 *
 * Checks: no crash, leak or undefined behaviour, on success and on every
 * error path; an error has a code and a message; an accepted message has a
 * valid exchange ("" or configured), a routing key and message id within
 * AMQP's limits, header names in lower case, and its properties come back
 * unchanged through the store's encoding (props_pack/props_unpack).
 */
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include "conf.h"
#include "ingress.h"
#include "props.h"
#include "util.h"

#include "fuzz_common.h"

static struct sagad_conf *conf_open, *conf_strict;

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	conf_open = fuzz_load_conf("service = \"orders\";\n");
	conf_strict = fuzz_load_conf(fuzz_conf_text);
	return 0;
}

static void
fuzz_headers_free(struct evkeyvalq *h)
{
	struct evkeyval *kv;

	while ((kv = TAILQ_FIRST(h))) {
		TAILQ_REMOVE(h, kv, next);
		free(kv->key);
		free(kv->value);
		free(kv);
	}
}

static void
fuzz_check_accepted(const struct sagad_conf *c, const struct msg *m)
{
	size_t i, j;

	FUZZ_CHECK(m->exchange && m->routing_key && m->message_id, "accepted without names");
	FUZZ_CHECK(!*m->exchange || util_valid_exchange(m->exchange), "bad exchange accepted");
	if (*m->exchange && c->n_exchanges && strncmp(m->exchange, "amq.", 4) != 0)
		FUZZ_CHECK(conf_exchange(c, m->exchange) != NULL, "unknown exchange accepted");
	FUZZ_CHECK(util_valid_shortstr(m->routing_key, 255), "bad routing key accepted");
	FUZZ_CHECK(*m->message_id && strlen(m->message_id) <= 255 &&
	    util_valid_shortstr(m->message_id, 255), "bad message id accepted");
	if (m->props.expiration) {
		FUZZ_CHECK(*m->props.expiration && strlen(m->props.expiration) <= 10,
		    "bad expiration accepted");
		FUZZ_CHECK(strtoull(m->props.expiration, NULL, 10) <= 4294967295ULL,
		    "expiration over 2^32-1 accepted");
	}
	for (i = 0; i < m->props.n_headers; i++) {
		const char *n = m->props.headers[i].name;
		FUZZ_CHECK(*n && strlen(n) <= 128, "header name length");
		for (j = 0; n[j]; j++)
			FUZZ_CHECK(!(n[j] >= 'A' && n[j] <= 'Z'), "header name not lower case: %s", n);
		FUZZ_CHECK(util_valid_shortstr(m->props.headers[i].value, 65535),
		    "header value with control characters");
		for (j = 0; j < i; j++)
			FUZZ_CHECK(strcmp(m->props.headers[j].name, n) != 0, "header %s twice", n);
	}
	fuzz_props_roundtrip(&m->props);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const struct sagad_conf *c;
	struct evkeyvalq headers;
	const char *p, *end = (const char *)data + size, *error = NULL;
	char *path, why[256];
	struct msg m;
	size_t n;
	int rc;

	if (size < 1 || size > 65536)
		return 0;
	c = data[0] & 1 ? conf_strict : conf_open;
	p = (const char *)data + 1;
	/* data is not NUL-terminated: measure within bounds. */
	{
		const char *nl = memchr(p, '\n', end - p);
		n = nl ? (size_t)(nl - p) : (size_t)(end - p);
	}
	path = malloc(strlen("/v1/publish/") + n + 1);
	strcpy(path, "/v1/publish/");
	memcpy(path + strlen("/v1/publish/"), p, n);
	path[strlen("/v1/publish/") + n] = '\0';
	p += n;
	TAILQ_INIT(&headers);
	while (p < end) {
		const char *nl, *colon;
		struct evkeyval *kv;

		p++;	/* the '\n' */
		if (p >= end)
			break;
		nl = memchr(p, '\n', end - p);
		if (!nl)
			nl = end;
		colon = memchr(p, ':', nl - p);
		kv = calloc(1, sizeof *kv);
		kv->key = strndup(p, (colon ? colon : nl) - p);
		kv->value = colon ? strndup(colon + 1, nl - colon - 1) : strdup("");
		TAILQ_INSERT_TAIL(&headers, kv, next);
		p = nl;
	}
	memset(&m, 0, sizeof m);
	rc = ingress_parse(c, path, &headers, &m, &error, why, sizeof why);
	if (rc == 0)
		fuzz_check_accepted(c, &m);
	else
		FUZZ_CHECK(rc == -1 && error && *error && *why, "an error without a code or message");
	/* What ingress_publish frees, on success and on error. */
	free(m.message_id);
	free(m.exchange);
	free(m.routing_key);
	props_free(&m.props);
	fuzz_headers_free(&headers);
	free(path);
	return 0;
}
