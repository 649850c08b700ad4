#include "plugin.h"

#include <dlfcn.h>
#include <event2/buffer.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sagad/plugin.h"

#include "conf.h"
#include "log.h"
#include "props.h"
#include "metrics.h"
#include "sagad.h"
#include "store.h"
#include "trace.h"
#include "util.h"
#include "xmalloc.h"

#define PLUGIN_MAX_METRICS 32

struct plugin_metric {
	char name[64];
	int gauge;
	double value;
};

/* The host side of one source: what a plugin's `struct sagad_host *` is. */
struct sagad_host {
	struct sagad *d;
	const struct conf_source *src;	/* in d->conf; sources need a restart */
	void *dl;
	const struct sagad_plugin *plugin;
	void *state;
	int ready;
	char reason[200];
	struct plugin_metric metrics[PLUGIN_MAX_METRICS];
	size_t n_metrics;
};

struct plugins {
	struct sagad_host *hosts;
	size_t n;
};

/* A name is looked up in $SAGAD_PLUGIN_DIR (colon-separated, for tests and
 * development trees), then in $(pkglibdir)/plugins; a path is used as is. */
static void *
plugin_open(const char *plugin, char *why, size_t whylen)
{
	char path[4096];
	const char *dirs = getenv("SAGAD_PLUGIN_DIR");
	void *h;

	if (strchr(plugin, '/')) {
		h = dlopen(plugin, RTLD_NOW | RTLD_LOCAL);
		if (!h)
			snprintf(why, whylen, "cannot load plugin %.400s: %s", plugin, dlerror());
		return h;
	}
	while (dirs && *dirs) {
		const char *colon = strchr(dirs, ':');
		size_t n = colon ? (size_t)(colon - dirs) : strlen(dirs);
		snprintf(path, sizeof path, "%.*s/%s.so", (int)n, dirs, plugin);
		if (access(path, F_OK) == 0)
			goto found;
		dirs += n + (colon != NULL);
	}
	snprintf(path, sizeof path, "%s/plugins/%s.so", PKGLIBDIR, plugin);
	if (access(path, F_OK) != 0) {
		snprintf(why, whylen, "plugin '%s' not found (looked in $SAGAD_PLUGIN_DIR and %s/plugins)",
		    plugin, PKGLIBDIR);
		return NULL;
	}
found:
	h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (!h)
		snprintf(why, whylen, "cannot load plugin %.400s: %s", path, dlerror());
	return h;
}

static const struct sagad_plugin *
plugin_descriptor(void *dl, const char *plugin, char *why, size_t whylen)
{
	const struct sagad_plugin *p = dlsym(dl, "sagad_plugin");

	if (!p) {
		snprintf(why, whylen, "%s is not a sagad plugin (no sagad_plugin symbol)", plugin);
		return NULL;
	}
	if (p->abi != SAGAD_PLUGIN_ABI) {
		snprintf(why, whylen, "plugin %s was built for ABI %u, this sagad has ABI %u",
		    plugin, p->abi, SAGAD_PLUGIN_ABI);
		return NULL;
	}
	if (!p->init || !p->stop || !p->name) {
		snprintf(why, whylen, "plugin %s has an incomplete descriptor", plugin);
		return NULL;
	}
	return p;
}

static void
plugin_err(struct conf_errors *errs, const char *file, int line, const char *msg)
{
	char *m;

	if (asprintf(&m, "%s:%d: %s", file, line, msg) < 0)
		return;
	errs->msg = xrealloc(errs->msg, (errs->n + 1) * sizeof *errs->msg);
	errs->msg[errs->n++] = m;
}

static int
plugin_known_key(const struct sagad_plugin *p, const char *key)
{
	const char *const *k;

	for (k = p->keys; k && *k; k++)
		if (strcmp(*k, key) == 0)
			return 1;
	return 0;
}

