#include "ingress.h"

#include <ctype.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <sys/queue.h>
#include <event2/keyvalq_struct.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "httpd.h"
#include "log.h"
#include "otel.h"
#include "props.h"
#include "sagad.h"
#include "store.h"
#include "trace.h"
#include "util.h"
#include "xmalloc.h"

#define INGRESS_PREFIX "/v1/publish/"

struct ingress {
	struct sagad *d;
	struct evhttp *http;
	struct ingress_stats stats;
};

/* One answer waiting for the commit that makes its message durable. */
struct ingress_pending {
	struct ingress *in;
	struct evhttp_request *req;
	char *message_id;
	int duplicate;
	struct otel_span *span;	/* the publish's, to its answer */
};

static int
ingress_fail(const char **error, char *why, size_t whylen, const char *code,
    const char *msg)
{
	*error = code;
	snprintf(why, whylen, "%s", msg);
	return -1;
}

/* The exchanges every RabbitMQ vhost has. */
static int
ingress_builtin_exchange(const char *ex)
{
	static const char *const names[] = { "amq.direct", "amq.fanout", "amq.topic",
	    "amq.headers", "amq.match", NULL };
	int i;

	for (i = 0; names[i]; i++)
		if (strcmp(names[i], ex) == 0)
			return 1;
	return 0;
}

/* "exchange/routing.key" -> decoded names; the key may contain '/'. */
static int
ingress_parse_path(const struct sagad_conf *conf, const char *path, struct msg *m,
    const char **error, char *why, size_t whylen)
{
	const char *rest = path + strlen(INGRESS_PREFIX), *slash, *q;
	size_t elen, klen;
	char *ex, *key;

	q = strchr(rest, '?');
	slash = strchr(rest, '/');
	if (!slash || (q && slash > q))
		return ingress_fail(error, why, whylen, "bad-path",
		    "path must be /v1/publish/{exchange}/{routing_key}");
	elen = slash - rest;
	klen = q ? (size_t)(q - slash - 1) : strlen(slash + 1);
	ex = xmalloc(elen + 1);
	key = xmalloc(klen + 1);
	if (util_pct_decode(rest, elen, ex) < 0 || util_pct_decode(slash + 1, klen, key) < 0) {
		free(ex);
		free(key);
		return ingress_fail(error, why, whylen, "bad-path",
		    "malformed percent-encoding in the path");
	}
	m->exchange = ex;
	m->routing_key = key;
	if (strcmp(ex, "-") == 0)
		ex[0] = '\0';	/* the default exchange */
	else if (!*ex)		/* "" is the default only as "-" in a path */
		return ingress_fail(error, why, whylen, "bad-exchange",
		    "exchange names are 1-255 of A-Z a-z 0-9 - _ . : (or - for the default exchange)");
	return ingress_check_route(conf, ex, key, error, why, whylen);
}

int
ingress_check_route(const struct sagad_conf *conf, const char *ex, const char *key,
    const char **error, char *why, size_t whylen)
{
	if (*ex && !util_valid_exchange(ex))
		return ingress_fail(error, why, whylen, "bad-exchange",
		    "exchange names are 1-255 of A-Z a-z 0-9 - _ . : (or - for the default exchange)");
	if (*ex && conf->n_exchanges && !conf_exchange(conf, ex) && !ingress_builtin_exchange(ex))
		return ingress_fail(error, why, whylen, "unknown-exchange",
		    "exchange is not in the configured exchanges");
	if (!util_valid_shortstr(key, 255))
		return ingress_fail(error, why, whylen, "bad-routing-key",
		    "routing keys are at most 255 bytes without control characters");
	return 0;
}

static int
ingress_visible(const char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s <= 0x20 || (unsigned char)*s >= 0x7f)
			return 0;
	return 1;
}

int
ingress_valid_message_id(const char *v)
{
	return *v && strlen(v) <= 255 && ingress_visible(v);
}

int
ingress_valid_expiration(const char *s)
{
	size_t n = strlen(s);

	if (n == 0 || n > 10)
		return 0;
	for (; *s; s++)
		if (!isdigit((unsigned char)*s))
			return 0;
	/* RabbitMQ refuses more than 2^32-1 ms and closes the channel. */
	return strtoull(s - n, NULL, 10) <= 4294967295ULL;
}

/* TRACE_PARENT or TRACE_STATE when k names one (any case), else NULL.
 * Every header of every publish comes here: the first letter spares most
 * of them the two comparisons. */
static const char *
ingress_trace_header(const char *k)
{
	if ((k[0] | 0x20) != 't')
		return NULL;
	if (strcasecmp(k, TRACE_PARENT) == 0)
		return TRACE_PARENT;
	return strcasecmp(k, TRACE_STATE) == 0 ? TRACE_STATE : NULL;
}

