/* Unit tests for src/conf.c: defaults, validation, FILE:LINE errors, includes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <ftw.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "conf.h"

#define NAME "main.conf"
#define SVC "service = \"orders\";\n"	/* line 1 of most texts */

/* ---- helpers ---- */

static void
dump_errors(const struct conf_errors *e)
{
	size_t i;

	for (i = 0; i < e->n; i++)
		print_error("  conf error: %s\n", e->msg[i]);
}

static struct sagad_conf *
load_ok(const char *text)
{
	struct conf_errors e = { NULL, 0 };
	struct sagad_conf *c = conf_load_string(text, NAME, ".", &e);

	if (!c || e.n) {
		dump_errors(&e);
		conf_errors_clear(&e);
		conf_free(c);
		fail_msg("valid configuration rejected:\n%s", text);
	}
	return c;
}

/* Exactly one error, "main.conf:LINE: ...needle...". */
static void
expect_error(const char *text, int line, const char *needle)
{
	struct conf_errors e = { NULL, 0 };
	struct sagad_conf *c = conf_load_string(text, NAME, ".", &e);
	char prefix[64];

	snprintf(prefix, sizeof prefix, NAME ":%d: ", line);
	if (c) {
		conf_free(c);
		fail_msg("invalid configuration accepted:\n%s", text);
	}
	if (e.n != 1 || strncmp(e.msg[0], prefix, strlen(prefix)) != 0 ||
	    !strstr(e.msg[0], needle)) {
		dump_errors(&e);
		conf_errors_clear(&e);
		fail_msg("want one error \"%s...%s...\" for:\n%s", prefix, needle, text);
	}
	conf_errors_clear(&e);
	assert_null(e.msg);
	assert_int_equal(e.n, 0);
}

struct tmp {
	char dir[64];
};

static int
setup_tmp(void **state)
{
	struct tmp *t = calloc(1, sizeof *t);
	char sub[128];

	snprintf(t->dir, sizeof t->dir, "/tmp/sagad-test-conf-XXXXXX");
	if (!mkdtemp(t->dir)) {
		free(t);
		return -1;
	}
	snprintf(sub, sizeof sub, "%s/conf.d", t->dir);
	mkdir(sub, 0700);
	*state = t;
	return 0;
}

static int
rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
	(void)sb;
	(void)flag;
	(void)ftw;
	return remove(path);
}

