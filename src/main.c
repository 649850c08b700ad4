/* sagad: flags, signals and wiring; the work is in the modules. */
#include <errno.h>
#include <event2/event.h>
#include <event2/thread.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "admin.h"
#include "broker.h"
#include "broker_url.h"
#include "conf.h"
#include "delivery.h"
#include "ingress.h"
#include "amqpd.h"
#include "log.h"
#include "otel.h"
#include "plugin.h"
#include "relay.h"
#include "saga.h"
#include "saga_report.h"
#include "saga_store.h"
#include "sagad.h"
#include "store.h"
#include "util.h"
#include "xmalloc.h"

enum sagad_exit {
	EXIT_OK = 0,
	EXIT_CONFIG = 1,
	EXIT_USAGE = 2,
	EXIT_FATAL = 3
};

#define DEDUP_BATCH 500

struct sagad_main {
	struct sagad d;
	struct event *sig_term, *sig_int, *sig_hup;
	struct event *drain_ev, *expire_ev;
	double drain_deadline;
};

static void
usage(void)
{
	fprintf(stderr, "usage: sagad [-f FILE] [-n [-s]] [-v] [-V]\n");
	exit(EXIT_USAGE);
}

static void
print_errors(const struct conf_errors *errs)
{
	size_t i;

	for (i = 0; i < errs->n; i++)
		fprintf(stderr, "%s\n", errs->msg[i]);
}

/* The table (conf_table.c) says which keys a reload applies; the others
 * keep their running values, and the ones the file changed are named. */
static void
reload_keep(struct sagad_conf *nc, struct sagad_conf *oc)
{
	char changed[1024];

	if (conf_reload_keep(nc, oc, changed, sizeof changed) > 0)
		log_warn("reload: change needs a restart, ignored", LOG_STR("keys", changed));
}

static void
sagad_reload(struct sagad *d)
{
	struct conf_errors errs = { NULL, 0 };
	struct sagad_conf *nc = conf_load(d->conf->file, &errs);
	size_t i;

	if (!nc) {
		for (i = 0; i < errs.n; i++)
			log_error("reload refused, old configuration stays",
			    LOG_STR("error", errs.msg[i]));
		conf_errors_clear(&errs);
		d->reload_failures++;
		return;
	}
	reload_keep(nc, d->conf);
	relay_set_conf(d->relay, nc);
	conf_free(d->conf);
	d->conf = nc;
	store_set_max_bytes(d->store, nc->store.max_bytes);
	ingress_apply_conf(d->ingress);
	admin_apply_conf(d->admin);
	d->reloads++;
	log_info("configuration reloaded", LOG_STR("file", nc->file));
}

static void
drain_check(evutil_socket_t fd, short what, void *arg)
{
	struct sagad_main *sm = arg;
	struct sagad *d = &sm->d;
	unsigned inflight = relay_inflight(d->relay);
	unsigned delivering = delivery_inflight(d->delivery);

	(void)fd;
	(void)what;
	if ((inflight > 0 || delivering > 0) && util_mono() < sm->drain_deadline)
		return;
	if (inflight > 0 || delivering > 0)
		log_warn("drain timeout, stopping with work unfinished; it stays in the store",
		    LOG_UINT("publishes_unconfirmed", inflight),
		    LOG_UINT("deliveries_in_flight", delivering));
	store_flush(d->store);
	d->state = SAGAD_STOPPED;
	event_base_loopexit(d->base, NULL);
}

static void
on_signal(evutil_socket_t sig, short what, void *arg)
{
	struct sagad_main *sm = arg;
	struct sagad *d = &sm->d;
	struct timeval tick = { 0, 50000 };

	(void)what;
	if (sig == SIGHUP) {
		log_info("SIGHUP: reloading configuration");
		sagad_reload(d);
		return;
	}
	if (d->state != SAGAD_RUNNING) {
		log_warn("second stop signal: stopping now");
		store_flush(d->store);
		event_base_loopexit(d->base, NULL);
		return;
	}
	log_info("stopping: draining", LOG_STR("signal", sig == SIGTERM ? "TERM" : "INT"),
	    LOG_DBL("drain_timeout", d->conf->drain_timeout));
	d->state = SAGAD_DRAINING;
	relay_pause(d->relay);
	delivery_stop(d->delivery);
	sm->drain_deadline = util_mono() + d->conf->drain_timeout;
	sm->drain_ev = event_new(d->base, -1, EV_PERSIST, drain_check, sm);
	event_add(sm->drain_ev, &tick);
	drain_check(-1, 0, sm);
}

