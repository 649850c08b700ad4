/*
 * What the pgsql and sqlite sources share: their SQL returns the body and
 * the headers hex-encoded, so that any byte survives the text protocol.
 */
#ifndef SAGAD_PLUGIN_CODEC_H
#define SAGAD_PLUGIN_CODEC_H

#include <stddef.h>

#include "sagad/plugin.h"
#include "xmalloc.h"

/* Decodes n hex digits at s into out (n/2 bytes); -1 if not hex. */
int codec_unhex(const char *s, size_t n, char *out);
/* "HEXNAME:HEXVALUE,..." -> NUL-terminated names and values, all in one
 * allocation (*mem); -1 on a malformed string or a NUL inside. */
int codec_headers(const char *s, char ***names, char ***values, size_t *n, char **mem);

/*
 * Hand one decoded row to sagad. why: NULL, or why the row could not be
 * decoded. Returns 1 when sagad stored it (or already had it: a duplicate),
 * so the row may be deleted; 0 when it cannot be published (why, or sagad
 * finds it invalid): logged, counted, to be left in the table; -1 when
 * sagad's store refused it for now: try again later.
 */
int codec_publish_row(const struct sagad_host_api *api, struct sagad_host *h,
    const struct sagad_message *m, long long seq, const char *table, const char *why);

#endif
