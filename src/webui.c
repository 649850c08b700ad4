#include "webui.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/http.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "httpd.h"
#include "log.h"

/*
 * Everything the page needs comes from the admin listener itself: no
 * inline script or style, no other origin, no framing. Images may be
 * data: URLs (none are today).
 */
#define WEBUI_CSP \
	"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; " \
	"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

static const struct {
	const char *ext;
	const char *type;
} webui_types[] = {
	{ ".html", "text/html; charset=utf-8" },
	{ ".js", "text/javascript; charset=utf-8" },
	{ ".css", "text/css; charset=utf-8" },
	{ ".svg", "image/svg+xml" },
	{ ".png", "image/png" },
	{ ".ico", "image/x-icon" },
};

int
webui_name_ok(const char *name)
{
	size_t i, n = strlen(name);

	if (n == 0 || n > 64 || name[0] == '.')
		return 0;
	for (i = 0; i < n; i++) {
		char c = name[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		    (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
			return 0;
	}
	return 1;
}

const char *
webui_content_type(const char *name)
{
	size_t i, n = strlen(name);

	for (i = 0; i < sizeof webui_types / sizeof webui_types[0]; i++) {
		size_t e = strlen(webui_types[i].ext);
		if (n > e && strcmp(name + n - e, webui_types[i].ext) == 0)
			return webui_types[i].type;
	}
	return NULL;
}

static void
webui_headers(struct evhttp_request *req, const char *type)
{
	struct evkeyvalq *h = evhttp_request_get_output_headers(req);

	evhttp_add_header(h, "Content-Type", type);
	evhttp_add_header(h, "Content-Security-Policy", WEBUI_CSP);
	evhttp_add_header(h, "X-Content-Type-Options", "nosniff");
	evhttp_add_header(h, "Referrer-Policy", "no-referrer");
	/* A new sagad may bring a new page: always revalidate. */
	evhttp_add_header(h, "Cache-Control", "no-cache");
}

/* Opens dir/name as a regular file of at most WEBUI_MAX_FILE bytes: its
 * descriptor and size, or -1 with errno (ENOENT for anything not served). */
static int
webui_open(const char *dir, const char *name, off_t *size)
{
	char path[4096];
	struct stat st;
	int fd;

	if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, name) >= sizeof path) {
		errno = ENAMETOOLONG;
		return -1;
	}
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		return -1;
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size > WEBUI_MAX_FILE) {
		close(fd);
		errno = ENOENT;
		return -1;
	}
	*size = st.st_size;
	return fd;
}

/* The whole file into buf (the page's files are small: a plain read is
 * simpler than a file segment, whose ownership of fd on failure varies). */
static int
webui_read(struct evbuffer *buf, int fd, off_t size)
{
	off_t got = 0;

	while (got < size) {
		int n = evbuffer_read(buf, fd, (int)(size - got));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			if (n == 0)
				errno = EIO;	/* the file shrank under us */
			return -1;
		}
		got += n;
	}
	return 0;
}

static void
webui_file(struct evhttp_request *req, const char *dir, const char *name)
{
	const char *type = webui_content_type(name);
	struct evbuffer *buf;
	off_t size;
	int fd;

	if (!webui_name_ok(name) || !type) {
		httpd_error(req, 404, "not-found", "no such file of the web page");
		return;
	}
	fd = webui_open(dir, name, &size);
	if (fd < 0) {
		if (errno != ENOENT && errno != ELOOP)
			log_warn("cannot read a file of the web page", LOG_STR("dir", dir),
			    LOG_STR("file", name), LOG_STR("error", strerror(errno)));
		httpd_error(req, 404, "not-found", "no such file of the web page");
		return;
	}
	buf = evbuffer_new();
	if (webui_read(buf, fd, size) < 0) {
		log_warn("cannot read a file of the web page", LOG_STR("dir", dir),
		    LOG_STR("file", name), LOG_STR("error", strerror(errno)));
		close(fd);
		evbuffer_free(buf);
		httpd_error(req, 500, "read-error", "cannot read a file of the web page");
		return;
	}
	close(fd);
	webui_headers(req, type);
	evhttp_send_reply(req, 200, "OK", buf);
	evbuffer_free(buf);
}

void
webui_request(struct evhttp_request *req, const char *dir, const char *path)
{
	enum evhttp_cmd_type cmd = evhttp_request_get_command(req);

	if (!dir || !*dir) {
		httpd_error(req, 404, "not-found", "the web page is turned off (api.ui_dir)");
		return;
	}
	if (cmd != EVHTTP_REQ_GET && cmd != EVHTTP_REQ_HEAD) {
		evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "GET, HEAD");
		httpd_error(req, 405, "method-not-allowed", "the web page's files are read with GET");
		return;
	}
	if (strcmp(path, "/ui") == 0) {
		evhttp_add_header(evhttp_request_get_output_headers(req), "Location", "/ui/");
		evhttp_send_reply(req, 301, "Moved Permanently", NULL);
		return;
	}
	path += strlen("/ui/");
	webui_file(req, dir, *path ? path : "index.html");
}
