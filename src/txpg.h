/*
 * A participant's two-phase commits in its service's own PostgreSQL
 * (sagad.conf(5): prepared_conninfo_file; sagad(8) TWO-PHASE COMMIT).
 *
 * The service ends its PREPARE's work with PREPARE TRANSACTION '<gid>'
 * (the gid is given in Sagad-Gid, txpart_gid) and answers yes; from then
 * on the work is durable in PostgreSQL and holds its locks without the
 * service. sagad itself finishes it with COMMIT PREPARED or ROLLBACK
 * PREPARED when the decision comes, so that phase 2 completes even while
 * the service is down. On each connect it first resolves the prepared
 * transactions of its own gid prefix that pg_prepared_xacts shows, from
 * its records (txpart.h): decided ones are finished, one still voted yes
 * makes sagad ask the coordinator at once, one without a record is left
 * alone and logged (its PREPARE will come again, or an operator decides).
 *
 * One connection per subscription that has it, one statement at a time.
 */
#ifndef SAGAD_TXPG_H
#define SAGAD_TXPG_H

struct event_base;
struct txpart;
struct txpg;

enum txpg_result {
	TXPG_DONE,		/* finished, or no longer prepared (finished before) */
	TXPG_FAILED,		/* not now: the owner tries again later */
	TXPG_CANCELLED		/* txpg_free: the owner only frees its arg */
};
typedef void txpg_done_fn(void *arg, enum txpg_result r, const char *why);

/* conninfo is copied; service names the gid prefix (sagad:SERVICE:). */
struct txpg *txpg_new(struct event_base *base, const char *conninfo, const char *sub,
    const char *service, struct txpart *tp);
void txpg_free(struct txpg *g);
/* COMMIT PREPARED (commit) or ROLLBACK PREPARED of gid; done is called
 * once, later. */
void txpg_finish(struct txpg *g, const char *gid, int commit, txpg_done_fn *done, void *arg);

#endif
