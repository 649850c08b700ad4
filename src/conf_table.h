/*
 * The configuration table: one row per key with its type, its default, who
 * owns its memory and whether a reload may change it. Reading a file,
 * setting the defaults, freeing, comparing and reloading all walk these
 * rows, so adding a key is adding a row (in the manner of pgbouncer's
 * CfKey). conf_read.c reads a file's settings into the rows; the checks
 * that need the whole file stay in conf.c.
 */
#ifndef SAGAD_CONF_TABLE_H
#define SAGAD_CONF_TABLE_H

#include <stddef.h>

#include "conf.h"

enum conf_kind {
	CONF_STR,		/* char *, owned */
	CONF_DUR,		/* double: seconds, or another plain number (a ratio) */
	CONF_SIZE,		/* int64_t, bytes */
	CONF_INT,		/* int */
	CONF_BOOL,		/* int */
	CONF_MODE,		/* int, octal string such as "0660" */
	CONF_BINDING,		/* struct conf_binding, "exchange:routing-key" */
	CONF_BINDINGS,		/* struct conf_binding[], "exchange:binding-key" list */
	CONF_GROUP,		/* { ... }: the rows in sub, same base */
	CONF_LIST,		/* ( { ... }, ... ): elements of elem bytes, rows in sub */
	CONF_KVS,		/* struct conf_kv[]: every key no row names (plugins') */
	CONF_JSON		/* char *, owned: any setting as its JSON text (templates) */
};

/* A restart-only row: a reload keeps the running value and names the
 * row when the file changed it. */
#define CONF_RESTART	0x1
/* Not a key of the file: set by conf.c's checks (parsed from the broker
 * url, read from a file, generated), but owned and reloaded as a row. */
#define CONF_DERIVED	0x2
/* A restart-only derived row that follows a key which is named instead. */
#define CONF_QUIET	0x4
/* A derived row that is part of a saga definition's JSON all the same
 * (conf_table_to_json): what sagad built the definition from. */
#define CONF_KEPT	0x8

struct conf_key {
	const char *name;
	enum conf_kind kind;
	size_t off;		/* in the struct the rows describe */
	unsigned flags;
	const char *def;	/* default as written in the file; NULL: none */
	double min, max;	/* numbers; max 0: no upper bound */
	const struct conf_key *sub;	/* group and list: their rows */
	size_t elem;		/* list: size of an element */
	size_t cnt;		/* list, bindings, kvs: offset of the size_t count */
};

/* The rows of struct sagad_conf, ended by a row without a name. */
const struct conf_key *conf_table_root(void);
/* A row by dotted path ("api.listen", "subscriptions"); NULL if none. */
const struct conf_key *conf_table_find(const struct conf_key *rows, const char *path);

/* Where a row's value lives in the struct at base. */
static inline void *
conf_table_at(const void *base, size_t off)
{
	return (char *)base + off;
}

/* Every row's default (nested groups too; list elements get theirs when
 * they are read). */
void conf_table_defaults(const struct conf_key *rows, void *base);
/* Free what the rows own (not base itself). */
void conf_table_free(const struct conf_key *rows, void *base);
/* 1 when every row has the same value in a and b. */
int conf_table_equal(const struct conf_key *rows, const void *a, const void *b);
/*
 * A reload: every restart-only row of nb takes ob's value and ob takes
 * nb's, so that freeing ob frees the unused new values while what the
 * running modules point into keeps its address. The restart-only rows
 * that differed are appended to changed, space separated; returns their
 * number.
 */
int conf_table_keep(const struct conf_key *rows, void *nb, void *ob, const char *prefix,
    char *changed, size_t len);

/* The rows' values as a JSON object (derived rows left out, unset
 * strings and bindings absent), and back: a struct given its defaults
 * first takes every value the object has. -1: a value of the wrong type
 * (the struct is then freed by conf_table_free all the same). */
struct json_t;
struct json_t *conf_table_to_json(const struct conf_key *rows, const void *base);
int conf_table_from_json(const struct conf_key *rows, const struct json_t *j, void *base);
/* The rows of one saga definition (a struct conf_saga). */
const struct conf_key *conf_table_saga_rows(void);
/* A saga step's rows (conf_tx.c builds steps). */
const struct conf_key *conf_table_step_rows(void);

#endif