static int
teardown_tmp(void **state)
{
	struct tmp *t = *state;

	nftw(t->dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
	free(t);
	return 0;
}

/* Writes dir/name; returns the full path in a static buffer. */
static const char *
write_file(const struct tmp *t, const char *name, const char *text)
{
	static char path[256];
	FILE *f;

	snprintf(path, sizeof path, "%s/%s", t->dir, name);
	f = fopen(path, "w");
	assert_non_null(f);
	fputs(text, f);
	fclose(f);
	return path;
}

/* ---- valid configurations ---- */

static void
test_defaults(void **state)
{
	struct sagad_conf *c = load_ok(SVC);

	(void)state;
	assert_string_equal(c->file, NAME);
	assert_string_equal(c->service, "orders");
	assert_null(c->user);
	assert_true(c->drain_timeout == 10);
	assert_int_equal(c->outbox.max_inflight, 1024);
	assert_true(c->outbox.retry_initial == 0.1);
	assert_true(c->outbox.retry_max == 30);
	assert_string_equal(c->api.listen, "127.0.0.1:7600");
	assert_string_equal(c->api.admin_listen, "127.0.0.1:7601");
	assert_null(c->api.token_file);
	assert_null(c->api.token);
	assert_int_equal(c->api.max_message_bytes, 1048576);
	assert_string_equal(c->store.path, "/var/lib/sagad/orders.db");
	assert_int_equal(c->store.max_bytes, 1073741824);
	assert_true(c->store.dedup_window == 604800);
	/* the default url, parsed */
	assert_string_equal(c->broker.host, "127.0.0.1");
	assert_int_equal(c->broker.port, 5672);
	assert_string_equal(c->broker.user, "guest");
	assert_string_equal(c->broker.password, "guest");
	assert_string_equal(c->broker.vhost, "/");
	assert_int_equal(c->broker.tls, 0);
	assert_true(c->broker.heartbeat == 10);
	assert_true(c->broker.connect_timeout == 5);
	assert_int_equal(c->n_exchanges, 0);
	assert_null(conf_exchange(c, "events"));
	conf_free(c);
}

static void
test_full_config(void **state)
{
	struct sagad_conf *c;
	const struct conf_exchange *x;

	(void)state;
	c = load_ok(
	    "# a comment\n"
	    "service = \"billing\";\n"
	    "user = \"root\";\n"
	    "drain_timeout = 2.5;\n"
	    "broker = {\n"
	    "  url = \"amqp://alice:s3cret@rabbit.example:5673/prod%2fx\";\n"
	    "  heartbeat = 30;\n"
	    "  connect_timeout = 0.5;\n"
	    "};\n"
	    "store = { path = \"/data/b.db\"; max_bytes = 1048576; dedup_window = 3600; };\n"
	    "api = {\n"
	    "  listen = \"unix:/run/sagad/billing.sock\";\n"
	    "  admin_listen = \"0.0.0.0:9000\";\n"
	    "  max_message_bytes = 4096;\n"
	    "  socket_mode = \"0600\";\n"
	    "  admin_allow_remote = true;\n"
	    "};\n"
	    "outbox = { max_inflight = 8; retry_initial = 0.25; retry_max = 5; };\n"
	    "exchanges = (\n"
	    "  { name = \"events\"; type = \"topic\"; },\n"
	    "  { name = \"commands\"; type = \"direct\"; },\n"
	    "  { name = \"broadcast\"; type = \"fanout\"; },\n"
	    "  { name = \"defaulted\"; }\n"
	    ");\n");
	assert_string_equal(c->service, "billing");
	assert_string_equal(c->user, "root");
	assert_true(c->drain_timeout == 2.5);
	assert_string_equal(c->broker.url, "amqp://alice:s3cret@rabbit.example:5673/prod%2fx");
	assert_string_equal(c->broker.host, "rabbit.example");
	assert_int_equal(c->broker.port, 5673);
	assert_string_equal(c->broker.user, "alice");
	assert_string_equal(c->broker.password, "s3cret");
	assert_string_equal(c->broker.vhost, "prod/x");
	assert_int_equal(c->broker.tls, 0);
	assert_true(c->broker.heartbeat == 30);
	assert_true(c->broker.connect_timeout == 0.5);
	assert_string_equal(c->store.path, "/data/b.db");
	assert_int_equal(c->store.max_bytes, 1048576);
	assert_true(c->store.dedup_window == 3600);
	assert_string_equal(c->api.listen, "unix:/run/sagad/billing.sock");
	assert_string_equal(c->api.admin_listen, "0.0.0.0:9000");
	assert_int_equal(c->api.max_message_bytes, 4096);
	assert_int_equal(c->api.socket_mode, 0600);
	assert_int_equal(c->api.admin_allow_remote, 1);
	assert_int_equal(c->outbox.max_inflight, 8);
	assert_true(c->outbox.retry_initial == 0.25);
	assert_true(c->outbox.retry_max == 5);
	assert_int_equal(c->n_exchanges, 4);
	x = conf_exchange(c, "events");
	assert_non_null(x);
	assert_string_equal(x->type, "topic");
	x = conf_exchange(c, "commands");
	assert_non_null(x);
	assert_string_equal(x->name, "commands");
	assert_string_equal(x->type, "direct");
	assert_string_equal(conf_exchange(c, "broadcast")->type, "fanout");
	assert_string_equal(conf_exchange(c, "defaulted")->type, "topic");
	assert_null(conf_exchange(c, "Events"));
	assert_null(conf_exchange(c, "event"));
	assert_null(conf_exchange(c, ""));
	conf_free(c);
}

static void
test_url_variants(void **state)
{
	struct sagad_conf *c;

	(void)state;
	c = load_ok(SVC "broker = { url = \"amqps://u:p@secure.example/v1\"; };\n");
	assert_int_equal(c->broker.tls, 1);
	assert_int_equal(c->broker.port, 5671);
	assert_string_equal(c->broker.host, "secure.example");
	assert_string_equal(c->broker.vhost, "v1");
	conf_free(c);

	c = load_ok(SVC "broker = { url = \"amqp://rabbit\"; };\n");
	assert_int_equal(c->broker.tls, 0);
	assert_int_equal(c->broker.port, 5672);
	assert_string_equal(c->broker.host, "rabbit");
	assert_string_equal(c->broker.vhost, "/");
	conf_free(c);

	c = load_ok(SVC "broker = { url = \"amqp://bob@rabbit:1234/%2f\"; };\n");
	assert_string_equal(c->broker.user, "bob");
	assert_int_equal(c->broker.port, 1234);
	assert_string_equal(c->broker.vhost, "/");
	conf_free(c);
}

static void
test_listen_variants(void **state)
{
	struct sagad_conf *c;

	(void)state;
	c = load_ok(SVC "api = { listen = \"[::1]:7600\"; admin_listen = \"localhost:0\"; };\n");
	assert_string_equal(c->api.listen, "[::1]:7600");
	assert_string_equal(c->api.admin_listen, "localhost:0");
	conf_free(c);
}

static void
test_password_file(void **state)
{
	const struct tmp *t = *state;
	struct sagad_conf *c;
	char text[512];
	const char *pw = write_file(t, "broker.pw", "from-file\n");

	snprintf(text, sizeof text, SVC
	    "broker = {\n  url = \"amqp://svc@rabbit/%%2f\";\n  password_file = \"%s\";\n};\n", pw);
	c = load_ok(text);
	assert_string_equal(c->broker.user, "svc");
	assert_string_equal(c->broker.password, "from-file");
	/* the url as written stays without a password */
	assert_string_equal(c->broker.url, "amqp://svc@rabbit/%2f");
	conf_free(c);
}

static void
test_token_file(void **state)
{
	const struct tmp *t = *state;
	struct sagad_conf *c;
	char text[512];
	const char *tok = write_file(t, "token", "t0ken-value\n");

	snprintf(text, sizeof text, SVC "api = { token_file = \"%s\"; };\n", tok);
	c = load_ok(text);
	assert_string_equal(c->api.token, "t0ken-value");
	assert_string_equal(c->api.token_file, tok);
	conf_free(c);
}

/* ---- errors, each with its FILE:LINE ---- */

/* The saga engine's own queue: quorum unless saga_queue_type says classic. */
static void
test_saga_queue_type(void **state)
{
	static const char saga[] =
	    "sagas = ( { name = \"s\"; mode = \"orchestrated\"; start = \"events:a.created\";\n"
	    "  steps = ( { name = \"one\"; command = \"commands:a.do\"; } ); } );\n";
	char text[1024];
	struct sagad_conf *c;
	size_t i;
	int seen = 0;

	(void)state;
	snprintf(text, sizeof text, SVC "exchanges = ( { name = \"events\"; type = \"topic\"; },"
	    " { name = \"commands\"; type = \"topic\"; } );\n%s", saga);
	c = load_ok(text);
	for (i = 0; i < c->n_subs; i++)
		if (c->subs[i].internal) {
			assert_string_equal(c->subs[i].queue_type, "quorum");
			seen = 1;
		}
	assert_true(seen);
	conf_free(c);
	snprintf(text, sizeof text, SVC "exchanges = ( { name = \"events\"; type = \"topic\"; },"
	    " { name = \"commands\"; type = \"topic\"; } );\n%ssaga_queue_type = \"classic\";\n", saga);
	c = load_ok(text);
	for (i = 0; i < c->n_subs; i++)
		if (c->subs[i].internal)
			assert_string_equal(c->subs[i].queue_type, "classic");
	conf_free(c);
	expect_error(SVC "saga_queue_type = \"fast\";\n", 2, "saga_queue_type must be quorum or classic");
}

#define SUB(extra) SVC "exchanges = ({ name = \"events\"; });\n" \
	"subscriptions = ({ name = \"in\"; bind = [\"events:a.#\"];\n" \
	"  deliver = \"http://127.0.0.1:8080/m\";" extra " });\n"

/* The backlog and the broker prefetch follow concurrency unless set. */
static void
test_subscription_flow_keys(void **state)
{
	struct sagad_conf *c;

	(void)state;
	c = load_ok(SUB(""));
	assert_int_equal(c->subs[0].concurrency, 16);
	assert_int_equal(c->subs[0].max_pending, 64);
	assert_int_equal(c->subs[0].prefetch, 32);
	conf_free(c);
	c = load_ok(SUB(" concurrency = 100;"));
	assert_int_equal(c->subs[0].max_pending, 400);
	assert_int_equal(c->subs[0].prefetch, 200);
	conf_free(c);
	c = load_ok(SUB(" concurrency = 128; prefetch = 100; max_pending = 1000;"));
	assert_int_equal(c->subs[0].max_pending, 1000);
	assert_int_equal(c->subs[0].prefetch, 100);
	conf_free(c);
	expect_error(SUB(" prefetch = 0;"), 4, "'prefetch' must be between 1 and 65535");
	expect_error(SUB(" prefetch = 65536;"), 4, "'prefetch' must be between 1 and 65535");
}

static void
test_err_unknown_top_key(void **state)
{
	(void)state;
	expect_error(SVC "\n# comment\nbogus = 1;\n", 4, "unknown key 'bogus'");
}

static void
test_err_unknown_group_keys(void **state)
{
	(void)state;
	expect_error(SVC "broker = {\n  url = \"amqp://h\";\n  hartbeat = 3;\n};\n", 4,
	    "unknown key 'hartbeat' in 'broker'");
	expect_error(SVC "store = {\n  pth = \"/x.db\";\n};\n", 3,
	    "unknown key 'pth' in 'store'");
	expect_error(SVC "api = { listen = \"127.0.0.1:1\";\n\n  tokenfile = \"x\"; };\n", 4,
	    "unknown key 'tokenfile' in 'api'");
	expect_error(SVC "outbox = {\n max_in_flight = 3;\n};\n", 3,
	    "unknown key 'max_in_flight' in 'outbox'");
	expect_error(SVC "broker = {\n url = \"amqps://h\";\n tls = {\n  ca = \"/dev/null\";\n  verfy = true;\n };\n};\n", 6,
	    "unknown key 'verfy' in 'tls'");
	expect_error(SVC "exchanges = (\n  { name = \"events\";\n    kind = \"topic\"; }\n);\n", 4,
	    "unknown key 'kind' in 'exchange'");
}

static void
test_err_wrong_types(void **state)
{
	(void)state;
	expect_error(SVC "outbox = {\n  max_inflight = \"5\";\n};\n", 3,
	    "'max_inflight' must be a number");
	expect_error(SVC "\ndrain_timeout = \"10\";\n", 3, "'drain_timeout' must be a number");
	expect_error(SVC "\nuser = 5;\n", 3, "'user' must be a string");
	expect_error(SVC "store = 5;\n", 2, "'store' must be a group");
	{
		/* a service of the wrong type: that error comes first */
		struct conf_errors e = { NULL, 0 };
		assert_null(conf_load_string("service = 5;\n", NAME, ".", &e));
		assert_true(e.n >= 1);
		assert_string_equal(e.msg[0], NAME ":1: 'service' must be a string");
		conf_errors_clear(&e);
	}
	expect_error(SVC "api = {\n  admin_allow_remote = 1;\n};\n", 3, "true or false");
	expect_error(SVC "store = {\n  max_bytes = 100000.5;\n};\n", 3, "whole number");
	expect_error(SVC "outbox = {\n  max_inflight = 3.5;\n};\n", 3, "whole number");
	expect_error(SVC "api = {\n  socket_mode = \"0999\";\n};\n", 3, "octal");
	expect_error(SVC "exchanges = (\n  { name = \"x\"; type = 5; }\n);\n", 3, "'type' must be a string");
	expect_error(SVC "exchanges = \"events\";\n", 2, "'exchanges' must be a list");
}

static void
test_err_out_of_range(void **state)
{
	(void)state;
	expect_error(SVC "outbox = {\n  max_inflight = 0;\n};\n", 3,
	    "'max_inflight' must be between 1 and 65535");
	expect_error(SVC "outbox = {\n  max_inflight = 65536;\n};\n", 3,
	    "'max_inflight' must be between");
	expect_error(SVC "drain_timeout = -1;\n", 2, "'drain_timeout' must be between");
	expect_error(SVC "store = {\n  max_bytes = 1000;\n};\n", 3, "'max_bytes' must be between");
	expect_error(SVC "outbox = {\n  retry_initial = 10;\n  retry_max = 1;\n};\n", 2,
	    "retry_max is below retry_initial");
}

static void
test_err_missing_service(void **state)
{
	struct conf_errors e = { NULL, 0 };
	struct sagad_conf *c;

	(void)state;
	c = conf_load_string("drain_timeout = 3;\n", NAME, ".", &e);
	assert_null(c);
	assert_int_equal(e.n, 1);
	/* no line holds the missing key: the file is named all the same */
	assert_true(strncmp(e.msg[0], NAME ":", strlen(NAME ":")) == 0);
	assert_non_null(strstr(e.msg[0], "missing required key 'service'"));
	conf_errors_clear(&e);
	/* an empty file too */
	c = conf_load_string("", NAME, ".", &e);
	assert_null(c);
	assert_int_equal(e.n, 1);
	assert_non_null(strstr(e.msg[0], "'service'"));
	conf_errors_clear(&e);
}

static void
test_err_bad_service_name(void **state)
{
	(void)state;
	expect_error("\nservice = \"my service\";\n", 2, "'service' must be");
}

static void
test_err_url_scheme(void **state)
{
	(void)state;
	expect_error(SVC "broker = {\n  heartbeat = 5;\n  url = \"http://rabbit:5672/\";\n};\n", 4,
	    "broker url entry 1 (http://rabbit:5672/) must start with amqp:// or amqps://");
	expect_error(SVC "broker = {\n  url = \"rabbit:5672\";\n};\n", 3,
	    "must start with amqp://");
}

static void
test_err_url_malformed(void **state)
{
	(void)state;
	expect_error(SVC "broker = {\n  url = \"amqp://u:p@rabbit:notaport/v\";\n};\n", 3,
	    "broker url entry 1 (amqp://u:***@rabbit:notaport/v) is malformed");
	expect_error(SVC "broker = {\n\n  url = \"amqp://u:p@rabbit:99999/v\";\n};\n", 4,
	    "is malformed");
}

/* A list of nodes: every entry checked, the bad one named; the first
 * fills the derived keys; a password_file excludes passwords in any. */
static void
test_url_list(void **state)
{
	const struct tmp *t = *state;
	struct sagad_conf *c;
	char text[512];
	const char *pw = write_file(t, "broker.pw", "pw\n");

	c = load_ok(SVC "broker = { url = \"amqp://u:p@r1:5673/v , amqps://u:p@r2/v,"
	    "amqp://r3\"; };\n");
	assert_string_equal(c->broker.host, "r1");
	assert_int_equal(c->broker.port, 5673);
	assert_true(c->broker.tls);
	conf_free(c);
	expect_error(SVC "broker = {\n  url = \"amqp://u:p@r1/v, amqp://u:secret@r2:x/v\";\n};\n",
	    3, "broker url entry 2 (amqp://u:***@r2:x/v) is malformed");
	expect_error(SVC "broker = {\n  url = \"amqp://r1/v,,amqp://r3/v\";\n};\n", 3,
	    "broker url entry 2 is empty");
	snprintf(text, sizeof text, SVC "broker = {\n  url = \"amqp://u@r1/, amqp://u:x@r2/\";\n"
	    "  password_file = \"%s\";\n};\n", pw);
	expect_error(text, 4, "(url entry 2 has one)");
}

static void
test_err_password_twice(void **state)
{
	const struct tmp *t = *state;
	char text[512];
	const char *pw = write_file(t, "broker.pw", "pw\n");

	snprintf(text, sizeof text, SVC
	    "broker = {\n  url = \"amqp://u:inurl@rabbit/\";\n  password_file = \"%s\";\n};\n", pw);
	expect_error(text, 4, "either in the url or in password_file, not both");
}

static void
test_err_password_file_unreadable(void **state)
{
	const struct tmp *t = *state;
	char text[512];

	snprintf(text, sizeof text, SVC
	    "broker = {\n  url = \"amqp://u@rabbit/\";\n  password_file = \"%s/nope\";\n};\n", t->dir);
	expect_error(text, 4, "cannot read password_file");
}

static void
test_err_token_file_unreadable(void **state)
{
	const struct tmp *t = *state;
	char text[512];

	snprintf(text, sizeof text, SVC "api = {\n  listen = \"127.0.0.1:1\";\n"
	    "  token_file = \"%s/no-such-token\";\n};\n", t->dir);
	expect_error(text, 4, "cannot read a token from");
	/* an empty token file is no token either */
	snprintf(text, sizeof text, SVC "api = {\n  token_file = \"%s\";\n};\n",
	    write_file(t, "empty-token", "\n"));
	expect_error(text, 3, "cannot read a token from");
}

static void
test_err_syntax(void **state)
{
	(void)state;
	expect_error(SVC "drain_timeout = 3;\nbroker = {\n  url = = \"amqp://h\";\n};\n", 4,
	    "syntax error");
	/* an unclosed group: the error is at the end of the file */
	expect_error(SVC "broker = {\n  url = \"amqp://h\";\n\n", 5, "syntax error");
}

static void
test_err_exchange_type(void **state)
{
	(void)state;
	expect_error(SVC "exchanges = (\n  { name = \"events\"; type = \"topic\"; },\n"
	    "  { name = \"odd\"; type = \"x-delayed\"; }\n);\n", 4,
	    "exchange 'odd': type must be direct, topic, fanout or headers");
}

static void
test_err_exchange_duplicate(void **state)
{
	(void)state;
	expect_error(SVC "exchanges = (\n  { name = \"events\"; },\n  { name = \"commands\"; },\n"
	    "  { name = \"events\"; type = \"fanout\"; }\n);\n", 5,
	    "exchange 'events' is declared twice");
}

static void
test_err_exchange_name(void **state)
{
	(void)state;
	expect_error(SVC "exchanges = (\n  { name = \"amq.mine\"; }\n);\n", 3, "bad exchange name");
	expect_error(SVC "exchanges = (\n  { name = \"has space\"; }\n);\n", 3, "bad exchange name");
	expect_error(SVC "exchanges = (\n  { type = \"topic\"; }\n);\n", 3, "exchange without a 'name'");
	expect_error(SVC "exchanges = (\n  \"events\" );\n", 3, "must be a group");
}

static void
test_err_listen(void **state)
{
	(void)state;
	expect_error(SVC "api = {\n  listen = \"nope\";\n};\n", 3,
	    "'listen' must be HOST:PORT or unix:/path");
	expect_error(SVC "api = {\n  listen = \"127.0.0.1:\";\n};\n", 3, "'listen' must be");
	expect_error(SVC "api = {\n  listen = \"127.0.0.1:70000\";\n};\n", 3, "'listen' must be");
	expect_error(SVC "api = {\n  listen = \"127.0.0.1:http\";\n};\n", 3, "'listen' must be");
	expect_error(SVC "api = {\n  listen = \":7600\";\n};\n", 3, "'listen' must be");
	expect_error(SVC "api = {\n  listen = \"unix:relative.sock\";\n};\n", 3, "'listen' must be");
	expect_error(SVC "api = {\n\n  admin_listen = \"localhost\";\n};\n", 4,
	    "'admin_listen' must be HOST:PORT or unix:/path");
	/* Hostile brackets: refused, never trimmed into some address. */
	expect_error(SVC "api = {\n  admin_listen = \"[:7601\";\n};\n", 3, "'admin_listen' must be");
	expect_error(SVC "api = {\n  admin_listen = \"[]:7601\";\n};\n", 3, "'admin_listen' must be");
	expect_error(SVC "api = {\n  admin_listen = \"]:7601\";\n};\n", 3, "'admin_listen' must be");
	expect_error(SVC "api = {\n  listen = \"[::1:7600\";\n};\n", 3, "'listen' must be");
	expect_error(SVC "api = {\n  listen = \":\";\n};\n", 3, "'listen' must be");
}

static void
test_err_unknown_user(void **state)
{
	(void)state;
	expect_error(SVC "\nuser = \"no-such-user-sagad-test\";\n", 3,
	    "unknown user 'no-such-user-sagad-test'");
}

static void
test_err_admin_listen_remote(void **state)
{
	struct sagad_conf *c;

	(void)state;
	expect_error(SVC "api = {\n  admin_listen = \"0.0.0.0:7601\";\n};\n", 3,
	    "admin_allow_remote");
	c = load_ok(SVC "api = {\n  admin_listen = \"0.0.0.0:7601\";\n  admin_allow_remote = true;\n};\n");
	assert_string_equal(c->api.admin_listen, "0.0.0.0:7601");
	conf_free(c);
}

static void
test_err_tls_needs_amqps(void **state)
{
	(void)state;
	expect_error(SVC "broker = {\n  url = \"amqp://h\";\n  tls = { ca = \"/dev/null\"; };\n};\n", 4,
	    "amqps://");
}

static void
test_errors_collected(void **state)
{
	struct conf_errors e = { NULL, 0 };
	struct sagad_conf *c;

	(void)state;
	c = conf_load_string(SVC "bogus = 1;\nouter = 2;\noutbox = {\n  max_inflight = 0;\n};\n",
	    NAME, ".", &e);
	assert_null(c);
	assert_int_equal(e.n, 3);
	assert_true(strncmp(e.msg[0], NAME ":2: ", 12) == 0);
	assert_non_null(strstr(e.msg[0], "'bogus'"));
	assert_true(strncmp(e.msg[1], NAME ":3: ", 12) == 0);
	assert_non_null(strstr(e.msg[1], "'outer'"));
	assert_true(strncmp(e.msg[2], NAME ":5: ", 12) == 0);
	assert_non_null(strstr(e.msg[2], "max_inflight"));
	conf_errors_clear(&e);
	assert_int_equal(e.n, 0);
	conf_errors_clear(&e);		/* twice is harmless */
}

/* ---- files and includes ---- */

static void
test_load_file(void **state)
{
	const struct tmp *t = *state;
	struct conf_errors e = { NULL, 0 };
	struct sagad_conf *c;
	char path[256];

	snprintf(path, sizeof path, "%s", write_file(t, "sagad.conf",
	    SVC "drain_timeout = 4;\n"));
	c = conf_load(path, &e);
	assert_non_null(c);
	assert_int_equal(e.n, 0);
	assert_string_equal(c->file, path);
	assert_true(c->drain_timeout == 4);
	conf_free(c);
}

/* libconfig 1.5 wraps plain integer literals to 32 bits; sagad re-reads
 * the literal so that 5 GiB stays 5 GiB and an overflow is not a small
 * number in range. */
static void
test_large_sizes_are_not_wrapped(void **state)
{
	const struct tmp *t = *state;
	struct conf_errors e = { NULL, 0 };
	struct sagad_conf *c;
	char path[256];

	snprintf(path, sizeof path, "%s", write_file(t, "sagad.conf",
	    SVC "store = {\n  max_bytes = 5368709120;\n};\n"));
	c = conf_load(path, &e);
	assert_non_null(c);
	assert_true(c->store.max_bytes == INT64_C(5368709120));
	conf_free(c);
	snprintf(path, sizeof path, "%s", write_file(t, "sagad2.conf",
	    SVC "outbox = { max_inflight = 4294967297; };\n"));
	assert_null(conf_load(path, &e));
	assert_int_equal(e.n, 1);
	assert_non_null(strstr(e.msg[0], "'max_inflight' must be between"));
	conf_errors_clear(&e);
}

static void
test_load_file_error_names_it(void **state)
{
	const struct tmp *t = *state;
	struct conf_errors e = { NULL, 0 };
	char path[256], want[300];

	snprintf(path, sizeof path, "%s", write_file(t, "sagad.conf",
	    SVC "\n\nbogus = true;\n"));
	assert_null(conf_load(path, &e));
	assert_int_equal(e.n, 1);
	snprintf(want, sizeof want, "%s:4: unknown key 'bogus'", path);
	assert_string_equal(e.msg[0], want);
	conf_errors_clear(&e);
}

static void
test_load_missing_file(void **state)
{
	const struct tmp *t = *state;
	struct conf_errors e = { NULL, 0 };
	char path[256];

	snprintf(path, sizeof path, "%s/absent.conf", t->dir);
	assert_null(conf_load(path, &e));
	assert_int_equal(e.n, 1);
	assert_true(strncmp(e.msg[0], path, strlen(path)) == 0);
	assert_int_equal(e.msg[0][strlen(path)], ':');
	conf_errors_clear(&e);
}

static void
test_include_literal(void **state)
{
	const struct tmp *t = *state;
	struct conf_errors e = { NULL, 0 };
	struct sagad_conf *c;
	char path[256];

	write_file(t, "conf.d/outbox.conf", "outbox = { max_inflight = 7; };\n");
	snprintf(path, sizeof path, "%s", write_file(t, "sagad.conf",
	    SVC "@include \"conf.d/outbox.conf\"\ndrain_timeout = 2;\n"));
	c = conf_load(path, &e);
	if (!c)
		dump_errors(&e);
	assert_non_null(c);
	assert_int_equal(c->outbox.max_inflight, 7);
	assert_true(c->drain_timeout == 2);
	conf_free(c);
	conf_errors_clear(&e);
}

static void
test_include_literal_error_in_included_file(void **state)
{
	const struct tmp *t = *state;
	struct conf_errors e = { NULL, 0 };
	char path[256];
	const char *colon;

	write_file(t, "conf.d/bad.conf", "# comment\n\nbogus_included = 1;\n");
	snprintf(path, sizeof path, "%s", write_file(t, "sagad.conf",
	    SVC "@include \"conf.d/bad.conf\"\n"));
	assert_null(conf_load(path, &e));
	assert_int_equal(e.n, 1);
	/* "<...>bad.conf:3: unknown key 'bogus_included'" */
	colon = strstr(e.msg[0], "bad.conf:3: ");
	if (!colon)
		fail_msg("error not reported in the included file: %s", e.msg[0]);
	assert_non_null(strstr(e.msg[0], "unknown key 'bogus_included'"));
	assert_null(strstr(e.msg[0], "sagad.conf"));
	conf_errors_clear(&e);
}

static void
test_include_glob(void **state)
{
	const struct tmp *t = *state;
	struct conf_errors e = { NULL, 0 };
	struct sagad_conf *c;
	char path[256];

	/* libconfig 1.5 puts its include dir in front of every path, even an
	 * absolute one: the generated list of matches must still be found. */
	write_file(t, "conf.d/10-exchanges.conf",
	    "exchanges = ( { name = \"events\"; }, { name = \"commands\"; type = \"direct\"; } );\n");
	write_file(t, "conf.d/20-outbox.conf", "outbox = { max_inflight = 9; };\n");
	write_file(t, "conf.d/ignored.txt", "bogus = 1;\n");
	snprintf(path, sizeof path, "%s", write_file(t, "sagad.conf",
	    SVC "@include \"conf.d/*.conf\"\ndrain_timeout = 1;\n"));
	c = conf_load(path, &e);
	if (!c)
		dump_errors(&e);
	assert_non_null(c);
	assert_int_equal(c->n_exchanges, 2);
	assert_non_null(conf_exchange(c, "events"));
	assert_string_equal(conf_exchange(c, "commands")->type, "direct");
	assert_int_equal(c->outbox.max_inflight, 9);
	assert_true(c->drain_timeout == 1);
	conf_free(c);
	conf_errors_clear(&e);
}

static void
test_include_glob_no_match(void **state)
{
	const struct tmp *t = *state;
	struct conf_errors e = { NULL, 0 };
	struct sagad_conf *c;
	char path[256];

	/* an empty conf.d is fine */
	snprintf(path, sizeof path, "%s", write_file(t, "sagad.conf",
	    SVC "@include \"conf.d/*.conf\"\n"));
	c = conf_load(path, &e);
	if (!c)
		dump_errors(&e);
	assert_non_null(c);
	assert_int_equal(c->n_exchanges, 0);
	conf_free(c);
	conf_errors_clear(&e);
}

static void
test_include_glob_error_in_included_file(void **state)
{
	const struct tmp *t = *state;
	struct conf_errors e = { NULL, 0 };
	char path[256];

	write_file(t, "conf.d/a.conf", "drain_timeout = 3;\n");
	write_file(t, "conf.d/b.conf", "# comment\nbogus_included = 1;\n");
	snprintf(path, sizeof path, "%s", write_file(t, "sagad.conf",
	    SVC "@include \"conf.d/*.conf\"\n"));
	assert_null(conf_load(path, &e));
	if (e.n != 1 || !strstr(e.msg[0], "b.conf:2: ") ||
	    !strstr(e.msg[0], "unknown key 'bogus_included'")) {
		dump_errors(&e);
		conf_errors_clear(&e);
		fail_msg("want one error at b.conf:2");
	}
	conf_errors_clear(&e);
}

static void
test_include_glob_relative_path(void **state)
{
	const struct tmp *t = *state;
	struct conf_errors e = { NULL, 0 };
	struct sagad_conf *c;
	char cwd[4096], sub[160];

	/* sagad -f etc/sagad.conf from another directory: the pattern is
	 * relative to the main file, not to the working directory */
	snprintf(sub, sizeof sub, "%s/etc", t->dir);
	assert_int_equal(mkdir(sub, 0700), 0);
	snprintf(sub, sizeof sub, "%s/etc/conf.d", t->dir);
	assert_int_equal(mkdir(sub, 0700), 0);
	write_file(t, "etc/conf.d/a.conf", "outbox = { max_inflight = 3; };\n");
	write_file(t, "etc/sagad.conf", SVC "@include \"conf.d/*.conf\"\n");
	assert_non_null(getcwd(cwd, sizeof cwd));
	assert_int_equal(chdir(t->dir), 0);
	c = conf_load("etc/sagad.conf", &e);
	assert_int_equal(chdir(cwd), 0);
	if (!c)
		dump_errors(&e);
	assert_non_null(c);
	assert_int_equal(c->outbox.max_inflight, 3);
	conf_free(c);
	conf_errors_clear(&e);
}

static void
test_load_string_without_include_dir(void **state)
{
	pid_t pid;
	int status;

	(void)state;
	/* conf.h offers the function for tests and fuzzing, where there is no
	 * include dir; libconfig 1.5 would strdup(NULL) if it were passed on.
	 * Run it in a child so that a crash is a failure, not the end. */
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		struct conf_errors e = { NULL, 0 };
		struct sagad_conf *c;
		int ok;

		/* die of the signal here, not in cmocka's handler */
		signal(SIGSEGV, SIG_DFL);
		signal(SIGABRT, SIG_DFL);
		c = conf_load_string(SVC, NAME, NULL, &e);
		ok = c && c->service && e.n == 0;
		conf_free(c);
		conf_errors_clear(&e);
		_exit(ok ? 0 : 1);
	}
	assert_int_equal(waitpid(pid, &status, 0), pid);
	if (WIFSIGNALED(status))
		fail_msg("conf_load_string with include_dir NULL died of signal %d",
		    WTERMSIG(status));
	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);
}

