/*
 * The broker link, its thread: the shared half of struct broker and the
 * one wake-up path. The main thread queues commands and wishes under the
 * lock and kicks; whatever wakes the thread ends in broker_turn(), which
 * takes them in one place (broker_take_shared) and hands the turn's events
 * back in one batch (ARCHITECTURE.md: How the threads talk). The
 * connection is broker_conn.c, publishing broker_pub.c, consuming
 * broker_consume.c.
 */
#include "broker_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "util.h"
#include "xmalloc.h"

static char *
broker_strdup(const char *s)
{
	return s ? xstrdup(s) : NULL;
}

static void
broker_free_binds(struct conf_binding *binds, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++) {
		free(binds[i].exchange);
		free(binds[i].key);
	}
	free(binds);
}

/* ---- events to the main thread ---- */

struct broker_event *
broker_post(struct broker *b, enum broker_event_kind kind, int64_t seq,
    double latency, const char *reason)
{
	struct broker_event *ev;

	ev = XPUSH(b->outbuf, b->nout, b->capout);
	ev->kind = kind;
	ev->epoch = b->epoch;
	ev->seq = seq;
	ev->latency = latency;
	ev->msg = NULL;		/* broker_free frees what was never taken */
	ev->sub = 0;
	ev->redelivered = 0;
	ev->received = 0;
	ev->reason[0] = '\0';
	ev->trace[0] = '\0';
	if (reason)
		snprintf(ev->reason, sizeof ev->reason, "%s", reason);
	return ev;
}

/* One lock and one wake-up per turn, however many confirms arrived. */
void
broker_post_flush(struct broker *b)
{
	if (!b->nout)
		return;
	pthread_mutex_lock(&b->lock);
	if (b->noutq + b->nout > b->capoutq) {
		b->capoutq = (b->noutq + b->nout) * 2;
		b->outq = xrealloc(b->outq, b->capoutq * sizeof *b->outq);
	}
	memcpy(b->outq + b->noutq, b->outbuf, b->nout * sizeof *b->outbuf);
	b->noutq += b->nout;
	pthread_mutex_unlock(&b->lock);
	b->nout = 0;
	event_active(b->notify_ev, 0, 0);
}

static void
broker_notify_cb(evutil_socket_t fd, short what, void *arg)
{
	struct broker *b = arg;
	struct broker_event *evs;
	size_t i, n;

	(void)fd;
	(void)what;
	pthread_mutex_lock(&b->lock);
	evs = b->outq;
	n = b->noutq;
	b->outq = NULL;
	b->noutq = b->capoutq = 0;
	pthread_mutex_unlock(&b->lock);
	for (i = 0; i < n; i++)
		b->fn(b->arg, &evs[i]);
	free(evs);
}

/* ---- commands from the main thread, and the turn ---- */

/* Commands taken but not yet sent die with their connection (broker_fail)
 * or with the broker (broker_free): the relay republishes after the next
 * UP and the broker redelivers. */
void
broker_pending_clear(struct broker *b)
{
	size_t i;

	for (i = 0; i < b->npending; i++)
		msg_free(b->pending[i].msg);
	b->npending = 0;
}

/* Under lock: take the main thread's commands. One meant for an earlier
 * connection is void: the relay rewinds and republishes, the broker
 * redelivers. */
static void
broker_take_cmds_locked(struct broker *b)
{
	size_t i;

	for (i = 0; i < b->ninq; i++) {
		if (b->inq[i].epoch != b->epoch || b->state != BROKER_ST_UP) {
			msg_free(b->inq[i].msg);
			continue;
		}
		*XPUSH(b->pending, b->npending, b->cappending) = b->inq[i];
	}
	b->ninq = 0;
}

/* What the other threads asked for since the last turn. */
struct broker_wake {
	int stop;
	int subs_changed;
};

/*
 * The only reader of the shared half of struct broker on the broker
 * thread: under one lock it takes every flag (and clears it), copies the
 * consume wishes and moves the queued commands to the thread's own list.
 * Whatever a caller set before its broker_kick() is seen by the turn that
 * kick causes, or by an earlier one; none is read half-updated.
 */
