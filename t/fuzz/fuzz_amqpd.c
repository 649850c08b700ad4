/*
 * Fuzz target: the AMQP front door's method dispatch, consuming included.
 * A real connection (amqpd_accept_cb, static in amqpd.c, which this file
 * includes) on one end of a socketpair, the real channels (amqpd_chan.c),
 * consumers (amqpd_consume.c) and the dispatch to them (dispatch_sink.c),
 * over a fresh SQLite store per input holding three inbox records of a
 * deliver = "amqp" subscription on queue "fd.in". No broker: dsub_flow
 * returns early without one. Topology methods (exchange.*, queue.*) are
 * left out of the table: they go to the broker on a thread of their own.
 *
 * Input: chunks, each [op][arg][len][len bytes], one frame each, sent one
 * at a time with the loop run until quiet in between. op's low 2 bits are
 * the channel (0-3), bits 2-3 the kind: a method of fuzz_methods (arg
 * picks it) with its fields built from the bytes, the same method id with
 * the bytes as raw arguments, a content header (arg: body size; bytes:
 * properties, built or raw) or a body frame. Before them the client's
 * handshake: protocol header, start-ok PLAIN, tune-ok (frame_max 4096 for
 * an input of odd length, else 131072), connection.open, channel.open 1.
 *
 * amqpd_consume.c is included too, for its consumer and unacked structs.
 *
 * Checks: no crash, leak or undefined behaviour; between chunks, each
 * channel's unacked deliveries are in tag order, of its own consumers,
 * within what they hold and what the subscription has in flight; once
 * the client has closed its end and the loop is quiet the connection is
 * gone, every delivery handed out is settled (the subscription's
 * in-flight count 0, no consumer left attached), and the store still
 * holds the three records, each pending, delivered or dead-lettered, as
 * many pending as the dispatch holds.
 */
#include "amqpd.c"
#include "amqpd_consume.c"

#include <event2/event.h>
#include <inttypes.h>
#include <sys/un.h>

#include "delivery.h"
#include "dispatch.h"
#include "store.h"

#include "fuzz_common.h"

#define FUZZ_RECORDS 3

static const char fuzz_amqpd_conf[] =
    "service = \"orders\";\n"
    "amqp = { listen = \"unix:/nonexistent/amqp.sock\"; };\n"
    "exchanges = ( { name = \"events\"; type = \"topic\"; } );\n"
    "subscriptions = ( { name = \"fd\"; queue = \"fd.in\"; bind = [ \"events:fd.#\" ];\n"
    "                    deliver = \"amqp\"; max_attempts = 2; } );\n";

/* The methods that reach the channel and consumer code; the rest are
 * refused the same way (amqpd_chan_refuse) or go to the broker. */
static const amqp_method_number_t fuzz_methods[] = {
	AMQP_BASIC_CONSUME_METHOD, AMQP_BASIC_CANCEL_METHOD, AMQP_BASIC_ACK_METHOD,
	AMQP_BASIC_NACK_METHOD, AMQP_BASIC_REJECT_METHOD, AMQP_BASIC_RECOVER_METHOD,
	AMQP_BASIC_RECOVER_ASYNC_METHOD, AMQP_BASIC_QOS_METHOD, AMQP_BASIC_GET_METHOD,
	AMQP_BASIC_PUBLISH_METHOD, AMQP_CHANNEL_OPEN_METHOD, AMQP_CHANNEL_CLOSE_METHOD,
	AMQP_CHANNEL_CLOSE_OK_METHOD, AMQP_CHANNEL_FLOW_METHOD, AMQP_CONFIRM_SELECT_METHOD,
	AMQP_TX_SELECT_METHOD, AMQP_CONNECTION_CLOSE_METHOD, AMQP_CONNECTION_CLOSE_OK_METHOD,
};
#define FUZZ_NMETHODS (sizeof fuzz_methods / sizeof fuzz_methods[0])

/* Queue and tag names: the front-door queue, tags a client picks, and
 * one of the form sagad gives a consumer that names none. */