/* ---- saga_store ---- */

/* Lines 1-4: service, an exchange and one saga; saga_store from line 5. */
#define SAGA SVC "exchanges = ( { name = \"events\"; } );\n" \
	"sagas = ( { name = \"s\"; start = \"events:s.start\";\n" \
	"  steps = ( { name = \"one\"; command = \"events:s.one\"; } ); } );\n"

/* SAGA with a saga_store of backend and conninfo_file path (line 7). */
static const char *
store_file_conf(const char *backend, const char *path)
{
	static char text[1024];

	snprintf(text, sizeof text, SAGA "saga_store = {\n  backend = \"%s\";\n"
	    "  conninfo_file = \"%s\";\n};\n", backend, path);
	return text;
}

static void
test_saga_store_defaults(void **state)
{
	struct sagad_conf *c = load_ok(SVC);

	(void)state;
	assert_string_equal(c->saga_store.backend_name, "sqlite");
	assert_int_equal(c->saga_store.backend, SAGA_BACKEND_SQLITE);
	assert_null(c->saga_store.conninfo);
	assert_null(c->saga_store.conninfo_file);
	assert_string_equal(c->saga_store.schema, "sagad");
	assert_true(c->saga_store.relay_grace == 2);
	conf_free(c);
	/* sqlite written out, with sagas: the same */
	c = load_ok(SAGA "saga_store = { backend = \"sqlite\"; schema = \"other\"; };\n");
	assert_int_equal(c->saga_store.backend, SAGA_BACKEND_SQLITE);
	assert_null(c->saga_store.conninfo);
	conf_free(c);
}

