/* Unit tests for src/amqpd_reply.c: a reply published through the front
 * door to a saga command's reply_to gets the saga's headers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "amqpd_int.h"
#include "props.h"
#include "xmalloc.h"

/* msg_free frees the struct too: these live on the stack. */
static void
msg_clear(struct msg *m)
{
	free(m->message_id);
	free(m->exchange);
	free(m->routing_key);
	props_free(&m->props);
}

static void
msg_set(struct msg *m, const char *id, const char *exchange, const char *key,
    const char *reply_to, const char *cid)
{
	memset(m, 0, sizeof *m);
	m->message_id = xstrdup(id);
	m->exchange = xstrdup(exchange);
	m->routing_key = xstrdup(key);
	m->props.reply_to = reply_to ? xstrdup(reply_to) : NULL;
	m->props.correlation_id = cid ? xstrdup(cid) : NULL;
}

/* A command of saga s1's step "reserve" (or another step). */
static void
command(struct amqpd *a, const char *id, const char *step)
{
	struct msg m;

	msg_set(&m, id, "commands", "stock.reserve", "orders.sagas", "s1");
	props_set_header(&m.props, "x-sagad-saga", "basket");
	props_set_header(&m.props, "x-sagad-step", step);
	props_set_header(&m.props, "x-sagad-kind", "command");
	amqpd_reply_expect(a, &m);
	msg_clear(&m);
}

static const char *
hdr(const struct msg *m, const char *k)
{
	return props_get_header(&m->props, k);
}

static void
test_reply_decorated_once(void **state)
{
	struct amqpd a;
	struct msg r, again, event;

	(void)state;
	memset(&a, 0, sizeof a);
	command(&a, "cmd-1", "reserve");
	/* an event without a reply_to is not remembered */
	msg_set(&event, "e-1", "events", "x", NULL, "s1");
	props_set_header(&event.props, "x-sagad-saga", "basket");
	amqpd_reply_expect(&a, &event);
	assert_int_equal(a.nreplies, 1);

	msg_set(&r, "rep-1", "", "orders.sagas", NULL, "s1");
	amqpd_reply_decorate(&a, &r);
	assert_string_equal(hdr(&r, "x-sagad-saga"), "basket");
	assert_string_equal(hdr(&r, "x-sagad-step"), "reserve");
	assert_string_equal(hdr(&r, "x-sagad-kind"), "command");
	assert_string_equal(hdr(&r, "x-sagad-outcome"), "success");
	assert_string_equal(hdr(&r, "x-sagad-reply-to-message-id"), "cmd-1");
	assert_int_equal(a.nreplies, 0);
	/* once: a second publish is left as it is */
	msg_set(&again, "rep-2", "", "orders.sagas", NULL, "s1");
	amqpd_reply_decorate(&a, &again);
	assert_null(hdr(&again, "x-sagad-saga"));
	msg_clear(&r);
	msg_clear(&again);
	msg_clear(&event);
	amqpd_reply_free_all(&a);
}

static void
test_refusal_and_mismatch(void **state)
{
	struct amqpd a;
	struct msg other_cid, other_exchange, refusal;

	(void)state;
	memset(&a, 0, sizeof a);
	command(&a, "cmd-1", "reserve");
	msg_set(&other_cid, "x", "", "orders.sagas", NULL, "s2");
	amqpd_reply_decorate(&a, &other_cid);
	assert_null(hdr(&other_cid, "x-sagad-saga"));
	msg_set(&other_exchange, "y", "events", "orders.sagas", NULL, "s1");
	amqpd_reply_decorate(&a, &other_exchange);
	assert_null(hdr(&other_exchange, "x-sagad-saga"));
	/* the service's own outcome is kept: a refusal */
	msg_set(&refusal, "z", "", "orders.sagas", NULL, "s1");
	props_set_header(&refusal.props, "x-sagad-outcome", "failure");
	amqpd_reply_decorate(&a, &refusal);
	assert_string_equal(hdr(&refusal, "x-sagad-outcome"), "failure");
	assert_string_equal(hdr(&refusal, "x-sagad-step"), "reserve");
	msg_clear(&other_cid);
	msg_clear(&other_exchange);
	msg_clear(&refusal);
	amqpd_reply_free_all(&a);
}

/* Two steps of a parallel group outstanding: the reply must name its
 * step; then it answers that one only. */
static void
test_ambiguous_needs_step(void **state)
{
	struct amqpd a;
	struct msg vague, named;

	(void)state;
	memset(&a, 0, sizeof a);
	command(&a, "cmd-1", "reserve");
	command(&a, "cmd-2", "charge");
	msg_set(&vague, "v", "", "orders.sagas", NULL, "s1");
	amqpd_reply_decorate(&a, &vague);
	assert_null(hdr(&vague, "x-sagad-outcome"));
	assert_int_equal(a.nreplies, 2);
	msg_set(&named, "n", "", "orders.sagas", NULL, "s1");
	props_set_header(&named.props, "x-sagad-step", "charge");
	amqpd_reply_decorate(&a, &named);
	assert_string_equal(hdr(&named, "x-sagad-reply-to-message-id"), "cmd-2");
	assert_int_equal(a.nreplies, 1);
	msg_clear(&vague);
	msg_clear(&named);
	amqpd_reply_free_all(&a);
}

/* A service that never replies does not grow sagad: the oldest goes. */
static void
test_bounded(void **state)
{
	struct amqpd a;
	char id[32];
	int i;

	(void)state;
	memset(&a, 0, sizeof a);
	for (i = 0; i < 5000; i++) {
		snprintf(id, sizeof id, "cmd-%d", i);
		command(&a, id, "reserve");
	}
	assert_int_equal(a.nreplies, 4096);
	assert_string_equal(a.replies[0].message_id, "cmd-904");
	amqpd_reply_free_all(&a);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_reply_decorated_once),
		cmocka_unit_test(test_refusal_and_mismatch),
		cmocka_unit_test(test_ambiguous_needs_step),
		cmocka_unit_test(test_bounded),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
