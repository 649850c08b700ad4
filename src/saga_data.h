/*
 * Data between a saga's steps (sagad.conf(5), SAGAS: data between steps):
 * references to the start event and to earlier steps' replies, addressed
 * with JSON Pointers (RFC 6901), used in the templates of a step's body
 * and headers and in its `when` condition. Knows nothing of the engine:
 * the instance is seen through struct saga_data_src.
 *
 * A reference is a string that starts with "$":
 *   $start[/pointer]               the start event
 *   $steps.NAME.reply[/pointer]    the reply (or success event) of step NAME
 *   $saga.id, $saga.name           the saga id, the saga's name
 * "$$..." is the literal string "$...". Every other value is literal.
 */
#ifndef SAGAD_SAGA_DATA_H
#define SAGAD_SAGA_DATA_H

#include <stddef.h>

struct saga_data_src {
	const char *saga_id, *saga_name;
	const char *start;		/* the start event's body */
	size_t start_len;
	/* The body step NAME succeeded with: 1, or 0 when it has none
	 * (not succeeded, skipped, unknown). With check set (the
	 * configuration's checks), body and len are NULL and the answer
	 * says whether NAME may be referred to at all. */
	int (*reply)(void *arg, const char *step, const char **body, size_t *len);
	void *arg;
	int check;		/* only check the references' form and steps */
};

#define SAGA_DATA_ERR 512

/*
 * A template (JSON text, as the configuration reader made it) rendered
 * against src: a malloc'd JSON text, or NULL with err saying which
 * reference is missing or not JSON.
 */
char *saga_data_render(const char *tpl, const struct saga_data_src *src,
    char err[SAGA_DATA_ERR]);
/*
 * A headers template (a JSON object) rendered: a malloc'd JSON object text
 * whose values are all strings (a non-string value as its JSON text), or
 * NULL with err.
 */
char *saga_data_headers(const char *tpl, const struct saga_data_src *src,
    char err[SAGA_DATA_ERR]);

/*
 * A condition, "REF OP VALUE" or "REF exists" / "REF missing", OP one of
 * == != < > <= >=, VALUE a JSON value (a number, "a string", true, false,
 * null). saga_data_check: 0, or -1 with err (a configuration error).
 * saga_data_when: 1 true, 0 false; a missing reference makes every
 * comparison false (and "missing" true).
 */
int saga_data_check(const char *cond, const struct saga_data_src *check,
    char err[SAGA_DATA_ERR]);
int saga_data_when(const char *cond, const struct saga_data_src *src);
/* A template's references are well formed and name steps check accepts:
 * 0, or -1 with err. */
int saga_data_check_template(const char *tpl, const struct saga_data_src *check,
    char err[SAGA_DATA_ERR]);

/* RFC 6901: the value at pointer ("" is the whole document) in doc, or
 * NULL. (Exposed for the unit tests.) */
struct json_t;
struct json_t *saga_data_pointer(struct json_t *doc, const char *pointer);

#endif