static void
test_saga_store_pgsql(void **state)
{
	struct sagad_conf *c;

	(void)state;
	c = load_ok(SAGA "saga_store = {\n  backend = \"pgsql\";\n"
	    "  conninfo = \"host=/run/postgresql dbname=orders password=s3cret\";\n"
	    "  schema = \"Sagas of orders\";\n  relay_grace = 0.5;\n};\n");
	assert_string_equal(c->saga_store.backend_name, "pgsql");
	assert_int_equal(c->saga_store.backend, SAGA_BACKEND_PGSQL);
	assert_string_equal(c->saga_store.conninfo, "host=/run/postgresql dbname=orders password=s3cret");
	assert_null(c->saga_store.conninfo_file);
	assert_string_equal(c->saga_store.schema, "Sagas of orders");
	assert_true(c->saga_store.relay_grace == 0.5);
	conf_free(c);
	/* a URI, the longest schema name, the largest grace */
	c = load_ok(SAGA "saga_store = { backend = \"pgsql\"; conninfo = \"postgresql://u@db/orders\";\n"
	    "  schema = \"" "abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0" "\";"
	    " relay_grace = 3600; };\n");
	assert_string_equal(c->saga_store.conninfo, "postgresql://u@db/orders");
	assert_int_equal(strlen(c->saga_store.schema), 63);
	assert_true(c->saga_store.relay_grace == 3600);
	conf_free(c);
}

