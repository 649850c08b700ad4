/*
 * The saga engine's backward path: compensating the succeeded steps one
 * at a time, the latest success first, each until its participant
 * confirms (a notification step's at once: it is one-way), with backoff
 * between refusals, and failed for an operator when a compensation is
 * given up (sagactl saga retry resumes it). A step that succeeds after
 * the compensation started is compensated too.
 */
#include <stdio.h>
#include <stdlib.h>

#include "conf.h"
#include "msg.h"
#include "saga_data.h"
#include "saga_int.h"
#include "util.h"

void
saga_start_compensation(struct saga_engine *e, struct saga_inst *in, const char *reason)
{
	size_t i;

	if (saga_set_state(e, in, SAGA_COMPENSATING, NULL, reason) < 0)
		return;
	saga_timer_del_all(e, in);
	/* A transaction's participant whose vote is awaited may have prepared:
	 * it gets its ABORT too (saga_tx.c). A saga's unanswered step failed. */
	for (i = 0; i < in->def->n_steps; i++)
		if (in->steps[i].state == STEP_ACTIVE)
			in->steps[i].state = in->def->transaction ? STEP_SUCCEEDED : STEP_FAILED;
	saga_compensate_next(e, in);
}

/* A notification step's compensation is one-way too: sent, it is done. */
void
saga_send_compensation(struct saga_engine *e, struct saga_inst *in, size_t i)
{
	const struct conf_saga_step *cs = &in->def->steps[i];
	struct saga_step_rt *st = &in->steps[i];

	char why[SAGA_DATA_ERR], reason[SAGA_DATA_ERR + 300];

	st->state = STEP_COMPENSATING;
	st->comp_attempts++;
	st->comp_sends++;
	st->sent_at = util_now();
	if (saga_send_step(e, in, i, 1, why) < 0) {
		/* Another try would fail the same way: an operator's turn. */
		saga_log(e, in, "step", "data error", cs->name, NULL, why);
		snprintf(reason, sizeof reason, "compensation of %s: %s", cs->name, why);
		saga_set_state(e, in, SAGA_FAILED, cs->name, reason);
		return;
	}
	if (cs->notify) {
		st->state = STEP_COMPENSATED;
		saga_compensate_next(e, in);
		return;
	}
	saga_timer_add(e, in, TIMER_COMPENSATE, (int)i, util_now() + in->def->compensate_timeout);
}

/* Compensate one step at a time, the latest success first; a step with
 * nothing to undo is done at once. */
void
saga_compensate_next(struct saga_engine *e, struct saga_inst *in)
{
	size_t i, pick = (size_t)-1;

	if (in->def->transaction) {
		saga_tx_abort_all(e, in);
		return;
	}
	for (i = 0; i < in->def->n_steps; i++) {
		if (in->steps[i].state == STEP_COMPENSATING)
			return;		/* one in progress */
		if (in->steps[i].state == STEP_SUCCEEDED &&
		    (pick == (size_t)-1 || in->steps[i].order > in->steps[pick].order))
			pick = i;
	}
	if (pick == (size_t)-1) {
		saga_finish(e, in, SAGA_COMPENSATED);
		return;
	}
	if (!in->def->steps[pick].compensate.exchange) {
		in->steps[pick].state = STEP_COMPENSATED;
		saga_log(e, in, "step", "compensated", in->def->steps[pick].name, NULL,
		    "nothing to compensate");
		saga_compensate_next(e, in);
		return;
	}
	saga_send_compensation(e, in, pick);
}

/*
 * A step succeeded after compensation started: it is compensated too. But
 * the pivot cannot be undone: once it succeeded late (a timeout started
 * the compensation while its command was under way) nothing more is
 * undone, and the saga is failed for an operator (sagactl saga retry goes
 * forward from the pivot).
 */
void
saga_late_success(struct saga_engine *e, struct saga_inst *in, size_t i, const struct msg *m)
{
	saga_step_succeeded(e, in, i, m);
	if (in->def->steps[i].pivot) {
		char why[300];
		saga_timer_del_all(e, in);
		snprintf(why, sizeof why, "the pivot %s succeeded after the compensation had"
		    " started: nothing more is undone", in->def->steps[i].name);
		if (in->state == SAGA_COMPENSATED)
			saga_set_state(e, in, SAGA_COMPENSATING, in->def->steps[i].name,
			    "late success of the pivot");
		if (in->state == SAGA_COMPENSATING)
			saga_set_state(e, in, SAGA_FAILED, in->def->steps[i].name, why);
		return;
	}
	saga_log(e, in, "step", "late success: will be compensated", in->def->steps[i].name,
	    NULL, NULL);
	if (in->state == SAGA_COMPENSATED)
		saga_set_state(e, in, SAGA_COMPENSATING, NULL, "late success");
	if (in->state == SAGA_COMPENSATING)
		saga_compensate_next(e, in);
}

/* A step's compensation was refused or went unanswered too often: failed,
 * for an operator (sagactl saga retry). */
void
saga_compensation_exhausted(struct saga_engine *e, struct saga_inst *in, size_t i,
    const char *how)
{
	char why[300];

	snprintf(why, sizeof why, "compensation of %s %s after %u attempts",
	    in->def->steps[i].name, how, in->steps[i].comp_attempts);
	saga_set_state(e, in, SAGA_FAILED, in->def->steps[i].name, why);
}

void
saga_on_compensation_reply(struct saga_engine *e, struct saga_inst *in, size_t i,
    int success, const struct msg *m)
{
	struct saga_step_rt *st = &in->steps[i];
	const char *name = in->def->steps[i].name;

	if (st->state != STEP_COMPENSATING) {
		e->stats[in->def_index].duplicates++;
		saga_log(e, in, "in", "duplicate compensation reply: ignored", name,
		    m->message_id, NULL);
		return;
	}
	saga_log(e, in, "in", success ? "compensation success" : "compensation failure",
	    name, m->message_id, NULL);
	saga_timer_del(e, in, TIMER_COMPENSATE, (int)i);
	saga_trace_step(e, in, i, 1, success ? NULL : "refused");
	if (success) {
		st->state = STEP_COMPENSATED;
		if (in->state == SAGA_FAILED && saga_past_pivot(in))
			return;		/* the pivot went through late: stays failed */
		if (in->state == SAGA_FAILED)
			saga_set_state(e, in, SAGA_COMPENSATING, name, "late compensation success");
		saga_compensate_next(e, in);
		return;
	}
	if (in->state == SAGA_FAILED)
		return;		/* waits for sagactl saga retry */
	if (st->comp_attempts >= (unsigned)in->def->compensate_attempts) {
		saga_compensation_exhausted(e, in, i, "refused");
		return;
	}
	saga_timer_add(e, in, TIMER_COMPENSATE, (int)i, util_now() +
	    util_backoff(in->def->retry_initial, in->def->retry_max, st->comp_attempts));
}
