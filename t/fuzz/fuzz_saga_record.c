/*
 * Fuzz target: the decoder of stored saga instances (saga_unpack in
 * saga_record.c, which this file includes), i.e. what sagad reads back from
 * the store's saga table after a restart, a damaged or foreign record included.
 *
 * Input: byte 0 picks the saga definition (index mod the number of sagas
 * in t/fuzz/fuzz_common.h's configuration), the rest is the msgpack record.
 *
 * Checks: no crash, leak or undefined behaviour, whatever the record; a
 * record that decodes has states and indices in range, and packs again into
 * a record that decodes to the same instance and packs to the same bytes.
 */
#include "saga_record.c"

#include "fuzz_common.h"

static struct sagad_conf *conf;

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	conf = fuzz_load_conf(fuzz_conf_text);
	return 0;
}

static int
fuzz_bytes_eq(const char *a, size_t an, const char *b, size_t bn)
{
	return an == bn && (an == 0 || memcmp(a, b, an) == 0);
}

static void
fuzz_inst_eq(const struct saga_inst *a, const struct saga_inst *b)
{
	size_t i;

	FUZZ_CHECK(a->state == b->state && a->cur == b->cur && a->order == b->order,
	    "instance fields changed");
	FUZZ_CHECK(fuzz_bytes_eq(a->body, a->body_len, b->body, b->body_len), "body changed");
	FUZZ_CHECK(fuzz_str_eq(a->ct, b->ct) && fuzz_str_eq(a->reason, b->reason),
	    "strings changed");
	for (i = 0; i < a->def->n_steps; i++) {
		const struct saga_step_rt *x = &a->steps[i], *y = &b->steps[i];
		FUZZ_CHECK(x->state == y->state && x->attempts == y->attempts &&
		    x->comp_attempts == y->comp_attempts && x->order == y->order &&
		    x->comp_sends == y->comp_sends,
		    "step %zu changed", i);
		FUZZ_CHECK(fuzz_bytes_eq(x->body, x->body_len, y->body, y->body_len),
		    "step %zu body changed", i);
		FUZZ_CHECK(fuzz_str_eq(x->ct, y->ct), "step %zu content type changed", i);
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct saga_inst *in, *again;
	struct saga_version v = { "0123456789abcdef", 0, NULL, NULL };
	msgpack_sbuffer sb1, sb2;
	size_t i;

	if (size < 1 || size > 65536)
		return 0;
	v.def_index = data[0] % conf->n_sagas;
	v.def = &conf->sagas[v.def_index];
	in = saga_inst_new(&v, "fuzz-saga-id");
	if (saga_unpack(in, (const char *)data + 1, size - 1) < 0) {
		saga_inst_free(in);
		return 0;
	}
	FUZZ_CHECK(in->state < SAGA_NSTATES, "state %d", (int)in->state);
	FUZZ_CHECK(in->cur <= in->def->n_steps, "cur %u", in->cur);
	for (i = 0; i < in->def->n_steps; i++)
		FUZZ_CHECK(in->steps[i].state < STEP_NSTATES, "step state");
	saga_pack(in, &sb1);
	again = saga_inst_new(&v, "fuzz-saga-id");
	FUZZ_CHECK(saga_unpack(again, sb1.data, sb1.size) == 0,
	    "a record sagad packed does not decode");
	fuzz_inst_eq(in, again);
	saga_pack(again, &sb2);
	FUZZ_CHECK(fuzz_bytes_eq(sb1.data, sb1.size, sb2.data, sb2.size), "packing not stable");
	msgpack_sbuffer_destroy(&sb1);
	msgpack_sbuffer_destroy(&sb2);
	saga_inst_free(again);
	saga_inst_free(in);
	return 0;
}