static const char *const fuzz_names[] = { "fd.in", "t1", "amq.ctag-sagad-1", "", "other" };

struct fuzz_env {
	struct sagad d;
	struct amqpd *a;
	char dir[64], path[96];
};

/* ---- the bytes the client sends ---- */

struct fuzz_out {
	uint8_t *p;
	size_t n, cap;
};

static void
fuzz_put(struct fuzz_out *o, const void *p, size_t n)
{
	if (o->n + n > o->cap) {
		o->cap = (o->n + n) * 2;
		o->p = realloc(o->p, o->cap);
		if (!o->p)
			abort();
	}
	memcpy(o->p + o->n, p, n);
	o->n += n;
}

static void
fuzz_frame(struct fuzz_out *o, uint8_t type, uint16_t ch, const void *payload, size_t n)
{
	uint8_t h[7], end = AMQPF_FRAME_END;

	amqpf_put_header(h, type, ch, (uint32_t)n);
	fuzz_put(o, h, sizeof h);
	fuzz_put(o, payload, n);
	fuzz_put(o, &end, 1);
}

/* A method frame with raw argument bytes (what the decoder makes of them
 * is the point). */
static void
fuzz_raw_method(struct fuzz_out *o, uint16_t ch, amqp_method_number_t id,
    const uint8_t *args, size_t n)
{
	uint8_t buf[4 + 256];

	buf[0] = (uint8_t)(id >> 24);
	buf[1] = (uint8_t)(id >> 16);
	buf[2] = (uint8_t)(id >> 8);
	buf[3] = (uint8_t)id;
	memcpy(buf + 4, args, n);
	fuzz_frame(o, AMQPF_METHOD, ch, buf, n + 4);
}

static void
fuzz_method(struct fuzz_out *o, uint16_t ch, amqp_method_number_t id, void *m)
{
	uint8_t buf[4096];
	int n = amqp_encode_method(id, m, (amqp_bytes_t){ sizeof buf - 4, buf + 4 });

	FUZZ_CHECK(n >= 0, "cannot encode %s", amqp_method_name(id));
	buf[0] = (uint8_t)(id >> 24);
	buf[1] = (uint8_t)(id >> 16);
	buf[2] = (uint8_t)(id >> 8);
	buf[3] = (uint8_t)id;
	fuzz_frame(o, AMQPF_METHOD, ch, buf, (size_t)n + 4);
}

static uint8_t
fuzz_byte(const uint8_t *b, size_t n, size_t i)
{
	return i < n ? b[i] : 0;
}

/* The method's fields from the bytes: names from a short list (so that
 * the queue and the tags match), tags small (so that they are given). */
