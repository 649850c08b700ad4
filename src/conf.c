#include "conf.h"
#include "broker_url.h"

#include "amqp_headers.h"
#include <errno.h>
#include <pwd.h>
#include <glob.h>
#include <libconfig.h>
#include <libgen.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "conf_read.h"
#include "conf_table.h"
#include "otel.h"
#include "util.h"
#include "xmalloc.h"

/*
 * Loading: libconfig reads the file (includes expanded here), conf_read.c
 * puts each key where its row of conf_table.c says, and the checks below do what needs the
 * whole file: names, references between keys, defaults that depend on
 * other keys, files to read.
 */

static int
conf_exchange_type_ok(const char *type)
{
	static const char *const types[] = { "direct", "topic", "fanout", "headers", NULL };
	size_t i;

	for (i = 0; types[i]; i++)
		if (strcmp(types[i], type) == 0)
			return 1;
	return 0;
}

static void
conf_check_exchanges(struct conf_ctx *ctx, config_t *cfg, struct sagad_conf *c)
{
	config_setting_t *list = config_lookup(cfg, "exchanges");
	size_t i, j;

	for (i = 0; i < c->n_exchanges; i++) {
		const struct conf_exchange *x = &c->exchanges[i];
		config_setting_t *e = list ? config_setting_get_elem(list, i) : NULL;

		if (!config_setting_is_group(e))
			continue;	/* already said */
		if (!x->name) {
			conf_err(ctx, e, "exchange without a 'name'");
			continue;
		}
		if (!util_valid_exchange(x->name) || strncmp(x->name, "amq.", 4) == 0)
			conf_err(ctx, e, "bad exchange name '%s' (1-255 of A-Z a-z 0-9 - _ . :, not amq.*)", x->name);
		else if (!conf_exchange_type_ok(x->type))
			conf_err(ctx, e, "exchange '%s': type must be direct, topic, fanout or headers", x->name);
		for (j = 0; j < i; j++)
			if (c->exchanges[j].name && strcmp(c->exchanges[j].name, x->name) == 0) {
				conf_err(ctx, e, "exchange '%s' is declared twice", x->name);
				break;
			}
	}
}

/* Each source remembers where it was written: the plugin's key checks
 * (plugin.c) name that line. */
static void
conf_check_sources(struct conf_ctx *ctx, config_t *cfg, struct sagad_conf *c)
{
	config_setting_t *list = config_lookup(cfg, "sources");
	size_t i, j;

	for (i = 0; i < c->n_sources; i++) {
		struct conf_source *src = &c->sources[i];
		config_setting_t *e = list ? config_setting_get_elem(list, i) : NULL;
		const char *f = e ? config_setting_source_file(e) : NULL;

		src->file = xstrdup(f ? f : ctx->main_file);
		src->line = e ? (int)config_setting_source_line(e) : 0;
		if (!config_setting_is_group(e))
			continue;	/* already said */
		if (!src->plugin) {
			conf_err(ctx, e, "source without a 'plugin'");
			continue;
		}
		if (!src->name)
			src->name = xstrdup(src->plugin[0] && !strchr(src->plugin, '/') ?
			    src->plugin : "source");
		for (j = 0; j < i; j++)
			if (c->sources[j].name && strcmp(c->sources[j].name, src->name) == 0)
				conf_err(ctx, e, "source name '%s' is used twice (set 'name')", src->name);
	}
}

int
conf_bound_exchange_ok(const struct sagad_conf *c, const char *ex)
{
	return conf_exchange(c, ex) || strncmp(ex, "amq.", 4) == 0;
}

/* A conninfo kept in a file (it may hold a password, which no message
 * shows): its text, or NULL with an error at the setting s naming the
 * owner (saga_store, a subscription) and the key. */