static void
test_saga_store_conninfo_file(void **state)
{
	const struct tmp *t = *state;
	struct sagad_conf *c;
	char path[256];

	snprintf(path, sizeof path, "%s", write_file(t, "pg.conninfo",
	    "host=db dbname=orders password=fromfile\n"));
	c = load_ok(store_file_conf("pgsql", path));
	assert_int_equal(c->saga_store.backend, SAGA_BACKEND_PGSQL);
	/* read into conninfo, the trailing newline stripped */
	assert_string_equal(c->saga_store.conninfo, "host=db dbname=orders password=fromfile");
	assert_string_equal(c->saga_store.conninfo_file, path);
	conf_free(c);
}

static void
test_err_saga_store_backend(void **state)
{
	(void)state;
	expect_error(SAGA "saga_store = {\n  backend = \"mysql\";\n};\n", 6,
	    "saga_store: backend must be \"sqlite\" or \"pgsql\"");
	expect_error(SAGA "saga_store = {\n  backend = \"\";\n};\n", 6, "backend must be");
	expect_error(SAGA "saga_store = {\n  backend = 1;\n};\n", 6, "backend");
	expect_error(SAGA "saga_store = {\n  bogus = 1;\n};\n", 6, "bogus");
}

/* pgsql: exactly one of conninfo and conninfo_file. */
static void
test_err_saga_store_conninfo(void **state)
{
	const struct tmp *t = *state;
	char text[1024];

	expect_error(SAGA "saga_store = {\n  backend = \"pgsql\";\n};\n", 6,
	    "saga_store: backend \"pgsql\" needs conninfo or conninfo_file");
	expect_error(SAGA "saga_store = {\n  backend = \"pgsql\";\n  conninfo = \"\";\n};\n", 7,
	    "saga_store: conninfo is empty");
	snprintf(text, sizeof text, SAGA "saga_store = {\n  backend = \"pgsql\";\n"
	    "  conninfo = \"host=db password=s3cret\";\n  conninfo_file = \"%s\";\n};\n",
	    write_file(t, "pg.conninfo", "host=db\n"));
	expect_error(text, 8, "saga_store: give conninfo or conninfo_file, not both");
	/* sqlite would ignore them: refused rather than ignored */
	expect_error(SAGA "saga_store = {\n  conninfo = \"host=db password=s3cret\";\n};\n", 6,
	    "saga_store: conninfo is for backend \"pgsql\" (backend is \"sqlite\")");
	expect_error(store_file_conf("sqlite", write_file(t, "pg.conninfo", "host=db\n")), 7,
	    "saga_store: conninfo_file is for backend \"pgsql\"");
	expect_error(SAGA "saga_store = {\n  backend = \"pgsql\";\n  conninfo = 5;\n};\n", 7,
	    "conninfo");
}