int
ingress_parse(const struct sagad_conf *conf, const char *path,
    const struct evkeyvalq *headers, struct msg *m, const char **error,
    char *why, size_t whylen)
{
	const struct evkeyval *h;
	const char *bad;
	char id[37], name[256];

	if (ingress_parse_path(conf, path, m, error, why, whylen) < 0)
		return -1;
	TAILQ_FOREACH(h, headers, next) {
		const char *k = h->key, *v = h->value;
		char **dst = NULL;

		if (strcasecmp(k, "Message-Id") == 0) {
			if (!ingress_valid_message_id(v))
				return ingress_fail(error, why, whylen, "bad-header",
				    "Message-Id must be 1-255 visible ASCII characters");
			dst = &m->message_id;
		} else if (strcasecmp(k, "Content-Type") == 0)
			dst = &m->props.content_type;
		else if (strcasecmp(k, "Correlation-Id") == 0)
			dst = &m->props.correlation_id;
		else if (strcasecmp(k, "Amqp-Type") == 0)
			dst = &m->props.type;
		else if (strcasecmp(k, "Amqp-Expiration") == 0) {
			if (!ingress_valid_expiration(v))
				return ingress_fail(error, why, whylen, "bad-header",
				    "Amqp-Expiration must be a number of milliseconds up to 4294967295");
			dst = &m->props.expiration;
		} else if (ingress_trace_header(k)) {
			/* W3C names, lowercase in AMQP; checked by trace_check */
			props_set_header(&m->props, ingress_trace_header(k), v);
			continue;
		} else if (strcasecmp(k, "Causation-Id") == 0 ||
		    strncasecmp(k, "Amqp-Header-", 12) == 0) {
			size_t i;
			const char *hn = strcasecmp(k, "Causation-Id") == 0 ?
			    "x-causation-id" : k + 12;
			if (!*hn || strlen(hn) > 128)
				return ingress_fail(error, why, whylen, "bad-header",
				    "Amqp-Header-<name> needs a name of 1-128 characters");
			for (i = 0; hn[i]; i++)
				name[i] = tolower((unsigned char)hn[i]);
			name[i] = '\0';
			if (!util_valid_shortstr(v, 65535))
				return ingress_fail(error, why, whylen, "bad-header",
				    "header values must not contain control characters");
			props_set_header(&m->props, name, v);
			continue;
		} else
			continue;
		if (!util_valid_shortstr(v, 255))
			return ingress_fail(error, why, whylen, "bad-header",
			    "property headers are at most 255 bytes without control characters");
		free(*dst);
		*dst = xstrdup(v);
	}
	if (trace_check(&m->props, conf, &bad) < 0)
		return ingress_fail(error, why, whylen, "bad-header", bad);
	if (!m->message_id) {
		util_uuid7(id);
		m->message_id = xstrdup(id);
	}
	return 0;
}

static void
ingress_answer(void *arg, int ok)
{
	struct ingress_pending *p = arg;

	if (!ok)
		httpd_error(p->req, 507, "store-full",
		    "the store could not commit (disk full or I/O error); nothing was stored");
	else
		httpd_reply_json(p->req, p->duplicate ? 200 : 202,
		    json_pack("{s:s,s:s}", "message_id", p->message_id,
		    "status", p->duplicate ? "duplicate" : "stored"));
	if (p->span) {		/* no clock read per message when not traced */
		otel_span_int(p->span, "http.response.status_code",
		    !ok ? 507 : p->duplicate ? 200 : 202);
		otel_span_end(p->in->d->otel, p->span, util_now(), ok ? NULL : "not stored");
	}
	free(p->message_id);
	free(p);
}

/*
 * The publish's span, from the request to its answer (the message
 * durable): a child of the publisher's context, and the parent of the
 * hops that follow, since the message is stored naming it.
 */
static struct otel_span *
ingress_span(struct ingress *in, struct msg *m, double start)
{
	struct otel_span *s;
	char name[300], child[TRACE_PARENT_LEN + 1];

	if (!in->d->otel)
		return NULL;
	snprintf(name, sizeof name, "create %s", *m->exchange ? m->exchange : "(default)");
	s = otel_span_start(in->d->otel, props_get_header(&m->props, TRACE_PARENT), name,
	    OTEL_PRODUCER, start);
	if (!s)
		return NULL;
	otel_span_message(s, "create", m);
	otel_child(props_get_header(&m->props, TRACE_PARENT), otel_span_id(s), child);
	props_set_header(&m->props, TRACE_PARENT, child);
	return s;
}

