/*
 * The `transactions` of the configuration: two-phase commits that sagad
 * coordinates (sagad.conf(5) TRANSACTIONS, sagad(8) TWO-PHASE COMMIT).
 *
 * A transaction is checked here, then built into a saga definition of a
 * fixed shape, so that the saga engine keeps it durably, times it, retries
 * it and shows it with everything it already does for sagas:
 *
 *   prepare:P1 .. prepare:Pn   one parallel group: PREPARE to every
 *                              participant at once; the compensation of a
 *                              yes vote is its ABORT
 *   decision                   the pivot, a step that runs nothing: reached
 *                              when every vote is yes; written with the
 *                              COMMIT messages in one store transaction
 *   commit:P1 .. commit:Pn     one parallel group, past the pivot: sent
 *                              again until each participant acknowledges
 *
 * A no vote, a failure answer or the prepare timeout fails a prepare step:
 * the saga compensates, which is the abort: ABORT to every participant
 * that voted yes or has not voted, all at once (saga_tx.c). The engine
 * knows such a definition by its `transaction` flag (the kinds of its
 * messages, no early sends, the aborts, presumed abort at start-up).
 */
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "conf_read.h"
#include "conf_table.h"
#include "util.h"
#include "xmalloc.h"

/* Effectively forever: the decision is retried until acknowledged. */
#define CONF_TX_FOREVER 1000000

static void
conf_tx_check_part(struct conf_ctx *ctx, config_setting_t *pe, const struct sagad_conf *c,
    const struct conf_tx *tx, size_t j)
{
	const struct conf_tx_part *p = &tx->parts[j];
	const struct conf_binding *b[3] = { &p->prepare, &p->commit, &p->abort };
	static const char *const what[3] = { "prepare", "commit", "abort" };
	size_t k;

	if (!p->name) {
		conf_err(ctx, pe, "transaction '%s': participant without a 'name'", tx->name);
		return;
	}
	if (!util_valid_exchange(p->name))
		conf_err(ctx, pe, "transaction '%s': participant name '%s' must be 1-255 of "
		    "A-Z a-z 0-9 - _ . :", tx->name, p->name);
	for (k = 0; k < j; k++)
		if (tx->parts[k].name && strcmp(tx->parts[k].name, p->name) == 0)
			conf_err(ctx, pe, "transaction '%s': participant '%s' is named twice",
			    tx->name, p->name);
	for (k = 0; k < 3; k++) {
		if (!b[k]->exchange)
			conf_err(ctx, pe, "transaction '%s': participant '%s' needs '%s' "
			    "(\"exchange:routing-key\")", tx->name, p->name, what[k]);
		conf_check_binding(ctx, pe, c, "transaction", tx->name, what[k], b[k]);
	}
}

static void
conf_tx_check_one(struct conf_ctx *ctx, config_setting_t *e, const struct sagad_conf *c,
    size_t i)
{
	const struct conf_tx *tx = &c->txs[i];
	config_setting_t *parts = e ? config_setting_lookup(e, "participants") : NULL;
	size_t j;

	if (!tx->name) {
		conf_err(ctx, e, "transaction without a 'name'");
		return;
	}
	if (!util_valid_exchange(tx->name))
		conf_err(ctx, e, "transaction name '%s' must be 1-255 of A-Z a-z 0-9 - _ . :",
		    tx->name);
	for (j = 0; j < i; j++)
		if (c->txs[j].name && strcmp(c->txs[j].name, tx->name) == 0)
			conf_err(ctx, e, "transaction '%s' is defined twice", tx->name);
	if (conf_saga(c, tx->name))
		conf_err(ctx, e, "transaction '%s' has the name of a saga (they share the "
		    "saga store and its tools)", tx->name);
	if (!tx->start.exchange)
		conf_err(ctx, e, "transaction '%s' needs 'start' (\"exchange:routing-key\")",
		    tx->name);
	conf_check_binding(ctx, e, c, "transaction", tx->name, "start", &tx->start);
	conf_check_binding(ctx, e, c, "transaction", tx->name, "committed", &tx->committed);
	conf_check_binding(ctx, e, c, "transaction", tx->name, "aborted", &tx->aborted);
	if (!tx->n_parts)
		conf_err(ctx, e, "transaction '%s' needs at least one participant", tx->name);
	if (tx->decision_retry_max < tx->decision_retry_initial)
		conf_err(ctx, e, "transaction '%s': decision_retry_max is below "
		    "decision_retry_initial", tx->name);
	for (j = 0; j < tx->n_parts; j++)
		conf_tx_check_part(ctx, parts ? config_setting_get_elem(parts, j) : e, c, tx, j);
}

