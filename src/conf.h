/* Configuration: libconfig file -> struct sagad_conf, with FILE:LINE errors. */
#ifndef SAGAD_CONF_H
#define SAGAD_CONF_H

#include <stddef.h>
#include <stdint.h>

struct conf_exchange {
	char *name;
	char *type;		/* direct, topic, fanout, headers */
};

struct conf_binding {
	char *exchange;
	char *key;
};

struct conf_subscription {
	char *name;
	char *queue;		/* default <service>.<name> */
	char *queue_type;	/* quorum or classic */
	struct conf_binding *binds;
	size_t n_binds;
	char *deliver;		/* http://host:port/path, or "amqp" */
	int frontdoor;		/* deliver = "amqp": to front-door consumers */
	int concurrency;
	int max_pending;
	int prefetch;		/* basic.qos; default 2 x concurrency */
	int ordered;
	double timeout;
	int max_attempts;
	double retry_initial, retry_max;
	int circuit_failures;	/* consecutive failures that open the circuit */
	double circuit_open;	/* seconds before a probe */
	int64_t max_message_bytes;
	int internal;		/* consumed by the saga engine, not over HTTP */
	char *dedup;		/* "local" (default) or "shared" */
	int shared_dedup;	/* dedup = "shared": claims in the PostgreSQL store */
	/* Two-phase commit in the service's PostgreSQL (txpg.c): the service
	 * ends a PREPARE with PREPARE TRANSACTION, sagad finishes it. */
	char *prepared_conninfo;	/* or read from prepared_conninfo_file */
	char *prepared_conninfo_file;
};

/* One key of a source's block, kept as written for its plugin to read. */
enum conf_kv_type { CONF_KV_STRING, CONF_KV_NUMBER, CONF_KV_BOOL };

struct conf_kv {
	char *key;
	enum conf_kv_type type;
	char *s;
	double d;
	int b;
	char *file;
	int line;
};

struct conf_source {
	char *plugin;		/* a name in the plugin directory, or a path */
	char *name;		/* unique; default the plugin's name */
	struct conf_kv *kv;
	size_t n_kv;
	char *file;
	int line;
};

enum saga_mode {
	SAGA_ORCHESTRATED,	/* sagad sends the commands */
	SAGA_CHOREOGRAPHED	/* services react to events; sagad watches */
};

struct conf_saga_step {
	char *name;
	struct conf_binding command;	/* orchestrated */
	struct conf_binding compensate;	/* optional */
	struct conf_binding success;	/* choreographed */
	struct conf_binding failure;	/* choreographed, optional */
	/* choreographed, optional: the compensation is an event, confirmed
	 * by these events (not by a reply) */
	struct conf_binding compensate_success, compensate_failure;
	double timeout;			/* per command attempt; 0: saga's */
	int attempts;			/* command sends before the step times out */
	int notify;			/* one-way: sent without reply_to, not awaited */
	/* Templates (JSON text, saga_data.h): the command's body and headers
	 * and the compensation's; NULL: the start event (command) or the
	 * step's reply (compensation), no extra headers. */
	char *body, *headers, *compensate_body, *compensate_headers;
	char *when;			/* condition to run the step; NULL: always */
	int pivot;			/* the point of no return (at most one) */
	char *group;			/* consecutive steps of one group run at once */
};

struct conf_saga {
	char *name;
	char *mode_name;
	enum saga_mode mode;
	struct conf_binding start;
	double timeout;			/* whole saga; 0: none */
	struct conf_saga_step *steps;
	size_t n_steps;
	struct conf_binding completed, compensated;	/* optional */
	int compensate_attempts;
	double compensate_timeout;	/* wait for a compensation reply */
	double retry_initial, retry_max;	/* between compensation attempts, and
					 * sends of a step after the pivot */
	int retry_attempts;		/* sends of a step after the pivot */
	/* Built by sagad from an entry of `transactions` (conf_tx.c): a
	 * two-phase commit in the shape of a saga. Never set in a file. */
	int transaction;
};

/* A participant of a two-phase commit (transactions = ( ... )). */
struct conf_tx_part {
	char *name;
	struct conf_binding prepare, commit, abort;
};

/* A two-phase commit that sagad coordinates (conf_tx.c, sagad.conf(5)). */
struct conf_tx {
	char *name;
	struct conf_binding start;
	struct conf_tx_part *parts;
	size_t n_parts;
	struct conf_binding committed, aborted;	/* optional outcome events */
	double prepare_timeout;		/* all votes within this, or abort */
	double decision_retry_initial, decision_retry_max;
};

struct conf_broker {
	char *url;		/* as written, may carry a password */
	char *host, *user, *password, *vhost;
	int port;
	int tls;		/* amqps:// */
	char *password_file;
	double heartbeat;
	double connect_timeout;
	double reconnect_initial, reconnect_max;
	char *tls_ca, *tls_cert, *tls_key;
	int tls_verify;
};

