/*
 * direct: the baseline for the sagad benchmark.
 *
 *   direct URL EXCHANGE KEY N SIZE WINDOW
 *
 * Publishes N persistent messages of SIZE bytes straight to RabbitMQ on one
 * channel, with publisher confirms and at most WINDOW unconfirmed messages,
 * the mandatory flag and a message_id set (what sagad's relay puts on the
 * wire), and prints
 *
 *   direct n=N seconds=S rate=R
 *
 * where S runs from the first publish to the last confirm. Nacked or
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

int
main(int argc, char **argv)
{
	struct amqp_connection_info ci;
	amqp_connection_state_t conn;
	amqp_socket_t *sock;
	amqp_basic_properties_t props;
	amqp_table_entry_t cap_entries[2];
	amqp_table_entry_t client_entries[1];
	amqp_table_t client_props;
	struct confirms c;
	struct timeval tmo = { 30, 0 };
	char *url, *body, msgid[64];
	const char *exchange, *key;
	long long n, size, window;
	double t0 = 0, t1, last_progress;
	uint64_t last_nsettled;
	int r;

	if (argc != 7) {
		fprintf(stderr,
		    "usage: direct URL EXCHANGE KEY N SIZE WINDOW\n");
		return 2;
	}
	url = strdup(argv[1]);
	exchange = argv[2];
	key = argv[3];
	n = parse_num(argv[4], "N", 1);
	size = parse_num(argv[5], "SIZE", 0);
	window = parse_num(argv[6], "WINDOW", 1);

	amqp_default_connection_info(&ci);
	if (amqp_parse_url(url, &ci) != AMQP_STATUS_OK) {
		fprintf(stderr, "direct: bad URL\n");
		return 2;
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

	/* Same capabilities a production publisher asks for. */
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
	amqp_channel_open(conn, CHANNEL);
	die_rpc(amqp_get_rpc_reply(conn), "channel.open");
	amqp_confirm_select(conn, CHANNEL);
	die_rpc(amqp_get_rpc_reply(conn), "confirm.select");
	if (exchange[0] != '\0' && strncmp(exchange, "amq.", 4) != 0) {
		amqp_exchange_declare(conn, CHANNEL, amqp_cstring_bytes(exchange),
		    amqp_cstring_bytes("topic"), 0, 1, 0, 0, amqp_empty_table);
		die_rpc(amqp_get_rpc_reply(conn), "exchange.declare");
	}

	body = malloc((size_t)size + 1);
	if (body == NULL)
		die("out of memory");
	for (long long i = 0; i < size; i++)
		body[i] = 'a' + (char)(i % 26);

	memset(&c, 0, sizeof(c));
	c.settled = calloc((size_t)n + 2, 1);
	if (c.settled == NULL)
		die("out of memory");
	c.low = 1;

	memset(&props, 0, sizeof(props));
	props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG |
	    AMQP_BASIC_MESSAGE_ID_FLAG | AMQP_BASIC_APP_ID_FLAG |
	    AMQP_BASIC_TIMESTAMP_FLAG | AMQP_BASIC_CONTENT_TYPE_FLAG;
	props.delivery_mode = AMQP_DELIVERY_PERSISTENT;
	props.app_id = amqp_cstring_bytes("direct");
	props.content_type = amqp_cstring_bytes("application/octet-stream");

	last_nsettled = 0;
	last_progress = now();
	while (c.nsettled < (uint64_t)n) {
		while (c.published < (uint64_t)n &&
		    c.published - c.nsettled < (uint64_t)window) {
			amqp_bytes_t b = { (size_t)size, body };
			uint64_t seq = c.published + 1;

			snprintf(msgid, sizeof(msgid), "d-%ld-%" PRIu64,
			    (long)getpid(), seq);
			props.message_id = amqp_cstring_bytes(msgid);
			props.timestamp = (uint64_t)time(NULL);
			if (seq == 1)
				t0 = now();
			r = amqp_basic_publish(conn, CHANNEL,
			    amqp_cstring_bytes(exchange),
			    amqp_cstring_bytes(key), 1, 0, &props, b);
			if (r != AMQP_STATUS_OK)
				die("publish: %s", amqp_error_string2(r));
			c.published = seq;
			/* keep acks flowing while the window is open */
			if ((seq & 63) == 0)
				drain(conn, &c);
		}
		/* window full or all sent: wait for the next confirm */
		if (read_one(conn, &c, 1.0))
			drain(conn, &c);
		if (c.nsettled != last_nsettled) {
			last_nsettled = c.nsettled;
			last_progress = now();
		} else if (now() - last_progress > 60.0) {
			die("no confirm for 60 s (%" PRIu64 " of %lld settled)",
			    c.nsettled, n);
		}
	}
	t1 = now();

	printf("direct n=%lld seconds=%.3f rate=%.1f\n", n, t1 - t0,
	    (double)n / (t1 - t0));
	fflush(stdout);

	die_rpc(amqp_channel_close(conn, CHANNEL, AMQP_REPLY_SUCCESS),
	    "channel.close");
	die_rpc(amqp_connection_close(conn, AMQP_REPLY_SUCCESS),
	    "connection.close");
	amqp_destroy_connection(conn);

	if (c.nacked || c.returned) {
		fprintf(stderr, "direct: %" PRIu64 " nacked, %" PRIu64
		    " returned\n", c.nacked, c.returned);
		return 1;
	}
	free(c.settled);
	free(body);
	free(url);
	return 0;
}
