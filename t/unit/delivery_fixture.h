/*
 * The fixture of the delivery's unit tests (test_delivery.c,
 * test_dispatch_sink.c): a real store, the consuming broker's thread
 * replaced (ld --wrap) by a recorder of acks, requeues and consume wishes,
 * DELIVERY events played by the test, and the service played in-process by
 * an evhttp server on a free loopback port. The including file defines
 * CONF (a configuration with a %d for the service's port) first. Static
 * functions: each test program has its own copy.
 */
#ifndef SAGAD_TEST_DELIVERY_FIXTURE_H
#define SAGAD_TEST_DELIVERY_FIXTURE_H

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <jansson.h>
#include <netinet/in.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "broker.h"
#include "conf.h"
#include "delivery.h"
#include "props.h"
#include "sagad.h"
#include "store.h"
#include "store_records.h"
#include "util.h"
#include "xmalloc.h"

#define WAIT_LIMIT 5.0	/* seconds a condition may take before the test fails */

/* ---- the broker, as the delivery sees it ---- */

static struct store *ack_store;	/* to check, at each ack, what is committed */
static unsigned nacks, nrequeues, nconsume_off, nconsume_on;
static uint64_t acked_tags[64];
static int acked_uncommitted;	/* an ack came while its record was not committed */
/* Every settlement (ack, requeue, reject) in order: what, epoch, sub, tag. */
static unsigned nrejects, nkicks, nsettled;
static struct settled {
	char what;	/* 'a', 'q', 'r' */
	uint64_t epoch, tag;
	int sub;
} settled[64];

static void
record_settled(char what, uint64_t epoch, int sub, uint64_t tag)
{
	assert_true(nsettled < 64);
	settled[nsettled].what = what;
	settled[nsettled].epoch = epoch;
	settled[nsettled].sub = sub;
	settled[nsettled].tag = tag;
	nsettled++;
}

void __wrap_broker_ack(struct broker *b, uint64_t epoch, int sub, uint64_t tag);
void __wrap_broker_requeue(struct broker *b, uint64_t epoch, int sub, uint64_t tag);
void __wrap_broker_reject(struct broker *b, uint64_t epoch, int sub, uint64_t tag);
void __wrap_broker_consume(struct broker *b, int sub, int on);
void __wrap_broker_kick(struct broker *b);

void
__wrap_broker_ack(struct broker *b, uint64_t epoch, int sub, uint64_t tag)
{
	(void)b;
	record_settled('a', epoch, sub, tag);
	/* Committed: no transaction open, and the record is in the inbox. */
	if (!sqlite3_get_autocommit(store_db(ack_store)) ||
	    store_inbox_count(ack_store, "inbox", INBOX_PENDING) +
	    store_inbox_count(ack_store, "inbox", INBOX_DONE) +
	    store_inbox_count(ack_store, "inbox", INBOX_DEAD) == 0)
		acked_uncommitted = 1;
	assert_true(nacks < 64);
	acked_tags[nacks++] = tag;
}

void
__wrap_broker_requeue(struct broker *b, uint64_t epoch, int sub, uint64_t tag)
{
	(void)b;
	record_settled('q', epoch, sub, tag);
	nrequeues++;
}

void
__wrap_broker_reject(struct broker *b, uint64_t epoch, int sub, uint64_t tag)
{
	(void)b;
	record_settled('r', epoch, sub, tag);
	nrejects++;
}

void
__wrap_broker_consume(struct broker *b, int sub, int on)
{
	(void)b;
	(void)sub;
	if (on)
		nconsume_on++;
	else
		nconsume_off++;
}

void
__wrap_broker_kick(struct broker *b)
{
	(void)b;
	nkicks++;
}

/* ---- the service ---- */

/* What the service answers, request by request; 200 past the script. */
struct service {
	int script[16];
	size_t nscript;
	size_t nreq;
	char ids[16][64];	/* Message-Id of each request */
	unsigned attempt[16];	/* its Sagad-Attempt */
	double at[16];		/* util_now() when it came */
};

