/*
 * The PostgreSQL saga store's schema: created and migrated at start-up
 * (saga_pg_schema.h, REPLICAS.md: The PostgreSQL schema).
 *
 * Blocking libpq on purpose: it runs once, before the daemon serves
 * anything, as the SQLite store's migrations do in store_open; the
 * asynchronous connection (pgconn.c) is for the loop.
 *
 * One transaction does everything: the advisory lock (replicas that start
 * together wait for the first, then find its version and do nothing), the
 * schema if missing, the migrations and the version. A failure rolls it
 * all back: a schema is never left half migrated.
 */
#include "saga_pg_schema.h"

#include <libpq-fe.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "saga_store.h"
#include "xmalloc.h"

/*
 * Migrations: entry i takes the schema from version i to i + 1 (as
 * store_migrations in store.c). They run with search_path set to the
 * saga store's schema, so they name tables without it; never edit an entry
 * that has shipped, add one.
 *
 * Times are double precision seconds since the epoch, not timestamptz: the
 * engine's times are doubles (saga_rec, timers' due, the loop's clock) and
 * the SQLite store keeps them as REAL, so the backend binds and reads them
 * as they are, and both backends give the admin API the same numbers. What
 * the server's clock decides (replicas' heartbeats, claims) is written as
 * extract(epoch FROM clock_timestamp()).
 *
 * Every key begins with service: several services may share one schema,
 * and every query names its service, so indexes begin with it too.
 */
