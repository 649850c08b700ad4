/* Reading libconfig settings into the struct a table of rows describes
 * (conf_table.h), with FILE:LINE errors. */
#ifndef SAGAD_CONF_READ_H
#define SAGAD_CONF_READ_H

#include <libconfig.h>

#include "conf.h"
#include "conf_table.h"

/* Where errors go while a file is read. */
struct conf_ctx {
	const char *main_file;
	struct conf_errors *errs;
};

/* "FILE:LINE: message" for the setting s (NULL: the main file, line 0). */
void conf_err(struct conf_ctx *ctx, const config_setting_t *s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void conf_err_push(struct conf_errors *errs, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Read a group of the file into base: types, ranges, unknown keys (named
 * with where, the group's name; NULL at the top). */
void conf_read_walk(struct conf_ctx *ctx, config_setting_t *group,
    const struct conf_key *rows, void *base, const char *where);

/* Shared by conf.c and conf_tx.c: a saga's or a transaction's binding
 * must use a declared exchange. */
void conf_check_binding(struct conf_ctx *ctx, config_setting_t *e, const struct sagad_conf *c,
    const char *noun, const char *name, const char *what, const struct conf_binding *b);
/* Shared by conf.c, conf_saga.c and conf_tx.c. */
int conf_has_binding(const struct conf_binding *b);
int conf_bound_exchange_ok(const struct sagad_conf *c, const char *ex);
/* conf_saga.c: the sagas checked. */
void conf_check_sagas(struct conf_ctx *ctx, config_t *cfg, struct sagad_conf *c);
/* conf_tx.c: the transactions checked, then built into sagas. */
void conf_tx_check(struct conf_ctx *ctx, config_t *cfg, struct sagad_conf *c);

#endif
