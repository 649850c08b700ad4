#include "acks.h"
#include "xmalloc.h"

#include <stdlib.h>
#include <string.h>

/* Remembered tags beyond a gap. A tag that never settles would make this
 * grow for ever; past the limit the channel falls back to one ack per tag
 * (correct, only slower) until the next connection. */
#define ACKS_AHEAD_MAX 65536

void
acks_reset(struct acks *a)
{
	a->upto = 0;
	a->nahead = 0;
	a->nbatch = 0;
	a->individual = 0;
}

void
acks_free(struct acks *a)
{
	free(a->ahead);
	free(a->batch);
	memset(a, 0, sizeof *a);
}

static void
acks_push(uint64_t **v, size_t *n, size_t *cap, uint64_t tag)
{
	*XPUSH(*v, *n, *cap) = tag;
}

void
acks_add(struct acks *a, uint64_t tag)
{
	acks_push(&a->batch, &a->nbatch, &a->capbatch, tag);
}

/* Drop remembered tags that upto has reached, and move upto over those
 * that now continue it. */
static void
acks_absorb(struct acks *a)
{
	size_t i = 0;

	while (i < a->nahead && a->ahead[i] <= a->upto + 1) {
		if (a->ahead[i] == a->upto + 1)
			a->upto++;
		i++;
	}
	if (i) {
		memmove(a->ahead, a->ahead + i, (a->nahead - i) * sizeof *a->ahead);
		a->nahead -= i;
	}
}

static void
acks_remember(struct acks *a, uint64_t tag)
{
	size_t i;

	if (a->individual || tag <= a->upto)
		return;
	if (a->nahead >= ACKS_AHEAD_MAX) {
		a->individual = 1;
		a->nahead = 0;
		return;
	}
	acks_push(&a->ahead, &a->nahead, &a->capahead, tag);
	/* Insertion from the back: tags mostly arrive in order. */
	for (i = a->nahead - 1; i > 0 && a->ahead[i - 1] > tag; i--)
		a->ahead[i] = a->ahead[i - 1];
	a->ahead[i] = tag;
	acks_absorb(a);
}

void
acks_settled(struct acks *a, uint64_t tag)
{
	acks_remember(a, tag);
}

static int
acks_cmp(const void *x, const void *y)
{
	uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;

	return a < b ? -1 : a > b;
}

int
acks_flush(struct acks *a, acks_send_fn *send, void *arg)
{
	size_t i = 0, j;
	uint64_t last = 0;	/* highest tag of this batch in the run */
	int frames = 0;

	if (!a->nbatch)
		return 0;
	qsort(a->batch, a->nbatch, sizeof *a->batch, acks_cmp);
	if (!a->individual) {
		/* Extend the run over this batch and the remembered tags. */
		for (;;) {
			if (i < a->nbatch && a->batch[i] == a->upto + 1) {
				last = a->batch[i++];
				a->upto++;
			} else if (a->nahead && a->ahead[0] == a->upto + 1) {
				acks_absorb(a);
			} else
				break;
		}
		if (last) {
			if (send(arg, last, 1) < 0)
				return -1;
			frames++;
		}
	}
	for (j = i; j < a->nbatch; j++) {
		if (send(arg, a->batch[j], 0) < 0)
			return -1;
		frames++;
		acks_remember(a, a->batch[j]);
	}
	a->nbatch = 0;
	return frames;
}