static const char *const saga_pg_migrations[] = {
	/* 1: the tables of REPLICAS.md */
	"CREATE TABLE schema_version(version int NOT NULL);"
	"INSERT INTO schema_version VALUES (0);"
	/* a saga instance; data is the engine's encoding (saga_rec.data) */
	"CREATE TABLE instances("
	"  service text NOT NULL,"
	"  saga text NOT NULL,"
	"  id text NOT NULL,"
	"  state int NOT NULL,"
	"  started_at double precision NOT NULL,"
	"  updated_at double precision NOT NULL,"
	"  finished_at double precision,"
	"  data bytea NOT NULL,"
	"  PRIMARY KEY (service, saga, id));"
	/* listings and counts by state; sagactl's lookup by id alone;
	 * expiry of finished instances */
	"CREATE INDEX instances_state ON instances(service, saga, state);"
	"CREATE INDEX instances_id ON instances(service, id);"
	"CREATE INDEX instances_finished ON instances(service, finished_at)"
	"  WHERE finished_at IS NOT NULL;"
	/* an instance's log; the key (instance, seq) is the index that reads
	 * an instance's history in order and deletes it with the instance */
	"CREATE TABLE history("
	"  service text NOT NULL,"
	"  saga text NOT NULL,"
	"  id text NOT NULL,"
	"  seq bigint GENERATED ALWAYS AS IDENTITY,"
	"  at double precision NOT NULL,"
	"  dir text NOT NULL,"
	"  what text NOT NULL,"
	"  step text,"
	"  message_id text,"
	"  detail text,"
	"  PRIMARY KEY (service, saga, id, seq));"
	/* armed timers; replicas poll them by due (FOR UPDATE SKIP LOCKED) */
	"CREATE TABLE timers("
	"  service text NOT NULL,"
	"  saga text NOT NULL,"
	"  id text NOT NULL,"
	"  kind int NOT NULL,"
	"  step int NOT NULL,"
	"  due double precision NOT NULL,"
	"  PRIMARY KEY (service, saga, id, kind, step));"
	"CREATE INDEX timers_due ON timers(service, due);"
	/* consumed message ids (the saga engine's, and shared-dedup
	 * subscriptions'), expired by at */
	"CREATE TABLE consumed("
	"  service text NOT NULL,"
	"  subscription text NOT NULL,"
	"  message_id text NOT NULL,"
	"  replica text NOT NULL,"
	"  delivered boolean NOT NULL DEFAULT false,"
	"  at double precision NOT NULL,"
	"  PRIMARY KEY (service, subscription, message_id));"
	"CREATE INDEX consumed_at ON consumed(service, at);"
	/* choreographed events that came before their saga's start: the whole
	 * message, applied in the start's transaction or expired by at */
	"CREATE TABLE early("
	"  service text NOT NULL,"
	"  saga_id text NOT NULL,"
	"  message_id text NOT NULL,"
	"  exchange text NOT NULL,"
	"  routing_key text NOT NULL,"
	"  props bytea,"
	"  body bytea NOT NULL,"
	"  at double precision NOT NULL,"
	"  PRIMARY KEY (service, saga_id, message_id));"
	"CREATE INDEX early_at ON early(service, at);"
	/* messages saga steps send, relayed in seq order; props are msgpack
	 * as in the SQLite outbox; unclaimed rows have claimed_at NULL */
	"CREATE TABLE outbox("
	"  service text NOT NULL,"
	"  seq bigint GENERATED ALWAYS AS IDENTITY,"
	"  message_id text NOT NULL,"
	"  exchange text NOT NULL,"
	"  routing_key text NOT NULL,"
	"  props bytea,"
	"  body bytea NOT NULL,"
	"  saga_id text,"
	"  created_at double precision NOT NULL,"
	"  claimed_by text,"
	"  claimed_at double precision,"
	"  PRIMARY KEY (service, seq));"
	/* the relay's claim of rows older than relay_grace, oldest first */
	"CREATE INDEX outbox_claimed ON outbox(service, claimed_at, seq);"
	/* each sagad's heartbeat (the server's clock), for shared dedup and
	 * for operators */
	"CREATE TABLE replicas("
	"  service text NOT NULL,"
	"  replica text NOT NULL,"
	"  host text,"
	"  pid int,"
	"  started_at double precision NOT NULL,"
	"  heartbeat_at double precision NOT NULL,"
	"  PRIMARY KEY (service, replica));",
	/* 2: an early event is kept for one definition (issue 15): one that
	 * matches two is kept for each, and each start applies its own.
	 * Rows kept before have saga '' (the first start takes them). */
	"ALTER TABLE early ADD COLUMN saga text NOT NULL DEFAULT '';"
	"ALTER TABLE early DROP CONSTRAINT early_pkey;"
	"ALTER TABLE early ADD PRIMARY KEY (service, saga_id, saga, message_id);",
	/* 3: a saga's outbox rows, for the check of the batch's INSERT (is an
	 * earlier row of the saga another replica's?) */
	"CREATE INDEX outbox_saga ON outbox(service, saga_id, seq);",
	/* 4: an instance is found by its key alone, and a step's update
	 * stays on its page. The generic plan of the batch's UPDATE, made
	 * on an empty table's statistics, walked instances_state (every
	 * instance of the saga) with a filter on id: 1.9 ms an update once
	 * 10,000 sagas ran. The key led by id replaces instances_id (it
	 * served sagactl's lookup by id alone); instances_state served
	 * nothing an index helps (the counts read every row, the listing
	 * sorts by start). With two indexes left and room on each page
	 * (fillfactor), an update that keeps state and finished_at is HOT:
	 * no index entry, no page split. */
	"DROP INDEX instances_state;"
	"DROP INDEX instances_id;"
	"ALTER TABLE instances DROP CONSTRAINT instances_pkey;"
	"ALTER TABLE instances ADD PRIMARY KEY (service, id, saga);"
	"ALTER TABLE instances SET (fillfactor = 70);",
	/* 5: every version of every saga definition with instances started on
	 * it (issue 18: an instance finishes on the version it started on) */
	"CREATE TABLE definitions("
	"  service text NOT NULL,"
	"  saga text NOT NULL,"
	"  version text NOT NULL,"
	"  def text NOT NULL,"
	"  created_at double precision NOT NULL,"
	"  PRIMARY KEY (service, saga, version));",
};

_Static_assert(sizeof saga_pg_migrations / sizeof saga_pg_migrations[0] ==
    SAGA_PG_SCHEMA_VERSION, "SAGA_PG_SCHEMA_VERSION counts the migrations");

/* One line of libpq's text: its messages end in a newline and may hold
 * several ("connection to server ... failed: FATAL: ..."). */
static char *
saga_pg_oneline(const char *msg)
{
	char *s = xstrdup(msg ? msg : ""), *r, *w;

	/* every run of white space one blank (libpq indents its hints) */
	for (r = w = s; *r; r++)
		if (!strchr(" \t\n", *r))
			*w++ = *r;
		else if (w > s && w[-1] != ' ')
			*w++ = ' ';
	if (w > s && w[-1] == ' ')
		w--;
	*w = '\0';
	return s;
}

