/* Unit tests for src/conf_table.c: the rows against conf/sagad.conf, and
 * what a reload keeps and names. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "conf_table.h"

static struct sagad_conf *
load_ok(const char *text)
{
	struct conf_errors e = { NULL, 0 };
	struct sagad_conf *c = conf_load_string(text, "main.conf", ".", &e);
	size_t i;

	for (i = 0; i < e.n; i++)
		print_error("  conf error: %s\n", e.msg[i]);
	conf_errors_clear(&e);
	if (!c)
		fail_msg("valid configuration rejected:\n%s", text);
	return c;
}

static char *
read_text(const char *path)
{
	FILE *f = fopen(path, "r");
	char *text = NULL;
	size_t cap = 0;

	if (!f)
		fail_msg("cannot open %s", path);
	/* A newline first: every key line then starts with "\n". */
	if (getdelim(&text, &cap, '\0', f) < 0)
		fail_msg("cannot read %s", path);
	fclose(f);
	{
		char *t = malloc(strlen(text) + 2);
		t[0] = '\n';
		strcpy(t + 1, text);
		free(text);
		return t;
	}
}

/* The line a row must have in the sample file, at indent: the default as
 * written in the file, or (no default) the key, set or commented out. */
static int
sample_has_row(const char *text, const struct conf_key *k, int indent)
{
	char want[256];
	int quoted = k->kind == CONF_STR || k->kind == CONF_MODE;

	if (k->kind == CONF_LIST || !k->def) {
		const char *open = k->kind == CONF_LIST ? "(" : "";
		snprintf(want, sizeof want, "\n%*s%s = %s", indent, "", k->name, open);
		if (strstr(text, want))
			return 1;
		snprintf(want, sizeof want, "\n%*s# %s = %s", indent, "", k->name, open);
		return strstr(text, want) != NULL;
	}
	snprintf(want, sizeof want, "\n%*s%s = %s%s%s;\n", indent, "", k->name,
	    quoted ? "\"" : "", k->def, quoted ? "\"" : "");
	return strstr(text, want) != NULL;
}

/* Appends to missing the rows the text lacks; groups are looked for as
 * "name = {" blocks, indented by two more spaces. */
static void
sample_check(const char *text, const struct conf_key *rows, int indent, const char *prefix,
    char *missing, size_t len)
{
	const struct conf_key *k;
	char pat[128], name[128];

	for (k = rows; k->name; k++) {
		if (k->flags & CONF_DERIVED)
			continue;
		snprintf(name, sizeof name, "%s%s", prefix, k->name);
		if (k->kind == CONF_GROUP) {
			const char *b, *e;
			char *block, sub[130];
			snprintf(pat, sizeof pat, "\n%*s%s = {\n", indent, "", k->name);
			b = strstr(text, pat);
			snprintf(pat, sizeof pat, "\n%*s};", indent, "");
			e = b ? strstr(b + 1, pat) : NULL;
			if (!b || !e) {
				snprintf(missing + strlen(missing), len - strlen(missing), " %s", name);
				continue;
			}
			block = strndup(b, e - b + 1);
			snprintf(sub, sizeof sub, "%s.", name);
			sample_check(block, k->sub, indent + 2, sub, missing, len);
			free(block);
		} else if (!sample_has_row(text, k, indent)) {
			snprintf(missing + strlen(missing), len - strlen(missing), " %s", name);
		}
	}
}

/* conf/sagad.conf says it holds every key with its default. */
static void
test_sample_has_every_key(void **state)
{
	const char *top = getenv("top_srcdir");
	char path[4096], missing[2048] = "";
	char *text;

	(void)state;
	snprintf(path, sizeof path, "%s/conf/sagad.conf", top ? top : ".");
	text = read_text(path);
	sample_check(text, conf_table_root(), 0, "", missing, sizeof missing);
	free(text);
	if (missing[0])
		fail_msg("%s lacks (or has another default for):%s", path, missing);
}

/* Appends to missing the element rows (nested lists too) that no
 * "name = " line of text sets. */