static void
fuzz_built_method(struct fuzz_out *o, uint16_t ch, amqp_method_number_t id,
    const uint8_t *b, size_t n)
{
	uint8_t f0 = fuzz_byte(b, n, 0), f1 = fuzz_byte(b, n, 1), f2 = fuzz_byte(b, n, 2);
	amqp_bytes_t name0 = amqp_cstring_bytes(fuzz_names[f1 % 5]);
	amqp_bytes_t name1 = amqp_cstring_bytes(fuzz_names[f2 % 5]);
	union {
		amqp_basic_consume_t consume;
		amqp_basic_cancel_t cancel;
		amqp_basic_ack_t ack;
		amqp_basic_nack_t nack;
		amqp_basic_reject_t reject;
		amqp_basic_recover_t recover;
		amqp_basic_qos_t qos;
		amqp_basic_get_t get;
		amqp_basic_publish_t publish;
		amqp_channel_open_t open;
		amqp_channel_close_t close;
		amqp_channel_flow_t flow;
		amqp_confirm_select_t select;
		amqp_connection_close_t cclose;
		uint8_t any[256];
	} m;

	memset(&m, 0, sizeof m);
	switch (id) {
	case AMQP_BASIC_CONSUME_METHOD:
		m.consume.queue = name0;
		m.consume.consumer_tag = name1;
		m.consume.no_ack = f0 & 1;
		m.consume.exclusive = (f0 >> 1) & 1;
		m.consume.nowait = (f0 >> 2) & 1;
		m.consume.arguments = amqp_empty_table;
		break;
	case AMQP_BASIC_CANCEL_METHOD:
		m.cancel.consumer_tag = name1;
		m.cancel.nowait = f0 & 1;
		break;
	case AMQP_BASIC_ACK_METHOD:
		m.ack.delivery_tag = f1 % 8;
		m.ack.multiple = f0 & 1;
		break;
	case AMQP_BASIC_NACK_METHOD:
		m.nack.delivery_tag = f1 % 8;
		m.nack.multiple = f0 & 1;
		m.nack.requeue = (f0 >> 1) & 1;
		break;
	case AMQP_BASIC_REJECT_METHOD:
		m.reject.delivery_tag = f1 % 8;
		m.reject.requeue = f0 & 1;
		break;
	case AMQP_BASIC_RECOVER_METHOD:
	case AMQP_BASIC_RECOVER_ASYNC_METHOD:
		m.recover.requeue = f0 & 1;
		break;
	case AMQP_BASIC_QOS_METHOD:
		m.qos.prefetch_count = f1 % 4;
		m.qos.global = f0 & 1;
		break;
	case AMQP_BASIC_GET_METHOD:
		m.get.queue = name0;
		break;
	case AMQP_BASIC_PUBLISH_METHOD:
		m.publish.exchange = amqp_cstring_bytes("");
		m.publish.routing_key = name0;
		break;
	case AMQP_CHANNEL_CLOSE_METHOD:
	case AMQP_CONNECTION_CLOSE_METHOD:
		m.close.reply_code = 200;
		m.close.reply_text = amqp_cstring_bytes("bye");
		break;
	case AMQP_CHANNEL_FLOW_METHOD:
		m.flow.active = f0 & 1;
		break;
	case AMQP_CONFIRM_SELECT_METHOD:
		m.select.nowait = f0 & 1;
		break;
	default:	/* no fields, or none that matter */
		break;
	}
	fuzz_method(o, ch, id, &m);
}

/* Properties the front door reads, one of them (or a header) with the
 * bytes as its value, so that its checks see values the decoder passes. */
static int
fuzz_built_props(uint8_t *out, size_t cap, uint8_t pick, const uint8_t *b, size_t n)
{
	amqp_basic_properties_t p;
	amqp_table_entry_t e;
	amqp_bytes_t v = { n, (void *)b };

	memset(&p, 0, sizeof p);
	switch (pick % 7) {
	case 0: p._flags = AMQP_BASIC_MESSAGE_ID_FLAG; p.message_id = v; break;
	case 1: p._flags = AMQP_BASIC_CONTENT_TYPE_FLAG; p.content_type = v; break;
	case 2: p._flags = AMQP_BASIC_CORRELATION_ID_FLAG; p.correlation_id = v; break;
	case 3: p._flags = AMQP_BASIC_TYPE_FLAG; p.type = v; break;
	case 4: p._flags = AMQP_BASIC_EXPIRATION_FLAG; p.expiration = v; break;
	case 5: p._flags = AMQP_BASIC_REPLY_TO_FLAG; p.reply_to = v; break;
	case 6:
		e.key = amqp_cstring_bytes(pick & 0x80 ? "traceparent" : "x-k");
		e.value.kind = AMQP_FIELD_KIND_UTF8;
		e.value.value.bytes = v;
		p._flags = AMQP_BASIC_HEADERS_FLAG;
		p.headers.num_entries = 1;
		p.headers.entries = &e;
		break;
	}
	return amqp_encode_properties(AMQP_BASIC_CLASS, &p, (amqp_bytes_t){ cap, out });
}

/* A content header of class basic: body size, then the properties: none,
 * built (fuzz_built_props: first byte odd) or the bytes as they are (the
 * decoder judges them). */
