#include "conf_table.h"
#include "xmalloc.h"

#include <jansson.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
	/* Default PKGDATADIR "/ui", set by conf_check (it depends on the prefix). */
	ROW("ui_dir", CONF_STR, A(ui_dir), 0, NULL, 0, 0),
	/* Read from token_file at every load: a reload rotates it. */
	ROW("token", CONF_STR, A(token), D, NULL, 0, 0),
	END
};
#undef A
#define AQ(f) offsetof(struct sagad_conf, amqp.f)
static const struct conf_key conf_amqp_rows[] = {
	ROW("listen", CONF_STR, AQ(listen), R, NULL, 0, 0),
	ROW("allow_remote", CONF_BOOL, AQ(allow_remote), R, "false", 0, 0),
	END
};
#undef AQ
#define O(f) offsetof(struct sagad_conf, outbox.f)
static const struct conf_key conf_outbox_rows[] = {
	ROW("max_inflight", CONF_INT, O(max_inflight), 0, "1024", 1, 65535),
	ROW("retry_initial", CONF_DUR, O(retry_initial), 0, "0.1", 0.001, 3600),
	ROW("retry_max", CONF_DUR, O(retry_max), 0, "30", 0.001, 86400),
	END
};
#undef O
#define TR(f) offsetof(struct sagad_conf, tracing.f)
/* The exporter is made at start: every row is restart-only. sampling is
 * a plain number (a CONF_DUR row reads any). */
static const struct conf_key conf_tracing_rows[] = {
	ROW("endpoint", CONF_STR, TR(endpoint), R, NULL, 0, 0),
	ROW("sampling", CONF_DUR, TR(sampling), R, "1", 0, 1),
	ROW("queue", CONF_INT, TR(queue), R, "8192", 1, 1048576),
	ROW("batch", CONF_INT, TR(batch), R, "512", 1, 65536),
	ROW("interval", CONF_DUR, TR(interval), R, "1", 0.01, 60),
	ROW("timeout", CONF_DUR, TR(timeout), R, "10", 0.1, 300),
	ROW("new_traces", CONF_STR, TR(new_traces), R, "auto", 0, 0),
	/* Follows new_traces and endpoint. */
	ROW("start", CONF_BOOL, TR(start), R | D | Q, NULL, 0, 0),
	END
};
#undef TR
#define SS(f) offsetof(struct sagad_conf, saga_store.f)
/* The saga engine holds the store it opened for as long as it runs. */
static const struct conf_key conf_saga_store_rows[] = {
	ROW("backend", CONF_STR, SS(backend_name), R, "sqlite", 0, 0),
	/* Read from conninfo_file when that is given (conf.c): its change
	 * is named, as broker.password's. */
	ROW("conninfo", CONF_STR, SS(conninfo), R, NULL, 0, 0),
	ROW("conninfo_file", CONF_STR, SS(conninfo_file), R, NULL, 0, 0),
	ROW("schema", CONF_STR, SS(schema), R, "sagad", 0, 0),
	ROW("relay_grace", CONF_DUR, SS(relay_grace), R, "2", 0.5, 3600),
	ROW("early_window", CONF_DUR, SS(early_window), R, "60", 1, 86400),
	/* Follows backend. */
	ROW("backend_kind", CONF_INT, SS(backend), R | D | Q, NULL, 0, 0),
	END
};
#undef SS
/* The enum is read and written as an int by its CONF_INT row. */
_Static_assert(sizeof(enum conf_saga_backend) == sizeof(int), "saga_store.backend is an int row");
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
	ROW("dedup", CONF_STR, U(dedup), 0, "local", 0, 0),
	/* dedup = "shared" (conf.c). */
	ROW("shared_dedup", CONF_BOOL, U(shared_dedup), D, NULL, 0, 0),
	/* The saga engine's own subscription (conf.c). */
	ROW("internal", CONF_BOOL, U(internal), D, NULL, 0, 0),
	/* deliver = "amqp" (conf.c). */
	ROW("frontdoor", CONF_BOOL, U(frontdoor), D, NULL, 0, 0),
	/* One or the other; the file is read into prepared_conninfo (conf.c). */
	ROW("prepared_conninfo", CONF_STR, U(prepared_conninfo), 0, NULL, 0, 0),
	ROW("prepared_conninfo_file", CONF_STR, U(prepared_conninfo_file), 0, NULL, 0, 0),
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
	ROW("compensate_success", CONF_BINDING, SB(compensate_success), 0, NULL, 0, 0),
	ROW("compensate_failure", CONF_BINDING, SB(compensate_failure), 0, NULL, 0, 0),
	/* Default the saga's timeout, else 30: set by the checks. */
	ROW("timeout", CONF_DUR, SB(timeout), 0, NULL, 0, 86400 * 30),
	ROW("attempts", CONF_INT, SB(attempts), 0, "3", 1, 1000),
	ROW("notify", CONF_BOOL, SB(notify), 0, "false", 0, 0),
	ROW("body", CONF_JSON, SB(body), 0, NULL, 0, 0),
	ROW("headers", CONF_JSON, SB(headers), 0, NULL, 0, 0),
	ROW("compensate_body", CONF_JSON, SB(compensate_body), 0, NULL, 0, 0),
	ROW("compensate_headers", CONF_JSON, SB(compensate_headers), 0, NULL, 0, 0),
	ROW("when", CONF_STR, SB(when), 0, NULL, 0, 0),
	ROW("pivot", CONF_BOOL, SB(pivot), 0, "false", 0, 0),
	ROW("group", CONF_STR, SB(group), 0, NULL, 0, 0),
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
	ROW("retry_attempts", CONF_INT, SG(retry_attempts), 0, "10", 1, 1000000),
	/* Set by conf_tx.c on the sagas it builds; kept in a definition's
	 * JSON so that an older version is still known as a transaction. */
	ROW("transaction", CONF_BOOL, SG(transaction), D | CONF_KEPT, "false", 0, 0),
	END
};
#undef SG
#define TP(f) offsetof(struct conf_tx_part, f)
static const struct conf_key conf_tx_part_rows[] = {
	ROW("name", CONF_STR, TP(name), 0, NULL, 0, 0),
	ROW("prepare", CONF_BINDING, TP(prepare), 0, NULL, 0, 0),
	ROW("commit", CONF_BINDING, TP(commit), 0, NULL, 0, 0),
	ROW("abort", CONF_BINDING, TP(abort), 0, NULL, 0, 0),
	END
};
#undef TP
#define TX(f) offsetof(struct conf_tx, f)
static const struct conf_key conf_tx_rows[] = {
	ROW("name", CONF_STR, TX(name), 0, NULL, 0, 0),
	ROW("start", CONF_BINDING, TX(start), 0, NULL, 0, 0),
	LIST("participants", struct conf_tx, parts, n_parts, 0, conf_tx_part_rows),
	ROW("committed", CONF_BINDING, TX(committed), 0, NULL, 0, 0),
	ROW("aborted", CONF_BINDING, TX(aborted), 0, NULL, 0, 0),
	ROW("prepare_timeout", CONF_DUR, TX(prepare_timeout), 0, "10", 0.01, 86400),
	ROW("decision_retry_initial", CONF_DUR, TX(decision_retry_initial), 0, "0.5", 0.001, 86400),
	ROW("decision_retry_max", CONF_DUR, TX(decision_retry_max), 0, "30", 0.001, 86400),
	END
};
#undef TX

