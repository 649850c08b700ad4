/*
 * The saga engine's messages out: a step's command or compensation (or a
 * transaction's PREPARE, COMMIT, ABORT), an outcome event; their stable
 * ids, headers and templates, stored through the saga store to go out with
 * the state change that sent them.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "delivery.h"
#include "log.h"
#include "props.h"
#include "saga_data.h"
#include "saga_int.h"
#include "saga_store.h"
#include "sagad.h"
#include "xmalloc.h"

/* ---- messages out ---- */

/* Ids are stable for one saga, step and purpose: a resend carries the
 * same id, so that the participant's inbox drops what it already did. */
void
saga_message_id_of(const char *saga_id, const char *saga, const char *step, const char *what,
    char *out, size_t len)
{
	int n = snprintf(out, len, "%s:%s%s%s:%s", saga_id, saga,
	    step ? ":" : "", step ? step : "", what);

	if (n < 0 || (size_t)n >= len || n > 255) {
		struct msg tmp;
		char h[40];
		memset(&tmp, 0, sizeof tmp);
		tmp.exchange = (char *)saga;
		tmp.routing_key = (char *)(step ? step : "");
		tmp.props.correlation_id = (char *)saga_id;
		tmp.props.type = (char *)what;
		delivery_derive_id(&tmp, h);
		snprintf(out, len, "%s", h);
	}
}

static void
saga_message_id(const struct saga_inst *in, const char *step, const char *what,
    char *out, size_t len)
{
	saga_message_id_of(in->id, in->def->name, step, what, out, len);
}

/* A headers template's rendering (a JSON object of strings) onto p. */
static void
saga_set_headers(struct props *p, const char *headers)
{
	json_t *j = headers ? json_loads(headers, 0, NULL) : NULL, *v;
	const char *name;

	json_object_foreach(j, name, v)
		if (json_is_string(v))
			props_set_header(p, name, json_string_value(v));
	json_decref(j);
}

void
saga_send(struct saga_engine *e, struct saga_inst *in, const struct conf_binding *to,
    const char *kind, const char *step, const char *what, const char *body,
    size_t len, const char *ct, int reply)
{
	saga_send_with(e, in, to, kind, step, what, body, len, ct, NULL, reply);
}

void
saga_send_with(struct saga_engine *e, struct saga_inst *in, const struct conf_binding *to,
    const char *kind, const char *step, const char *what, const char *body,
    size_t len, const char *ct, const char *headers, int reply)
{
	struct msg m;
	char id[512];

	memset(&m, 0, sizeof m);
	saga_message_id(in, step, what, id, sizeof id);
	m.message_id = id;
	m.exchange = to->exchange;
	m.routing_key = to->key;
	m.body = (char *)body;
	m.body_len = len;
	m.props.content_type = ct ? xstrdup(ct) : NULL;
	m.props.correlation_id = xstrdup(in->id);
	if (reply)
		m.props.reply_to = xstrdup(e->d->conf->saga_queue);
	saga_set_headers(&m.props, headers);	/* first: sagad's own win */
	props_set_header(&m.props, "x-sagad-saga", in->def->name);
	if (step)
		props_set_header(&m.props, "x-sagad-step", step);
	props_set_header(&m.props, "x-sagad-kind", kind);
	saga_trace_out(e, in, &m.props, kind, step);
	/* A transaction's messages wait for the fsync: its decision must be
	 * durable before a COMMIT or ABORT leaves (the decision log). */
	if (saga_store_send(e->ss, &m, e->consumed && !in->def->transaction ?
	    SAGA_SEND_CONSUMED : 0) < 0)
		log_error("cannot store a saga message", LOG_STR("saga", in->def->name),
		    LOG_STR("id", in->id), LOG_STR("message_id", id));
	props_free(&m.props);
	{
		char detail[600];
		snprintf(detail, sizeof detail, "%s:%s", to->exchange, to->key);
		saga_log(e, in, "out", what, step, id, detail);
	}
}

/* Step i comes before the definition's pivot. */
static int
saga_step_before_pivot(const struct conf_saga *def, size_t i)
{
	for (; i < def->n_steps; i++)
		if (def->steps[i].pivot)
			return 1;
	return 0;
}

/* The x-sagad-kind of a step's message: a transaction's say which phase
 * they are (prepare, commit, abort), a saga's what they are. */
static const char *
saga_step_msg_kind(const struct conf_saga *def, size_t i, int comp)
{
	if (def->transaction)
		return comp ? "abort" : saga_step_before_pivot(def, i) ? "prepare" : "commit";
	return comp ? "compensation" : def->steps[i].notify ? "notification" : "command";
}

int
saga_send_step(struct saga_engine *e, struct saga_inst *in, size_t i, int comp,
    char why[SAGA_DATA_ERR])
{
	const struct conf_saga_step *cs = &in->def->steps[i];
	const struct saga_step_rt *st = &in->steps[i];
	const char *tpl = comp ? cs->compensate_body : cs->body;
	const char *htpl = comp ? cs->compensate_headers : cs->headers;
	const char *body = comp ? st->body : in->body, *ct = comp ? st->ct : in->ct;
	const char *kind = saga_step_msg_kind(in->def, i, comp);
	size_t len = comp ? st->body_len : in->body_len;
	char *rendered = NULL, *headers = NULL, what[32];
	struct saga_data_src src;

	saga_data_of(in, &src);
	if (tpl && !(rendered = saga_data_render(tpl, &src, why)))
		return -1;
	if (htpl && !(headers = saga_data_headers(htpl, &src, why))) {
		free(rendered);
		return -1;
	}
	if (rendered) {
		body = rendered;
		len = strlen(rendered);
		ct = "application/json";
	}
	/* A compensation by event goes again as a new message: its
	 * participant took the last one (it answered with an event, not a
	 * refusal its sagad forgets), and would drop the same id. */
	if (comp && cs->compensate_success.exchange && st->comp_sends > 1)
		snprintf(what, sizeof what, "compensate#%u", st->comp_sends);
	else
		snprintf(what, sizeof what, "%s", comp ? "compensate" : kind);
	saga_send_with(e, in, comp ? &cs->compensate : &cs->command, kind, cs->name, what,
	    body, len, ct, headers, !cs->notify && !(comp && cs->compensate_success.exchange));
	free(rendered);
	free(headers);
	return 0;
}

