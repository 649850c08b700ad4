/*
 * direct: the baseline for the sagad benchmark.
 *
 *   direct [-r RATE] URL EXCHANGE KEY N SIZE WINDOW
 *
 * Publishes N persistent messages of SIZE bytes straight to RabbitMQ on one
 * channel, with publisher confirms and at most WINDOW unconfirmed messages,
 * the mandatory flag and a message_id set (what sagad's relay puts on the
 * wire), and prints
 *
 *   direct n=N seconds=S rate=R
 *
 * where S runs from the first publish to the last confirm. The peer is
 * whatever URL names (amqp://USER:PASSWORD@HOST:PORT/VHOST): the broker, or
 * sagad's AMQP front door with its API token as the password, so that both
 * are measured by the same client.
 *
 * -r RATE paces the publishes (open loop: message i is due at
 * t0 + i/RATE, whatever the confirms do, as long as the window has room)
 * and adds publish -> confirm latencies (CLOCK_MONOTONIC, each message from
 * just before its basic.publish to the basic.ack that covers it) to the
 * line: lat_n, lat_p50_ms, lat_p99_ms, lat_max_ms, late_max_ms (the worst
 * lag of a publish behind its schedule). Nacked or
 * returned (unroutable) messages are reported on stderr and make the exit
 * status 1: a baseline that silently drops messages would flatter nobody.
 *
 * EXCHANGE is declared as a durable topic exchange (as sagad declares its
 * exchanges) unless it is empty (the default exchange) or starts with "amq.".
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#if defined(HAVE_CONFIG_H)
#include "config.h"
#endif
#if defined(HAVE_RABBITMQ_C_AMQP_H)
#include <rabbitmq-c/amqp.h>
#include <rabbitmq-c/tcp_socket.h>
#else
#include "amqp_headers.h"
#endif

#define CHANNEL 1

static void
die(const char *fmt, ...)
{
	va_list ap;

	fputs("direct: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static double
now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void
die_rpc(amqp_rpc_reply_t r, const char *what)
{
	switch (r.reply_type) {
	case AMQP_RESPONSE_NORMAL:
		return;
	case AMQP_RESPONSE_NONE:
		die("%s: missing RPC reply", what);
		break;
	case AMQP_RESPONSE_LIBRARY_EXCEPTION:
		die("%s: %s", what, amqp_error_string2(r.library_error));
		break;
	case AMQP_RESPONSE_SERVER_EXCEPTION:
		if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
			amqp_connection_close_t *m = r.reply.decoded;
			die("%s: connection closed by server: %u %.*s", what,
			    m->reply_code, (int)m->reply_text.len,
			    (char *)m->reply_text.bytes);
		} else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
			amqp_channel_close_t *m = r.reply.decoded;
			die("%s: channel closed by server: %u %.*s", what,
			    m->reply_code, (int)m->reply_text.len,
			    (char *)m->reply_text.bytes);
		}
		die("%s: server exception, method 0x%08x", what, r.reply.id);
		break;
	}
}

static long long
parse_num(const char *s, const char *name, long long min)
{
	char *end;
	long long v;

	errno = 0;
	v = strtoll(s, &end, 10);
	if (errno != 0 || *s == '\0' || *end != '\0' || v < min) {
		fprintf(stderr, "direct: bad %s: %s\n", name, s);
		exit(2);
	}
	return v;
}

/* Confirm bookkeeping: one flag per publish sequence number (1-based). */
struct confirms {
	uint8_t *settled;	/* 0 open, 1 acked, 2 nacked */
	uint64_t published;	/* highest sequence number sent */
	uint64_t low;		/* every tag below low is settled */
	uint64_t nsettled;
	uint64_t nacked;
	uint64_t returned;
	uint64_t in_return;	/* content frames of a basic.return to skip */
	double *sent;		/* -r: send time per tag, NULL otherwise */
	double *lat;		/* -r: publish -> ack, seconds, in ack order */
	size_t nlat;
};

static void
settle(struct confirms *c, uint64_t tag, int multiple, uint8_t how)
{
	uint64_t t, from;

	if (tag == 0 || tag > c->published) {
		/* multiple with tag 0 means "everything so far" (AMQP 0-9-1). */
		if (tag == 0 && multiple)
			tag = c->published;
		else
			die("broker confirmed unknown delivery tag %" PRIu64, tag);
	}
	from = multiple ? c->low : tag;
	for (t = from; t <= tag; t++) {
		if (c->settled[t] == 0) {
			c->settled[t] = how;
			c->nsettled++;
			if (c->sent != NULL && how == 1)
				c->lat[c->nlat++] = now() - c->sent[t];
			if (how == 2)
				c->nacked++;
		}
	}
	while (c->low <= c->published && c->settled[c->low] != 0)
		c->low++;
}

