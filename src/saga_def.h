/*
 * A saga definition's identity across configuration changes: its version
 * is a hash of its canonical JSON (every key of sagad.conf(5)'s saga rows,
 * defaults included), so that an unchanged definition keeps its version
 * and any change makes a new one. The store keeps each version's JSON
 * (saga_store_def_put), and an instance started on a version finishes on
 * it: a definition read back from the store is a struct conf_saga of its
 * own (saga_def_parse).
 */
#ifndef SAGAD_SAGA_DEF_H
#define SAGAD_SAGA_DEF_H

struct conf_saga;

#define SAGA_DEF_VERSION_LEN 16

/* The canonical JSON text of a definition (malloc'd). */
char *saga_def_json(const struct conf_saga *sg);
/* Its version: 16 hex digits of a 64-bit FNV-1a hash of the text. */
void saga_def_version(const char *json, char out[SAGA_DEF_VERSION_LEN + 1]);
/* A definition from its JSON text (malloc'd, saga_def_free), or NULL. */
struct conf_saga *saga_def_parse(const char *json);
void saga_def_free(struct conf_saga *sg);

#endif
