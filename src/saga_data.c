#include "saga_data.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "xmalloc.h"

enum sd_ref_kind {
	SD_START,
	SD_STEP,
	SD_SAGA_ID,
	SD_SAGA_NAME
};

struct sd_ref {
	enum sd_ref_kind kind;
	char step[256];
	const char *pointer;	/* into the reference text; "" for the whole */
};

/* ---- JSON Pointer (RFC 6901) ---- */

/* One reference token, unescaped (~1 is '/', ~0 is '~'); -1 if malformed. */
static int
sd_token(const char *p, size_t n, char *out, size_t len)
{
	size_t i, o = 0;

	for (i = 0; i < n; i++) {
		char c = p[i];
		if (c == '~') {
			if (i + 1 >= n || (p[i + 1] != '0' && p[i + 1] != '1'))
				return -1;
			c = p[++i] == '0' ? '~' : '/';
		}
		if (o + 1 >= len)
			return -1;
		out[o++] = c;
	}
	out[o] = '\0';
	return 0;
}

/* An array index: "0" or digits without a leading zero. */
static int
sd_index(const char *t, size_t *out)
{
	char *end;
	unsigned long v;

	if (!*t || (t[0] == '0' && t[1]) || t[0] < '0' || t[0] > '9')
		return -1;
	v = strtoul(t, &end, 10);
	if (*end)
		return -1;
	*out = v;
	return 0;
}

json_t *
saga_data_pointer(json_t *doc, const char *pointer)
{
	char tok[1024];

	if (*pointer && *pointer != '/')
		return NULL;
	while (doc && *pointer == '/') {
		const char *next = strchr(pointer + 1, '/');
		size_t n = next ? (size_t)(next - pointer - 1) : strlen(pointer + 1), i;

		if (sd_token(pointer + 1, n, tok, sizeof tok) < 0)
			return NULL;
		if (json_is_object(doc))
			doc = json_object_get(doc, tok);
		else if (json_is_array(doc) && sd_index(tok, &i) == 0)
			doc = json_array_get(doc, i);
		else
			return NULL;
		pointer += n + 1;
	}
	return doc;
}

/* ---- references ---- */

static int
sd_parse_ref(const char *s, struct sd_ref *r, char err[SAGA_DATA_ERR])
{
	const char *p;

	if (strcmp(s, "$saga.id") == 0 || strcmp(s, "$saga.name") == 0) {
		r->kind = s[6] == 'i' ? SD_SAGA_ID : SD_SAGA_NAME;
		r->pointer = "";
		return 0;
	}
	if (strncmp(s, "$start", 6) == 0 && (s[6] == '\0' || s[6] == '/')) {
		r->kind = SD_START;
		r->pointer = s + 6;
		return 0;
	}
	if (strncmp(s, "$steps.", 7) == 0) {
		for (p = strstr(s + 7, ".reply"); p; p = strstr(p + 1, ".reply"))
			if ((p[6] == '\0' || p[6] == '/') && p > s + 7 &&
			    (size_t)(p - s - 7) < sizeof r->step) {
				r->kind = SD_STEP;
				snprintf(r->step, sizeof r->step, "%.*s", (int)(p - s - 7), s + 7);
				r->pointer = p + 6;
				return 0;
			}
	}
	snprintf(err, SAGA_DATA_ERR, "unknown reference '%.200s' (use $start, "
	    "$steps.NAME.reply, each with an optional /json/pointer, $saga.id or $saga.name)", s);
	return -1;
}

/* A body as JSON; one that is not JSON is a string, but only as a whole. */
static json_t *
sd_body(const char *body, size_t len, const char *pointer, const char *what,
    char err[SAGA_DATA_ERR])
{
	json_error_t je;
	json_t *doc = json_loadb(body ? body : "", len, JSON_DECODE_ANY, &je), *v;

	if (!doc) {
		if (!*pointer)
			return json_stringn(body ? body : "", len);
		snprintf(err, SAGA_DATA_ERR, "%s is not JSON: no %.200s in it", what, pointer);
		return NULL;
	}
	v = saga_data_pointer(doc, pointer);
	if (!v) {
		snprintf(err, SAGA_DATA_ERR, "%s has no %.200s", what, pointer);
		json_decref(doc);
		return NULL;
	}
	json_incref(v);
	json_decref(doc);
	return v;
}

/* The value a reference names (a new reference), or NULL with err. */
static json_t *
sd_resolve(const char *s, const struct saga_data_src *src, char err[SAGA_DATA_ERR])
{
	struct sd_ref r;
	const char *body;
	size_t len;
	char what[300];

	if (sd_parse_ref(s, &r, err) < 0)
		return NULL;
	switch (r.kind) {
	case SD_SAGA_ID:
		return json_string(src->saga_id);
	case SD_SAGA_NAME:
		return json_string(src->saga_name);
	case SD_START:
		return sd_body(src->start, src->start_len, r.pointer, "the start event", err);
	case SD_STEP:
		if (!src->reply || !src->reply(src->arg, r.step, &body, &len)) {
			snprintf(err, SAGA_DATA_ERR, "step %.200s has no reply (%.200s)", r.step, s);
			return NULL;
		}
		snprintf(what, sizeof what, "the reply of step %.200s", r.step);
		return sd_body(body, len, r.pointer, what, err);
	}
	return NULL;
}

