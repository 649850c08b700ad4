#!/usr/bin/env python3
"""W3C Trace Context on every hop (sagad(8), TRACE CONTEXT), against pika,
a RabbitMQ client that nobody here wrote:

- a publish's traceparent and tracestate reach a pika consumer as AMQP
  headers, as sent; a publish without one gets a new trace; a malformed
  one, or a tracestate alone, is refused (400) and nothing is stored;
- a message pika publishes reaches the service with its traceparent and
  tracestate as HTTP headers of those names, the same on every attempt;
  without one (or with a malformed one) it gets a new trace, the same on
  every attempt; a dead letter's trace id is in `sagactl dlq list`;
- a waiting message's trace id is in `sagactl outbox` (broker stopped);
- a saga is one trace: the start event's context on every command (at the
  participant's service and at pika), on the compensation sent when a
  step times out (the instance read back from the store by a timer) and
  on the outcome event; `sagactl saga ID` shows the trace id.

Those two sagads start new traces (tracing.new_traces = "always"). A third
with the default settings (no endpoint: "auto" starts none) publishes a
message without a context with no traceparent and keeps one that came,
delivers a consumed message without one as it came, and runs a saga
whose start event has none (no trace id in sagactl).
"""

import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402

TP = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'
TID = TP[3:35]
VALID = h.TRACEPARENT_NEW

SAGA = '''
sagas = (
  { name = "order"; start = "events:order.created"; timeout = 120;
    steps = (
      { name = "reserve"; command = "commands:stock.reserve"; compensate = "commands:stock.release";
        timeout = 30; },
      { name = "pay"; command = "commands:payment.authorize"; compensate = "commands:payment.cancel";
        timeout = 1; attempts = 1; }
    );
    completed = "events:order.done"; compensated = "events:order.undone";
    retry_initial = 0.2; retry_max = 0.5; }
);
'''

ALWAYS = '''
tracing = { new_traces = "always"; };
'''

PLAIN = '''
subscriptions = (
  { name = "plain"; bind = [ "events:bare.in.#" ]; deliver = "%(url)s"; }
);
sagas = (
  { name = "bare"; start = "events:bare.order"; timeout = 120;
    steps = ( { name = "only"; command = "commands:bare.do"; timeout = 1; attempts = 1; } );
    completed = "events:bare.done"; compensated = "events:bare.undone";
    retry_initial = 0.2; retry_max = 0.5; }
);
'''

SUBS = '''
subscriptions = (
  { name = "commands"; bind = [ "commands:stock.#" ]; deliver = "%(url)s"; },
  { name = "inbox"; bind = [ "events:in.#" ]; deliver = "%(url)s";
    max_attempts = 3; retry_initial = 0.05; retry_max = 0.2; }
);
'''


def answer(call):
    key = call['headers'].get('sagad-routing-key', '')
    if key == 'in.dead':
        return 422
    if key.startswith('in.flaky') and call['headers'].get('sagad-attempt') == '1':
        return 503
    return 200


def calls_of(svc, mid):
    return [c['headers'] for c in svc.snapshot() if c['headers'].get('message-id') == mid]


def delivered(svc, mid, n=1, timeout=30):
    h.wait_until(lambda: len(calls_of(svc, mid)) >= n, timeout, '%s delivered %d time(s)' % (mid, n))
    return calls_of(svc, mid)


def publish_side(orders, pika):
    h.log('== publishing through sagad')
    pika.declare('watch', 'events:plain.#')
    st, _, _ = orders.publish('events', 'plain.a', 'a', {'Message-Id': 'p-a', 'traceparent': TP,
                                                       'TraceState': 'rojo=00f067aa0ba902b7'})
    st2, _, _ = orders.publish('events', 'plain.b', 'b', {'Message-Id': 'p-b'})
    h.check(st == 202 and st2 == 202, 'publishes accepted', detail=(st, st2))
    got = {m['message_id']: m['headers'] for m in pika.get('watch', 2, timeout=10)}
    h.check(got.get('p-a', {}).get('traceparent') == TP and
            got['p-a'].get('tracestate') == 'rojo=00f067aa0ba902b7',
            'pika sees the traceparent and tracestate as published', detail=got)
    tb = got.get('p-b', {}).get('traceparent', '')
    h.check(VALID.match(tb) and 'tracestate' not in got['p-b'],
            'a publish without a context: a new trace (%s)' % tb, detail=got)

    before = orders.metrics().get('sagad_accepted_total', 0)
    bad = [{'traceparent': TP[:-1]},
           {'traceparent': TP.replace('4bf9', '4BF9')},
           {'traceparent': '00-' + '0' * 32 + TP[35:]},
           {'Amqp-Header-traceparent': 'x'},
           {'tracestate': 'k=v'},
           {'traceparent': TP, 'tracestate': 'k=v\u00e9'}]
    for hdrs in bad:
        st, doc, _ = orders.publish('events', 'plain.bad', 'x', dict(hdrs, **{'Message-Id': 'bad'}))
        h.check(st == 400 and doc and doc.get('error') == 'bad-header',
                'refused with 400 bad-header: %s' % hdrs, detail=(st, doc))
    h.check(orders.metrics().get('sagad_accepted_total', 0) == before and
            not pika.get('watch', 1, timeout=1), 'nothing stored or published for them')


