/*
 * Replies to saga commands through the AMQP front door. An HTTP service
 * answers a command with its status and sagad builds the reply (dispatch.c,
 * dsub_reply); a service behind the front door publishes its reply itself,
 * RPC style: to the command's reply_to queue on the default exchange, with
 * the command's correlation id. The saga engine needs more to correlate it
 * (sagad.conf(5), SAGAS): the saga, step and kind of the command and an
 * outcome. So each command delivered through the front door is remembered
 * (amqpd_reply_expect), and a publish that answers it gets those headers
 * (amqpd_reply_decorate): x-sagad-outcome "success" unless the service set
 * it ("failure": a refusal). Headers the service set are kept.
 */
#include <stdlib.h>
#include <string.h>

#include "amqpd_int.h"
#include "log.h"
#include "props.h"
#include "trace.h"
#include "xmalloc.h"

/* Commands remembered at most; the oldest is forgotten first (a service
 * that never replies must not grow sagad). */
#define AMQPD_REPLIES_MAX 4096

/* The headers of a command that its reply carries, by AMQPD_REPLY_KEYS'
 * order (struct amqpd_reply's values). */
static const char *const amqpd_reply_keys[AMQPD_REPLY_NKEYS] = {
	"x-sagad-saga", "x-sagad-step", "x-sagad-kind", TRACE_PARENT, TRACE_STATE
};

static void
amqpd_reply_free(struct amqpd_reply *r)
{
	size_t i;

	free(r->reply_to);
	free(r->correlation_id);
	free(r->message_id);
	for (i = 0; i < AMQPD_REPLY_NKEYS; i++)
		free(r->values[i]);
}

static void
amqpd_reply_drop(struct amqpd *a, size_t i)
{
	amqpd_reply_free(&a->replies[i]);
	memmove(&a->replies[i], &a->replies[i + 1], (a->nreplies - i - 1) * sizeof *a->replies);
	a->nreplies--;
}

void
amqpd_reply_expect(struct amqpd *a, const struct msg *cmd)
{
	struct amqpd_reply *r;
	const char *v;
	size_t i;

	if (!cmd->props.reply_to || !props_get_header(&cmd->props, "x-sagad-saga"))
		return;		/* not a saga's command: nothing to correlate */
	if (a->nreplies == AMQPD_REPLIES_MAX)
		amqpd_reply_drop(a, 0);
	r = XPUSH(a->replies, a->nreplies, a->capreplies);
	memset(r, 0, sizeof *r);
	r->reply_to = xstrdup(cmd->props.reply_to);
	r->correlation_id = cmd->props.correlation_id ? xstrdup(cmd->props.correlation_id) : NULL;
	r->message_id = xstrdup(cmd->message_id);
	for (i = 0; i < AMQPD_REPLY_NKEYS; i++)
		if ((v = props_get_header(&cmd->props, amqpd_reply_keys[i])) != NULL)
			r->values[i] = xstrdup(v);
}

static int
amqpd_reply_same(const char *a, const char *b)
{
	return a && b ? strcmp(a, b) == 0 : a == b;
}

/* The command m answers: to its reply_to on the default exchange, the
 * same correlation id, and the step if the service named it. -1 when two
 * commands could be meant (a saga's parallel steps share the saga id as
 * correlation id): the service must then say x-sagad-step. */
static long
amqpd_reply_find(const struct amqpd *a, const struct msg *m)
{
	const char *step = props_get_header(&m->props, "x-sagad-step");
	long found = -1;
	size_t i;
	int n = 0;

	if (!m->exchange || *m->exchange || !m->routing_key)
		return -1;
	for (i = 0; i < a->nreplies; i++) {
		const struct amqpd_reply *r = &a->replies[i];
		if (strcmp(r->reply_to, m->routing_key) != 0 ||
		    !amqpd_reply_same(r->correlation_id, m->props.correlation_id) ||
		    (step && !amqpd_reply_same(r->values[1], step)))
			continue;
		if (n++ == 0)
			found = (long)i;
	}
	if (n > 1) {
		log_warn("amqp: a reply could answer several saga commands, left as it is; "
		    "set the header x-sagad-step", LOG_STR("routing_key", m->routing_key),
		    LOG_STR("correlation_id", m->props.correlation_id));
		return -1;
	}
	return found;
}

void
amqpd_reply_decorate(struct amqpd *a, struct msg *m)
{
	struct amqpd_reply *r;
	long i = amqpd_reply_find(a, m);
	size_t k;

	if (i < 0)
		return;
	r = &a->replies[i];
	for (k = 0; k < AMQPD_REPLY_NKEYS; k++)
		if (r->values[k] && !props_get_header(&m->props, amqpd_reply_keys[k]))
			props_set_header(&m->props, amqpd_reply_keys[k], r->values[k]);
	if (!props_get_header(&m->props, "x-sagad-outcome"))
		props_set_header(&m->props, "x-sagad-outcome", "success");
	props_set_header(&m->props, "x-sagad-reply-to-message-id", r->message_id);
	amqpd_reply_drop(a, (size_t)i);
}

void
amqpd_reply_free_all(struct amqpd *a)
{
	while (a->nreplies)
		amqpd_reply_drop(a, a->nreplies - 1);
	free(a->replies);
}
