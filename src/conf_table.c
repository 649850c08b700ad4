#include "conf_table.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

/* ---- errors ---- */

void
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

void
conf_err(struct conf_ctx *ctx, const config_setting_t *s, const char *fmt, ...)
{
	const char *file = s ? config_setting_source_file(s) : NULL;
	char msg[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	conf_err_push(ctx->errs, "%s:%d: %s", file ? file : ctx->main_file,
	    s ? (int)config_setting_source_line(s) : 0, msg);
}

/* ---- the rows ---- */

/* Restart-only, derived, quiet: see conf_table.h. */
#define R CONF_RESTART
#define D CONF_DERIVED
#define Q CONF_QUIET
#define ROW(name, kind, off, flags, def, min, max) \
	{ name, kind, off, flags, def, min, max, NULL, 0, 0 }
#define GROUP(name, rows) { name, CONF_GROUP, 0, 0, NULL, 0, 0, rows, 0, 0 }
#define LIST(name, st, arr, count, flags, rows) \
	{ name, CONF_LIST, offsetof(st, arr), flags, NULL, 0, 0, rows, \
	  sizeof(*((st *)0)->arr), offsetof(st, count) }
#define END { NULL, 0, 0, 0, NULL, 0, 0, NULL, 0, 0 }

#define B(f) offsetof(struct sagad_conf, broker.f)
static const struct conf_key conf_tls_rows[] = {
	ROW("ca", CONF_STR, B(tls_ca), R, NULL, 0, 0),
	ROW("cert", CONF_STR, B(tls_cert), R, NULL, 0, 0),
	ROW("key", CONF_STR, B(tls_key), R, NULL, 0, 0),
	ROW("verify", CONF_BOOL, B(tls_verify), R, "true", 0, 0),
	END
};
static const struct conf_key conf_broker_rows[] = {
	ROW("url", CONF_STR, B(url), R, "amqp://guest:guest@127.0.0.1:5672/%2f", 0, 0),
	ROW("password_file", CONF_STR, B(password_file), R, NULL, 0, 0),
	ROW("heartbeat", CONF_DUR, B(heartbeat), R, "10", 0, 3600),
	ROW("connect_timeout", CONF_DUR, B(connect_timeout), R, "5", 0.01, 3600),
	ROW("reconnect_initial", CONF_DUR, B(reconnect_initial), R, "0.2", 0.01, 3600),
	ROW("reconnect_max", CONF_DUR, B(reconnect_max), R, "30", 0.01, 86400),
	GROUP("tls", conf_tls_rows),
	/* Parsed from the url; the password may come from password_file,
	 * so its change is named, the others follow the url. */
	ROW("host", CONF_STR, B(host), R | D | Q, NULL, 0, 0),
	ROW("user", CONF_STR, B(user), R | D | Q, NULL, 0, 0),
	ROW("password", CONF_STR, B(password), R | D, NULL, 0, 0),
	ROW("vhost", CONF_STR, B(vhost), R | D | Q, NULL, 0, 0),
	ROW("port", CONF_INT, B(port), R | D | Q, NULL, 0, 0),
	ROW("amqps", CONF_BOOL, B(tls), R | D | Q, NULL, 0, 0),
	END
};
#undef B
#define S(f) offsetof(struct sagad_conf, store.f)
static const struct conf_key conf_store_rows[] = {
	/* Default /var/lib/sagad/<service>.db, set by the checks. */
	ROW("path", CONF_STR, S(path), R, NULL, 0, 0),
	ROW("max_bytes", CONF_SIZE, S(max_bytes), 0, "1073741824", 65536, 0),
	ROW("dedup_window", CONF_DUR, S(dedup_window), 0, "604800", 0, 1e9),
	ROW("saga_retention", CONF_DUR, S(saga_retention), 0, "604800", 0, 1e9),
	END
};
#undef S
#define A(f) offsetof(struct sagad_conf, api.f)
static const struct conf_key conf_api_rows[] = {
	ROW("listen", CONF_STR, A(listen), R, "127.0.0.1:7600", 0, 0),
	ROW("admin_listen", CONF_STR, A(admin_listen), R, "127.0.0.1:7601", 0, 0),
	ROW("token_file", CONF_STR, A(token_file), 0, NULL, 0, 0),
	ROW("max_message_bytes", CONF_SIZE, A(max_message_bytes), 0, "1048576", 1, 134217728),
	ROW("max_header_bytes", CONF_SIZE, A(max_header_bytes), 0, "16384", 1024, 1048576),
	ROW("request_timeout", CONF_DUR, A(request_timeout), 0, "30", 0.1, 3600),
	ROW("socket_mode", CONF_MODE, A(socket_mode), R, "0660", 0, 0777),
	ROW("admin_allow_remote", CONF_BOOL, A(admin_allow_remote), R, "false", 0, 0),
	/* Read from token_file at every load: a reload rotates it. */
	ROW("token", CONF_STR, A(token), D, NULL, 0, 0),
	END
};
#undef A
#define O(f) offsetof(struct sagad_conf, outbox.f)
static const struct conf_key conf_outbox_rows[] = {
	ROW("max_inflight", CONF_INT, O(max_inflight), 0, "1024", 1, 65535),
	ROW("retry_initial", CONF_DUR, O(retry_initial), 0, "0.1", 0.001, 3600),
	ROW("retry_max", CONF_DUR, O(retry_max), 0, "30", 0.001, 86400),
	END
};
#undef O
/* List elements: their list row says whether a reload may change them. */
#define X(f) offsetof(struct conf_exchange, f)
static const struct conf_key conf_exchange_rows[] = {
	ROW("name", CONF_STR, X(name), 0, NULL, 0, 0),
	ROW("type", CONF_STR, X(type), 0, "topic", 0, 0),
	END
};
#undef X
#define U(f) offsetof(struct conf_subscription, f)
static const struct conf_key conf_sub_rows[] = {
	ROW("name", CONF_STR, U(name), 0, NULL, 0, 0),
	/* Default <service>.<name>, set by the checks. */
	ROW("queue", CONF_STR, U(queue), 0, NULL, 0, 0),
	ROW("queue_type", CONF_STR, U(queue_type), 0, "quorum", 0, 0),
	{ "bind", CONF_BINDINGS, U(binds), 0, NULL, 0, 0, NULL, 0, U(n_binds) },
	ROW("deliver", CONF_STR, U(deliver), 0, NULL, 0, 0),
	ROW("concurrency", CONF_INT, U(concurrency), 0, "16", 1, 1024),
	/* Defaults 4 and 2 x concurrency, set by the checks. */
	ROW("max_pending", CONF_INT, U(max_pending), 0, NULL, 1, 65535),
	ROW("prefetch", CONF_INT, U(prefetch), 0, NULL, 1, 65535),
	ROW("ordered", CONF_BOOL, U(ordered), 0, "false", 0, 0),
	ROW("timeout", CONF_DUR, U(timeout), 0, "10", 0.01, 3600),
	ROW("max_attempts", CONF_INT, U(max_attempts), 0, "5", 1, 1000000),
	ROW("retry_initial", CONF_DUR, U(retry_initial), 0, "1", 0.001, 86400),
	ROW("retry_max", CONF_DUR, U(retry_max), 0, "60", 0.001, 86400),
	ROW("circuit_failures", CONF_INT, U(circuit_failures), 0, "5", 1, 1000000),
	ROW("circuit_open", CONF_DUR, U(circuit_open), 0, "5", 0.01, 3600),
	ROW("max_message_bytes", CONF_SIZE, U(max_message_bytes), 0, "16777216", 1, 134217728),
	/* The saga engine's own subscription (conf.c). */
	ROW("internal", CONF_BOOL, U(internal), D, NULL, 0, 0),
	END
};
#undef U
#define SB(f) offsetof(struct conf_saga_step, f)
static const struct conf_key conf_step_rows[] = {
	ROW("name", CONF_STR, SB(name), 0, NULL, 0, 0),
	ROW("command", CONF_BINDING, SB(command), 0, NULL, 0, 0),
	ROW("compensate", CONF_BINDING, SB(compensate), 0, NULL, 0, 0),
	ROW("success", CONF_BINDING, SB(success), 0, NULL, 0, 0),
	ROW("failure", CONF_BINDING, SB(failure), 0, NULL, 0, 0),
	/* Default the saga's timeout, else 30: set by the checks. */
	ROW("timeout", CONF_DUR, SB(timeout), 0, NULL, 0, 86400 * 30),
	ROW("attempts", CONF_INT, SB(attempts), 0, "3", 1, 1000),
	END
};
#undef SB
#define SG(f) offsetof(struct conf_saga, f)
static const struct conf_key conf_saga_rows[] = {
	ROW("name", CONF_STR, SG(name), 0, NULL, 0, 0),
	ROW("mode", CONF_STR, SG(mode_name), 0, "orchestrated", 0, 0),
	ROW("start", CONF_BINDING, SG(start), 0, NULL, 0, 0),
	ROW("timeout", CONF_DUR, SG(timeout), 0, "0", 0, 86400 * 365),
	LIST("steps", struct conf_saga, steps, n_steps, 0, conf_step_rows),
	ROW("completed", CONF_BINDING, SG(completed), 0, NULL, 0, 0),
	ROW("compensated", CONF_BINDING, SG(compensated), 0, NULL, 0, 0),
	ROW("compensate_attempts", CONF_INT, SG(compensate_attempts), 0, "10", 1, 1000000),
	ROW("compensate_timeout", CONF_DUR, SG(compensate_timeout), 0, "10", 0.01, 86400),
	ROW("retry_initial", CONF_DUR, SG(retry_initial), 0, "0.5", 0.001, 86400),
	ROW("retry_max", CONF_DUR, SG(retry_max), 0, "30", 0.001, 86400),
	END
};
#undef SG
/* `plugin` and `name` are sagad's; every other key is the plugin's,
 * checked against its list when it is loaded (plugin.c). */
#define SR(f) offsetof(struct conf_source, f)
static const struct conf_key conf_source_rows[] = {
	ROW("plugin", CONF_STR, SR(plugin), 0, NULL, 0, 0),
	/* Default the plugin's name, set by the checks. */
	ROW("name", CONF_STR, SR(name), 0, NULL, 0, 0),
	ROW("file", CONF_STR, SR(file), D, NULL, 0, 0),
	{ "*", CONF_KVS, SR(kv), 0, NULL, 0, 0, NULL, sizeof(struct conf_kv), SR(n_kv) },
	END
};
#undef SR
#define T(f) offsetof(struct sagad_conf, f)
static const struct conf_key conf_top_rows[] = {
	ROW("service", CONF_STR, T(service), R, NULL, 0, 0),
	ROW("user", CONF_STR, T(user), R, NULL, 0, 0),
	ROW("drain_timeout", CONF_DUR, T(drain_timeout), 0, "10", 0, 3600),
	ROW("saga_queue_type", CONF_STR, T(saga_queue_type), R, "quorum", 0, 0),
	GROUP("broker", conf_broker_rows),
	GROUP("store", conf_store_rows),
	GROUP("api", conf_api_rows),
	GROUP("outbox", conf_outbox_rows),
	/* The broker connections, the deliveries, the saga engine and the
	 * plugins hold these for as long as they run. */
	LIST("exchanges", struct sagad_conf, exchanges, n_exchanges, R, conf_exchange_rows),
	LIST("subscriptions", struct sagad_conf, subs, n_subs, R, conf_sub_rows),
	LIST("sagas", struct sagad_conf, sagas, n_sagas, R, conf_saga_rows),
	LIST("sources", struct sagad_conf, sources, n_sources, R, conf_source_rows),
	ROW("file", CONF_STR, T(file), D, NULL, 0, 0),
	/* <service>.sagas: follows service and sagas. */
	ROW("saga_queue", CONF_STR, T(saga_queue), R | D | Q, NULL, 0, 0),
	END
};
#undef T
#undef ROW
#undef GROUP
#undef LIST
#undef END
#undef R
#undef D
#undef Q

const struct conf_key *
conf_table_root(void)
{
	return conf_top_rows;
}

const struct conf_key *
conf_table_find(const struct conf_key *rows, const char *path)
{
	const char *dot = strchr(path, '.');
	size_t n = dot ? (size_t)(dot - path) : strlen(path);
	const struct conf_key *k;

	for (k = rows; k->name; k++) {
		if (strlen(k->name) != n || strncmp(k->name, path, n) != 0)
			continue;
		if (!dot)
			return k;
		if (k->sub)
			return conf_table_find(k->sub, dot + 1);
	}
	return NULL;
}

/* ---- reading ---- */

static void *
ctab_at(const void *base, size_t off)
{
	return (char *)base + off;
}

static int
ctab_number(config_setting_t *s, double *out)
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
ctab_literal(struct conf_ctx *ctx, const config_setting_t *s, long long *out)
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

static int
ctab_mode(const char *v, int *out)
{
	char *end;
	long m = strtol(v, &end, 8);

	if (*v == '\0' || *end != '\0' || m < 0 || m > 0777)
		return -1;
	*out = (int)m;
	return 0;
}

static void
ctab_store_number(struct conf_ctx *ctx, config_setting_t *s, const struct conf_key *k,
    void *p)
{
	const char *name = config_setting_name(s);
	int is_float = config_setting_type(s) == CONFIG_TYPE_FLOAT;
	long long lit;
	double d;

	if (!ctab_number(s, &d)) {
		conf_err(ctx, s, "'%s' must be a number", name);
		return;
	}
	if (config_setting_type(s) == CONFIG_TYPE_INT && ctab_literal(ctx, s, &lit) == 0 &&
	    lit != (long long)d)
		d = (double)lit;
	if (d < k->min || (k->max > 0 && d > k->max)) {
		conf_err(ctx, s, "'%s' must be between %g and %g", name,
		    k->min, k->max > 0 ? k->max : 9.2e18);
		return;
	}
	if (k->kind == CONF_DUR)
		*(double *)p = d;
	else if (is_float)
		conf_err(ctx, s, "'%s' must be a whole number%s", name,
		    k->kind == CONF_SIZE ? " of bytes" : "");
	else if (k->kind == CONF_SIZE)
		*(int64_t *)p = (int64_t)d;
	else
		*(int *)p = (int)d;
}

/* "exchange:key" -> binding; the key may be empty (fanout). */
static int
ctab_split_binding(const char *v, struct conf_binding *b)
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
ctab_binding(struct conf_ctx *ctx, config_setting_t *s, struct conf_binding *b)
{
	const char *v = config_setting_get_string(s);

	free(b->exchange);
	free(b->key);
	memset(b, 0, sizeof *b);
	if (!v || ctab_split_binding(v, b) < 0 || !*b->key) {
		free(b->exchange);
		free(b->key);
		memset(b, 0, sizeof *b);
		conf_err(ctx, s, "'%s' must be \"exchange:routing-key\"", config_setting_name(s));
	}
}

static void
ctab_bindings(struct conf_ctx *ctx, config_setting_t *list, const struct conf_key *k,
    void *base)
{
	struct conf_binding **arr = ctab_at(base, k->off);
	size_t *count = ctab_at(base, k->cnt);
	int i, n;

	if (!config_setting_is_array(list) && !config_setting_is_list(list)) {
		conf_err(ctx, list, "'%s' must be a list of \"exchange:binding-key\" strings", k->name);
		return;
	}
	n = config_setting_length(list);
	*arr = calloc(n ? n : 1, sizeof **arr);
	for (i = 0; i < n; i++) {
		config_setting_t *e = config_setting_get_elem(list, i);
		const char *v = config_setting_get_string(e);

		if (!v || ctab_split_binding(v, &(*arr)[*count]) < 0) {
			conf_err(ctx, e, "bad binding '%s': want \"exchange:binding-key\"",
			    v ? v : "(not a string)");
			continue;
		}
		(*count)++;
	}
}

/* A key no row names, kept as written for the plugin to read. */
static void
ctab_kv(struct conf_ctx *ctx, config_setting_t *s, const struct conf_key *k, void *base)
{
	struct conf_kv **arr = ctab_at(base, k->off);
	size_t *count = ctab_at(base, k->cnt);
	const char *name = config_setting_name(s), *file = config_setting_source_file(s);
	struct conf_kv kv;

	memset(&kv, 0, sizeof kv);
	if (config_setting_type(s) == CONFIG_TYPE_STRING) {
		kv.type = CONF_KV_STRING;
		kv.s = strdup(config_setting_get_string(s));
	} else if (config_setting_type(s) == CONFIG_TYPE_BOOL) {
		kv.type = CONF_KV_BOOL;
		kv.b = config_setting_get_bool(s);
	} else if (ctab_number(s, &kv.d)) {
		kv.type = CONF_KV_NUMBER;
	} else {
		conf_err(ctx, s, "'%s' must be a string, a number or a boolean", name);
		return;
	}
	kv.key = strdup(name);
	kv.file = strdup(file ? file : ctx->main_file);
	kv.line = config_setting_source_line(s);
	*arr = realloc(*arr, (*count + 1) * sizeof **arr);
	(*arr)[(*count)++] = kv;
}

/* A list of groups, each element given its rows' defaults first. The
 * element is named by the list's name without its final s. */
static void
ctab_list(struct conf_ctx *ctx, config_setting_t *list, const struct conf_key *k, void *base)
{
	void **arr = ctab_at(base, k->off);
	size_t *count = ctab_at(base, k->cnt);
	char what[64];
	int i, n;

	snprintf(what, sizeof what, "%.*s", (int)strlen(k->name) - 1, k->name);
	if (!config_setting_is_list(list)) {
		conf_err(ctx, list, "'%s' must be a list ( { name = ...; }, ... )", k->name);
		return;
	}
	n = config_setting_length(list);
	*arr = calloc(n ? n : 1, k->elem);
	for (i = 0; i < n; i++) {
		config_setting_t *e = config_setting_get_elem(list, i);
		void *elem = (char *)*arr + (*count)++ * k->elem;

		conf_table_defaults(k->sub, elem);
		if (!config_setting_is_group(e)) {
			conf_err(ctx, e, "each %s must be a group { name = ...; }", what);
			continue;
		}
		conf_table_walk(ctx, e, k->sub, elem, what);
	}
}

static void
ctab_value(struct conf_ctx *ctx, config_setting_t *s, const struct conf_key *k, void *base)
{
	const char *name = config_setting_name(s);
	void *p = ctab_at(base, k->off);
	int type = config_setting_type(s);

	switch (k->kind) {
	case CONF_STR:
		if (type != CONFIG_TYPE_STRING) {
			conf_err(ctx, s, "'%s' must be a string", name);
			return;
		}
		free(*(char **)p);
		*(char **)p = strdup(config_setting_get_string(s));
		return;
	case CONF_BOOL:
		if (type != CONFIG_TYPE_BOOL)
			conf_err(ctx, s, "'%s' must be true or false", name);
		else
			*(int *)p = config_setting_get_bool(s);
		return;
	case CONF_MODE:
		if (type != CONFIG_TYPE_STRING)
			conf_err(ctx, s, "'%s' must be an octal string such as \"0660\"", name);
		else if (ctab_mode(config_setting_get_string(s), (int *)p) < 0)
			conf_err(ctx, s, "'%s' must be an octal mode between \"0000\" and \"0777\"", name);
		return;
	case CONF_DUR:
	case CONF_SIZE:
	case CONF_INT:
		ctab_store_number(ctx, s, k, p);
		return;
	case CONF_BINDING:
		ctab_binding(ctx, s, p);
		return;
	case CONF_BINDINGS:
		ctab_bindings(ctx, s, k, base);
		return;
	case CONF_LIST:
		ctab_list(ctx, s, k, base);
		return;
	case CONF_GROUP:
		if (type != CONFIG_TYPE_GROUP)
			conf_err(ctx, s, "'%s' must be a group { ... }", name);
		else
			conf_table_walk(ctx, s, k->sub, base, name);
		return;
	case CONF_KVS:
		ctab_kv(ctx, s, k, base);
		return;
	}
}

/* The row of a key of the file: derived rows are not keys; a key no row
 * names goes to the kvs row if there is one. */
static const struct conf_key *
ctab_row(const struct conf_key *rows, const char *name)
{
	const struct conf_key *k, *rest = NULL;

	for (k = rows; k->name; k++) {
		if (k->kind == CONF_KVS)
			rest = k;
		else if (!(k->flags & CONF_DERIVED) && strcmp(k->name, name) == 0)
			return k;
	}
	return rest;
}

void
conf_table_walk(struct conf_ctx *ctx, config_setting_t *group,
    const struct conf_key *rows, void *base, const char *where)
{
	int i, n = config_setting_length(group);

	for (i = 0; i < n; i++) {
		config_setting_t *s = config_setting_get_elem(group, i);
		const char *name = config_setting_name(s);
		const struct conf_key *k = ctab_row(rows, name);

		if (k)
			ctab_value(ctx, s, k, base);
		else if (where)
			conf_err(ctx, s, "unknown key '%s' in '%s'", name, where);
		else
			conf_err(ctx, s, "unknown key '%s'", name);
	}
}

/* ---- defaults, free, compare, reload ---- */

static void
ctab_default(const struct conf_key *k, void *base)
{
	void *p = ctab_at(base, k->off);

	switch (k->kind) {
	case CONF_STR:
		*(char **)p = strdup(k->def);
		break;
	case CONF_DUR:
		*(double *)p = strtod(k->def, NULL);
		break;
	case CONF_SIZE:
		*(int64_t *)p = strtoll(k->def, NULL, 10);
		break;
	case CONF_INT:
		*(int *)p = (int)strtol(k->def, NULL, 10);
		break;
	case CONF_BOOL:
		*(int *)p = strcmp(k->def, "true") == 0;
		break;
	case CONF_MODE:
		ctab_mode(k->def, p);
		break;
	default:
		break;
	}
}

void
conf_table_defaults(const struct conf_key *rows, void *base)
{
	const struct conf_key *k;

	for (k = rows; k->name; k++) {
		if (k->kind == CONF_GROUP)
			conf_table_defaults(k->sub, base);
		else if (k->def)
			ctab_default(k, base);
	}
}

static void
ctab_free_binding(struct conf_binding *b)
{
	free(b->exchange);
	free(b->key);
}

static void
ctab_free_row(const struct conf_key *k, void *base)
{
	void *p = ctab_at(base, k->off);
	size_t i, n = k->cnt ? *(size_t *)ctab_at(base, k->cnt) : 0;

	switch (k->kind) {
	case CONF_STR:
		free(*(char **)p);
		break;
	case CONF_BINDING:
		ctab_free_binding(p);
		break;
	case CONF_BINDINGS:
		for (i = 0; i < n; i++)
			ctab_free_binding(&(*(struct conf_binding **)p)[i]);
		free(*(void **)p);
		break;
	case CONF_LIST:
		for (i = 0; *(void **)p && i < n; i++)
			conf_table_free(k->sub, (char *)*(void **)p + i * k->elem);
		free(*(void **)p);
		break;
	case CONF_KVS:
		for (i = 0; i < n; i++) {
			struct conf_kv *kv = &(*(struct conf_kv **)p)[i];
			free(kv->key);
			free(kv->s);
			free(kv->file);
		}
		free(*(void **)p);
		break;
	case CONF_GROUP:
		conf_table_free(k->sub, base);
		break;
	default:
		break;
	}
}

void
conf_table_free(const struct conf_key *rows, void *base)
{
	const struct conf_key *k;

	for (k = rows; k->name; k++)
		ctab_free_row(k, base);
}

static int
ctab_str_equal(const char *a, const char *b)
{
	return strcmp(a ? a : "", b ? b : "") == 0 && (a == NULL) == (b == NULL);
}

static int
ctab_binding_equal(const struct conf_binding *a, const struct conf_binding *b)
{
	return ctab_str_equal(a->exchange, b->exchange) && ctab_str_equal(a->key, b->key);
}

static int
ctab_kv_equal(const struct conf_kv *a, const struct conf_kv *b)
{
	return strcmp(a->key, b->key) == 0 && a->type == b->type &&
	    ctab_str_equal(a->s, b->s) && a->d == b->d && a->b == b->b;
}

/* Arrays: the same count and equal elements. */
static int
ctab_array_equal(const struct conf_key *k, const void *a, const void *b)
{
	const char *pa = *(char *const *)ctab_at(a, k->off), *pb = *(char *const *)ctab_at(b, k->off);
	size_t n = *(size_t *)ctab_at(a, k->cnt), i;

	if (n != *(size_t *)ctab_at(b, k->cnt))
		return 0;
	for (i = 0; i < n; i++) {
		int eq;
		if (k->kind == CONF_BINDINGS)
			eq = ctab_binding_equal((const struct conf_binding *)pa + i,
			    (const struct conf_binding *)pb + i);
		else if (k->kind == CONF_KVS)
			eq = ctab_kv_equal((const struct conf_kv *)pa + i, (const struct conf_kv *)pb + i);
		else
			eq = conf_table_equal(k->sub, pa + i * k->elem, pb + i * k->elem);
		if (!eq)
			return 0;
	}
	return 1;
}

static int
ctab_row_equal(const struct conf_key *k, const void *a, const void *b)
{
	const void *pa = ctab_at(a, k->off), *pb = ctab_at(b, k->off);

	switch (k->kind) {
	case CONF_STR:
		return ctab_str_equal(*(char *const *)pa, *(char *const *)pb);
	case CONF_DUR:
		return *(const double *)pa == *(const double *)pb;
	case CONF_SIZE:
		return *(const int64_t *)pa == *(const int64_t *)pb;
	case CONF_INT:
	case CONF_BOOL:
	case CONF_MODE:
		return *(const int *)pa == *(const int *)pb;
	case CONF_BINDING:
		return ctab_binding_equal(pa, pb);
	case CONF_GROUP:
		return conf_table_equal(k->sub, a, b);
	case CONF_BINDINGS:
	case CONF_LIST:
	case CONF_KVS:
		return ctab_array_equal(k, a, b);
	}
	return 0;
}

int
conf_table_equal(const struct conf_key *rows, const void *a, const void *b)
{
	const struct conf_key *k;

	for (k = rows; k->name; k++)
		if (!ctab_row_equal(k, a, b))
			return 0;
	return 1;
}

static size_t
ctab_size(const struct conf_key *k)
{
	switch (k->kind) {
	case CONF_STR:
	case CONF_BINDINGS:
	case CONF_LIST:
	case CONF_KVS:
		return sizeof(void *);
	case CONF_DUR:
		return sizeof(double);
	case CONF_SIZE:
		return sizeof(int64_t);
	case CONF_INT:
	case CONF_BOOL:
	case CONF_MODE:
		return sizeof(int);
	case CONF_BINDING:
		return sizeof(struct conf_binding);
	case CONF_GROUP:
		break;
	}
	return 0;
}

static void
ctab_swap(void *a, void *b, size_t n)
{
	unsigned char *pa = a, *pb = b, t;
	size_t i;

	for (i = 0; i < n; i++) {
		t = pa[i];
		pa[i] = pb[i];
		pb[i] = t;
	}
}

/* Moves the row's value, with its count for arrays. */
static void
ctab_swap_row(const struct conf_key *k, void *a, void *b)
{
	ctab_swap(ctab_at(a, k->off), ctab_at(b, k->off), ctab_size(k));
	if (k->kind == CONF_BINDINGS || k->kind == CONF_LIST || k->kind == CONF_KVS)
		ctab_swap(ctab_at(a, k->cnt), ctab_at(b, k->cnt), sizeof(size_t));
}

static void
ctab_append(char *buf, size_t len, const char *name)
{
	size_t used = strlen(buf);

	snprintf(buf + used, len - used, "%s%s", used ? " " : "", name);
}

int
conf_table_keep(const struct conf_key *rows, void *nb, void *ob, const char *prefix,
    char *changed, size_t len)
{
	const struct conf_key *k;
	char name[128];
	int n = 0;

	for (k = rows; k->name; k++) {
		snprintf(name, sizeof name, "%s%s", prefix, k->name);
		if (k->kind == CONF_GROUP) {
			char sub[130];
			snprintf(sub, sizeof sub, "%s.", name);
			n += conf_table_keep(k->sub, nb, ob, sub, changed, len);
			continue;
		}
		if (!(k->flags & CONF_RESTART))
			continue;
		if (!(k->flags & CONF_QUIET) && !ctab_row_equal(k, nb, ob)) {
			ctab_append(changed, len, name);
			n++;
		}
		ctab_swap_row(k, nb, ob);
	}
	return n;
}
