/*
 * The AMQP front door's topology pass-through: exchange.declare/delete/
 * bind/unbind and queue.declare/bind/unbind/purge/delete, forwarded to the
 * broker one at a time on a connection of their own, owned by the thread
 * "sagad-topology", because rabbitmq-c blocks and must never run on the
 * main loop (ARCHITECTURE.md: rabbitmq-c: blocking). The broker's answer
 * (its -ok method, or its channel or connection error) goes back to the
 * main loop, where amqpd_chan.c tells the client.
 *
 * The connection is opened on the first call and closed after
 * AMQPD_TOPO_IDLE seconds without one, so that an idle front door holds
 * nothing on the broker and needs no heartbeats (it logs in with none).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <event2/event.h>

#include "amqpd_int.h"
#include "broker_url.h"
#include "conf.h"
#include "log.h"
#include "sagad.h"
#include "util.h"
#include "xmalloc.h"

/* The broker channel the calls go on; a fresh one after a channel error. */
#define AMQPD_TOPO_CHANNEL 1
/* Seconds a call may take on the broker before it counts as unreachable:
 * a quorum queue's declare takes a Raft round, seldom more than a second. */
#define AMQPD_TOPO_RPC_TIMEOUT 15.0
#define AMQPD_TOPO_IDLE 30.0

/*
 * The topology connection (one function per change, topology thread only):
 * DOWN -> CONNECTED (amqpd_topo_connect: logged in, no channel) -> READY
 * (amqpd_topo_open_channel); READY -> CONNECTED on a channel error
 * (amqpd_topo_channel_closed); any -> DOWN (amqpd_topo_disconnect).
 */
enum amqpd_topo_link {
	AMQPD_TOPO_DOWN,
	AMQPD_TOPO_CONNECTED,
	AMQPD_TOPO_READY
};

struct amqpd_topo {
	/* Settings, copied at start so that a reload never races the thread. */
	struct broker_node *nodes;
	size_t n_nodes;
	int tls_verify;
	char *tls_ca, *tls_cert, *tls_key;
	double connect_timeout;
	char *conn_name;

	pthread_t thread;
	int started;			/* thread runs: main thread only */

	/* Owned by the topology thread. */
	enum amqpd_topo_link link;
	amqp_connection_state_t conn;
	size_t node;			/* the node tried or connected now */
	amqp_pool_t pool;		/* the calls' decoded methods */

	/* Shared, under lock: calls to make (main -> thread), calls made
	 * (thread -> main), and the stop flag. */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct amqpd_topo_call *inq, **intail;
	struct amqpd_topo_call *outq, **outtail;
	int stop;

	/* Owned by the main thread. */
	struct event *done_ev;
};

/* The methods passed through, with the -ok each one is answered with. */
static const struct {
	amqp_method_number_t id, ok;
} amqpd_topo_methods[] = {
	{ AMQP_EXCHANGE_DECLARE_METHOD, AMQP_EXCHANGE_DECLARE_OK_METHOD },
	{ AMQP_EXCHANGE_DELETE_METHOD, AMQP_EXCHANGE_DELETE_OK_METHOD },
	{ AMQP_EXCHANGE_BIND_METHOD, AMQP_EXCHANGE_BIND_OK_METHOD },
	{ AMQP_EXCHANGE_UNBIND_METHOD, AMQP_EXCHANGE_UNBIND_OK_METHOD },
	{ AMQP_QUEUE_DECLARE_METHOD, AMQP_QUEUE_DECLARE_OK_METHOD },
	{ AMQP_QUEUE_BIND_METHOD, AMQP_QUEUE_BIND_OK_METHOD },
	{ AMQP_QUEUE_UNBIND_METHOD, AMQP_QUEUE_UNBIND_OK_METHOD },
	{ AMQP_QUEUE_PURGE_METHOD, AMQP_QUEUE_PURGE_OK_METHOD },
	{ AMQP_QUEUE_DELETE_METHOD, AMQP_QUEUE_DELETE_OK_METHOD },
};