static void
fuzz_header(struct fuzz_out *o, uint16_t ch, uint8_t size, const uint8_t *b, size_t n)
{
	uint8_t buf[12 + 512];
	int len = 2;

	memset(buf, 0, 14);
	buf[1] = AMQP_BASIC_CLASS;
	buf[11] = size;
	if (n >= 1 && (b[0] & 1))
		len = fuzz_built_props(buf + 12, sizeof buf - 12, b[0] >> 1, b + 1, n - 1);
	else if (n >= 2) {
		memcpy(buf + 12, b, n);
		len = (int)n;
	}
	FUZZ_CHECK(len >= 0, "cannot encode properties");
	fuzz_frame(o, AMQPF_HEADER, ch, buf, 12 + (size_t)len);
}

/* frame_max: the smallest or ours, as the input's first byte says (a
 * delivery is cut into body frames by it). */
static void
fuzz_handshake(struct fuzz_out *o, uint32_t frame_max)
{
	static const char resp[] = "\0guest\0guest";
	amqp_connection_start_ok_t so = { amqp_empty_table, amqp_cstring_bytes("PLAIN"),
	    { sizeof resp - 1, (void *)resp }, amqp_cstring_bytes("en_US") };
	amqp_connection_tune_ok_t to = { 0, frame_max, 0 };
	amqp_connection_open_t op = { amqp_cstring_bytes("/"), amqp_empty_bytes, 0 };
	amqp_channel_open_t co = { amqp_empty_bytes };

	fuzz_put(o, AMQPF_PROTOCOL_HEADER, AMQPF_HEADER_LEN);
	fuzz_method(o, 0, AMQP_CONNECTION_START_OK_METHOD, &so);
	fuzz_method(o, 0, AMQP_CONNECTION_TUNE_OK_METHOD, &to);
	fuzz_method(o, 0, AMQP_CONNECTION_OPEN_METHOD, &op);
	fuzz_method(o, 1, AMQP_CHANNEL_OPEN_METHOD, &co);
}

/* One chunk's frame into o; the bytes it used. */
static size_t
fuzz_chunk(struct fuzz_out *o, const uint8_t *data, size_t size)
{
	uint8_t op = data[0], arg = data[1];
	size_t len = data[2] < size - 3 ? data[2] : size - 3;
	uint16_t ch = op & 3;

	data += 3;
	switch ((op >> 2) & 3) {
	case 0:
		fuzz_built_method(o, ch, fuzz_methods[arg % FUZZ_NMETHODS], data, len);
		break;
	case 1:
		fuzz_raw_method(o, ch, fuzz_methods[arg % FUZZ_NMETHODS], data, len);
		break;
	case 2:
		fuzz_header(o, ch, arg, data, len);
		break;
	case 3:
		fuzz_frame(o, AMQPF_BODY, ch, data, len);
		break;
	}
	return 3 + len;
}

/* ---- the daemon's side ---- */

/* Record i; the first with properties and a header, so that a delivery
 * encodes them (amqpd_send_content), the last with a body of several
 * frames at the smallest frame_max. */
static void
fuzz_put_record(struct store *st, int i)
{
	static char body[10000];
	struct props_header h = { "x-origin", "fuzz" };
	struct msg m;
	char id[16];
	int64_t rid;

	memset(&m, 0, sizeof m);
	memset(body, 'b', sizeof body);
	snprintf(id, sizeof id, "m-%d", i);
	m.message_id = id;
	m.exchange = "events";
	m.routing_key = "fd.x";
	m.body = body;
	m.body_len = i == FUZZ_RECORDS - 1 ? sizeof body : (size_t)i;
	if (i == 0) {
		m.props.content_type = "application/json";
		m.props.correlation_id = "order-1";
		m.props.headers = &h;
		m.props.n_headers = 1;
	}
	FUZZ_CHECK(store_inbox_put(st, "fd", &m, util_now(), &rid) == STORE_PUT_STORED,
	    "cannot store record %d", i);
}

static void
fuzz_unlink(const char *path, const char *suffix)
{
	char p[128];

	snprintf(p, sizeof p, "%s%s", path, suffix);
	unlink(p);
}

/* A store of its own for each input, so that an input runs the same way
 * alone or after others. */