static void
handle_frame(struct confirms *c, amqp_frame_t *f)
{
	if (f->frame_type == AMQP_FRAME_HEARTBEAT)
		return;
	if (f->frame_type == AMQP_FRAME_HEADER) {
		/* content of a basic.return: header, then body frames */
		if (c->in_return) {
			uint64_t size = f->payload.properties.body_size;
			c->in_return = size == 0 ? 0 : size;
		}
		return;
	}
	if (f->frame_type == AMQP_FRAME_BODY) {
		size_t len = f->payload.body_fragment.len;
		if (c->in_return)
			c->in_return = len >= c->in_return ? 0 : c->in_return - len;
		return;
	}
	if (f->frame_type != AMQP_FRAME_METHOD)
		return;
	switch (f->payload.method.id) {
	case AMQP_BASIC_ACK_METHOD: {
		amqp_basic_ack_t *m = f->payload.method.decoded;
		settle(c, m->delivery_tag, m->multiple, 1);
		break;
	}
	case AMQP_BASIC_NACK_METHOD: {
		amqp_basic_nack_t *m = f->payload.method.decoded;
		settle(c, m->delivery_tag, m->multiple, 2);
		break;
	}
	case AMQP_BASIC_RETURN_METHOD: {
		amqp_basic_return_t *m = f->payload.method.decoded;
		if (c->returned++ == 0)
			fprintf(stderr, "direct: message returned: %u %.*s "
			    "(is a queue bound to the exchange?)\n",
			    m->reply_code, (int)m->reply_text.len,
			    (char *)m->reply_text.bytes);
		c->in_return = 1;	/* until the header frame says more */
		break;
	}
	case AMQP_CHANNEL_CLOSE_METHOD: {
		amqp_channel_close_t *m = f->payload.method.decoded;
		die("channel closed by server: %u %.*s", m->reply_code,
		    (int)m->reply_text.len, (char *)m->reply_text.bytes);
		break;
	}
	case AMQP_CONNECTION_CLOSE_METHOD: {
		amqp_connection_close_t *m = f->payload.method.decoded;
		die("connection closed by server: %u %.*s", m->reply_code,
		    (int)m->reply_text.len, (char *)m->reply_text.bytes);
		break;
	}
	case AMQP_CONNECTION_BLOCKED_METHOD:
		fprintf(stderr, "direct: connection blocked by the broker\n");
		break;
	case AMQP_CONNECTION_UNBLOCKED_METHOD:
		fprintf(stderr, "direct: connection unblocked\n");
		break;
	default:
		break;
	}
}

/*
 * Read one frame, waiting at most `wait` (NULL: zero wait). Returns 1 when a
 * frame was handled, 0 on timeout. Frames already decoded or buffered inside
 * the library are returned first, whatever the socket says.
 */
static int
read_one(amqp_connection_state_t conn, struct confirms *c, double wait)
{
	amqp_frame_t f;
	struct timeval tv;
	int r;

	tv.tv_sec = (time_t)wait;
	tv.tv_usec = (suseconds_t)((wait - (double)tv.tv_sec) * 1e6);
	r = amqp_simple_wait_frame_noblock(conn, &f, &tv);
	if (r == AMQP_STATUS_TIMEOUT)
		return 0;
	if (r != AMQP_STATUS_OK)
		die("reading from the broker: %s", amqp_error_string2(r));
	handle_frame(c, &f);
	return 1;
}

/* Handle everything that is available now, without waiting. */
static void
drain(amqp_connection_state_t conn, struct confirms *c)
{
	while (read_one(conn, c, 0.0) ||
	    amqp_frames_enqueued(conn) || amqp_data_in_buffer(conn))
		;
	amqp_maybe_release_buffers(conn);
}

/* Connect and log in with the capabilities a production publisher asks
 * for; channel CHANNEL in confirm mode. */