static struct service svc;

static void
service_cb(struct evhttp_request *req, void *arg)
{
	struct evkeyvalq *h = evhttp_request_get_input_headers(req);
	const char *id = evhttp_find_header(h, "Message-Id");
	const char *att = evhttp_find_header(h, "Sagad-Attempt");
	size_t i = svc.nreq;
	int status = i < svc.nscript ? svc.script[i] : 200;

	(void)arg;
	if (i < 16) {
		snprintf(svc.ids[i], sizeof svc.ids[i], "%s", id ? id : "");
		svc.attempt[i] = att ? (unsigned)atoi(att) : 0;
		svc.at[i] = util_now();
	}
	svc.nreq++;
	evhttp_send_reply(req, status, status < 300 ? "OK" : "No", NULL);
}

/* ---- fixture ---- */

struct fx {
	char dir[64], path[128];
	struct event_base *base;
	struct evhttp *http;
	struct event *tick;
	struct sagad d;
	struct delivery *dl;
	uint64_t tag;
	uint64_t epoch;		/* of the broker connection the test plays */
};

static int
service_port(struct evhttp_bound_socket *bs)
{
	struct sockaddr_in sin;
	socklen_t len = sizeof sin;

	assert_int_equal(getsockname(evhttp_bound_socket_get_fd(bs),
	    (struct sockaddr *)&sin, &len), 0);
	return ntohs(sin.sin_port);
}

/* Wakes the loop now and then so that run_until sees its deadline. */
static void
tick_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd; (void)what; (void)arg;
}

static int
setup(void **state)
{
	struct fx *f = xcalloc(1, sizeof *f);
	struct conf_errors errs = { 0 };
	struct evhttp_bound_socket *bs;
	struct timeval tv = { 0, 10000 };
	char conf[1024], *err = NULL;

	snprintf(f->dir, sizeof f->dir, "/tmp/sagad-test-delivery-XXXXXX");
	assert_non_null(mkdtemp(f->dir));
	snprintf(f->path, sizeof f->path, "%s/store.db", f->dir);
	f->base = event_base_new();
	event_base_priority_init(f->base, 3);
	f->http = evhttp_new(f->base);
	evhttp_set_gencb(f->http, service_cb, NULL);
	bs = evhttp_bind_socket_with_handle(f->http, "127.0.0.1", 0);
	assert_non_null(bs);
	snprintf(conf, sizeof conf, CONF, service_port(bs));
	f->d.base = f->base;
	f->d.conf = conf_load_string(conf, "test.conf", ".", &errs);
	if (!f->d.conf)
		fail_msg("configuration: %s", errs.n ? errs.msg[0] : "?");
	f->d.store = store_open(f->path, f->base, INT64_C(1) << 30, &err);
	assert_non_null(f->d.store);
	f->d.state = SAGAD_RUNNING;
	f->dl = delivery_new(&f->d);
	assert_non_null(f->dl);
	f->d.delivery = f->dl;
	f->tick = event_new(f->base, -1, EV_PERSIST, tick_cb, NULL);
	event_add(f->tick, &tv);
	memset(&svc, 0, sizeof svc);
	ack_store = f->d.store;
	nacks = nrequeues = nconsume_off = nconsume_on = 0;
	nrejects = nkicks = nsettled = 0;
	acked_uncommitted = 0;
	f->epoch = 1;
	delivery_set_broker(f->dl, (struct broker *)f);	/* never looked into */
	*state = f;
	return 0;
}

static int
teardown(void **state)
{
	struct fx *f = *state;
	char p[160];

	/* As sagad_run stops: pending commits are served while the delivery
	 * still exists (their callbacks use it), then it goes. */
	store_flush(f->d.store);
	f->d.state = SAGAD_STOPPED;
	delivery_free(f->dl);
	store_close(f->d.store);
	conf_free(f->d.conf);
	event_free(f->tick);
	evhttp_free(f->http);
	event_base_free(f->base);
	snprintf(p, sizeof p, "rm -rf '%s'", f->dir);
	assert_int_equal(system(p), 0);
	free(f);
	return 0;
}