static void
fuzz_daemon_up(struct fuzz_env *e)
{
	char *err = NULL;
	int i;

	fuzz_unlink(e->path, "");
	fuzz_unlink(e->path, "-wal");
	fuzz_unlink(e->path, "-shm");
	e->d.store = store_open(e->path, e->d.base, INT64_C(1) << 30, &err);
	FUZZ_CHECK(e->d.store != NULL, "store_open: %s", err ? err : "?");
	for (i = 0; i < FUZZ_RECORDS; i++)
		fuzz_put_record(e->d.store, i);
	store_flush(e->d.store);
	e->d.state = SAGAD_RUNNING;
	e->d.delivery = delivery_new(&e->d);
	FUZZ_CHECK(e->d.delivery != NULL, "delivery_new failed");
	/* No listener and no topology thread: connections come from
	 * fuzz_connect, topology methods are not in the table. */
	e->a = xcalloc(1, sizeof *e->a);
	e->a->d = &e->d;
	e->d.amqpd = e->a;
}

static void
fuzz_daemon_down(struct fuzz_env *e)
{
	store_flush(e->d.store);
	e->d.state = SAGAD_STOPPED;
	free(e->a);
	e->d.amqpd = NULL;
	delivery_free(e->d.delivery);
	e->d.delivery = NULL;
	store_close(e->d.store);
	e->d.store = NULL;
}

static struct fuzz_env *
fuzz_env(void)
{
	static struct fuzz_env *e;

	if (e)
		return e;
	e = calloc(1, sizeof *e);
	snprintf(e->dir, sizeof e->dir, "%s/sagad-fuzz-amqpd-XXXXXX",
	    access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
	FUZZ_CHECK(mkdtemp(e->dir) != NULL, "mkdtemp");
	snprintf(e->path, sizeof e->path, "%s/store.db", e->dir);
	e->d.base = event_base_new();
	event_base_priority_init(e->d.base, 3);
	e->d.conf = fuzz_load_conf(fuzz_amqpd_conf);
	return e;
}

/* Runs the loop until nothing happens for a few turns; what the server
 * wrote is read and dropped, so that it never blocks on a full socket. */
static void
fuzz_run_quiet(struct fuzz_env *e, int peer)
{
	uint8_t sink[65536];
	int quiet = 0, turns;
	ssize_t r;

	for (turns = 0; turns < 10000 && quiet < 4; turns++) {
		event_base_loop(e->d.base, EVLOOP_NONBLOCK);
		r = peer >= 0 ? read(peer, sink, sizeof sink) : -1;
		if (r > 0)
			quiet = 0;
		else
			quiet++;
	}
}

static void
fuzz_write_all(struct fuzz_env *e, int peer, const uint8_t *p, size_t n)
{
	ssize_t w;

	while (n) {
		w = write(peer, p, n);
		if (w > 0) {
			p += w;
			n -= (size_t)w;
		}
		fuzz_run_quiet(e, peer);
		if (w <= 0 && !e->a->conns)
			return;		/* the server closed its end */
	}
}

static int
fuzz_connect(struct fuzz_env *e)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	int sv[2];

	FUZZ_CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, "socketpair");
	evutil_make_socket_nonblocking(sv[0]);
	evutil_make_socket_nonblocking(sv[1]);
	amqpd_accept_cb(NULL, sv[0], (struct sockaddr *)&sun, sizeof sun, e->a);
	FUZZ_CHECK(e->a->conns != NULL, "connection not accepted");
	return sv[1];
}

/* A channel's unacked deliveries: in tag order, each of a consumer of
 * the channel holding it. */