int
plugins_check(const struct sagad_conf *conf, struct conf_errors *errs)
{
	size_t before = errs->n, i, j;
	char why[600];

	for (i = 0; i < conf->n_sources; i++) {
		const struct conf_source *src = &conf->sources[i];
		const struct sagad_plugin *p;
		void *dl;

		if (!src->plugin)
			continue;
		dl = plugin_open(src->plugin, why, sizeof why);
		if (!dl || !(p = plugin_descriptor(dl, src->plugin, why, sizeof why))) {
			plugin_err(errs, src->file, src->line, why);
			if (dl)
				dlclose(dl);
			continue;
		}
		for (j = 0; j < src->n_kv; j++)
			if (!plugin_known_key(p, src->kv[j].key)) {
				snprintf(why, sizeof why, "unknown key '%s' for plugin %s",
				    src->kv[j].key, p->name);
				plugin_err(errs, src->kv[j].file, src->kv[j].line, why);
			}
		dlclose(dl);
	}
	return (int)(errs->n - before);
}

/* ---- the API offered to plugins ---- */

static struct event_base *
host_event_base(struct sagad_host *h)
{
	return h->d->base;
}

/* A plugin's line: its fields after source=NAME, through the one writer. */
static void
host_log(struct sagad_host *h, enum sagad_log_level level, const char *msg,
    const struct sagad_log_field *fields, size_t n)
{
	const struct sagad_log_field src[] = { LOG_STR("source", h->src->name) };

	if (level > SAGAD_LOG_DEBUG)
		level = SAGAD_LOG_DEBUG;
	log_fields((enum log_level)level, msg, src, 1, fields, fields ? n : 0);
}

static const struct conf_kv *
host_kv(struct sagad_host *h, const char *key, enum conf_kv_type type)
{
	size_t i;

	for (i = 0; i < h->src->n_kv; i++)
		if (strcmp(h->src->kv[i].key, key) == 0 && h->src->kv[i].type == type)
			return &h->src->kv[i];
	return NULL;
}

static int
host_conf_string(struct sagad_host *h, const char *key, const char **out)
{
	const struct conf_kv *kv = host_kv(h, key, CONF_KV_STRING);

	if (!kv)
		return -1;
	*out = kv->s;
	return 0;
}

static int
host_conf_number(struct sagad_host *h, const char *key, double *out)
{
	const struct conf_kv *kv = host_kv(h, key, CONF_KV_NUMBER);

	if (!kv)
		return -1;
	*out = kv->d;
	return 0;
}

static int
host_conf_bool(struct sagad_host *h, const char *key, int *out)
{
	const struct conf_kv *kv = host_kv(h, key, CONF_KV_BOOL);

	if (!kv)
		return -1;
	*out = kv->b;
	return 0;
}

static const char *
host_source_name(struct sagad_host *h)
{
	return h->src->name;
}

static int
host_opt(const char *s, size_t max)
{
	return !s || util_valid_shortstr(s, max);
}

