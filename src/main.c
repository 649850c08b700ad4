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
#include "conf.h"
#include "delivery.h"
#include "ingress.h"
#include "log.h"
#include "plugin.h"
#include "relay.h"
#include "saga.h"
#include "sagad.h"
#include "store.h"
#include "util.h"

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
	fprintf(stderr, "usage: sagad [-f FILE] [-n] [-v] [-V]\n");
	exit(EXIT_USAGE);
}

static void
print_errors(const struct conf_errors *errs)
{
	size_t i;

	for (i = 0; i < errs->n; i++)
		fprintf(stderr, "%s\n", errs->msg[i]);
}

/* Keys whose change needs a restart keep their old value on reload. */
static void
reload_keep(struct sagad_conf *nc, struct sagad_conf *oc)
{
#define KEEP_STR(field, name)						\
	do {								\
		if (strcmp(nc->field ? nc->field : "", oc->field ? oc->field : "") != 0) \
			log_warn("msg=\"reload: change needs a restart, ignored\" key=%s", name); \
		char *t_ = nc->field; nc->field = oc->field; oc->field = t_; \
	} while (0)
	struct conf_broker tb;
	struct conf_exchange *te;
	struct conf_subscription *ts;
	struct conf_saga *tg;
	size_t tn, i;
	int same;

	KEEP_STR(service, "service");
	KEEP_STR(user, "user");
	KEEP_STR(store.path, "store.path");
	KEEP_STR(api.listen, "api.listen");
	KEEP_STR(api.admin_listen, "api.admin_listen");
	if (strcmp(nc->broker.url, oc->broker.url) != 0 ||
	    strcmp(nc->broker.password, oc->broker.password) != 0 ||
	    nc->broker.heartbeat != oc->broker.heartbeat)
		log_warn("msg=\"reload: change needs a restart, ignored\" key=broker");
	tb = nc->broker; nc->broker = oc->broker; oc->broker = tb;
	same = nc->n_exchanges == oc->n_exchanges;
	for (i = 0; same && i < nc->n_exchanges; i++)
		same = strcmp(nc->exchanges[i].name, oc->exchanges[i].name) == 0 &&
		    strcmp(nc->exchanges[i].type, oc->exchanges[i].type) == 0;
	if (!same)
		log_warn("msg=\"reload: change needs a restart, ignored\" key=exchanges");
	te = nc->exchanges; nc->exchanges = oc->exchanges; oc->exchanges = te;
	tn = nc->n_exchanges; nc->n_exchanges = oc->n_exchanges; oc->n_exchanges = tn;
	if (nc->n_subs != oc->n_subs)
		log_warn("msg=\"reload: change needs a restart, ignored\" key=subscriptions");
	ts = nc->subs; nc->subs = oc->subs; oc->subs = ts;
	tn = nc->n_subs; nc->n_subs = oc->n_subs; oc->n_subs = tn;
	if (nc->n_sagas != oc->n_sagas)
		log_warn("msg=\"reload: change needs a restart, ignored\" key=sagas");
	tg = nc->sagas; nc->sagas = oc->sagas; oc->sagas = tg;
	tn = nc->n_sagas; nc->n_sagas = oc->n_sagas; oc->n_sagas = tn;
	KEEP_STR(saga_queue, "sagas");
	KEEP_STR(saga_queue_type, "saga_queue_type");
	nc->api.socket_mode = oc->api.socket_mode;
#undef KEEP_STR
}

static void
sagad_reload(struct sagad *d)
{
	struct conf_errors errs = { NULL, 0 };
	struct sagad_conf *nc = conf_load(d->conf->file, &errs);
	size_t i;

	if (!nc) {
		for (i = 0; i < errs.n; i++) {
			char q[600];
			log_error("msg=\"reload refused, old configuration stays\" error=%s",
			    log_quote(q, sizeof q, errs.msg[i]));
		}
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
	log_info("msg=\"configuration reloaded\" file=%s", nc->file);
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
		log_warn("msg=\"drain timeout, stopping with work unfinished; it stays in the store\" publishes_unconfirmed=%u deliveries_in_flight=%u",
		    inflight, delivering);
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
		log_info("msg=\"SIGHUP: reloading configuration\"");
		sagad_reload(d);
		return;
	}
	if (d->state != SAGAD_RUNNING) {
		log_warn("msg=\"second stop signal: stopping now\"");
		store_flush(d->store);
		event_base_loopexit(d->base, NULL);
		return;
	}
	log_info("msg=\"stopping: draining\" signal=%s drain_timeout=%.1f",
	    sig == SIGTERM ? "TERM" : "INT", d->conf->drain_timeout);
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
	char q[600];

	log_error("msg=\"store unusable, stopping\" path=%s error=%s", d->conf->store.path,
	    log_quote(q, sizeof q, why));
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
		log_error("msg=\"unknown user\" user=%s", c->user);
		return -1;
	}
	for (i = 0; i < 3; i++) {
		snprintf(path, sizeof path, "%s%s", c->store.path, suffix[i]);
		if (chown(path, pw->pw_uid, pw->pw_gid) < 0 && errno != ENOENT)
			log_warn("msg=\"cannot chown store file\" path=%s error=\"%s\"", path,
			    strerror(errno));
	}
	{
		/* The unix sockets too: the service connects as a member of
		 * sagad's group (socket_mode 0660 by default). */
		const char *socks[] = { c->api.listen, c->api.admin_listen };
		for (i = 0; i < 2; i++)
			if (strncmp(socks[i], "unix:", 5) == 0 &&
			    chown(socks[i] + 5, pw->pw_uid, pw->pw_gid) < 0)
				log_warn("msg=\"cannot chown socket\" path=%s error=\"%s\"",
				    socks[i] + 5, strerror(errno));
	}
	if (initgroups(pw->pw_name, pw->pw_gid) < 0 || setgid(pw->pw_gid) < 0 ||
	    setuid(pw->pw_uid) < 0) {
		log_error("msg=\"cannot drop privileges\" user=%s error=\"%s\"", c->user,
		    strerror(errno));
		return -1;
	}
	log_info("msg=\"privileges dropped\" user=%s", c->user);
	return 0;
}