static void
test_err_saga_store_conninfo_file(void **state)
{
	const struct tmp *t = *state;
	char path[256];

	snprintf(path, sizeof path, "%s/missing", t->dir);
	expect_error(store_file_conf("pgsql", path), 7, "saga_store: cannot read conninfo_file");
	expect_error(store_file_conf("pgsql", path), 7, "/missing': No such file or directory");
	expect_error(store_file_conf("pgsql", write_file(t, "empty", "\n")), 7, "/empty' is empty");
	snprintf(path, sizeof path, "%s/conf.d", t->dir);
	expect_error(store_file_conf("pgsql", path), 7, "/conf.d': not a regular file");
	if (geteuid() != 0) {
		const char *p = write_file(t, "secret", "host=db\n");
		chmod(p, 0);
		expect_error(store_file_conf("pgsql", p), 7, "/secret': Permission denied");
	}
}

static void
test_err_saga_store_schema(void **state)
{
	(void)state;
	expect_error(SAGA "saga_store = {\n  schema = \"\";\n};\n", 6,
	    "saga_store: schema must be 1 to 63 bytes");
	expect_error(SAGA "saga_store = {\n  schema = \""
	    "abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz01" "\";\n};\n", 6,
	    "schema must be 1 to 63 bytes");
}

static void
test_err_saga_store_relay_grace(void **state)
{
	(void)state;
	expect_error(SAGA "saga_store = {\n  relay_grace = 0.1;\n};\n", 6,
	    "'relay_grace' must be between 0.5 and 3600");
	expect_error(SAGA "saga_store = {\n  relay_grace = 3601;\n};\n", 6,
	    "'relay_grace' must be between");
	expect_error(SAGA "saga_store = {\n  relay_grace = \"soon\";\n};\n", 6, "relay_grace");
}

