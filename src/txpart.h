/*
 * A participant's view of two-phase commits (sagad(8) TWO-PHASE COMMIT):
 * what this sagad's service voted and was told, per transaction, kept in
 * sagad's store.
 *
 * PREPARE, COMMIT and ABORT (x-sagad-kind) come through a subscription
 * like any command. Before one is delivered, the record decides
 * (txpart_decide): a duplicate or a late message is answered from it and
 * never delivered twice; a PREPARE that comes after the ABORT is a no vote.
 * After the service answered, the record moves (txpart_next):
 *
 *   (none) --PREPARE 2xx--> prepared --COMMIT 2xx--> committed
 *      |                       |
 *      |                       +------ABORT 2xx---> aborted
 *      +--PREPARE 409/422--> refused
 *
 * A record prepared for longer than in_doubt_timeout is in doubt: sagad
 * asks the coordinator (a status message to the PREPARE's reply_to queue),
 * which answers by sending its decision again, or ABORT when it has no
 * record of the transaction (presumed abort), again every in_doubt_timeout
 * until the decision arrives.
 */
#ifndef SAGAD_TXPART_H
#define SAGAD_TXPART_H

#include <stddef.h>
#include <stdint.h>

struct sagad;
struct msg;
struct evbuffer;

enum txp_state {
	TXP_NONE,		/* no record */
	TXP_PREPARED,		/* voted yes, no decision yet */
	TXP_REFUSED,		/* voted no */
	TXP_COMMITTED,
	TXP_ABORTED,
	TXP_NSTATES
};

enum txp_kind {
	TXP_NOT_TX,		/* any other message */
	TXP_PREPARE,
	TXP_COMMIT,
	TXP_ABORT
};

enum txp_action {
	TXP_DELIVER,		/* to the service */
	TXP_ANSWER_YES,		/* from the record: yes, or done */
	TXP_ANSWER_NO,		/* from the record: no */
	TXP_CONFLICT		/* a decision against the record: answered no, logged */
};

extern const char *const txp_state_names[TXP_NSTATES];

/* Pure (unit-tested): the kind of a message, what to do with one given
 * the record's state, and the record's state after the service's answer
 * (success: 2xx). */
enum txp_kind txpart_kind(const struct msg *m);
enum txp_action txpart_decide(enum txp_state st, enum txp_kind k);
enum txp_state txpart_next(enum txp_state st, enum txp_kind k, int success);

struct txpart *txpart_new(struct sagad *d);
void txpart_free(struct txpart *tp);
/* Before delivering m (a PREPARE, COMMIT or ABORT) of subscription sub. */
enum txp_action txpart_before(struct txpart *tp, const char *sub, const struct msg *m);
/* The service answered m (success: 2xx); in the inbox's transaction. */
void txpart_after(struct txpart *tp, const char *sub, const struct msg *m, int success);
/* Operators. The records (a jansson array, newest first) of transaction
 * tx (NULL: all), in state (an enum txp_state; TXP_NONE: any). */
int txpart_state_from_name(const char *name);
void *txpart_list_json(struct txpart *tp, const char *tx, int state, size_t limit);
/* sagactl tx resolve: the records of tx that voted yes and have no
 * decision get it from an operator (the coordinator's log is gone): a
 * COMMIT or ABORT is put in the subscription's inbox by inject (which
 * takes the message: 0, or -1) and delivered like the coordinator's.
 * Returns how many, or -1. Loudly logged, and noted in the record. */
typedef int txpart_inject_fn(void *arg, const char *sub, struct msg *m);	/* m: malloc'd */
int txpart_resolve(struct txpart *tp, const char *tx, int commit, txpart_inject_fn *inject,
    void *arg);
/* A record's key, and where its coordinator is (malloc'd strings). */
struct txp_doubt_key {
	char *saga, *tx, *part, *reply_to;
};
void txpart_key_free(struct txp_doubt_key *key);

/* PostgreSQL prepared transactions (txpg.c): the gid of m's transaction
 * for this service, a record by its gid (key filled when found and not
 * NULL), and a status question for it at once. */
#define TXP_GID_MAX 200
void txpart_gid(const struct msg *m, const char *service, char out[TXP_GID_MAX]);
enum txp_state txpart_by_gid(struct txpart *tp, const char *gid, struct txp_doubt_key *key);
void txpart_ask_now(struct txpart *tp, const struct txp_doubt_key *key);
/* Prometheus: records by state, in doubt, the oldest in doubt's age. */
void txpart_metrics(struct txpart *tp, struct evbuffer *out);

#endif
