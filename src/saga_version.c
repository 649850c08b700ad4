/*
 * The versions of the saga definitions (saga_def.h) the engine runs: the
 * configuration's, and the older ones the store keeps, so that an instance
 * started before a change of its definition finishes on the definition it
 * started with. At start every configured definition's version is stored
 * (once: a version is kept as first seen), then every stored version of a
 * configured saga is read back; the older ones' choreographed events are
 * bound to the saga queue too. A version met later that the engine does
 * not know (another replica on a newer file stored it since) is read from
 * the store then. Each version is allocated alone: instances point into
 * it while the list grows.
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

static struct saga_version *
saga_version_push(struct saga_engine *e)
{
	struct saga_version *v = xcalloc(1, sizeof *v);

	e->versions = xrealloc(e->versions, (e->nversions + 1) * sizeof *e->versions);
	e->versions[e->nversions++] = v;
	return v;
}

static int
saga_version_known(const struct saga_engine *e, size_t def, const char *version)
{
	size_t i;

	for (i = 0; i < e->nversions; i++)
		if (e->versions[i]->def_index == def && strcmp(e->versions[i]->version, version) == 0)
			return 1;
	return 0;
}

static void
saga_version_add(void *arg, const struct saga_def_rec *d)
{
	struct saga_engine *e = arg;
	ssize_t def = saga_def_index(e->d->conf, d->saga);
	struct saga_version *v;
	struct conf_saga *sg;

	if (def < 0 || saga_version_known(e, (size_t)def, d->version))
		return;		/* a saga no longer configured; one known */
	if (strlen(d->version) != SAGA_DEF_VERSION_LEN || !(sg = saga_def_parse(d->json))) {
		log_error("saga definition in store unreadable, its instances are left",
		    LOG_STR("saga", d->saga), LOG_STR("version", d->version));
		return;
	}
	v = saga_version_push(e);
	memcpy(v->version, d->version, SAGA_DEF_VERSION_LEN + 1);
	v->def_index = (size_t)def;
	v->def = v->owned = sg;
	conf_saga_bind_events(e->d->conf, sg);
	log_info("saga definition of another version: its instances finish on it",
	    LOG_STR("saga", sg->name), LOG_STR("version", v->version),
	    LOG_STR("current", e->versions[def]->version));
}

int
saga_versions_load(struct saga_engine *e)
{
	const struct sagad_conf *conf = e->d->conf;
	struct saga_def_rec *put = xcalloc(conf->n_sagas + 1, sizeof *put);
	char **json = xcalloc(conf->n_sagas + 1, sizeof *json);
	size_t i;
	int r;

	for (i = 0; i < conf->n_sagas; i++) {
		struct saga_version *v = saga_version_push(e);
		json[i] = saga_def_json(&conf->sagas[i]);
		saga_def_version(json[i], v->version);
		v->def_index = i;
		v->def = &conf->sagas[i];
		put[i].saga = conf->sagas[i].name;
		put[i].version = v->version;
		put[i].json = json[i];
	}
	r = saga_store_defs(e->ss, put, conf->n_sagas, saga_version_add, e);
	for (i = 0; i < conf->n_sagas; i++)
		free(json[i]);
	free(json);
	free(put);
	return r;
}

const struct saga_version *
saga_version_find(struct saga_engine *e, size_t def, const char *version)
{
	size_t i, pass;

	if (!version)
		return e->versions[def];
	for (pass = 0; pass < 2; pass++) {
		for (i = 0; i < e->nversions; i++)
			if (e->versions[i]->def_index == def &&
			    strcmp(e->versions[i]->version, version) == 0)
				return e->versions[i];
		/* Unknown: another replica, on a newer file, stored it since
		 * this one started (a rolling change). */
		if (pass == 0)
			saga_store_defs(e->ss, NULL, 0, saga_version_add, e);
	}
	return NULL;
}

void
saga_versions_free(struct saga_engine *e)
{
	size_t i;

	for (i = 0; e->versions && i < e->nversions; i++) {
		saga_def_free(e->versions[i]->owned);
		free(e->versions[i]);
	}
	free(e->versions);
	e->versions = NULL;
	e->nversions = 0;
}
