/*
 * What the pgsql and sqlite sources share: their SQL returns the body and
 * the headers hex-encoded, so that any byte survives the text protocol.
 */
#ifndef SAGAD_PLUGIN_CODEC_H
#define SAGAD_PLUGIN_CODEC_H

#include <stddef.h>

/* Decodes n hex digits at s into out (n/2 bytes); -1 if not hex. */
int codec_unhex(const char *s, size_t n, char *out);
/* "HEXNAME:HEXVALUE,..." -> NUL-terminated names and values, all in one
 * allocation (*mem); -1 on a malformed string or a NUL inside. */
int codec_headers(const char *s, char ***names, char ***values, size_t *n, char **mem);

#endif
