#include "admin.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <jansson.h>
#include <sys/queue.h>
#include <event2/keyvalq_struct.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "broker.h"
#include "broker_url.h"
#include "conf.h"
#include "delivery.h"
#include "httpd.h"
#include "ingress.h"
#include "amqpd.h"
#include "metrics.h"
#include "otel.h"
#include "plugin.h"
#include "relay.h"
#include "saga.h"
#include "saga_store.h"
#include "sagad.h"
#include "store.h"
#include "util.h"
#include "webui.h"
#include "xmalloc.h"

#define ADMIN_LIST_MAX 1000

struct admin {
	struct sagad *d;
	struct evhttp *http;
};

typedef void admin_handler(struct admin *, struct evhttp_request *);

static const char *const admin_link_names[] = {
	[RELAY_LINK_DOWN] = "down",
	[RELAY_LINK_UP] = "up",
	[RELAY_LINK_BLOCKED] = "blocked",
};

static const char *const admin_state_names[] = {
	[SAGAD_RUNNING] = "running",
	[SAGAD_DRAINING] = "draining",
	[SAGAD_STOPPED] = "stopped",
};

static double
admin_oldest_age(struct sagad *d)
{
	double oldest = store_outbox_oldest(d->store);

	return oldest > 0 ? util_now() - oldest : 0;
}

static void
admin_healthz(struct admin *a, struct evhttp_request *req)
{
	(void)a;
	httpd_reply_json(req, 200, json_pack("{s:s}", "status", "ok"));
}

static void
admin_readyz(struct admin *a, struct evhttp_request *req)
{
	struct sagad *d = a->d;
	const char *reason = NULL;

	if (d->state != SAGAD_RUNNING)
		httpd_reply_json(req, 503, json_pack("{s:s,s:s}", "status", "not-ready",
		    "reason", "shutting down"));
	else if (!store_writable(d->store))
		httpd_reply_json(req, 503, json_pack("{s:s,s:s}", "status", "not-ready",
		    "reason", "store is full or not writable"));
	else if (relay_link(d->relay) == RELAY_LINK_DOWN)
		httpd_reply_json(req, 503, json_pack("{s:s,s:s}", "status", "not-ready",
		    "reason", *relay_link_reason(d->relay) ?
		    relay_link_reason(d->relay) : "broker not connected"));
	else if (!delivery_connected(d->delivery))
		httpd_reply_json(req, 503, json_pack("{s:s,s:s}", "status", "not-ready",
		    "reason", "consumer connection to the broker is down"));
	else if (!plugins_ready(d->plugins, &reason))
		httpd_reply_json(req, 503, json_pack("{s:s,s:s}", "status", "not-ready",
		    "reason", reason));
	else
		httpd_reply_json(req, 200, json_pack("{s:s}", "status", "ready"));
}

/*
 * The daemon-wide metrics, each described once (sagad(8) METRICS lists
 * them): name, type, help, and the expression that reads it, over d, rs
 * (relay figures), is (ingress figures) and fs (fsync times). The
 * subscriptions' and the sagas' metrics are in delivery.c and saga_admin.c.
 */