static void
conf_tx_binding(struct conf_binding *to, const struct conf_binding *from)
{
	to->exchange = from->exchange ? xstrdup(from->exchange) : NULL;
	to->key = from->key ? xstrdup(from->key) : NULL;
}

static void
conf_tx_step(struct conf_saga_step *st, const char *phase, const char *part,
    const struct conf_binding *command, const struct conf_binding *compensate, double timeout)
{
	st->name = part ? xasprintf("%s:%s", phase, part) : xstrdup(phase);
	if (command)
		conf_tx_binding(&st->command, command);
	if (compensate)
		conf_tx_binding(&st->compensate, compensate);
	st->timeout = timeout;
	st->attempts = 1;
	st->group = part ? xstrdup(phase) : NULL;
}

/* The saga definition of a transaction (the shape above). */
static void
conf_tx_build(const struct conf_tx *tx, struct conf_saga *sg)
{
	size_t j, n = tx->n_parts;

	memset(sg, 0, sizeof *sg);
	conf_table_defaults(conf_table_saga_rows(), sg);
	sg->name = xstrdup(tx->name);
	sg->mode = SAGA_ORCHESTRATED;
	conf_tx_binding(&sg->start, &tx->start);
	conf_tx_binding(&sg->completed, &tx->committed);
	conf_tx_binding(&sg->compensated, &tx->aborted);
	sg->n_steps = 2 * n + 1;
	sg->steps = xcalloc(sg->n_steps, sizeof *sg->steps);
	for (j = 0; j < n; j++) {
		conf_table_defaults(conf_table_step_rows(), &sg->steps[j]);
		conf_tx_step(&sg->steps[j], "prepare", tx->parts[j].name, &tx->parts[j].prepare,
		    &tx->parts[j].abort, tx->prepare_timeout);
		conf_table_defaults(conf_table_step_rows(), &sg->steps[n + 1 + j]);
		conf_tx_step(&sg->steps[n + 1 + j], "commit", tx->parts[j].name,
		    &tx->parts[j].commit, NULL, tx->prepare_timeout);
	}
	conf_table_defaults(conf_table_step_rows(), &sg->steps[n]);
	conf_tx_step(&sg->steps[n], "decision", NULL, NULL, NULL, tx->prepare_timeout);
	sg->steps[n].pivot = 1;
	sg->compensate_attempts = CONF_TX_FOREVER;
	sg->compensate_timeout = tx->prepare_timeout;
	sg->retry_initial = tx->decision_retry_initial;
	sg->retry_max = tx->decision_retry_max;
	sg->retry_attempts = CONF_TX_FOREVER;
	sg->transaction = 1;
}

void
conf_tx_check(struct conf_ctx *ctx, config_t *cfg, struct sagad_conf *c)
{
	config_setting_t *list = config_lookup(cfg, "transactions");
	size_t i, n = c->n_sagas;

	for (i = 0; i < c->n_txs; i++)
		conf_tx_check_one(ctx, list ? config_setting_get_elem(list, i) : NULL, c, i);
	if (ctx->errs->n || !c->n_txs)
		return;
	c->sagas = xreallocarray(c->sagas, n + c->n_txs, sizeof *c->sagas);
	for (i = 0; i < c->n_txs; i++)
		conf_tx_build(&c->txs[i], &c->sagas[n + i]);
	c->n_sagas = n + c->n_txs;
}
