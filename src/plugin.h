/* Sources: plugins that hand messages to the outbox (sagad-plugins(7)). */
#ifndef SAGAD_PLUGIN_HOST_H
#define SAGAD_PLUGIN_HOST_H

struct sagad;
struct sagad_conf;
struct conf_errors;
struct evbuffer;
struct plugins;

/* Load each source's plugin and check its keys: FILE:LINE errors (sagad -n
 * and start-up). Returns the number of errors added. */
int plugins_check(const struct sagad_conf *conf, struct conf_errors *errs);

/* Load and start every source; NULL with *err on failure. */
struct plugins *plugins_start(struct sagad *d, char **err);
void plugins_stop(struct plugins *p);
/* 1 when every source is ready; otherwise 0 and a reason. */
int plugins_ready(const struct plugins *p, const char **reason);
void plugins_metrics(const struct plugins *p, struct evbuffer *out);

#endif
