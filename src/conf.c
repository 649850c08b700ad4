#include "conf.h"

#include "amqp_headers.h"
#include <errno.h>
#include <pwd.h>
#include <glob.h>
#include <libconfig.h>
#include <libgen.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util.h"

/*
 * Every key is described by a table row: its name, its kind and where the
 * value goes. One walker checks types, ranges and unknown keys for all
 * groups, so adding a key is adding a row.
 */
enum conf_kind {
	CONF_STR,		/* char * */
	CONF_DUR,		/* double, seconds, >= min */
	CONF_SIZE,		/* int64_t, bytes */
	CONF_INT,		/* int */
	CONF_BOOL,		/* int */
	CONF_MODE,		/* int, octal string such as "0660" */
	CONF_GROUP,		/* nested table, same base */
	CONF_CUSTOM		/* parsed by a function */
};

struct conf_ctx;
typedef void conf_custom_fn(struct conf_ctx *, config_setting_t *, void *);

struct conf_key {
	const char *name;
	enum conf_kind kind;
	size_t off;
	double min, max;
	const struct conf_key *sub;
	conf_custom_fn *fn;
};

struct conf_ctx {
	const char *main_file;
	struct conf_errors *errs;
};

static void
conf_err(struct conf_ctx *ctx, const config_setting_t *s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void
conf_err_push(struct conf_errors *errs, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void
conf_err_push(struct conf_errors *errs, const char *fmt, ...)
{
	char *full;
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vasprintf(&full, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	errs->msg = realloc(errs->msg, (errs->n + 1) * sizeof *errs->msg);
	errs->msg[errs->n++] = full;
}

static void
conf_err_at(struct conf_errors *errs, const char *file, int line,
    const char *fmt, va_list ap)
{
	char msg[512];

	vsnprintf(msg, sizeof msg, fmt, ap);
	conf_err_push(errs, "%s:%d: %s", file, line, msg);
}

static void
conf_err(struct conf_ctx *ctx, const config_setting_t *s, const char *fmt, ...)
{
	const char *file = s ? config_setting_source_file(s) : NULL;
	va_list ap;

	va_start(ap, fmt);
	conf_err_at(ctx->errs, file ? file : ctx->main_file,
	    s ? (int)config_setting_source_line(s) : 0, fmt, ap);
	va_end(ap);
}

static void conf_exchanges(struct conf_ctx *, config_setting_t *, void *);
static void conf_subscriptions(struct conf_ctx *, config_setting_t *, void *);
static void conf_binds(struct conf_ctx *, config_setting_t *, void *);
static void conf_sagas(struct conf_ctx *, config_setting_t *, void *);
static void conf_steps(struct conf_ctx *, config_setting_t *, void *);
static void conf_bind_one(struct conf_ctx *, config_setting_t *, void *);
static void conf_sources(struct conf_ctx *, config_setting_t *, void *);

#define B(f) offsetof(struct sagad_conf, broker.f)
static const struct conf_key conf_tls_keys[] = {
	{ "ca", CONF_STR, B(tls_ca), 0, 0, NULL, NULL },
	{ "cert", CONF_STR, B(tls_cert), 0, 0, NULL, NULL },
	{ "key", CONF_STR, B(tls_key), 0, 0, NULL, NULL },
	{ "verify", CONF_BOOL, B(tls_verify), 0, 0, NULL, NULL },
	{ NULL, 0, 0, 0, 0, NULL, NULL }
};
static const struct conf_key conf_broker_keys[] = {
	{ "url", CONF_STR, B(url), 0, 0, NULL, NULL },
	{ "password_file", CONF_STR, B(password_file), 0, 0, NULL, NULL },
	{ "heartbeat", CONF_DUR, B(heartbeat), 0, 3600, NULL, NULL },
	{ "connect_timeout", CONF_DUR, B(connect_timeout), 0.01, 3600, NULL, NULL },
	{ "reconnect_initial", CONF_DUR, B(reconnect_initial), 0.01, 3600, NULL, NULL },
	{ "reconnect_max", CONF_DUR, B(reconnect_max), 0.01, 86400, NULL, NULL },
	{ "tls", CONF_GROUP, 0, 0, 0, conf_tls_keys, NULL },
	{ NULL, 0, 0, 0, 0, NULL, NULL }
};
#undef B
#define S(f) offsetof(struct sagad_conf, store.f)
static const struct conf_key conf_store_keys[] = {
	{ "path", CONF_STR, S(path), 0, 0, NULL, NULL },
	{ "max_bytes", CONF_SIZE, S(max_bytes), 65536, 0, NULL, NULL },
	{ "dedup_window", CONF_DUR, S(dedup_window), 0, 1e9, NULL, NULL },
	{ "saga_retention", CONF_DUR, S(saga_retention), 0, 1e9, NULL, NULL },
	{ NULL, 0, 0, 0, 0, NULL, NULL }
};
#undef S
#define A(f) offsetof(struct sagad_conf, api.f)
static const struct conf_key conf_api_keys[] = {
	{ "listen", CONF_STR, A(listen), 0, 0, NULL, NULL },
	{ "admin_listen", CONF_STR, A(admin_listen), 0, 0, NULL, NULL },
	{ "token_file", CONF_STR, A(token_file), 0, 0, NULL, NULL },
	{ "max_message_bytes", CONF_SIZE, A(max_message_bytes), 1, 134217728, NULL, NULL },
	{ "max_header_bytes", CONF_SIZE, A(max_header_bytes), 1024, 1048576, NULL, NULL },
	{ "request_timeout", CONF_DUR, A(request_timeout), 0.1, 3600, NULL, NULL },
	{ "socket_mode", CONF_MODE, A(socket_mode), 0, 0777, NULL, NULL },
	{ "admin_allow_remote", CONF_BOOL, A(admin_allow_remote), 0, 0, NULL, NULL },
	{ NULL, 0, 0, 0, 0, NULL, NULL }
};
#undef A
#define O(f) offsetof(struct sagad_conf, outbox.f)
static const struct conf_key conf_outbox_keys[] = {
	{ "max_inflight", CONF_INT, O(max_inflight), 1, 65535, NULL, NULL },
	{ "retry_initial", CONF_DUR, O(retry_initial), 0.001, 3600, NULL, NULL },
	{ "retry_max", CONF_DUR, O(retry_max), 0.001, 86400, NULL, NULL },
	{ NULL, 0, 0, 0, 0, NULL, NULL }
};
#undef O
#define U(f) offsetof(struct conf_subscription, f)
static const struct conf_key conf_sub_keys[] = {
	{ "name", CONF_STR, U(name), 0, 0, NULL, NULL },
	{ "queue", CONF_STR, U(queue), 0, 0, NULL, NULL },
	{ "queue_type", CONF_STR, U(queue_type), 0, 0, NULL, NULL },
	{ "bind", CONF_CUSTOM, 0, 0, 0, NULL, conf_binds },
	{ "deliver", CONF_STR, U(deliver), 0, 0, NULL, NULL },
	{ "concurrency", CONF_INT, U(concurrency), 1, 1024, NULL, NULL },
	{ "max_pending", CONF_INT, U(max_pending), 1, 65535, NULL, NULL },
	{ "prefetch", CONF_INT, U(prefetch), 1, 65535, NULL, NULL },
	{ "ordered", CONF_BOOL, U(ordered), 0, 0, NULL, NULL },
	{ "timeout", CONF_DUR, U(timeout), 0.01, 3600, NULL, NULL },
	{ "max_attempts", CONF_INT, U(max_attempts), 1, 1000000, NULL, NULL },
	{ "retry_initial", CONF_DUR, U(retry_initial), 0.001, 86400, NULL, NULL },
	{ "retry_max", CONF_DUR, U(retry_max), 0.001, 86400, NULL, NULL },
	{ "circuit_failures", CONF_INT, U(circuit_failures), 1, 1000000, NULL, NULL },
	{ "circuit_open", CONF_DUR, U(circuit_open), 0.01, 3600, NULL, NULL },
	{ "max_message_bytes", CONF_SIZE, U(max_message_bytes), 1, 134217728, NULL, NULL },
	{ NULL, 0, 0, 0, 0, NULL, NULL }
};
#undef U
/* "exchange:key" strings land in a struct conf_binding at off. */
#define SB(f) offsetof(struct conf_saga_step, f)
static const struct conf_key conf_step_keys[] = {
	{ "name", CONF_STR, SB(name), 0, 0, NULL, NULL },
	{ "command", CONF_CUSTOM, SB(command), 0, 0, NULL, conf_bind_one },
	{ "compensate", CONF_CUSTOM, SB(compensate), 0, 0, NULL, conf_bind_one },
	{ "success", CONF_CUSTOM, SB(success), 0, 0, NULL, conf_bind_one },
	{ "failure", CONF_CUSTOM, SB(failure), 0, 0, NULL, conf_bind_one },
	{ "timeout", CONF_DUR, SB(timeout), 0, 86400 * 30, NULL, NULL },
	{ "attempts", CONF_INT, SB(attempts), 1, 1000, NULL, NULL },
	{ NULL, 0, 0, 0, 0, NULL, NULL }
};
#undef SB
#define SG(f) offsetof(struct conf_saga, f)
static const struct conf_key conf_saga_keys[] = {
	{ "name", CONF_STR, SG(name), 0, 0, NULL, NULL },
	{ "mode", CONF_STR, SG(mode_name), 0, 0, NULL, NULL },
	{ "start", CONF_CUSTOM, SG(start), 0, 0, NULL, conf_bind_one },
	{ "timeout", CONF_DUR, SG(timeout), 0, 86400 * 365, NULL, NULL },
	{ "steps", CONF_CUSTOM, 0, 0, 0, NULL, conf_steps },
	{ "completed", CONF_CUSTOM, SG(completed), 0, 0, NULL, conf_bind_one },
	{ "compensated", CONF_CUSTOM, SG(compensated), 0, 0, NULL, conf_bind_one },
	{ "compensate_attempts", CONF_INT, SG(compensate_attempts), 1, 1000000, NULL, NULL },
	{ "compensate_timeout", CONF_DUR, SG(compensate_timeout), 0.01, 86400, NULL, NULL },
	{ "retry_initial", CONF_DUR, SG(retry_initial), 0.001, 86400, NULL, NULL },
	{ "retry_max", CONF_DUR, SG(retry_max), 0.001, 86400, NULL, NULL },
	{ NULL, 0, 0, 0, 0, NULL, NULL }
};
#undef SG
#define T(f) offsetof(struct sagad_conf, f)
static const struct conf_key conf_top_keys[] = {
	{ "service", CONF_STR, T(service), 0, 0, NULL, NULL },
	{ "user", CONF_STR, T(user), 0, 0, NULL, NULL },
	{ "drain_timeout", CONF_DUR, T(drain_timeout), 0, 3600, NULL, NULL },
	{ "saga_queue_type", CONF_STR, T(saga_queue_type), 0, 0, NULL, NULL },
	{ "broker", CONF_GROUP, 0, 0, 0, conf_broker_keys, NULL },
	{ "store", CONF_GROUP, 0, 0, 0, conf_store_keys, NULL },
	{ "api", CONF_GROUP, 0, 0, 0, conf_api_keys, NULL },
	{ "outbox", CONF_GROUP, 0, 0, 0, conf_outbox_keys, NULL },
	{ "exchanges", CONF_CUSTOM, 0, 0, 0, NULL, conf_exchanges },
	{ "subscriptions", CONF_CUSTOM, 0, 0, 0, NULL, conf_subscriptions },
	{ "sagas", CONF_CUSTOM, 0, 0, 0, NULL, conf_sagas },
	{ "sources", CONF_CUSTOM, 0, 0, 0, NULL, conf_sources },
	{ NULL, 0, 0, 0, 0, NULL, NULL }
};
#undef T

static int
conf_number(config_setting_t *s, double *out)
{
	switch (config_setting_type(s)) {
	case CONFIG_TYPE_INT:
	case CONFIG_TYPE_INT64:
		*out = (double)config_setting_get_int64(s);
		return 1;
	case CONFIG_TYPE_FLOAT:
		*out = config_setting_get_float(s);
		return 1;
	default:
		return 0;
	}
}

/*
 * libconfig 1.5 keeps a plain integer literal in 32 bits and wraps larger
 * ones silently (5368709120 reads as 1073741824) unless written with an L
 * suffix. Sizes are read again from the literal in the file so that what
 * the operator wrote is what sagad uses.
 */
static int
conf_literal(struct conf_ctx *ctx, const config_setting_t *s, long long *out)
{
	const char *file = config_setting_source_file(s);
	unsigned line = config_setting_source_line(s), n = 0;
	const char *name = config_setting_name(s);
	char buf[4096], *p, *end;
	FILE *f;

	f = fopen(file ? file : ctx->main_file, "r");
	if (!f)
		return -1;
	while (fgets(buf, sizeof buf, f) && ++n < line)
		;
	fclose(f);
	if (n != line || !(p = strstr(buf, name)))
		return -1;
	p += strlen(name);
	p += strspn(p, " \t");
	if (*p != '=' && *p != ':')
		return -1;
	p++;
	p += strspn(p, " \t");
	errno = 0;
	*out = strtoll(p, &end, 0);
	if (errno || end == p)
		return -1;
	return 0;
}

static void
conf_value(struct conf_ctx *ctx, config_setting_t *s, const struct conf_key *k,
    void *base)
{
	const char *name = config_setting_name(s);
	char *p = (char *)base + k->off;
	double d;

	switch (k->kind) {
	case CONF_STR:
		if (config_setting_type(s) != CONFIG_TYPE_STRING) {
			conf_err(ctx, s, "'%s' must be a string", name);
			return;
		}
		free(*(char **)p);
		*(char **)p = strdup(config_setting_get_string(s));
		return;
	case CONF_BOOL:
		if (config_setting_type(s) != CONFIG_TYPE_BOOL) {
			conf_err(ctx, s, "'%s' must be true or false", name);
			return;
		}
		*(int *)p = config_setting_get_bool(s);
		return;
	case CONF_MODE: {
		const char *v;
		char *end;
		long m;
		if (config_setting_type(s) != CONFIG_TYPE_STRING) {
			conf_err(ctx, s, "'%s' must be an octal string such as \"0660\"", name);
			return;
		}
		v = config_setting_get_string(s);
		m = strtol(v, &end, 8);
		if (*v == '\0' || *end != '\0' || m < 0 || m > 0777) {
			conf_err(ctx, s, "'%s' must be an octal mode between \"0000\" and \"0777\"", name);
			return;
		}
		*(int *)p = (int)m;
		return;
	}
	case CONF_DUR:
	case CONF_SIZE:
	case CONF_INT:
		if (!conf_number(s, &d)) {
			conf_err(ctx, s, "'%s' must be a number", name);
			return;
		}
		if (config_setting_type(s) == CONFIG_TYPE_INT) {
			long long lit;
			if (conf_literal(ctx, s, &lit) == 0 && lit != (long long)d)
				d = (double)lit;
		}
		if (d < k->min || (k->max > 0 && d > k->max)) {
			conf_err(ctx, s, "'%s' must be between %g and %g", name,
			    k->min, k->max > 0 ? k->max : 9.2e18);
			return;
		}
		if (k->kind == CONF_DUR)
			*(double *)p = d;
		else if (k->kind == CONF_SIZE) {
			if (config_setting_type(s) == CONFIG_TYPE_FLOAT) {
				conf_err(ctx, s, "'%s' must be a whole number of bytes", name);
				return;
			}
			*(int64_t *)p = (int64_t)d;
		} else {
			if (config_setting_type(s) == CONFIG_TYPE_FLOAT) {
				conf_err(ctx, s, "'%s' must be a whole number", name);
				return;
			}
			*(int *)p = (int)d;
		}
		return;
	case CONF_GROUP:
	case CONF_CUSTOM:
		break;
	}
}

static void
conf_walk(struct conf_ctx *ctx, config_setting_t *group,
    const struct conf_key *keys, void *base, const char *where)
{
	int i, n = config_setting_length(group);

	for (i = 0; i < n; i++) {
		config_setting_t *s = config_setting_get_elem(group, i);
		const char *name = config_setting_name(s);
		const struct conf_key *k;

		for (k = keys; k->name; k++)
			if (strcmp(k->name, name) == 0)
				break;
		if (!k->name) {
			if (where)
				conf_err(ctx, s, "unknown key '%s' in '%s'", name, where);
			else
				conf_err(ctx, s, "unknown key '%s'", name);
			continue;
		}
		if (k->kind == CONF_GROUP) {
			if (config_setting_type(s) != CONFIG_TYPE_GROUP) {
				conf_err(ctx, s, "'%s' must be a group { ... }", name);
				continue;
			}
			conf_walk(ctx, s, k->sub, base, name);
		} else if (k->kind == CONF_CUSTOM)
			k->fn(ctx, s, (char *)base + k->off);
		else
			conf_value(ctx, s, k, base);
	}
}

static void
conf_exchanges(struct conf_ctx *ctx, config_setting_t *list, void *base)
{
	static const char *const types[] = { "direct", "topic", "fanout", "headers", NULL };
	struct sagad_conf *conf = base;
	int i, n;

	if (!config_setting_is_list(list) && !config_setting_is_array(list)) {
		conf_err(ctx, list, "'exchanges' must be a list ( { name = ...; }, ... )");
		return;
	}
	n = config_setting_length(list);
	conf->exchanges = calloc(n ? n : 1, sizeof *conf->exchanges);
	for (i = 0; i < n; i++) {
		config_setting_t *e = config_setting_get_elem(list, i);
		struct conf_exchange *x = &conf->exchanges[conf->n_exchanges];
		const char *name = NULL, *type = "topic";
		int j, m, ok = 1;

		if (!config_setting_is_group(e)) {
			conf_err(ctx, e, "each exchange must be a group { name = \"...\"; type = \"topic\"; }");
			continue;
		}
		m = config_setting_length(e);
		for (j = 0; j < m; j++) {
			config_setting_t *s = config_setting_get_elem(e, j);
			const char *k = config_setting_name(s);
			const char **dst;
			if (strcmp(k, "name") == 0)
				dst = &name;
			else if (strcmp(k, "type") == 0)
				dst = &type;
			else {
				conf_err(ctx, s, "unknown key '%s' in exchange", k);
				ok = 0;
				continue;
			}
			if (config_setting_type(s) != CONFIG_TYPE_STRING) {
				conf_err(ctx, s, "'%s' must be a string", k);
				ok = 0;
				continue;
			}
			*dst = config_setting_get_string(s);
		}
		if (!name) {
			conf_err(ctx, e, "exchange without a 'name'");
			continue;
		}
		if (!util_valid_exchange(name) || strncmp(name, "amq.", 4) == 0) {
			conf_err(ctx, e, "bad exchange name '%s' (1-255 of A-Z a-z 0-9 - _ . :, not amq.*)", name);
			continue;
		}
		for (j = 0; types[j]; j++)
			if (strcmp(types[j], type) == 0)
				break;
		if (!types[j]) {
			conf_err(ctx, e, "exchange '%s': type must be direct, topic, fanout or headers", name);
			continue;
		}
		for (j = 0; j < (int)conf->n_exchanges; j++)
			if (strcmp(conf->exchanges[j].name, name) == 0)
				break;
		if (j < (int)conf->n_exchanges) {
			conf_err(ctx, e, "exchange '%s' is declared twice", name);
			continue;
		}
		if (!ok)
			continue;
		x->name = strdup(name);
		x->type = strdup(type);
		conf->n_exchanges++;
	}
}

/* "exchange:key" -> binding; the key may be empty (fanout). */
static int
conf_split_binding(const char *v, struct conf_binding *b)
{
	const char *colon = strchr(v, ':');

	if (!colon || colon == v)
		return -1;
	b->exchange = strndup(v, colon - v);
	b->key = strdup(colon + 1);
	if (!util_valid_exchange(b->exchange) || !util_valid_shortstr(b->key, 255)) {
		free(b->exchange);
		free(b->key);
		b->exchange = b->key = NULL;
		return -1;
	}
	return 0;
}

static void
conf_binds(struct conf_ctx *ctx, config_setting_t *list, void *base)
{
	struct conf_subscription *sub = base;
	int i, n;

	if (!config_setting_is_array(list) && !config_setting_is_list(list)) {
		conf_err(ctx, list, "'bind' must be a list of \"exchange:binding-key\" strings");
		return;
	}
	n = config_setting_length(list);
	sub->binds = calloc(n ? n : 1, sizeof *sub->binds);
	for (i = 0; i < n; i++) {
		config_setting_t *e = config_setting_get_elem(list, i);
		const char *v = config_setting_get_string(e);
		if (!v || conf_split_binding(v, &sub->binds[sub->n_binds]) < 0) {
			conf_err(ctx, e, "bad binding '%s': want \"exchange:binding-key\"", v ? v : "(not a string)");
			continue;
		}
		sub->n_binds++;
	}
}

static void
conf_bind_one(struct conf_ctx *ctx, config_setting_t *s, void *dst)
{
	struct conf_binding *b = dst;
	const char *v = config_setting_get_string(s);

	if (!v || conf_split_binding(v, b) < 0 || !*b->key) {
		free(b->exchange);
		free(b->key);
		memset(b, 0, sizeof *b);
		conf_err(ctx, s, "'%s' must be \"exchange:routing-key\"", config_setting_name(s));
	}
}

/*
 * A list of groups, each walked with the same key table: subscriptions,
 * sagas and saga steps. The array has one element per entry, defaults set
 * by init before the entry's keys are read.
 */
static void
conf_group_list(struct conf_ctx *ctx, config_setting_t *list, const char *what,
    size_t size, void **array, size_t *count, void (*init)(void *),
    const struct conf_key *keys)
{
	int i, n;

	if (!config_setting_is_list(list)) {
		conf_err(ctx, list, "'%s' must be a list ( { name = ...; }, ... )",
		    config_setting_name(list));
		return;
	}
	n = config_setting_length(list);
	*array = calloc(n ? n : 1, size);
	for (i = 0; i < n; i++) {
		config_setting_t *e = config_setting_get_elem(list, i);
		void *elem = (char *)*array + (*count)++ * size;

		init(elem);
		if (!config_setting_is_group(e)) {
			conf_err(ctx, e, "each %s must be a group { name = ...; }", what);
			continue;
		}
		conf_walk(ctx, e, keys, elem, what);
	}
}

static void
conf_step_defaults(void *p)
{
	struct conf_saga_step *st = p;

	st->attempts = 3;
}

static void
conf_steps(struct conf_ctx *ctx, config_setting_t *list, void *base)
{
	struct conf_saga *sg = base;

	conf_group_list(ctx, list, "step", sizeof *sg->steps, (void **)&sg->steps,
	    &sg->n_steps, conf_step_defaults, conf_step_keys);
}

static void
conf_saga_defaults(void *p)
{
	struct conf_saga *sg = p;

	sg->compensate_attempts = 10;
	sg->compensate_timeout = 10;
	sg->retry_initial = 0.5;
	sg->retry_max = 30;
}

static void
conf_sagas(struct conf_ctx *ctx, config_setting_t *list, void *base)
{
	struct sagad_conf *conf = base;

	conf_group_list(ctx, list, "saga", sizeof *conf->sagas, (void **)&conf->sagas,
	    &conf->n_sagas, conf_saga_defaults, conf_saga_keys);
}

/* Sources: `plugin` and `name` are sagad's; every other key is the
 * plugin's, checked against its list when it is loaded (plugin.c). */
static void
conf_sources(struct conf_ctx *ctx, config_setting_t *list, void *base)
{
	struct sagad_conf *conf = base;
	int i, j, n, m;

	if (!config_setting_is_list(list)) {
		conf_err(ctx, list, "'sources' must be a list ( { plugin = \"...\"; ... }, ... )");
		return;
	}
	n = config_setting_length(list);
	conf->sources = calloc(n ? n : 1, sizeof *conf->sources);
	for (i = 0; i < n; i++) {
		config_setting_t *e = config_setting_get_elem(list, i);
		struct conf_source *src = &conf->sources[conf->n_sources++];
		const char *f = config_setting_source_file(e);

		src->file = strdup(f ? f : ctx->main_file);
		src->line = config_setting_source_line(e);
		if (!config_setting_is_group(e)) {
			conf_err(ctx, e, "each source must be a group { plugin = \"...\"; }");
			continue;
		}
		m = config_setting_length(e);
		src->kv = calloc(m ? m : 1, sizeof *src->kv);
		for (j = 0; j < m; j++) {
			config_setting_t *s = config_setting_get_elem(e, j);
			const char *k = config_setting_name(s), *sf = config_setting_source_file(s);
			struct conf_kv *kv;
			double d;

			if (strcmp(k, "plugin") == 0 || strcmp(k, "name") == 0) {
				if (config_setting_type(s) != CONFIG_TYPE_STRING) {
					conf_err(ctx, s, "'%s' must be a string", k);
					continue;
				}
				*(strcmp(k, "plugin") == 0 ? &src->plugin : &src->name) =
				    strdup(config_setting_get_string(s));
				continue;
			}
			kv = &src->kv[src->n_kv];
			if (config_setting_type(s) == CONFIG_TYPE_STRING) {
				kv->type = CONF_KV_STRING;
				kv->s = strdup(config_setting_get_string(s));
			} else if (config_setting_type(s) == CONFIG_TYPE_BOOL) {
				kv->type = CONF_KV_BOOL;
				kv->b = config_setting_get_bool(s);
			} else if (conf_number(s, &d)) {
				kv->type = CONF_KV_NUMBER;
				kv->d = d;
			} else {
				conf_err(ctx, s, "'%s' must be a string, a number or a boolean", k);
				continue;
			}
			kv->key = strdup(k);
			kv->file = strdup(sf ? sf : ctx->main_file);
			kv->line = config_setting_source_line(s);
			src->n_kv++;
		}
		if (!src->plugin)
			conf_err(ctx, e, "source without a 'plugin'");
		else if (!src->name)
			src->name = strdup(src->plugin[0] && !strchr(src->plugin, '/') ?
			    src->plugin : "source");
	}
	for (i = 0; i < (int)conf->n_sources; i++)
		for (j = 0; j < i; j++)
			if (conf->sources[i].name && conf->sources[j].name &&
			    strcmp(conf->sources[i].name, conf->sources[j].name) == 0)
				conf_err(ctx, config_setting_get_elem(list, i),
				    "source name '%s' is used twice (set 'name')", conf->sources[i].name);
}

static void
conf_sub_defaults(void *p)
{
	struct conf_subscription *s = p;

	s->queue_type = strdup("quorum");
	s->concurrency = 16;
	s->timeout = 10;
	s->max_attempts = 5;
	s->retry_initial = 1;
	s->retry_max = 60;
	s->circuit_failures = 5;
	s->circuit_open = 5;
	s->max_message_bytes = 16777216;
}

static void
conf_subscriptions(struct conf_ctx *ctx, config_setting_t *list, void *base)
{
	struct sagad_conf *conf = base;

	conf_group_list(ctx, list, "subscription", sizeof *conf->subs, (void **)&conf->subs,
	    &conf->n_subs, conf_sub_defaults, conf_sub_keys);
}

static int
conf_bound_exchange_ok(const struct sagad_conf *c, const char *ex)
{
	return conf_exchange(c, ex) || strncmp(ex, "amq.", 4) == 0;
}

/* Checks that need the whole file: names, exchanges, defaults that depend
 * on other keys. */
static void
conf_check_subs(struct conf_ctx *ctx, config_t *cfg, struct sagad_conf *c)
{
	config_setting_t *list = config_lookup(cfg, "subscriptions");
	size_t i, j;

	for (i = 0; i < c->n_subs; i++) {
		struct conf_subscription *s = &c->subs[i];
		config_setting_t *e = list ? config_setting_get_elem(list, i) : NULL;

		if (!s->name) {
			conf_err(ctx, e, "subscription without a 'name'");
			continue;
		}
		if (!util_valid_exchange(s->name) || s->name[0] == '_')
			conf_err(ctx, e, "subscription name '%s' must be 1-255 of A-Z a-z 0-9 - _ . : and not start with _", s->name);
		for (j = 0; j < i; j++)
			if (c->subs[j].name && strcmp(c->subs[j].name, s->name) == 0)
				conf_err(ctx, e, "subscription '%s' is defined twice", s->name);
		if (!s->queue && c->service &&
		    asprintf(&s->queue, "%s.%s", c->service, s->name) < 0)
			s->queue = NULL;
		if (s->queue && (!*s->queue || strlen(s->queue) > 250 ||
		    !util_valid_shortstr(s->queue, 250)))
			conf_err(ctx, e, "subscription '%s': bad queue name", s->name);
		if (strcmp(s->queue_type, "quorum") != 0 && strcmp(s->queue_type, "classic") != 0)
			conf_err(ctx, e, "subscription '%s': queue_type must be quorum or classic", s->name);
		if (!s->deliver)
			conf_err(ctx, e, "subscription '%s' needs 'deliver' (http://host:port/path)", s->name);
		else if (strncmp(s->deliver, "http://", 7) != 0 || strlen(s->deliver) < 8)
			conf_err(ctx, e, "subscription '%s': deliver must be an http:// URL", s->name);
		if (s->n_binds == 0)
			conf_err(ctx, e, "subscription '%s' needs at least one 'bind'", s->name);
		for (j = 0; j < s->n_binds; j++)
			if (!conf_bound_exchange_ok(c, s->binds[j].exchange))
				conf_err(ctx, e, "subscription '%s' binds to exchange '%s', which is not in 'exchanges'",
				    s->name, s->binds[j].exchange);
		if (!s->max_pending)
			s->max_pending = 4 * s->concurrency;
		/* The prefetch follows concurrency: the broker sends no more
		 * than the service can take at once, plus the same again to
		 * keep the pipe full while the inbox commits are synced. */
		if (!s->prefetch)
			s->prefetch = 2 * s->concurrency > 65535 ? 65535 : 2 * s->concurrency;
		if (s->retry_max < s->retry_initial)
			conf_err(ctx, e, "subscription '%s': retry_max is below retry_initial", s->name);
	}
}

static int
conf_has_binding(const struct conf_binding *b)
{
	return b->exchange != NULL;
}

static void
conf_check_binding(struct conf_ctx *ctx, config_setting_t *e, const struct sagad_conf *c,
    const char *saga, const char *what, const struct conf_binding *b)
{
	if (conf_has_binding(b) && !conf_bound_exchange_ok(c, b->exchange))
		conf_err(ctx, e, "saga '%s': %s uses exchange '%s', which is not in 'exchanges'",
		    saga, what, b->exchange);
}

static void
conf_add_saga_bind(struct conf_subscription *s, const struct conf_binding *b)
{
	size_t i;

	if (!conf_has_binding(b))
		return;
	for (i = 0; i < s->n_binds; i++)
		if (strcmp(s->binds[i].exchange, b->exchange) == 0 &&
		    strcmp(s->binds[i].key, b->key) == 0)
			return;
	s->binds = realloc(s->binds, (s->n_binds + 1) * sizeof *s->binds);
	s->binds[s->n_binds].exchange = strdup(b->exchange);
	s->binds[s->n_binds].key = strdup(b->key);
	s->n_binds++;
}

/* The saga engine consumes one queue of its own: the start events, the
 * choreographed steps' events and the replies to its commands (sent to
 * the same queue through the default exchange). */
static void
conf_saga_subscription(struct sagad_conf *c)
{
	struct conf_subscription *s;
	size_t i, j;

	if (!c->n_sagas || !c->service)
		return;
	if (asprintf(&c->saga_queue, "%s.sagas", c->service) < 0)
		return;
	c->subs = realloc(c->subs, (c->n_subs + 1) * sizeof *c->subs);
	s = &c->subs[c->n_subs++];
	memset(s, 0, sizeof *s);
	conf_sub_defaults(s);
	s->name = strdup("_sagas");
	s->queue = strdup(c->saga_queue);
	if (c->saga_queue_type) {
		free(s->queue_type);
		s->queue_type = strdup(c->saga_queue_type);
	}
	s->deliver = strdup("internal:sagas");
	s->internal = 1;
	s->concurrency = 64;
	s->max_pending = 4096;
	s->prefetch = 128;
	for (i = 0; i < c->n_sagas; i++) {
		conf_add_saga_bind(s, &c->sagas[i].start);
		for (j = 0; j < c->sagas[i].n_steps; j++) {
			if (c->sagas[i].mode != SAGA_CHOREOGRAPHED)
				continue;
			conf_add_saga_bind(s, &c->sagas[i].steps[j].success);
			conf_add_saga_bind(s, &c->sagas[i].steps[j].failure);
		}
	}
}

static void
conf_check_sagas(struct conf_ctx *ctx, config_t *cfg, struct sagad_conf *c)
{
	config_setting_t *list = config_lookup(cfg, "sagas");
	size_t i, j, k;

	for (i = 0; i < c->n_sagas; i++) {
		struct conf_saga *sg = &c->sagas[i];
		config_setting_t *e = list ? config_setting_get_elem(list, i) : NULL;
		config_setting_t *steps = e ? config_setting_lookup(e, "steps") : NULL;
		const char *n = sg->name ? sg->name : "?";

		if (!sg->name)
			conf_err(ctx, e, "saga without a 'name'");
		else if (!util_valid_exchange(sg->name))
			conf_err(ctx, e, "saga name '%s' must be 1-255 of A-Z a-z 0-9 - _ . :", sg->name);
		for (j = 0; sg->name && j < i; j++)
			if (c->sagas[j].name && strcmp(c->sagas[j].name, sg->name) == 0)
				conf_err(ctx, e, "saga '%s' is defined twice", sg->name);
		if (!sg->mode_name || strcmp(sg->mode_name, "orchestrated") == 0)
			sg->mode = SAGA_ORCHESTRATED;
		else if (strcmp(sg->mode_name, "choreographed") == 0)
			sg->mode = SAGA_CHOREOGRAPHED;
		else
			conf_err(ctx, e, "saga '%s': mode must be orchestrated or choreographed", n);
		if (!conf_has_binding(&sg->start))
			conf_err(ctx, e, "saga '%s' needs 'start' (\"exchange:routing-key\")", n);
		if (!sg->n_steps)
			conf_err(ctx, e, "saga '%s' needs at least one step", n);
		conf_check_binding(ctx, e, c, n, "start", &sg->start);
		conf_check_binding(ctx, e, c, n, "completed", &sg->completed);
		conf_check_binding(ctx, e, c, n, "compensated", &sg->compensated);
		if (sg->retry_max < sg->retry_initial)
			conf_err(ctx, e, "saga '%s': retry_max is below retry_initial", n);
		for (j = 0; j < sg->n_steps; j++) {
			struct conf_saga_step *st = &sg->steps[j];
			config_setting_t *se = steps ? config_setting_get_elem(steps, j) : e;
			const char *sn = st->name ? st->name : "?";

			if (!st->name) {
				conf_err(ctx, se, "saga '%s': step without a 'name'", n);
				continue;
			}
			if (!util_valid_exchange(st->name))
				conf_err(ctx, se, "saga '%s': step name '%s' must be 1-255 of A-Z a-z 0-9 - _ . :", n, st->name);
			for (k = 0; k < j; k++)
				if (sg->steps[k].name && strcmp(sg->steps[k].name, st->name) == 0)
					conf_err(ctx, se, "saga '%s': step '%s' is defined twice", n, st->name);
			if (sg->mode == SAGA_ORCHESTRATED) {
				if (!conf_has_binding(&st->command))
					conf_err(ctx, se, "saga '%s': step '%s' needs a 'command' (orchestrated)", n, sn);
				if (conf_has_binding(&st->success) || conf_has_binding(&st->failure))
					conf_err(ctx, se, "saga '%s': step '%s': success/failure events are for choreographed sagas", n, sn);
			} else {
				if (!conf_has_binding(&st->success))
					conf_err(ctx, se, "saga '%s': step '%s' needs a 'success' event (choreographed)", n, sn);
				if (conf_has_binding(&st->command))
					conf_err(ctx, se, "saga '%s': step '%s': commands are for orchestrated sagas", n, sn);
			}
			conf_check_binding(ctx, se, c, n, "command", &st->command);
			conf_check_binding(ctx, se, c, n, "compensate", &st->compensate);
			conf_check_binding(ctx, se, c, n, "success", &st->success);
			conf_check_binding(ctx, se, c, n, "failure", &st->failure);
			if (st->timeout <= 0)
				st->timeout = sg->timeout > 0 ? sg->timeout : 30;
		}
	}
}

static void
conf_defaults(struct sagad_conf *c)
{
	c->drain_timeout = 10;
	c->saga_queue_type = strdup("quorum");
	c->broker.url = strdup("amqp://guest:guest@127.0.0.1:5672/%2f");
	c->broker.heartbeat = 10;
	c->broker.connect_timeout = 5;
	c->broker.reconnect_initial = 0.2;
	c->broker.reconnect_max = 30;
	c->broker.tls_verify = 1;
	c->store.max_bytes = 1073741824;
	c->store.dedup_window = 604800;
	c->store.saga_retention = 604800;
	c->api.listen = strdup("127.0.0.1:7600");
	c->api.admin_listen = strdup("127.0.0.1:7601");
	c->api.max_message_bytes = 1048576;
	c->api.max_header_bytes = 16384;
	c->api.request_timeout = 30;
	c->api.socket_mode = 0660;
	c->outbox.max_inflight = 1024;
	c->outbox.retry_initial = 0.1;
	c->outbox.retry_max = 30;
}

static int
conf_url_has_password(const char *url)
{
	const char *u = strstr(url, "://") + 3, *at = strchr(u, '@');

	return at && memchr(u, ':', at - u) != NULL;
}

/* The broker URL is split once here so that errors name the config line. */
static void
conf_broker_url(struct conf_ctx *ctx, config_t *cfg, struct sagad_conf *c)
{
	config_setting_t *s = config_lookup(cfg, "broker.url");
	struct amqp_connection_info info;
	char *copy;

	if (strncmp(c->broker.url, "amqp://", 7) != 0 &&
	    strncmp(c->broker.url, "amqps://", 8) != 0) {
		conf_err(ctx, s, "broker url must start with amqp:// or amqps://");
		return;
	}
	copy = strdup(c->broker.url);
	if (amqp_parse_url(copy, &info) != AMQP_STATUS_OK) {
		conf_err(ctx, s, "broker url is malformed (amqp://user:password@host:port/vhost)");
		free(copy);
		return;
	}
	c->broker.host = strdup(info.host);
	c->broker.user = strdup(info.user);
	c->broker.password = strdup(info.password);
	c->broker.vhost = strdup(info.vhost);
	c->broker.port = info.port;
	c->broker.tls = info.ssl;
	free(copy);
	if (c->broker.password_file) {
		char *pw;
		if (conf_url_has_password(c->broker.url)) {
			conf_err(ctx, config_lookup(cfg, "broker.password_file"),
			    "give the password either in the url or in password_file, not both");
			return;
		}
		pw = util_read_secret(c->broker.password_file);
		if (!pw) {
			conf_err(ctx, config_lookup(cfg, "broker.password_file"),
			    "cannot read password_file '%s'", c->broker.password_file);
			return;
		}
		free(c->broker.password);
		c->broker.password = pw;
	}
	if (!c->broker.tls && (c->broker.tls_ca || c->broker.tls_cert || c->broker.tls_key))
		conf_err(ctx, config_lookup(cfg, "broker.tls"), "tls settings need an amqps:// url");
	if ((c->broker.tls_cert == NULL) != (c->broker.tls_key == NULL))
		conf_err(ctx, config_lookup(cfg, "broker.tls"), "tls cert and key go together");
	{
		const char *files[] = { c->broker.tls_ca, c->broker.tls_cert, c->broker.tls_key };
		const char *keys[] = { "broker.tls.ca", "broker.tls.cert", "broker.tls.key" };
		int i;
		for (i = 0; i < 3; i++)
			if (files[i] && access(files[i], R_OK) != 0)
				conf_err(ctx, config_lookup(cfg, keys[i]), "cannot read '%s': %s",
				    files[i], strerror(errno));
	}
}

static int
conf_valid_listen(const char *v)
{
	char host[256];
	const char *p;
	char *end;
	long port;

	if (strncmp(v, "unix:", 5) == 0)
		return v[5] == '/' && strlen(v + 5) < 100;
	/* A host is required here (":7600" is refused), and brackets must
	 * pair: the same parser as the bind and the loopback check. */
	if (v[0] == ':' || util_listen_split(v, host, sizeof host, &p) < 0 || !*p)
		return 0;
	port = strtol(p, &end, 10);
	return *end == '\0' && port >= 0 && port <= 65535;
}

static void
conf_check(struct conf_ctx *ctx, config_t *cfg, struct sagad_conf *c)
{
	config_setting_t *s;

	if (!c->service) {
		if (!config_lookup(cfg, "service"))
			conf_err_push(ctx->errs, "%s:1: missing required key 'service'", ctx->main_file);
	} else if (!util_valid_exchange(c->service)) {
		conf_err(ctx, config_lookup(cfg, "service"),
		    "'service' must be 1-255 of A-Z a-z 0-9 - _ . :");
	}
	conf_broker_url(ctx, cfg, c);
	if (!c->store.path && c->service) {
		if (asprintf(&c->store.path, "/var/lib/sagad/%s.db", c->service) < 0)
			c->store.path = NULL;
	}
	if (!conf_valid_listen(c->api.listen))
		conf_err(ctx, config_lookup(cfg, "api.listen"),
		    "'listen' must be HOST:PORT or unix:/path");
	if (!conf_valid_listen(c->api.admin_listen))
		conf_err(ctx, config_lookup(cfg, "api.admin_listen"),
		    "'admin_listen' must be HOST:PORT or unix:/path");
	else if (!c->api.admin_allow_remote && !util_listen_is_local(c->api.admin_listen))
		conf_err(ctx, config_lookup(cfg, "api.admin_listen"),
		    "'admin_listen' is not loopback or a unix socket (set admin_allow_remote = true to allow it)");
	if (c->user && !getpwnam(c->user))
		conf_err(ctx, config_lookup(cfg, "user"), "unknown user '%s'", c->user);
	if (c->api.token_file) {
		c->api.token = util_read_secret(c->api.token_file);
		if (!c->api.token || !*c->api.token)
			conf_err(ctx, config_lookup(cfg, "api.token_file"),
			    "cannot read a token from '%s'", c->api.token_file);
	}
	if (c->outbox.retry_max < c->outbox.retry_initial &&
	    (s = config_lookup(cfg, "outbox")))
		conf_err(ctx, s, "outbox retry_max is below retry_initial");
	if (c->broker.reconnect_max < c->broker.reconnect_initial)
		conf_err(ctx, config_lookup(cfg, "broker"),
		    "broker reconnect_max is below reconnect_initial");
	conf_check_subs(ctx, cfg, c);
	conf_check_sagas(ctx, cfg, c);
	if (strcmp(c->saga_queue_type, "quorum") != 0 && strcmp(c->saga_queue_type, "classic") != 0)
		conf_err(ctx, config_lookup(cfg, "saga_queue_type"),
		    "saga_queue_type must be quorum or classic");
	if (!ctx->errs->n)
		conf_saga_subscription(c);
}

/*
 * libconfig 1.5 includes one literal file per @include. A pattern such as
 * @include with a glob pattern (conf.d/NAME.conf with a star) is rewritten to include a generated file that
 * lists the matches, one @include each: the line count of the main file
 * stays the same, so every error keeps its true FILE:LINE.
 */
static int
conf_include_line(const char *line, size_t n, const char **q, const char **e)
{
	const char *p = line;

	while (p < line + n && (*p == ' ' || *p == '\t'))
		p++;
	if (strncmp(p, "@include", 8) != 0)
		return 0;
	*q = memchr(p, '"', line + n - p);
	if (!*q)
		return 0;
	*e = memchr(*q + 1, '"', line + n - (*q + 1));
	return *e != NULL;
}

/*
 * libconfig 1.5 includes one literal file per @include and puts its
 * include directory in front of every path, even an absolute one. So the
 * directory is left unset and every @include of the main file is rewritten
 * to an absolute path (relative paths are relative to the main file); a
 * pattern such as conf.d/NAME.conf with a star becomes one generated file
 * that includes each match. The main file keeps its line count, so every
 * error keeps its true FILE:LINE.
 */
static char *
conf_expand_includes(const char *text, const char *dir, const char *name,
    struct conf_errors *errs, char ***tmpfiles, size_t *ntmp)
{
	size_t cap = strlen(text) + 1, len = 0;
	char *out = malloc(cap);
	const char *line = text;
	unsigned lineno = 1;

	while (*line) {
		const char *eol = strchr(line, '\n');
		size_t n = eol ? (size_t)(eol - line + 1) : strlen(line);
		const char *q, *e;
		char pat[4096], tmpl[] = "/tmp/sagad-include-XXXXXX", *target = NULL;

		if (!conf_include_line(line, n, &q, &e)) {
			memcpy(out + len, line, n);
			len += n;
			line += n;
			lineno++;
			continue;
		}
		snprintf(pat, sizeof pat, "%s%s%.*s", q[1] == '/' ? "" : dir,
		    q[1] == '/' ? "" : "/", (int)(e - q - 1), q + 1);
		if (memchr(q + 1, '*', e - q - 1) || memchr(q + 1, '?', e - q - 1) ||
		    memchr(q + 1, '[', e - q - 1)) {
			glob_t g;
			FILE *f;
			int fd = mkstemp(tmpl);
			size_t i;

			if (fd >= 0 && (f = fdopen(fd, "w"))) {
				if (glob(pat, 0, NULL, &g) == 0) {
					struct stat sb;
					for (i = 0; i < g.gl_pathc; i++)
						if (stat(g.gl_pathv[i], &sb) == 0 && S_ISREG(sb.st_mode))
							fprintf(f, "@include \"%s\"\n", g.gl_pathv[i]);
					globfree(&g);
				}
				fclose(f);
				*tmpfiles = realloc(*tmpfiles, (*ntmp + 1) * sizeof **tmpfiles);
				(*tmpfiles)[(*ntmp)++] = strdup(tmpl);
				target = tmpl;
			} else if (fd >= 0)
				close(fd);
		}
		if (!target) {
			struct stat sb;
			/* libconfig's scanner exits the process on a directory. */
			if (stat(pat, &sb) == 0 && !S_ISREG(sb.st_mode)) {
				conf_err_push(errs, "%s:%u: @include \"%s\" is not a regular file",
				    name, lineno, pat);
				line += n;
				lineno++;
				continue;
			}
			target = pat;
		}
		cap += strlen(target) + 16;
		out = realloc(out, cap);
		len += sprintf(out + len, "@include \"%s\"%s", target, eol ? "\n" : "");
		line += n;
		lineno++;
	}
	out[len] = '\0';
	return out;
}

struct sagad_conf *
conf_load_string(const char *text, const char *name, const char *include_dir,
    struct conf_errors *errs)
{
	struct conf_ctx ctx = { name, errs };
	struct sagad_conf *c = calloc(1, sizeof *c);
	char **tmpfiles = NULL, *expanded;
	size_t ntmp = 0, i;
	config_t cfg;
	int ok;

	config_init(&cfg);
	expanded = conf_expand_includes(text, include_dir ? include_dir : ".", name, errs,
	    &tmpfiles, &ntmp);
	ok = errs->n ? CONFIG_FALSE : config_read_string(&cfg, expanded);
	free(expanded);
	for (i = 0; i < ntmp; i++) {
		unlink(tmpfiles[i]);
		free(tmpfiles[i]);
	}
	free(tmpfiles);
	c->file = strdup(name);
	conf_defaults(c);
	if (ok != CONFIG_TRUE && errs->n) {
		/* The include expansion already said what is wrong. */
		config_destroy(&cfg);
		conf_free(c);
		return NULL;
	}
	if (ok != CONFIG_TRUE) {
		const char *f = config_error_file(&cfg);
		/* A syntax error inside a generated include list is the list's
		 * own doing; report it against the main file. */
		if (!f || strncmp(f, "/tmp/sagad-include-", 19) == 0)
			f = name;
		conf_err_push(errs, "%s:%d: %s", f, config_error_line(&cfg),
		    config_error_text(&cfg));
		config_destroy(&cfg);
		conf_free(c);
		return NULL;
	}
	conf_walk(&ctx, config_root_setting(&cfg), conf_top_keys, c, NULL);
	conf_check(&ctx, &cfg, c);
	config_destroy(&cfg);
	if (errs->n) {
		conf_free(c);
		return NULL;
	}
	return c;
}

struct sagad_conf *
conf_load(const char *path, struct conf_errors *errs)
{
	FILE *f = fopen(path, "r");
	struct sagad_conf *c;
	char *text = NULL, *dir, *pathcopy;
	size_t cap = 0;
	ssize_t n;

	if (!f) {
		conf_err_push(errs, "%s:0: cannot open: %m", path);
		return NULL;
	}
	n = getdelim(&text, &cap, '\0', f);
	fclose(f);
	if (n < 0) {
		free(text);
		text = strdup("");
	}
	pathcopy = strdup(path);
	dir = dirname(pathcopy);
	c = conf_load_string(text, path, dir, errs);
	free(pathcopy);
	free(text);
	return c;
}

static void
conf_free_binding(struct conf_binding *b)
{
	free(b->exchange);
	free(b->key);
}

void
conf_free(struct sagad_conf *c)
{
	size_t i;

	if (!c)
		return;
	free(c->file); free(c->service); free(c->user);
	free(c->broker.url); free(c->broker.host); free(c->broker.user);
	free(c->broker.password); free(c->broker.vhost);
	free(c->broker.password_file); free(c->broker.tls_ca);
	free(c->broker.tls_cert); free(c->broker.tls_key);
	free(c->store.path);
	free(c->api.listen); free(c->api.admin_listen);
	free(c->api.token_file); free(c->api.token);
	for (i = 0; i < c->n_exchanges; i++) {
		free(c->exchanges[i].name);
		free(c->exchanges[i].type);
	}
	free(c->exchanges);
	for (i = 0; i < c->n_subs; i++) {
		struct conf_subscription *s = &c->subs[i];
		size_t j;
		free(s->name); free(s->queue); free(s->queue_type); free(s->deliver);
		for (j = 0; j < s->n_binds; j++) {
			free(s->binds[j].exchange);
			free(s->binds[j].key);
		}
		free(s->binds);
	}
	free(c->subs);
	for (i = 0; i < c->n_sagas; i++) {
		struct conf_saga *sg = &c->sagas[i];
		size_t j;
		free(sg->name); free(sg->mode_name);
		conf_free_binding(&sg->start);
		conf_free_binding(&sg->completed);
		conf_free_binding(&sg->compensated);
		for (j = 0; j < sg->n_steps; j++) {
			free(sg->steps[j].name);
			conf_free_binding(&sg->steps[j].command);
			conf_free_binding(&sg->steps[j].compensate);
			conf_free_binding(&sg->steps[j].success);
			conf_free_binding(&sg->steps[j].failure);
		}
		free(sg->steps);
	}
	free(c->sagas);
	free(c->saga_queue);
	free(c->saga_queue_type);
	for (i = 0; i < c->n_sources; i++) {
		struct conf_source *src = &c->sources[i];
		size_t j;
		free(src->plugin); free(src->name); free(src->file);
		for (j = 0; j < src->n_kv; j++) {
			free(src->kv[j].key);
			free(src->kv[j].s);
			free(src->kv[j].file);
		}
		free(src->kv);
	}
	free(c->sources);
	free(c);
}

const struct conf_saga *
conf_saga(const struct sagad_conf *conf, const char *name)
{
	size_t i;

	for (i = 0; i < conf->n_sagas; i++)
		if (conf->sagas[i].name && strcmp(conf->sagas[i].name, name) == 0)
			return &conf->sagas[i];
	return NULL;
}

const struct conf_subscription *
conf_subscription(const struct sagad_conf *conf, const char *name)
{
	size_t i;

	for (i = 0; i < conf->n_subs; i++)
		if (conf->subs[i].name && strcmp(conf->subs[i].name, name) == 0)
			return &conf->subs[i];
	return NULL;
}

void
conf_errors_clear(struct conf_errors *errs)
{
	size_t i;

	for (i = 0; i < errs->n; i++)
		free(errs->msg[i]);
	free(errs->msg);
	errs->msg = NULL;
	errs->n = 0;
}

const struct conf_exchange *
conf_exchange(const struct sagad_conf *conf, const char *name)
{
	size_t i;

	for (i = 0; i < conf->n_exchanges; i++)
		if (strcmp(conf->exchanges[i].name, name) == 0)
			return &conf->exchanges[i];
	return NULL;
}
