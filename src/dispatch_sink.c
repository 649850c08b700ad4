/*
 * Dispatch to the AMQP front door's consumers: a subscription with
 * deliver = "amqp" hands its records to the consumers attached to it
 * (amqpd_consume.c) instead of POSTing them. The inbox is the same: a
 * record is marked in flight in the store before it goes out, and its
 * outcome is recorded as for HTTP (delivered, retried after the backoff,
 * dead-lettered with a reason). The consumers' prefetch stands for the
 * subscription's concurrency. (ARCHITECTURE.md: The AMQP front door)
 */
#include "dispatch.h"

#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "log.h"
#include "sagad.h"
#include "store.h"
#include "txpart.h"
#include "util.h"
#include "xmalloc.h"

int
delivery_frontdoor_sub(const struct delivery *dl, const char *queue)
{
	size_t i;

	for (i = 0; dl && i < dl->nsubs; i++)
		if (dsub_conf(&dl->subs[i])->frontdoor && strcmp(dl->subs[i].queue, queue) == 0)
			return (int)i;
	return -1;
}

int
delivery_attach(struct delivery *dl, int sub, struct delivery_sink *s)
{
	struct dsub *ds = &dl->subs[sub];

	if (ds->sinks && (s->exclusive || ds->sinks->exclusive))
		return -1;
	s->sub = sub;
	s->next = ds->sinks;
	ds->sinks = s;
	ds->turn = s;
	log_info("front-door consumer attached", LOG_STR("subscription", ds->name),
	    LOG_INT("exclusive", s->exclusive));
	dsub_flow(ds);		/* the first one starts the broker's consumer */
	dispatch_schedule(ds);
	return 0;
}

/* The sink's records still held stay acknowledgeable (after a
 * basic.cancel, as AMQP has it); it is released once they are settled. */
void
delivery_detach(struct delivery *dl, struct delivery_sink *s)
{
	struct dsub *ds = &dl->subs[s->sub];
	struct delivery_sink **p;

	for (p = &ds->sinks; *p; p = &(*p)->next)
		if (*p == s) {
			*p = s->next;
			break;
		}
	if (ds->turn == s)
		ds->turn = ds->sinks;
	s->detached = 1;
	log_info("front-door consumer detached", LOG_STR("subscription", ds->name));
	dsub_flow(ds);		/* the last one stops it */
	if (s->held == 0)
		s->ops->release(s);
}

static void
dsub_sink_unhold(struct delivery_sink *s)
{
	s->held--;
	if (s->detached && s->held == 0)
		s->ops->release(s);
}

void
delivery_sink_kick(struct delivery *dl, int sub)
{
	dispatch_schedule(&dl->subs[sub]);
}

/* The next sink with room, taking turns so that consumers of one queue
 * share its records as RabbitMQ's do (round robin). */
static struct delivery_sink *
dsub_sink_pick(struct dsub *ds)
{
	struct delivery_sink *s = ds->turn ? ds->turn : ds->sinks;
	struct delivery_sink *start = s;

	if (!s)
		return NULL;
	do {
		if (s->ops->room(s) > 0) {
			ds->turn = s->next ? s->next : ds->sinks;
			return s;
		}
		s = s->next ? s->next : ds->sinks;
	} while (s != start);
	return NULL;
}

/* The room is taken now (held), so that one dispatch run does not
 * overfill a consumer while the marks are written. */
struct dattempt *
dsub_sink_attempt(struct dsub *ds, struct dmsg *dm)
{
	struct delivery_sink *s = dsub_sink_pick(ds);
	struct dattempt *a;

	if (!s)
		return NULL;
	a = xcalloc(1, sizeof *a);
	a->ds = ds;
	a->dm = dm;
	a->sink = s;
	s->held++;
	dmsg_set_state(dm, DMSG_INFLIGHT);
	dm->rec->attempts++;
	ds->inflight++;
	return a;
}

/* Marked in the store: out to the consumer, which settles it. A consumer
 * gone or closing meanwhile never saw it: as if the attempt had not
 * started. */
void
dsub_sink_send(struct dattempt *a)
{
	struct delivery_sink *s = a->sink;
	struct dsub *ds = a->ds;

	if (!s->detached && s->ops->deliver(s, a, a->dm->rec->m, a->dm->rec->redelivered ||
	    a->dm->rec->attempts > 1) == 0)
		return;
	dmsg_set_state(a->dm, DMSG_READY);
	a->dm->rec->attempts--;
	ds->inflight--;
	free(a);
	dsub_sink_unhold(s);
	dispatch_schedule(ds);
}

/* Its mark could not be written: not sent. */
void
dsub_sink_cancel(struct dattempt *a)
{
	dsub_sink_unhold(a->sink);
}

/* A consumer gave the record back without a verdict (its channel or
 * connection went): at once to the next consumer, flagged redelivered.
 * The attempt counts, so that a message that kills its consumer every
 * time ends dead-lettered instead of looping. */
static void
dsub_sink_returned(struct dsub *ds, struct dmsg *dm)
{
	if (dsub_exhausted(ds, dm, 0, "the consumer went away without acking, every attempt"))
		return;
	dm->rec->redelivered = 1;
	ds->stats.outcomes[OUTCOME_RETRY]++;
}

void
delivery_take_settle(struct dattempt *a, enum delivery_take_result r, const char *why)
{
	struct dsub *ds = a->ds;
	struct dmsg *dm = a->dm;

	dsub_sink_unhold(a->sink);
	free(a);
	dmsg_set_state(dm, DMSG_READY);
	ds->inflight--;
	if (ds->dl->d->state == SAGAD_STOPPED)
		return;		/* stays in flight in the store: redelivered at the start */
	switch (r) {
	case TAKE_ACK:
		ds->stats.outcomes[OUTCOME_SUCCESS]++;
		txpart_after(ds->dl->txp, ds->name, dm->rec->m, 1);
		dsub_done(ds, dm, 200);
		break;
	case TAKE_REQUEUE:
		dsub_retry_or_dead(ds, dm, 0, why);
		break;
	case TAKE_REJECT:
		txpart_after(ds->dl->txp, ds->name, dm->rec->m, 0);
		dsub_dead_letter(ds, dm, "rejected", 0, why);
		dsub_remove(ds, dm);
		break;
	case TAKE_RETURNED:
		dsub_sink_returned(ds, dm);
		break;
	}
	dsub_flow(ds);
	dispatch_schedule(ds);
}
