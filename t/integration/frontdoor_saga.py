#!/usr/bin/env python3
"""A choreographed saga whose services speak only AMQP (issue 17): the
orders service publishes order.approved through its sagad's front door
(pika, confirms); payments and shipping consume through their sidecar's
front door (subscriptions with deliver = "amqp") and publish their events
through it, passing the correlation id on. The saga engine of the orders
sagad correlates it all as it does HTTP traffic: a small order completes
(order.fulfilled), a large one fails at shipping and is compensated by the
refund event that payments answers; an order refused by payments ends
compensated with nothing to undo. Start events published twice (same
message id) start one saga and reach payments once."""

import json
import os
import subprocess
import sys
import urllib.parse

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402

TOKEN = 'front-door-secret'
PY = h.Pika.PYTHON
LIB = os.path.dirname(os.path.abspath(h.__file__))
SAGA = '''sagas = ( {
  name = "fulfil"; mode = "choreographed"; start = "events:order.approved"; timeout = 60;
  steps = (
    { name = "pay"; success = "events:payment.captured"; failure = "events:payment.failed";
      compensate = "events:payment.refund-requested";
      compensate_success = "events:payment.refunded";
      compensate_failure = "events:payment.refund-failed"; },
    { name = "ship"; success = "events:shipment.scheduled"; failure = "events:shipment.failed"; }
  );
  completed = "events:order.fulfilled"; compensated = "events:order.cancelled";
}, {
  name = "basket"; start = "events:basket.checked-out"; timeout = 60;
  steps = (
    { name = "reserve"; command = "commands:stock.reserve"; compensate = "commands:stock.release"; },
    { name = "charge"; command = "commands:stock.charge"; }
  );
  completed = "events:basket.done"; compensated = "events:basket.undone";
} );'''
SUBS = '''subscriptions = (
  { name = "payments"; queue = "fulfil.payments"; deliver = "amqp";
    bind = ( "events:order.approved", "events:payment.refund-requested" ); },
  { name = "shipping"; queue = "fulfil.shipping"; deliver = "amqp";
    bind = ( "events:payment.captured" ); },
  { name = "stock"; queue = "fulfil.stock"; deliver = "amqp"; bind = ( "commands:stock.#" ); }
);'''


def saga(d, cid):
    st, j = d.admin_json('/v1/admin/sagas/%s' % urllib.parse.quote(cid, safe=''))
    if st != 200 or not j.get('instances'):
        return None
    return j['instances'][0]


def state(d, cid):
    inst = saga(d, cid)
    return inst['state'] if inst else None


