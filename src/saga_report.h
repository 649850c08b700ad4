/* sagad -n: the store's unfinished saga instances by definition version. */
#ifndef SAGAD_SAGA_REPORT_H
#define SAGAD_SAGA_REPORT_H

#include <stdio.h>

struct sagad_conf;

/* Writes to out, one line per saga and per older version that has
 * unfinished instances; says so when the store cannot be read. */
void saga_report(const struct sagad_conf *c, FILE *out);

#endif
