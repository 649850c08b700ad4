/*
 * Fuzz target: the configuration parser (conf_load_string: libconfig syntax,
 * @include rewriting, every key's validation, FILE:LINE errors).
 *
 * Input: the text of a configuration file. Includes resolve in a private
 * directory holding two small files (inc/exchanges.conf, inc/sagas.conf);
 * inputs that would make the parser read outside it (absolute or ".."
 * include paths, /dev, /proc, /sys) are skipped, since reading /dev/zero
 * or a terminal would only hang the fuzzer.
 *
 * Checks: no crash, leak or undefined behaviour; a failed load reports at
 * least one error and each error looks like "FILE:LINE: message"; a loaded
 * configuration has what sagad relies on (service, listeners, store path,
 * sagas with steps whose bindings name exchanges) and classifies each
 * saga's own start event as a start.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "conf.h"
#include "props.h"
#include "saga.h"

#include "fuzz_common.h"

static char include_dir[64];

static void
fuzz_conf_cleanup(void)
{
	char p[128];

	snprintf(p, sizeof p, "%s/inc/exchanges.conf", include_dir);
	unlink(p);
	snprintf(p, sizeof p, "%s/inc/sagas.conf", include_dir);
	unlink(p);
	snprintf(p, sizeof p, "%s/inc", include_dir);
	rmdir(p);
	rmdir(include_dir);
}

static void
fuzz_write(const char *dir, const char *name, const char *text)
{
	char p[128];
	FILE *f;

	snprintf(p, sizeof p, "%s/%s", dir, name);
	if (!(f = fopen(p, "w")))
		abort();
	fputs(text, f);
	fclose(f);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	char p[128];

	(void)argc;
	(void)argv;
	snprintf(include_dir, sizeof include_dir, "/tmp/sagad-fuzz-conf-XXXXXX");
	if (!mkdtemp(include_dir))
		abort();
	snprintf(p, sizeof p, "%s/inc", include_dir);
	mkdir(p, 0700);
	fuzz_write(include_dir, "inc/exchanges.conf",
	    "exchanges = ( { name = \"events\"; type = \"topic\"; } );\n");
	fuzz_write(include_dir, "inc/sagas.conf",
	    "sagas = ( { name = \"s\"; mode = \"choreographed\"; start = \"events:a\";\n"
	    "  steps = ( { name = \"x\"; success = \"events:b\"; } ); } );\n");
	atexit(fuzz_conf_cleanup);
	return 0;
}

/* Would this text make the parser open something outside the sandbox? */
static int
fuzz_conf_unsafe(const char *s)
{
	const char *p = s;

	if (strstr(s, "/dev") || strstr(s, "/proc") || strstr(s, "/sys") ||
	    strstr(s, "/run") || strstr(s, "fifo"))
		return 1;
	/* libconfig and sagad both look for @include; skip any that leaves
	 * the include directory. */
	while ((p = strstr(p, "include"))) {
		const char *q = strchr(p, '"'), *e;

		p += 7;
		if (!q)
			break;
		e = strchr(q + 1, '"');
		if (q[1] == '/' || q[1] == '~')
			return 1;
		if (e ? memmem(q + 1, e - q - 1, "..", 2) != NULL : strstr(q + 1, "..") != NULL)
			return 1;
		/* Globs could reach anything through a leading pattern. */
		if (q[1] == '*' || q[1] == '?' || q[1] == '[')
			return 1;
	}
	return 0;
}

static void
fuzz_conf_check_binding(const struct sagad_conf *c, const struct conf_binding *b,
    int required)
{
	if (!b->exchange) {
		FUZZ_CHECK(!required, "a required binding is missing");
		return;
	}
	FUZZ_CHECK(b->key != NULL, "binding without a key");
	(void)c;
}