amqp_method_number_t
amqpd_topo_ok_id(amqp_method_number_t id)
{
	size_t i;

	for (i = 0; i < sizeof amqpd_topo_methods / sizeof amqpd_topo_methods[0]; i++)
		if (amqpd_topo_methods[i].id == id)
			return amqpd_topo_methods[i].ok;
	return 0;
}

/* The method's nowait field (queue.unbind has none): the broker is always
 * asked for its answer, and the client told only if it asked. */
amqp_boolean_t *
amqpd_topo_nowait(amqp_method_number_t id, void *m)
{
	switch (id) {
	case AMQP_EXCHANGE_DECLARE_METHOD: return &((amqp_exchange_declare_t *)m)->nowait;
	case AMQP_EXCHANGE_DELETE_METHOD: return &((amqp_exchange_delete_t *)m)->nowait;
	case AMQP_EXCHANGE_BIND_METHOD: return &((amqp_exchange_bind_t *)m)->nowait;
	case AMQP_EXCHANGE_UNBIND_METHOD: return &((amqp_exchange_unbind_t *)m)->nowait;
	case AMQP_QUEUE_DECLARE_METHOD: return &((amqp_queue_declare_t *)m)->nowait;
	case AMQP_QUEUE_BIND_METHOD: return &((amqp_queue_bind_t *)m)->nowait;
	case AMQP_QUEUE_PURGE_METHOD: return &((amqp_queue_purge_t *)m)->nowait;
	case AMQP_QUEUE_DELETE_METHOD: return &((amqp_queue_delete_t *)m)->nowait;
	default: return NULL;
	}
}

void
amqpd_topo_call_free(struct amqpd_topo_call *call)
{
	free(call->args);
	free(call);
}

/* ---- the topology thread ---- */


/* Any -> DOWN. Closing politely could wait on a dead socket: only a
 * connection that still works gets its connection.close. */
static void
amqpd_topo_disconnect(struct amqpd_topo *t, int polite)
{
	if (t->link == AMQPD_TOPO_DOWN)
		return;
	if (polite)
		amqp_connection_close(t->conn, AMQP_REPLY_SUCCESS);
	amqp_destroy_connection(t->conn);
	t->conn = NULL;
	t->link = AMQPD_TOPO_DOWN;
}

/* DOWN -> CONNECTED, trying each node of broker.url once from the one that
 * worked last; why says what failed on the last one. */
static int
amqpd_topo_connect(struct amqpd_topo *t, char *why, size_t whylen)
{
	struct timeval ct = util_timeval(t->connect_timeout);
	struct timeval rt = util_timeval(AMQPD_TOPO_RPC_TIMEOUT);
	amqp_table_entry_t props[1];
	amqp_table_t client = { 1, props };
	const struct broker_node *n;
	amqp_socket_t *s;
	amqp_rpc_reply_t r;
	size_t tries;
	int rc;

	props[0].key = amqp_cstring_bytes("connection_name");
	props[0].value.kind = AMQP_FIELD_KIND_UTF8;
	props[0].value.value.bytes = amqp_cstring_bytes(t->conn_name);
	for (tries = 0; tries < t->n_nodes; tries++, t->node = (t->node + 1) % t->n_nodes) {
		n = &t->nodes[t->node];
		*why = '\0';
		t->conn = amqp_new_connection();
		amqp_set_handshake_timeout(t->conn, &ct);
		amqp_set_rpc_timeout(t->conn, &rt);
		if (!(s = broker_url_socket(t->conn, n, t->tls_verify, t->tls_ca, t->tls_cert,
		    t->tls_key, why, whylen))) {
			if (!*why)
				snprintf(why, whylen, "cannot create socket");
		} else if ((rc = amqp_socket_open_noblock(s, n->host, n->port, &ct)) !=
		    AMQP_STATUS_OK) {
			snprintf(why, whylen, "connect %s:%d: %s", n->host, n->port,
			    amqp_error_string2(rc));
		} else if ((r = amqp_login_with_properties(t->conn, n->vhost, 0, 131072, 0,
		    &client, AMQP_SASL_METHOD_PLAIN, n->user, n->password)).reply_type !=
		    AMQP_RESPONSE_NORMAL) {
			snprintf(why, whylen, "login to %s:%d refused or failed", n->host, n->port);
		} else {
			t->link = AMQPD_TOPO_CONNECTED;
			log_info("amqp: topology connection to the broker up",
			    LOG_STR("host", n->host), LOG_INT("port", n->port));
			return 0;
		}
		amqp_destroy_connection(t->conn);
		t->conn = NULL;
	}
	return -1;
}