const struct conf_key *
conf_table_saga_rows(void)
{
	return conf_saga_rows;
}

const struct conf_key *
conf_table_step_rows(void)
{
	return conf_step_rows;
}
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
	GROUP("amqp", conf_amqp_rows),
	GROUP("outbox", conf_outbox_rows),
	GROUP("saga_store", conf_saga_store_rows),
	GROUP("tracing", conf_tracing_rows),
	/* The broker connections, the deliveries, the saga engine and the
	 * plugins hold these for as long as they run. */
	LIST("exchanges", struct sagad_conf, exchanges, n_exchanges, R, conf_exchange_rows),
	LIST("subscriptions", struct sagad_conf, subs, n_subs, R, conf_sub_rows),
	LIST("sagas", struct sagad_conf, sagas, n_sagas, R, conf_saga_rows),
	LIST("transactions", struct sagad_conf, txs, n_txs, R, conf_tx_rows),
	ROW("in_doubt_timeout", CONF_DUR, T(in_doubt_timeout), 0, "30", 0.1, 86400),
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

/* ---- defaults, free, compare, reload ---- */

static void
ctab_default(const struct conf_key *k, void *base)
{
	void *p = conf_table_at(base, k->off);

	switch (k->kind) {
	case CONF_STR:
		*(char **)p = xstrdup(k->def);
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
		*(int *)p = (int)strtol(k->def, NULL, 8);
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
	void *p = conf_table_at(base, k->off);
	size_t i, n = k->cnt ? *(size_t *)conf_table_at(base, k->cnt) : 0;

	switch (k->kind) {
	case CONF_STR:
	case CONF_JSON:
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
	const char *pa = *(char *const *)conf_table_at(a, k->off), *pb = *(char *const *)conf_table_at(b, k->off);
	size_t n = *(size_t *)conf_table_at(a, k->cnt), i;

	if (n != *(size_t *)conf_table_at(b, k->cnt))
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
	const void *pa = conf_table_at(a, k->off), *pb = conf_table_at(b, k->off);

	switch (k->kind) {
	case CONF_STR:
	case CONF_JSON:
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
	case CONF_JSON:
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
	ctab_swap(conf_table_at(a, k->off), conf_table_at(b, k->off), ctab_size(k));
	if (k->kind == CONF_BINDINGS || k->kind == CONF_LIST || k->kind == CONF_KVS)
		ctab_swap(conf_table_at(a, k->cnt), conf_table_at(b, k->cnt), sizeof(size_t));
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

/* ---- rows as JSON (the saga definitions a store keeps) ---- */

static json_t *
ctab_binding_json(const struct conf_binding *b)
{
	char *s;
	json_t *j;

	if (!b->exchange)
		return NULL;
	s = xasprintf("%s:%s", b->exchange, b->key);
	j = json_string(s);
	free(s);
	return j;
}

/* The file's keys, and the derived ones a definition keeps. */
static int
ctab_in_json(const struct conf_key *k)
{
	return !(k->flags & CONF_DERIVED) || (k->flags & CONF_KEPT);
}

/* A kept row (a bool) is written only when set, so that a definition
 * from before it keeps its JSON, hence its version. */
static int
ctab_kept_unset(const struct conf_key *k, const void *base)
{
	return (k->flags & CONF_KEPT) && !*(const int *)conf_table_at(base, k->off);
}

static json_t *
ctab_row_json(const struct conf_key *k, const void *base)
{
	const void *p = conf_table_at(base, k->off);
	size_t i, n = k->cnt ? *(const size_t *)conf_table_at(base, k->cnt) : 0;
	json_t *a;

	switch (k->kind) {
	case CONF_STR:
	case CONF_JSON:
		return *(char *const *)p ? json_string(*(char *const *)p) : NULL;
	case CONF_DUR:
		return json_real(*(const double *)p);
	case CONF_SIZE:
		return json_integer(*(const int64_t *)p);
	case CONF_INT:
	case CONF_MODE:
		return json_integer(*(const int *)p);
	case CONF_BOOL:
		return json_boolean(*(const int *)p);
	case CONF_BINDING:
		return ctab_binding_json(p);
	case CONF_BINDINGS:
		a = json_array();
		for (i = 0; i < n; i++)
			json_array_append_new(a, ctab_binding_json(&(*(struct conf_binding *const *)p)[i]));
		return a;
	case CONF_LIST:
		a = json_array();
		for (i = 0; i < n; i++)
			json_array_append_new(a, conf_table_to_json(k->sub,
			    (const char *)*(void *const *)p + i * k->elem));
		return a;
	case CONF_GROUP:
		return conf_table_to_json(k->sub, base);
	case CONF_KVS:
		return NULL;	/* plugins' keys: not in a definition */
	}
	return NULL;
}

json_t *
conf_table_to_json(const struct conf_key *rows, const void *base)
{
	const struct conf_key *k;
	json_t *j = json_object(), *v;

	for (k = rows; k->name; k++)
		if (ctab_in_json(k) && !ctab_kept_unset(k, base) &&
		    (v = ctab_row_json(k, base)) != NULL)
			json_object_set_new(j, k->name, v);
	return j;
}

static int
ctab_binding_from(const json_t *v, struct conf_binding *b)
{
	const char *s = json_string_value(v), *colon = s ? strchr(s, ':') : NULL;

	if (!colon)
		return -1;
	free(b->exchange);
	free(b->key);
	b->exchange = xstrndup(s, (size_t)(colon - s));
	b->key = xstrdup(colon + 1);
	return 0;
}

static int
ctab_row_from(const struct conf_key *k, const json_t *v, void *base)
{
	void *p = conf_table_at(base, k->off);
	size_t i, n;

	switch (k->kind) {
	case CONF_STR:
	case CONF_JSON:
		if (!json_is_string(v))
			return -1;
		free(*(char **)p);
		*(char **)p = xstrdup(json_string_value(v));
		return 0;
	case CONF_DUR:
		if (!json_is_number(v))
			return -1;
		*(double *)p = json_number_value(v);
		return 0;
	case CONF_SIZE:
		if (!json_is_integer(v))
			return -1;
		*(int64_t *)p = json_integer_value(v);
		return 0;
	case CONF_INT:
	case CONF_MODE:
		if (!json_is_integer(v))
			return -1;
		*(int *)p = (int)json_integer_value(v);
		return 0;
	case CONF_BOOL:
		if (!json_is_boolean(v))
			return -1;
		*(int *)p = json_is_true(v);
		return 0;
	case CONF_BINDING:
		return ctab_binding_from(v, p);
	case CONF_LIST:
		if (!json_is_array(v))
			return -1;
		n = json_array_size(v);
		*(void **)p = xcalloc(n ? n : 1, k->elem);
		*(size_t *)conf_table_at(base, k->cnt) = n;
		for (i = 0; i < n; i++) {
			void *elem = (char *)*(void **)p + i * k->elem;
			conf_table_defaults(k->sub, elem);
			if (conf_table_from_json(k->sub, json_array_get(v, i), elem) < 0)
				return -1;
		}
		return 0;
	case CONF_GROUP:
		return conf_table_from_json(k->sub, v, base);
	case CONF_BINDINGS:
	case CONF_KVS:
		return -1;
	}
	return -1;
}

int
conf_table_from_json(const struct conf_key *rows, const json_t *j, void *base)
{
	const struct conf_key *k;
	const json_t *v;

	if (!json_is_object(j))
		return -1;
	for (k = rows; k->name; k++)
		if (ctab_in_json(k) && (v = json_object_get(j, k->name)) != NULL &&
		    ctab_row_from(k, v, base) < 0)
			return -1;
	return 0;
}