static char *
conf_read_conninfo(struct conf_ctx *ctx, config_setting_t *s, const char *owner,
    const char *key, const char *path)
{
	struct stat sb;
	char *text;

	if (stat(path, &sb) == 0 && !S_ISREG(sb.st_mode)) {
		conf_err(ctx, s, "%s: cannot read %s '%s': not a regular file", owner, key, path);
		return NULL;
	}
	if (!(text = util_read_secret(path))) {
		conf_err(ctx, s, "%s: cannot read %s '%s': %s", owner, key, path, strerror(errno));
		return NULL;
	}
	if (!*text) {
		conf_err(ctx, s, "%s: %s '%s' is empty", owner, key, path);
		free(text);
		return NULL;
	}
	return text;
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
			conf_err(ctx, e, "subscription '%s' needs 'deliver' (http://host:port/path, or \"amqp\")", s->name);
		else if (strcmp(s->deliver, "amqp") == 0)
			s->frontdoor = 1;
		else if (strncmp(s->deliver, "http://", 7) != 0 || strlen(s->deliver) < 8)
			conf_err(ctx, e, "subscription '%s': deliver must be an http:// URL or \"amqp\"", s->name);
		if (s->frontdoor && !c->amqp.listen)
			conf_err(ctx, e, "subscription '%s': deliver = \"amqp\" needs the front door "
			    "('amqp = { listen = ... }')", s->name);
		if (s->frontdoor && (s->prepared_conninfo || s->prepared_conninfo_file))
			conf_err(ctx, e, "subscription '%s': prepared_conninfo is for HTTP deliveries, "
			    "not deliver = \"amqp\"", s->name);
		/* A front-door consumer may bind its queue itself (queue.bind
		 * is passed through). */
		if (s->n_binds == 0 && !s->frontdoor)
			conf_err(ctx, e, "subscription '%s' needs at least one 'bind'", s->name);
		for (j = 0; j < s->n_binds; j++)
			if (!conf_bound_exchange_ok(c, s->binds[j].exchange))
				conf_err(ctx, e, "subscription '%s' binds to exchange '%s', which is not in 'exchanges'",
				    s->name, s->binds[j].exchange);
		/* The prefetch follows concurrency: the broker sends no more
		 * than the service can take at once, plus the same again to
		 * keep the pipe full while the inbox commits are synced. For
		 * the front door, whose clients' prefetch says what is out at
		 * once, a window of 256 and a backlog of four of them keep
		 * sagad's intake ahead of a client acking one by one (a backlog
		 * of 64 halved the rate in bench/frontdoor.py). */
		if (!s->max_pending)
			s->max_pending = s->frontdoor ? 1024 : 4 * s->concurrency;
		if (!s->prefetch && s->frontdoor)
			s->prefetch = 256;
		if (!s->prefetch)
			s->prefetch = 2 * s->concurrency > 65535 ? 65535 : 2 * s->concurrency;
		if (s->retry_max < s->retry_initial)
			conf_err(ctx, e, "subscription '%s': retry_max is below retry_initial", s->name);
		if (s->dedup && strcmp(s->dedup, "shared") == 0)
			s->shared_dedup = 1;
		else if (s->dedup && strcmp(s->dedup, "local") != 0)
			conf_err(ctx, e, "subscription '%s': dedup must be \"local\" or \"shared\"",
			    s->name);
		if (s->shared_dedup && strcmp(c->saga_store.backend_name, "pgsql") != 0)
			conf_err(ctx, e, "subscription '%s': dedup = \"shared\" needs "
			    "saga_store.backend = \"pgsql\" (the replicas' records are kept there)",
			    s->name);
		if (s->prepared_conninfo_file && s->prepared_conninfo)
			conf_err(ctx, e, "subscription '%s': give either prepared_conninfo or "
			    "prepared_conninfo_file, not both", s->name);
		else if (s->prepared_conninfo_file) {
			char owner[300];
			snprintf(owner, sizeof owner, "subscription '%s'", s->name);
			s->prepared_conninfo = conf_read_conninfo(ctx, e, owner,
			    "prepared_conninfo_file", s->prepared_conninfo_file);
		}
	}
}

/* Whether a subscription keeps its dedup records in the PostgreSQL store. */
static int
conf_any_shared_dedup(const struct sagad_conf *c)
{
	size_t i;

	for (i = 0; i < c->n_subs; i++)
		if (c->subs[i].shared_dedup)
			return 1;
	return 0;
}

int
conf_has_binding(const struct conf_binding *b)
{
	return b->exchange != NULL;
}