#define ADMIN_METRICS(X)							\
	X(sagad_outbox_pending, gauge,						\
	    "Messages in the outbox, not yet confirmed by the broker.",		\
	    store_outbox_count(d->store))					\
	X(sagad_outbox_inflight, gauge,						\
	    "Messages published and waiting for the broker's confirm.",		\
	    relay_inflight(d->relay))						\
	X(sagad_outbox_oldest_age_seconds, gauge,				\
	    "Age of the oldest message in the outbox.", admin_oldest_age(d))	\
	X(sagad_accepted_total, counter,					\
	    "Messages accepted by the publish API (202).", is->accepted)	\
	X(sagad_publish_duplicates_total, counter,				\
	    "Publish requests answered as duplicates (200).", is->duplicates)	\
	X(sagad_publish_rejected_total, counter,				\
	    "Publish requests refused as malformed or too large.", is->rejected) \
	X(sagad_store_full_total, counter,					\
	    "Publish requests refused with 507.", is->full)			\
	X(sagad_published_total, counter,					\
	    "Messages confirmed by the broker.", rs->published)			\
	X(sagad_unroutable_total, counter,					\
	    "Publishes returned by the broker as unroutable (retried).", rs->unroutable) \
	X(sagad_nacked_total, counter,						\
	    "Publishes refused by the broker with basic.nack (retried).", rs->nacked) \
	X(sagad_publish_confirm_seconds, histogram,				\
	    "Time from publish to the broker's confirm.", &rs->confirm)		\
	X(sagad_broker_connected, gauge,					\
	    "1 while the broker connection is up.",				\
	    relay_link(d->relay) != RELAY_LINK_DOWN)				\
	X(sagad_broker_blocked, gauge,						\
	    "1 while the broker blocks publishing (resource alarm).",		\
	    relay_link(d->relay) == RELAY_LINK_BLOCKED)				\
	X(sagad_broker_reconnects_total, counter,				\
	    "Broker connections made after the first.", rs->reconnects)		\
	X(sagad_store_bytes, gauge,						\
	    "Bytes in use in the store file.", store_bytes(d->store))		\
	X(sagad_store_max_bytes, gauge,						\
	    "The configured store.max_bytes (alert on sagad_store_bytes against it).", \
	    d->conf->store.max_bytes)						\
	X(sagad_store_fsync_seconds, histogram,					\
	    "How long each fsync of the store's write-ahead log took (the floor of every ack and 202).", \
	    &fs)								\
	X(sagad_config_reloads_total, counter,					\
	    "Successful SIGHUP reloads.", d->reloads)				\
	X(sagad_config_reload_failures_total, counter,				\
	    "SIGHUP reloads refused (invalid file).", d->reload_failures)

/* One row: a histogram's expression is its address, any other a number. */
#define ADMIN_EMIT_gauge(name, expr)	metrics_sample(out, name, "", (double)(expr))
#define ADMIN_EMIT_counter ADMIN_EMIT_gauge
#define ADMIN_EMIT_histogram(name, expr) metrics_histogram(out, name, "", (expr))
#define ADMIN_EMIT(name, type, help, expr)					\
	metrics_family(out, #name, #type, help);				\
	ADMIN_EMIT_##type(#name, expr);

/* sagad_broker_node{role,node} 1: the node each connection is up on. */
static void
admin_metrics_nodes(struct sagad *d, struct evbuffer *out)
{
	struct broker *b[2] = { d->broker, d->consumer };
	const char *role[2] = { "publish", "consume" };
	char node[300], labels[400];
	int i;

	metrics_family(out, "sagad_broker_node", "gauge",
	    "1 for the broker.url node (host:port) each connection is up on.");
	for (i = 0; i < 2; i++) {
		if (!b[i] || !broker_node_name(b[i], node, sizeof node))
			continue;
		snprintf(labels, sizeof labels, "role=\"%s\",node=\"%s\"", role[i], node);
		metrics_sample(out, "sagad_broker_node", labels, 1);
	}
}

static void
admin_metrics(struct admin *a, struct evhttp_request *req)
{
	struct sagad *d = a->d;
	const struct relay_stats *rs = relay_stats(d->relay);
	const struct ingress_stats *is = ingress_stats(d->ingress);
	struct evbuffer *out = evbuffer_new();
	struct histogram fs;

	store_fsync_histogram(d->store, &fs);
	ADMIN_METRICS(ADMIN_EMIT)
	admin_metrics_nodes(d, out);
	amqpd_metrics(d->amqpd, out);
	delivery_metrics(d->delivery, out);
	if (d->saga)
		saga_metrics(d->saga, out);
	plugins_metrics(d->plugins, out);
	otel_metrics(d->otel, out);
	evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type",
	    "text/plain; version=0.0.4");
	evhttp_send_reply(req, 200, "OK", out);
	evbuffer_free(out);
}

/* Which node of broker.url each connection is up on (null while down). */
static void
admin_status_nodes(struct sagad *d, json_t *broker)
{
	char node[300];

	json_object_set_new(broker, "node", broker_node_name(d->broker, node, sizeof node) ?
	    json_string(node) : json_null());
	if (d->consumer)
		json_object_set_new(broker, "consumer_node",
		    broker_node_name(d->consumer, node, sizeof node) ?
		    json_string(node) : json_null());
}

