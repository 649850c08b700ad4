/* The admin listener: health, readiness, metrics and the JSON admin API. */
#ifndef SAGAD_ADMIN_H
#define SAGAD_ADMIN_H

struct sagad;
struct admin;

struct admin *admin_new(struct sagad *d, char **err);
void admin_free(struct admin *a);
void admin_apply_conf(struct admin *a);

#endif