void
conf_check_binding(struct conf_ctx *ctx, config_setting_t *e, const struct sagad_conf *c,
    const char *noun, const char *name, const char *what, const struct conf_binding *b)
{
	if (conf_has_binding(b) && !conf_bound_exchange_ok(c, b->exchange))
		conf_err(ctx, e, "%s '%s': %s uses exchange '%s', which is not in 'exchanges'",
		    noun, name, what, b->exchange);
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
	s->binds = xrealloc(s->binds, (s->n_binds + 1) * sizeof *s->binds);
	s->binds[s->n_binds].exchange = xstrdup(b->exchange);
	s->binds[s->n_binds].key = xstrdup(b->key);
	s->n_binds++;
}

/* The saga engine consumes one queue of its own: the start events, the
 * choreographed steps' events and the replies to its commands (sent to
 * the same queue through the default exchange). */
static void
conf_saga_subscription(struct sagad_conf *c)
{
	struct conf_subscription *s;
	size_t i;

	if (!c->n_sagas || !c->service)
		return;
	if (asprintf(&c->saga_queue, "%s.sagas", c->service) < 0)
		return;
	c->subs = xrealloc(c->subs, (c->n_subs + 1) * sizeof *c->subs);
	s = &c->subs[c->n_subs++];
	memset(s, 0, sizeof *s);
	conf_table_defaults(conf_table_find(conf_table_root(), "subscriptions")->sub, s);
	s->name = xstrdup("_sagas");
	s->queue = xstrdup(c->saga_queue);
	if (c->saga_queue_type) {
		free(s->queue_type);
		s->queue_type = xstrdup(c->saga_queue_type);
	}
	s->deliver = xstrdup("internal:sagas");
	s->internal = 1;
	s->concurrency = 64;
	s->max_pending = 4096;
	s->prefetch = 128;
	for (i = 0; i < c->n_sagas; i++) {
		conf_add_saga_bind(s, &c->sagas[i].start);
		conf_saga_bind_events(c, &c->sagas[i]);
	}
}

/* An older version's binding: only on an exchange this file still
 * declares (a binding to a missing exchange would stop the consumer). */
static void
conf_add_old_bind(struct sagad_conf *c, struct conf_subscription *s,
    const struct conf_binding *b)
{
	if (conf_has_binding(b) && conf_bound_exchange_ok(c, b->exchange))
		conf_add_saga_bind(s, b);
}

void
conf_saga_bind_events(struct sagad_conf *c, const struct conf_saga *sg)
{
	struct conf_subscription *s = c->n_subs ? &c->subs[c->n_subs - 1] : NULL;
	size_t j;

	if (!s || !s->internal || sg->mode != SAGA_CHOREOGRAPHED)
		return;
	for (j = 0; j < sg->n_steps; j++) {
		conf_add_old_bind(c, s, &sg->steps[j].success);
		conf_add_old_bind(c, s, &sg->steps[j].failure);
		conf_add_old_bind(c, s, &sg->steps[j].compensate_success);
		conf_add_old_bind(c, s, &sg->steps[j].compensate_failure);
	}
}

/* The broker URL list is split once here so that errors name the config
 * line and the entry; the first node fills the derived keys. */