def publish_start(url, orders, key='order.approved'):
    """The orders service: order.approved through the front door, each
    twice with the same message id (a retry after a lost confirm)."""
    code = '''
import json, sys, pika
c = pika.BlockingConnection(pika.URLParameters(sys.argv[1]))
ch = c.channel()
ch.confirm_delivery()
for cid, amount in json.loads(sys.argv[2]):
    for _ in range(2):
        ch.basic_publish('events', sys.argv[3], json.dumps({'amount': amount}).encode(),
                         pika.BasicProperties(delivery_mode=2, correlation_id=cid,
                                              message_id='start-' + cid,
                                              content_type='application/json'))
c.close()
'''
    r = subprocess.run([PY, '-c', code, url, json.dumps(orders), key], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    return r.returncode, r.stderr.decode()[-500:]


def main(wd):
    h.Pika('amqp://unused')	# Skip without python3-pika
    broker = h.Broker(wd)
    broker.start()
    tool = h.AmqpTool()
    tool.declare_queue(broker.url, 'watch', [('events', 'order.#')])
    p_orders, p_side = h.free_port(), h.free_port()
    orders = h.Sagad(wd, broker.url, name='orders', token=TOKEN,
                     conf_extra='amqp = { listen = "127.0.0.1:%d"; };\n%s' % (p_orders, SAGA))
    side = h.Sagad(wd, broker.url, name='fulfil', token=TOKEN,
                   conf_extra='amqp = { listen = "127.0.0.1:%d"; };\n%s' % (p_side, SUBS))
    orders.start()
    side.start()
    u_orders = 'amqp://svc:%s@127.0.0.1:%d/%%2f' % (TOKEN, p_orders)
    u_side = 'amqp://svc:%s@127.0.0.1:%d/%%2f' % (TOKEN, p_side)
    services = [subprocess.Popen([PY, os.path.join(LIB, 'frontdoor_service.py'), u_side,
                                  role, 'fulfil.' + role, '8'],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
                for role in ('payments', 'shipping', 'stock')]
    h.wait_until(lambda: h.parse_metrics(side.admin_get('/metrics')[1]).get(
        'sagad_amqp_consumers') == 3, 20, 'payments, shipping and stock consuming')

    rc, err = publish_start(u_orders, [['o-small', 50], ['o-big', 500], ['o-huge', 5000]])
    h.check(rc == 0, 'the orders service publishes its start events through the front door',
            err)
    rc, err = publish_start(u_orders, [['b-ok', 10], ['b-mid', 70], ['b-big', 200]],
                            key='basket.checked-out')
    h.check(rc == 0, 'the orders service publishes its start events through the front door',
            err)
    final = {'o-small': 'completed', 'o-big': 'compensated', 'o-huge': 'compensated',
             'b-ok': 'completed', 'b-mid': 'compensated', 'b-big': 'compensated'}
    h.wait_until(lambda: all(state(orders, c) == s for c, s in final.items()), 60,
                 'every saga at its end')
    h.check(True, 'o-small completed, o-big and o-huge compensated (AMQP-only services)')
    big = saga(orders, 'o-big')
    steps = {s['name']: s['state'] for s in big['steps']}
    h.check(steps == {'pay': 'compensated', 'ship': 'failed'},
            'o-big: ship failed, pay compensated by the refund event', big['steps'])
    huge = {s['name']: s['state'] for s in saga(orders, 'o-huge')['steps']}
    h.check(huge.get('pay') == 'failed' and huge.get('ship') != 'succeeded',
            'o-huge: payment refused, nothing to undo', huge)

    mid = {s['name']: s['state'] for s in saga(orders, 'b-mid')['steps']}
    bigb = {s['name']: s['state'] for s in saga(orders, 'b-big')['steps']}
    h.check(mid == {'reserve': 'compensated', 'charge': 'failed'} and
            bigb.get('reserve') == 'failed',
            'orchestrated, RPC-style replies through the front door: b-ok completed, b-mid '
            'charge refused and reserve compensated, b-big reserve refused', (mid, bigb))
    outs = [json.loads(l) for p in services for l in p.communicate(timeout=60)[0].decode()
            .splitlines() if l.strip()]
    approved = sorted(o['cid'] for o in outs if o['got'] == 'order.approved')
    h.check(approved == ['o-big', 'o-huge', 'o-small'],
            'each start event reached payments once (the second publish deduplicated)', outs)
    releases = [o['cid'] for o in outs if o['got'] == 'stock.release']
    h.check(releases == ['b-mid'], 'stock.release sent for b-mid only', outs)
    refunds = [o['cid'] for o in outs if o['got'] == 'payment.refund-requested']
    h.check(refunds == ['o-big'], 'the refund request reached payments for o-big only', outs)
    ends = tool.consume(broker.url, 'watch', 20, timeout=3)
    keys = sorted((m['routing_key'], m.get('correlation_id')) for m in ends
                  if m['routing_key'] in ('order.fulfilled', 'order.cancelled'))
    h.check(keys == [('order.cancelled', 'o-big'), ('order.cancelled', 'o-huge'),
                     ('order.fulfilled', 'o-small')],
            'the outcome events, one per saga, with the saga id as correlation id', keys)
    side.stop()
    orders.stop()
    broker.stop()


if __name__ == '__main__':
    h.run_test(main)
