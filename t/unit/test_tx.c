/* Unit tests for two-phase commit's pure parts: a transaction built into a
 * saga definition (src/conf_tx.c), its definition's JSON round trip
 * (saga_def.c keeps the transaction mark), and a participant's rules
 * (src/txpart.c: what to do with a PREPARE, COMMIT or ABORT given the
 * record, and the record after the service's answer). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "msg.h"
#include "props.h"
#include "saga_def.h"
#include "txpart.h"

static const char TX_CONF[] =
	"service = \"orders\";\n"
	"store = { path = \"/tmp/x.db\"; };\n"
	"exchanges = ( { name = \"events\"; }, { name = \"commands\"; } );\n"
	"transactions = ( { name = \"reserve\"; start = \"events:order.placed\";\n"
	"  participants = (\n"
	"    { name = \"a\"; prepare = \"commands:a.prepare\"; commit = \"commands:a.commit\";\n"
	"      abort = \"commands:a.abort\"; },\n"
	"    { name = \"b\"; prepare = \"commands:b.prepare\"; commit = \"commands:b.commit\";\n"
	"      abort = \"commands:b.abort\"; } );\n"
	"  prepare_timeout = 4; decision_retry_initial = 0.1; decision_retry_max = 2;\n"
	"  committed = \"events:ok\"; } );\n";

static struct sagad_conf *
load(const char *text)
{
	struct conf_errors e = { NULL, 0 };
	struct sagad_conf *c = conf_load_string(text, "main.conf", ".", &e);
	size_t i;

	for (i = 0; i < e.n; i++)
		print_error("  conf error: %s\n", e.msg[i]);
	conf_errors_clear(&e);
	return c;
}

/* prepare:a prepare:b (group), decision (pivot, nothing to run),
 * commit:a commit:b (group); the aborts are the prepares' compensations. */
static void
test_built_shape(void **state)
{
	struct sagad_conf *c = load(TX_CONF);
	const struct conf_saga *sg;

	(void)state;
	assert_non_null(c);
	assert_int_equal(c->n_sagas, 1);
	sg = &c->sagas[0];
	assert_true(sg->transaction);
	assert_string_equal(sg->name, "reserve");
	assert_int_equal(sg->n_steps, 5);
	assert_string_equal(sg->steps[0].name, "prepare:a");
	assert_string_equal(sg->steps[0].command.key, "a.prepare");
	assert_string_equal(sg->steps[0].compensate.key, "a.abort");
	assert_string_equal(sg->steps[0].group, "prepare");
	assert_string_equal(sg->steps[1].group, "prepare");
	assert_true(sg->steps[0].timeout == 4);
	assert_int_equal(sg->steps[0].attempts, 1);
	assert_string_equal(sg->steps[2].name, "decision");
	assert_true(sg->steps[2].pivot);
	assert_null(sg->steps[2].command.exchange);
	assert_null(sg->steps[2].group);
	assert_string_equal(sg->steps[3].name, "commit:a");
	assert_string_equal(sg->steps[4].command.key, "b.commit");
	assert_null(sg->steps[4].compensate.exchange);
	assert_string_equal(sg->steps[4].group, "commit");
	assert_string_equal(sg->completed.key, "ok");
	assert_null(sg->compensated.exchange);
	assert_true(sg->retry_initial == 0.1 && sg->retry_max == 2);
	assert_true(sg->retry_attempts >= 1000000 && sg->compensate_attempts >= 1000000);
	/* the saga engine's queue is bound to the start event */
	assert_string_equal(c->subs[c->n_subs - 1].name, "_sagas");
	conf_free(c);
}

/* The mark survives the definition's JSON (an older version read back
 * is still a transaction); a saga's JSON does not mention it. */
static void
test_json_keeps_mark(void **state)
{
	struct sagad_conf *c = load(TX_CONF);
	char *json = saga_def_json(&c->sagas[0]);
	struct conf_saga *back = saga_def_parse(json);

	(void)state;
	assert_non_null(strstr(json, "\"transaction\""));
	assert_non_null(back);
	assert_true(back->transaction);
	assert_int_equal(back->n_steps, 5);
	assert_true(back->steps[2].pivot);
	c->sagas[0].transaction = 0;
	free(json);
	json = saga_def_json(&c->sagas[0]);
	assert_null(strstr(json, "\"transaction\""));
	free(json);
	saga_def_free(back);
	conf_free(c);
}