/* Appends key='value' to out (conninfo quoting: \ and ' escaped). */
static size_t
saga_pg_put_kv(char *out, size_t outlen, size_t at, const char *key, const char *val)
{
	const char *v;

	if (at >= outlen)
		return at;
	at += snprintf(out + at, outlen - at, "%s%s='", at ? " " : "", key);
	for (v = val; *v && at + 2 < outlen; v++) {
		if (*v == '\\' || *v == '\'')
			out[at++] = '\\';
		out[at++] = *v;
	}
	if (at + 1 < outlen)
		out[at++] = '\'';
	out[at < outlen ? at : outlen - 1] = '\0';
	return at;
}

void
saga_pg_mask_conninfo(const char *conninfo, char *out, size_t outlen)
{
	PQconninfoOption *opts = PQconninfoParse(conninfo, NULL), *o;
	size_t at = 0;

	if (outlen == 0)
		return;
	out[0] = '\0';
	/* Parsing (rather than searching for "password=") masks the URI form
	 * and every quoting alike. */
	if (!opts) {
		snprintf(out, outlen, "(conninfo not shown: libpq cannot parse it)");
		return;
	}
	for (o = opts; o->keyword; o++)
		if (o->val)
			at = saga_pg_put_kv(out, outlen, at, o->keyword,
			    strcmp(o->keyword, "password") == 0 ? "***" : o->val);
	PQconninfoFree(opts);
}

/* The advisory lock's key: FNV-1a of the schema's name, so that sagads of
 * one schema exclude each other and those of other schemas do not. */
static long long
saga_pg_lock_key(const char *schema)
{
	const char *prefix = "sagad schema ", *p;
	uint64_t h = 14695981039346656037ULL;

	for (p = prefix; *p; p++)
		h = (h ^ (unsigned char)*p) * 1099511628211ULL;
	for (p = schema; *p; p++)
		h = (h ^ (unsigned char)*p) * 1099511628211ULL;
	return (long long)(int64_t)h;
}

/* A migration in progress: the connection, the schema and its quoted
 * name, the first error. */
struct saga_pg_mig {
	PGconn *conn;
	const char *schema;
	char *quoted;
	char *err;
};

/* A hint for the errors an operator fixes with a GRANT. */
static const char *
saga_pg_hint(const PGresult *res)
{
	const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;

	if (state && strcmp(state, "42501") == 0)
		return " (the role needs CREATE on the database to create the schema,"
		    " or on the schema to migrate it; or let its owner run sagad once)";
	return "";
}

/* Runs sql (one or more statements, no parameters) and returns its result,
 * or NULL with m->err set (what: the step, for the message). */
static PGresult *
saga_pg_exec(struct saga_pg_mig *m, const char *what, const char *sql,
    int nparams, const char *const *params)
{
	PGresult *res = nparams ? PQexecParams(m->conn, sql, nparams, NULL, params,
	    NULL, NULL, 0) : PQexec(m->conn, sql);
	ExecStatusType st = PQresultStatus(res);
	char *msg;

	if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK)
		return res;
	msg = saga_pg_oneline(res ? PQresultErrorMessage(res) : PQerrorMessage(m->conn));
	m->err = xasprintf("saga store: PostgreSQL schema \"%s\": %s: %s%s",
	    m->schema, what, msg, saga_pg_hint(res));
	free(msg);
	PQclear(res);
	return NULL;
}

static int
saga_pg_run(struct saga_pg_mig *m, const char *what, const char *sql)
{
	PGresult *res = saga_pg_exec(m, what, sql, 0, NULL);

	PQclear(res);
	return res ? 0 : -1;
}

/* Runs a query that answers one value, as a number (-1: no row). */
static int
saga_pg_int(struct saga_pg_mig *m, const char *what, const char *sql,
    int nparams, const char *const *params, long long *out)
{
	PGresult *res = saga_pg_exec(m, what, sql, nparams, params);

	if (!res)
		return -1;
	*out = PQntuples(res) > 0 && !PQgetisnull(res, 0, 0) ?
	    strtoll(PQgetvalue(res, 0, 0), NULL, 10) : -1;
	PQclear(res);
	return 0;
}

