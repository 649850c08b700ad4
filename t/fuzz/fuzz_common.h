/*
 * Shared by the libFuzzer targets in t/fuzz (see t/fuzz/run.sh): a fixed
 * configuration to run inputs against, and small checks that abort (so that
 * libFuzzer records the input) when an invariant does not hold.
 */
#ifndef SAGAD_FUZZ_COMMON_H
#define SAGAD_FUZZ_COMMON_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "props.h"

/* A configuration with exchanges (strict publish), a subscription and
 * both kinds of saga, with bindings shared between sagas so that one
 * message can match several of them. */
static const char fuzz_conf_text[] =
    "service = \"orders\";\n"
    "exchanges = ( { name = \"events\"; type = \"topic\"; },\n"
    "              { name = \"commands\"; type = \"topic\"; } );\n"
    "subscriptions = ( { name = \"inbox\"; bind = [ \"events:payment.*\" ];\n"
    "                    deliver = \"http://127.0.0.1:8080/messages\"; } );\n"
    "sagas = (\n"
    "  { name = \"create-order\"; mode = \"orchestrated\"; start = \"events:order.created\";\n"
    "    timeout = 30;\n"
    "    steps = (\n"
    "      { name = \"reserve-stock\"; command = \"commands:stock.reserve\";\n"
    "        compensate = \"commands:stock.release\"; timeout = 5; },\n"
    "      { name = \"authorize-payment\"; command = \"commands:payment.authorize\";\n"
    "        compensate = \"commands:payment.cancel\"; },\n"
    "      { name = \"approve\"; command = \"commands:order.approve\"; } );\n"
    "    completed = \"events:order.approved\"; compensated = \"events:order.rejected\"; },\n"
    "  { name = \"fulfilment\"; mode = \"choreographed\"; start = \"events:order.approved\";\n"
    "    timeout = 60;\n"
    "    steps = (\n"
    "      { name = \"pay\"; success = \"events:payment.captured\"; failure = \"events:payment.failed\";\n"
    "        compensate = \"commands:payment.refund\"; },\n"
    "      { name = \"ship\"; success = \"events:shipment.scheduled\"; failure = \"events:shipment.failed\";\n"
    "        compensate = \"commands:shipment.cancel\"; } );\n"
    "    completed = \"events:order.fulfilled\"; compensated = \"events:order.cancelled\"; },\n"
    "  { name = \"audit\"; mode = \"choreographed\"; start = \"events:order.approved\";\n"
    "    steps = (\n"
    "      { name = \"pay\"; success = \"events:payment.captured\"; },\n"
    "      { name = \"notify\"; success = \"events:customer.notified\"; failure = \"events:payment.failed\"; } ); }\n"
    ");\n";

#define FUZZ_CHECK(cond, ...) do {					\
	if (!(cond)) {							\
		fprintf(stderr, "fuzz invariant failed at %s:%d: %s: ",	\
		    __FILE__, __LINE__, #cond);				\
		fprintf(stderr, __VA_ARGS__);				\
		fputc('\n', stderr);					\
		abort();						\
	}								\
} while (0)

static struct sagad_conf *
fuzz_load_conf(const char *text)
{
	struct conf_errors e = { NULL, 0 };
	struct sagad_conf *c = conf_load_string(text, "fuzz.conf", "/nonexistent", &e);
	size_t i;

	for (i = 0; i < e.n; i++)
		fprintf(stderr, "fuzz: built-in configuration: %s\n", e.msg[i]);
	conf_errors_clear(&e);
	if (!c)
		abort();
	return c;
}

static int
fuzz_str_eq(const char *a, const char *b)
{
	if (!a || !b)
		return a == b;
	return strcmp(a, b) == 0;
}

/* Two property sets hold the same thing (headers in the same order). */
static int
fuzz_props_eq(const struct props *a, const struct props *b)
{
	size_t i;

	if (!fuzz_str_eq(a->content_type, b->content_type) ||
	    !fuzz_str_eq(a->correlation_id, b->correlation_id) ||
	    !fuzz_str_eq(a->type, b->type) ||
	    !fuzz_str_eq(a->expiration, b->expiration) ||
	    !fuzz_str_eq(a->reply_to, b->reply_to) ||
	    a->n_headers != b->n_headers)
		return 0;
	for (i = 0; i < a->n_headers; i++)
		if (!fuzz_str_eq(a->headers[i].name, b->headers[i].name) ||
		    !fuzz_str_eq(a->headers[i].value, b->headers[i].value))
			return 0;
	return 1;
}

/* What the store does with a message's properties: pack them, and unpack
 * them when the record is read back. Whatever sagad accepted must come back
 * the same. */
static void
fuzz_props_roundtrip(const struct props *p)
{
	struct props back;
	char *buf = NULL;
	size_t len = 0;

	FUZZ_CHECK(props_pack(p, &buf, &len) == 0, "props_pack failed");
	FUZZ_CHECK(props_unpack(buf, len, &back) == 0,
	    "a record sagad packed does not unpack (%zu bytes)", len);
	FUZZ_CHECK(fuzz_props_eq(p, &back), "properties changed through the store");
	props_free(&back);
	free(buf);
}

#endif