static void
fuzz_conf_check(const struct sagad_conf *c)
{
	size_t i, j;

	FUZZ_CHECK(c->service && *c->service, "loaded without a service");
	FUZZ_CHECK(c->api.listen && c->api.admin_listen, "loaded without listeners");
	FUZZ_CHECK(c->store.path, "loaded without a store path");
	FUZZ_CHECK(c->broker.host && c->broker.vhost, "loaded without a broker host");
	for (i = 0; i < c->n_exchanges; i++)
		FUZZ_CHECK(conf_exchange(c, c->exchanges[i].name) != NULL, "exchange lookup");
	for (i = 0; i < c->n_subs; i++) {
		FUZZ_CHECK(c->subs[i].name && c->subs[i].queue && c->subs[i].deliver,
		    "subscription %zu incomplete", i);
		FUZZ_CHECK(conf_subscription(c, c->subs[i].name) != NULL, "subscription lookup");
		for (j = 0; j < c->subs[i].n_binds; j++)
			fuzz_conf_check_binding(c, &c->subs[i].binds[j], 1);
	}
	for (i = 0; i < c->n_sagas; i++) {
		const struct conf_saga *sg = &c->sagas[i];
		struct saga_match mt[16];
		struct msg m;
		size_t n, k;
		int found = 0;

		FUZZ_CHECK(sg->name && conf_saga(c, sg->name) != NULL, "saga lookup");
		FUZZ_CHECK(sg->n_steps > 0, "saga %s without steps", sg->name);
		fuzz_conf_check_binding(c, &sg->start, 1);
		fuzz_conf_check_binding(c, &sg->completed, 0);
		fuzz_conf_check_binding(c, &sg->compensated, 0);
		for (j = 0; j < sg->n_steps; j++) {
			const struct conf_saga_step *st = &sg->steps[j];
			FUZZ_CHECK(st->name, "step without a name");
			fuzz_conf_check_binding(c, &st->command, sg->mode == SAGA_ORCHESTRATED);
			fuzz_conf_check_binding(c, &st->success, sg->mode == SAGA_CHOREOGRAPHED);
			fuzz_conf_check_binding(c, &st->compensate, 0);
			fuzz_conf_check_binding(c, &st->failure, 0);
		}
		memset(&m, 0, sizeof m);
		m.message_id = "fuzz";
		m.exchange = sg->start.exchange;
		m.routing_key = sg->start.key;
		n = saga_classify(c, &m, mt, 16);
		FUZZ_CHECK(n <= 16, "classify overflow");
		for (k = 0; k < n; k++) {
			FUZZ_CHECK(mt[k].saga < c->n_sagas, "classify: saga index");
			if (mt[k].input == SAGA_IN_START && mt[k].saga == i)
				found = 1;
		}
		FUZZ_CHECK(found || n == 16, "saga %s: its start event is not classified as a start",
		    sg->name);
	}
}

/* A reload from a plain configuration to the fuzzed one and back: the
 * restart-only rows move between the two, and both stay whole (checked,
 * then freed under ASan). */
static void
fuzz_conf_reload(const char *text)
{
	struct conf_errors errs = { NULL, 0 };
	struct sagad_conf *run = conf_load_string("service = \"orders\";\n", "plain.conf",
	    include_dir, &errs);
	struct sagad_conf *nc = conf_load_string(text, "fuzz.conf", include_dir, &errs);
	char changed[1024];

	if (run && nc) {
		conf_reload_keep(nc, run, changed, sizeof changed);
		fuzz_conf_check(nc);
		conf_reload_keep(run, nc, changed, sizeof changed);
		fuzz_conf_check(run);
	}
	conf_free(run);
	conf_free(nc);
	conf_errors_clear(&errs);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct conf_errors errs = { NULL, 0 };
	struct sagad_conf *c;
	char *text;
	size_t i;

	if (size > 65536)
		return 0;
	text = malloc(size + 1);
	memcpy(text, data, size);
	text[size] = '\0';
	if (fuzz_conf_unsafe(text)) {
		free(text);
		return 0;
	}
	c = conf_load_string(text, "fuzz.conf", include_dir, &errs);
	if (c) {
		FUZZ_CHECK(errs.n == 0, "a configuration loaded with %zu errors", errs.n);
		fuzz_conf_check(c);
		conf_free(c);
		fuzz_conf_reload(text);
	} else {
		FUZZ_CHECK(errs.n > 0, "a configuration failed without an error message");
		for (i = 0; i < errs.n; i++) {
			const char *colon = strchr(errs.msg[i], ':');
			FUZZ_CHECK(colon && colon[1] >= '0' && colon[1] <= '9',
			    "error without FILE:LINE: %s", errs.msg[i]);
		}
	}
	conf_errors_clear(&errs);
	free(text);
	return 0;
}
