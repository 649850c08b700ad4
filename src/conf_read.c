#include "conf_read.h"

#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf_table.h"
#include "util.h"
#include "xmalloc.h"

/*
 * Reading a group of the file into the struct its rows describe: each
 * setting is matched to its row, checked against the row's kind and range
 * and stored where the row says. Errors are collected as FILE:LINE lines.
 */

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
	errs->msg = xrealloc(errs->msg, (errs->n + 1) * sizeof *errs->msg);
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

static int
cread_number(config_setting_t *s, double *out)
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
cread_literal(struct conf_ctx *ctx, const config_setting_t *s, long long *out)
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
cread_mode(const char *v, int *out)
{
	char *end;
	long m = strtol(v, &end, 8);

	if (*v == '\0' || *end != '\0' || m < 0 || m > 0777)
		return -1;
	*out = (int)m;
	return 0;
}

static void
cread_store_number(struct conf_ctx *ctx, config_setting_t *s, const struct conf_key *k,
    void *p)
{
	const char *name = config_setting_name(s);
	int is_float = config_setting_type(s) == CONFIG_TYPE_FLOAT;
	long long lit;
	double d;

	if (!cread_number(s, &d)) {
		conf_err(ctx, s, "'%s' must be a number", name);
		return;
	}
	if (config_setting_type(s) == CONFIG_TYPE_INT && cread_literal(ctx, s, &lit) == 0 &&
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
cread_split_binding(const char *v, struct conf_binding *b)
{
	const char *colon = strchr(v, ':');

	if (!colon || colon == v)
		return -1;
	b->exchange = xstrndup(v, colon - v);
	b->key = xstrdup(colon + 1);
	if (!util_valid_exchange(b->exchange) || !util_valid_shortstr(b->key, 255)) {
		free(b->exchange);
		free(b->key);
		b->exchange = b->key = NULL;
		return -1;
	}
	return 0;
}

static void
cread_binding(struct conf_ctx *ctx, config_setting_t *s, struct conf_binding *b)
{
	const char *v = config_setting_get_string(s);

	free(b->exchange);
	free(b->key);
	memset(b, 0, sizeof *b);
	if (!v || cread_split_binding(v, b) < 0 || !*b->key) {
		free(b->exchange);
		free(b->key);
		memset(b, 0, sizeof *b);
		conf_err(ctx, s, "'%s' must be \"exchange:routing-key\"", config_setting_name(s));
	}
}

static void
cread_bindings(struct conf_ctx *ctx, config_setting_t *list, const struct conf_key *k,
    void *base)
{
	struct conf_binding **arr = conf_table_at(base, k->off);
	size_t *count = conf_table_at(base, k->cnt);
	int i, n;

	if (!config_setting_is_array(list) && !config_setting_is_list(list)) {
		conf_err(ctx, list, "'%s' must be a list of \"exchange:binding-key\" strings", k->name);
		return;
	}
	n = config_setting_length(list);
	*arr = xcalloc(n ? n : 1, sizeof **arr);
	for (i = 0; i < n; i++) {
		config_setting_t *e = config_setting_get_elem(list, i);
		const char *v = config_setting_get_string(e);

		if (!v || cread_split_binding(v, &(*arr)[*count]) < 0) {
			conf_err(ctx, e, "bad binding '%s': want \"exchange:binding-key\"",
			    v ? v : "(not a string)");
			continue;
		}
		(*count)++;
	}
}

/* A key no row names, kept as written for the plugin to read. */
static void
cread_kv(struct conf_ctx *ctx, config_setting_t *s, const struct conf_key *k, void *base)
{
	struct conf_kv **arr = conf_table_at(base, k->off);
	size_t *count = conf_table_at(base, k->cnt);
	const char *name = config_setting_name(s), *file = config_setting_source_file(s);
	struct conf_kv kv;

	memset(&kv, 0, sizeof kv);
	if (config_setting_type(s) == CONFIG_TYPE_STRING) {
		kv.type = CONF_KV_STRING;
		kv.s = xstrdup(config_setting_get_string(s));
	} else if (config_setting_type(s) == CONFIG_TYPE_BOOL) {
		kv.type = CONF_KV_BOOL;
		kv.b = config_setting_get_bool(s);
	} else if (cread_number(s, &kv.d)) {
		kv.type = CONF_KV_NUMBER;
	} else {
		conf_err(ctx, s, "'%s' must be a string, a number or a boolean", name);
		return;
	}
	kv.key = xstrdup(name);
	kv.file = xstrdup(file ? file : ctx->main_file);
	kv.line = config_setting_source_line(s);
	*arr = xrealloc(*arr, (*count + 1) * sizeof **arr);
	(*arr)[(*count)++] = kv;
}

/* A list of groups, each element given its rows' defaults first. The
 * element is named by the list's name without its final s. */
static void
cread_list(struct conf_ctx *ctx, config_setting_t *list, const struct conf_key *k, void *base)
{
	void **arr = conf_table_at(base, k->off);
	size_t *count = conf_table_at(base, k->cnt);
	char what[64];
	int i, n;

	snprintf(what, sizeof what, "%.*s", (int)strlen(k->name) - 1, k->name);
	if (!config_setting_is_list(list)) {
		conf_err(ctx, list, "'%s' must be a list ( { name = ...; }, ... )", k->name);
		return;
	}
	n = config_setting_length(list);
	*arr = xcalloc(n ? n : 1, k->elem);
	for (i = 0; i < n; i++) {
		config_setting_t *e = config_setting_get_elem(list, i);
		void *elem = (char *)*arr + (*count)++ * k->elem;

		conf_table_defaults(k->sub, elem);
		if (!config_setting_is_group(e)) {
			conf_err(ctx, e, "each %s must be a group { name = ...; }", what);
			continue;
		}
		conf_read_walk(ctx, e, k->sub, elem, what);
	}
}

/* A setting as JSON: groups are objects (in the file's order), lists and
 * arrays are arrays. */
static json_t *
cread_to_json(const config_setting_t *s)
{
	json_t *j;
	int i, n;

	switch (config_setting_type(s)) {
	case CONFIG_TYPE_INT:
		return json_integer(config_setting_get_int(s));
	case CONFIG_TYPE_INT64:
		return json_integer(config_setting_get_int64(s));
	case CONFIG_TYPE_FLOAT:
		return json_real(config_setting_get_float(s));
	case CONFIG_TYPE_BOOL:
		return json_boolean(config_setting_get_bool(s));
	case CONFIG_TYPE_STRING:
		return json_string(config_setting_get_string(s));
	case CONFIG_TYPE_GROUP:
		j = json_object();
		n = config_setting_length(s);
		for (i = 0; i < n; i++) {
			config_setting_t *e = config_setting_get_elem(s, i);
			json_object_set_new(j, config_setting_name(e), cread_to_json(e));
		}
		return j;
	default:	/* list, array */
		j = json_array();
		n = config_setting_length(s);
		for (i = 0; i < n; i++)
			json_array_append_new(j, cread_to_json(config_setting_get_elem(s, i)));
		return j;
	}
}

static void
cread_json(config_setting_t *s, char **p)
{
	json_t *j = cread_to_json(s);

	free(*p);
	*p = json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_ENCODE_ANY);
	json_decref(j);
}

static void
cread_value(struct conf_ctx *ctx, config_setting_t *s, const struct conf_key *k, void *base)
{
	const char *name = config_setting_name(s);
	void *p = conf_table_at(base, k->off);
	int type = config_setting_type(s);

	switch (k->kind) {
	case CONF_STR:
		if (type != CONFIG_TYPE_STRING) {
			conf_err(ctx, s, "'%s' must be a string", name);
			return;
		}
		free(*(char **)p);
		*(char **)p = xstrdup(config_setting_get_string(s));
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
		else if (cread_mode(config_setting_get_string(s), (int *)p) < 0)
			conf_err(ctx, s, "'%s' must be an octal mode between \"0000\" and \"0777\"", name);
		return;
	case CONF_DUR:
	case CONF_SIZE:
	case CONF_INT:
		cread_store_number(ctx, s, k, p);
		return;
	case CONF_BINDING:
		cread_binding(ctx, s, p);
		return;
	case CONF_BINDINGS:
		cread_bindings(ctx, s, k, base);
		return;
	case CONF_LIST:
		cread_list(ctx, s, k, base);
		return;
	case CONF_GROUP:
		if (type != CONFIG_TYPE_GROUP)
			conf_err(ctx, s, "'%s' must be a group { ... }", name);
		else
			conf_read_walk(ctx, s, k->sub, base, name);
		return;
	case CONF_KVS:
		cread_kv(ctx, s, k, base);
		return;
	case CONF_JSON:
		cread_json(s, p);
		return;
	}
}

/* The row of a key of the file: derived rows are not keys; a key no row
 * names goes to the kvs row if there is one. */
static const struct conf_key *
cread_row(const struct conf_key *rows, const char *name)
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
conf_read_walk(struct conf_ctx *ctx, config_setting_t *group,
    const struct conf_key *rows, void *base, const char *where)
{
	int i, n = config_setting_length(group);

	for (i = 0; i < n; i++) {
		config_setting_t *s = config_setting_get_elem(group, i);
		const char *name = config_setting_name(s);
		const struct conf_key *k = cread_row(rows, name);

		if (k)
			cread_value(ctx, s, k, base);
		else if (where)
			conf_err(ctx, s, "unknown key '%s' in '%s'", name, where);
		else
			conf_err(ctx, s, "unknown key '%s'", name);
	}
}

