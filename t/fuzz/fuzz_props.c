/*
 * Fuzz target: the decoder of stored message properties (props_unpack),
 * which reads every outbox and inbox record back from the store (store.c),
 * a damaged or foreign record included.
 *
 * Input: the msgpack record as stored.
 *
 * Checks: no crash, leak or undefined behaviour; a failed decode leaves
 * nothing allocated; a record that decodes has non-empty header names and
 * strings without NUL, and packs into a record that decodes to the same
 * properties and packs to the same bytes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "props.h"

#include "fuzz_common.h"

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct props p, q;
	char *b1 = NULL, *b2 = NULL;
	size_t n1 = 0, n2 = 0, i;

	if (props_unpack((const char *)data, size, &p) < 0) {
		FUZZ_CHECK(!p.content_type && !p.correlation_id && !p.type && !p.expiration &&
		    !p.reply_to && !p.headers && !p.n_headers, "a failed decode left data");
		return 0;
	}
	for (i = 0; i < p.n_headers; i++)
		FUZZ_CHECK(p.headers[i].name && *p.headers[i].name && p.headers[i].value,
		    "header %zu", i);
	FUZZ_CHECK(props_pack(&p, &b1, &n1) == 0, "pack");
	FUZZ_CHECK(props_unpack(b1, n1, &q) == 0, "a record sagad packed does not decode");
	FUZZ_CHECK(fuzz_props_eq(&p, &q), "properties changed through pack/unpack");
	FUZZ_CHECK(props_pack(&q, &b2, &n2) == 0, "pack");
	FUZZ_CHECK(n1 == n2 && memcmp(b1, b2, n1) == 0, "packing not stable");
	free(b1);
	free(b2);
	props_free(&p);
	props_free(&q);
	return 0;
}
