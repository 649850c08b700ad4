/*
 * What a message consumed from <service>.sagas is to the saga engine
 * (saga.h: saga_classify): a reply to one of its commands or
 * compensations (the x-sagad-* headers a participant's sagad copies onto
 * it), the start event of a definition, or, for a choreographed saga, a
 * step's success or failure event, or its compensation's. One message may
 * be several of these, for several definitions.
 */
#include <string.h>

#include "conf.h"
#include "msg.h"
#include "props.h"
#include "saga.h"

int
saga_binding_is(const struct conf_binding *b, const struct msg *m)
{
	return b->exchange && m->exchange && m->routing_key &&
	    strcmp(b->exchange, m->exchange) == 0 && strcmp(b->key, m->routing_key) == 0;
}

static size_t
saga_add(struct saga_match *out, enum saga_input input, size_t saga, size_t step,
    const char *step_name)
{
	memset(out, 0, sizeof *out);
	out->input = input;
	out->saga = saga;
	out->step = step;
	out->step_name = step_name;
	out->compensation = input == SAGA_IN_COMP_SUCCESS || input == SAGA_IN_COMP_FAILURE;
	return 1;
}

size_t
saga_classify_events(const struct conf_saga *sg, size_t index, const struct msg *m,
    struct saga_match *out, size_t max)
{
	const struct conf_saga_step *st;
	size_t n = 0, j;

	if (sg->mode != SAGA_CHOREOGRAPHED)
		return 0;
	for (j = 0; j < sg->n_steps && n < max; j++) {
		st = &sg->steps[j];
		if (saga_binding_is(&st->success, m))
			n += saga_add(&out[n], SAGA_IN_SUCCESS, index, j, st->name);
		else if (saga_binding_is(&st->failure, m))
			n += saga_add(&out[n], SAGA_IN_FAILURE, index, j, st->name);
		else if (saga_binding_is(&st->compensate_success, m))
			n += saga_add(&out[n], SAGA_IN_COMP_SUCCESS, index, j, st->name);
		else if (saga_binding_is(&st->compensate_failure, m))
			n += saga_add(&out[n], SAGA_IN_COMP_FAILURE, index, j, st->name);
	}
	return n;
}

/* A reply (outcome set) or a status question (outcome NULL) names its
 * saga and step: the step is found by name in the instance's own version of the definition (SAGA_STEP_BY_NAME when the
 * configuration's has no such step any more). */
static size_t
saga_classify_named(const struct sagad_conf *conf, const struct msg *m, const char *outcome,
    struct saga_match *out)
{
	const char *saga = props_get_header(&m->props, "x-sagad-saga");
	const char *step = props_get_header(&m->props, "x-sagad-step");
	const char *kind = props_get_header(&m->props, "x-sagad-kind");
	size_t i, j;

	if (!saga || !step)
		return 0;
	for (i = 0; i < conf->n_sagas; i++) {
		if (strcmp(conf->sagas[i].name, saga) != 0)
			continue;
		for (j = 0; j < conf->sagas[i].n_steps; j++)
			if (strcmp(conf->sagas[i].steps[j].name, step) == 0)
				break;
		saga_add(out, outcome ? SAGA_IN_REPLY : SAGA_IN_STATUS, i,
		    j < conf->sagas[i].n_steps ? j : SAGA_STEP_BY_NAME, step);
		out->compensation = kind && (strcmp(kind, "compensation") == 0 ||
		    strcmp(kind, "abort") == 0);	/* a transaction's */
		out->success = outcome && strcmp(outcome, "success") == 0;
		return 1;
	}
	return 0;
}

size_t
saga_classify(const struct sagad_conf *conf, const struct msg *m,
    struct saga_match *out, size_t max)
{
	const char *outcome = props_get_header(&m->props, "x-sagad-outcome");
	const char *kind = props_get_header(&m->props, "x-sagad-kind");
	size_t n = 0, i;

	if (!max)
		return 0;
	/* A reply, or a transaction's status question: by name. */
	if (outcome || (kind && strcmp(kind, "status") == 0))
		return saga_classify_named(conf, m, outcome, out);
	if (!m->exchange || !m->routing_key)
		return 0;
	for (i = 0; i < conf->n_sagas && n < max; i++) {
		if (saga_binding_is(&conf->sagas[i].start, m))
			n += saga_add(&out[n], SAGA_IN_START, i, 0, NULL);
		n += saga_classify_events(&conf->sagas[i], i, m, out + n, max - n);
	}
	return n;
}