static amqp_connection_state_t
open_conn(const char *url_arg)
{
	struct amqp_connection_info ci;
	amqp_connection_state_t conn;
	amqp_socket_t *sock;
	amqp_table_entry_t cap_entries[2];
	amqp_table_entry_t client_entries[1];
	amqp_table_t client_props;
	struct timeval tmo = { 30, 0 };
	char *url = strdup(url_arg);
	int r;

	amqp_default_connection_info(&ci);
	if (url == NULL || amqp_parse_url(url, &ci) != AMQP_STATUS_OK) {
		fprintf(stderr, "direct: bad URL\n");
		exit(2);
	}
	conn = amqp_new_connection();
	sock = amqp_tcp_socket_new(conn);
	if (sock == NULL)
		die("cannot create socket");
	if ((r = amqp_socket_open_noblock(sock, ci.host, ci.port, &tmo)) !=
	    AMQP_STATUS_OK)
		die("connect %s:%d: %s", ci.host, ci.port,
		    amqp_error_string2(r));
	amqp_set_rpc_timeout(conn, &tmo);

	cap_entries[0].key = amqp_cstring_bytes("publisher_confirms");
	cap_entries[0].value.kind = AMQP_FIELD_KIND_BOOLEAN;
	cap_entries[0].value.value.boolean = 1;
	cap_entries[1].key = amqp_cstring_bytes("connection.blocked");
	cap_entries[1].value.kind = AMQP_FIELD_KIND_BOOLEAN;
	cap_entries[1].value.value.boolean = 1;
	client_entries[0].key = amqp_cstring_bytes("capabilities");
	client_entries[0].value.kind = AMQP_FIELD_KIND_TABLE;
	client_entries[0].value.value.table.num_entries = 2;
	client_entries[0].value.value.table.entries = cap_entries;
	client_props.num_entries = 1;
	client_props.entries = client_entries;

	/* heartbeat 0: the run is short and we read continuously */
	die_rpc(amqp_login_with_properties(conn, ci.vhost, 0, 131072, 0,
	    &client_props, AMQP_SASL_METHOD_PLAIN, ci.user, ci.password),
	    "login");
	free(url);		/* ci points into it until the login is done */
	amqp_channel_open(conn, CHANNEL);
	die_rpc(amqp_get_rpc_reply(conn), "channel.open");
	amqp_confirm_select(conn, CHANNEL);
	die_rpc(amqp_get_rpc_reply(conn), "confirm.select");
	return conn;
}

struct run {
	amqp_connection_state_t conn;
	struct confirms c;
	amqp_basic_properties_t props;
	amqp_bytes_t exchange, key, body;
	long long n, window;
	double rate;		/* 0: as fast as the window allows */
	double t0;		/* first publish */
	double late_max;	/* -r: worst lag behind the schedule */
	char msgid[64];
};

static void
publish_next(struct run *run)
{
	uint64_t seq = run->c.published + 1;
	double t = now();
	int r;

	snprintf(run->msgid, sizeof(run->msgid), "d-%ld-%" PRIu64,
	    (long)getpid(), seq);
	run->props.message_id = amqp_cstring_bytes(run->msgid);
	run->props.timestamp = (uint64_t)time(NULL);
	if (seq == 1)
		run->t0 = t;
	if (run->c.sent != NULL)
		run->c.sent[seq] = t;
	r = amqp_basic_publish(run->conn, CHANNEL, run->exchange, run->key, 1, 0,
	    &run->props, run->body);
	if (r != AMQP_STATUS_OK)
		die("publish: %s", amqp_error_string2(r));
	run->c.published = seq;
}

static int
window_open(const struct run *run)
{
	return run->c.published < (uint64_t)run->n &&
	    run->c.published - run->c.nsettled < (uint64_t)run->window;
}

/* Seconds until the next message is due (paced), 0 when it is due now. */
static double
until_due(struct run *run)
{
	double due, t;

	if (run->rate <= 0 || run->c.published == 0)
		return 0;
	due = run->t0 + (double)run->c.published / run->rate;
	t = now();
	if (t >= due) {
		if (t - due > run->late_max)
			run->late_max = t - due;
		return 0;
	}
	return due - t;
}

/* Publish while the window has room (and, paced, while messages are due);
 * otherwise wait for a confirm or the next due time. Dies after 60 s
 * without a confirm while some are outstanding. */
static void
run_loop(struct run *run)
{
	struct confirms *c = &run->c;
	uint64_t last_nsettled = 0;
	double last_progress = now(), wait;

	while (c->nsettled < (uint64_t)run->n) {
		while (window_open(run) && until_due(run) == 0) {
			publish_next(run);
			/* keep acks flowing while the window is open */
			if ((c->published & 63) == 0 || run->rate > 0)
				drain(run->conn, c);
		}
		wait = window_open(run) ? until_due(run) : 1.0;
		if (wait > 1.0)
			wait = 1.0;
		if (read_one(run->conn, c, wait))
			drain(run->conn, c);
		if (c->nsettled != last_nsettled || c->published == c->nsettled) {
			last_nsettled = c->nsettled;
			last_progress = now();
		} else if (now() - last_progress > 60.0) {
			die("no confirm for 60 s (%" PRIu64 " of %lld settled)",
			    c->nsettled, run->n);
		}
	}
}

