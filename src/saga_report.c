/*
 * sagad -n with a store: what a change of the saga definitions does to
 * the instances that have not finished (running, compensating, failed):
 * how many there are of each version of each saga, and which keep an
 * older version (saga_version.c: they finish on it). Reads the SQLite
 * store read-only, or the PostgreSQL saga store; writes nothing.
 */
#include "saga_report.h"

#include <libpq-fe.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "saga.h"
#include "saga_def.h"
#include "saga_int.h"
#include "xmalloc.h"

struct report_row {
	char saga[256];
	char version[SAGA_DEF_VERSION_LEN + 1];	/* "" before versions */
	long n;
};

struct report {
	struct report_row *rows;
	size_t n;
};

static void
report_count(struct report *r, const char *saga, const void *data, size_t len)
{
	char v[SAGA_DEF_VERSION_LEN + 1] = "";
	size_t i;

	if (saga_peek_version(data, len, v) < 0)
		strcpy(v, "?");
	for (i = 0; i < r->n; i++)
		if (strcmp(r->rows[i].saga, saga) == 0 && strcmp(r->rows[i].version, v) == 0) {
			r->rows[i].n++;
			return;
		}
	r->rows = xrealloc(r->rows, (r->n + 1) * sizeof *r->rows);
	snprintf(r->rows[r->n].saga, sizeof r->rows[r->n].saga, "%s", saga);
	memcpy(r->rows[r->n].version, v, sizeof v);
	r->rows[r->n++].n = 1;
}

static int
report_sqlite(const char *path, struct report *r)
{
	sqlite3 *db = NULL;
	sqlite3_stmt *s = NULL;
	int rc = -1;

	if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK)
		goto out;
	if (sqlite3_prepare_v2(db, "SELECT saga, data FROM saga WHERE state IN (?, ?, ?)", -1,
	    &s, NULL) != SQLITE_OK)
		goto out;
	sqlite3_bind_int(s, 1, SAGA_RUNNING);
	sqlite3_bind_int(s, 2, SAGA_COMPENSATING);
	sqlite3_bind_int(s, 3, SAGA_FAILED);
	while (sqlite3_step(s) == SQLITE_ROW)
		report_count(r, (const char *)sqlite3_column_text(s, 0), sqlite3_column_blob(s, 1),
		    (size_t)sqlite3_column_bytes(s, 1));
	rc = 0;
out:
	sqlite3_finalize(s);
	sqlite3_close(db);
	return rc;
}

static int
report_pgsql(const struct sagad_conf *c, struct report *r)
{
	const char *keys[] = { "connect_timeout", "application_name", "dbname", NULL };
	const char *vals[] = { "10", "sagad -n", c->saga_store.conninfo, NULL };
	PGconn *pg = PQconnectdbParams(keys, vals, 1);
	char *q, *schema, st[3][8];
	const char *p[4];
	PGresult *res;
	int i;

	if (PQstatus(pg) != CONNECTION_OK) {
		PQfinish(pg);
		return -1;
	}
	snprintf(st[0], sizeof st[0], "%d", SAGA_RUNNING);
	snprintf(st[1], sizeof st[1], "%d", SAGA_COMPENSATING);
	snprintf(st[2], sizeof st[2], "%d", SAGA_FAILED);
	p[0] = c->service;
	p[1] = st[0];
	p[2] = st[1];
	p[3] = st[2];
	schema = PQescapeIdentifier(pg, c->saga_store.schema, strlen(c->saga_store.schema));
	q = xasprintf("SELECT saga, data FROM %s.instances WHERE service = $1"
	    " AND state IN ($2, $3, $4)", schema ? schema : "sagad");
	PQfreemem(schema);
	/* binary results: data as its bytes */
	res = PQexecParams(pg, q, 4, NULL, p, NULL, NULL, 1);
	free(q);
	if (PQresultStatus(res) != PGRES_TUPLES_OK) {
		PQclear(res);
		PQfinish(pg);
		return -1;
	}
	for (i = 0; i < PQntuples(res); i++) {
		char *saga = xstrndup(PQgetvalue(res, i, 0), (size_t)PQgetlength(res, i, 0));
		report_count(r, saga, PQgetvalue(res, i, 1), (size_t)PQgetlength(res, i, 1));
		free(saga);
	}
	PQclear(res);
	PQfinish(pg);
	return 0;
}

void
saga_report(const struct sagad_conf *c, FILE *out)
{
	struct report r = { NULL, 0 };
	char now[SAGA_DEF_VERSION_LEN + 1], *json;
	size_t i, k;
	int rc;

	if (!c->n_sagas)
		return;
	rc = c->saga_store.backend == SAGA_BACKEND_PGSQL ? report_pgsql(c, &r) :
	    report_sqlite(c->store.path, &r);
	if (rc < 0) {
		fprintf(out, "sagas: the store cannot be read (%s): no count of running instances\n",
		    c->saga_store.backend == SAGA_BACKEND_PGSQL ? "PostgreSQL" : c->store.path);
		return;
	}
	for (i = 0; i < c->n_sagas; i++) {
		long same = 0, other = 0;
		json = saga_def_json(&c->sagas[i]);
		saga_def_version(json, now);
		free(json);
		for (k = 0; k < r.n; k++) {
			if (strcmp(r.rows[k].saga, c->sagas[i].name) != 0)
				continue;
			if (strcmp(r.rows[k].version, now) == 0 || !r.rows[k].version[0])
				same += r.rows[k].n;
			else {
				other += r.rows[k].n;
				fprintf(out, "saga %s: %ld unfinished instance(s) of version %s"
				    " (this file's is %s) finish on their own version\n",
				    c->sagas[i].name, r.rows[k].n, r.rows[k].version, now);
			}
		}
		fprintf(out, "saga %s: version %s, %ld unfinished instance(s) on it%s\n",
		    c->sagas[i].name, now, same, other ? ", older ones above" : "");
	}
	for (k = 0; k < r.n; k++) {
		for (i = 0; i < c->n_sagas; i++)
			if (strcmp(r.rows[k].saga, c->sagas[i].name) == 0)
				break;
		if (i == c->n_sagas)
			fprintf(out, "saga %s: no longer configured: its %ld unfinished instance(s)"
			    " will not run\n", r.rows[k].saga, r.rows[k].n);
	}
	free(r.rows);
}
