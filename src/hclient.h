#ifndef SAGAD_HCLIENT_H
#define SAGAD_HCLIENT_H

#include <stddef.h>

struct event_base;
struct evbuffer;

/*
 * A keep-alive HTTP/1.1 client connection for deliveries to the service:
 * one request at a time, written at once (no wait for the socket to say
 * it is writable) and read with read interest left on for the life of the
 * connection. evhttp's client toggled epoll interest and formatted every
 * header with printf for each request: a third of sagad's system calls per
 * delivered message.
 */
struct hclient;

enum hclient_result {
	HCLIENT_ANSWERED,	/* a whole answer: status, headers, body */
	HCLIENT_CONNECT_FAILED,
	HCLIENT_TIMEOUT,
	HCLIENT_CLOSED,		/* the connection closed before the whole answer */
	HCLIENT_MALFORMED,	/* not an HTTP/1.x answer */
	HCLIENT_TOO_LARGE,	/* headers or body over the limits */
	HCLIENT_CANCELLED	/* hclient_free with the request in flight */
};

struct hclient_answer {
	enum hclient_result result;
	int status;
	const char *content_type;	/* NULL when the answer has none */
	struct evbuffer *body;
};

/* Called once per request, on the loop; the answer lives until it returns. */
typedef void hclient_done_fn(void *arg, const struct hclient_answer *a);

struct hclient *hclient_new(struct event_base *base, const char *host, int port,
    size_t max_body, size_t max_headers);
/* Send req (the whole request: head and body; drained). 0, or -1 when a
 * request is already in flight. */
int hclient_send(struct hclient *c, struct evbuffer *req, double timeout,
    hclient_done_fn *fn, void *arg);
int hclient_busy(const struct hclient *c);
void hclient_free(struct hclient *c);
const char *hclient_result_name(enum hclient_result r);
/* "prefix: <start of the answer's body>" into buf, or the prefix alone when
 * the body is empty: what a service said when it refused or failed, for the
 * last error of a delivery. Bytes other than printable ASCII, tab and
 * newlines become '?', so the text is valid UTF-8 for the admin JSON; the
 * log quotes it like any value. */
void hclient_answer_text(const struct hclient_answer *a, const char *prefix,
    char *buf, size_t len);

/* ---- the answer parser, on its own for the tests ---- */

enum hparse_state {
	HP_STATUS, HP_HEADERS, HP_BODY_LENGTH, HP_BODY_EOF, HP_CHUNK_SIZE,
	HP_CHUNK_DATA, HP_CHUNK_END, HP_TRAILERS, HP_DONE, HP_ERROR
};

struct hparse {
	enum hparse_state state;
	enum hclient_result error;	/* HP_ERROR: why */
	int status;
	int close;			/* the server closes after this answer */
	char *content_type;
	size_t header_bytes, max_headers, max_body;
	size_t left;			/* body or chunk bytes still to come */
	struct evbuffer *body;
};

void hparse_init(struct hparse *p, size_t max_body, size_t max_headers);
void hparse_clear(struct hparse *p);
/* Take what in holds; returns the state (HP_DONE: a whole answer). */
enum hparse_state hparse_feed(struct hparse *p, struct evbuffer *in);
/* The peer closed the connection. */
enum hparse_state hparse_eof(struct hparse *p);

#endif