static int
sagad_run(struct sagad_main *sm)
{
	struct sagad *d = &sm->d;
	struct store_hooks hooks;
	struct timeval now = { 0, 0 };
	char *err = NULL, url[1024];

	util_mask_url(d->conf->broker.url, url, sizeof url);
	log_info("msg=\"sagad starting\" version=%s service=%s store=%s listen=%s admin=%s broker=%s",
	    PACKAGE_VERSION, d->conf->service, d->conf->store.path, d->conf->api.listen,
	    d->conf->api.admin_listen, url);
	{
		/* The changelist folds the add/del pairs of a turn into at most
		 * one epoll_ctl per descriptor: evhttp toggles read and write
		 * interest for every request, which otherwise costs a handful of
		 * system calls per delivered message. */
		struct event_config *cfg = event_config_new();
		event_config_set_flag(cfg, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
		d->base = event_base_new_with_config(cfg);
		event_config_free(cfg);
	}
	/* 0: broker news, 1: requests (default), 2: commit and relay fill,
	 * which run after everything else that is ready in the turn. */
	event_base_priority_init(d->base, 3);
	d->started = util_now();
	d->store = store_open(d->conf->store.path, d->base, d->conf->store.max_bytes, &err);
	if (!d->store)
		goto fatal;
	store_set_fatal(d->store, store_fatal, d);
	d->ingress = ingress_new(d, &err);
	if (!d->ingress)
		goto fatal;
	d->admin = admin_new(d, &err);
	if (!d->admin)
		goto fatal;
	if (drop_privileges(d->conf) < 0)
		return EXIT_FATAL;
	d->relay = relay_new(d->base, d->store, d->conf);
	hooks.committed = relay_committed;
	hooks.rolled_back = relay_rolled_back;
	hooks.arg = d->relay;
	store_set_hooks(d->store, &hooks);
	store_set_async(d->store);
	d->broker = broker_new(d->base, d->conf, BROKER_ROLE_PUBLISH, relay_broker_event, d->relay);
	relay_set_broker(d->relay, d->broker);
	if (broker_start(d->broker) < 0) {
		err = strdup("cannot start the broker thread");
		goto fatal;
	}
	d->delivery = delivery_new(d);
	if (!d->delivery) {
		err = strdup("cannot set up the subscriptions");
		goto fatal;
	}
	if (d->conf->n_sagas) {
		d->saga = saga_new(d, &err);
		if (!d->saga)
			goto fatal;
		delivery_set_handler(d->delivery, delivery_sub_index(d->delivery, "_sagas"),
		    saga_handle, d->saga);
	}
	if (d->conf->n_subs) {
		d->consumer = broker_new(d->base, d->conf, BROKER_ROLE_CONSUME,
		    delivery_broker_event, d->delivery);
		delivery_set_broker(d->delivery, d->consumer);
		if (broker_start(d->consumer) < 0) {
			err = strdup("cannot start the consumer thread");
			goto fatal;
		}
	}
	if (d->conf->n_sources) {
		d->plugins = plugins_start(d, &err);
		if (!d->plugins)
			goto fatal;
	}
	sm->sig_term = evsignal_new(d->base, SIGTERM, on_signal, sm);
	sm->sig_int = evsignal_new(d->base, SIGINT, on_signal, sm);
	sm->sig_hup = evsignal_new(d->base, SIGHUP, on_signal, sm);
	event_add(sm->sig_term, NULL);
	event_add(sm->sig_int, NULL);
	event_add(sm->sig_hup, NULL);
	sm->expire_ev = evtimer_new(d->base, expire_ids, sm);
	evtimer_add(sm->expire_ev, &now);
	log_info("msg=\"sagad ready\" pending=%lld", (long long)store_outbox_count(d->store));
	event_base_dispatch(d->base);

	d->state = SAGAD_STOPPED;
	/* Every fsync served first: its jobs (early broker acks) run on the
	 * syncer's thread and use the consumer and the delivery. */
	store_flush(d->store);
	if (d->consumer)
		broker_free(d->consumer);
	broker_free(d->broker);
	delivery_free(d->delivery);
	store_flush(d->store);
	plugins_stop(d->plugins);
	saga_free(d->saga);
	ingress_free(d->ingress);
	admin_free(d->admin);
	relay_free(d->relay);
	store_close(d->store);
	event_free(sm->sig_term);
	event_free(sm->sig_int);
	event_free(sm->sig_hup);
	event_free(sm->expire_ev);
	if (sm->drain_ev)
		event_free(sm->drain_ev);
	event_base_free(d->base);
	log_info("msg=\"sagad stopped\" status=%d", sagad_exit_status);
	return sagad_exit_status;
fatal:
	{
		char q[1024];
		log_error("msg=\"fatal\" error=%s", log_quote(q, sizeof q, err ? err : "unknown"));
	}
	free(err);
	return EXIT_FATAL;
}

int
main(int argc, char **argv)
{
	static struct sagad_main sm;
	struct conf_errors errs = { NULL, 0 };
	const char *file = SYSCONFDIR "/sagad/sagad.conf";
	int check = 0, verbose = 0, c, rc;

	while ((c = getopt(argc, argv, "f:nvVh")) != -1) {
		switch (c) {
		case 'f': file = optarg; break;
		case 'n': check = 1; break;
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
