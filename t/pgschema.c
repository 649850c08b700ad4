/*
 * Drives src/saga_pg_schema.c against a real PostgreSQL
 * (t/integration/pg_schema.py starts a private one).
 *
 *   pgschema CONNINFO [SCHEMA]   migrate; exit 0, or print the error on
 *                                stderr and exit 1
 *   pgschema --mask CONNINFO     print the conninfo as messages show it
 *
 * The scenario reads what the migration left with its own connection.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "saga_pg_schema.h"

int
main(int argc, char **argv)
{
	char *err = NULL, masked[512];

	if (argc == 3 && strcmp(argv[1], "--mask") == 0) {
		saga_pg_mask_conninfo(argv[2], masked, sizeof masked);
		printf("%s\n", masked);
		return 0;
	}
	if (argc < 2 || argc > 3) {
		fprintf(stderr, "usage: pgschema CONNINFO [SCHEMA] | --mask CONNINFO\n");
		return 2;
	}
	if (saga_pg_schema_migrate(argv[1], argc == 3 ? argv[2] : NULL, &err) < 0) {
		fprintf(stderr, "error: %s\n", err ? err : "(no message)");
		free(err);
		return 1;
	}
	printf("ok: version %d\n", SAGA_PG_SCHEMA_VERSION);
	return 0;
}