/* The configured sagas, for the web page's filter: [{name, mode, steps}]. */
static json_t *
admin_saga_definitions(const struct sagad_conf *c)
{
	json_t *list = json_array();
	size_t i, k;

	for (i = 0; i < c->n_sagas; i++) {
		json_t *steps = json_array();
		for (k = 0; k < c->sagas[i].n_steps; k++)
			json_array_append_new(steps, json_string(c->sagas[i].steps[k].name));
		json_array_append_new(list, json_pack("{s:s,s:s,s:o}", "name", c->sagas[i].name,
		    "mode", c->sagas[i].mode == SAGA_ORCHESTRATED ? "orchestrated" : "choreographed",
		    "steps", steps));
	}
	return list;
}

static void
admin_status(struct admin *a, struct evhttp_request *req)
{
	struct sagad *d = a->d;
	const struct relay_stats *rs = relay_stats(d->relay);
	char url[1024];
	json_t *subs = json_array(), *j;
	size_t i;

	for (i = 0; i < d->conf->n_subs; i++)
		json_array_append_new(subs, delivery_sub_json(d->delivery, (int)i));
	/* Never the password: operators paste this into tickets. */
	broker_url_mask(d->conf->broker.url, url, sizeof url);
	j = json_pack(
	    "{s:s,s:s,s:i,s:f,s:s,"
	    "s:{s:s,s:b,s:s,s:s,s:I},"
	    "s:{s:s,s:s,s:I,s:I,s:b},"
	    "s:{s:I,s:i,s:f,s:I,s:I,s:I}}",
	    "service", d->conf->service, "version", PACKAGE_VERSION,
	    "pid", (int)getpid(), "uptime_seconds", util_now() - d->started,
	    "state", admin_state_names[d->state],
	    "broker", "url", url,
	    "connected", relay_link(d->relay) != RELAY_LINK_DOWN,
	    "link", admin_link_names[relay_link(d->relay)],
	    "reason", relay_link_reason(d->relay),
	    "reconnects", (json_int_t)rs->reconnects,
	    "store", "path", store_path(d->store), "replica_id", store_replica_id(d->store),
	    "bytes", (json_int_t)store_bytes(d->store),
	    "max_bytes", (json_int_t)d->conf->store.max_bytes,
	    "writable", store_writable(d->store),
	    "outbox", "pending", (json_int_t)store_outbox_count(d->store),
	    "inflight", (int)relay_inflight(d->relay),
	    "oldest_age_seconds", admin_oldest_age(d),
	    "published_total", (json_int_t)rs->published,
	    "unroutable_total", (json_int_t)rs->unroutable,
	    "nacked_total", (json_int_t)rs->nacked);
	json_object_set_new(j, "subscriptions", subs);
	json_object_set_new(j, "sagas", admin_saga_definitions(d->conf));
	admin_status_nodes(d, json_object_get(j, "broker"));
	httpd_reply_json(req, 200, j);
}

static long
admin_query_long(struct evhttp_request *req, const char *key, long def, long max)
{
	const struct evhttp_uri *u = evhttp_request_get_evhttp_uri(req);
	const char *q = evhttp_uri_get_query(u);
	struct evkeyvalq params;
	const char *v;
	long n = def;

	if (!q)
		return def;
	TAILQ_INIT(&params);
	if (evhttp_parse_query_str(q, &params) == 0 &&
	    (v = evhttp_find_header(&params, key)) != NULL) {
		char *end;
		n = strtol(v, &end, 10);
		if (*end || n < 0)
			n = def;
	}
	evhttp_clear_headers(&params);
	return n > max ? max : n;
}

static void
admin_outbox(struct admin *a, struct evhttp_request *req)
{
	struct sagad *d = a->d;
	long limit = admin_query_long(req, "limit", 100, ADMIN_LIST_MAX);
	long after = admin_query_long(req, "after", 0, 0x7fffffffL);
	struct store_row *rows = xcalloc(limit ? limit : 1, sizeof *rows);
	json_t *list = json_array();
	double now = util_now();
	size_t i, n = 0;

	if (store_outbox_list(d->store, after, limit, rows, &n) < 0) {
		free(rows);
		json_decref(list);
		httpd_error(req, 500, "store-error", "cannot read the outbox");
		return;
	}
	for (i = 0; i < n; i++)
		json_array_append_new(list, json_pack(
		    "{s:I,s:s,s:s,s:s,s:i,s:f,s:f,s:f,s:s,s:I,s:s?}",
		    "seq", (json_int_t)rows[i].seq, "message_id", rows[i].message_id,
		    "exchange", rows[i].exchange, "routing_key", rows[i].routing_key,
		    "attempts", (int)rows[i].attempts, "created_at", rows[i].created_at,
		    "age_seconds", now - rows[i].created_at,
		    "retry_at", rows[i].due_at, "last_error", rows[i].last_error,
		    "bytes", (json_int_t)rows[i].body_len,
		    "trace_id", rows[i].trace_id[0] ? rows[i].trace_id : NULL));
	free(rows);
	httpd_reply_json(req, 200, json_pack("{s:I,s:i,s:f,s:o}",
	    "pending", (json_int_t)store_outbox_count(d->store),
	    "inflight", (int)relay_inflight(d->relay),
	    "oldest_age_seconds", admin_oldest_age(d), "messages", list));
}

