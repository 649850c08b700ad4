/* Unit tests for src/amqpd.c and src/amqpd_chan.c: the front door driven
 * over a unix socket by a client written here, on the test's own loop,
 * with a real store: the handshake, confirms in order, the refusals and
 * their reply codes, basic.qos, a topology call with the broker
 * unreachable, and consuming (amqpd_consume.c): the refusals, unknown
 * tags, a delivery from the inbox acked. (t/integration/frontdoor.py and
 * frontdoor_consume.py do the same with pika, amqp-publish and a real
 * RabbitMQ.) */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <event2/event.h>
#include <event2/thread.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <unistd.h>

#include "amqp_frame.h"
#include "amqp_headers.h"
#include "amqpd.h"
#include "conf.h"
#include "delivery.h"
#include "sagad.h"
#include "store.h"
#include "util.h"
#include "xmalloc.h"

#define CONF "service = \"orders\";\n" \
	"api = { token_file = \"%s/token\"; };\n" \
	"amqp = { listen = \"unix:%s/amqp.sock\"; };\n" \
	"broker = { url = \"amqp://guest:guest@127.0.0.1:%d/\"; connect_timeout = 1; };\n"

/* With consume: a front-door subscription on queue "fd.in", its inbox
 * holding one record (no broker link: the delivery never consumes). */
#define CONF_CONSUME \
	"exchanges = ( { name = \"events\"; type = \"topic\"; } );\n" \
	"subscriptions = ( { name = \"fd\"; queue = \"fd.in\"; bind = [ \"events:fd.#\" ];\n" \
	"                    deliver = \"amqp\"; } );\n"

struct fx {
	char dir[64], path[96];
	struct event_base *base;
	struct sagad d;
	struct amqpd *a;
	int fd;				/* the client */
	int silent;			/* a "broker" that never answers, or -1 */
	uint8_t in[1 << 18];		/* what the client has read, not taken */
	size_t nin;
	amqp_pool_t pool;
};

/* ---- the client ---- */

static void
turn(struct fx *f)
{
	int i;

	for (i = 0; i < 5; i++)
		event_base_loop(f->base, EVLOOP_NONBLOCK);
}

static void
send_raw(struct fx *f, const void *p, size_t n)
{
	assert_int_equal(write(f->fd, p, n), (ssize_t)n);
	turn(f);
}

static void
send_frame(struct fx *f, uint8_t type, uint16_t ch, const void *payload, size_t n)
{
	uint8_t buf[8192];

	amqpf_put_header(buf, type, ch, (uint32_t)n);
	memcpy(buf + 7, payload, n);
	buf[7 + n] = AMQPF_FRAME_END;
	send_raw(f, buf, n + 8);
}

/* A whole method frame into out (room for 4 KiB); its length. */
static size_t
method_frame(uint8_t *out, uint16_t ch, amqp_method_number_t id, void *m)
{
	int n;

	out[7] = (uint8_t)(id >> 24);
	out[8] = (uint8_t)(id >> 16);
	out[9] = (uint8_t)(id >> 8);
	out[10] = (uint8_t)id;
	n = amqp_encode_method(id, m, (amqp_bytes_t){ 4096 - 12, out + 11 });
	assert_true(n >= 0);
	amqpf_put_header(out, AMQPF_METHOD, ch, (uint32_t)n + 4);
	out[11 + n] = AMQPF_FRAME_END;
	return (size_t)n + 12;
}

static void
send_method(struct fx *f, uint16_t ch, amqp_method_number_t id, void *m)
{
	uint8_t buf[4096];

	send_raw(f, buf, method_frame(buf, ch, id, m));
}