static void
conf_broker_url(struct conf_ctx *ctx, config_t *cfg, struct sagad_conf *c)
{
	config_setting_t *s = config_lookup(cfg, "broker.url");
	struct broker_node *nodes;
	char why[768];
	int i, n;

	n = broker_url_parse(c->broker.url, &nodes, why, sizeof why);
	if (n < 0) {
		conf_err(ctx, s, "%s", why);
		return;
	}
	c->broker.host = xstrdup(nodes[0].host);
	c->broker.user = xstrdup(nodes[0].user);
	c->broker.password = xstrdup(nodes[0].password);
	c->broker.vhost = xstrdup(nodes[0].vhost);
	c->broker.port = nodes[0].port;
	c->broker.tls = 0;
	for (i = 0; i < n; i++) {
		c->broker.tls |= nodes[i].tls;
		if (c->broker.password_file && nodes[i].has_password) {
			conf_err(ctx, config_lookup(cfg, "broker.password_file"),
			    "give the password either in the url or in password_file, not both "
			    "(url entry %d has one)", i + 1);
			broker_url_free(nodes, (size_t)n);
			return;
		}
	}
	broker_url_free(nodes, (size_t)n);
	if (c->broker.password_file) {
		char *pw = util_read_secret(c->broker.password_file);
		if (!pw) {
			conf_err(ctx, config_lookup(cfg, "broker.password_file"),
			    "cannot read password_file '%s'", c->broker.password_file);
			return;
		}
		free(c->broker.password);
		c->broker.password = pw;
	}
	if (!c->broker.tls && (c->broker.tls_ca || c->broker.tls_cert || c->broker.tls_key))
		conf_err(ctx, config_lookup(cfg, "broker.tls"), "tls settings need an amqps:// url (in at least one entry)");
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

/* PostgreSQL's longest identifier (NAMEDATALEN - 1). */
#define CONF_PG_NAME_MAX 63

static void
conf_conninfo_file(struct conf_ctx *ctx, config_t *cfg, struct conf_saga_store *ss)
{
	ss->conninfo = conf_read_conninfo(ctx, config_lookup(cfg, "saga_store.conninfo_file"),
	    "saga_store", "conninfo_file", ss->conninfo_file);
}

/*
 * saga_store: the backend's name to its enum; pgsql takes exactly one of
 * conninfo and conninfo_file (read here, into conninfo); sqlite takes
 * neither, as they would be ignored. No message ever shows the conninfo:
 * it may hold a password.
 */
static void
conf_check_saga_store(struct conf_ctx *ctx, config_t *cfg, struct sagad_conf *c)
{
	struct conf_saga_store *ss = &c->saga_store;
	config_setting_t *grp = config_lookup(cfg, "saga_store");
	config_setting_t *back = config_lookup(cfg, "saga_store.backend");
	config_setting_t *ci = config_lookup(cfg, "saga_store.conninfo");
	config_setting_t *cf = config_lookup(cfg, "saga_store.conninfo_file");

	if (strcmp(ss->backend_name, "sqlite") == 0)
		ss->backend = SAGA_BACKEND_SQLITE;
	else if (strcmp(ss->backend_name, "pgsql") == 0)
		ss->backend = SAGA_BACKEND_PGSQL;
	else {
		conf_err(ctx, back, "saga_store: backend must be \"sqlite\" or \"pgsql\"");
		return;
	}
	if (!*ss->schema || strlen(ss->schema) > CONF_PG_NAME_MAX)
		conf_err(ctx, config_lookup(cfg, "saga_store.schema"),
		    "saga_store: schema must be 1 to %d bytes", CONF_PG_NAME_MAX);
	if (ss->backend == SAGA_BACKEND_SQLITE) {
		if (ss->conninfo)
			conf_err(ctx, ci, "saga_store: conninfo is for backend \"pgsql\" "
			    "(backend is \"sqlite\")");
		if (ss->conninfo_file)
			conf_err(ctx, cf, "saga_store: conninfo_file is for backend \"pgsql\" "
			    "(backend is \"sqlite\")");
		return;
	}
	if (!c->n_sagas && !conf_any_shared_dedup(c))
		conf_err(ctx, back, "saga_store: backend \"pgsql\" but no sagas are defined "
		    "and no subscription has dedup = \"shared\" (nothing to store)");
	if (ss->conninfo && ss->conninfo_file)
		conf_err(ctx, cf, "saga_store: give conninfo or conninfo_file, not both");
	else if (ss->conninfo_file)
		conf_conninfo_file(ctx, cfg, ss);
	else if (!ss->conninfo) {
		if (!ci)	/* else one of the wrong type: said */
			conf_err(ctx, back ? back : grp,
			    "saga_store: backend \"pgsql\" needs conninfo or conninfo_file");
	} else if (!*ss->conninfo)
		conf_err(ctx, ci, "saga_store: conninfo is empty");
}

static void
conf_check_tracing(struct conf_ctx *ctx, config_t *cfg, struct sagad_conf *c)
{
	const struct conf_tracing *t = &c->tracing;
	char host[256], *path = NULL;
	int port;

	if (t->endpoint && otel_parse_endpoint(t->endpoint, host, sizeof host, &port, &path) < 0)
		conf_err(ctx, config_lookup(cfg, "tracing.endpoint"),
		    "'endpoint' must be http://HOST[:PORT][/PATH] (OTLP/HTTP)");
	free(path);
	if (t->batch > t->queue)
		conf_err(ctx, config_lookup(cfg, "tracing"), "tracing batch is above queue");
	/* auto: a trace nobody exports is a header on every message that
	 * the store, the relay and the broker pay for (bench/README.md,
	 * session 15); a context a message brings is passed on either way. */
	if (strcmp(t->new_traces, "auto") == 0)
		c->tracing.start = t->endpoint != NULL;
	else if (strcmp(t->new_traces, "always") == 0)
		c->tracing.start = 1;
	else if (strcmp(t->new_traces, "never") == 0)
		c->tracing.start = 0;
	else
		conf_err(ctx, config_lookup(cfg, "tracing.new_traces"),
		    "tracing: new_traces must be \"auto\", \"always\" or \"never\"");
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

/* The AMQP front door: local only unless allowed, as admin_listen. */
static void
conf_check_amqp(struct conf_ctx *ctx, config_t *cfg, struct sagad_conf *c)
{
	if (c->amqp.listen && !*c->amqp.listen) {
		free(c->amqp.listen);	/* "" is the same as absent: no listener */
		c->amqp.listen = NULL;
	}
	if (!c->amqp.listen)
		return;
	if (!conf_valid_listen(c->amqp.listen))
		conf_err(ctx, config_lookup(cfg, "amqp.listen"),
		    "amqp 'listen' must be HOST:PORT or unix:/path");
	else if (!c->amqp.allow_remote && !util_listen_is_local(c->amqp.listen))
		conf_err(ctx, config_lookup(cfg, "amqp.listen"),
		    "amqp 'listen' is not loopback or a unix socket (set amqp.allow_remote = true to allow it)");
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
		c->store.path = xasprintf("/var/lib/sagad/%s.db", c->service);
	}
	if (!c->api.ui_dir)
		c->api.ui_dir = xstrdup(PKGDATADIR "/ui");
	if (!conf_valid_listen(c->api.listen))
		conf_err(ctx, config_lookup(cfg, "api.listen"),
		    "'listen' must be HOST:PORT or unix:/path");
	if (!conf_valid_listen(c->api.admin_listen))
		conf_err(ctx, config_lookup(cfg, "api.admin_listen"),
		    "'admin_listen' must be HOST:PORT or unix:/path");
	else if (!c->api.admin_allow_remote && !util_listen_is_local(c->api.admin_listen))
		conf_err(ctx, config_lookup(cfg, "api.admin_listen"),
		    "'admin_listen' is not loopback or a unix socket (set admin_allow_remote = true to allow it)");
	conf_check_amqp(ctx, cfg, c);
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
	conf_check_exchanges(ctx, cfg, c);
	conf_check_subs(ctx, cfg, c);
	conf_check_sagas(ctx, cfg, c);
	conf_tx_check(ctx, cfg, c);
	conf_check_sources(ctx, cfg, c);
	conf_check_saga_store(ctx, cfg, c);
	conf_check_tracing(ctx, cfg, c);
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
	char *out = xmalloc(cap);
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
				*tmpfiles = xrealloc(*tmpfiles, (*ntmp + 1) * sizeof **tmpfiles);
				(*tmpfiles)[(*ntmp)++] = xstrdup(tmpl);
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
		out = xrealloc(out, cap);
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
	struct sagad_conf *c = xcalloc(1, sizeof *c);
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
	c->file = xstrdup(name);
	conf_table_defaults(conf_table_root(), c);
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
	conf_read_walk(&ctx, config_root_setting(&cfg), conf_table_root(), c, NULL);
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
		text = xstrdup("");
	}
	pathcopy = xstrdup(path);
	dir = dirname(pathcopy);
	c = conf_load_string(text, path, dir, errs);
	free(pathcopy);
	free(text);
	return c;
}

void
conf_free(struct sagad_conf *c)
{
	if (!c)
		return;
	conf_table_free(conf_table_root(), c);
	free(c);
}

int
conf_reload_keep(struct sagad_conf *nc, struct sagad_conf *oc, char *changed, size_t len)
{
	changed[0] = '\0';
	return conf_table_keep(conf_table_root(), nc, oc, "", changed, len);
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
		if (conf->exchanges[i].name && strcmp(conf->exchanges[i].name, name) == 0)
			return &conf->exchanges[i];
	return NULL;
}