/* The schema, created if missing. Looked up first: CREATE SCHEMA IF NOT
 * EXISTS checks the CREATE privilege on the database even when the schema
 * exists, and a replica's role may own no more than the schema's tables. */
static int
saga_pg_ensure_schema(struct saga_pg_mig *m)
{
	const char *params[1] = { m->schema };
	long long found;
	char *sql;
	int r;

	if (saga_pg_int(m, "cannot look for the schema",
	    "SELECT count(*) FROM pg_namespace WHERE nspname = $1", 1, params, &found) < 0)
		return -1;
	if (found > 0)
		return 0;
	sql = xasprintf("CREATE SCHEMA %s", m->quoted);
	r = saga_pg_run(m, "cannot create the schema", sql);
	free(sql);
	if (r == 0)
		log_info("saga store schema created", LOG_STR("schema", m->schema));
	return r;
}

/* The schema's version: 0 when it has no schema_version table yet. */
static int
saga_pg_version(struct saga_pg_mig *m, long long *v)
{
	const char *params[1] = { m->schema };
	long long exists;

	if (saga_pg_int(m, "cannot read the schema's version",
	    "SELECT count(*) FROM pg_tables WHERE schemaname = $1"
	    " AND tablename = 'schema_version'", 1, params, &exists) < 0)
		return -1;
	if (!exists) {
		*v = 0;
		return 0;
	}
	if (saga_pg_int(m, "cannot read the schema's version",
	    "SELECT max(version) FROM schema_version", 0, NULL, v) < 0)
		return -1;
	if (*v < 0) {
		m->err = xasprintf("saga store: PostgreSQL schema \"%s\": schema_version"
		    " is empty (not sagad's schema, or damaged)", m->schema);
		return -1;
	}
	return 0;
}

/* From version v to the newest, each step with its version. */
static int
saga_pg_migrate_from(struct saga_pg_mig *m, long long v)
{
	long long n = SAGA_PG_SCHEMA_VERSION;
	char sql[64], what[64];

	if (v > n) {
		m->err = xasprintf("saga store: PostgreSQL schema \"%s\" is at version %lld,"
		    " newer than this sagad knows (%lld): upgrade sagad", m->schema, v, n);
		return -1;
	}
	for (; v < n; v++) {
		snprintf(what, sizeof what, "migration to version %lld failed", v + 1);
		snprintf(sql, sizeof sql, "UPDATE schema_version SET version = %lld", v + 1);
		if (saga_pg_run(m, what, saga_pg_migrations[v]) < 0 ||
		    saga_pg_run(m, what, sql) < 0)
			return -1;
		log_info("saga store schema migrated", LOG_STR("schema", m->schema),
		    LOG_INT("version", v + 1));
	}
	return 0;
}

/* The whole, in the transaction that BEGIN opened. */
static int
saga_pg_transaction(struct saga_pg_mig *m)
{
	char *sql = xasprintf("SELECT pg_advisory_xact_lock(%lld)", saga_pg_lock_key(m->schema));
	long long v;
	int r;

	/* Replicas starting together: one migrates, the others wait here and
	 * then read its version. The lock ends with the transaction. */
	r = saga_pg_run(m, "cannot take the migration lock", sql);
	free(sql);
	if (r < 0 || saga_pg_ensure_schema(m) < 0)
		return -1;
	sql = xasprintf("SET LOCAL search_path TO %s", m->quoted);
	r = saga_pg_run(m, "cannot use the schema", sql);
	free(sql);
	if (r < 0 || saga_pg_version(m, &v) < 0 || saga_pg_migrate_from(m, v) < 0)
		return -1;
	return saga_pg_run(m, "cannot commit the migration", "COMMIT");
}

/* Connects with a 10 s connect_timeout unless conninfo sets its own: a
 * keyword after the expanded dbname overrides it, one before does not. */