/* basic.publish + header + body, with the properties given. */
static void
publish(struct fx *f, uint16_t ch, const char *key, amqp_basic_properties_t *p, const char *body)
{
	amqp_basic_publish_t m = { 0, amqp_cstring_bytes(""), amqp_cstring_bytes(key), 0, 0 };
	uint8_t buf[1024];
	uint64_t len = strlen(body);
	int n, i;

	send_method(f, ch, AMQP_BASIC_PUBLISH_METHOD, &m);
	memset(buf, 0, 12);
	buf[1] = 60;
	for (i = 0; i < 8; i++)
		buf[4 + i] = (uint8_t)(len >> (56 - 8 * i));
	n = amqp_encode_properties(AMQP_BASIC_CLASS, p, (amqp_bytes_t){ sizeof buf - 12, buf + 12 });
	assert_true(n >= 0);
	send_frame(f, AMQPF_HEADER, ch, buf, (size_t)n + 12);
	if (len)
		send_frame(f, AMQPF_BODY, ch, body, len);
}

/* The server's next method frame (heartbeats skipped), decoded; 0 when
 * none came (connection closed or nothing within the wait). */
static amqp_method_number_t
recv_method(struct fx *f, uint16_t *ch, void **m)
{
	struct amqpf_frame fr;
	struct amqpf_error err;
	const uint8_t *args;
	size_t used, alen;
	uint32_t id;
	ssize_t r;
	int tries;

	for (tries = 0; tries < 600; tries++) {
		if (amqpf_read(f->in, f->nin, 1 << 18, &fr, &used, &err) == AMQPF_OK) {
			uint8_t type = fr.type;

			*ch = fr.channel;
			if (type == AMQPF_METHOD) {
				assert_int_equal(amqpf_method(&fr, &id, &args, &alen, &err), 0);
				assert_true(amqp_decode_method(id, &f->pool,
				    (amqp_bytes_t){ alen, (void *)args }, m) >= 0);
			}
			memmove(f->in, f->in + used, f->nin - used);
			f->nin -= used;
			if (type == AMQPF_METHOD)
				return id;
			continue;
		}
		turn(f);
		r = recv(f->fd, f->in + f->nin, sizeof f->in - f->nin, MSG_DONTWAIT);
		if (r == 0)
			return 0;
		if (r > 0)
			f->nin += (size_t)r;
		else
			usleep(5000);
	}
	return 0;
}

static void
expect(struct fx *f, amqp_method_number_t want, void **m)
{
	uint16_t ch;
	amqp_method_number_t got = recv_method(f, &ch, m);

	if (got != want)
		fail_msg("expected %s, got %s", amqp_method_name(want),
		    got ? amqp_method_name(got) : "nothing");
}

static void
client_connect(struct fx *f)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };

	snprintf(sun.sun_path, sizeof sun.sun_path, "%s/amqp.sock", f->dir);
	f->fd = socket(AF_UNIX, SOCK_STREAM, 0);
	assert_int_equal(connect(f->fd, (struct sockaddr *)&sun, sizeof sun), 0);
	f->nin = 0;
	turn(f);
}

/* Up to connection.open-ok, with the password given. */
static amqp_method_number_t
login(struct fx *f, const char *password)
{
	char resp[64];
	int n = snprintf(resp, sizeof resp, "%cguest%c%s", 0, 0, password);
	amqp_connection_start_ok_t so = { amqp_empty_table, amqp_cstring_bytes("PLAIN"),
	    { (size_t)n, resp }, amqp_cstring_bytes("en_US") };
	amqp_connection_tune_ok_t to = { 0, 131072, 0 };
	amqp_connection_open_t op = { amqp_cstring_bytes("/"), amqp_empty_bytes, 0 };
	uint16_t ch;
	void *m;
	amqp_method_number_t id;

	client_connect(f);
	send_raw(f, AMQPF_PROTOCOL_HEADER, AMQPF_HEADER_LEN);
	expect(f, AMQP_CONNECTION_START_METHOD, &m);
	send_method(f, 0, AMQP_CONNECTION_START_OK_METHOD, &so);
	id = recv_method(f, &ch, &m);
	if (id != AMQP_CONNECTION_TUNE_METHOD)
		return id == AMQP_CONNECTION_CLOSE_METHOD ?
		    ((amqp_connection_close_t *)m)->reply_code : id;
	send_method(f, 0, AMQP_CONNECTION_TUNE_OK_METHOD, &to);
	send_method(f, 0, AMQP_CONNECTION_OPEN_METHOD, &op);
	expect(f, AMQP_CONNECTION_OPEN_OK_METHOD, &m);
	return AMQP_CONNECTION_OPEN_OK_METHOD;
}