/* ---- helpers ---- */

typedef int cond_fn(struct fx *f, unsigned n);

/* Run the loop until cond(f, n) holds; fail after WAIT_LIMIT seconds. */
static void
run_until(struct fx *f, cond_fn *cond, unsigned n)
{
	double end = util_mono() + WAIT_LIMIT;

	while (!cond(f, n)) {
		if (util_mono() > end)
			fail_msg("condition not reached within %.0f s", WAIT_LIMIT);
		event_base_loop(f->base, EVLOOP_ONCE);
	}
}

static int
requests_reach(struct fx *f, unsigned n)
{
	(void)f;
	return svc.nreq >= n;
}

static int
acks_reach(struct fx *f, unsigned n)
{
	(void)f;
	return nacks >= n;
}

static int
dead_reach(struct fx *f, unsigned n)
{
	return store_inbox_count(f->d.store, "inbox", INBOX_DEAD) >= (int64_t)n;
}

static int
done_reach(struct fx *f, unsigned n)
{
	return store_inbox_count(f->d.store, "inbox", INBOX_DONE) >= (int64_t)n &&
	    delivery_inflight(f->dl) == 0;
}

static int
circuit_closed_again(struct fx *f, unsigned n)
{
	(void)n;
	return done_reach(f, 1);
}

/* A few turns with nothing new expected: commits settle, nothing else. */
static void
settle(struct fx *f)
{
	int i;

	for (i = 0; i < 4; i++)
		event_base_loop(f->base, EVLOOP_NONBLOCK);
	assert_int_equal(store_flush(f->d.store), 0);
	for (i = 0; i < 4; i++)
		event_base_loop(f->base, EVLOOP_NONBLOCK);
}

static void
broker_up(struct fx *f)
{
	struct broker_event ev = { 0 };

	ev.kind = BROKER_EV_UP;
	ev.epoch = f->epoch;
	delivery_broker_event(f->dl, &ev);
}

/* A consumed message of subscription sub, as the broker thread posts it;
 * reply_to may be NULL. */
static void
deliver_to(struct fx *f, int sub, const char *id, const char *reply_to)
{
	struct broker_event ev = { 0 };
	struct msg *m = xcalloc(1, sizeof *m);

	m->seq = (int64_t)++f->tag;
	m->message_id = xstrdup(id);
	m->exchange = xstrdup("events");
	m->routing_key = xstrdup("order.created");
	m->body = xstrdup("{}");
	m->body_len = 2;
	if (reply_to)
		m->props.reply_to = xstrdup(reply_to);
	ev.kind = BROKER_EV_DELIVERY;
	ev.epoch = f->epoch;
	ev.sub = sub;
	ev.msg = m;
	ev.received = util_mono();
	delivery_broker_event(f->dl, &ev);
}

static void
deliver(struct fx *f, const char *id, const char *reply_to)
{
	deliver_to(f, 0, id, reply_to);
}

/* The subscription's admin view, one string field. */
static void
assert_sub_field(struct fx *f, const char *key, const char *want)
{
	json_t *j = delivery_sub_json(f->dl, 0);

	assert_non_null(j);
	assert_string_equal(json_string_value(json_object_get(j, key)), want);
	json_decref(j);
}

/* The reason of the first dead letter. */
static void
assert_dead_reason(struct fx *f, const char *want)
{
	json_t *j = delivery_dlq_json(f->dl, 0, 10);
	json_t *first;

	assert_non_null(j);
	first = json_array_get(json_object_get(j, "messages"), 0);
	assert_non_null(first);
	assert_string_equal(json_string_value(json_object_get(first, "reason")), want);
	json_decref(j);
}

#endif
