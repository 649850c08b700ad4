#ifndef SAGAD_ACKS_H
#define SAGAD_ACKS_H

#include <stddef.h>
#include <stdint.h>

/*
 * Settling consumed deliveries of one channel with as few basic.ack frames
 * as possible. sagad acks a message only once its inbox record is durable;
 * one group commit makes a run of consecutive deliveries durable at once,
 * and one basic.ack with multiple=true settles the run. A tag still waiting
 * for its commit (or given back) breaks the run: what lies beyond it is
 * acked one by one, and remembered, so that a later run can pass over it.
 *
 * RabbitMQ closes the channel on an ack whose tag is not outstanding, even
 * with multiple=true, so a multiple ack always names a tag of this batch.
 */
struct acks {
	uint64_t upto;		/* every tag <= upto is settled and told to the broker */
	uint64_t *ahead;	/* settled tags above upto, told one by one; sorted */
	size_t nahead, capahead;
	uint64_t *batch;	/* acks asked for, not sent yet */
	size_t nbatch, capbatch;
	int individual;		/* tracking given up until the next reset: one ack per tag */
};

/* Sends one basic.ack; returns 0 or -1 (the connection failed). */
typedef int acks_send_fn(void *arg, uint64_t tag, int multiple);

/* A new channel: delivery tags start again at 1. */
void acks_reset(struct acks *a);
void acks_free(struct acks *a);
/* Queue an ack for tag (sent by acks_flush). */
void acks_add(struct acks *a, uint64_t tag);
/* tag was settled some other way (basic.reject sent): runs may pass it. */
void acks_settled(struct acks *a, uint64_t tag);
/* Send the queued acks; returns the number of frames sent, or -1. */
int acks_flush(struct acks *a, acks_send_fn *send, void *arg);

#endif