static void
admin_subscriptions(struct admin *a, struct evhttp_request *req)
{
	json_t *subs = json_array();
	size_t i;

	for (i = 0; i < a->d->conf->n_subs; i++)
		json_array_append_new(subs, delivery_sub_json(a->d->delivery, (int)i));
	httpd_reply_json(req, 200, json_pack("{s:o}", "subscriptions", subs));
}

/* The request body as JSON; an empty body is an empty object. */
static json_t *
admin_body_json(struct evhttp_request *req)
{
	struct evbuffer *b = evhttp_request_get_input_buffer(req);
	size_t len = evbuffer_get_length(b);
	json_error_t e;

	if (len == 0)
		return json_object();
	return json_loadb((const char *)evbuffer_pullup(b, -1), len, 0, &e);
}

/* GET /v1/admin/dlq/{sub}, POST /v1/admin/dlq/{sub}/replay */
static void
admin_dlq(struct admin *a, struct evhttp_request *req, const char *rest)
{
	struct sagad *d = a->d;
	char name[256];
	const char *slash = strchr(rest, '/');
	int sub, post = evhttp_request_get_command(req) == EVHTTP_REQ_POST;

	snprintf(name, sizeof name, "%.*s", slash ? (int)(slash - rest) : (int)strlen(rest), rest);
	sub = delivery_sub_index(d->delivery, name);
	if (sub < 0) {
		httpd_error(req, 404, "unknown-subscription", "no subscription named '%s'", name);
		return;
	}
	if (!slash && !post) {
		json_t *j = delivery_dlq_json(d->delivery, sub,
		    (size_t)admin_query_long(req, "limit", 100, ADMIN_LIST_MAX));
		if (!j)
			httpd_error(req, 500, "store-error", "cannot read the dead letters");
		else
			httpd_reply_json(req, 200, j);
		return;
	}
	if (slash && strcmp(slash, "/replay") == 0 && post) {
		json_t *body = admin_body_json(req), *ids, *v;
		const char **list = NULL;
		size_t i, n = 0;
		int count;

		ids = body ? json_object_get(body, "message_ids") : NULL;
		if (!body || (ids && !json_is_array(ids))) {
			json_decref(body);
			httpd_error(req, 400, "bad-request",
			    "body must be {\"message_ids\": [\"...\"]} or empty for all");
			return;
		}
		if (ids) {
			list = xcalloc(json_array_size(ids) + 1, sizeof *list);
			json_array_foreach(ids, i, v) {
				if (!json_is_string(v)) {
					free(list);
					json_decref(body);
					httpd_error(req, 400, "bad-request", "message ids must be strings");
					return;
				}
				list[n++] = json_string_value(v);
			}
		}
		count = delivery_replay(d->delivery, sub, ids ? list : NULL, n);
		free(list);
		json_decref(body);
		if (count < 0)
			httpd_error(req, 500, "store-error", "cannot replay; see the log");
		else
			httpd_reply_json(req, 200, json_pack("{s:s,s:i}", "subscription", name,
			    "replayed", count));
		return;
	}
	evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", slash ? "POST" : "GET");
	httpd_error(req, slash && strcmp(slash, "/replay") == 0 ? 405 : 404,
	    slash && strcmp(slash, "/replay") == 0 ? "method-not-allowed" : "not-found",
	    "use GET /v1/admin/dlq/{subscription} or POST /v1/admin/dlq/{subscription}/replay");
}