static void
examples_check(const char *text, const struct conf_key *rows, const char *prefix,
    char *missing, size_t len)
{
	const struct conf_key *k;
	char want[128];

	for (k = rows; k->name; k++) {
		if (k->flags & CONF_DERIVED || k->kind == CONF_KVS)
			continue;
		snprintf(want, sizeof want, " %s = ", k->name);
		if (!strstr(text, want))
			snprintf(missing + strlen(missing), len - strlen(missing), " %s.%s",
			    prefix, k->name);
		if (k->kind == CONF_LIST)
			examples_check(text, k->sub, k->name, missing, len);
	}
}

/* The keys of list elements are shown in the example files that
 * conf/sagad.conf points to. */
static void
test_examples_have_every_list_key(void **state)
{
	static const struct {
		const char *list;
		const char *files[3];
	} ex[] = {
		{ "exchanges", { "sagad.conf" } },
		{ "subscriptions", { "subscriptions.conf" } },
		{ "sagas", { "saga-orchestrated.conf", "saga-choreographed.conf",
			"saga-book-create-order.conf" } },
		{ "sources", { "source-sqlite.conf", "source-pgsql.conf" } },
		{ "transactions", { "transaction.conf" } },
	};
	const char *top = getenv("top_srcdir");
	char path[4096], missing[2048] = "";
	size_t i, j;

	(void)state;
	for (i = 0; i < sizeof ex / sizeof ex[0]; i++) {
		char *all = strdup("");
		for (j = 0; j < 3 && ex[i].files[j]; j++) {
			char *text, *both;
			snprintf(path, sizeof path, "%s/conf/%s", top ? top : ".", ex[i].files[j]);
			text = read_text(path);
			if (asprintf(&both, "%s%s", all, text) < 0)
				fail_msg("out of memory");
			free(all);
			free(text);
			all = both;
		}
		/* "{ name = ..." too: a space before every key */
		for (j = 0; all[j]; j++)
			if (all[j] == '\n' || all[j] == '\t' || all[j] == '{')
				all[j] = ' ';
		examples_check(all, conf_table_find(conf_table_root(), ex[i].list)->sub,
		    ex[i].list, missing, sizeof missing);
		free(all);
	}
	if (missing[0])
		fail_msg("the example files lack:%s", missing);
}

/* The sample file is valid, and its values are the defaults. */
static void
test_sample_loads(void **state)
{
	const char *top = getenv("top_srcdir");
	struct conf_errors e = { NULL, 0 };
	struct sagad_conf *c;
	char path[4096];

	(void)state;
	snprintf(path, sizeof path, "%s/conf/sagad.conf", top ? top : ".");
	c = conf_load(path, &e);
	conf_errors_clear(&e);
	assert_non_null(c);
	assert_string_equal(c->saga_queue_type, "quorum");
	assert_true(c->store.saga_retention == 604800);
	conf_free(c);
}

#define OLD \
	"service = \"orders\";\n" \
	"drain_timeout = 5;\n" \
	"broker = { url = \"amqp://guest:guest@127.0.0.1:5672/%2f\"; };\n" \
	"api = { listen = \"127.0.0.1:7600\"; max_message_bytes = 100; };\n" \
	"exchanges = ( { name = \"events\"; } );\n" \
	"subscriptions = ( { name = \"in\"; bind = [ \"events:#\" ]; deliver = \"http://h:1/m\"; } );\n" \
	"sources = ( { plugin = \"sqlite\"; path = \"/a.db\"; } );\n"

static void
test_reload_same_file(void **state)
{
	struct sagad_conf *oc = load_ok(OLD), *nc = load_ok(OLD);
	char changed[512];

	(void)state;
	assert_int_equal(conf_reload_keep(nc, oc, changed, sizeof changed), 0);
	assert_string_equal(changed, "");
	conf_free(oc);
	conf_free(nc);
}

/* Exactly the restart-only rows that changed are named; they keep the
 * running values (the same memory), the reloadable ones take the new. */