static enum sagad_publish_result
host_publish(struct sagad_host *h, const struct sagad_message *pm)
{
	struct msg m;
	enum store_put put;
	size_t i;

	if (!pm->message_id || !*pm->message_id || !util_valid_shortstr(pm->message_id, 255) ||
	    !pm->exchange || (*pm->exchange && !util_valid_exchange(pm->exchange)) ||
	    !pm->routing_key || !util_valid_shortstr(pm->routing_key, 255) ||
	    !host_opt(pm->content_type, 255) || !host_opt(pm->correlation_id, 255) ||
	    !host_opt(pm->type, 255) || (pm->body_len && !pm->body))
		return SAGAD_PUBLISH_INVALID;
	memset(&m, 0, sizeof m);
	m.message_id = (char *)pm->message_id;
	m.exchange = (char *)pm->exchange;
	m.routing_key = (char *)pm->routing_key;
	m.body = (char *)pm->body;
	m.body_len = pm->body_len;
	if (pm->content_type)
		m.props.content_type = xstrdup(pm->content_type);
	if (pm->correlation_id)
		m.props.correlation_id = xstrdup(pm->correlation_id);
	if (pm->type)
		m.props.type = xstrdup(pm->type);
	for (i = 0; i < pm->n_headers; i++) {
		if (!pm->header_names[i] || !*pm->header_names[i] || !pm->header_values[i] ||
		    !util_valid_shortstr(pm->header_values[i], 65535)) {
			props_free(&m.props);
			return SAGAD_PUBLISH_INVALID;
		}
		props_set_header(&m.props, pm->header_names[i], pm->header_values[i]);
	}
	/* a row's bad traceparent is dropped; none: a new trace if sagad starts them */
	trace_ensure(&m.props, h->d->conf);
	put = store_outbox_put(h->d->store, &m, util_now(), STORE_OUT_DEDUP);
	props_free(&m.props);
	switch (put) {
	case STORE_PUT_STORED: return SAGAD_PUBLISH_STORED;
	case STORE_PUT_DUPLICATE: return SAGAD_PUBLISH_DUPLICATE;
	case STORE_PUT_FULL: return SAGAD_PUBLISH_FULL;
	default: return SAGAD_PUBLISH_ERROR;
	}
}

struct host_durable {
	sagad_durable_fn *fn;
	void *cookie;
	struct sagad_host *h;
};

static void
host_durable_cb(void *arg, int ok)
{
	struct host_durable *hd = arg;

	/* sagad stops the plugins only after the last commit, so the
	 * plugin is always there to hear about it. */
	hd->fn(hd->cookie, ok);
	free(hd);
}

static void
host_when_durable(struct sagad_host *h, sagad_durable_fn *fn, void *cookie)
{
	struct host_durable *hd = xmalloc(sizeof *hd);

	hd->fn = fn;
	hd->cookie = cookie;
	hd->h = h;
	store_on_commit(h->d->store, host_durable_cb, hd);
}

static struct plugin_metric *
host_metric(struct sagad_host *h, const char *name, int gauge)
{
	size_t i;

	for (i = 0; i < h->n_metrics; i++)
		if (strcmp(h->metrics[i].name, name) == 0)
			return &h->metrics[i];
	if (h->n_metrics == PLUGIN_MAX_METRICS || !util_valid_exchange(name) || strchr(name, '.') ||
	    strchr(name, ':') || strchr(name, '-'))
		return NULL;
	snprintf(h->metrics[h->n_metrics].name, sizeof h->metrics[0].name, "%s", name);
	h->metrics[h->n_metrics].gauge = gauge;
	return &h->metrics[h->n_metrics++];
}

static void
host_counter_add(struct sagad_host *h, const char *name, double delta)
{
	struct plugin_metric *m = host_metric(h, name, 0);

	if (m && delta > 0)
		m->value += delta;
}

static void
host_gauge_set(struct sagad_host *h, const char *name, double value)
{
	struct plugin_metric *m = host_metric(h, name, 1);

	if (m)
		m->value = value;
}

static void
host_set_ready(struct sagad_host *h, int ready, const char *reason)
{
	if (ready != h->ready)
		log_at_(ready ? LOG_LVL_INFO : LOG_LVL_WARN, ready ? "source ready" : "source not ready",
		    LOG_STR("source", h->src->name), LOG_STR("reason", reason));
	h->ready = ready;
	snprintf(h->reason, sizeof h->reason, "%s", reason ? reason : "");
}

static const struct sagad_host_api host_api = {
	.abi = SAGAD_PLUGIN_ABI,
	.event_base = host_event_base,
	.log = host_log,
	.conf_string = host_conf_string,
	.conf_number = host_conf_number,
	.conf_bool = host_conf_bool,
	.source_name = host_source_name,
	.publish = host_publish,
	.when_durable = host_when_durable,
	.counter_add = host_counter_add,
	.gauge_set = host_gauge_set,
	.set_ready = host_set_ready,
};

/* ---- life ---- */

