#include "saga_def.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "conf_table.h"
#include "xmalloc.h"

char *
saga_def_json(const struct conf_saga *sg)
{
	json_t *j = conf_table_to_json(conf_table_saga_rows(), sg);
	char *text = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);

	json_decref(j);
	return text;
}

void
saga_def_version(const char *json, char out[SAGA_DEF_VERSION_LEN + 1])
{
	uint64_t h = 0xcbf29ce484222325ULL;
	const unsigned char *p;

	for (p = (const unsigned char *)json; *p; p++) {
		h ^= *p;
		h *= 0x100000001b3ULL;
	}
	snprintf(out, SAGA_DEF_VERSION_LEN + 1, "%016" PRIx64, h);
}

struct conf_saga *
saga_def_parse(const char *json)
{
	struct conf_saga *sg = xcalloc(1, sizeof *sg);
	json_t *j = json_loads(json, 0, NULL);

	conf_table_defaults(conf_table_saga_rows(), sg);
	if (!j || conf_table_from_json(conf_table_saga_rows(), j, sg) < 0 || !sg->name ||
	    !sg->n_steps) {
		json_decref(j);
		saga_def_free(sg);
		return NULL;
	}
	json_decref(j);
	/* The one derived field: the checks set it from mode_name. */
	sg->mode = sg->mode_name && strcmp(sg->mode_name, "choreographed") == 0 ?
	    SAGA_CHOREOGRAPHED : SAGA_ORCHESTRATED;
	return sg;
}

void
saga_def_free(struct conf_saga *sg)
{
	if (!sg)
		return;
	conf_table_free(conf_table_saga_rows(), sg);
	free(sg);
}