/* The saga engine's answer (saga.h): with a shared store it comes after
 * the store's round trips; libevent keeps the request until then. */
static void
admin_saga_answer(void *arg, int status, void *json)
{
	struct evhttp_request *req = arg;

	switch (status) {
	case 200:
		httpd_reply_json(req, 200, json);
		break;
	case 404:
		httpd_error(req, 404, "unknown-saga", "no saga instance with this id");
		break;
	case 409:
		httpd_error(req, 409, "wrong-state",
		    "no instance with this id in the state the command needs "
		    "(retry: failed, abort: running and not past its pivot)");
		break;
	default:
		evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", "1");
		httpd_error(req, 503, "store-unavailable",
		    "the saga store did not answer or commit; see the log");
		break;
	}
}

/*
 * A command's 503 says more: the store (PostgreSQL) may have gone away
 * after its COMMIT arrived and before the answer did, so the command may
 * have taken effect. Repeating it is harmless (retry acts on failed
 * instances only, abort on running ones: a repeat of one that committed
 * answers 409), but the operator should look first.
 */
static void
admin_saga_command_answer(void *arg, int status, void *json)
{
	struct evhttp_request *req = arg;

	if (status == 200 || status == 404 || status == 409) {
		admin_saga_answer(arg, status, json);
		return;
	}
	evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", "1");
	httpd_error(req, 503, "store-unavailable",
	    "the saga store did not answer: the command may or may not have taken effect;"
	    " GET the saga (its history has an admin entry if it did) before repeating it");
}

static void
admin_sagas(struct admin *a, struct evhttp_request *req)
{
	const struct evhttp_uri *u = evhttp_request_get_evhttp_uri(req);
	const char *q = evhttp_uri_get_query(u), *name = NULL, *state = NULL, *after;
	struct saga_list_page page = { 0 };
	char *after_saga = NULL, *after_id = NULL;
	struct evkeyvalq params;
	int st = -1;

	if (!a->d->saga) {
		httpd_reply_json(req, 200, json_pack("{s:[]}", "sagas"));
		return;
	}
	TAILQ_INIT(&params);
	if (q)
		evhttp_parse_query_str(q, &params);
	name = evhttp_find_header(&params, "name");
	state = evhttp_find_header(&params, "state");
	if (state && (st = saga_state_from_name(state)) < 0) {
		evhttp_clear_headers(&params);
		httpd_error(req, 400, "bad-request",
		    "state must be running, completed, compensating, compensated or failed");
		return;
	}
	if (name && !conf_saga(a->d->conf, name)) {
		httpd_error(req, 404, "unknown-saga", "no saga named '%s'", name);
		evhttp_clear_headers(&params);
		return;
	}
	page.saga = name;
	page.state = st;
	page.limit = (size_t)admin_query_long(req, "limit", 100, ADMIN_LIST_MAX);
	after = evhttp_find_header(&params, "after");
	if (after && saga_list_cursor(after, &page, &after_saga, &after_id) < 0) {
		evhttp_clear_headers(&params);
		httpd_error(req, 400, "bad-request", "after must be the \"next\" of a listing");
		return;
	}
	saga_list(a->d->saga, &page, admin_saga_answer, req);
	free(after_saga);
	free(after_id);
	evhttp_clear_headers(&params);
}

/* /v1/admin/sagas/{id}[/retry|/abort]; the id is percent-encoded. */
static void
admin_saga(struct admin *a, struct evhttp_request *req, const char *rest)
{
	const char *slash = strchr(rest, '/');
	size_t len = slash ? (size_t)(slash - rest) : strlen(rest);
	int post = evhttp_request_get_command(req) == EVHTTP_REQ_POST;
	char *id = xmalloc(len + 1);

	if (util_pct_decode(rest, len, id) <= 0) {
		free(id);
		httpd_error(req, 400, "bad-request", "malformed saga id");
		return;
	}
	if (!a->d->saga) {
		free(id);
		httpd_error(req, 404, "unknown-saga", "no sagas are configured");
		return;
	}
	if (!slash && !post)
		saga_get(a->d->saga, id, admin_saga_answer, req);
	else if (slash && post && (strcmp(slash, "/retry") == 0 || strcmp(slash, "/abort") == 0))
		saga_command(a->d->saga, id, strcmp(slash, "/retry") == 0,
		    admin_saga_command_answer, req);
	else {
		evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", slash ? "POST" : "GET");
		httpd_error(req, 405, "method-not-allowed",
		    "use GET /v1/admin/sagas/{id} or POST /v1/admin/sagas/{id}/retry|abort");
	}
	free(id);
}