/* CONNECTED -> READY. */
static int
amqpd_topo_open_channel(struct amqpd_topo *t)
{
	amqp_channel_open(t->conn, AMQPD_TOPO_CHANNEL);
	if (amqp_get_rpc_reply(t->conn).reply_type != AMQP_RESPONSE_NORMAL)
		return -1;
	t->link = AMQPD_TOPO_READY;
	return 0;
}

/* READY -> CONNECTED: the broker closed the channel; a fresh one is opened
 * for the next call. */
static void
amqpd_topo_channel_closed(struct amqpd_topo *t)
{
	amqp_channel_close_ok_t ok = { 0 };

	amqp_send_method(t->conn, AMQPD_TOPO_CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
	t->link = AMQPD_TOPO_CONNECTED;
}

/* The broker's close (channel or connection: both start with reply_code,
 * reply_text, class_id, method_id) into the call. */
static void
amqpd_topo_error(struct amqpd_topo_call *call, enum amqpd_topo_result result,
    const amqp_channel_close_t *cl)
{
	call->result = result;
	call->code = cl->reply_code;
	call->method = ((uint32_t)cl->class_id << 16) | cl->method_id;
	snprintf(call->text, sizeof call->text, "%.*s", (int)cl->reply_text.len,
	    cl->reply_text.len ? (char *)cl->reply_text.bytes : "");
}

static void
amqpd_topo_unreachable(struct amqpd_topo_call *call, const char *why)
{
	call->result = AMQPD_TOPO_UNREACHABLE;
	snprintf(call->text, sizeof call->text, "%s", why);
}

/* The broker's answer to a call, into the call. */
static void
amqpd_topo_answer(struct amqpd_topo *t, struct amqpd_topo_call *call, amqp_rpc_reply_t r)
{
	int n;

	if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION) {
		amqpd_topo_unreachable(call, amqp_error_string2(r.library_error));
		amqpd_topo_disconnect(t, 0);
	} else if (r.reply_type != AMQP_RESPONSE_SERVER_EXCEPTION) {
		n = amqp_encode_method(r.reply.id, r.reply.decoded,
		    (amqp_bytes_t){ sizeof call->reply, call->reply });
		call->result = n < 0 ? AMQPD_TOPO_UNREACHABLE : AMQPD_TOPO_OK;
		call->reply_id = r.reply.id;
		call->reply_len = n < 0 ? 0 : (size_t)n;
		if (n < 0)
			snprintf(call->text, sizeof call->text, "cannot encode the broker's answer");
	} else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
		amqpd_topo_error(call, AMQPD_TOPO_CHANNEL_ERROR, r.reply.decoded);
		amqpd_topo_channel_closed(t);
	} else {
		amqpd_topo_error(call, AMQPD_TOPO_CONNECTION_ERROR, r.reply.decoded);
		if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
			amqp_connection_close_ok_t ok = { 0 };

			amqp_send_method(t->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
		}
		amqpd_topo_disconnect(t, 0);
	}
}