/* pgsql stores sagas: a file without any, or without a service, is refused. */
static void
test_err_saga_store_nothing_to_store(void **state)
{
	struct conf_errors e = { NULL, 0 };

	(void)state;
	expect_error(SVC "saga_store = {\n  backend = \"pgsql\";\n  conninfo = \"host=db\";\n};\n", 3,
	    "saga_store: backend \"pgsql\" but no sagas are defined "
	    "and no subscription has dedup = \"shared\" (nothing to store)");
	assert_null(conf_load_string("saga_store = { backend = \"pgsql\"; conninfo = \"host=db\"; };\n"
	    "exchanges = ( { name = \"events\"; } );\n"
	    "sagas = ( { name = \"s\"; start = \"events:s.start\";\n"
	    "  steps = ( { name = \"one\"; command = \"events:s.one\"; } ); } );\n", NAME, ".", &e));
	assert_int_equal(e.n, 1);
	assert_non_null(strstr(e.msg[0], "missing required key 'service'"));
	conf_errors_clear(&e);
}

/* The conninfo may hold a password: no error shows it. */
static void
test_err_saga_store_hides_conninfo(void **state)
{
	const char *texts[] = {
		SAGA "saga_store = { backend = \"pgsql\"; conninfo = \"password=s3cret\"; "
		    "conninfo_file = \"/nonexistent\"; };\n",
		SAGA "saga_store = { backend = \"sqlite\"; conninfo = \"password=s3cret\"; };\n",
		SAGA "saga_store = { backend = \"pgsql\"; conninfo = \"password=s3cret\"; relay_grace = 0; };\n",
		SVC "saga_store = { backend = \"pgsql\"; conninfo = \"postgresql://u:s3cret@db/x\"; };\n",
	};
	size_t i, j;

	(void)state;
	for (i = 0; i < sizeof texts / sizeof *texts; i++) {
		struct conf_errors e = { NULL, 0 };
		assert_null(conf_load_string(texts[i], NAME, ".", &e));
		assert_true(e.n >= 1);
		for (j = 0; j < e.n; j++)
			if (strstr(e.msg[j], "s3cret"))
				fail_msg("an error shows the password: %s", e.msg[j]);
		conf_errors_clear(&e);
	}
}