/* ---- templates ---- */

/* Checking a configuration: the reference's form, and that the step it
 * names may be referred to. */
static int
sd_check_ref(const char *s, const struct saga_data_src *src, char err[SAGA_DATA_ERR])
{
	struct sd_ref r;

	if (sd_parse_ref(s, &r, err) < 0)
		return -1;
	if (r.kind == SD_STEP && src->reply && !src->reply(src->arg, r.step, NULL, NULL)) {
		snprintf(err, SAGA_DATA_ERR, "'%.200s' names no earlier step of this saga", s);
		return -1;
	}
	return 0;
}

/* What a template's string value becomes: a reference's value, or the
 * string itself ("$$x" is "$x"). Checking: null stands for the value. */
static json_t *
sd_value(json_t *e, const struct saga_data_src *src, char err[SAGA_DATA_ERR])
{
	const char *s = json_string_value(e);

	if (s[0] != '$')
		return json_incref(e);
	if (s[1] == '$')
		return json_string(s + 1);
	if (src->check)
		return sd_check_ref(s, src, err) < 0 ? NULL : json_null();
	return sd_resolve(s, src, err);
}

static int sd_fill(json_t *v, const struct saga_data_src *src, char err[SAGA_DATA_ERR]);

/* One member of a template: a container filled in place, a string's
 * value into *nv (to be set in its place). -1 with err. */
static int
sd_fill_member(json_t *e, const struct saga_data_src *src, char err[SAGA_DATA_ERR],
    json_t **nv)
{
	*nv = NULL;
	if (!json_is_string(e))
		return sd_fill(e, src, err);
	*nv = sd_value(e, src, err);
	return *nv ? 0 : -1;
}

/* Replaces, in place, every reference under v; -1 with err at the first
 * that cannot be resolved. */
static int
sd_fill(json_t *v, const struct saga_data_src *src, char err[SAGA_DATA_ERR])
{
	const char *key;
	json_t *e, *nv;
	size_t i;

	json_object_foreach(v, key, e) {
		if (sd_fill_member(e, src, err, &nv) < 0)
			return -1;
		if (nv)
			json_object_set_new(v, key, nv);
	}
	json_array_foreach(v, i, e) {
		if (sd_fill_member(e, src, err, &nv) < 0)
			return -1;
		if (nv)
			json_array_set_new(v, i, nv);
	}
	return 0;
}

/* The template rendered as a json_t (new), or NULL with err. */
static json_t *
sd_render(const char *tpl, const struct saga_data_src *src, char err[SAGA_DATA_ERR])
{
	json_error_t je;
	json_t *t = json_loads(tpl, JSON_DECODE_ANY, &je), *out;

	if (!t) {
		snprintf(err, SAGA_DATA_ERR, "template is not JSON: %s", je.text);
		return NULL;
	}
	if (json_is_string(t)) {	/* body = "$start/order"; */
		out = sd_value(t, src, err);
		json_decref(t);
		return out;
	}
	if (sd_fill(t, src, err) < 0) {
		json_decref(t);
		return NULL;
	}
	return t;
}

char *
saga_data_render(const char *tpl, const struct saga_data_src *src, char err[SAGA_DATA_ERR])
{
	json_t *v = sd_render(tpl, src, err);
	char *text;

	if (!v)
		return NULL;
	text = json_dumps(v, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_ENCODE_ANY);
	json_decref(v);
	return text;
}

char *
saga_data_headers(const char *tpl, const struct saga_data_src *src, char err[SAGA_DATA_ERR])
{
	json_t *v = sd_render(tpl, src, err), *e;
	const char *key;
	char *text;

	if (!v)
		return NULL;
	json_object_foreach(v, key, e) {
		if (!json_is_string(e)) {
			char *t = json_dumps(e, JSON_COMPACT | JSON_ENCODE_ANY);
			json_object_set_new(v, key, json_string(t ? t : ""));
			free(t);
		}
	}
	text = json_dumps(v, JSON_COMPACT | JSON_PRESERVE_ORDER);
	json_decref(v);
	return text;
}

int
saga_data_check_template(const char *tpl, const struct saga_data_src *check,
    char err[SAGA_DATA_ERR])
{
	json_t *v = sd_render(tpl, check, err);

	json_decref(v);
	return v ? 0 : -1;
}

/* ---- conditions ---- */

