/* What the two HTTP listeners share: binding, limits, JSON answers, auth. */
#ifndef SAGAD_HTTPD_H
#define SAGAD_HTTPD_H

#include <stdint.h>

struct event_base;
struct evhttp;
struct evhttp_request;

struct httpd_limits {
	int64_t max_body;
	int64_t max_headers;
	double timeout;
	int socket_mode;	/* for unix: sockets */
};

/* Bind "HOST:PORT" or "unix:/path". NULL with a malloc'd *err on failure. */
struct evhttp *httpd_listen(struct event_base *base, const char *spec,
    const struct httpd_limits *lim, char **err);
/* The listening socket alone (the AMQP front door binds it too): a
 * non-blocking fd, or -1 with a malloc'd *err. */
int httpd_bind(const char *spec, int socket_mode, char **err);
void httpd_set_limits(struct evhttp *http, const struct httpd_limits *lim);

/* Send a JSON document (serialised from a jansson json_t *, which is freed). */
void httpd_reply_json(struct evhttp_request *req, int code, void *json);
/* {"error": code_name, "message": ...} */
void httpd_error(struct evhttp_request *req, int code, const char *error,
    const char *fmt, ...) __attribute__((format(printf, 4, 5)));
/* Checks "Authorization: Bearer <token>" in constant time; token NULL
 * means no token is required. Answers 401 itself and returns 0 if not. */
int httpd_authorized(struct evhttp_request *req, const char *token);
const char *httpd_reason(int code);

#endif
