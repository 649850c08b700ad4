/*
 * pace: the paced publisher of the inbox latency benchmark.
 *
 *   pace URL EXCHANGE KEY N RATE SIZE RUNID
 *
 * Publishes N persistent messages of SIZE bytes straight to RabbitMQ at a
 * fixed RATE per second (open loop: message i is due at t0 + i/RATE,
 * whatever the broker does), with publisher confirms and the mandatory flag.
 * Each message's message_id is "RUNID-i-T" where T is the CLOCK_REALTIME
 * time in nanoseconds just before its basic.publish; bench/sink takes
 * arrival - T as the publish-to-service latency. Prints
 *
 *   pace n=N seconds=S rate=R late_max_ms=L confirm_s=C
 *
 * S from the first publish to the last, R = N / S, L the worst lag of a
 * publish behind its schedule, C the time after the last publish until
 * every confirm arrived. Nacked or returned messages make the exit status 1.
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

	fputs("pace: ", stderr);
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

static int64_t
real_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void
die_rpc(amqp_rpc_reply_t r, const char *what)
{
	if (r.reply_type == AMQP_RESPONSE_NORMAL)
		return;
	if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION)
		die("%s: %s", what, amqp_error_string2(r.library_error));
	die("%s: failed (reply type %d, method 0x%08x)", what,
	    (int)r.reply_type, r.reply.id);
}

static long long
parse_num(const char *s, const char *name, long long min)
{
	char *end;
	long long v;

	errno = 0;
	v = strtoll(s, &end, 10);
	if (errno != 0 || *s == '\0' || *end != '\0' || v < min) {
		fprintf(stderr, "pace: bad %s: %s\n", name, s);
		exit(2);
	}
	return v;
}

static uint64_t nsettled, nacked, returned, published, low = 1;
static uint8_t *settled;	/* per delivery tag (1-based): 0 open, 1 done */

static void
settle(uint64_t tag, int multiple, int nack)
{
	uint64_t t;

	if (tag == 0 && multiple)
		tag = published;
	if (tag == 0 || tag > published)
		die("broker confirmed unknown delivery tag %" PRIu64, tag);
	for (t = multiple ? low : tag; t <= tag; t++)
		if (!settled[t]) {
			settled[t] = 1;
			nsettled++;
			nacked += nack;
		}
	while (low <= published && settled[low])
		low++;
}

static void
handle_frame(amqp_frame_t *f)
{
	if (f->frame_type != AMQP_FRAME_METHOD)
		return;		/* heartbeats, content of a basic.return */
	switch (f->payload.method.id) {
	case AMQP_BASIC_ACK_METHOD: {
		amqp_basic_ack_t *m = f->payload.method.decoded;
		settle(m->delivery_tag, m->multiple, 0);
		break;
	}
	case AMQP_BASIC_NACK_METHOD: {
		amqp_basic_nack_t *m = f->payload.method.decoded;
		settle(m->delivery_tag, m->multiple, 1);
		break;
	}
	case AMQP_BASIC_RETURN_METHOD:
		if (returned++ == 0)
			fprintf(stderr, "pace: message returned (unroutable)\n");
		break;
	case AMQP_CHANNEL_CLOSE_METHOD:
	case AMQP_CONNECTION_CLOSE_METHOD:
		die("closed by the broker");
		break;
	default:
		break;
	}
}

/* Handle frames for at most `wait` seconds (0: only what is there). */
static void
pump(amqp_connection_state_t conn, double wait)
{
	amqp_frame_t f;
	struct timeval tv;
	int r;

	for (;;) {
		if (wait < 0)
			wait = 0;
		tv.tv_sec = (time_t)wait;
		tv.tv_usec = (suseconds_t)((wait - (double)tv.tv_sec) * 1e6);
		r = amqp_simple_wait_frame_noblock(conn, &f, &tv);
		if (r == AMQP_STATUS_TIMEOUT)
			break;
		if (r != AMQP_STATUS_OK)
			die("reading from the broker: %s", amqp_error_string2(r));
		handle_frame(&f);
		wait = 0;	/* after one frame, only what is buffered */
	}
	amqp_maybe_release_buffers(conn);
}

