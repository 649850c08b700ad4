#!/usr/bin/env python3
"""The outbox's retries: a message the broker returns as unroutable waits
in the store with a backoff and goes out once a queue is bound, while
others go out at once; a message for a configured exchange that someone
deleted on the broker (which then closes the channel) is held back while
messages for other exchanges go on, and goes out once the exchange is
there again and bound; a waiting retry survives a restart."""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402


def arrived(tool, url, queue, want, deadline):
    """Consume from queue until every message id of want arrived or the
    deadline passed; the ids seen."""
    seen = []
    end = time.time() + deadline
    while time.time() < end and not set(want) <= set(seen):
        seen += [m.get('message_id') for m in tool.consume(url, queue, 100, timeout=1)]
    return seen


def main(wd):
    broker = h.Broker(wd)
    broker.start()
    tool = h.AmqpTool()
    tool.declare_queue(broker.url, 'flow', [('events', 'flow.#')])

    d = h.Sagad(wd, broker.url, name='orders',
                exchanges=(('events', 'topic'), ('later', 'topic')),
                conf_extra='outbox = { retry_initial = 0.2; retry_max = 1; };')
    d.start()

    # -- unroutable: returned, retried with a backoff, out once bound
    st, doc, _ = d.publish('events', 'nobody.home', b'lost?', {'Message-Id': 'u-1'})
    h.check(st == 202, 'POST to a key no queue is bound to: 202', (st, doc))
    h.wait_until(lambda: (d.metric('sagad_unroutable_total') or 0) >= 2, 20,
                 'the broker to return it twice (retried)')
    h.check(d.metric('sagad_outbox_pending') == 1, 'it waits in the outbox',
            d.metric('sagad_outbox_pending'))
    # others are not held back by it
    for i in range(20):
        st, doc, _ = d.publish('events', 'flow.a', b'x', {'Message-Id': 'f-%d' % i})
        if st != 202:
            raise AssertionError('flow.a #%d: %d %r' % (i, st, doc))
    seen = arrived(tool, broker.url, 'flow', ['f-%d' % i for i in range(20)], 20)
    h.check(seen == ['f-%d' % i for i in range(20)],
            'meanwhile 20 other messages went out at once, in order', seen)
    tool.declare_queue(broker.url, 'home', [('events', 'nobody.home')])
    seen = arrived(tool, broker.url, 'home', ['u-1'], 20)
    h.check(seen == ['u-1'], 'bound: the returned message arrived, once', seen)
    h.wait_until(lambda: d.metric('sagad_outbox_pending') == 0, 20, 'the outbox to empty')

    # -- an exchange deleted on the broker: held back, the others flow
    tool.delete_exchange(broker.url, 'later')
    st, doc, _ = d.publish('later', 'x.y', b'early', {'Message-Id': 'x-1'})
    h.check(st == 202, 'POST to an exchange deleted on the broker: 202', (st, doc))
    h.wait_until(lambda: 'no exchange' in d.log() or 'does not exist' in d.log(), 20,
                 'sagad to say the exchange is missing')
    for i in range(20, 40):
        st, doc, _ = d.publish('events', 'flow.b', b'x', {'Message-Id': 'f-%d' % i})
    seen = arrived(tool, broker.url, 'flow', ['f-%d' % i for i in range(20, 40)], 20)
    h.check(set(seen) >= {'f-%d' % i for i in range(20, 40)},
            'meanwhile the other exchange\'s 20 messages went out', seen)
    # The 20 arrived; their confirms may still be on the way.
    h.wait_until(lambda: d.metric('sagad_outbox_pending') == 1, 20,
                 'the held message alone waits in the outbox')

    # -- restart while it waits: the retry is in the store, not in memory
    d.stop()
    d.start()
    h.check(d.metric('sagad_outbox_pending') == 1, 'after a restart it still waits',
            d.metric('sagad_outbox_pending'))
    tool.declare_queue(broker.url, 'later.q', [('later', '#')])
    seen = arrived(tool, broker.url, 'later.q', ['x-1'], 30)
    h.check(seen == ['x-1'], 'the exchange exists: the held message arrived, once', seen)
    h.wait_until(lambda: d.metric('sagad_outbox_pending') == 0, 20, 'the outbox to empty')
    rc = d.stop()
    h.check(rc == 0, 'SIGTERM: exit 0', rc)



h.run_test(main)