/* Forget dedup ids past the window, a small batch at a time so that no
 * turn of the loop stalls; faster while there is a backlog. */
static void
expire_ids(evutil_socket_t fd, short what, void *arg)
{
	struct sagad_main *sm = arg;
	struct sagad *d = &sm->d;
	struct timeval tv = { 1, 0 };
	int n;

	(void)fd;
	(void)what;
	n = store_expire_ids(d->store, util_now() - d->conf->store.dedup_window, DEDUP_BATCH);
	if (store_inbox_expire(d->store, util_now() - d->conf->store.dedup_window,
	    DEDUP_BATCH) >= DEDUP_BATCH)
		n = DEDUP_BATCH;
	if (d->saga && saga_expire(d->saga, util_now() - d->conf->store.saga_retention,
	    DEDUP_BATCH / 5) >= DEDUP_BATCH / 5)
		n = DEDUP_BATCH;
	if (n >= DEDUP_BATCH) {
		tv.tv_sec = 0;
		tv.tv_usec = 10000;
	}
	evtimer_add(sm->expire_ev, &tv);
}

static int sagad_exit_status = EXIT_OK;

static void
store_fatal(void *arg, const char *why)
{
	struct sagad *d = arg;

	log_error("store unusable, stopping", LOG_STR("path", d->conf->store.path),
	    LOG_STR("error", why));
	sagad_exit_status = EXIT_FATAL;
	d->state = SAGAD_STOPPED;
	event_base_loopexit(d->base, NULL);
}

static int
drop_privileges(const struct sagad_conf *c)
{
	const char *suffix[] = { "", "-wal", "-shm" };
	struct passwd *pw;
	char path[4096];
	size_t i;

	if (!c->user || geteuid() != 0)
		return 0;
	pw = getpwnam(c->user);
	if (!pw) {
		log_error("unknown user", LOG_STR("user", c->user));
		return -1;
	}
	for (i = 0; i < 3; i++) {
		snprintf(path, sizeof path, "%s%s", c->store.path, suffix[i]);
		if (chown(path, pw->pw_uid, pw->pw_gid) < 0 && errno != ENOENT)
			log_warn("cannot chown store file", LOG_STR("path", path),
			    LOG_STR("error", strerror(errno)));
	}
	{
		/* The unix sockets too: the service connects as a member of
		 * sagad's group (socket_mode 0660 by default). */
		const char *socks[] = { c->api.listen, c->api.admin_listen };
		for (i = 0; i < 2; i++)
			if (strncmp(socks[i], "unix:", 5) == 0 &&
			    chown(socks[i] + 5, pw->pw_uid, pw->pw_gid) < 0)
				log_warn("cannot chown socket", LOG_STR("path", socks[i] + 5),
				    LOG_STR("error", strerror(errno)));
	}
	if (initgroups(pw->pw_name, pw->pw_gid) < 0 || setgid(pw->pw_gid) < 0 ||
	    setuid(pw->pw_uid) < 0) {
		log_error("cannot drop privileges", LOG_STR("user", c->user),
		    LOG_STR("error", strerror(errno)));
		return -1;
	}
	log_info("privileges dropped", LOG_STR("user", c->user));
	return 0;
}

/* The event base, with its priorities: 0 broker news, 1 requests (the
 * default), 2 commit and relay fill, which run after everything else that
 * is ready in the turn. */