static void
channel_open(struct fx *f, uint16_t ch)
{
	amqp_channel_open_t o = { amqp_empty_bytes };
	void *m;

	send_method(f, ch, AMQP_CHANNEL_OPEN_METHOD, &o);
	expect(f, AMQP_CHANNEL_OPEN_OK_METHOD, &m);
}

/* The reply code of the close that comes next (channel or connection). */
static int
close_code(struct fx *f, amqp_method_number_t want, char *text, size_t len)
{
	uint16_t ch;
	void *m;

	expect(f, want, &m);
	if (text) {
		amqp_bytes_t t = want == AMQP_CHANNEL_CLOSE_METHOD ?
		    ((amqp_channel_close_t *)m)->reply_text :
		    ((amqp_connection_close_t *)m)->reply_text;
		snprintf(text, len, "%.*s", (int)t.len, (char *)t.bytes);
	}
	(void)ch;
	return want == AMQP_CHANNEL_CLOSE_METHOD ? ((amqp_channel_close_t *)m)->reply_code :
	    ((amqp_connection_close_t *)m)->reply_code;
}

/* ---- fixture ---- */

/* A listening socket nobody accepts on: connecting works (the kernel's
 * backlog), the AMQP handshake gets no answer. */
static int
silent_broker(int *port)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	socklen_t len = sizeof sin;
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	assert_int_equal(bind(fd, (struct sockaddr *)&sin, sizeof sin), 0);
	assert_int_equal(listen(fd, 8), 0);
	assert_int_equal(getsockname(fd, (struct sockaddr *)&sin, &len), 0);
	*port = ntohs(sin.sin_port);
	return fd;
}

/* The broker is port 1 (nothing listens: refused at once) or, with
 * silent, a socket that never answers. */
/* One record in the front-door subscription's inbox, as if consumed. */
static void
inbox_record(struct store *st)
{
	struct msg m = { 0 };
	int64_t id;

	m.message_id = "m-1";
	m.exchange = "events";
	m.routing_key = "fd.x";
	m.body = "hello";
	m.body_len = 5;
	assert_int_equal(store_inbox_put(st, "fd", &m, util_now(), &id), STORE_PUT_STORED);
	store_flush(st);
}

static int
setup_with(void **state, int silent, int consume)
{
	struct fx *f = xcalloc(1, sizeof *f);
	struct conf_errors errs = { 0 };
	char conf[1024], p[128], *err = NULL;
	int port = 1;
	FILE *t;

	f->silent = silent ? silent_broker(&port) : -1;

	snprintf(f->dir, sizeof f->dir, "/tmp/sagad-test-amqpd-XXXXXX");
	assert_non_null(mkdtemp(f->dir));
	snprintf(p, sizeof p, "%s/token", f->dir);
	assert_non_null(t = fopen(p, "w"));
	fputs("sekrit\n", t);
	fclose(t);
	snprintf(f->path, sizeof f->path, "%s/store.db", f->dir);
	f->base = event_base_new();
	event_base_priority_init(f->base, 3);
	snprintf(conf, sizeof conf, CONF "%s", f->dir, f->dir, port, consume ? CONF_CONSUME : "");
	f->d.base = f->base;
	f->d.conf = conf_load_string(conf, "test.conf", ".", &errs);
	if (!f->d.conf)
		fail_msg("configuration: %s", errs.n ? errs.msg[0] : "?");
	f->d.store = store_open(f->path, f->base, INT64_C(1) << 30, &err);
	assert_non_null(f->d.store);
	f->d.state = SAGAD_RUNNING;
	if (consume) {
		inbox_record(f->d.store);
		assert_non_null(f->d.delivery = delivery_new(&f->d));
	}
	f->a = amqpd_new(&f->d, &err);
	if (!f->a)
		fail_msg("amqpd_new: %s", err);
	init_amqp_pool(&f->pool, 4096);
	f->fd = -1;
	*state = f;
	return 0;
}

static int
setup(void **state)
{
	return setup_with(state, 0, 0);
}