struct conf_store {
	char *path;
	int64_t max_bytes;
	double dedup_window;
	double saga_retention;	/* finished sagas are kept this long */
};

struct conf_api {
	char *listen;
	char *admin_listen;
	char *token_file;
	char *token;		/* read from token_file at load */
	int64_t max_message_bytes;
	int64_t max_header_bytes;
	double request_timeout;
	int socket_mode;
	int admin_allow_remote;
	char *ui_dir;		/* the web page's files; "" turns it off */
};

/* The AMQP front door (amqp = { ... }; amqpd.c): NULL listen, no listener. */
struct conf_amqp {
	char *listen;		/* "HOST:PORT" or "unix:/path"; NULL or "": none */
	int allow_remote;	/* a non-loopback listen is an error without it */
};

/* Where the saga engine keeps its sagas (saga_store = { ... }). */
enum conf_saga_backend {
	SAGA_BACKEND_SQLITE,	/* in sagad's own store (store.path), as always */
	SAGA_BACKEND_PGSQL	/* in PostgreSQL, shared by the service's replicas */
};

struct conf_saga_store {
	char *backend_name;	/* "sqlite" (default) or "pgsql", as written */
	enum conf_saga_backend backend;	/* from backend_name */
	/*
	 * pgsql only: the libpq conninfo string or URI, as written or read
	 * from conninfo_file (trailing newline stripped), whichever was
	 * given; NULL with sqlite. It may hold a password: never print it
	 * (saga_pg_mask_conninfo masks it).
	 */
	char *conninfo;
	char *conninfo_file;	/* as written; NULL when not given */
	char *schema;		/* default "sagad"; 1..63 bytes */
	double relay_grace;	/* seconds before another replica publishes
				 * a replica's unpublished saga messages */
	double early_window;	/* seconds a choreographed event waits for its
				 * saga's start before it is an orphan */
};

struct conf_outbox {
	int max_inflight;
	double retry_initial, retry_max;
};

/* OpenTelemetry export (tracing = { ... }); off without an endpoint. */
struct conf_tracing {
	char *endpoint;		/* OTLP/HTTP, http://host[:port][/path] */
	double sampling;	/* share of new traces sampled, 0..1 */
	int queue;		/* spans held for export; more are dropped */
	int batch;		/* spans per request */
	double interval;	/* the longest a span waits for a batch */
	double timeout;		/* for the collector's answer */
	/* Whether a message without a context starts a trace: "auto" (when
	 * an endpoint is set), "always" or "never"; start is what it
	 * resolves to (conf_check_tracing). */
	char *new_traces;
	int start;
};

struct sagad_conf {
	char *file;		/* the file it was read from */
	char *service;
	char *user;
	double drain_timeout;
	struct conf_broker broker;
	struct conf_store store;
	struct conf_api api;
	struct conf_amqp amqp;
	struct conf_outbox outbox;
	struct conf_saga_store saga_store;
	struct conf_tracing tracing;
	struct conf_exchange *exchanges;
	size_t n_exchanges;
	struct conf_subscription *subs;
	size_t n_subs;
	struct conf_saga *sagas;	/* the file's, then those built from
					 * transactions (conf_tx.c) */
	size_t n_sagas;
	struct conf_tx *txs;
	size_t n_txs;
	double in_doubt_timeout;	/* a participant asks its coordinator */
	char *saga_queue;	/* <service>.sagas: starts, events and replies */
	char *saga_queue_type;	/* its queue type: quorum (default) or classic */
	struct conf_source *sources;
	size_t n_sources;
};

/* Errors collected while loading, each "FILE:LINE: message". */
struct conf_errors {
	char **msg;
	size_t n;
};

/* Load and validate; returns NULL with errs filled on any error. */
struct sagad_conf *conf_load(const char *path, struct conf_errors *errs);
/* The same from a string (tests and fuzzing); name is used in errors. */
struct sagad_conf *conf_load_string(const char *text, const char *name,
    const char *include_dir, struct conf_errors *errs);
void conf_free(struct sagad_conf *conf);
/*
 * On reload: the restart-only keys of nc take the running values of oc
 * (and oc the new ones, freed with it), so that what the running modules
 * hold keeps its address. The restart-only keys the file changed are
 * written to changed, space separated; returns their number.
 */
int conf_reload_keep(struct sagad_conf *nc, struct sagad_conf *oc, char *changed, size_t len);
void conf_errors_clear(struct conf_errors *errs);

/* Find an exchange by name; NULL if not configured. */
const struct conf_exchange *conf_exchange(const struct sagad_conf *conf,
    const char *name);

/* Binds the internal saga subscription (the last one, _sagas) to sg's
 * choreographed events too: an older version's, whose instances run on. */
void conf_saga_bind_events(struct sagad_conf *c, const struct conf_saga *sg);
const struct conf_saga *conf_saga(const struct sagad_conf *conf, const char *name);
const struct conf_subscription *conf_subscription(const struct sagad_conf *conf,
    const char *name);

#endif