static void
ingress_publish(struct ingress *in, struct evhttp_request *req, const char *path)
{
	const struct sagad_conf *conf = in->d->conf;
	struct evbuffer *body = evhttp_request_get_input_buffer(req);
	size_t len = evbuffer_get_length(body);
	struct msg m;
	struct ingress_pending *p;
	const char *error = NULL;
	char why[256];
	enum store_put put;
	double start = in->d->otel ? util_now() : 0;	/* the span's, if any */
	struct otel_span *span;

	if (len > (size_t)conf->api.max_message_bytes) {
		in->stats.rejected++;
		httpd_error(req, 413, "too-large", "body of %zu bytes is over max_message_bytes (%lld)",
		    len, (long long)conf->api.max_message_bytes);
		return;
	}
	memset(&m, 0, sizeof m);
	if (ingress_parse(conf, path, evhttp_request_get_input_headers(req), &m,
	    &error, why, sizeof why) < 0) {
		in->stats.rejected++;
		httpd_error(req, 400, error, "%s", why);
		goto out;
	}
	span = ingress_span(in, &m, start);
	m.body = (char *)evbuffer_pullup(body, -1);
	m.body_len = len;
	put = store_outbox_put(in->d->store, &m, util_now(), STORE_OUT_DEDUP);
	m.body = NULL;		/* owned by the evbuffer */
	switch (put) {
	case STORE_PUT_STORED:
	case STORE_PUT_DUPLICATE:
		p = xcalloc(1, sizeof *p);
		p->in = in;
		p->req = req;
		p->message_id = m.message_id;
		p->duplicate = put == STORE_PUT_DUPLICATE;
		p->span = span;
		m.message_id = NULL;
		if (p->duplicate)
			in->stats.duplicates++;
		else
			in->stats.accepted++;
		/* Answer after the commit of this loop turn: durable first.
		 * If the client leaves meanwhile, libevent keeps the request
		 * until we answer, then frees it. */
		store_on_commit(in->d->store, ingress_answer, p);
		break;
	case STORE_PUT_FULL:
		in->stats.full++;
		httpd_error(req, 507, "store-full", "the store is full (store.max_bytes or disk)");
		otel_span_end(in->d->otel, span, util_now(), "store full");
		break;
	case STORE_PUT_ERROR:
		httpd_error(req, 500, "store-error", "the store failed to write; see the log");
		otel_span_end(in->d->otel, span, util_now(), "store error");
		break;
	}
out:
	free(m.message_id);
	free(m.exchange);
	free(m.routing_key);
	props_free(&m.props);
}

static void
ingress_request(struct evhttp_request *req, void *arg)
{
	struct ingress *in = arg;
	const char *uri = evhttp_request_get_uri(req);

	if (in->d->state != SAGAD_RUNNING) {
		evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", "5");
		httpd_error(req, 503, "shutting-down", "sagad is stopping; retry on its successor");
		return;
	}
	if (!httpd_authorized(req, in->d->conf->api.token))
		return;
	if (strncmp(uri, INGRESS_PREFIX, strlen(INGRESS_PREFIX)) != 0) {
		httpd_error(req, 404, "not-found", "unknown path; use POST /v1/publish/{exchange}/{routing_key}");
		return;
	}
	if (evhttp_request_get_command(req) != EVHTTP_REQ_POST) {
		evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "POST");
		httpd_error(req, 405, "method-not-allowed", "publish with POST");
		return;
	}
	ingress_publish(in, req, uri);
}

static void
ingress_limits(const struct sagad_conf *c, struct httpd_limits *lim)
{
	lim->max_body = c->api.max_message_bytes;
	lim->max_headers = c->api.max_header_bytes;
	lim->timeout = c->api.request_timeout;
	lim->socket_mode = c->api.socket_mode;
}

struct ingress *
ingress_new(struct sagad *d, char **err)
{
	struct ingress *in = xcalloc(1, sizeof *in);
	struct httpd_limits lim;

	in->d = d;
	ingress_limits(d->conf, &lim);
	in->http = httpd_listen(d->base, d->conf->api.listen, &lim, err);
	if (!in->http) {
		free(in);
		return NULL;
	}
	evhttp_set_gencb(in->http, ingress_request, in);
	return in;
}

void
ingress_apply_conf(struct ingress *in)
{
	struct httpd_limits lim;

	ingress_limits(in->d->conf, &lim);
	httpd_set_limits(in->http, &lim);
}

void
ingress_free(struct ingress *in)
{
	if (!in)
		return;
	evhttp_free(in->http);
	free(in);
}

const struct ingress_stats *
ingress_stats(const struct ingress *in)
{
	return &in->stats;
}