static struct event_base *
sagad_base(void)
{
	/* The changelist folds the add/del pairs of a turn into at most one
	 * epoll_ctl per descriptor: evhttp toggles read and write interest for
	 * every request, which otherwise costs a handful of system calls per
	 * delivered message. */
	struct event_config *cfg = event_config_new();
	struct event_base *base;

	event_config_set_flag(cfg, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
	base = event_base_new_with_config(cfg);
	event_config_free(cfg);
	event_base_priority_init(base, 3);
	return base;
}

/* The publishing side: the relay, its store hooks and its broker thread. */
static int
sagad_start_publishing(struct sagad *d, char **err)
{
	struct store_hooks hooks;

	d->otel = otel_new(d->base, d->conf, err);
	if (*err)
		return -1;
	d->relay = relay_new(d->base, d->store, d->conf);
	relay_set_otel(d->relay, d->otel);
	hooks.committed = relay_committed;
	hooks.rolled_back = relay_rolled_back;
	hooks.arg = d->relay;
	store_set_hooks(d->store, &hooks);
	store_set_async(d->store);
	d->broker = broker_new(d->base, d->conf, BROKER_ROLE_PUBLISH, relay_broker_event, d->relay);
	relay_set_broker(d->relay, d->broker);
	if (broker_start(d->broker) < 0) {
		*err = xstrdup("cannot start the broker thread");
		return -1;
	}
	return 0;
}

/* With a shared saga store, the saga queue's messages skip the inbox: the
 * store deduplicates them in its own transaction, and the ack follows its
 * commit. */
static void
sagad_saga_settle(void *arg, int result)
{
	static const enum delivery_verdict verdict[] = {
		[SAGA_JOB_DONE] = DELIVERY_ACK,
		[SAGA_JOB_DUPLICATE] = DELIVERY_DUPLICATE,
		[SAGA_JOB_RETRY] = DELIVERY_REQUEUE,
		[SAGA_JOB_FAILED] = DELIVERY_REJECT
	};

	delivery_settle(arg, verdict[result]);
}

static void
sagad_saga_take(void *arg, struct msg *m, struct delivery_ticket *t)
{
	saga_take(arg, m, sagad_saga_settle, t);
}

/* The consuming side: the subscriptions, the saga engine on its internal
 * one, and the consumer's broker thread. */
static int
sagad_start_consuming(struct sagad *d, char **err)
{
	d->delivery = delivery_new(d);
	if (!d->delivery) {
		*err = xstrdup("cannot set up the subscriptions");
		return -1;
	}
	if (d->conf->n_sagas) {
		d->saga = saga_new(d, err);
		if (!d->saga)
			return -1;
		if (saga_shared(d->saga))
			delivery_set_taker(d->delivery, delivery_sub_index(d->delivery, "_sagas"),
			    sagad_saga_take, d->saga);
		else
			delivery_set_handler(d->delivery, delivery_sub_index(d->delivery, "_sagas"),
			    saga_handle, d->saga);
	}
	if (d->conf->n_subs) {
		d->consumer = broker_new(d->base, d->conf, BROKER_ROLE_CONSUME,
		    delivery_broker_event, d->delivery);
		delivery_set_broker(d->delivery, d->consumer);
		if (broker_start(d->consumer) < 0) {
			*err = xstrdup("cannot start the consumer thread");
			return -1;
		}
	}
	return 0;
}

/* Everything up to the loop; -1 with *err (or, for privileges, logged). */
static int
sagad_start(struct sagad *d, char **err)
{
	char url[1024];

	broker_url_mask(d->conf->broker.url, url, sizeof url);
	log_info("sagad starting", LOG_STR("version", PACKAGE_VERSION),
	    LOG_STR("service", d->conf->service), LOG_STR("store", d->conf->store.path),
	    LOG_STR("listen", d->conf->api.listen), LOG_STR("admin", d->conf->api.admin_listen),
	    LOG_STR("broker", url));
	d->base = sagad_base();
	d->started = util_now();
	d->store = store_open(d->conf->store.path, d->base, d->conf->store.max_bytes, err);
	if (!d->store)
		return -1;
	store_set_fatal(d->store, store_fatal, d);
	d->ingress = ingress_new(d, err);
	if (!d->ingress)
		return -1;
	if (d->conf->amqp.listen && !(d->amqpd = amqpd_new(d, err)))
		return -1;
	d->admin = admin_new(d, err);
	if (!d->admin)
		return -1;
	/* The listeners are bound: the rest runs without privileges. */
	if (drop_privileges(d->conf) < 0)
		return -1;
	if (sagad_start_publishing(d, err) < 0 || sagad_start_consuming(d, err) < 0)
		return -1;
	if (d->conf->n_sources && !(d->plugins = plugins_start(d, err)))
		return -1;
	return 0;
}

/* Signals and the periodic expiry, then the loop until a stop. */
static void
sagad_loop(struct sagad_main *sm)
{
	struct sagad *d = &sm->d;
	struct timeval now = { 0, 0 };

	sm->sig_term = evsignal_new(d->base, SIGTERM, on_signal, sm);
	sm->sig_int = evsignal_new(d->base, SIGINT, on_signal, sm);
	sm->sig_hup = evsignal_new(d->base, SIGHUP, on_signal, sm);
	event_add(sm->sig_term, NULL);
	event_add(sm->sig_int, NULL);
	event_add(sm->sig_hup, NULL);
	sm->expire_ev = evtimer_new(d->base, expire_ids, sm);
	evtimer_add(sm->expire_ev, &now);
	log_info("sagad ready", LOG_INT("pending", store_outbox_count(d->store)),
	    LOG_STR("replica_id", store_replica_id(d->store)));
	event_base_dispatch(d->base);
}

/* Teardown, in the order the threads need. */
static void
sagad_stop(struct sagad_main *sm)
{
	struct sagad *d = &sm->d;

	d->state = SAGAD_STOPPED;
	/* Every fsync served first: its jobs (early broker acks) run on the
	 * syncer's thread and use the consumer and the delivery. */
	store_flush(d->store);
	if (d->consumer)
		broker_free(d->consumer);
	broker_free(d->broker);
	/* A shared saga store's jobs still queued settle their deliveries
	 * (nothing goes to the broker any more): that store goes first. */
	if (d->saga && saga_shared(d->saga)) {
		saga_free(d->saga);
		d->saga = NULL;
	}
	delivery_free(d->delivery);
	store_flush(d->store);
	plugins_stop(d->plugins);
	saga_free(d->saga);
	ingress_free(d->ingress);
	amqpd_free(d->amqpd);
	admin_free(d->admin);
	relay_free(d->relay);
	otel_free(d->otel);
	store_close(d->store);
	event_free(sm->sig_term);
	event_free(sm->sig_int);
	event_free(sm->sig_hup);
	event_free(sm->expire_ev);
	if (sm->drain_ev)
		event_free(sm->drain_ev);
	event_base_free(d->base);
}

static int
sagad_run(struct sagad_main *sm)
{
	char *err = NULL;

	if (sagad_start(&sm->d, &err) < 0) {
		/* drop_privileges logs its own reason */
		if (err)
			log_error("fatal", LOG_STR("error", err));
		free(err);
		return EXIT_FATAL;
	}
	sagad_loop(sm);
	sagad_stop(sm);
	log_info("sagad stopped", LOG_INT("status", sagad_exit_status));
	return sagad_exit_status;
}

/* libevent's own warnings would otherwise go to stderr as bare text, the one
 * kind of line in the log that is not logfmt. */
static void
main_event_log(int severity, const char *text)
{
	enum log_level lvl = severity >= EVENT_LOG_ERR ? LOG_LVL_ERROR :
	    severity == EVENT_LOG_WARN ? LOG_LVL_WARN : LOG_LVL_DEBUG;

	log_at_(lvl, "libevent", LOG_STR("detail", text));
}

int
main(int argc, char **argv)
{
	static struct sagad_main sm;
	struct conf_errors errs = { NULL, 0 };
	const char *file = SYSCONFDIR "/sagad/sagad.conf";
	int check = 0, store = 0, verbose = 0, c, rc;

	while ((c = getopt(argc, argv, "f:nsvVh")) != -1) {
		switch (c) {
		case 'f': file = optarg; break;
		case 'n': check = 1; break;
		case 's': store = 1; break;
		case 'v': verbose++; break;
		case 'V':
			printf("sagad %s\n", PACKAGE_VERSION);
			return EXIT_OK;
		default:
			usage();
		}
	}
	if (optind != argc)
		usage();
	log_set_level(verbose);
	event_set_log_callback(main_event_log);
	sm.d.conf = conf_load(file, &errs);
	if (sm.d.conf && plugins_check(sm.d.conf, &errs) > 0) {
		conf_free(sm.d.conf);
		sm.d.conf = NULL;
	}
	if (!sm.d.conf) {
		print_errors(&errs);
		conf_errors_clear(&errs);
		return EXIT_CONFIG;
	}
	if (check) {
		printf("%s: configuration ok\n", file);
		if (store)	/* what the file's sagas do to those in the store */
			saga_report(sm.d.conf, stdout);
		conf_free(sm.d.conf);
		return EXIT_OK;
	}
	/* libevent writes without MSG_NOSIGNAL (ARCHITECTURE.md: libevent:
	 * SIGPIPE). */
	signal(SIGPIPE, SIG_IGN);
	/* Needed before any base exists: the broker thread wakes the main
	 * base with event_active() (ARCHITECTURE.md: libevent: threads). */
	evthread_use_pthreads();
	rc = sagad_run(&sm);
	conf_free(sm.d.conf);
	return rc;
}