static void
test_reload_names_changed_rows(void **state)
{
	struct sagad_conf *oc = load_ok(OLD), *nc;
	const struct conf_source *sources = oc->sources;
	const struct conf_subscription *subs = oc->subs;
	const char *url = oc->broker.url;
	char changed[512];

	(void)state;
	nc = load_ok(
	    "service = \"orders\";\n"
	    "drain_timeout = 7;\n"
	    "broker = { url = \"amqp://guest:other@127.0.0.1:5672/%2f\"; heartbeat = 3; };\n"
	    "api = { listen = \"127.0.0.1:7700\"; max_message_bytes = 200; socket_mode = \"0600\"; };\n"
	    "exchanges = ( { name = \"events\"; type = \"fanout\"; } );\n"
	    "subscriptions = ( { name = \"in\"; bind = [ \"events:#\" ]; deliver = \"http://h:1/m\"; } );\n"
	    "sources = ( { plugin = \"sqlite\"; path = \"/b.db\"; } );\n");
	assert_int_equal(conf_reload_keep(nc, oc, changed, sizeof changed), 7);
	assert_string_equal(changed, "broker.url broker.heartbeat broker.password api.listen "
	    "api.socket_mode exchanges sources");
	/* restart-only: the running values, at the same addresses */
	assert_ptr_equal(nc->broker.url, url);
	assert_string_equal(nc->broker.password, "guest");
	assert_true(nc->broker.heartbeat == 10);
	assert_string_equal(nc->api.listen, "127.0.0.1:7600");
	assert_int_equal(nc->api.socket_mode, 0660);
	assert_string_equal(nc->exchanges[0].type, "topic");
	assert_ptr_equal(nc->sources, sources);
	assert_string_equal(nc->sources[0].kv[0].s, "/a.db");
	assert_ptr_equal(nc->subs, subs);
	/* reloadable: the new values */
	assert_true(nc->drain_timeout == 7);
	assert_int_equal(nc->api.max_message_bytes, 200);
	conf_free(oc);
	conf_free(nc);
}

/* A subscription changed inside, or the first saga (which adds the saga
 * engine's own subscription): named, kept. */
static void
test_reload_lists(void **state)
{
	struct sagad_conf *oc = load_ok(OLD), *nc;
	char changed[512];

	(void)state;
	nc = load_ok(
	    "service = \"orders\";\n"
	    "drain_timeout = 5;\n"
	    "exchanges = ( { name = \"events\"; } );\n"
	    "subscriptions = ( { name = \"in\"; bind = [ \"events:#\" ]; deliver = \"http://h:1/m\"; "
	    "timeout = 3; } );\n"
	    "sagas = ( { name = \"s\"; start = \"events:s.start\"; "
	    "steps = ( { name = \"a\"; command = \"events:a\"; } ); } );\n"
	    "sources = ( { plugin = \"sqlite\"; path = \"/a.db\"; } );\n");
	assert_int_equal(conf_reload_keep(nc, oc, changed, sizeof changed), 2);
	assert_string_equal(changed, "subscriptions sagas");
	assert_int_equal(nc->n_subs, 1);
	assert_true(nc->subs[0].timeout == 10);
	assert_int_equal(nc->n_sagas, 0);
	assert_null(nc->saga_queue);
	conf_free(oc);
	conf_free(nc);
}

/* Rows found by path carry their type, default and reload rule. */
static void
test_defaults_and_find(void **state)
{
	const struct conf_key *k = conf_table_find(conf_table_root(), "store.saga_retention");

	(void)state;
	assert_non_null(k);
	assert_int_equal(k->kind, CONF_DUR);
	assert_string_equal(k->def, "604800");
	assert_null(conf_table_find(conf_table_root(), "store.nope"));
	k = conf_table_find(conf_table_root(), "broker.tls.verify");
	assert_non_null(k);
	assert_true(k->flags & CONF_RESTART);
	k = conf_table_find(conf_table_root(), "api.token_file");
	assert_false(k->flags & CONF_RESTART);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_sample_has_every_key),
		cmocka_unit_test(test_sample_loads),
		cmocka_unit_test(test_examples_have_every_list_key),
		cmocka_unit_test(test_reload_same_file),
		cmocka_unit_test(test_reload_names_changed_rows),
		cmocka_unit_test(test_reload_lists),
		cmocka_unit_test(test_defaults_and_find),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