static int
cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of a sorted array, as bench/consume takes it. */
static double
rank(const double *v, size_t n, double q)
{
	size_t i = (size_t)((double)n * q + 0.999999);

	return v[(i == 0 ? 1 : i) - 1];
}

static void
report(struct run *run, double t1)
{
	struct confirms *c = &run->c;

	printf("direct n=%lld seconds=%.3f rate=%.1f", run->n, t1 - run->t0,
	    (double)run->n / (t1 - run->t0));
	if (c->lat != NULL && c->nlat > 0) {
		qsort(c->lat, c->nlat, sizeof *c->lat, cmp_double);
		printf(" lat_n=%zu lat_p50_ms=%.3f lat_p99_ms=%.3f "
		    "lat_max_ms=%.3f late_max_ms=%.3f", c->nlat,
		    rank(c->lat, c->nlat, 0.5) * 1e3,
		    rank(c->lat, c->nlat, 0.99) * 1e3,
		    c->lat[c->nlat - 1] * 1e3, run->late_max * 1e3);
	}
	printf("\n");
	fflush(stdout);
}

static void
usage(void)
{
	fprintf(stderr,
	    "usage: direct [-r RATE] URL EXCHANGE KEY N SIZE WINDOW\n");
	exit(2);
}

static void *
xcalloc(size_t n, size_t size)
{
	void *p = calloc(n, size);

	if (p == NULL)
		die("out of memory");
	return p;
}

int
main(int argc, char **argv)
{
	struct run run;
	const char *exchange;
	char *body;
	long long size;
	int opt;

	memset(&run, 0, sizeof(run));
	while ((opt = getopt(argc, argv, "r:")) != -1) {
		if (opt == 'r')
			run.rate = (double)parse_num(optarg, "RATE", 1);
		else
			usage();
	}
	if (argc - optind != 6)
		usage();
	argv += optind;
	exchange = argv[1];
	run.n = parse_num(argv[3], "N", 1);
	size = parse_num(argv[4], "SIZE", 0);
	run.window = parse_num(argv[5], "WINDOW", 1);

	run.conn = open_conn(argv[0]);
	if (exchange[0] != '\0' && strncmp(exchange, "amq.", 4) != 0) {
		amqp_exchange_declare(run.conn, CHANNEL,
		    amqp_cstring_bytes(exchange), amqp_cstring_bytes("topic"),
		    0, 1, 0, 0, amqp_empty_table);
		die_rpc(amqp_get_rpc_reply(run.conn), "exchange.declare");
	}

	body = xcalloc((size_t)size + 1, 1);
	for (long long i = 0; i < size; i++)
		body[i] = 'a' + (char)(i % 26);
	run.body.len = (size_t)size;
	run.body.bytes = body;
	run.exchange = amqp_cstring_bytes(exchange);
	run.key = amqp_cstring_bytes(argv[2]);

	run.c.settled = xcalloc((size_t)run.n + 2, 1);
	run.c.low = 1;
	if (run.rate > 0) {
		run.c.sent = xcalloc((size_t)run.n + 2, sizeof(double));
		run.c.lat = xcalloc((size_t)run.n + 2, sizeof(double));
	}

	run.props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG |
	    AMQP_BASIC_MESSAGE_ID_FLAG | AMQP_BASIC_APP_ID_FLAG |
	    AMQP_BASIC_TIMESTAMP_FLAG | AMQP_BASIC_CONTENT_TYPE_FLAG;
	run.props.delivery_mode = AMQP_DELIVERY_PERSISTENT;
	run.props.app_id = amqp_cstring_bytes("direct");
	run.props.content_type = amqp_cstring_bytes("application/octet-stream");

	run_loop(&run);
	report(&run, now());

	die_rpc(amqp_channel_close(run.conn, CHANNEL, AMQP_REPLY_SUCCESS),
	    "channel.close");
	die_rpc(amqp_connection_close(run.conn, AMQP_REPLY_SUCCESS),
	    "connection.close");
	amqp_destroy_connection(run.conn);

	if (run.c.nacked || run.c.returned) {
		fprintf(stderr, "direct: %" PRIu64 " nacked, %" PRIu64
		    " returned\n", run.c.nacked, run.c.returned);
		return 1;
	}
	free(run.c.settled);
	free(run.c.sent);
	free(run.c.lat);
	free(body);
	return 0;
}
