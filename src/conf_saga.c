/*
 * The sagas of the configuration: the checks that need a whole saga
 * (sagad.conf(5) SAGAS): names, each step's keys for its saga's mode,
 * templates and conditions against the steps before, the pivot, the
 * parallel groups. The rows that read them are in conf_table.c.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "conf_read.h"
#include "conf_table.h"
#include "saga_data.h"
#include "util.h"
#include "xmalloc.h"

/* What a step's templates and condition may refer to: the steps before
 * it, and itself too in its compensation's. */
struct conf_step_scope {
	const struct conf_saga *sg;
	size_t n;		/* steps[0..n) */
	size_t self;		/* and this one ((size_t)-1: none) */
};

static int
conf_step_in_scope(void *arg, const char *step, const char **body, size_t *len)
{
	const struct conf_step_scope *sc = arg;
	size_t i;

	(void)body;
	(void)len;
	for (i = 0; i < sc->sg->n_steps; i++)
		if ((i < sc->n || i == sc->self) && sc->sg->steps[i].name &&
		    strcmp(sc->sg->steps[i].name, step) == 0)
			return 1;
	return 0;
}

/* A template of a step: its references name earlier steps; headers are
 * an object of names outside x-sagad-. */
static void
conf_check_template(struct conf_ctx *ctx, config_setting_t *se, const struct conf_saga *sg,
    const struct conf_saga_step *st, const struct conf_step_scope *sc, const char *key,
    const char *tpl)
{
	struct saga_data_src check = { NULL, NULL, NULL, 0, conf_step_in_scope, (void *)sc, 1 };
	char err[SAGA_DATA_ERR];
	json_t *j;

	if (!tpl)
		return;
	if (saga_data_check_template(tpl, &check, err) < 0) {
		conf_err(ctx, se, "saga '%s': step '%s': %s: %s", sg->name, st->name, key, err);
		return;
	}
	if (strstr(key, "headers") && (j = json_loads(tpl, 0, NULL)) != NULL) {
		const char *name;
		json_t *v;
		json_object_foreach(j, name, v)
			if (strncasecmp(name, "x-sagad-", 8) == 0)
				conf_err(ctx, se, "saga '%s': step '%s': %s: '%s' is sagad's own header",
				    sg->name, st->name, key, name);
		json_decref(j);
	} else if (strstr(key, "headers")) {
		conf_err(ctx, se, "saga '%s': step '%s': %s must be a group { name = \"value\"; ... }",
		    sg->name, st->name, key);
	}
}

/* The first step of j's parallel group (j itself without a group). */
static size_t
conf_group_start(const struct conf_saga *sg, size_t j)
{
	while (j > 0 && sg->steps[j].group && sg->steps[j - 1].group &&
	    strcmp(sg->steps[j].group, sg->steps[j - 1].group) == 0)
		j--;
	return j;
}

/* Data between steps and the step's condition (saga_data.h): the steps
 * before its group (the members of a group run at once). */
static void
conf_check_step_data(struct conf_ctx *ctx, config_setting_t *se, const struct conf_saga *sg,
    const struct conf_saga_step *st, size_t j)
{
	struct conf_step_scope sc = { sg, sg->mode == SAGA_ORCHESTRATED ?
	    conf_group_start(sg, j) : 0, (size_t)-1 };
	struct conf_step_scope comp = { sg, sc.n, j };	/* its own reply too */
	struct saga_data_src check = { NULL, NULL, NULL, 0, conf_step_in_scope, &sc, 1 };
	char err[SAGA_DATA_ERR];

	if ((st->body || st->headers) && !conf_has_binding(&st->command))
		conf_err(ctx, se, "saga '%s': step '%s': body and headers are its command's: "
		    "it has none", sg->name, st->name);
	if ((st->compensate_body || st->compensate_headers) && !conf_has_binding(&st->compensate))
		conf_err(ctx, se, "saga '%s': step '%s': compensate_body and compensate_headers "
		    "need a 'compensate'", sg->name, st->name);
	conf_check_template(ctx, se, sg, st, &sc, "body", st->body);
	conf_check_template(ctx, se, sg, st, &sc, "headers", st->headers);
	conf_check_template(ctx, se, sg, st, &comp, "compensate_body", st->compensate_body);
	conf_check_template(ctx, se, sg, st, &comp, "compensate_headers", st->compensate_headers);
	if (st->when && saga_data_check(st->when, &check, err) < 0)
		conf_err(ctx, se, "saga '%s': step '%s': when: %s%s", sg->name, st->name, err,
		    sg->mode == SAGA_CHOREOGRAPHED ? " (a choreographed step's condition "
		    "sees the start event only)" : "");
}

