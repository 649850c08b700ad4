/*
 * What a message consumed from <service>.sagas is to the saga engine
 * (saga.h: saga_classify): a reply to one of its commands or
 * compensations (the x-sagad-* headers a participant's sagad copies onto
 * it), the start event of a definition, or, for a choreographed saga, a
 * step's success or failure event, or its compensation's. One message may be several of these,
 * for several definitions.
 */
#include <string.h>

#include "conf.h"
#include "msg.h"
#include "props.h"
#include "saga.h"

static int
saga_binding_is(const struct conf_binding *b, const struct msg *m)
{
	return b->exchange && strcmp(b->exchange, m->exchange) == 0 &&
	    strcmp(b->key, m->routing_key) == 0;
}

size_t
saga_classify(const struct sagad_conf *conf, const struct msg *m,
    struct saga_match *out, size_t max)
{
	const char *outcome = props_get_header(&m->props, "x-sagad-outcome");
	size_t n = 0, i, j;

	if (outcome) {
		const char *saga = props_get_header(&m->props, "x-sagad-saga");
		const char *step = props_get_header(&m->props, "x-sagad-step");
		const char *kind = props_get_header(&m->props, "x-sagad-kind");
		if (!saga || !step || !max)
			return 0;
		for (i = 0; i < conf->n_sagas; i++) {
			if (strcmp(conf->sagas[i].name, saga) != 0)
				continue;
			for (j = 0; j < conf->sagas[i].n_steps; j++)
				if (strcmp(conf->sagas[i].steps[j].name, step) == 0) {
					out[0].input = SAGA_IN_REPLY;
					out[0].saga = i;
					out[0].step = j;
					out[0].compensation = kind && strcmp(kind, "compensation") == 0;
					out[0].success = strcmp(outcome, "success") == 0;
					return 1;
				}
		}
		return 0;
	}
	if (!m->exchange || !m->routing_key)
		return 0;
	for (i = 0; i < conf->n_sagas && n < max; i++) {
		const struct conf_saga *sg = &conf->sagas[i];
		if (saga_binding_is(&sg->start, m)) {
			out[n].input = SAGA_IN_START;
			out[n].saga = i;
			out[n].step = 0;
			n++;
		}
		if (sg->mode != SAGA_CHOREOGRAPHED)
			continue;
		for (j = 0; j < sg->n_steps && n < max; j++) {
			if (saga_binding_is(&sg->steps[j].success, m)) {
				out[n].input = SAGA_IN_SUCCESS;
				out[n].saga = i;
				out[n].step = j;
				n++;
			} else if (saga_binding_is(&sg->steps[j].failure, m)) {
				out[n].input = SAGA_IN_FAILURE;
				out[n].saga = i;
				out[n].step = j;
				n++;
			} else if (saga_binding_is(&sg->steps[j].compensate_success, m) ||
			    saga_binding_is(&sg->steps[j].compensate_failure, m)) {
				out[n].input = saga_binding_is(&sg->steps[j].compensate_success, m) ?
				    SAGA_IN_COMP_SUCCESS : SAGA_IN_COMP_FAILURE;
				out[n].saga = i;
				out[n].step = j;
				out[n].compensation = 1;
				n++;
			}
		}
	}
	return n;
}