static PGconn *
saga_pg_connect(const char *conninfo, char **err)
{
	const char *keys[] = { "connect_timeout", "application_name", "dbname", NULL };
	const char *vals[] = { "10", "sagad", conninfo, NULL };
	PGconn *conn = PQconnectdbParams(keys, vals, 1);
	char masked[512], *msg;

	if (conn && PQstatus(conn) == CONNECTION_OK)
		return conn;
	saga_pg_mask_conninfo(conninfo, masked, sizeof masked);
	msg = saga_pg_oneline(conn ? PQerrorMessage(conn) : "out of memory");
	*err = xasprintf("saga store: cannot connect to PostgreSQL (%s): %s", masked, msg);
	free(msg);
	PQfinish(conn);
	return NULL;
}

/* The definitions' versions (saga_store.h: saga_store_defs), on a
 * connection of their own, at start. */
static int
saga_pg_defs_run(struct saga_pg_mig *m, const char *service, const struct saga_def_rec *put,
    size_t n, void (*fn)(void *arg, const struct saga_def_rec *d), void *arg)
{
	const char *p[4];
	char *sql = xasprintf("SET search_path TO %s", m->quoted);
	PGresult *res;
	size_t i;
	int r = saga_pg_run(m, "cannot use the schema", sql), k;

	free(sql);
	for (i = 0; r == 0 && i < n; i++) {
		p[0] = service;
		p[1] = put[i].saga;
		p[2] = put[i].version;
		p[3] = put[i].json;
		res = saga_pg_exec(m, "cannot store a saga definition",
		    "INSERT INTO definitions(service, saga, version, def, created_at)"
		    " VALUES ($1, $2, $3, $4, extract(epoch FROM clock_timestamp()))"
		    " ON CONFLICT DO NOTHING", 4, p);
		r = res ? 0 : -1;
		PQclear(res);
	}
	if (r < 0)
		return -1;
	p[0] = service;
	res = saga_pg_exec(m, "cannot read the saga definitions",
	    "SELECT saga, version, def FROM definitions WHERE service = $1"
	    " ORDER BY saga, created_at", 1, p);
	if (!res)
		return -1;
	for (k = 0; k < PQntuples(res); k++) {
		struct saga_def_rec d = { PQgetvalue(res, k, 0), PQgetvalue(res, k, 1),
		    PQgetvalue(res, k, 2) };
		fn(arg, &d);
	}
	PQclear(res);
	return 0;
}

int
saga_pg_defs(const char *conninfo, const char *schema, const char *service,
    const struct saga_def_rec *put, size_t n,
    void (*fn)(void *arg, const struct saga_def_rec *d), void *arg, char **err)
{
	struct saga_pg_mig m = { NULL, schema ? schema : SAGA_PG_SCHEMA_DEFAULT, NULL, NULL };
	int r = -1;

	*err = NULL;
	if (!(m.conn = saga_pg_connect(conninfo, err)))
		return -1;
	m.quoted = PQescapeIdentifier(m.conn, m.schema, strlen(m.schema));
	if (m.quoted)
		r = saga_pg_defs_run(&m, service, put, n, fn, arg);
	else
		m.err = xasprintf("saga store: PostgreSQL schema \"%s\": bad name", m.schema);
	PQfreemem(m.quoted);
	PQfinish(m.conn);
	*err = m.err;
	return r;
}

int
saga_pg_schema_migrate(const char *conninfo, const char *schema, char **err)
{
	struct saga_pg_mig m = { NULL, schema ? schema : SAGA_PG_SCHEMA_DEFAULT, NULL, NULL };
	int r = -1;

	*err = NULL;
	if (!*m.schema) {
		*err = xstrdup("saga store: the PostgreSQL schema's name is empty");
		return -1;
	}
	if (!(m.conn = saga_pg_connect(conninfo, err)))
		return -1;
	m.quoted = PQescapeIdentifier(m.conn, m.schema, strlen(m.schema));
	if (!m.quoted)
		m.err = xasprintf("saga store: PostgreSQL schema \"%s\": bad name: %s",
		    m.schema, PQerrorMessage(m.conn));
	else if (saga_pg_run(&m, "cannot begin", "BEGIN") == 0)
		r = saga_pg_transaction(&m);
	/* An error left the transaction open: closing the connection rolls
	 * it back and frees the lock. */
	PQfreemem(m.quoted);
	PQfinish(m.conn);
	*err = m.err;
	return r;
}
