#!/usr/bin/env python3
"""The sagad demo: the create-order saga of the contract across three
services, each with its own sagad, on one private local RabbitMQ.

  order service  <- sagad "orders"  (runs the create-order saga)
  stock service  <- sagad "stock"   (commands stock.reserve / stock.release)
  payment service<- sagad "payment" (commands payment.authorize / payment.cancel)

A batch of orders is published through the orders sagad; payments over the
card limit are refused (compensated sagas), some stock reservations are slow.
It prints how every saga ended and `sagactl saga ID` of a compensated one.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.environ.get('top_srcdir') or os.path.dirname(HERE), 't', 'lib'))
sys.path.insert(0, HERE)
import harness as h          # noqa: E402
import services              # noqa: E402

ORDERS = int(os.environ.get('DEMO_ORDERS', '40'))

SAGA = '''
sagas = (
  {
    name = "create-order";
    mode = "orchestrated";
    start = "events:order.created";
    timeout = 30;
    steps = (
      { name = "reserve-stock";     command = "commands:stock.reserve";
        compensate = "commands:stock.release"; timeout = 5; },
      { name = "authorize-payment"; command = "commands:payment.authorize";
        compensate = "commands:payment.cancel"; },
      { name = "approve";           command = "commands:order.approve"; }
    );
    completed = "events:order.approved";
    compensated = "events:order.rejected";
  }
);
'''


def subscription(name, binds, url):
    return '''subscriptions = (
  { name = "%s"; bind = [ %s ]; deliver = "%s"; concurrency = 16; }
);
''' % (name, ', '.join('"%s"' % b for b in binds), url)


def main(workdir):
    stock, payment, orders = services.Stock(), services.Payment(), services.Orders()
    broker = h.Broker(workdir)
    broker.start()
    d_orders = h.Sagad(workdir, broker.url, name='orders', conf_extra=SAGA + subscription(
        'inbox', ['commands:order.#', 'events:order.approved', 'events:order.rejected'],
        orders.service.url))
    d_stock = h.Sagad(workdir, broker.url, name='stock', conf_extra=subscription(
        'commands', ['commands:stock.#'], stock.service.url))
    d_payment = h.Sagad(workdir, broker.url, name='payment', conf_extra=subscription(
        'commands', ['commands:payment.#'], payment.service.url))
    for d in (d_orders, d_stock, d_payment):
        d.start()
    print('\n== %d orders; payments over 900 are refused, every 7th reservation is slow ==' % ORDERS)
    t0 = time.time()
    for i in range(1, ORDERS + 1):
        amount = 1000 + i if i % 4 == 0 else 100 + i
        st, js, _ = d_orders.publish('events', 'order.created',
                                     json.dumps({'order': i, 'amount': amount}).encode(),
                                     {'Content-Type': 'application/json',
                                      'Correlation-Id': 'order-%d' % i,
                                      'Message-Id': 'order-created-%d' % i})
        if st != 202:
            raise SystemExit('publish failed: %s %s' % (st, js))

    def finished():
        return len(orders.final) >= ORDERS
    h.wait_until(finished, 120, 'every saga finished')
    elapsed = time.time() - t0
    sagas = d_orders.admin_json('/v1/admin/sagas?limit=1000')[1]['sagas']
    by_state = {}
    for s in sagas:
        by_state.setdefault(s['state'], []).append(s['id'])
    print('\n== results after %.1f s ==' % elapsed)
    for state in sorted(by_state):
        print('  %-12s %d' % (state, len(by_state[state])))
    refused = len(payment.refused)
    print('  payments refused %d, stock reservations %d, released %d, payments cancelled %d'
          % (refused, len(stock.reserved), len(stock.released), len(payment.cancelled)))
    ok = (len(by_state.get('completed', [])) == ORDERS - refused and
          len(by_state.get('compensated', [])) == refused and
          stock.released == payment.refused and not payment.cancelled)
    print('  every refused payment compensated (stock released), every other order approved: %s'
          % ('yes' if ok else 'NO'))
    if by_state.get('compensated'):
        sid = sorted(by_state['compensated'])[0]
        print('\n== sagactl saga %s ==' % sid)
        subprocess.run([os.path.join(h.top_builddir, 'src', 'sagactl'), '-s',
                        'http://127.0.0.1:%d' % d_orders.admin_port, 'saga', sid], check=False)
    print('\n== sagactl status (orders) ==')
    subprocess.run([os.path.join(h.top_builddir, 'src', 'sagactl'), '-s',
                    'http://127.0.0.1:%d' % d_orders.admin_port, 'status'], check=False)
    for d in (d_orders, d_stock, d_payment):
        d.stop()
    broker.stop()
    for s in (stock, payment, orders):
        s.service.stop()
    if not ok:
        raise SystemExit(1)


if __name__ == '__main__':
    h.run_test(main)
