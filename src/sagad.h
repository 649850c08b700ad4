/* The daemon as a whole: what main.c wires together and the admin API reads. */
#ifndef SAGAD_SAGAD_H
#define SAGAD_SAGAD_H

#include <stdint.h>

struct event_base;
struct sagad_conf;
struct store;
struct broker;
struct relay;
struct ingress;
struct amqpd;
struct admin;
struct delivery;
struct saga_engine;
struct plugins;
struct otel;

enum sagad_state {
	SAGAD_RUNNING,
	SAGAD_DRAINING,		/* SIGTERM: no new work, in-flight settles */
	SAGAD_STOPPED
};

struct sagad {
	struct event_base *base;
	struct sagad_conf *conf;	/* replaced on a successful SIGHUP */
	struct store *store;
	struct broker *broker;		/* the publishing connection */
	struct broker *consumer;	/* the consuming connection (subscriptions) */
	struct relay *relay;
	struct delivery *delivery;
	struct saga_engine *saga;	/* NULL without sagas */
	struct plugins *plugins;	/* the sources */
	struct ingress *ingress;
	struct amqpd *amqpd;		/* the AMQP front door; NULL: none */
	struct admin *admin;
	struct otel *otel;		/* NULL: tracing off */
	enum sagad_state state;
	double started;		/* wall clock */
	uint64_t reloads, reload_failures;
};

#endif