static void
test_refused(void **state)
{
	char *bad = strdup(TX_CONF);
	char *p = strstr(bad, "abort = \"commands:b.abort\";");

	(void)state;
	memset(p, ' ', strlen("abort = \"commands:b.abort\";"));
	assert_null(load(bad));
	free(bad);
	/* the file cannot set the mark on a saga */
	assert_null(load("service = \"s\"; store = { path = \"/tmp/x.db\"; };\n"
	    "exchanges = ( { name = \"e\"; } );\n"
	    "sagas = ( { name = \"x\"; start = \"e:k\"; transaction = true;\n"
	    "  steps = ( { name = \"a\"; command = \"e:a\"; } ); } );\n"));
}

static void
test_kind(void **state)
{
	struct msg m;

	(void)state;
	memset(&m, 0, sizeof m);
	assert_int_equal(txpart_kind(&m), TXP_NOT_TX);
	m.props.correlation_id = strdup("t1");
	props_set_header(&m.props, "x-sagad-kind", "prepare");
	assert_int_equal(txpart_kind(&m), TXP_NOT_TX);	/* no saga, no step */
	props_set_header(&m.props, "x-sagad-saga", "reserve");
	props_set_header(&m.props, "x-sagad-step", "prepare:a");
	assert_int_equal(txpart_kind(&m), TXP_PREPARE);
	props_set_header(&m.props, "x-sagad-kind", "abort");
	assert_int_equal(txpart_kind(&m), TXP_ABORT);
	props_set_header(&m.props, "x-sagad-kind", "command");
	assert_int_equal(txpart_kind(&m), TXP_NOT_TX);
	props_free(&m.props);
}

/* Every (record, message) pair: delivered only when the service has not
 * answered it yet; never a decision against the record. */
static void
test_decide(void **state)
{
	static const enum txp_action want[TXP_NSTATES][3] = {
		/*              PREPARE          COMMIT          ABORT */
		[TXP_NONE] = { TXP_DELIVER, TXP_DELIVER, TXP_DELIVER },
		[TXP_PREPARED] = { TXP_ANSWER_YES, TXP_DELIVER, TXP_DELIVER },
		[TXP_REFUSED] = { TXP_ANSWER_NO, TXP_CONFLICT, TXP_ANSWER_YES },
		[TXP_COMMITTED] = { TXP_ANSWER_YES, TXP_ANSWER_YES, TXP_CONFLICT },
		[TXP_ABORTED] = { TXP_ANSWER_NO, TXP_CONFLICT, TXP_ANSWER_YES },
	};
	int st, k;

	(void)state;
	for (st = 0; st < TXP_NSTATES; st++)
		for (k = 0; k < 3; k++)
			assert_int_equal(txpart_decide((enum txp_state)st, (enum txp_kind)(k + 1)),
			    want[st][k]);
	assert_int_equal(txpart_decide(TXP_ABORTED, TXP_NOT_TX), TXP_DELIVER);
}

static void
test_next(void **state)
{
	(void)state;
	assert_int_equal(txpart_next(TXP_NONE, TXP_PREPARE, 1), TXP_PREPARED);
	assert_int_equal(txpart_next(TXP_NONE, TXP_PREPARE, 0), TXP_REFUSED);
	/* a vote never overrides a decision */
	assert_int_equal(txpart_next(TXP_ABORTED, TXP_PREPARE, 1), TXP_ABORTED);
	assert_int_equal(txpart_next(TXP_PREPARED, TXP_PREPARE, 0), TXP_PREPARED);
	assert_int_equal(txpart_next(TXP_PREPARED, TXP_COMMIT, 1), TXP_COMMITTED);
	assert_int_equal(txpart_next(TXP_PREPARED, TXP_COMMIT, 0), TXP_PREPARED);
	assert_int_equal(txpart_next(TXP_PREPARED, TXP_ABORT, 1), TXP_ABORTED);
	assert_int_equal(txpart_next(TXP_NONE, TXP_ABORT, 1), TXP_ABORTED);
	assert_int_equal(txpart_next(TXP_COMMITTED, TXP_NOT_TX, 1), TXP_COMMITTED);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_built_shape),
		cmocka_unit_test(test_json_keeps_mark),
		cmocka_unit_test(test_refused),
		cmocka_unit_test(test_kind),
		cmocka_unit_test(test_decide),
		cmocka_unit_test(test_next),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
