/*
 * Dispatch, for a two-phase commit's messages (sagad(8) TWO-PHASE COMMIT):
 * what the service is told a message is, a PREPARE, COMMIT or ABORT that
 * the participant's record answers without the service (txpart.h), and
 * the COMMIT or ABORT that sagad finishes itself in the service's
 * PostgreSQL (txpg.h). dispatch.c calls these for the records marked tx.
 */
#include "dispatch.h"

#include <event2/buffer.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "hclient.h"
#include "sagad.h"
#include "store.h"
#include "txpart.h"
#include "txpg.h"
#include "xmalloc.h"

/* A two-phase commit's message (sagad(8) TWO-PHASE COMMIT). */
int
dispatch_tx_kind(const char *kind)
{
	return strcmp(kind, "prepare") == 0 || strcmp(kind, "commit") == 0 ||
	    strcmp(kind, "abort") == 0;
}

/* What the service is told a message is (Sagad-Kind): a saga's or a
 * transaction's message by its kind, anything else an event. */
const char *
dispatch_kind(const char *kind)
{
	static const char *const kinds[] = { "command", "compensation", "notification",
	    "prepare", "commit", "abort" };
	size_t i;

	for (i = 0; kind && i < sizeof kinds / sizeof *kinds; i++)
		if (strcmp(kind, kinds[i]) == 0)
			return kinds[i];
	return "event";
}

/*
 * A PREPARE, COMMIT or ABORT that the participant's record answers
 * (txpart.h): a duplicate, a late one, or one against the record. It is
 * answered as the service would have (200 yes or done, 409 no), without
 * reaching the service.
 */
int
dsub_tx_answered(struct dsub *ds, struct dmsg *dm)
{
	struct hclient_answer ans;
	enum txp_action a = txpart_before(ds->dl->txp, ds->name, dm->rec->m);

	if (a == TXP_DELIVER)
		return 0;
	memset(&ans, 0, sizeof ans);
	ans.result = HCLIENT_ANSWERED;
	ans.status = a == TXP_ANSWER_YES ? 200 : 409;
	ans.content_type = "application/json";
	ans.body = evbuffer_new();
	evbuffer_add_printf(ans.body, "{\"answered_by\":\"sagad\",\"vote\":\"%s\"}",
	    a == TXP_ANSWER_YES ? "yes" : "no");
	if (a == TXP_ANSWER_YES)
		dsub_succeeded(ds, dm, &ans);
	else
		dsub_refused(ds, dm, &ans);
	evbuffer_free(ans.body);
	return 1;
}

/*
 * A COMMIT or ABORT of a subscription whose service prepares in its own
 * PostgreSQL (txpg.h): sagad finishes the prepared transaction itself, and
 * the service is not called. A failure is tried again after the
 * subscription's backoff, never dead-lettered: the decision must land.
 */
struct dfinish {
	struct dsub *ds;
	struct dmsg *dm;
};

static void
dsub_tx_finished(void *arg, enum txpg_result r, const char *why)
{
	struct dfinish *f = arg;
	struct dsub *ds = f->ds;
	struct dmsg *dm = f->dm;
	struct hclient_answer ans;

	free(f);
	if (r == TXPG_CANCELLED)
		return;
	dmsg_set_state(dm, DMSG_READY);
	ds->inflight--;
	if (ds->dl->d->state == SAGAD_STOPPED)
		return;
	if (r == TXPG_DONE) {
		memset(&ans, 0, sizeof ans);
		ans.result = HCLIENT_ANSWERED;
		ans.status = 200;
		ans.content_type = "application/json";
		ans.body = evbuffer_new();
		evbuffer_add_printf(ans.body, "{\"finished_by\":\"sagad\"}");
		dsub_succeeded(ds, dm, &ans);
		evbuffer_free(ans.body);
	} else {
		dsub_retry_later(ds, dm, 0, why ? why : "");
	}
	dsub_flow(ds);
	dispatch_schedule(ds);
}

int
dsub_tx_finish(struct dsub *ds, struct dmsg *dm)
{
	enum txp_kind k = txpart_kind(dm->rec->m);
	char gid[TXP_GID_MAX];
	struct dfinish *f;

	if (k != TXP_COMMIT && k != TXP_ABORT)
		return 0;
	txpart_gid(dm->rec->m, ds->dl->d->conf->service, gid);
	f = xmalloc(sizeof *f);
	f->ds = ds;
	f->dm = dm;
	dmsg_set_state(dm, DMSG_INFLIGHT);
	dm->rec->attempts++;
	ds->inflight++;
	txpg_finish(ds->txpg, gid, k == TXP_COMMIT, dsub_tx_finished, f);
	return 1;
}