/* A step's keys for its saga's mode. A step with only a compensation
 * (compensation-only: nothing runs going forward) is valid in both. */
static void
conf_check_saga_step(struct conf_ctx *ctx, config_setting_t *se, const struct sagad_conf *c,
    struct conf_saga *sg, struct conf_saga_step *st, size_t j)
{
	const char *n = sg->name ? sg->name : "?", *sn = st->name;
	int comp = conf_has_binding(&st->compensate);

	if (sg->mode == SAGA_ORCHESTRATED) {
		if (!conf_has_binding(&st->command) && !comp)
			conf_err(ctx, se, "saga '%s': step '%s' needs a 'command' (orchestrated), "
			    "or a 'compensate' alone (compensation-only)", n, sn);
		if (conf_has_binding(&st->success) || conf_has_binding(&st->failure))
			conf_err(ctx, se, "saga '%s': step '%s': success/failure events are for choreographed sagas", n, sn);
		if (st->notify && !conf_has_binding(&st->command))
			conf_err(ctx, se, "saga '%s': step '%s': a notify step needs a 'command' to send", n, sn);
	} else {
		if (!conf_has_binding(&st->success) && !comp)
			conf_err(ctx, se, "saga '%s': step '%s' needs a 'success' event (choreographed), "
			    "or a 'compensate' alone (compensation-only)", n, sn);
		if (conf_has_binding(&st->failure) && !conf_has_binding(&st->success))
			conf_err(ctx, se, "saga '%s': step '%s': a 'failure' event needs a 'success' event", n, sn);
		if (conf_has_binding(&st->command))
			conf_err(ctx, se, "saga '%s': step '%s': commands are for orchestrated sagas", n, sn);
		if (st->notify)
			conf_err(ctx, se, "saga '%s': step '%s': notify is for orchestrated sagas", n, sn);
		if (conf_has_binding(&st->compensate_success) && !comp)
			conf_err(ctx, se, "saga '%s': step '%s': compensate_success needs a 'compensate' "
			    "(the event that asks for the compensation)", n, sn);
		if (conf_has_binding(&st->compensate_failure) &&
		    !conf_has_binding(&st->compensate_success))
			conf_err(ctx, se, "saga '%s': step '%s': compensate_failure needs "
			    "compensate_success", n, sn);
	}
	if (sg->mode == SAGA_ORCHESTRATED && (conf_has_binding(&st->compensate_success) ||
	    conf_has_binding(&st->compensate_failure)))
		conf_err(ctx, se, "saga '%s': step '%s': compensate_success/compensate_failure "
		    "are for choreographed sagas", n, sn);
	conf_check_binding(ctx, se, c, "saga", n, "command", &st->command);
	conf_check_binding(ctx, se, c, "saga", n, "compensate", &st->compensate);
	conf_check_binding(ctx, se, c, "saga", n, "success", &st->success);
	conf_check_binding(ctx, se, c, "saga", n, "failure", &st->failure);
	conf_check_binding(ctx, se, c, "saga", n, "compensate_success", &st->compensate_success);
	conf_check_binding(ctx, se, c, "saga", n, "compensate_failure", &st->compensate_failure);
	conf_check_step_data(ctx, se, sg, st, j);
	if (st->timeout <= 0)
		st->timeout = sg->timeout > 0 ? sg->timeout : 30;
}

/* The pivot: one, orchestrated, a command awaiting its reply; it and the
 * steps after it are never compensated, so none may say how. */
static void
conf_check_pivot(struct conf_ctx *ctx, config_setting_t *e, config_setting_t *steps,
    const struct conf_saga *sg)
{
	size_t j, pivot = (size_t)-1;

	for (j = 0; j < sg->n_steps; j++) {
		const struct conf_saga_step *st = &sg->steps[j];
		config_setting_t *se = steps ? config_setting_get_elem(steps, j) : e;
		const char *sn = st->name ? st->name : "?";
		if (st->pivot && pivot != (size_t)-1)
			conf_err(ctx, se, "saga '%s': step '%s': a saga has one pivot at most (%s is one)",
			    sg->name, sn, sg->steps[pivot].name);
		else if (st->pivot && sg->mode != SAGA_ORCHESTRATED)
			conf_err(ctx, se, "saga '%s': step '%s': pivot is for orchestrated sagas",
			    sg->name, sn);
		else if (st->pivot && (!conf_has_binding(&st->command) || st->notify))
			conf_err(ctx, se, "saga '%s': step '%s': the pivot must be a command awaiting "
			    "its reply", sg->name, sn);
		else if (st->pivot)
			pivot = j;
		if (pivot != (size_t)-1 && conf_has_binding(&st->compensate))
			conf_err(ctx, se, "saga '%s': step '%s': %s never compensated "
			    "(the pivot and the steps after it are retried, not undone)",
			    sg->name, sn, j == pivot ? "the pivot is" : "a step after the pivot is");
	}
}