int
main(int argc, char **argv)
{
	struct amqp_connection_info ci;
	amqp_connection_state_t conn;
	amqp_socket_t *sock;
	amqp_basic_properties_t props;
	struct timeval tmo = { 30, 0 };
	char *url, *body, msgid[128];
	const char *exchange, *key, *runid;
	long long n, size, i;
	double rate, t0, t_end, t_confirmed, late_max = 0;
	int r;

	if (argc != 8) {
		fprintf(stderr, "usage: pace URL EXCHANGE KEY N RATE SIZE RUNID\n");
		return 2;
	}
	url = strdup(argv[1]);
	exchange = argv[2];
	key = argv[3];
	n = parse_num(argv[4], "N", 1);
	rate = (double)parse_num(argv[5], "RATE", 1);
	size = parse_num(argv[6], "SIZE", 0);
	runid = argv[7];

	amqp_default_connection_info(&ci);
	if (amqp_parse_url(url, &ci) != AMQP_STATUS_OK) {
		fprintf(stderr, "pace: bad URL\n");
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
	die_rpc(amqp_login(conn, ci.vhost, 0, 131072, 0,
	    AMQP_SASL_METHOD_PLAIN, ci.user, ci.password), "login");
	amqp_channel_open(conn, CHANNEL);
	die_rpc(amqp_get_rpc_reply(conn), "channel.open");
	amqp_confirm_select(conn, CHANNEL);
	die_rpc(amqp_get_rpc_reply(conn), "confirm.select");

	body = malloc((size_t)size + 1);
	settled = calloc((size_t)n + 2, 1);
	if (body == NULL || settled == NULL)
		die("out of memory");
	for (i = 0; i < size; i++)
		body[i] = 'a' + (char)(i % 26);
	memset(&props, 0, sizeof(props));
	props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG |
	    AMQP_BASIC_MESSAGE_ID_FLAG | AMQP_BASIC_APP_ID_FLAG |
	    AMQP_BASIC_TIMESTAMP_FLAG | AMQP_BASIC_CONTENT_TYPE_FLAG;
	props.delivery_mode = AMQP_DELIVERY_PERSISTENT;
	props.app_id = amqp_cstring_bytes("pace");
	props.content_type = amqp_cstring_bytes("application/octet-stream");

	t0 = now();
	for (i = 0; i < n; i++) {
		double due = t0 + (double)i / rate, t = now();
		amqp_bytes_t b = { (size_t)size, body };

		if (t < due)
			pump(conn, due - t);
		t = now();
		if (t - due > late_max)
			late_max = t - due;
		snprintf(msgid, sizeof(msgid), "%s-%lld-%" PRId64, runid, i,
		    real_ns());
		props.message_id = amqp_cstring_bytes(msgid);
		props.timestamp = (uint64_t)time(NULL);
		r = amqp_basic_publish(conn, CHANNEL, amqp_cstring_bytes(exchange),
		    amqp_cstring_bytes(key), 1, 0, &props, b);
		if (r != AMQP_STATUS_OK)
			die("publish: %s", amqp_error_string2(r));
		published = (uint64_t)i + 1;
		pump(conn, 0);
	}
	t_end = now();
	while (nsettled < (uint64_t)n) {
		if (now() - t_end > 60)
			die("no confirms for 60 s (%" PRIu64 " of %lld)",
			    nsettled, n);
		pump(conn, 1.0);
	}
	t_confirmed = now();
	printf("pace n=%lld seconds=%.3f rate=%.1f late_max_ms=%.3f "
	    "confirm_s=%.3f\n", n, t_end - t0,
	    n > 1 ? (double)(n - 1) / (t_end - t0) : (double)n,
	    late_max * 1000, t_confirmed - t_end);
	fflush(stdout);
	die_rpc(amqp_channel_close(conn, CHANNEL, AMQP_REPLY_SUCCESS),
	    "channel.close");
	die_rpc(amqp_connection_close(conn, AMQP_REPLY_SUCCESS),
	    "connection.close");
	amqp_destroy_connection(conn);
	free(body);
	free(settled);
	free(url);
	if (nacked || returned) {
		fprintf(stderr, "pace: %" PRIu64 " nacked, %" PRIu64
		    " returned\n", nacked, returned);
		return 1;
	}
	return 0;
}
