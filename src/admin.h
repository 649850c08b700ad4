/* The admin listener: health, readiness, metrics and the JSON admin API. */
#ifndef SAGAD_ADMIN_H
#define SAGAD_ADMIN_H

struct sagad;
struct admin;

struct admin *admin_new(struct sagad *d, char **err);
void admin_free(struct admin *a);
void admin_apply_conf(struct admin *a);

/* admin_tx.c, routed by admin.c: the two-phase commit views. */
struct evhttp_request;
void admin_transactions(struct sagad *d, struct evhttp_request *req);
void admin_transaction(struct sagad *d, struct evhttp_request *req, const char *rest);

#endif
