/*
 * The example source plugin: the smallest complete use of the plugin ABI
 * (include/sagad/plugin.h). Every `interval` seconds it hands one message
 * to sagad's outbox and counts it once sagad says it is durable.
 *
 *   sources = ( { plugin = "example"; exchange = "events";
 *                 routing_key = "tick"; interval = 1; } );
 */
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sagad/plugin.h"

struct example {
	const struct sagad_host_api *api;
	struct sagad_host *h;
	struct event *timer;
	const char *exchange, *routing_key;
	unsigned long sent;
};

static const char *const example_keys[] = { "exchange", "routing_key", "interval", NULL };

static void
example_durable(void *cookie, int ok)
{
	struct example *x = cookie;

	/* A real source deletes its rows here, and only here. */
	x->api->counter_add(x->h, "durable", ok ? 1 : 0);
}

static void
example_tick(evutil_socket_t fd, short what, void *arg)
{
	struct example *x = arg;
	struct sagad_message m;
	char id[128], body[64];

	(void)fd;
	(void)what;
	snprintf(id, sizeof id, "%s-%lu", x->api->source_name(x->h), ++x->sent);
	snprintf(body, sizeof body, "{\"tick\":%lu}", x->sent);
	memset(&m, 0, sizeof m);
	m.message_id = id;
	m.exchange = x->exchange;
	m.routing_key = x->routing_key;
	m.content_type = "application/json";
	m.body = body;
	m.body_len = strlen(body);
	if (x->api->publish(x->h, &m) == SAGAD_PUBLISH_STORED) {
		x->api->counter_add(x->h, "rows_read", 1);
		x->api->when_durable(x->h, example_durable, x);
	} else
		x->api->counter_add(x->h, "errors", 1);
}

static int
example_init(const struct sagad_host_api *api, struct sagad_host *h, void **state,
    char *err, size_t errlen)
{
	struct example *x;
	double interval = 1;
	struct timeval tv;

	if (api->abi != SAGAD_PLUGIN_ABI) {
		snprintf(err, errlen, "host ABI %u, plugin ABI %u", api->abi, SAGAD_PLUGIN_ABI);
		return -1;
	}
	/* A plugin built outside sagad's tree checks its own allocations. */
	if (!(x = calloc(1, sizeof *x))) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	x->api = api;
	x->h = h;
	if (api->conf_string(h, "exchange", &x->exchange) < 0)
		x->exchange = "";
	if (api->conf_string(h, "routing_key", &x->routing_key) < 0) {
		snprintf(err, errlen, "'routing_key' (a string) is required");
		free(x);
		return -1;
	}
	if (api->conf_number(h, "interval", &interval) == 0 && interval <= 0) {
		snprintf(err, errlen, "'interval' must be above 0");
		free(x);
		return -1;
	}
	tv.tv_sec = (time_t)interval;
	tv.tv_usec = (suseconds_t)((interval - tv.tv_sec) * 1e6);
	x->timer = event_new(api->event_base(h), -1, EV_PERSIST, example_tick, x);
	event_add(x->timer, &tv);
	api->set_ready(h, 1, NULL);
	SAGAD_LOG(api, h, SAGAD_LOG_INFO, "example source ticking", SAGAD_DBL("interval", interval));
	*state = x;
	return 0;
}

static void
example_stop(void *state)
{
	struct example *x = state;

	event_free(x->timer);
	free(x);
}

const struct sagad_plugin sagad_plugin = {
	.abi = SAGAD_PLUGIN_ABI,
	.name = "example",
	.version = "1",
	.keys = example_keys,
	.init = example_init,
	.stop = example_stop,
};