struct plugins *
plugins_start(struct sagad *d, char **err)
{
	struct plugins *ps = xcalloc(1, sizeof *ps);
	char why[600];
	size_t i;

	*err = NULL;
	ps->hosts = xcalloc(d->conf->n_sources + 1, sizeof *ps->hosts);
	for (i = 0; i < d->conf->n_sources; i++) {
		struct sagad_host *h = &ps->hosts[i];
		h->d = d;
		h->src = &d->conf->sources[i];
		h->ready = 0;
		snprintf(h->reason, sizeof h->reason, "starting");
		h->dl = plugin_open(h->src->plugin, why, sizeof why);
		if (!h->dl || !(h->plugin = plugin_descriptor(h->dl, h->src->plugin, why, sizeof why)))
			goto fail;
		why[0] = '\0';
		if (h->plugin->init(&host_api, h, &h->state, why, sizeof why) < 0) {
			char tmp[600];
			snprintf(tmp, sizeof tmp, "source %s: plugin %s failed to start: %s",
			    h->src->name, h->plugin->name, *why ? why : "no reason given");
			snprintf(why, sizeof why, "%s", tmp);
			h->state = NULL;
			goto fail;
		}
		ps->n = i + 1;
		log_info("source started", LOG_STR("source", h->src->name),
		    LOG_STR("plugin", h->plugin->name),
		    LOG_STR("version", h->plugin->version ? h->plugin->version : "?"));
	}
	return ps;
fail:
	*err = xasprintf("%s", why);
	ps->n = i + 1;		/* stop() skips what never started */
	plugins_stop(ps);
	return NULL;
}

void
plugins_stop(struct plugins *ps)
{
	size_t i;

	if (!ps)
		return;
	for (i = 0; i < ps->n; i++) {
		struct sagad_host *h = &ps->hosts[i];
		if (h->plugin && h->state)
			h->plugin->stop(h->state);
		h->state = NULL;
		if (h->dl)
			dlclose(h->dl);
	}
	free(ps->hosts);
	free(ps);
}

int
plugins_ready(const struct plugins *ps, const char **reason)
{
	size_t i;

	for (i = 0; ps && i < ps->n; i++)
		if (!ps->hosts[i].ready) {
			*reason = ps->hosts[i].reason;
			return 0;
		}
	return 1;
}

void
plugins_metrics(const struct plugins *ps, struct evbuffer *out)
{
	char name[128], labels[300];
	size_t i, j, k, l;

	if (!ps || !ps->n)
		return;
	metrics_family(out, "sagad_source_ready", "gauge", "1 while the source can reach its database.");
	for (i = 0; i < ps->n; i++) {
		snprintf(labels, sizeof labels, "source=\"%s\"", ps->hosts[i].src->name);
		metrics_sample(out, "sagad_source_ready", labels, ps->hosts[i].ready);
	}
	/* One family per metric name, whichever sources report it. */
	for (i = 0; i < ps->n; i++)
		for (j = 0; j < ps->hosts[i].n_metrics; j++) {
			const struct plugin_metric *m = &ps->hosts[i].metrics[j];
			int seen = 0;
			for (k = 0; k < i && !seen; k++)
				for (l = 0; l < ps->hosts[k].n_metrics; l++)
					if (strcmp(ps->hosts[k].metrics[l].name, m->name) == 0)
						seen = 1;
			if (seen)
				continue;
			snprintf(name, sizeof name, "sagad_source_%s%s", m->name, m->gauge ? "" : "_total");
			metrics_family(out, name, m->gauge ? "gauge" : "counter",
			    "Reported by the source's plugin (sagad-plugins(7)).");
			for (k = i; k < ps->n; k++)
				for (l = 0; l < ps->hosts[k].n_metrics; l++)
					if (strcmp(ps->hosts[k].metrics[l].name, m->name) == 0) {
						snprintf(labels, sizeof labels, "source=\"%s\"",
						    ps->hosts[k].src->name);
						metrics_sample(out, name, labels, ps->hosts[k].metrics[l].value);
					}
		}
}