static void
admin_tx_list(struct admin *a, struct evhttp_request *req)
{
	admin_transactions(a->d, req);
}

static const struct {
	const char *path;
	admin_handler *fn;
	int open;		/* answered without the token (probes) */
} admin_routes[] = {
	{ "/healthz", admin_healthz, 1 },
	{ "/readyz", admin_readyz, 1 },
	{ "/metrics", admin_metrics, 0 },
	{ "/v1/admin/status", admin_status, 0 },
	{ "/v1/admin/outbox", admin_outbox, 0 },
	{ "/v1/admin/subscriptions", admin_subscriptions, 0 },
	{ "/v1/admin/sagas", admin_sagas, 0 },
	{ "/v1/admin/transactions", admin_tx_list, 0 },
};

static void
admin_request(struct evhttp_request *req, void *arg)
{
	struct admin *a = arg;
	const struct evhttp_uri *u = evhttp_request_get_evhttp_uri(req);
	const char *path = evhttp_uri_get_path(u);
	size_t i;

	for (i = 0; i < sizeof admin_routes / sizeof admin_routes[0]; i++) {
		if (!path || strcmp(path, admin_routes[i].path) != 0)
			continue;
		if (!admin_routes[i].open && !httpd_authorized(req, a->d->conf->api.token))
			return;
		if (evhttp_request_get_command(req) != EVHTTP_REQ_GET &&
		    evhttp_request_get_command(req) != EVHTTP_REQ_HEAD) {
			evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "GET");
			httpd_error(req, 405, "method-not-allowed", "use GET");
			return;
		}
		admin_routes[i].fn(a, req);
		return;
	}
	if (path && strncmp(path, "/v1/admin/sagas/", 16) == 0) {
		if (httpd_authorized(req, a->d->conf->api.token))
			admin_saga(a, req, path + 16);
		return;
	}
	if (path && strncmp(path, "/v1/admin/transactions/", 23) == 0) {
		if (httpd_authorized(req, a->d->conf->api.token))
			admin_transaction(a->d, req, path + 23);
		return;
	}
	if (path && strncmp(path, "/v1/admin/dlq/", 14) == 0) {
		if (httpd_authorized(req, a->d->conf->api.token))
			admin_dlq(a, req, path + 14);
		return;
	}
	/* The page's files hold no data: served without the token, which the
	 * page sends with every API call it makes. */
	if (path && (strcmp(path, "/ui") == 0 || strncmp(path, "/ui/", 4) == 0)) {
		webui_request(req, a->d->conf->api.ui_dir, path);
		return;
	}
	httpd_error(req, 404, "not-found", "unknown admin path");
}

static void
admin_limits(const struct sagad_conf *c, struct httpd_limits *lim)
{
	lim->max_body = 65536;
	lim->max_headers = c->api.max_header_bytes;
	lim->timeout = c->api.request_timeout;
	lim->socket_mode = c->api.socket_mode;
}

struct admin *
admin_new(struct sagad *d, char **err)
{
	struct admin *a = xcalloc(1, sizeof *a);
	struct httpd_limits lim;

	*err = NULL;
	if (!d->conf->api.admin_allow_remote && !util_listen_is_local(d->conf->api.admin_listen)) {
		*err = xasprintf("admin_listen %s is not a loopback address or unix socket "
		    "(set api.admin_allow_remote = true to allow it)", d->conf->api.admin_listen);
		free(a);
		return NULL;
	}
	a->d = d;
	admin_limits(d->conf, &lim);
	a->http = httpd_listen(d->base, d->conf->api.admin_listen, &lim, err);
	if (!a->http) {
		free(a);
		return NULL;
	}
	evhttp_set_gencb(a->http, admin_request, a);
	return a;
}

void
admin_apply_conf(struct admin *a)
{
	struct httpd_limits lim;

	admin_limits(a->d->conf, &lim);
	httpd_set_limits(a->http, &lim);
}

void
admin_free(struct admin *a)
{
	if (!a)
		return;
	evhttp_free(a->http);
	free(a);
}