static void
broker_take_shared(struct broker *b, struct broker_wake *w)
{
	size_t i;

	pthread_mutex_lock(&b->lock);
	w->stop = b->stop;
	w->subs_changed = b->subs_changed;
	b->subs_changed = 0;
	if (w->subs_changed)
		for (i = 0; i < b->n_subs; i++)
			b->subs[i].wanted = b->subs[i].want;
	broker_take_cmds_locked(b);
	pthread_mutex_unlock(&b->lock);
}

static void
broker_do_pending(struct broker *b)
{
	size_t i;

	if (b->state != BROKER_ST_UP || b->blocked || !b->npending)
		return;
	/* rabbitmq-c 0.11 can hang forever in amqp_basic_publish on a dead
	 * connection (fixed in 0.14): a zero-timeout read first turns a dead
	 * peer into AMQP_STATUS_HEARTBEAT_TIMEOUT (ARCHITECTURE.md: rabbitmq-c:
	 * publish hang). */
	if (broker_drain(b) < 0)
		return;
	for (i = 0; i < b->npending && b->state == BROKER_ST_UP; i++) {
		struct broker_cmd *c = &b->pending[i];
		int rc = c->kind == BROKER_CMD_PUBLISH ?
		    broker_publish_one(b, c->msg) : broker_settle(b, c);
		if (rc < 0)
			break;
		msg_free(c->msg);
		c->msg = NULL;
	}
	broker_flush_acks(b);
	if (b->state == BROKER_ST_UP) {
		b->npending = 0;
		broker_drain(b);
	}
}

/* Close for good: what the broker already sent is read first so that its
 * confirms reach the main thread. */
static void
broker_stop_now(struct broker *b)
{
	if (b->state == BROKER_ST_UP) {
		broker_drain(b);
		broker_fail(b, "stopping", 1);
	}
	b->state = BROKER_ST_STOPPING;
	event_base_loopbreak(b->base);
	broker_post_flush(b);
}

/*
 * One turn of the broker thread, whatever woke it (a kick, the socket, the
 * heartbeat timer, a new connection): take what the other threads asked
 * for, then stop, or apply the consume wishes, send the commands and hand
 * the events over. Every wake-up goes through here, so a wish is applied
 * on the next turn whether or not publishes are pending.
 */
void
broker_turn(struct broker *b)
{
	struct broker_wake w;

	broker_take_shared(b, &w);
	if (w.stop) {
		broker_stop_now(b);
		return;
	}
	/* The synchronous basic.consume may have read deliveries into the
	 * library's frame queue; the socket will not say so. */
	if (broker_apply_consume(b) > 0 && b->state == BROKER_ST_UP)
		broker_drain(b);
	broker_do_pending(b);
	broker_post_flush(b);
}

static void
broker_wake_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	broker_turn(arg);
}

/* The socket is readable: read what came, then a turn (publishes that
 * waited for an unblock go now). */
void
broker_read_cb(evutil_socket_t fd, short what, void *arg)
{
	struct broker *b = arg;

	(void)fd;
	(void)what;
	broker_drain(b);
	broker_turn(b);
}

/* Heartbeats are serviced only inside library calls: poll at half the
 * interval (ARCHITECTURE.md: rabbitmq-c: heartbeats). */
static void
broker_hb_cb(evutil_socket_t fd, short what, void *arg)
{
	broker_read_cb(fd, what, arg);
}

/* ---- the thread and the main thread's calls ---- */

static void *
broker_main(void *arg)
{
	struct broker *b = arg;

	/* Named for top -H and perf: which connection spends the CPU. */
	pthread_setname_np(pthread_self(),
	    b->role == BROKER_ROLE_PUBLISH ? "sagad-publish" : "sagad-consume");
	event_base_dispatch(b->base);
	return NULL;
}

