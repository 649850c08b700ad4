/*
 * What the pgsql and sqlite sources share: their SQL returns the body and
 * the headers hex-encoded, so that any byte survives the text protocol;
 * a row becomes a message the same way; a batch keeps the same books
 * (rows taken, rows left in the table); and the two read their common
 * settings, back off and report the same way. Written once here, so that
 * the two sources cannot drift apart.
 */
#ifndef SAGAD_PLUGIN_CODEC_H
#define SAGAD_PLUGIN_CODEC_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "sagad/plugin.h"

struct event;
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

/* ---- a row -> a message ---- */

/* The decoded headers of one row (codec_row_headers), freed by
 * codec_hdrs_free. */
struct codec_hdrs {
	char **names, **values, *mem;
	size_t n;
};

/* Sets m's headers from the hex string hx (NULL: none); bad says the
 * headers column was not a JSON object. Returns why the row cannot be
 * published, or NULL. */
const char *codec_row_headers(struct sagad_message *m, struct codec_hdrs *hd, int bad,
    const char *hx);
void codec_hdrs_free(struct codec_hdrs *hd);

/* ---- the books of a batch ---- */

#define CODEC_MAX_SKIP 1000

struct codec_rows {
	int64_t *seqs;		/* taken: deleted once sagad's store has them */
	size_t nseqs, capseqs;
	int64_t skip[CODEC_MAX_SKIP];	/* cannot be published: left in the table */
	size_t nskip;
	time_t skip_since;
};

/* codec_publish_row, then the books: a taken row is remembered for the
 * delete, one left in the table is skipped by the next reads. */
int codec_take_row(const struct sagad_host_api *api, struct sagad_host *h,
    struct codec_rows *rs, const struct sagad_message *m, int64_t seq, const char *table,
    const char *why);
/* The skipped seqs as "1,2,3" into out (room for nskip * 21 + 1 bytes);
 * forgets them first once a minute has passed: an operator may have fixed
 * the rows. Returns the length written. */
size_t codec_skip_list(struct codec_rows *rs, char *out);

/* A batch handed to sagad's when_durable: the ticket names the source and
 * the batch, so that an answer for a batch since abandoned is recognised. */
void codec_when_durable(const struct sagad_host_api *api, struct sagad_host *h,
    sagad_durable_fn *fn, void *src, unsigned long batch);
/* The source and batch of a ticket (freed here). */
void *codec_ticket_take(void *cookie, unsigned long *batch);
/* sagad's store lost a handed-over batch: logged and counted. */
void codec_lost_batch(const struct sagad_host_api *api, struct sagad_host *h, size_t rows);

/* ---- settings, time, reports ---- */

double codec_now(void);		/* monotonic seconds */
void codec_timer(struct event *ev, double sec);
/* A one-line, log-safe version of a message (no newlines, tabs or '"'). */
void codec_clean(char *s);
/* The next wait of a doubling backoff: initial, then twice as long up to max. */
double codec_backoff(double *cur, double initial, double max);

/* Arms ev after *backoff (with jitter), then doubles *backoff up to max. */
void codec_reconnect_later(struct event *ev, double *backoff, double max);

/* A number setting of at least min: 0 (left as it was when unset) or -1
 * (err says why). */
int codec_conf_number(const struct sagad_host_api *api, struct sagad_host *h, const char *key,
    double *out, double min, char *err, size_t errlen);
/* The settings both sources have: poll_interval, batch (into *batch),
 * retry_initial, retry_max. */
int codec_conf_pacing(const struct sagad_host_api *api, struct sagad_host *h, double *poll,
    double *batch, double *retry_initial, double *retry_max, char *err, size_t errlen);
/* Checks batch (a whole number, 1 to 10000) and raises retry_max to
 * retry_initial. */
int codec_conf_batch(double batch, long *batch_size, double retry_initial, double *retry_max,
    char *err, size_t errlen);
/* The table setting, when given: a string, not empty (-1, err says so). */
int codec_conf_table(const struct sagad_host_api *api, struct sagad_host *h, const char **table,
    char *err, size_t errlen);
int codec_abi_check(const struct sagad_host_api *api, char *err, size_t errlen);

/* The source went down: counted, logged (an error the first time for a
 * reason, then at debug level), why kept in reason, not ready. key and
 * val name the source in the log line. */
void codec_report_down(const struct sagad_host_api *api, struct sagad_host *h, const char *why,
    char *reason, size_t reason_len, int *logged_down, const char *key, const char *val,
    double retry_in);
/* Up again: ready, reason cleared. */
void codec_report_up(const struct sagad_host_api *api, struct sagad_host *h, char *reason,
    int *logged_down);

#endif