def consume_side(pika, svc, stock):
    h.log('== consuming: pika publishes, sagad delivers')
    pika.publish('events', 'in.flaky.a', 'x', 'c-a',
                 {'traceparent': TP, 'tracestate': 'congo=t61rcWkgMzE'})
    pika.publish('events', 'in.flaky.b', 'x', 'c-b')
    pika.publish('events', 'in.c', 'x', 'c-c', {'traceparent': 'garbage', 'tracestate': 'k=v'})
    a = delivered(svc, 'c-a', 2)
    h.check([c.get('traceparent') for c in a] == [TP, TP] and
            [c.get('tracestate') for c in a] == ['congo=t61rcWkgMzE'] * 2,
            'the service gets traceparent and tracestate as sent, on both attempts', detail=a)
    h.check(not any(k.startswith('amqp-header-trace') for c in a for k in c),
            'under their W3C names only (no Amqp-Header-traceparent)', detail=a)
    b = delivered(svc, 'c-b', 2)
    h.check(VALID.match(b[0].get('traceparent', '')) and
            b[0]['traceparent'] == b[1].get('traceparent'),
            'without a context: a new trace, the same on both attempts', detail=b)
    c = delivered(svc, 'c-c')
    h.check(VALID.match(c[0].get('traceparent', '')) and 'tracestate' not in c[0],
            'a malformed traceparent: a new trace, its tracestate dropped', detail=c)
    pika.publish('events', 'in.dead', 'x', 'c-dead', {'traceparent': TP})
    delivered(svc, 'c-dead')
    h.wait_until(lambda: TID in h.sagactl(stock, 'dlq', 'list', 'inbox')[1], 20,
                 'the dead letter with its trace id in sagactl dlq list')


def outbox_listing(broker, orders):
    h.log('== a waiting message in sagactl outbox')
    broker.stop()
    h.wait_until(lambda: orders.metrics().get('sagad_broker_connected') == 0, 30, 'sagad sees the broker down')
    st, _, _ = orders.publish('events', 'plain.wait', 'w', {'Message-Id': 'p-wait', 'traceparent': TP})
    out = h.sagactl(orders, 'outbox')[1]
    h.check(st == 202 and re.search(r'p-wait .* %s' % TID, out),
            'sagactl outbox shows its trace id', detail=out)
    js = h.sagactl(orders, 'outbox', json_out=True)[1]
    h.check([m.get('trace_id') for m in js['messages']] == [TID], 'and so does --json', detail=js)
    broker.start()
    h.wait_until(lambda: orders.metrics().get('sagad_outbox_pending') == 0, 60, 'the outbox empties')


