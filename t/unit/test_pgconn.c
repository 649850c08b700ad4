/*
 * pgconn.c's error classification: which PostgreSQL errors a batch
 * retries as it was (transient), on a new connection (reconnect), or
 * counts toward a job's tries (permanent).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "pgconn.h"

static void
test_transient(void **state)
{
	(void)state;
	assert_int_equal(pgc_sqlstate_class("40P01"), PGC_ERR_TRANSIENT);	/* deadlock */
	assert_int_equal(pgc_sqlstate_class("40001"), PGC_ERR_TRANSIENT);	/* serialization */
	assert_int_equal(pgc_sqlstate_class("55P03"), PGC_ERR_TRANSIENT);	/* lock_timeout */
	assert_int_equal(pgc_sqlstate_class("57014"), PGC_ERR_TRANSIENT);	/* cancelled */
	assert_int_equal(pgc_sqlstate_class("53100"), PGC_ERR_TRANSIENT);	/* disk full */
	assert_int_equal(pgc_sqlstate_class("53300"), PGC_ERR_TRANSIENT);	/* too many conns */
	assert_int_equal(pgc_sqlstate_class("57000"), PGC_ERR_TRANSIENT);	/* operator */
}

static void
test_reconnect(void **state)
{
	(void)state;
	assert_int_equal(pgc_sqlstate_class("25006"), PGC_ERR_RECONNECT);	/* read only */
	assert_int_equal(pgc_sqlstate_class("08006"), PGC_ERR_RECONNECT);
	assert_int_equal(pgc_sqlstate_class("08000"), PGC_ERR_RECONNECT);
	assert_int_equal(pgc_sqlstate_class("57P01"), PGC_ERR_RECONNECT);	/* admin shutdown */
	assert_int_equal(pgc_sqlstate_class("57P02"), PGC_ERR_RECONNECT);
	assert_int_equal(pgc_sqlstate_class("57P03"), PGC_ERR_RECONNECT);
	/* libpq's own errors carry no SQLSTATE */
	assert_int_equal(pgc_sqlstate_class(NULL), PGC_ERR_RECONNECT);
	assert_int_equal(pgc_sqlstate_class(""), PGC_ERR_RECONNECT);
}

static void
test_permanent(void **state)
{
	(void)state;
	assert_int_equal(pgc_sqlstate_class("22P02"), PGC_ERR_PERMANENT);	/* bad input */
	assert_int_equal(pgc_sqlstate_class("22021"), PGC_ERR_PERMANENT);	/* encoding */
	assert_int_equal(pgc_sqlstate_class("23505"), PGC_ERR_PERMANENT);	/* unique */
	assert_int_equal(pgc_sqlstate_class("42P01"), PGC_ERR_PERMANENT);	/* no table */
	assert_int_equal(pgc_sqlstate_class("42703"), PGC_ERR_PERMANENT);	/* no column */
	assert_int_equal(pgc_sqlstate_class("XX000"), PGC_ERR_PERMANENT);	/* internal */
	assert_int_equal(pgc_sqlstate_class("XX001"), PGC_ERR_PERMANENT);	/* corrupted */
	/* other codes of the transient classes are not transient */
	assert_int_equal(pgc_sqlstate_class("40002"), PGC_ERR_PERMANENT);
	assert_int_equal(pgc_sqlstate_class("55000"), PGC_ERR_PERMANENT);
	assert_int_equal(pgc_sqlstate_class("25001"), PGC_ERR_PERMANENT);
	/* unknown, and malformed */
	assert_int_equal(pgc_sqlstate_class("ZZ999"), PGC_ERR_PERMANENT);
	assert_int_equal(pgc_sqlstate_class("P0001"), PGC_ERR_PERMANENT);	/* RAISE */
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_transient),
		cmocka_unit_test(test_reconnect),
		cmocka_unit_test(test_permanent),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
