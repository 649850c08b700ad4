/*
 * consume: the baseline of the inbox benchmark.
 *
 *   consume URL QUEUE N PREFETCH
 *
 * Consumes N messages from QUEUE straight from RabbitMQ with rabbitmq-c on
 * one channel (basic.qos PREFETCH, manual acks), acking each message on its
 * own (basic.ack, multiple=0) as soon as it is received, and prints
 *
 *   consume n=N seconds=S rate=R first_s=F run_s=T close_s=C
 *
 * S runs from the program's start (before the TCP connect, as a sagad
 * started on a loaded queue has to connect too) to the N-th ack written,
 * R = N / S; F is the time from the start to the first message, T the time
 * from the first message to the N-th ack, C the time until the broker
 * confirmed the channel close (every ack processed), cpu_s the CPU time
 * (user + system) the program used. A message that is not a basic.deliver
 * of our consumer makes the exit status 1.
 *
 * When basic.consume is refused with a channel error (sagad's AMQP front
 * door before it consumes: 540 NOT_IMPLEMENTED, or 404 for a queue no
 * subscription names), it prints
 *
 *   consume unavailable code=C
 *
 * and exits 3, so that a benchmark can tell "not there" from "failed".
 *
 * When message ids end in "-<Unix time in ns>" (bench/pace), the line also
 * carries lat_n, lat_p50_ms, lat_p99_ms and lat_max_ms: publish -> receipt,
 * the broker-only baseline of the inbox latency benchmark.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <time.h>

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

	fputs("consume: ", stderr);
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

/* basic.consume's answer: a refusal by channel error is reported as
 * "unavailable" (exit 3), anything else goes to die_rpc. */
static void
check_consume_ok(amqp_rpc_reply_t r)
{
	if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION &&
	    r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
		amqp_channel_close_t *m = r.reply.decoded;

		if (m->reply_code == 540 || m->reply_code == 404) {
			printf("consume unavailable code=%u\n", m->reply_code);
			fprintf(stderr, "consume: basic.consume refused: %u %.*s\n",
			    m->reply_code, (int)m->reply_text.len,
			    (char *)m->reply_text.bytes);
			exit(3);
		}
	}
	die_rpc(r, "basic.consume");
}

static int64_t
real_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The send time at the end of a message id ("...-<ns>"), or -1. */
static int64_t
id_time(amqp_bytes_t id)
{
	char buf[256], *p, *end;
	long long v;

	if (id.len == 0 || id.len >= sizeof buf)
		return -1;
	memcpy(buf, id.bytes, id.len);
	buf[id.len] = '\0';
	if ((p = strrchr(buf, '-')) == NULL)
		return -1;
	errno = 0;
	v = strtoll(p + 1, &end, 10);
	if (errno != 0 || end == p + 1 || *end != '\0' || v < 1000000000000000000LL)
		return -1;
	return (int64_t)v;
}

static int
cmp_i64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;

	return x < y ? -1 : x > y;
}

static long long
parse_num(const char *s, const char *name, long long min)
{
	char *end;
	long long v;

	errno = 0;
	v = strtoll(s, &end, 10);
	if (errno != 0 || *s == '\0' || *end != '\0' || v < min) {
		fprintf(stderr, "consume: bad %s: %s\n", name, s);
		exit(2);
	}
	return v;
}

