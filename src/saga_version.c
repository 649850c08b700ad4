/*
 * The versions of the saga definitions (saga_def.h) the engine runs: the
 * configuration's, and the older ones the store keeps, so that an instance
 * started before a change of its definition finishes on the definition it
 * started with. At start every configured definition's version is stored
 * (once: a version is kept as first seen), then every stored version of a
 * configured saga is read back; the older ones' choreographed events are
 * bound to the saga queue too.
 */
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "log.h"
#include "saga_def.h"
#include "saga_int.h"
#include "saga_store.h"
#include "sagad.h"
#include "xmalloc.h"

struct saga_versions_ctx {
	struct saga_engine *e;
	int bad;
};

static void
saga_version_add(void *arg, const struct saga_def_rec *d)
{
	struct saga_versions_ctx *c = arg;
	struct saga_engine *e = c->e;
	ssize_t def = saga_def_index(e->d->conf, d->saga);
	struct saga_version *v;
	struct conf_saga *sg;

	if (def < 0 || strcmp(e->versions[def].version, d->version) == 0)
		return;		/* a saga no longer configured; the current one */
	if (strlen(d->version) != SAGA_DEF_VERSION_LEN || !(sg = saga_def_parse(d->json))) {
		log_error("saga definition in store unreadable, its instances are left",
		    LOG_STR("saga", d->saga), LOG_STR("version", d->version));
		c->bad++;
		return;
	}
	e->versions = xrealloc(e->versions, (e->nversions + 1) * sizeof *e->versions);
	v = &e->versions[e->nversions++];
	memset(v, 0, sizeof *v);
	memcpy(v->version, d->version, SAGA_DEF_VERSION_LEN + 1);
	v->def_index = (size_t)def;
	v->def = v->owned = sg;
	conf_saga_bind_events(e->d->conf, sg);
}

int
saga_versions_load(struct saga_engine *e)
{
	const struct sagad_conf *conf = e->d->conf;
	struct saga_versions_ctx c = { e, 0 };
	struct saga_def_rec *put = xcalloc(conf->n_sagas + 1, sizeof *put);
	char **json = xcalloc(conf->n_sagas + 1, sizeof *json);
	size_t i;
	int r;

	e->versions = xcalloc(conf->n_sagas + 1, sizeof *e->versions);
	e->nversions = conf->n_sagas;
	for (i = 0; i < conf->n_sagas; i++) {
		json[i] = saga_def_json(&conf->sagas[i]);
		saga_def_version(json[i], e->versions[i].version);
		e->versions[i].def_index = i;
		e->versions[i].def = &conf->sagas[i];
		put[i].saga = conf->sagas[i].name;
		put[i].version = e->versions[i].version;
		put[i].json = json[i];
	}
	r = saga_store_defs(e->ss, put, conf->n_sagas, saga_version_add, &c);
	for (i = 0; i < conf->n_sagas; i++)
		free(json[i]);
	free(json);
	free(put);
	for (i = conf->n_sagas; i < e->nversions; i++)
		log_info("saga definition changed: its older version's instances finish on it",
		    LOG_STR("saga", e->versions[i].def->name),
		    LOG_STR("version", e->versions[i].version),
		    LOG_STR("current", e->versions[e->versions[i].def_index].version));
	return r;
}

const struct saga_version *
saga_version_find(const struct saga_engine *e, size_t def, const char *version)
{
	size_t i;

	if (!version || strcmp(e->versions[def].version, version) == 0)
		return &e->versions[def];
	for (i = e->d->conf->n_sagas; i < e->nversions; i++)
		if (e->versions[i].def_index == def && strcmp(e->versions[i].version, version) == 0)
			return &e->versions[i];
	return NULL;
}

void
saga_versions_free(struct saga_engine *e)
{
	size_t i;

	for (i = 0; e->versions && i < e->nversions; i++)
		saga_def_free(e->versions[i].owned);
	free(e->versions);
	e->versions = NULL;
	e->nversions = 0;
}