enum sd_op { SD_EQ, SD_NE, SD_LT, SD_GT, SD_LE, SD_GE, SD_EXISTS, SD_MISSING };

static const struct {
	const char *word;
	enum sd_op op;
} sd_ops[] = {
	{ "==", SD_EQ }, { "!=", SD_NE }, { "<=", SD_LE }, { ">=", SD_GE },
	{ "<", SD_LT }, { ">", SD_GT }, { "exists", SD_EXISTS }, { "missing", SD_MISSING },
};

struct sd_cond {
	char ref[1024];
	enum sd_op op;
	json_t *value;		/* NULL for exists/missing */
};

static int
sd_cond_parse(const char *cond, struct sd_cond *c, char err[SAGA_DATA_ERR])
{
	const char *sp = strchr(cond, ' '), *rest;
	struct sd_ref r;
	json_error_t je;
	size_t i, n = 0;

	memset(c, 0, sizeof *c);
	if (!sp || (size_t)(sp - cond) >= sizeof c->ref) {
		snprintf(err, SAGA_DATA_ERR, "a condition is \"REFERENCE OP VALUE\" or "
		    "\"REFERENCE exists|missing\"");
		return -1;
	}
	snprintf(c->ref, sizeof c->ref, "%.*s", (int)(sp - cond), cond);
	if (c->ref[0] != '$' || c->ref[1] == '$' || sd_parse_ref(c->ref, &r, err) < 0) {
		if (c->ref[0] != '$' || c->ref[1] == '$')
			snprintf(err, SAGA_DATA_ERR, "a condition starts with a reference ($start, "
			    "$steps.NAME.reply, ...), not '%.200s'", c->ref);
		return -1;
	}
	while (*sp == ' ')
		sp++;
	for (i = 0; i < sizeof sd_ops / sizeof sd_ops[0]; i++) {
		n = strlen(sd_ops[i].word);
		if (strncmp(sp, sd_ops[i].word, n) == 0 && (sp[n] == ' ' || sp[n] == '\0'))
			break;
	}
	if (i == sizeof sd_ops / sizeof sd_ops[0]) {
		snprintf(err, SAGA_DATA_ERR, "unknown operator in '%.200s' "
		    "(== != < > <= >= exists missing)", cond);
		return -1;
	}
	c->op = sd_ops[i].op;
	rest = sp + n;
	while (*rest == ' ')
		rest++;
	if (c->op == SD_EXISTS || c->op == SD_MISSING) {
		if (*rest) {
			snprintf(err, SAGA_DATA_ERR, "nothing may follow %s", sd_ops[i].word);
			return -1;
		}
		return 0;
	}
	c->value = json_loads(rest, JSON_DECODE_ANY, &je);
	if (!c->value || json_is_object(c->value) || json_is_array(c->value)) {
		json_decref(c->value);
		c->value = NULL;
		snprintf(err, SAGA_DATA_ERR, "the value in '%.200s' must be a number, a \"string\", "
		    "true, false or null", cond);
		return -1;
	}
	return 0;
}

int
saga_data_check(const char *cond, const struct saga_data_src *check, char err[SAGA_DATA_ERR])
{
	struct sd_cond c;

	if (sd_cond_parse(cond, &c, err) < 0)
		return -1;
	json_decref(c.value);
	return sd_check_ref(c.ref, check, err);
}

/* <0, 0, >0, or 2 when a and b cannot be ordered. */
static int
sd_compare(const json_t *a, const json_t *b)
{
	if (json_is_number(a) && json_is_number(b)) {
		double x = json_number_value(a), y = json_number_value(b);
		return x < y ? -1 : x > y;
	}
	if (json_is_string(a) && json_is_string(b)) {
		int r = strcmp(json_string_value(a), json_string_value(b));
		return r < 0 ? -1 : r > 0;
	}
	return json_equal((json_t *)a, (json_t *)b) ? 0 : 2;
}

int
saga_data_when(const char *cond, const struct saga_data_src *src)
{
	char err[SAGA_DATA_ERR];
	struct sd_cond c;
	json_t *v;
	int r, cmp;

	if (sd_cond_parse(cond, &c, err) < 0)
		return 0;	/* checked at load: cannot happen */
	v = sd_resolve(c.ref, src, err);
	if (c.op == SD_EXISTS || c.op == SD_MISSING) {
		r = (v != NULL) == (c.op == SD_EXISTS);
	} else if (!v) {
		r = 0;
	} else {
		cmp = sd_compare(v, c.value);
		switch (c.op) {
		case SD_EQ: r = cmp == 0; break;
		case SD_NE: r = cmp != 0; break;
		case SD_LT: r = cmp == -1; break;
		case SD_GT: r = cmp == 1; break;
		case SD_LE: r = cmp == -1 || cmp == 0; break;
		default: r = cmp == 1 || cmp == 0; break;
		}
	}
	json_decref(v);
	json_decref(c.value);
	return r;
}
