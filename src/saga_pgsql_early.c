/*
 * The PostgreSQL saga store's early events (REPLICAS.md: Row locks and
 * causal order): with replicas competing for the saga queue, a
 * choreographed step's event may be applied before its saga's start, which
 * another replica still holds. It is kept in the early table, and the
 * start's job applies it: those the batch fetched for its saga ids (round
 * trip 1, under the saga id's lock), and those a job of the same batch
 * kept before the start's job ran (in the batch's queued writes only).
 *
 * An event is kept for one definition (its saga column) and saga id: one
 * that matches two definitions is kept twice, and each start applies its
 * own, once. Rows kept before the column existed (schema version 1) have
 * saga '' and go to the first start of their saga id.
 */
#include "saga_pgsql.h"

#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "msg.h"
#include "props.h"
#include "util.h"
#include "xmalloc.h"

static char *
pgs_early_dup(const char *v, size_t len)
{
	char *c = xmalloc(len + 1);

	memcpy(c, v, len);
	c[len] = '\0';
	return c;
}

/* Kept already by this batch, not applied since: a message that matches
 * two steps of one definition is kept once (its start applies all its
 * matches of that definition). */
static int
pgs_early_known(const struct saga_backend *b, const char *saga, const char *saga_id,
    const char *message_id)
{
	size_t i;

	for (i = 0; i < b->nearly_new; i++) {
		const struct pgs_early *e = &b->early_new[i];
		if (!e->taken && strcmp(e->saga, saga) == 0 && strcmp(e->saga_id, saga_id) == 0 &&
		    strcmp(e->message_id, message_id) == 0)
			return 1;
	}
	return 0;
}

int
pgs_early_keep(struct saga_backend *b, const struct msg *m, const char *saga,
    const char *saga_id)
{
	struct pgs_stmt *s;
	struct pgs_early *e;
	char *props = NULL;
	size_t plen = 0;

	if (pgs_early_known(b, saga, saga_id, m->message_id))
		return 0;
	if (props_pack(&m->props, &props, &plen) < 0)
		return -1;
	s = pgs_stmt_add(&b->writes, "INSERT INTO early (service, saga_id, message_id, exchange,"
	    " routing_key, props, body, at, saga) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
	    " ON CONFLICT DO NOTHING");
	pgs_param(s, b->service);
	pgs_param(s, saga_id);
	pgs_param(s, m->message_id);
	pgs_param(s, m->exchange);
	pgs_param(s, m->routing_key);
	pgs_param_bin(s, props, plen);
	pgs_param_bin(s, m->body, m->body_len);
	pgs_param_dbl(s, util_now());
	pgs_param(s, saga);
	e = XPUSH(b->early_new, b->nearly_new, b->capearly_new);
	e->saga = xstrdup(saga);
	e->saga_id = xstrdup(saga_id);
	e->message_id = xstrdup(m->message_id);
	e->exchange = xstrdup(m->exchange);
	e->routing_key = xstrdup(m->routing_key);
	e->props = props;
	e->plen = plen;
	e->body = pgs_early_dup(m->body, m->body_len);
	e->blen = m->body_len;
	e->taken = 0;
	return 0;
}

/* Hand one event to fn and forget it with the batch's commit. */
static void
pgs_early_apply(struct saga_backend *b, const char *saga, const char *saga_id,
    const char *message_id, const char *exchange, const char *routing_key, const char *props,
    size_t plen, const char *body, size_t blen, void (*fn)(void *arg, const struct msg *m),
    void *arg)
{
	struct pgs_stmt *s = pgs_stmt_add(&b->writes, "DELETE FROM early WHERE service = $1"
	    " AND saga_id = $2 AND message_id = $3 AND saga = $4");
	struct msg m;

	pgs_param(s, b->service);
	pgs_param(s, saga_id);
	pgs_param(s, message_id);
	pgs_param(s, saga);
	memset(&m, 0, sizeof m);
	m.message_id = (char *)message_id;
	m.exchange = (char *)exchange;
	m.routing_key = (char *)routing_key;
	m.body = pgs_early_dup(body, blen);	/* bodies end with a NUL in sagad */
	m.body_len = blen;
	if (props && props_unpack(props, plen, &m.props) == 0)
		fn(arg, &m);
	else
		log_error("saga store: a damaged early event dropped", LOG_STR("saga_id", saga_id),
		    LOG_STR("message_id", message_id));
	props_free(&m.props);
	free(m.body);
}

/* Kept for this start: its definition's, or from before the column. */
static int
pgs_early_for(const char *row_saga, const char *saga)
{
	return *row_saga == '\0' || strcmp(row_saga, saga) == 0;
}

void
pgs_early_each(struct saga_backend *b, const char *saga, const char *saga_id,
    void (*fn)(void *arg, const struct msg *m), void *arg)
{
	/* Those kept before this start only: fn may keep more (an event of
	 * another instance), which are not this start's to apply. */
	size_t i, n = b->nearly_new;
	int k;

	for (k = 0; b->early && k < PQntuples(b->early); k++) {
		size_t plen = 0, blen = 0;
		unsigned char *props, *body;
		if (b->early_taken[k] || strcmp(PQgetvalue(b->early, k, 0), saga_id) != 0 ||
		    !pgs_early_for(PQgetvalue(b->early, k, 6), saga))
			continue;
		b->early_taken[k] = 1;
		props = PQunescapeBytea((const unsigned char *)PQgetvalue(b->early, k, 4), &plen);
		body = PQunescapeBytea((const unsigned char *)PQgetvalue(b->early, k, 5), &blen);
		pgs_early_apply(b, PQgetvalue(b->early, k, 6), saga_id, PQgetvalue(b->early, k, 1),
		    PQgetvalue(b->early, k, 2), PQgetvalue(b->early, k, 3), (const char *)props, plen,
		    body ? (const char *)body : "", body ? blen : 0, fn, arg);
		PQfreemem(props);
		PQfreemem(body);
	}
	/* Kept by an earlier job of this batch: its INSERT is queued before
	 * this DELETE, so the two cancel out at the commit. */
	for (i = 0; i < n; i++) {
		struct pgs_early *e = &b->early_new[i];
		if (e->taken || strcmp(e->saga_id, saga_id) != 0 || strcmp(e->saga, saga) != 0)
			continue;
		e->taken = 1;
		pgs_early_apply(b, e->saga, saga_id, e->message_id, e->exchange, e->routing_key, e->props,
		    e->plen, e->body, e->blen, fn, arg);
	}
}

void
pgs_early_reset(struct saga_backend *b)
{
	size_t i;

	PQclear(b->early);
	b->early = NULL;
	free(b->early_taken);
	b->early_taken = NULL;
	for (i = 0; i < b->nearly_new; i++) {
		struct pgs_early *e = &b->early_new[i];
		free(e->saga);
		free(e->saga_id);
		free(e->message_id);
		free(e->exchange);
		free(e->routing_key);
		free(e->props);
		free(e->body);
	}
	b->nearly_new = 0;
}
