#!/usr/bin/env python3
"""OpenTelemetry export (sagad(8), TRACING): a collector in this test, an
OTLP/HTTP receiver that decodes what it gets per the OTLP specification
(t/lib/otlp.py), and three sagad processes running an orchestrated saga:

- every span of the saga is in the publisher's trace, and the spans form
  one tree: create (orders' publish API) -> receive (orders' saga queue)
  -> saga -> step -> receive (participant) -> deliver (the HTTP request,
  whose traceparent names it) ...; each process names itself
  (service.name), attributes follow the messaging conventions;
- a trace published with the sampled flag off exports nothing, and the
  flag is passed on as it came; with tracing.sampling = 0 the traces
  sagad starts are not sampled; a sampled context is followed whatever
  the sampling (the participant "stock" has 0);
- a collector that refuses or is gone: spans counted as failed, no
  message held up or lost.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402
from otlp import Collector  # noqa: E402

TP = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'
TID = TP[3:35]
CLIENT_SPAN = TP[36:52]


SAGA = '''
sagas = (
  { name = "order"; start = "events:order.created"; timeout = 120;
    steps = (
      { name = "reserve"; command = "commands:stock.reserve"; compensate = "commands:stock.release"; },
      { name = "pay"; command = "commands:payment.authorize"; }
    );
    completed = "events:order.done"; compensated = "events:order.undone"; }
);
'''


def tracing(col, sampling=1):
    return '\ntracing = { endpoint = "http://127.0.0.1:%d/v1/traces"; interval = 0.2; ' \
        'sampling = %s; };\n' % (col.port, sampling)


def sub(url, key):
    return '\nsubscriptions = ( { name = "commands"; bind = [ "commands:%s.#" ]; ' \
        'deliver = "%s"; } );\n' % (key, url)


def tree(col, svc_stock, svc_pay):
    h.log('== one saga, one trace, one tree')
    spans = col.of_trace(TID)
    by_id = {s['spanId']: s for s in spans}
    names = sorted('%s:%s' % (s['service'], s['name']) for s in spans)
    h.log('spans: %s' % names)

    def one(service, name, parent=None):
        got = [s for s in spans if s['service'] == service and s['name'] == name and
               (parent is None or s['parentSpanId'] == parent['spanId'])]
        h.check(len(got) == 1, '%s: one span %r%s' % (service, name,
                ' under %r' % parent['name'] if parent else ''), detail=names)
        return got[0]

    create = one('orders', 'create events')
    h.check(create['parentSpanId'] == CLIENT_SPAN and create['kind'] == 4 and
            create['attrs'].get('messaging.system') == 'rabbitmq' and
            create['attrs'].get('messaging.destination.name') == 'events' and
            create['attrs'].get('messaging.rabbitmq.destination.routing_key') == 'order.created',
            'the publish API\'s span: a producer span under the client\'s, with the '
            'messaging attributes', detail=create)
    one('orders', 'publish', create)
    recv = one('orders', 'receive orders.sagas', create)
    saga = one('orders', 'saga order', recv)
    h.check(saga['attrs'].get('sagad.state') == 'completed' and 'status' not in saga,
            'the saga\'s span: completed', detail=saga)
    for step, svc, part, queue in (('reserve', svc_stock, 'stock', 'stock.commands'),
                                   ('pay', svc_pay, 'payment', 'payment.commands')):
        st = one('orders', 'step ' + step, saga)
        one('orders', 'publish', st)
        r = one(part, 'receive ' + queue, st)
        d = one(part, 'deliver commands', r)
        h.check(d['kind'] == 3 and d['attrs'].get('http.response.status_code') == '200',
                '%s: the delivery is a client span with the service\'s status' % part, detail=d)
        got = [c['headers'].get('traceparent') for c in svc.snapshot()]
        h.check(got == ['00-%s-%s-01' % (TID, d['spanId'])],
                '%s: the service was told that span is its parent' % part, detail=got)
        one(part, 'publish', r)
        reply = one('orders', 'receive orders.sagas', r)
        h.check(st['start'] <= reply['start'] and st['end'] >= reply['start'] - 0.001,
                'step %s spans its command and its reply' % step, detail=(st, reply))
    out = one('orders', 'publish', saga)      # the outcome event
    h.check('status' not in out, 'its publish confirmed', detail=out)
    orphans = [s['name'] for s in spans if s['parentSpanId'] not in by_id and s is not create]
    h.check(not orphans, 'every span but the first has its parent in the trace', detail=orphans)
    h.check(all(s['end'] >= s['start'] > time.time() - 600 for s in spans), 'times are sane')


def unsampled(col, orders, svc_stock):
    h.log('== not sampled: nothing exported, the flag passed on')
    before = len(col.spans)
    tp = '00-1af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00'
    orders.publish('events', 'order.created', '{}', {'Correlation-Id': 'o-2', 'traceparent': tp})
    h.wait_until(lambda: len(svc_stock.snapshot()) == 2, 30, 'the second saga\'s command')
    h.check(svc_stock.snapshot()[1]['headers'].get('traceparent') == tp,
            'the service gets the context as published (not sampled: sagad adds no span)',
            detail=svc_stock.snapshot()[1]['headers'])
    time.sleep(1.5)
    h.check(not col.of_trace(tp[3:35]) and len(col.spans) == before, 'no span exported')


def sampling_zero(col, broker, stock):
    h.log('== tracing.sampling = 0: the traces sagad starts are not sampled')
    before = len(col.spans)
    st, _, _ = stock.publish('events', 'noise.s0', 'x', {'Message-Id': 's0'})
    h.check(st == 202, 'a publish without a context accepted')
    got = [m for m in h.AmqpTool().consume(broker.url, 'outcomes', 10, timeout=3)
           if m.get('message_id') == 's0']
    tp = (got[0].get('headers') or {}).get('traceparent', '') if got else ''
    h.check(tp.endswith('-00') and h.TRACEPARENT_NEW.match(tp[:-2] + '01'),
            'its new trace has the sampled flag off (%s)' % tp, detail=got)
    time.sleep(1)
    h.check(not col.of_trace(tp[3:35]) and len(col.spans) == before, 'and no span')


def awkward_names(col, orders):
    h.log('== attribute values that JSON must escape')
    tp = '00-2af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'
    key = 'noise.q"uote\\back\u00e9\t'
    st, _, _ = orders.publish('events', key.replace('\t', ''), 'x', {'traceparent': tp})
    h.wait_until(lambda: col.of_trace(tp[3:35]), 10, 'its span')
    got = [s['attrs'].get('messaging.rabbitmq.destination.routing_key')
           for s in col.of_trace(tp[3:35]) if s['name'] == 'create events']
    h.check(st == 202 and got == [key.replace('\t', '')],
            'a routing key with a quote, a backslash and UTF-8 comes back as it was', detail=got)


def collector_down(col, orders):
    h.log('== a collector that refuses')
    col.status = 503
    st = [orders.publish('events', 'noise.%d' % i, 'x', {'traceparent': TP})[0] for i in range(20)]
    h.wait_until(lambda: orders.metrics().get('sagad_trace_spans_total{result="failed"}', 0) > 0,
                 20, 'spans counted as failed')
    h.check(st == [202] * 20, 'every message accepted meanwhile', detail=st)
    h.wait_until(lambda: orders.metrics().get('sagad_outbox_pending') == 0, 20,
                 'every message published meanwhile')
    col.status = 200


def main(wd):
    col = Collector()
    broker = h.Broker(wd)
    broker.start()
    # the outcome event is routed (unroutable, it would be published again)
    h.AmqpTool().declare_queue(broker.url, 'outcomes', [('events', 'order.done'),
                                                         ('events', 'noise.#')])
    svc_stock, svc_pay = h.Service(), h.Service()
    orders = h.Sagad(wd, broker.url, name='orders', conf_extra=SAGA + tracing(col))
    stock = h.Sagad(wd, broker.url, name='stock', conf_extra=sub(svc_stock.url, 'stock') +
                    tracing(col, 0))
    pay = h.Sagad(wd, broker.url, name='payment', conf_extra=sub(svc_pay.url, 'payment') +
                  tracing(col))
    for d in (orders, stock, pay):
        d.start()
    st, _, _ = orders.publish('events', 'order.created', '{}',
                              {'Correlation-Id': 'o-1', 'traceparent': TP})
    h.check(st == 202, 'the start event accepted')
    h.wait_until(lambda: any(s['name'] == 'saga order' for s in col.of_trace(TID)), 30,
                 'the saga\'s span exported')
    time.sleep(1)       # the last publish spans
    tree(col, svc_stock, svc_pay)
    unsampled(col, orders, svc_stock)
    sampling_zero(col, broker, stock)
    awkward_names(col, orders)
    collector_down(col, orders)
    for d in (pay, stock, orders):
        d.stop()
    col.stop()
    broker.stop()


if __name__ == '__main__':
    h.run_test(main)