static int
setup_consume(void **state)
{
	return setup_with(state, 0, 1);
}

static int
setup_silent(void **state)
{
	return setup_with(state, 1, 0);
}

static int
teardown(void **state)
{
	struct fx *f = *state;
	char p[160];

	if (f->fd >= 0)
		close(f->fd);
	if (f->silent >= 0)
		close(f->silent);
	turn(f);	/* the connection goes, its deliveries settled */
	store_flush(f->d.store);
	amqpd_free(f->a);
	/* As sagad stops: the delivery after the commits it waits for. */
	f->d.state = SAGAD_STOPPED;
	delivery_free(f->d.delivery);
	store_close(f->d.store);
	conf_free(f->d.conf);
	event_base_free(f->base);
	empty_amqp_pool(&f->pool);
	snprintf(p, sizeof p, "rm -rf '%s'", f->dir);
	assert_int_equal(system(p), 0);
	free(f);
	return 0;
}

/* ---- tests ---- */

static void
test_wrong_header_gets_ours(void **state)
{
	struct fx *f = *state;
	uint8_t got[16];
	ssize_t n = 0, r;
	int i;

	client_connect(f);
	send_raw(f, "AMQP\x01\x01\x00\x0a", 8);
	for (i = 0; i < 100 && n < 9; i++) {
		turn(f);
		r = recv(f->fd, got + n, sizeof got - (size_t)n, MSG_DONTWAIT);
		if (r == 0)
			break;
		if (r > 0)
			n += r;
		else
			usleep(5000);
	}
	assert_int_equal(n, 8);
	assert_memory_equal(got, AMQPF_PROTOCOL_HEADER, 8);
}

static void
test_login_token(void **state)
{
	struct fx *f = *state;

	assert_int_equal(login(f, "wrong"), AMQPF_ACCESS_REFUSED);
	close(f->fd);
	assert_int_equal(login(f, "sekrit"), AMQP_CONNECTION_OPEN_OK_METHOD);
	assert_int_equal(amqpd_stats(f->a)->auth_failures, 1);
}

/* Five publishes in one go: settled by the same commit, confirmed in tag
 * order; a run of them by one ack with multiple. */
static void
test_confirms_in_order(void **state)
{
	struct fx *f = *state;
	amqp_confirm_select_t sel = { 0 };
	amqp_basic_properties_t p = { 0 };
	uint64_t covered = 0;
	uint16_t ch;
	void *m;
	int i, frames = 0;

	assert_int_equal(login(f, "sekrit"), AMQP_CONNECTION_OPEN_OK_METHOD);
	channel_open(f, 1);
	send_method(f, 1, AMQP_CONFIRM_SELECT_METHOD, &sel);
	expect(f, AMQP_CONFIRM_SELECT_OK_METHOD, &m);
	p._flags = AMQP_BASIC_MESSAGE_ID_FLAG;
	p.message_id = amqp_cstring_bytes("m-1");
	for (i = 0; i < 5; i++)
		publish(f, 1, "k", &p, i ? "body" : "");	/* m-1 again: duplicates acked */
	while (covered < 5) {
		amqp_basic_ack_t *a;

		assert_int_equal(recv_method(f, &ch, &m), AMQP_BASIC_ACK_METHOD);
		a = m;
		assert_true(a->delivery_tag > covered);
		assert_true(a->multiple || a->delivery_tag == covered + 1);
		covered = a->delivery_tag;
		frames++;
	}
	assert_int_equal(covered, 5);
	assert_true(frames >= 1 && frames <= 5);
	assert_int_equal(amqpd_stats(f->a)->acked, 5);
	assert_int_equal(amqpd_stats(f->a)->duplicates, 4);
}

