/*
 * Fuzz target: the saga message classifier (saga_classify: which saga
 * start, command or compensation reply, or choreographed success/failure
 * event a consumed message is).
 *
 * Input: byte 0 the size of the result array (0..16), then NUL-separated
 * strings: exchange, routing key, then header name/value pairs (a missing
 * exchange or key stays NULL, as for a message without them). The
 * configuration (t/fuzz/fuzz_common.h) has an orchestrated and two
 * choreographed sagas that share events.
 *
 * Checks: no crash or undefined behaviour; never more matches than asked
 * for; every match names a configured saga and step; what it says agrees
 * with the message (a reply has x-sagad-outcome and names the saga and
 * step it matched; a start/success/failure event is exactly that saga's
 * binding).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "props.h"
#include "saga.h"

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
fuzz_is(const struct conf_binding *b, const struct msg *m)
{
	return b->exchange && m->exchange && m->routing_key &&
	    strcmp(b->exchange, m->exchange) == 0 && strcmp(b->key, m->routing_key) == 0;
}

/* The next NUL-terminated string of the input, or NULL at its end. */
static char *
fuzz_next(const uint8_t **p, const uint8_t *end)
{
	const uint8_t *z;
	char *s;

	if (*p >= end)
		return NULL;
	z = memchr(*p, '\0', end - *p);
	if (!z)
		z = end;
	s = strndup((const char *)*p, z - *p);
	*p = z < end ? z + 1 : end;
	return s;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const uint8_t *p = data + 1, *end = data + size;
	struct saga_match out[17];
	struct msg m;
	size_t max, n, i;
	char *k, *v;

	if (size < 1 || size > 4096)
		return 0;
	max = data[0] % 17;
	memset(&m, 0, sizeof m);
	m.message_id = strdup("fuzz");
	m.exchange = fuzz_next(&p, end);
	m.routing_key = fuzz_next(&p, end);
	while ((k = fuzz_next(&p, end))) {
		v = fuzz_next(&p, end);
		props_set_header(&m.props, k, v ? v : "");
		free(k);
		free(v);
	}
	memset(out, 0xa5, sizeof out);
	n = saga_classify(conf, &m, out, max);
	FUZZ_CHECK(n <= max, "%zu matches for an array of %zu", n, max);
	for (i = 0; i < n; i++) {
		const struct saga_match *mt = &out[i];
		const struct conf_saga *sg;

		FUZZ_CHECK(mt->saga < conf->n_sagas, "saga index %zu", mt->saga);
		sg = &conf->sagas[mt->saga];
		/* A reply may name a step of an older version only (found by
		 * name in the instance's own version). */
		FUZZ_CHECK(mt->input == SAGA_IN_START || mt->step < sg->n_steps ||
		    (mt->input == SAGA_IN_REPLY && mt->step == SAGA_STEP_BY_NAME),
		    "step index %zu", mt->step);
		FUZZ_CHECK(mt->input == SAGA_IN_START || mt->step_name, "a step without its name");
		switch (mt->input) {
		case SAGA_IN_REPLY: {
			const char *o = props_get_header(&m.props, "x-sagad-outcome");
			const char *sn = props_get_header(&m.props, "x-sagad-saga");
			const char *st = props_get_header(&m.props, "x-sagad-step");
			FUZZ_CHECK(n == 1 && o && sn && st, "a reply without its headers");
			FUZZ_CHECK(strcmp(sn, sg->name) == 0 && strcmp(st, mt->step_name) == 0 &&
			    (mt->step == SAGA_STEP_BY_NAME ||
			    strcmp(st, sg->steps[mt->step].name) == 0), "reply matched elsewhere");
			FUZZ_CHECK(mt->success == (strcmp(o, "success") == 0), "outcome");
			break;
		}
		case SAGA_IN_START:
			FUZZ_CHECK(fuzz_is(&sg->start, &m), "start matched another event");
			break;
		case SAGA_IN_SUCCESS:
			FUZZ_CHECK(sg->mode == SAGA_CHOREOGRAPHED &&
			    fuzz_is(&sg->steps[mt->step].success, &m), "success matched another event");
			break;
		case SAGA_IN_FAILURE:
			FUZZ_CHECK(sg->mode == SAGA_CHOREOGRAPHED &&
			    fuzz_is(&sg->steps[mt->step].failure, &m), "failure matched another event");
			break;
		case SAGA_IN_COMP_SUCCESS:
			FUZZ_CHECK(sg->mode == SAGA_CHOREOGRAPHED &&
			    fuzz_is(&sg->steps[mt->step].compensate_success, &m),
			    "compensation success matched another event");
			break;
		case SAGA_IN_COMP_FAILURE:
			FUZZ_CHECK(sg->mode == SAGA_CHOREOGRAPHED &&
			    fuzz_is(&sg->steps[mt->step].compensate_failure, &m),
			    "compensation failure matched another event");
			break;
		default:
			FUZZ_CHECK(0, "unknown input kind %d", (int)mt->input);
		}
	}
	/* Nothing is written past what was reported. */
	{
		unsigned char pat[sizeof out[0]];
		memset(pat, 0xa5, sizeof pat);
		for (i = n; i < 17; i++)
			FUZZ_CHECK(memcmp(&out[i], pat, sizeof pat) == 0,
			    "result %zu written but not counted", i);
	}
	free(m.message_id);
	free(m.exchange);
	free(m.routing_key);
	props_free(&m.props);
	return 0;
}