/* Parallel groups: orchestrated, their members one after the other in
 * the list, without the pivot (the point of no return is one step). */
static void
conf_check_groups(struct conf_ctx *ctx, config_setting_t *e, config_setting_t *steps,
    const struct conf_saga *sg)
{
	size_t j, k;

	for (j = 0; j < sg->n_steps; j++) {
		const struct conf_saga_step *st = &sg->steps[j];
		config_setting_t *se = steps ? config_setting_get_elem(steps, j) : e;
		if (!st->group || !st->name)
			continue;
		if (sg->mode != SAGA_ORCHESTRATED)
			conf_err(ctx, se, "saga '%s': step '%s': groups are for orchestrated sagas "
			    "(a choreographed saga's steps all run at once)", sg->name, st->name);
		if (st->pivot)
			conf_err(ctx, se, "saga '%s': step '%s': the pivot cannot be in a group",
			    sg->name, st->name);
		for (k = 0; k + 1 < j; k++)
			if (sg->steps[k].group && strcmp(sg->steps[k].group, st->group) == 0 &&
			    !(sg->steps[j - 1].group && strcmp(sg->steps[j - 1].group, st->group) == 0)) {
				conf_err(ctx, se, "saga '%s': step '%s': the steps of group '%s' must "
				    "follow one another", sg->name, st->name, st->group);
				break;
			}
	}
}

void
conf_check_sagas(struct conf_ctx *ctx, config_t *cfg, struct sagad_conf *c)
{
	config_setting_t *list = config_lookup(cfg, "sagas");
	size_t i, j, k;

	for (i = 0; i < c->n_sagas; i++) {
		struct conf_saga *sg = &c->sagas[i];
		config_setting_t *e = list ? config_setting_get_elem(list, i) : NULL;
		config_setting_t *steps = e ? config_setting_lookup(e, "steps") : NULL;
		const char *n = sg->name ? sg->name : "?";

		if (!sg->name)
			conf_err(ctx, e, "saga without a 'name'");
		else if (!util_valid_exchange(sg->name))
			conf_err(ctx, e, "saga name '%s' must be 1-255 of A-Z a-z 0-9 - _ . :", sg->name);
		for (j = 0; sg->name && j < i; j++)
			if (c->sagas[j].name && strcmp(c->sagas[j].name, sg->name) == 0)
				conf_err(ctx, e, "saga '%s' is defined twice", sg->name);
		if (!sg->mode_name || strcmp(sg->mode_name, "orchestrated") == 0)
			sg->mode = SAGA_ORCHESTRATED;
		else if (strcmp(sg->mode_name, "choreographed") == 0)
			sg->mode = SAGA_CHOREOGRAPHED;
		else
			conf_err(ctx, e, "saga '%s': mode must be orchestrated or choreographed", n);
		if (!conf_has_binding(&sg->start))
			conf_err(ctx, e, "saga '%s' needs 'start' (\"exchange:routing-key\")", n);
		if (!sg->n_steps)
			conf_err(ctx, e, "saga '%s' needs at least one step", n);
		conf_check_binding(ctx, e, c, "saga", n, "start", &sg->start);
		conf_check_binding(ctx, e, c, "saga", n, "completed", &sg->completed);
		conf_check_binding(ctx, e, c, "saga", n, "compensated", &sg->compensated);
		if (sg->retry_max < sg->retry_initial)
			conf_err(ctx, e, "saga '%s': retry_max is below retry_initial", n);
		for (j = 0; j < sg->n_steps; j++) {
			struct conf_saga_step *st = &sg->steps[j];
			config_setting_t *se = steps ? config_setting_get_elem(steps, j) : e;

			if (!st->name) {
				conf_err(ctx, se, "saga '%s': step without a 'name'", n);
				continue;
			}
			if (!util_valid_exchange(st->name))
				conf_err(ctx, se, "saga '%s': step name '%s' must be 1-255 of A-Z a-z 0-9 - _ . :", n, st->name);
			for (k = 0; k < j; k++)
				if (sg->steps[k].name && strcmp(sg->steps[k].name, st->name) == 0)
					conf_err(ctx, se, "saga '%s': step '%s' is defined twice", n, st->name);
			conf_check_saga_step(ctx, se, c, sg, st, j);
		}
		conf_check_pivot(ctx, e, steps, sg);
		conf_check_groups(ctx, e, steps, sg);
	}
}