static void
test_refusals(void **state)
{
	struct fx *f = *state;
	amqp_basic_get_t g = { 0 };
	amqp_basic_properties_t p = { 0 };
	amqp_channel_close_ok_t ok = { 0 };
	char text[256];

	assert_int_equal(login(f, "sekrit"), AMQP_CONNECTION_OPEN_OK_METHOD);
	channel_open(f, 1);
	g.queue = amqp_cstring_bytes("q");
	send_method(f, 1, AMQP_BASIC_GET_METHOD, &g);
	assert_int_equal(close_code(f, AMQP_CHANNEL_CLOSE_METHOD, text, sizeof text),
	    AMQPF_NOT_IMPLEMENTED);
	assert_non_null(strstr(text, "basic.get"));
	send_method(f, 1, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
	/* a property against the publish API's rules: 406, content dropped */
	channel_open(f, 2);
	p._flags = AMQP_BASIC_EXPIRATION_FLAG;
	p.expiration = amqp_cstring_bytes("soon");
	publish(f, 2, "k", &p, "body");
	assert_int_equal(close_code(f, AMQP_CHANNEL_CLOSE_METHOD, text, sizeof text),
	    AMQPF_PRECONDITION_FAILED);
	assert_non_null(strstr(text, "expiration"));
	send_method(f, 2, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
	/* a body frame with no publish before it: the connection goes (505) */
	channel_open(f, 3);
	send_frame(f, AMQPF_BODY, 3, "x", 1);
	assert_int_equal(close_code(f, AMQP_CONNECTION_CLOSE_METHOD, NULL, 0),
	    AMQPF_UNEXPECTED_FRAME);
	assert_int_equal(store_outbox_count(f->d.store), 0);
}

/* basic.qos is answered here; a topology call with the broker unreachable
 * (nothing listens on port 1) closes the connection with 320, naming it. */
static void
test_topology_unreachable(void **state)
{
	struct fx *f = *state;
	amqp_basic_qos_t qos = { 0, 10, 0 };
	amqp_queue_declare_t q = { 0 };
	char text[256];
	void *m;

	assert_int_equal(login(f, "sekrit"), AMQP_CONNECTION_OPEN_OK_METHOD);
	channel_open(f, 1);
	send_method(f, 1, AMQP_BASIC_QOS_METHOD, &qos);
	expect(f, AMQP_BASIC_QOS_OK_METHOD, &m);
	q.queue = amqp_cstring_bytes("q");
	send_method(f, 1, AMQP_QUEUE_DECLARE_METHOD, &q);
	assert_int_equal(close_code(f, AMQP_CONNECTION_CLOSE_METHOD, text, sizeof text), 320);
	assert_non_null(strstr(text, "CONNECTION_FORCED"));
	assert_non_null(strstr(text, "queue.declare"));
	assert_int_equal(amqpd_stats(f->a)->forwarded, 1);
}

/* While a topology call is on the broker, the frames behind it wait: the
 * basic.qos and channel.open sent after the queue.declare get no answer
 * before the broker's (here: its silence, then 320). */
static void
test_topology_frames_wait(void **state)
{
	struct fx *f = *state;
	amqp_basic_qos_t qos = { 0, 10, 0 };
	amqp_queue_declare_t q = { 0 };
	amqp_channel_open_t o = { amqp_empty_bytes };
	uint8_t b[3 * 4096];
	char text[256];
	size_t n;
	int i;

	assert_int_equal(login(f, "sekrit"), AMQP_CONNECTION_OPEN_OK_METHOD);
	channel_open(f, 1);
	q.queue = amqp_cstring_bytes("q");
	/* in one write, so that they are read together */
	n = method_frame(b, 1, AMQP_QUEUE_DECLARE_METHOD, &q);
	n += method_frame(b + n, 1, AMQP_BASIC_QOS_METHOD, &qos);
	n += method_frame(b + n, 2, AMQP_CHANNEL_OPEN_METHOD, &o);
	send_raw(f, b, n);
	send_method(f, 1, AMQP_BASIC_QOS_METHOD, &qos);	/* and one read later */
	for (i = 0; i < 30; i++) {
		turn(f);
		usleep(10000);
	}
	assert_int_equal(recv(f->fd, b, sizeof b, MSG_DONTWAIT), -1);
	assert_int_equal(close_code(f, AMQP_CONNECTION_CLOSE_METHOD, text, sizeof text), 320);
	assert_non_null(strstr(text, "queue.declare"));
}

static void
test_bad_frame_end(void **state)
{
	struct fx *f = *state;
	uint8_t buf[12] = { 1, 0, 1, 0, 0, 0, 4, 0, 20, 0, 40, 0xCD };

	assert_int_equal(login(f, "sekrit"), AMQP_CONNECTION_OPEN_OK_METHOD);
	send_raw(f, buf, sizeof buf);
	assert_int_equal(close_code(f, AMQP_CONNECTION_CLOSE_METHOD, NULL, 0), AMQPF_FRAME_ERROR);
}

/* ---- consuming (amqpd_consume.c) ---- */

static void
consume(struct fx *f, uint16_t ch, const char *queue, const char *tag)
{
	amqp_basic_consume_t c = { 0 };

	c.queue = amqp_cstring_bytes(queue);
	c.consumer_tag = amqp_cstring_bytes(tag);
	c.arguments = amqp_empty_table;
	send_method(f, ch, AMQP_BASIC_CONSUME_METHOD, &c);
}

/* Without a deliver = "amqp" subscription on the queue: 404, and a text
 * that says what is missing. */
static void
test_consume_without_subscription(void **state)
{
	struct fx *f = *state;
	char text[256];

	assert_int_equal(login(f, "sekrit"), AMQP_CONNECTION_OPEN_OK_METHOD);
	channel_open(f, 1);
	consume(f, 1, "orders.q", "");
	assert_int_equal(close_code(f, AMQP_CHANNEL_CLOSE_METHOD, text, sizeof text),
	    404);
	assert_non_null(strstr(text, "front-door subscription"));
	assert_non_null(strstr(text, "orders.q"));
	assert_int_equal(amqpd_stats(f->a)->consumers, 0);
}

/* basic.get: 540, the text pointing to basic.consume. */
static void
test_get_hints_consume(void **state)
{
	struct fx *f = *state;
	amqp_basic_get_t g = { 0 };
	char text[256];

	assert_int_equal(login(f, "sekrit"), AMQP_CONNECTION_OPEN_OK_METHOD);
	channel_open(f, 1);
	g.queue = amqp_cstring_bytes("fd.in");
	send_method(f, 1, AMQP_BASIC_GET_METHOD, &g);
	assert_int_equal(close_code(f, AMQP_CHANNEL_CLOSE_METHOD, text, sizeof text),
	    AMQPF_NOT_IMPLEMENTED);
	assert_non_null(strstr(text, "basic.consume"));
}

/* A delivery tag never given: 406 on the channel. A consumer tag unknown
 * to basic.cancel: answered cancel-ok all the same, as RabbitMQ does. */
static void
test_unknown_tags(void **state)
{
	struct fx *f = *state;
	amqp_basic_cancel_t c = { amqp_cstring_bytes("nobody"), 0 };
	amqp_basic_ack_t a = { 7, 0 };
	amqp_basic_cancel_ok_t *ok;
	char text[256];
	void *m;

	assert_int_equal(login(f, "sekrit"), AMQP_CONNECTION_OPEN_OK_METHOD);
	channel_open(f, 1);
	send_method(f, 1, AMQP_BASIC_CANCEL_METHOD, &c);
	expect(f, AMQP_BASIC_CANCEL_OK_METHOD, &m);
	ok = m;
	assert_int_equal(ok->consumer_tag.len, 6);
	assert_memory_equal(ok->consumer_tag.bytes, "nobody", 6);
	send_method(f, 1, AMQP_BASIC_ACK_METHOD, &a);
	assert_int_equal(close_code(f, AMQP_CHANNEL_CLOSE_METHOD, text, sizeof text),
	    AMQPF_PRECONDITION_FAILED);
	assert_non_null(strstr(text, "unknown delivery tag 7"));
}

/* The inbox's record comes as basic.deliver with its body; the client's
 * ack records it delivered. */
static void
test_consume_deliver_ack(void **state)
{
	struct fx *f = *state;
	amqp_basic_deliver_t *d;
	amqp_basic_ack_t a = { 0, 0 };
	uint64_t tag;
	void *m;
	int i;

	assert_int_equal(login(f, "sekrit"), AMQP_CONNECTION_OPEN_OK_METHOD);
	channel_open(f, 1);
	consume(f, 1, "fd.in", "c1");
	expect(f, AMQP_BASIC_CONSUME_OK_METHOD, &m);
	expect(f, AMQP_BASIC_DELIVER_METHOD, &m);
	d = m;		/* its strings point into bytes recv_method has moved since */
	assert_int_equal(d->consumer_tag.len, 2);
	assert_false(d->redelivered);
	tag = d->delivery_tag;
	assert_int_equal(amqpd_stats(f->a)->delivered, 1);
	a.delivery_tag = tag;
	send_method(f, 1, AMQP_BASIC_ACK_METHOD, &a);
	for (i = 0; i < 100 && store_inbox_count(f->d.store, "fd", INBOX_DONE) < 1; i++)
		turn(f);
	assert_int_equal(store_inbox_count(f->d.store, "fd", INBOX_DONE), 1);
	assert_int_equal(amqpd_stats(f->a)->client_acks, 1);
}

/* A consumer tag in use on the channel: the connection goes, 530. */
static void
test_consumer_tag_reused(void **state)
{
	struct fx *f = *state;
	char text[256];
	void *m;

	assert_int_equal(login(f, "sekrit"), AMQP_CONNECTION_OPEN_OK_METHOD);
	channel_open(f, 1);
	consume(f, 1, "fd.in", "c1");
	expect(f, AMQP_BASIC_CONSUME_OK_METHOD, &m);
	expect(f, AMQP_BASIC_DELIVER_METHOD, &m);	/* the inbox's one record */
	consume(f, 1, "fd.in", "c1");
	assert_int_equal(close_code(f, AMQP_CONNECTION_CLOSE_METHOD, text, sizeof text),
	    AMQPF_NOT_ALLOWED);
	assert_non_null(strstr(text, "reuse consumer tag 'c1'"));
}

/* A tag the client chose that looks like one sagad names: the consumer
 * sagad names next on the channel gets another, not a 530 for a reuse the
 * client never made. */
static void
test_server_named_tag_unique(void **state)
{
	struct fx *f = *state;
	amqp_basic_consume_ok_t *ok;
	void *m;

	assert_int_equal(login(f, "sekrit"), AMQP_CONNECTION_OPEN_OK_METHOD);
	channel_open(f, 1);
	consume(f, 1, "fd.in", "amq.ctag-sagad-1");
	expect(f, AMQP_BASIC_CONSUME_OK_METHOD, &m);
	expect(f, AMQP_BASIC_DELIVER_METHOD, &m);
	consume(f, 1, "fd.in", "");
	expect(f, AMQP_BASIC_CONSUME_OK_METHOD, &m);
	ok = m;
	assert_true(ok->consumer_tag.len > 0);
	assert_int_equal(amqpd_stats(f->a)->consumers, 2);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_wrong_header_gets_ours, setup, teardown),
		cmocka_unit_test_setup_teardown(test_login_token, setup, teardown),
		cmocka_unit_test_setup_teardown(test_confirms_in_order, setup, teardown),
		cmocka_unit_test_setup_teardown(test_refusals, setup, teardown),
		cmocka_unit_test_setup_teardown(test_topology_unreachable, setup, teardown),
		cmocka_unit_test_setup_teardown(test_topology_frames_wait, setup_silent, teardown),
		cmocka_unit_test_setup_teardown(test_bad_frame_end, setup, teardown),
		cmocka_unit_test_setup_teardown(test_consume_without_subscription, setup, teardown),
		cmocka_unit_test_setup_teardown(test_get_hints_consume, setup, teardown),
		cmocka_unit_test_setup_teardown(test_unknown_tags, setup, teardown),
		cmocka_unit_test_setup_teardown(test_consume_deliver_ack, setup_consume, teardown),
		cmocka_unit_test_setup_teardown(test_consumer_tag_reused, setup_consume, teardown),
		cmocka_unit_test_setup_teardown(test_server_named_tag_unique, setup_consume,
		    teardown),
	};

	/* the topology thread wakes the test's loop (event_active) */
	evthread_use_pthreads();

	return cmocka_run_group_tests(tests, NULL, NULL);
}
