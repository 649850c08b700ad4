/*
 * The PostgreSQL saga store's schema (REPLICAS.md: The PostgreSQL schema):
 * created and migrated at start-up, before the daemon serves, with plain
 * blocking libpq, like the SQLite store's migrations in store_open.
 *
 * Not yet wired into the daemon: the backend that uses it comes with
 * `saga_store { backend = "pgsql"; }` (REPLICAS.md: Order of the work).
 */
#ifndef SAGAD_SAGA_PG_SCHEMA_H
#define SAGAD_SAGA_PG_SCHEMA_H

#include <stddef.h>

/* The schema version this sagad creates and knows. */
#define SAGA_PG_SCHEMA_VERSION 5

/* The schema's name when the configuration names none. */
#define SAGA_PG_SCHEMA_DEFAULT "sagad"

/*
 * Connects (conninfo: a libpq conninfo string or URI; connect_timeout 10 s
 * unless it says otherwise), creates the schema if it is missing and
 * brings its tables to SAGA_PG_SCHEMA_VERSION in one transaction under an
 * advisory lock, so that replicas starting together migrate it once.
 * schema NULL: SAGA_PG_SCHEMA_DEFAULT. Returns 0, or -1 with *err a
 * malloc'd message (the password masked) for the caller to free: the
 * connection failed, the role may not create the schema, or the schema
 * is newer than this sagad.
 */
int saga_pg_schema_migrate(const char *conninfo, const char *schema, char **err);

/* The service's saga definitions' versions (saga_store.h: saga_store_defs),
 * on a blocking connection of its own, at start. 0, or -1 with *err. */
struct saga_def_rec;
int saga_pg_defs(const char *conninfo, const char *schema, const char *service,
    const struct saga_def_rec *put, size_t n,
    void (*fn)(void *arg, const struct saga_def_rec *d), void *arg, char **err);

/*
 * conninfo without its password (key=value or URI form), in out, for
 * messages and logs. A conninfo libpq cannot parse is replaced by a
 * placeholder: it might hold a password in a form not recognised.
 */
void saga_pg_mask_conninfo(const char *conninfo, char *out, size_t outlen);

#endif