static void
broker_copy_subs(struct broker *b, const struct sagad_conf *c)
{
	size_t i, j;

	b->n_subs = c->n_subs;
	b->subs = xcalloc(c->n_subs + 1, sizeof *b->subs);
	for (i = 0; i < c->n_subs; i++) {
		const struct conf_subscription *cs = &c->subs[i];
		struct broker_sub *s = &b->subs[i];
		s->queue = xstrdup(cs->queue);
		s->dlq = xasprintf("%s.dlq", cs->queue);
		s->queue_type = xstrdup(cs->queue_type);
		s->n_binds = cs->n_binds;
		s->binds = xcalloc(cs->n_binds + 1, sizeof *s->binds);
		for (j = 0; j < cs->n_binds; j++) {
			s->binds[j].exchange = xstrdup(cs->binds[j].exchange);
			s->binds[j].key = xstrdup(cs->binds[j].key);
		}
		s->prefetch = cs->prefetch;
		/* One sagad applies a service's sagas, unless they are shared
		 * on PostgreSQL: then every replica competes for them
		 * (REPLICAS.md: Row locks and causal order). */
		s->single_active = cs->internal && c->saga_store.backend != SAGA_BACKEND_PGSQL;
		s->max_bytes = cs->max_message_bytes;
	}
}

/* The node list, parsed again from the url the checks accepted; a
 * password_file's secret is the password of every entry (the checks
 * refused entries that give their own). */
static void
broker_copy_nodes(struct broker *b, const struct sagad_conf *c)
{
	char why[768];
	int n = broker_url_parse(c->broker.url, &b->nodes, why, sizeof why);
	size_t i;

	if (n < 0) {
		/* The checks accepted this url: cannot happen. */
		log_error("broker url rejected", LOG_STR("reason", why));
		abort();
	}
	b->n_nodes = (size_t)n;
	b->node = 0;
	b->node_up = -1;
	if (!c->broker.password_file)
		return;
	for (i = 0; i < b->n_nodes; i++) {
		free(b->nodes[i].password);
		b->nodes[i].password = xstrdup(c->broker.password);
	}
}

/* "host:port" of the node this connection is up on, for /metrics and
 * status (any thread); 0 and "" while down. */
int
broker_node_name(struct broker *b, char *out, size_t outlen)
{
	int i = b ? __atomic_load_n(&b->node_up, __ATOMIC_ACQUIRE) : -1;

	if (outlen)
		out[0] = '\0';
	if (i < 0)
		return 0;
	snprintf(out, outlen, "%s:%d", b->nodes[i].host, b->nodes[i].port);
	return 1;
}

struct broker *
broker_new(struct event_base *main_base, const struct sagad_conf *c,
    enum broker_role role, broker_event_fn *fn, void *arg)
{
	struct broker *b = xcalloc(1, sizeof *b);
	struct timeval hb;
	size_t i;

	broker_copy_nodes(b, c);
	b->tls_verify = c->broker.tls_verify;
	b->tls_ca = broker_strdup(c->broker.tls_ca);
	b->tls_cert = broker_strdup(c->broker.tls_cert);
	b->tls_key = broker_strdup(c->broker.tls_key);
	b->heartbeat = (int)(c->broker.heartbeat + 0.5);
	b->connect_timeout = c->broker.connect_timeout;
	b->reconnect_initial = c->broker.reconnect_initial;
	b->reconnect_max = c->broker.reconnect_max;
	b->app_id = xstrdup(c->service);
	b->role = role;
	b->conn_name = xasprintf("sagad %s %s", c->service, broker_role_name(b));
	if (role == BROKER_ROLE_CONSUME)
		broker_copy_subs(b, c);
	b->n_exchanges = c->n_exchanges;
	b->exchanges = xcalloc(c->n_exchanges + 1, sizeof *b->exchanges);
	for (i = 0; i < c->n_exchanges; i++) {
		b->exchanges[i].name = xstrdup(c->exchanges[i].name);
		b->exchanges[i].type = xstrdup(c->exchanges[i].type);
	}
	b->fn = fn;
	b->arg = arg;
	pthread_mutex_init(&b->lock, NULL);
	b->notify_ev = event_new(main_base, -1, 0, broker_notify_cb, b);
	event_priority_set(b->notify_ev, 0);
	b->base = event_base_new();
	b->retry_ev = evtimer_new(b->base, broker_connect_cb, b);
	b->wake_ev = event_new(b->base, -1, 0, broker_wake_cb, b);
	hb.tv_sec = 0;
	hb.tv_usec = 0;
	b->hb_ev = event_new(b->base, -1, EV_PERSIST, broker_hb_cb, b);
	evtimer_add(b->retry_ev, &hb);	/* connect at once */
	return b;
}

