/*
 * The saga engine's timers: the whole saga's deadline, a command's reply
 * that is late (send again or fail the step), a compensation's reply that
 * is late or its retry that is due. They live in the store (they survive
 * a restart; a shared store hands each due timer to one replica); one
 * libevent timer is armed for the earliest, and a due round is one job of
 * the store.
 */
#include <event2/event.h>
#include <stdio.h>

#include "conf.h"
#include "log.h"
#include "saga_int.h"
#include "saga_store.h"
#include "sagad.h"
#include "util.h"

static void
saga_arm(struct saga_engine *e, double due)
{
	struct timeval tv;
	double now = util_now();

	if (evtimer_pending(e->timer_ev, NULL) && e->timer_at <= due)
		return;
	e->timer_at = due;
	if (due < now)
		due = now;
	tv.tv_sec = (time_t)(due - now);
	tv.tv_usec = (suseconds_t)((due - now - tv.tv_sec) * 1e6);
	evtimer_add(e->timer_ev, &tv);
}

void
saga_timer_add(struct saga_engine *e, struct saga_inst *in, enum saga_timer_kind kind,
    int step, double due)
{
	if (!in->row)
		saga_save(e, in);
	if (in->row && saga_store_timer_set(e->ss, in->row, kind, step, due) == 0)
		saga_arm(e, due);
}

void
saga_timer_del(struct saga_engine *e, struct saga_inst *in, enum saga_timer_kind kind, int step)
{
	if (in->row)
		saga_store_timer_del(e->ss, in->row, kind, step);
}

void
saga_timer_del_all(struct saga_engine *e, struct saga_inst *in)
{
	if (in->row)
		saga_store_timer_del_all(e->ss, in->row);
}

static void
saga_on_timer(struct saga_engine *e, struct saga_inst *in, int kind, int step)
{
	if (kind == TIMER_SAGA) {
		if (in->state == SAGA_RUNNING && saga_past_pivot(in)) {
			saga_log(e, in, "timer", "saga timeout after the pivot: ignored", NULL, NULL,
			    NULL);
		} else if (in->state == SAGA_RUNNING) {
			saga_log(e, in, "timer", "saga timeout", NULL, NULL, NULL);
			saga_start_compensation(e, in, "saga timeout");
		}
		return;
	}
	if (step < 0 || (size_t)step >= in->def->n_steps)
		return;
	if (kind == TIMER_STEP) {
		const struct conf_saga_step *cs = &in->def->steps[step];
		if (in->state != SAGA_RUNNING || in->steps[step].state != STEP_ACTIVE)
			return;
		saga_trace_step(e, in, (size_t)step, 0, "timeout");
		if (saga_past_pivot(in)) {
			saga_retry_later(e, in, (size_t)step, 0);
			return;
		}
		if (in->steps[step].attempts < (unsigned)cs->attempts) {
			saga_log(e, in, "timer", "step timeout: command sent again", cs->name, NULL, NULL);
			saga_send_command(e, in, (unsigned)step);
			return;
		}
		if (!in->def->transaction)	/* no vote in time: it may still prepare */
			in->steps[step].state = STEP_FAILED;
		saga_log(e, in, "timer", "step timeout", cs->name, NULL, NULL);
		{
			char why[300];
			snprintf(why, sizeof why, "step %s timed out", cs->name);
			saga_start_compensation(e, in, why);
		}
		return;
	}
	/* TIMER_COMPENSATE: no reply yet, or a refused one waited its backoff. */
	if (in->state != SAGA_COMPENSATING || in->steps[step].state != STEP_COMPENSATING)
		return;
	saga_trace_step(e, in, (size_t)step, 1, "timeout");
	if (in->steps[step].comp_attempts >= (unsigned)in->def->compensate_attempts) {
		saga_compensation_exhausted(e, in, (size_t)step, "unconfirmed");
		return;
	}
	saga_send_compensation(e, in, (size_t)step);
}

void
saga_rearm(struct saga_engine *e)
{
	double due = saga_store_timer_next(e->ss);

	if (due > 0) {
		evtimer_del(e->timer_ev);
		saga_arm(e, due);
	}
}

/* A round of due timers is one job (saga_store.h): a shared backend
 * answers timers_due with the timers it claimed and locked. */
static void
saga_timers_run(void *arg)
{
	struct saga_engine *e = arg;
	struct saga_due due[256];
	size_t n, i;

	n = saga_store_timers_due(e->ss, util_now(), due, 256);
	for (i = 0; i < n; i++) {
		struct saga_inst *in = saga_load_row(e, due[i].row);

		/* The timer is spent whatever happens next. */
		saga_store_timer_spent(e->ss, due[i].id);
		if (!in)
			continue;
		saga_on_timer(e, in, due[i].kind, due[i].step);
		saga_save(e, in);
		saga_inst_free(in);
	}
}

static void
saga_timers_done(void *arg, enum saga_job_result r)
{
	struct saga_engine *e = arg;

	if (r != SAGA_JOB_DONE)
		log_error("saga timer round not committed; it runs again");
	e->timer_job = 0;
	e->timer_at = 0;
	if (e->d->state != SAGAD_STOPPED)
		saga_rearm(e);
}

void
saga_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct saga_engine *e = arg;
	struct saga_job job = { .want = SAGA_WANT_TIMERS, .run = saga_timers_run,
	    .done = saga_timers_done, .arg = e };

	(void)fd;
	(void)what;
	if (e->d->state == SAGAD_STOPPED || e->timer_job)
		return;
	e->timer_job = 1;
	saga_store_submit(e->ss, &job);
}
