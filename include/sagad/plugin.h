/*
 * sagad plugin ABI (see sagad-plugins(7)).
 *
 * A plugin is a shared object that exports one symbol, `sagad_plugin`, a
 * struct sagad_plugin whose abi field is SAGAD_PLUGIN_ABI. sagad loads it
 * for each entry of `sources = ( { plugin = "NAME"; ... } )`, checks the
 * entry's keys against the plugin's list, and calls init() with the host's
 * API. Everything runs on sagad's event loop (one thread): a plugin must
 * never block it, and may call the host only from that thread.
 *
 * The ABI number changes whenever a struct below changes incompatibly; a
 * plugin built for another number is refused with a clear error.
 */
#ifndef SAGAD_PLUGIN_H
#define SAGAD_PLUGIN_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SAGAD_PLUGIN_ABI 2

struct event_base;
struct sagad_host;		/* one per configured source; opaque */

enum sagad_log_level {
	SAGAD_LOG_ERROR,
	SAGAD_LOG_WARN,
	SAGAD_LOG_INFO,
	SAGAD_LOG_DEBUG
};

/* One key=value of a log line. Values are typed and sagad quotes strings
 * itself, so that no value (an id, an error text from a database) can end
 * the line or forge a field: build fields with the macros below, which take
 * a key that must be a string literal. */
enum sagad_log_type {
	SAGAD_LOG_T_STR,
	SAGAD_LOG_T_INT,
	SAGAD_LOG_T_UINT,
	SAGAD_LOG_T_DBL,
	SAGAD_LOG_T_HEX
};

struct sagad_log_field {
	const char *key;
	enum sagad_log_type type;
	union {
		const char *s;		/* NULL logs as "" */
		long long i;
		unsigned long long u;
		double d;
	} v;
};

#define SAGAD_STR(k, val)  { .key = "" k "", .type = SAGAD_LOG_T_STR, .v.s = (val) }
#define SAGAD_INT(k, val)  { .key = "" k "", .type = SAGAD_LOG_T_INT, .v.i = (val) }
#define SAGAD_UINT(k, val) { .key = "" k "", .type = SAGAD_LOG_T_UINT, .v.u = (val) }
#define SAGAD_DBL(k, val)  { .key = "" k "", .type = SAGAD_LOG_T_DBL, .v.d = (val) }
#define SAGAD_HEX(k, val)  { .key = "" k "", .type = SAGAD_LOG_T_HEX, .v.u = (val) }

/* The fields of one line as an array and its length; the leading empty
 * element lets a line have no fields at all. */
#define SAGAD_LOG_FIELDS_(...) ((const struct sagad_log_field[]){ { 0 }, __VA_ARGS__ })
#define SAGAD_LOG_NFIELDS_(...) \
	(sizeof SAGAD_LOG_FIELDS_(__VA_ARGS__) / sizeof(struct sagad_log_field) - 1)

/* SAGAD_LOG(api, h, SAGAD_LOG_INFO, "batch read", SAGAD_INT("rows", n))
 * The macros use C99 compound literals; C++ has none: there, fill an array
 * of struct sagad_log_field and call log() with it. */
#define SAGAD_LOG(api, h, level, msg, ...) \
	(api)->log((h), (level), (msg), SAGAD_LOG_FIELDS_(__VA_ARGS__) + 1, \
	    SAGAD_LOG_NFIELDS_(__VA_ARGS__))

/* A message handed to sagad's outbox. Strings are NUL-terminated UTF-8;
 * optional ones may be NULL. Everything is copied before publish returns. */
struct sagad_message {
	const char *message_id;		/* required: the dedup key */
	const char *exchange;		/* "" is the default exchange */
	const char *routing_key;
	const char *content_type;
	const char *correlation_id;
	const char *type;
	const char *const *header_names;	/* AMQP headers (string values) */
	const char *const *header_values;
	size_t n_headers;
	const void *body;
	size_t body_len;
};

enum sagad_publish_result {
	SAGAD_PUBLISH_STORED = 0,	/* joins the current store transaction */
	SAGAD_PUBLISH_DUPLICATE = 1,	/* message_id seen within dedup_window */
	SAGAD_PUBLISH_FULL = -1,	/* store.max_bytes reached or disk full */
	SAGAD_PUBLISH_INVALID = -2,	/* bad names or ids; nothing stored */
	SAGAD_PUBLISH_ERROR = -3	/* the store failed */
};

/* ok: 1 when everything handed over before the call is durable (fsync'd);
 * 0 when the store lost that transaction (hand the messages over again). */
typedef void sagad_durable_fn(void *cookie, int ok);

struct sagad_host_api {
	unsigned abi;
	struct event_base *(*event_base)(struct sagad_host *h);
	/* One logfmt line: msg and n fields, quoted by sagad, with the
	 * source's name added. Call it through SAGAD_LOG. */
	void (*log)(struct sagad_host *h, enum sagad_log_level level, const char *msg,
	    const struct sagad_log_field *fields, size_t n);
	/* The source's config block. Return 0 and set *out if the key is there
	 * with that type, -1 otherwise. Strings live as long as the source. */
	int (*conf_string)(struct sagad_host *h, const char *key, const char **out);
	int (*conf_number)(struct sagad_host *h, const char *key, double *out);
	int (*conf_bool)(struct sagad_host *h, const char *key, int *out);
	const char *(*source_name)(struct sagad_host *h);
	/* The outbox. */
	enum sagad_publish_result (*publish)(struct sagad_host *h, const struct sagad_message *m);
	void (*when_durable)(struct sagad_host *h, sagad_durable_fn *fn, void *cookie);
	/* Metrics, exported as sagad_source_<name>{source="..."}: counters
	 * only grow (add), gauges are set. */
	void (*counter_add)(struct sagad_host *h, const char *name, double delta);
	void (*gauge_set)(struct sagad_host *h, const char *name, double value);
	/* Readiness: /readyz answers 503 with the reason while a source is
	 * not ready (e.g. its database is unreachable). */
	void (*set_ready)(struct sagad_host *h, int ready, const char *reason);
};

struct sagad_plugin {
	unsigned abi;			/* SAGAD_PLUGIN_ABI */
	const char *name;
	const char *version;
	const char *const *keys;	/* accepted config keys, NULL-terminated */
	/* Check the config and start; on failure return -1 with a message in
	 * err. *state is handed back to stop(). */
	int (*init)(const struct sagad_host_api *api, struct sagad_host *h,
	    void **state, char *err, size_t errlen);
	/* Stop at shutdown: release everything; no host calls after it. */
	void (*stop)(void *state);
};

#ifdef __cplusplus
}
#endif

#endif
