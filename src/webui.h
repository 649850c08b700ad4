/*
 * The operators' web page: static files (ui/ in the source tree, installed
 * under $(pkgdatadir)/ui) served under /ui/ on the admin listener. The page
 * itself holds no data; it calls the admin API with the operator's token.
 */
#ifndef SAGAD_WEBUI_H
#define SAGAD_WEBUI_H

struct evhttp_request;

/* Largest file served: the page's own files are a few dozen KiB. */
#define WEBUI_MAX_FILE (4 * 1024 * 1024)

/*
 * Answers a request for PATH, which starts with "/ui": "/ui" redirects to
 * "/ui/", "/ui/" is index.html, "/ui/NAME" the file NAME of dir. dir NULL
 * or "" means the page is turned off (404).
 */
void webui_request(struct evhttp_request *req, const char *dir, const char *path);

/* A file name the page may serve: 1..64 of A-Z a-z 0-9 . _ -, not
 * starting with a dot (so no "..", no hidden files, no directories). */
int webui_name_ok(const char *name);
/* The Content-Type for NAME, by its extension; NULL for a type that is
 * never served. */
const char *webui_content_type(const char *name);

#endif