/* A connection kept from an earlier call may have been closed by the broker
 * meanwhile (a restart sends connection.close to every client): nothing
 * else comes unasked on it (no heartbeats, no consumers), so any frame
 * waiting, or a socket error, means it is gone, and a fresh one is made
 * rather than the client's call failing on a corpse. */
static void
amqpd_topo_check(struct amqpd_topo *t)
{
	struct timeval zero = { 0, 0 };
	amqp_frame_t f;
	int rc;

	if (t->link == AMQPD_TOPO_DOWN)
		return;
	rc = amqp_simple_wait_frame_noblock(t->conn, &f, &zero);
	if (rc == AMQP_STATUS_TIMEOUT)
		return;
	log_info("amqp: topology connection to the broker closed while idle, reconnecting",
	    LOG_STR("reason", rc == AMQP_STATUS_OK ? "a frame from the broker" :
	    amqp_error_string2(rc)));
	amqpd_topo_disconnect(t, 0);
}

/* One call, synchronously: connect and open the channel if need be, then
 * the client's method as it came (nowait cleared by the main thread). */
static void
amqpd_topo_run(struct amqpd_topo *t, struct amqpd_topo_call *call)
{
	amqp_method_number_t expected[2] = { amqpd_topo_ok_id(call->id), 0 };
	char why[256];
	void *m;

	amqpd_topo_check(t);
	if (t->link == AMQPD_TOPO_DOWN && amqpd_topo_connect(t, why, sizeof why) < 0) {
		amqpd_topo_unreachable(call, why);
		return;
	}
	if (t->link == AMQPD_TOPO_CONNECTED && amqpd_topo_open_channel(t) < 0) {
		amqpd_topo_answer(t, call, amqp_get_rpc_reply(t->conn));
		if (call->result == AMQPD_TOPO_CHANNEL_ERROR)	/* not the client's doing */
			amqpd_topo_unreachable(call, "the broker refused a channel");
		return;
	}
	if (amqp_decode_method(call->id, &t->pool, (amqp_bytes_t){ call->alen, call->args },
	    &m) < 0) {
		/* The main thread encoded it a moment ago: cannot happen. */
		amqpd_topo_unreachable(call, "cannot decode the method");
		return;
	}
	amqpd_topo_answer(t, call, amqp_simple_rpc(t->conn, AMQPD_TOPO_CHANNEL, call->id,
	    expected, m));
	recycle_amqp_pool(&t->pool);
	if (t->link != AMQPD_TOPO_DOWN)
		amqp_maybe_release_buffers(t->conn);
}

static void *
amqpd_topo_main(void *arg)
{
	struct amqpd_topo *t = arg;
	struct amqpd_topo_call *call;
	struct timespec until;
	int idle;

	pthread_setname_np(pthread_self(), "sagad-topology");
	pthread_mutex_lock(&t->lock);
	for (;;) {
		idle = 0;
		while (!t->stop && !t->inq && !idle) {
			clock_gettime(CLOCK_REALTIME, &until);
			until.tv_sec += (time_t)AMQPD_TOPO_IDLE;
			idle = pthread_cond_timedwait(&t->cond, &t->lock, &until) != 0;
		}
		if (t->stop)
			break;
		if (!t->inq) {	/* idle: let the broker connection go */
			pthread_mutex_unlock(&t->lock);
			amqpd_topo_disconnect(t, 1);
			pthread_mutex_lock(&t->lock);
			continue;
		}
		call = t->inq;
		if (!(t->inq = call->next))
			t->intail = &t->inq;
		pthread_mutex_unlock(&t->lock);
		amqpd_topo_run(t, call);
		pthread_mutex_lock(&t->lock);
		call->next = NULL;
		*t->outtail = call;
		t->outtail = &call->next;
		event_active(t->done_ev, 0, 0);
	}
	pthread_mutex_unlock(&t->lock);
	amqpd_topo_disconnect(t, 1);
	return NULL;
}

/* ---- the main thread's side ---- */

