/*
 * Drives src/saga_pg_relay.c, the PostgreSQL saga outbox relay, for
 * t/integration/saga_pg_relay.py (a private PostgreSQL and RabbitMQ).
 *
 *   pgrelay pack [c=CONTENT_TYPE] [i=CORRELATION_ID] [t=TYPE] [e=EXPIRATION]
 *           [r=REPLY_TO] [h:NAME=VALUE ...]
 *       print props_pack() of those properties in hex: the outbox's props
 *       column exactly as the saga store writes it
 *   pgrelay run CONF CONNINFO SCHEMA SERVICE REPLICA GRACE
 *       migrate the schema, then run a relay (the broker from sagad's
 *       configuration file CONF) until "quit" or the end of stdin; other
 *       commands on stdin, one a line: "kick" (saga_pg_relay_kick), "stats"
 *       (prints one line: stats published=N ...)
 *
 * The relay's log goes to stderr.
 */
#include <event2/event.h>
#include <event2/thread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "conf.h"
#include "log.h"
#include "props.h"
#include "saga_pg_relay.h"
#include "saga_pg_schema.h"

struct run {
	struct event_base *base;
	struct saga_pg_relay *r;
	char line[4096];
	size_t len;
};

static int
pack(int argc, char **argv)
{
	struct props p;
	char **field[] = { &p.content_type, &p.correlation_id, &p.type, &p.expiration,
	    &p.reply_to };
	const char *keys = "citer";
	char *buf, *eq;
	size_t len, i;
	int a;

	memset(&p, 0, sizeof p);
	for (a = 0; a < argc; a++) {
		if (strncmp(argv[a], "h:", 2) == 0 && (eq = strchr(argv[a], '='))) {
			*eq = '\0';
			props_set_header(&p, argv[a] + 2, eq + 1);
		} else if (argv[a][0] && argv[a][1] == '=' && strchr(keys, argv[a][0])) {
			*field[strchr(keys, argv[a][0]) - keys] = strdup(argv[a] + 2);
		} else {
			fprintf(stderr, "pgrelay pack: bad argument: %s\n", argv[a]);
			return 2;
		}
	}
	props_pack(&p, &buf, &len);
	for (i = 0; i < len; i++)
		printf("%02x", (unsigned char)buf[i]);
	printf("\n");
	free(buf);
	props_free(&p);
	return 0;
}

static void
stats(struct run *rn)
{
	const struct saga_pg_relay_stats *s = saga_pg_relay_stats(rn->r);

	printf("stats published=%llu nacked=%llu unroutable=%llu taken=%llu deleted=%llu"
	    " pg_errors=%llu inflight=%u held=%zu pg=%d broker=%d\n",
	    (unsigned long long)s->published, (unsigned long long)s->nacked,
	    (unsigned long long)s->unroutable, (unsigned long long)s->claimed_from_others,
	    (unsigned long long)s->deleted, (unsigned long long)s->pg_errors,
	    saga_pg_relay_inflight(rn->r), saga_pg_relay_held(rn->r),
	    saga_pg_relay_pg_up(rn->r), saga_pg_relay_broker_up(rn->r));
	fflush(stdout);
}

static void
command(struct run *rn, const char *cmd)
{
	if (strcmp(cmd, "kick") == 0)
		saga_pg_relay_kick(rn->r);
	else if (strcmp(cmd, "stats") == 0)
		stats(rn);
	else if (strcmp(cmd, "quit") == 0)
		event_base_loopbreak(rn->base);
	else if (cmd[0])
		fprintf(stderr, "pgrelay: unknown command: %s\n", cmd);
}

static void
stdin_cb(evutil_socket_t fd, short what, void *arg)
{
	struct run *rn = arg;
	ssize_t n;
	char *nl;

	(void)what;
	n = read(fd, rn->line + rn->len, sizeof rn->line - 1 - rn->len);
	if (n <= 0) {
		event_base_loopbreak(rn->base);
		return;
	}
	rn->len += (size_t)n;
	rn->line[rn->len] = '\0';
	while ((nl = strchr(rn->line, '\n'))) {
		*nl = '\0';
		command(rn, rn->line);
		rn->len -= (size_t)(nl + 1 - rn->line);
		memmove(rn->line, nl + 1, rn->len + 1);
	}
	if (rn->len == sizeof rn->line - 1)
		rn->len = 0;	/* an over-long line: dropped */
}

static int
run(char **argv)
{
	struct conf_errors errs = { NULL, 0 };
	struct sagad_conf *conf;
	struct event *in;
	struct run rn;
	char *err = NULL;

	memset(&rn, 0, sizeof rn);
	if (!(conf = conf_load(argv[0], &errs))) {
		fprintf(stderr, "pgrelay: %s\n", errs.n ? errs.msg[0] : "bad configuration");
		return 2;
	}
	if (saga_pg_schema_migrate(argv[1], argv[2], &err) < 0) {
		fprintf(stderr, "pgrelay: %s\n", err);
		return 1;
	}
	log_set_level(1);
	signal(SIGPIPE, SIG_IGN);
	evthread_use_pthreads();
	rn.base = event_base_new();
	event_base_priority_init(rn.base, 3);
	rn.r = saga_pg_relay_new(rn.base, conf, argv[1], argv[2], argv[3], argv[4],
	    atof(argv[5]));
	if (saga_pg_relay_start(rn.r) < 0) {
		fprintf(stderr, "pgrelay: cannot start the relay\n");
		return 1;
	}
	in = event_new(rn.base, 0, EV_READ | EV_PERSIST, stdin_cb, &rn);
	event_add(in, NULL);
	printf("started\n");
	fflush(stdout);
	event_base_dispatch(rn.base);
	event_free(in);
	saga_pg_relay_free(rn.r);
	event_base_free(rn.base);
	conf_free(conf);
	return 0;
}

int
main(int argc, char **argv)
{
	if (argc >= 2 && strcmp(argv[1], "pack") == 0)
		return pack(argc - 2, argv + 2);
	if (argc == 8 && strcmp(argv[1], "run") == 0)
		return run(argv + 2);
	fprintf(stderr, "usage: pgrelay pack [c=...] [i=...] [t=...] [e=...] [r=...] [h:NAME=VALUE...]\n"
	    "       pgrelay run CONF CONNINFO SCHEMA SERVICE REPLICA GRACE\n");
	return 2;
}