def saga_side(orders, pika, svc):
    h.log('== a saga is one trace')
    pika.declare('observer', 'commands:payment.#', 'events:order.done', 'events:order.undone')
    st, _, _ = orders.publish('events', 'order.created', '{}', {
        'Message-Id': 'start-1', 'Correlation-Id': 'o-1', 'traceparent': TP, 'tracestate': 'k=v'})
    h.check(st == 202, 'the start event accepted')
    got = pika.get('observer', 1, timeout=20)
    h.check(len(got) == 1 and got[0]['routing_key'] == 'payment.authorize' and
            got[0]['headers'].get('traceparent') == TP and got[0]['headers'].get('tracestate') == 'k=v',
            'the second command carries the start event\'s context', detail=got)
    reserve = [c for c in svc.snapshot() if c['headers'].get('sagad-routing-key') == 'stock.reserve']
    h.check(len(reserve) == 1 and reserve[0]['headers'].get('traceparent') == TP and
            reserve[0]['headers'].get('tracestate') == 'k=v',
            'so does the first, at the participant\'s service', detail=[c['headers'] for c in reserve])
    # nobody answers payment.authorize: its timeout compensates reserve
    h.wait_until(lambda: any(c['headers'].get('sagad-routing-key') == 'stock.release'
                             for c in svc.snapshot()), 30, 'the compensation delivered')
    rel = [c['headers'] for c in svc.snapshot() if c['headers'].get('sagad-routing-key') == 'stock.release']
    h.check(rel[0].get('traceparent') == TP and rel[0].get('sagad-kind') == 'compensation',
            'the compensation (sent by a timer, the saga read from the store) too', detail=rel)
    got = pika.get('observer', 1, timeout=20)
    h.check(len(got) == 1 and got[0]['routing_key'] == 'order.undone' and
            got[0]['headers'].get('traceparent') == TP, 'and the outcome event', detail=got)
    js = h.sagactl(orders, 'saga', 'o-1', json_out=True)[1]
    inst = js['instances'][0]
    h.check(inst['state'] == 'compensated' and inst.get('trace_id') == TID,
            'the admin API names the saga\'s trace', detail=inst)
    out = h.sagactl(orders, 'saga', 'o-1')[1]
    h.check(('trace   %s' % TID) in out, 'sagactl saga shows it', detail=out)


def default_settings(wd, broker, pika, svc):
    h.log('== default settings (no endpoint): no new traces, contexts kept')
    plain = h.Sagad(wd, broker.url, name='plain', conf_extra=PLAIN % {'url': svc.url})
    plain.start()
    pika.declare('bare', 'events:bare.out.#', 'commands:bare.#', 'events:bare.undone',
                 'events:bare.done')
    plain.publish('events', 'bare.out.none', 'a', {'Message-Id': 'd-none'})
    plain.publish('events', 'bare.out.tp', 'b', {'Message-Id': 'd-tp', 'traceparent': TP,
                                                 'tracestate': 'k=v'})
    got = {m['message_id']: m['headers'] or {} for m in pika.get('bare', 2, timeout=20)}
    h.check('traceparent' not in got.get('d-none', {'traceparent': '?'}),
            'a publish without a context goes out without a traceparent', detail=got)
    h.check(got.get('d-tp', {}).get('traceparent') == TP and got['d-tp'].get('tracestate') == 'k=v',
            'one with a context keeps it', detail=got)
    pika.publish('events', 'bare.in.a', 'x', 'd-in-none')
    pika.publish('events', 'bare.in.b', 'x', 'd-in-tp', {'traceparent': TP})
    a, b = delivered(svc, 'd-in-none'), delivered(svc, 'd-in-tp')
    h.check('traceparent' not in a[0] and b[0].get('traceparent') == TP,
            'consumed: none delivered without one, one as it came', detail=(a, b))
    st, _, _ = plain.publish('events', 'bare.order', '{}', {'Message-Id': 'd-start',
                                                            'Correlation-Id': 'b-1'})
    got = pika.get('bare', 2, timeout=30)    # the command, then the outcome (step timed out)
    h.check(st == 202 and len(got) == 2 and got[0]['routing_key'] == 'bare.do' and
            not any('traceparent' in (m['headers'] or {}) for m in got),
            'a saga without a context: its command and outcome carry none', detail=got)
    js = h.sagactl(plain, 'saga', 'b-1', json_out=True)[1]
    inst = js['instances'][0]
    h.check(inst['state'] in ('compensated', 'failed') and 'trace_id' not in inst,
            'it ends, and shows no trace id', detail=inst)
    out = h.sagactl(plain, 'saga', 'b-1')[1]
    h.check('trace ' not in out, 'nor does sagactl saga', detail=out)
    plain.stop()


def main(wd):
    broker = h.Broker(wd)
    broker.start()
    pika = h.Pika(broker.url)
    svc = h.Service(answer)
    orders = h.Sagad(wd, broker.url, name='orders', conf_extra=SAGA + ALWAYS)
    stock = h.Sagad(wd, broker.url, name='stock', conf_extra=SUBS % {'url': svc.url} + ALWAYS)
    orders.start()
    stock.start()
    publish_side(orders, pika)
    consume_side(pika, svc, stock)
    saga_side(orders, pika, svc)
    outbox_listing(broker, orders)
    default_settings(wd, broker, pika, svc)
    stock.stop()
    orders.stop()
    svc.stop()
    broker.stop()


if __name__ == '__main__':
    h.run_test(main)
