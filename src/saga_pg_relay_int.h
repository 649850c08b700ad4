/*
 * The saga outbox relay's insides, shared by its two files and included by
 * them only: saga_pg_relay.c (the rows held, publishing, the broker's
 * events, life) and saga_pg_relay_pg.c (the PostgreSQL side: the claim,
 * the deletes, the refresh).
 */
#ifndef SAGAD_SAGA_PG_RELAY_INT_H
#define SAGAD_SAGA_PG_RELAY_INT_H

#include <stddef.h>
#include <stdint.h>

#include "msg.h"
#include "pgconn.h"
#include "saga_pg_relay.h"

#include <event2/util.h>

#define SAGA_PG_RELAY_WINDOW 256	/* most rows in flight */
/* A VACUUM of the outbox after this many rows deleted, at most every
 * SAGA_PG_RELAY_VACUUM_EVERY seconds (saga_pg_relay_send). */
#define SAGA_PG_RELAY_VACUUM_ROWS 10000
#define SAGA_PG_RELAY_VACUUM_EVERY 10.0
#define SAGA_PG_RELAY_POLL 1.0	/* seconds between looks for stale rows */
/* Seconds a confirmed row waits before the relay deletes it: the reply to
 * a command deletes it in the transaction of the saga's next step
 * (saga_pg_relay_gone), one commit fewer per step. The rows no reply
 * follows (a saga's outcome event) are deleted in bulk a little later. */
#define SAGA_PG_RELAY_LINGER 1.0

enum saga_pg_relay_state {
	SAGA_PG_RELAY_WAITING,	/* to publish (due: not before) */
	SAGA_PG_RELAY_SENT,	/* published on r->epoch, unconfirmed */
	SAGA_PG_RELAY_DONE	/* confirmed: to delete */
};

struct saga_pg_relay_row {
	struct msg *m;		/* ours; the broker gets a copy each time */
	char *saga_id;		/* NULL: no order to keep */
	enum saga_pg_relay_state state;
	int deleting;		/* its DELETE is in the query in flight */
	int gone;		/* deleted by a batch (saga_pg_relay_gone) */
	double done_at;		/* util_mono() of its confirm */
	unsigned attempts;	/* nacks and returns so far */
	double due;		/* util_mono() before which it waits */
};

/* What the query in flight holds: statement indexes, -1 if absent. */
struct saga_pg_relay_query {
	int del, claim, mine;
	int limit;		/* rows the claim asked for */
};

struct saga_pg_relay {
	struct otel *otel;		/* spans of its publishes; NULL: none */
	struct event_base *base;
	const struct sagad_conf *conf;
	char *conninfo, *schema, *service, *replica;
	double grace;
	unsigned window;
	size_t max_held;

	struct pgc *pg;
	int pg_up;
	int pg_warned;		/* a failed connect said at warn level */
	int busy;		/* a query is in flight */
	struct saga_pg_relay_query q;
	char *sql_lock, *sql_delete, *sql_refresh, *sql_claim, *sql_mine, *sql_vacuum;
	char lock_key[24];	/* the claim's advisory lock, as text */
	int want_claim;		/* kicked, polled, or a full claim: look */
	int claim_next;		/* deletes went first: the claim's turn */
	int claiming;		/* the query in flight holds a claim */
	int closing;		/* saga_pg_relay_free: delete every row confirmed */
	/*
	 * Handed rows (saga_pg_relay_hand) are taken only while the relay
	 * holds every row claimed by this replica (caught_up, set by a claim
	 * after which every one of them in the table is held or pending):
	 * then a handed row's earlier rows of its saga, all this replica's
	 * (the batch's INSERT checked), are held and go first. Otherwise a
	 * handed row is dropped (missed) and the next claim reads it, in
	 * order.
	 */
	int caught_up;
	int missed;		/* a row dropped since the claim in flight was sent */
	struct saga_pg_relay_row *pending;	/* handed during a claim */
	size_t npending, cappending;
	double refreshed;	/* util_mono() of the last refresh sent */
	double vacuumed;	/* util_mono() of the last VACUUM sent */
	uint64_t vacuum_mark;	/* stats.deleted then */

	struct broker *br;
	uint64_t epoch;		/* of the broker connection; 0: down */
	int blocked;		/* connection.blocked */

	struct saga_pg_relay_row *rows;
	size_t nrows, caprows;
	unsigned inflight;

	struct event *fill_ev;	/* publish: once per loop turn */
	struct event *poll_ev;	/* every SAGA_PG_RELAY_POLL */
	struct event *retry_ev;	/* the earliest backoff's end */
	struct event *pump_ev;	/* the next query, after the hook returns */
	struct saga_pg_relay_stats stats;
};

/* saga_pg_relay_pg.c */
extern const struct pgc_hooks saga_pg_relay_pg_hooks;
/* The advisory lock's key of the claims, from the schema and service. */
void saga_pg_relay_lock_key(struct saga_pg_relay *r);
/* Marks the confirmed rows to delete now; returns how many (0: none due). */
int saga_pg_relay_mark_deletes(struct saga_pg_relay *r);
/* Sends what is due to PostgreSQL now if the connection is free. */
void saga_pg_relay_send(struct saga_pg_relay *r);
/* The same at the end of this loop turn (pump_ev runs the callback). */
void saga_pg_relay_pump(struct saga_pg_relay *r);
void saga_pg_relay_pump_cb(evutil_socket_t fd, short what, void *arg);
/* saga_pg_relay.c: takes m and saga_id into the rows held, in seq order
 * (a seq held already: dropped). */
void saga_pg_relay_add(struct saga_pg_relay *r, struct msg *m, char *saga_id);
/* Frees the rows handed during a claim, or takes them in. */
void saga_pg_relay_pending_end(struct saga_pg_relay *r, int take);
/* saga_pg_relay.c: the row with seq, or NULL; the index of seq, or where
 * it would go. */
struct saga_pg_relay_row *saga_pg_relay_row(struct saga_pg_relay *r, int64_t seq);
size_t saga_pg_relay_find(const struct saga_pg_relay *r, int64_t seq);
/* Drops the rows gone (saga_pg_relay_gone) that are not in flight. */
void saga_pg_relay_compact(struct saga_pg_relay *r);
/* Whether the row seq is held, or pending (handed during the claim). */
int saga_pg_relay_holds(struct saga_pg_relay *r, int64_t seq);

#endif