int
main(int argc, char **argv)
{
	struct amqp_connection_info ci;
	amqp_connection_state_t conn;
	amqp_socket_t *sock;
	struct timeval tmo = { 30, 0 };
	double t0, t_first = 0, t_last, t_closed;
	long long n, prefetch, got = 0;
	int64_t *lat;
	size_t nlat = 0;
	struct rusage ru;
	char *url;
	int r;

	t0 = now();
	if (argc != 5) {
		fprintf(stderr, "usage: consume URL QUEUE N PREFETCH\n");
		return 2;
	}
	url = strdup(argv[1]);
	n = parse_num(argv[3], "N", 1);
	prefetch = parse_num(argv[4], "PREFETCH", 0);
	if (prefetch > 65535) {
		fprintf(stderr, "consume: PREFETCH above 65535\n");
		return 2;
	}
	lat = calloc((size_t)n, sizeof *lat);
	if (lat == NULL)
		die("out of memory");
	amqp_default_connection_info(&ci);
	if (amqp_parse_url(url, &ci) != AMQP_STATUS_OK) {
		fprintf(stderr, "consume: bad URL\n");
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
	/* heartbeat 0: the run is short and we read continuously */
	die_rpc(amqp_login(conn, ci.vhost, 0, 131072, 0,
	    AMQP_SASL_METHOD_PLAIN, ci.user, ci.password), "login");
	amqp_channel_open(conn, CHANNEL);
	die_rpc(amqp_get_rpc_reply(conn), "channel.open");
	amqp_basic_qos(conn, CHANNEL, 0, (uint16_t)prefetch, 0);
	die_rpc(amqp_get_rpc_reply(conn), "basic.qos");
	amqp_basic_consume(conn, CHANNEL, amqp_cstring_bytes(argv[2]),
	    amqp_cstring_bytes("bench.consume"), 0, 0, 0, amqp_empty_table);
	check_consume_ok(amqp_get_rpc_reply(conn));

	while (got < n) {
		amqp_envelope_t env;
		amqp_rpc_reply_t rr;
		struct timeval wait = { 60, 0 };

		amqp_maybe_release_buffers(conn);
		rr = amqp_consume_message(conn, &env, &wait, 0);
		if (rr.reply_type != AMQP_RESPONSE_NORMAL) {
			if (rr.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
			    rr.library_error == AMQP_STATUS_TIMEOUT)
				die("no message for 60 s (%lld of %lld)", got, n);
			die_rpc(rr, "basic.consume");
			die("unexpected frame while consuming (%lld of %lld)",
			    got, n);
		}
		if (got == 0)
			t_first = now();
		if (env.message.properties._flags & AMQP_BASIC_MESSAGE_ID_FLAG) {
			int64_t sent = id_time(env.message.properties.message_id);
			if (sent > 0)
				lat[nlat++] = real_ns() - sent;
		}
		r = amqp_basic_ack(conn, CHANNEL, env.delivery_tag, 0);
		amqp_destroy_envelope(&env);
		if (r != AMQP_STATUS_OK)
			die("basic.ack: %s", amqp_error_string2(r));
		got++;
	}
	t_last = now();
	/* channel.close is answered after every earlier ack was processed;
	 * unacked prefetched messages (none when the queue held exactly N)
	 * go back to the queue. */
	die_rpc(amqp_channel_close(conn, CHANNEL, AMQP_REPLY_SUCCESS),
	    "channel.close");
	t_closed = now();
	die_rpc(amqp_connection_close(conn, AMQP_REPLY_SUCCESS),
	    "connection.close");
	amqp_destroy_connection(conn);

	getrusage(RUSAGE_SELF, &ru);
	printf("consume n=%lld seconds=%.3f rate=%.1f first_s=%.3f run_s=%.3f "
	    "close_s=%.3f cpu_s=%.3f", n, t_last - t0, (double)n / (t_last - t0),
	    t_first - t0, t_last - t_first, t_closed - t0,
	    ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
	    (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6);
	if (nlat > 0) {
		qsort(lat, nlat, sizeof *lat, cmp_i64);
		printf(" lat_n=%zu lat_p50_ms=%.3f lat_p99_ms=%.3f lat_max_ms=%.3f",
		    nlat, lat[(nlat + 1) / 2 - 1] / 1e6,
		    lat[(size_t)((double)nlat * 0.99 + 0.999999) - 1] / 1e6,
		    lat[nlat - 1] / 1e6);
	}
	printf("\n");
	free(lat);
	free(url);
	return 0;
}
