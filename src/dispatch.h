/*
 * Dispatch: the outgoing half of the delivery, inbox -> service. Internal
 * to the delivery (delivery.c takes messages in, dispatch.c sends them
 * out); nothing else includes this header. It holds the state both halves
 * share: a subscription's backlog, its connections and its circuit.
 * (ARCHITECTURE.md: Inbox: from consume to ack)
 */
#ifndef SAGAD_DISPATCH_H
#define SAGAD_DISPATCH_H

#include <event2/util.h>
#include <stddef.h>
#include <stdint.h>

#include "delivery.h"

struct conf_subscription;
struct hclient;
struct inbox_rec;
struct otel_span;
struct evbuffer;

/*
 * A record's life in memory. WRITING until the transaction holding its
 * inbox record is written (delivery_written), then READY: it goes out when
 * due. INFLIGHT while an attempt holds it; back to READY when the attempt
 * is given up or ends in a retry; freed once its outcome is recorded.
 */
enum dmsg_state {
	DMSG_WRITING,
	DMSG_READY,
	DMSG_INFLIGHT
};

/* One inbox record held in memory while it waits for delivery. */
struct dmsg {
	struct inbox_rec *rec;
	enum dmsg_state state;	/* change only through dmsg_set_state */
	int tx;			/* a PREPARE, COMMIT or ABORT (txpart.h) */
};

/* One attempt: an HTTP request on conn, or a record handed to a
 * front-door consumer (sink). */
struct dattempt {
	struct dsub *ds;
	struct dmsg *dm;
	struct dconn *conn;		/* HTTP */
	struct delivery_sink *sink;	/* front door */
	struct evbuffer *req;	/* until it goes out (dispatch_marked_cb) */
	struct otel_span *span;	/* NULL: not traced */
};

struct dconn {
	struct hclient *hc;	/* NULL until first used */
	int reserved;		/* taken by an attempt that waits for its mark */
};

struct dsub {
	struct delivery *dl;
	int index;
	char *name, *queue, *dlq;
	char *host, *path;
	int port;
	struct dconn *conns;
	int nconns;
	struct dmsg **pending;	/* broker order (inbox id) */
	size_t npending, cappending;
	unsigned inflight;
	enum delivery_circuit circuit;	/* change only through dispatch_circuit_set */
	unsigned failures;	/* consecutive */
	double open_until;
	int consuming;		/* what we asked the broker for */
	struct event *dispatch_ev, *timer_ev;
	double timer_at;
	struct delivery_sub_stats stats;
	delivery_handler_fn *handler;	/* internal subscription */
	void *handler_arg;
	delivery_take_fn *taker;	/* internal, with a shared saga store */
	void *taker_arg;
	struct txpg *txpg;	/* prepared transactions in the service's PostgreSQL */
	struct delivery_sink *sinks;	/* deliver = "amqp": its consumers */
	struct delivery_sink *turn;	/* the next one to offer a record to */
};

struct delivery {
	struct sagad *d;
	struct broker *br;
	uint64_t epoch;		/* consuming connection; 0 while down */
	int stopping;
	struct dsub *subs;
	size_t nsubs;
	struct dedup *dedup;	/* claims of subscriptions with dedup = "shared" */
	struct txpart *txp;	/* two-phase commit records (participant) */
};

/* delivery.c: the subscription's backlog and its consumer. */
const struct conf_subscription *dsub_conf(const struct dsub *ds);
void dsub_flow(struct dsub *ds);
void dsub_remove(struct dsub *ds, struct dmsg *dm);
void dsub_load(struct dsub *ds);
void dmsg_set_state(struct dmsg *dm, enum dmsg_state to);

/* dispatch.c: attempts, outcomes, the circuit. */
extern const char *const dispatch_outcome_names[OUTCOME_COUNT];
extern const char *const dispatch_circuit_names[];
/* Run the dispatch at the end of this turn (after its commit). */
void dispatch_schedule(struct dsub *ds);
/* dispatch_ev and timer_ev's callback; arg is the struct dsub. */
void dispatch_cb(evutil_socket_t fd, short what, void *arg);
void dispatch_circuit_set(struct dsub *ds, enum delivery_circuit to);
/* dispatch.c: the service's yes (2xx) and its business refusal (409, 422). */
struct hclient_answer;
void dsub_succeeded(struct dsub *ds, struct dmsg *dm, const struct hclient_answer *ans);
void dsub_refused(struct dsub *ds, struct dmsg *dm, const struct hclient_answer *ans);
/* dispatch.c: the record tried again after the subscription's backoff (no
 * attempts limit: dsub_retry's). */
void dsub_retry_later(struct dsub *ds, struct dmsg *dm, int status, const char *error);

/* dispatch.c, for dispatch_sink.c: a record delivered, retried (or
 * dead-lettered once max_attempts are spent), dead-lettered. */
void dsub_done(struct dsub *ds, struct dmsg *dm, int status);
/* max_attempts spent: dead-lettered (attempts-exhausted) and removed, 1. */
int dsub_exhausted(struct dsub *ds, struct dmsg *dm, int status, const char *error);
void dsub_retry_or_dead(struct dsub *ds, struct dmsg *dm, int status, const char *error);
void dsub_dead_letter(struct dsub *ds, struct dmsg *dm, const char *reason, int status,
    const char *error);

/* dispatch_sink.c: the front door's consumers (deliver = "amqp"). An
 * attempt for dm if a sink has room (else NULL); the record handed to it
 * once marked. */
struct dattempt *dsub_sink_attempt(struct dsub *ds, struct dmsg *dm);
void dsub_sink_send(struct dattempt *a);
void dsub_sink_cancel(struct dattempt *a);

/* dispatch_tx.c: a two-phase commit's messages. Sagad-Kind for the
 * service; a transaction's kind; a record (dm->tx) answered from the
 * participant's record (1: done, removed), or a COMMIT or ABORT handed to
 * the service's PostgreSQL (1: in flight). */
const char *dispatch_kind(const char *kind);
int dispatch_tx_kind(const char *kind);
int dsub_tx_answered(struct dsub *ds, struct dmsg *dm);
int dsub_tx_finish(struct dsub *ds, struct dmsg *dm);

#endif
