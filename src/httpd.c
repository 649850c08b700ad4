#include "httpd.h"

#include <arpa/inet.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/listener.h>
#include <jansson.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "log.h"
#include "util.h"
#include "xmalloc.h"

const char *
httpd_reason(int code)
{
	switch (code) {
	case 200: return "OK";
	case 202: return "Accepted";
	case 400: return "Bad Request";
	case 401: return "Unauthorized";
	case 403: return "Forbidden";
	case 404: return "Not Found";
	case 405: return "Method Not Allowed";
	case 409: return "Conflict";
	case 413: return "Payload Too Large";
	case 500: return "Internal Server Error";
	case 503: return "Service Unavailable";
	case 507: return "Insufficient Storage";
	default: return "Status";
	}
}

void
httpd_set_limits(struct evhttp *http, const struct httpd_limits *lim)
{
	struct timeval tv;

	/* evhttp defaults to unlimited sizes and no timeout (ARCHITECTURE.md:
	 * libevent: evhttp limits). The body cap leaves room above max_body
	 * so that a body a little too large still reaches us and gets a JSON
	 * 413; a far larger one is cut by libevent with its own plain 413. */
	evhttp_set_max_body_size(http, lim->max_body + 65536);
	evhttp_set_max_headers_size(http, lim->max_headers);
	tv = util_timeval(lim->timeout);
	evhttp_set_timeout_tv(http, &tv);
	evhttp_set_allowed_methods(http, EVHTTP_REQ_GET | EVHTTP_REQ_POST |
	    EVHTTP_REQ_HEAD | EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE |
	    EVHTTP_REQ_OPTIONS | EVHTTP_REQ_PATCH);
	evhttp_set_default_content_type(http, "application/json");
}

static int
httpd_bind_unix(const char *path, int mode, char **err)
{
	struct sockaddr_un sun;
	int fd;

	memset(&sun, 0, sizeof sun);
	sun.sun_family = AF_UNIX;
	snprintf(sun.sun_path, sizeof sun.sun_path, "%s", path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		goto fail;
	/* A socket file left by a previous run would make bind fail; any
	 * other kind of file is not ours to remove. */
	{
		struct stat sb;
		if (lstat(path, &sb) == 0) {
			if (!S_ISSOCK(sb.st_mode)) {
				errno = EEXIST;
				goto fail;
			}
			if (unlink(path) < 0)
				goto fail;
		}
	}
	if (bind(fd, (struct sockaddr *)&sun, sizeof sun) < 0 ||
	    chmod(path, mode) < 0 || listen(fd, 1024) < 0)
		goto fail;
	return fd;
fail:
	*err = xasprintf("cannot listen on unix:%s: %s", path, strerror(errno));
	if (fd >= 0)
		close(fd);
	return -1;
}

static int
httpd_bind_tcp(const char *spec, char **err)
{
	char host[256];
	const char *port;
	struct addrinfo hints, *ai = NULL;
	int fd = -1, one = 1, rc;

	if (util_listen_split(spec, host, sizeof host, &port) < 0) {
		*err = xasprintf("cannot listen on %s: malformed address", spec);
		return -1;
	}
	memset(&hints, 0, sizeof hints);
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
	rc = getaddrinfo(*host ? host : NULL, port, &hints, &ai);
	if (rc != 0) {
		*err = xasprintf("cannot listen on %s: %s", spec, gai_strerror(rc));
		return -1;
	}
	fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0 ||
	    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
	    bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, 1024) < 0) {
		*err = xasprintf("cannot listen on %s: %s", spec, strerror(errno));
		if (fd >= 0)
			close(fd);
		fd = -1;
	}
	freeaddrinfo(ai);
	return fd;
}

/*
 * accept() failing (out of file descriptors) would otherwise be retried at
 * once, forever, with a libevent warning each time: pause the listener for
 * a second instead and say so once.
 */
struct httpd_pause {
	struct evconnlistener *l;
	struct event *ev;
};

static void
httpd_resume_cb(evutil_socket_t fd, short what, void *arg)
{
	struct httpd_pause *p = arg;

	(void)fd;
	(void)what;
	evconnlistener_enable(p->l);
}

/* The error callback gets evhttp's argument, not ours: find the pause
 * state by listener (there are two listeners). */
static struct httpd_pause *httpd_pauses[8];

static void
httpd_accept_error(struct evconnlistener *l, void *arg)
{
	struct httpd_pause *p = NULL;
	struct timeval tv = { 1, 0 };
	int e = EVUTIL_SOCKET_ERROR();
	size_t i;

	(void)arg;
	for (i = 0; i < sizeof httpd_pauses / sizeof httpd_pauses[0]; i++)
		if (httpd_pauses[i] && httpd_pauses[i]->l == l)
			p = httpd_pauses[i];
	if (!p)
		return;
	log_warn("cannot accept connections, pausing for a second",
	    LOG_STR("error", evutil_socket_error_to_string(e)));
	evconnlistener_disable(p->l);
	event_add(p->ev, &tv);
}

int
httpd_bind(const char *spec, int socket_mode, char **err)
{
	*err = NULL;
	if (strncmp(spec, "unix:", 5) == 0)
		return httpd_bind_unix(spec + 5, socket_mode, err);
	return httpd_bind_tcp(spec, err);
}

struct evhttp *
httpd_listen(struct event_base *base, const char *spec,
    const struct httpd_limits *lim, char **err)
{
	struct evhttp_bound_socket *bound;
	struct httpd_pause *pause;
	struct evhttp *http;
	int fd;

	if ((fd = httpd_bind(spec, lim->socket_mode, err)) < 0)
		return NULL;
	http = evhttp_new(base);
	httpd_set_limits(http, lim);
	if (!(bound = evhttp_accept_socket_with_handle(http, fd))) {
		*err = xasprintf("cannot accept on %s", spec);
		close(fd);
		evhttp_free(http);
		return NULL;
	}
	/* Freed with the process: one per listener, two in all. */
	pause = xcalloc(1, sizeof *pause);
	pause->l = evhttp_bound_socket_get_listener(bound);
	pause->ev = evtimer_new(base, httpd_resume_cb, pause);
	for (size_t i = 0; i < sizeof httpd_pauses / sizeof httpd_pauses[0]; i++)
		if (!httpd_pauses[i]) {
			httpd_pauses[i] = pause;
			evconnlistener_set_error_cb(pause->l, httpd_accept_error);
			break;
		}
	return http;
}

void
httpd_reply_json(struct evhttp_request *req, int code, void *json)
{
	struct evbuffer *buf = evbuffer_new();
	char *text = json_dumps(json, JSON_COMPACT);

	json_decref(json);
	evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type",
	    "application/json");
	if (text) {
		evbuffer_add(buf, text, strlen(text));
		evbuffer_add(buf, "\n", 1);
		free(text);
	}
	evhttp_send_reply(req, code, httpd_reason(code), buf);
	evbuffer_free(buf);
}

void
httpd_error(struct evhttp_request *req, int code, const char *error,
    const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	httpd_reply_json(req, code, json_pack("{s:s,s:s}", "error", error, "message", msg));
}

int
httpd_authorized(struct evhttp_request *req, const char *token)
{
	const char *h;

	if (!token)
		return 1;
	h = evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
	if (h && strncasecmp(h, "Bearer ", 7) == 0 && util_ct_equal(h + 7, token))
		return 1;
	evhttp_add_header(evhttp_request_get_output_headers(req), "WWW-Authenticate",
	    "Bearer realm=\"sagad\"");
	httpd_error(req, 401, "unauthorized", "missing or wrong bearer token");
	return 0;
}