/* Restart-only: a reload keeps the running values and names what changed;
 * the backend's enum follows its name quietly. */
static void
test_saga_store_reload(void **state)
{
	struct sagad_conf *oc = load_ok(SAGA), *nc;
	char changed[512];

	(void)state;
	nc = load_ok(SAGA "saga_store = { backend = \"pgsql\"; conninfo = \"host=db\";"
	    " schema = \"x\"; relay_grace = 9; };\n");
	assert_int_equal(conf_reload_keep(nc, oc, changed, sizeof changed), 4);
	assert_string_equal(changed, "saga_store.backend saga_store.conninfo "
	    "saga_store.schema saga_store.relay_grace");
	assert_int_equal(nc->saga_store.backend, SAGA_BACKEND_SQLITE);
	assert_string_equal(nc->saga_store.backend_name, "sqlite");
	assert_null(nc->saga_store.conninfo);
	assert_string_equal(nc->saga_store.schema, "sagad");
	assert_true(nc->saga_store.relay_grace == 2);
	conf_free(oc);
	conf_free(nc);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_defaults),
		cmocka_unit_test(test_full_config),
		cmocka_unit_test(test_url_variants),
		cmocka_unit_test(test_listen_variants),
		cmocka_unit_test_setup_teardown(test_password_file, setup_tmp, teardown_tmp),
		cmocka_unit_test_setup_teardown(test_token_file, setup_tmp, teardown_tmp),
		cmocka_unit_test(test_saga_queue_type),
		cmocka_unit_test(test_subscription_flow_keys),
		cmocka_unit_test(test_err_unknown_top_key),
		cmocka_unit_test(test_err_unknown_group_keys),
		cmocka_unit_test(test_err_wrong_types),
		cmocka_unit_test(test_err_out_of_range),
		cmocka_unit_test(test_err_missing_service),
		cmocka_unit_test(test_err_bad_service_name),
		cmocka_unit_test(test_err_url_scheme),
		cmocka_unit_test(test_err_url_malformed),
		cmocka_unit_test_setup_teardown(test_url_list, setup_tmp, teardown_tmp),
		cmocka_unit_test_setup_teardown(test_err_password_twice, setup_tmp, teardown_tmp),
		cmocka_unit_test_setup_teardown(test_err_password_file_unreadable, setup_tmp, teardown_tmp),
		cmocka_unit_test_setup_teardown(test_err_token_file_unreadable, setup_tmp, teardown_tmp),
		cmocka_unit_test(test_err_syntax),
		cmocka_unit_test(test_err_exchange_type),
		cmocka_unit_test(test_err_exchange_duplicate),
		cmocka_unit_test(test_err_exchange_name),
		cmocka_unit_test(test_err_listen),
		cmocka_unit_test(test_err_unknown_user),
		cmocka_unit_test(test_err_admin_listen_remote),
		cmocka_unit_test(test_err_tls_needs_amqps),
		cmocka_unit_test(test_errors_collected),
		cmocka_unit_test_setup_teardown(test_load_file, setup_tmp, teardown_tmp),
		cmocka_unit_test_setup_teardown(test_load_file_error_names_it, setup_tmp, teardown_tmp),
		cmocka_unit_test_setup_teardown(test_load_missing_file, setup_tmp, teardown_tmp),
		cmocka_unit_test_setup_teardown(test_include_literal, setup_tmp, teardown_tmp),
		cmocka_unit_test_setup_teardown(test_include_literal_error_in_included_file, setup_tmp, teardown_tmp),
		cmocka_unit_test_setup_teardown(test_include_glob, setup_tmp, teardown_tmp),
		cmocka_unit_test_setup_teardown(test_include_glob_no_match, setup_tmp, teardown_tmp),
		cmocka_unit_test_setup_teardown(test_include_glob_error_in_included_file, setup_tmp, teardown_tmp),
		cmocka_unit_test_setup_teardown(test_include_glob_relative_path, setup_tmp, teardown_tmp),
		cmocka_unit_test(test_load_string_without_include_dir),
		cmocka_unit_test(test_saga_store_defaults),
		cmocka_unit_test(test_saga_store_pgsql),
		cmocka_unit_test_setup_teardown(test_saga_store_conninfo_file, setup_tmp, teardown_tmp),
		cmocka_unit_test(test_err_saga_store_backend),
		cmocka_unit_test_setup_teardown(test_err_saga_store_conninfo, setup_tmp, teardown_tmp),
		cmocka_unit_test_setup_teardown(test_err_saga_store_conninfo_file, setup_tmp, teardown_tmp),
		cmocka_unit_test(test_err_saga_store_schema),
		cmocka_unit_test(test_err_saga_store_relay_grace),
		cmocka_unit_test(test_err_saga_store_nothing_to_store),
		cmocka_unit_test(test_err_saga_store_hides_conninfo),
		cmocka_unit_test(test_saga_store_reload),
		cmocka_unit_test_setup_teardown(test_large_sizes_are_not_wrapped, setup_tmp, teardown_tmp),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