static void
amqpd_topo_done_cb(evutil_socket_t fd, short what, void *arg)
{
	struct amqpd_topo *t = arg;
	struct amqpd_topo_call *calls, *next;

	(void)fd;
	(void)what;
	pthread_mutex_lock(&t->lock);
	calls = t->outq;
	t->outq = NULL;
	t->outtail = &t->outq;
	pthread_mutex_unlock(&t->lock);
	for (; calls; calls = next) {
		next = calls->next;
		amqpd_chan_topo_done(calls);
	}
}

struct amqpd_topo *
amqpd_topo_new(struct sagad *d, char **err)
{
	const struct sagad_conf *c = d->conf;
	struct amqpd_topo *t = xcalloc(1, sizeof *t);
	char why[768];
	int n = broker_url_parse(c->broker.url, &t->nodes, why, sizeof why);
	size_t i;

	if (n < 0) {
		*err = xasprintf("broker.url: %s", why);
		free(t);
		return NULL;
	}
	t->n_nodes = (size_t)n;
	for (i = 0; c->broker.password_file && i < t->n_nodes; i++) {
		free(t->nodes[i].password);
		t->nodes[i].password = xstrdup(c->broker.password);
	}
	t->tls_verify = c->broker.tls_verify;
	t->tls_ca = c->broker.tls_ca ? xstrdup(c->broker.tls_ca) : NULL;
	t->tls_cert = c->broker.tls_cert ? xstrdup(c->broker.tls_cert) : NULL;
	t->tls_key = c->broker.tls_key ? xstrdup(c->broker.tls_key) : NULL;
	t->connect_timeout = c->broker.connect_timeout;
	t->conn_name = xasprintf("sagad %s amqp topology", c->service);
	t->link = AMQPD_TOPO_DOWN;
	init_amqp_pool(&t->pool, 4096);
	pthread_mutex_init(&t->lock, NULL);
	pthread_cond_init(&t->cond, NULL);
	t->intail = &t->inq;
	t->outtail = &t->outq;
	t->done_ev = event_new(d->base, -1, 0, amqpd_topo_done_cb, t);
	event_priority_set(t->done_ev, 0);
	if (pthread_create(&t->thread, NULL, amqpd_topo_main, t) != 0) {
		*err = xasprintf("cannot start the front door's topology thread");
		amqpd_topo_free(t);
		return NULL;
	}
	t->started = 1;
	return t;
}

void
amqpd_topo_call(struct amqpd_topo *t, struct amqpd_topo_call *call)
{
	call->next = NULL;
	pthread_mutex_lock(&t->lock);
	*t->intail = call;
	t->intail = &call->next;
	pthread_cond_signal(&t->cond);
	pthread_mutex_unlock(&t->lock);
}

/* Stops the thread (after the call it is making, bounded by the rpc
 * timeout) and drops the calls not answered: their connections are gone
 * (amqpd_free dropped them first), only their references remain. */
void
amqpd_topo_free(struct amqpd_topo *t)
{
	struct amqpd_topo_call *call, *next;

	if (!t)
		return;
	if (t->started) {
		pthread_mutex_lock(&t->lock);
		t->stop = 1;
		pthread_cond_signal(&t->cond);
		pthread_mutex_unlock(&t->lock);
		pthread_join(t->thread, NULL);
	}
	for (call = t->inq; call; call = next) {
		next = call->next;
		amqpd_conn_unref(call->c);
		amqpd_topo_call_free(call);
	}
	for (call = t->outq; call; call = next) {
		next = call->next;
		amqpd_conn_unref(call->c);
		amqpd_topo_call_free(call);
	}
	event_free(t->done_ev);
	empty_amqp_pool(&t->pool);
	pthread_mutex_destroy(&t->lock);
	pthread_cond_destroy(&t->cond);
	broker_url_free(t->nodes, t->n_nodes);
	free(t->tls_ca);
	free(t->tls_cert);
	free(t->tls_key);
	free(t->conn_name);
	free(t);
}
