/*
 * One asynchronous libpq connection on a libevent loop: the connect
 * (PQconnectPoll under a deadline), one query at a time (sent, flushed,
 * its results read from the socket under a deadline), LISTEN
 * notifications, and on any failure the connection dropped and made again
 * after a doubling backoff with jitter.
 *
 * It knows nothing of its owner: it reports through the hooks the owner
 * gives it, and uses no part of the plugin host API, so that a source
 * plugin and the daemon itself can both drive one. Everything runs on the
 * thread of the event base. A hook may call back into the connection
 * (send the next query, pgc_down); the connection checks after each hook
 * whether it is still the same one (pgc_gen).
 *
 * Messages handed to the owner (pgc_error, the hooks' why) are libpq's
 * text as it is: they may hold newlines.
 */
#ifndef SAGAD_PGCONN_H
#define SAGAD_PGCONN_H

#include <libpq-fe.h>

struct event_base;
struct pgc;

struct pgc_conf {
	const char *conninfo;	/* a conninfo string or URI (libpq's dbname) */
	double connect_timeout;	/* seconds a connect may take */
	double query_timeout;	/* seconds a query may take */
	double retry_initial, retry_max;	/* the reconnect backoff */
	/* Optional: each new connection first sets its search_path to this
	 * schema (quoted here) and runs `session` (settings, one SQL text);
	 * the connected hook follows, or a failure drops the connection. */
	const char *schema;
	const char *session;
	/* Non-zero: the session also gets server-side limits, so that
	 * PostgreSQL ends a query before this client gives up on it:
	 * statement_timeout PGC_STATEMENT_MARGIN seconds under query_timeout
	 * (at least 0.8 x query_timeout), lock_timeout PGC_LOCK_TIMEOUT (at
	 * most half the statement_timeout: a lock wait ends as such) and
	 * idle_in_transaction_session_timeout PGC_IDLE_TX_TIMEOUT, so that a
	 * frozen client's transaction does not hold its row locks for ever.
	 * The owner's session settings follow them, and may change them. */
	int server_limits;
	/* The most seconds between two DISCARD PLANS (pgconn.c; 0: 60). */
	double replan_max;
};

#define PGC_STATEMENT_MARGIN 3	/* seconds */
#define PGC_LOCK_TIMEOUT 10	/* seconds */
#define PGC_IDLE_TX_TIMEOUT 60	/* seconds */

struct pgc_hooks {
	/* A connect begins (the first, and each one after a failure). */
	void (*connecting)(void *arg);
	/* Connected, non-blocking, reading: send the first query. */
	void (*connected)(void *arg);
	/* The query sent has ended: its results are in pgc_result. */
	void (*done)(void *arg);
	/* One or more NOTIFYs have come (after any done of the same read). */
	void (*notified)(void *arg);
	/* The connection is about to be dropped (why: never NULL); a new
	 * one follows in about retry_in seconds. */
	void (*down)(void *arg, const char *why, double retry_in);
};

/* A connection, not started. conf->conninfo must outlive it. */
struct pgc *pgc_new(struct event_base *base, const struct pgc_conf *conf,
    const struct pgc_hooks *hooks, void *arg);
/* The first connect. */
void pgc_start(struct pgc *c);
/* Closes the connection (a transaction open on it rolls back); frees c. */
void pgc_free(struct pgc *c);

/* Sends one query (several statements allowed), or one statement with
 * text parameters; its end calls the done hook. */
void pgc_send(struct pgc *c, const char *sql);
void pgc_send_params(struct pgc *c, const char *sql, int n, const char *const *values);

/* One statement of a pipeline, with libpq's parameter arrays (lengths and
 * formats NULL: all text; a NULL value is SQL NULL). */
struct pgc_stmt {
	const char *sql;
	int n;
	const char *const *values;
	const int *lengths, *formats;
};

/*
 * Sends n statements in one round trip (libpq's pipeline mode, then a
 * sync); the done hook runs once all have ended. Result i is statement
 * i's; the first error stops the pipeline: that statement's result and
 * the later ones are NULL, and pgc_error says why. Without a BEGIN of its
 * own the pipeline is one implicit transaction, committed at the sync: an
 * error rolls back the statements before it too (t/pgconn.c tests this).
 * The arrays are copied by libpq before this returns.
 */
void pgc_send_pipeline(struct pgc *c, const struct pgc_stmt *s, int n);

/* The results of the query that ended: for a simple query those without
 * an error, in order; for a pipeline one per statement (see above); and
 * the first error, or NULL. */
int pgc_nresults(const struct pgc *c);
PGresult *pgc_result(const struct pgc *c, int i);
const char *pgc_error(const struct pgc *c);
/*
 * What an error says of a retry, by its SQLSTATE. TRANSIENT: the same
 * statements may well succeed later (deadlock, serialization failure,
 * lock or statement timeout, query cancelled, insufficient resources);
 * RECONNECT: transient, but not on this connection (a read-only
 * transaction: the server is a standby now, after a failover; the server
 * shutting down; connection trouble; libpq's own errors, which carry no
 * SQLSTATE); PERMANENT: the data or the statement is wrong (classes 22,
 * 23, 42, XX and anything else): trying again gives the same answer.
 */
enum pgc_err_class { PGC_ERR_PERMANENT, PGC_ERR_TRANSIENT, PGC_ERR_RECONNECT };
enum pgc_err_class pgc_sqlstate_class(const char *sqlstate);
/* The class of the ended query's first error (pgc_error not NULL), and
 * its SQLSTATE ("" if none). */
enum pgc_err_class pgc_error_class(const struct pgc *c);
const char *pgc_error_sqlstate(const struct pgc *c);

/* Result i, the caller's from now on (PQclear it). */
PGresult *pgc_take_result(struct pgc *c, int i);

/* The libpq connection, for escaping and for what it is connected to;
 * NULL while down. */
PGconn *pgc_conn(const struct pgc *c);
/* Bumped each time the connection is dropped. */
unsigned long pgc_gen(const struct pgc *c);

/* Drops the connection (the down hook says why) and reconnects later. */
void pgc_down(struct pgc *c, const char *why);
/* The connection serves: the next failure waits retry_initial again. */
void pgc_reset_backoff(struct pgc *c);

/* Blocking, for the end of the program: waits up to sec seconds for the
 * query in flight to end, its results dropped. */
void pgc_finish(struct pgc *c, double sec);

#endif
