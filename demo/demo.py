#!/usr/bin/env python3
"""The sagad demo: the create-order saga of the contract across three
services, each with its own sagad, on one private local RabbitMQ.

  order service  <- sagad "orders"  (runs the create-order saga)
  stock service  <- sagad "stock"   (commands stock.reserve / stock.release)
  payment service<- sagad "payment" (commands payment.authorize / payment.cancel)

A batch of orders is published through the orders sagad; payments over the
card limit are refused (compensated sagas), some stock reservations are slow.
It prints how every saga ended and `sagactl saga ID` of a compensated one.

With --trace (demo/run.sh --trace), the three sagad export their spans to
an OpenTelemetry collector in this process (t/lib/otlp.py), and the demo
prints each order's trace: one trace per order, covering every hop across
the three services, as a tree.

With --ui (demo/run.sh --ui), everything keeps running once the orders are
done, and the demo prints the address of the orders sagad's web page for
operators (sagad(8) WEB PAGE), where the demo's sagas are, until Ctrl-C.
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
import otlp                  # noqa: E402
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


# The hops of one order's trace, as "service:span" (the step and delivery
# spans of every command; a refused payment adds the compensation's).
HOPS = ['orders:create events', 'orders:receive orders.sagas', 'orders:saga create-order',
        'orders:step reserve-stock', 'stock:receive stock.commands', 'stock:deliver commands',
        'orders:step authorize-payment', 'payment:receive payment.commands',
        'payment:deliver commands']


def show_tree(spans, out):
    """A trace as an indented tree, children by start time."""
    kids = {}
    ids = {s['spanId'] for s in spans}
    for s in spans:
        kids.setdefault(s['parentSpanId'] if s['parentSpanId'] in ids else None, []).append(s)

    def walk(parent, depth):
        for s in sorted(kids.get(parent, []), key=lambda s: s['start']):
            out.append('  %s%-*s %-9s %7.1f ms%s' % (
                '  ' * depth, 44 - 2 * depth, s['name'], s['service'],
                (s['end'] - s['start']) * 1000, '  ERROR' if 'status' in s else ''))
            walk(s['spanId'], depth + 1)
    walk(None, 0)


def report_traces(col, ids):
    """Each order one trace with every hop; prints the first compensated
    one's tree. Returns whether all were whole."""
    time.sleep(1.5)     # the last batches of spans
    by_order = {}
    for tid, spans in col.trees().items():
        for s in spans:
            if s['name'] == 'saga create-order':
                by_order[s['attrs'].get('sagad.saga_id')] = spans
    whole = [sid for sid in ids if sid in by_order and
             all(any('%s:%s' % (s['service'], s['name']) == hop for s in by_order[sid])
                 for hop in HOPS)]
    print('\n== traces: %d spans in %d traces; %d of %d orders have one trace with '
          'every hop across the three services ==' % (len(col.spans), len(col.trees()),
                                                       len(whole), len(ids)))
    rejected = [sid for sid in ids if sid in by_order and any(
        s['name'] == 'compensate reserve-stock' for s in by_order[sid])]
    if rejected:
        lines = []
        show_tree(by_order[rejected[0]], lines)
        print('\n== the trace of %s (compensated) ==' % rejected[0])
        print('\n'.join(lines))
    return len(whole) == len(ids)


def stay(d):
    """--ui: keep every process up for a look at the web page."""
    print('\n== the web page of the orders sagad: http://127.0.0.1:%d/ui/ '
          '(Ctrl-C stops the demo) ==' % d.admin_port, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print()


def main(workdir, trace=False, then=None):
    """The demo in workdir; then(orders sagad), if given, runs once every
    saga is finished and checked, before everything stops."""
    stock, payment, orders = services.Stock(), services.Payment(), services.Orders()
    broker = h.Broker(workdir)
    broker.start()
    col = otlp.Collector() if trace else None
    tr = ('\ntracing = { endpoint = "http://127.0.0.1:%d/v1/traces"; interval = 0.2; };\n'
          % col.port) if col else ''
    # The page's files from this tree, not an installed copy.
    d_orders = h.Sagad(workdir, broker.url, name='orders',
                       api_extra='ui_dir = %s;' % h.conf_str(os.path.join(h.top_srcdir, 'ui')),
                       conf_extra=SAGA + subscription(
        'inbox', ['commands:order.#', 'events:order.approved', 'events:order.rejected'],
        orders.service.url) + tr)
    d_stock = h.Sagad(workdir, broker.url, name='stock', conf_extra=subscription(
        'commands', ['commands:stock.#'], stock.service.url) + tr)
    d_payment = h.Sagad(workdir, broker.url, name='payment', conf_extra=subscription(
        'commands', ['commands:payment.#'], payment.service.url) + tr)
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
    if col:
        ok = report_traces(col, ['order-%d' % i for i in range(1, ORDERS + 1)]) and ok
        col.stop()
    print('\n== sagactl status (orders) ==')
    subprocess.run([os.path.join(h.top_builddir, 'src', 'sagactl'), '-s',
                    'http://127.0.0.1:%d' % d_orders.admin_port, 'status'], check=False)
    st, page = d_orders.admin_get('/ui/')
    if st != 200 or '<title>sagad</title>' not in page:
        print('the web page is missing: %d' % st)
        ok = False
    if then:
        then(d_orders)
    for d in (d_orders, d_stock, d_payment):
        d.stop()
    broker.stop()
    for s in (stock, payment, orders):
        s.service.stop()
    if not ok:
        raise SystemExit(1)


if __name__ == '__main__':
    h.run_test(lambda wd: main(wd, trace='--trace' in sys.argv[1:],
                               then=stay if '--ui' in sys.argv[1:] else None))
