/*
 * The AMQP front door: an AMQP 0-9-1 server on the main loop for services
 * that keep their RabbitMQ client (sagad(8) THE AMQP FRONT DOOR). What they
 * publish goes into the outbox, confirmed once durable; what they consume
 * comes from the inbox (deliver = "amqp" subscriptions); every method not
 * supported closes its channel with 540 NOT_IMPLEMENTED.
 */
#ifndef SAGAD_AMQPD_H
#define SAGAD_AMQPD_H

#include <stdint.h>

struct sagad;
struct amqpd;
struct evbuffer;

struct amqpd_stats {
	uint64_t connections;		/* open now */
	uint64_t accepted;		/* connections ever accepted */
	uint64_t auth_failures;
	uint64_t published;		/* messages stored (duplicates included) */
	uint64_t duplicates;
	uint64_t acked, nacked;		/* confirms sent to clients, per message */
	uint64_t refused;		/* channels closed with 540 */
	uint64_t forwarded;		/* topology methods passed to the broker */
	uint64_t consumers;		/* basic.consume active now */
	uint64_t delivered;		/* basic.deliver sent */
	uint64_t redelivered;		/* of which flagged redelivered */
	uint64_t client_acks;		/* deliveries acked by the client */
	uint64_t client_requeues;	/* nack/reject with requeue: retried */
	uint64_t client_rejects;	/* nack/reject without requeue: dead-lettered */
};

/* Binds conf->amqp.listen; NULL with a malloc'd *err on failure. */
struct amqpd *amqpd_new(struct sagad *d, char **err);
/* Closes the listener and every connection. */
void amqpd_free(struct amqpd *a);
const struct amqpd_stats *amqpd_stats(const struct amqpd *a);
/* The Prometheus families (admin.c's /metrics); nothing when a is NULL. */
void amqpd_metrics(const struct amqpd *a, struct evbuffer *out);

#endif
