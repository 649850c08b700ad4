/* Placeholder: the pgsql source is being written (issue 5). */
#include <stdio.h>

#include "sagad/plugin.h"

static const char *const keys[] = { NULL };

static int
stub_init(const struct sagad_host_api *api, struct sagad_host *h, void **state,
    char *err, size_t errlen)
{
	(void)api; (void)h; (void)state;
	snprintf(err, errlen, "the pgsql source is not available in this build");
	return -1;
}

static void
stub_stop(void *state)
{
	(void)state;
}

const struct sagad_plugin sagad_plugin = {
	.abi = SAGAD_PLUGIN_ABI, .name = "pgsql", .version = "0", .keys = keys,
	.init = stub_init, .stop = stub_stop,
};