int
broker_start(struct broker *b)
{
	return pthread_create(&b->thread, NULL, broker_main, b) == 0 ? 0 : -1;
}

static void
broker_push(struct broker *b, const struct broker_cmd *c)
{
	pthread_mutex_lock(&b->lock);
	*XPUSH(b->inq, b->ninq, b->capinq) = *c;
	pthread_mutex_unlock(&b->lock);
}

void
broker_publish(struct broker *b, uint64_t epoch, struct msg *m)
{
	struct broker_cmd c = { BROKER_CMD_PUBLISH, epoch, m, 0, 0 };
	broker_push(b, &c);
}

/* The three ways to settle a consumed message differ only in kind. */
static void
broker_push_settle(struct broker *b, enum broker_cmd_kind kind, uint64_t epoch,
    int sub, uint64_t tag)
{
	struct broker_cmd c = { kind, epoch, NULL, sub, tag };
	broker_push(b, &c);
}

void
broker_ack(struct broker *b, uint64_t epoch, int sub, uint64_t tag)
{
	broker_push_settle(b, BROKER_CMD_ACK, epoch, sub, tag);
}

void
broker_reject(struct broker *b, uint64_t epoch, int sub, uint64_t tag)
{
	broker_push_settle(b, BROKER_CMD_REJECT, epoch, sub, tag);
}

void
broker_requeue(struct broker *b, uint64_t epoch, int sub, uint64_t tag)
{
	broker_push_settle(b, BROKER_CMD_REQUEUE, epoch, sub, tag);
}

void
broker_consume(struct broker *b, int sub, int on)
{
	pthread_mutex_lock(&b->lock);
	if (b->subs[sub].want != on) {
		b->subs[sub].want = on;
		b->subs_changed = 1;
	}
	pthread_mutex_unlock(&b->lock);
}

void
broker_kick(struct broker *b)
{
	event_active(b->wake_ev, 0, 0);
}

void
broker_free(struct broker *b)
{
	size_t i;

	if (!b)
		return;
	pthread_mutex_lock(&b->lock);
	b->stop = 1;
	pthread_mutex_unlock(&b->lock);
	event_active(b->wake_ev, 0, 0);
	pthread_join(b->thread, NULL);
	broker_pending_clear(b);
	for (i = 0; i < b->ninq; i++)
		msg_free(b->inq[i].msg);
	free(b->inq);
	for (i = 0; i < b->noutq; i++)
		msg_free(b->outq[i].msg);
	msg_free(b->rx_msg);
	for (i = 0; i < b->n_subs; i++) {
		free(b->subs[i].queue);
		free(b->subs[i].dlq);
		free(b->subs[i].queue_type);
		acks_free(&b->subs[i].acks);
		broker_free_binds(b->subs[i].binds, b->subs[i].n_binds);
	}
	free(b->subs);
	free(b->outq);
	free(b->outbuf);
	free(b->pending);
	free(b->ring);
	event_free(b->retry_ev);
	event_free(b->wake_ev);
	event_free(b->hb_ev);
	event_free(b->notify_ev);
	event_base_free(b->base);
	for (i = 0; i < b->n_exchanges; i++) {
		free(b->exchanges[i].name);
		free(b->exchanges[i].type);
	}
	free(b->exchanges);
	broker_url_free(b->nodes, b->n_nodes);
	free(b->app_id); free(b->conn_name);
	free(b->tls_ca); free(b->tls_cert); free(b->tls_key);
	pthread_mutex_destroy(&b->lock);
	free(b);
}