static size_t
fuzz_check_chan(const struct amqpd_chan *ch)
{
	const struct amqpd_consumer *k;
	unsigned held = 0;
	size_t i;

	for (k = ch->consumers; k; k = k->next)
		held += k->sink.held;
	FUZZ_CHECK(ch->nunacked <= held, "channel %u: %zu unacked, %u held", ch->id,
	    ch->nunacked, held);
	for (i = 0; i < ch->nunacked; i++) {
		for (k = ch->consumers; k && k != ch->unacked[i].cons; k = k->next)
			;
		FUZZ_CHECK(k != NULL, "channel %u: tag %" PRIu64 " of a consumer not on it",
		    ch->id, ch->unacked[i].tag);
		FUZZ_CHECK(i == 0 || ch->unacked[i - 1].tag < ch->unacked[i].tag,
		    "channel %u: unacked tags out of order", ch->id);
		FUZZ_CHECK(ch->unacked[i].tag <= ch->deliver_tag,
		    "channel %u: tag %" PRIu64 " never given", ch->id, ch->unacked[i].tag);
	}
	return ch->nunacked;
}

/* Between two chunks: no more unacked than the subscription has in
 * flight. */
static void
fuzz_check_running(struct fuzz_env *e)
{
	const struct dsub *ds = &e->d.delivery->subs[0];
	struct amqpd_conn *c = e->a->conns;
	size_t unacked = 0;
	unsigned i;

	if (!c || !c->chans)
		return;
	for (i = 0; i <= c->channel_max; i++)
		if (c->chans[i])
			unacked += fuzz_check_chan(c->chans[i]);
	FUZZ_CHECK(unacked <= ds->inflight, "%zu unacked, %u in flight", unacked, ds->inflight);
}

/* After the client went: nothing handed out is unsettled, the store
 * agrees with the dispatch. */
static void
fuzz_check_settled(struct fuzz_env *e)
{
	struct dsub *ds = &e->d.delivery->subs[0];
	int64_t pending = store_inbox_count(e->d.store, "fd", INBOX_PENDING);
	int64_t done = store_inbox_count(e->d.store, "fd", INBOX_DONE);
	int64_t dead = store_inbox_count(e->d.store, "fd", INBOX_DEAD);

	FUZZ_CHECK(e->a->conns == NULL, "a connection is still up after its peer closed");
	FUZZ_CHECK(e->a->stats.consumers == 0, "%" PRIu64 " consumers counted",
	    e->a->stats.consumers);
	FUZZ_CHECK(ds->inflight == 0, "%u deliveries in flight", ds->inflight);
	FUZZ_CHECK(ds->sinks == NULL, "a consumer is still attached");
	FUZZ_CHECK(pending + done + dead == FUZZ_RECORDS,
	    "records: %" PRId64 " pending, %" PRId64 " done, %" PRId64 " dead",
	    pending, done, dead);
	FUZZ_CHECK((int64_t)ds->npending == pending,
	    "dispatch holds %zu records, the store has %" PRId64 " pending",
	    ds->npending, pending);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fuzz_env *e = fuzz_env();
	struct fuzz_out o = { NULL, 0, 0 };
	size_t used;
	int peer;

	fuzz_daemon_up(e);
	peer = fuzz_connect(e);
	fuzz_handshake(&o, size % 2 ? AMQPF_FRAME_MIN : 131072);
	fuzz_write_all(e, peer, o.p, o.n);
	/* A chunk at a time, the loop run in between: the dispatch hands out
	 * records between two methods, as it would to a real client. */
	while (size >= 3 && e->a->conns) {
		o.n = 0;
		used = fuzz_chunk(&o, data, size);
		data += used;
		size -= used;
		fuzz_write_all(e, peer, o.p, o.n);
		fuzz_check_running(e);
	}
	free(o.p);
	close(peer);
	fuzz_run_quiet(e, -1);
	store_flush(e->d.store);
	fuzz_run_quiet(e, -1);
	fuzz_check_settled(e);
	if (getenv("FUZZ_AMQPD_STATS"))
		fprintf(stderr, "fuzz_amqpd: delivered %" PRIu64 ", acks %" PRIu64 ", requeues %"
		    PRIu64 ", rejects %" PRIu64 ", published %" PRIu64 "\n", e->a->stats.delivered,
		    e->a->stats.client_acks, e->a->stats.client_requeues, e->a->stats.client_rejects,
		    e->a->stats.published);
	fuzz_daemon_down(e);
	return 0;
}
