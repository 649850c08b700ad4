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

With --amqp (demo/run.sh --amqp), the payment service keeps its own
RabbitMQ client (pika) and talks AMQP to its sagad's front door instead of
HTTP: it consumes its commands through sagad's inbox and publishes its
replies RPC style (services.AmqpService); nothing else changes.

With --2pc (demo/run.sh --2pc), the 2PC variant instead (main_2pc):
orders reserve stock at two warehouses, north and south, all or nothing,
as a two-phase commit (sagad.conf(5), TRANSACTIONS) that the orders sagad
coordinates; each warehouse service, behind its own sagad, answers
PREPARE (hold the stock: yes, or 409: no), COMMIT and ABORT. Under `make
check` (top_builddir in the environment) demo.py without options runs
the saga demo with --amqp, then the 2PC one, so that the test covers
them.
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


# The 2PC variant: one transaction, both warehouses or neither. The
# outcome events are the saga demo's, so the orders service takes them
# as they are.
TX = '''
transactions = (
  {
    name = "reserve-stock";
    start = "events:order.placed";
    participants = (
      { name = "north"; prepare = "commands:north.prepare";
        commit = "commands:north.commit"; abort = "commands:north.abort"; },
      { name = "south"; prepare = "commands:south.prepare";
        commit = "commands:south.commit"; abort = "commands:south.abort"; }
    );
    prepare_timeout = 10;
    decision_retry_initial = 0.2; decision_retry_max = 2;
    committed = "events:order.approved";
    aborted = "events:order.rejected";
  }
);
'''

# (north, south) units of each order; south has too few for orders 2 and 4
# whatever the others hold, so the outcome does not depend on timing.
STOCK = {'north': 10, 'south': 5}
TX_ORDERS = {1: (2, 2), 2: (3, 9), 3: (1, 1), 4: (4, 7)}


def main_2pc(workdir):
    """The 2PC variant: TX_ORDERS placed at once; those south cannot serve
    are aborted at both warehouses, the others committed at both."""
    wh = {n: services.Warehouse(n, STOCK[n]) for n in ('north', 'south')}
    orders = services.Orders()
    broker = h.Broker(workdir)
    broker.start()
    d_orders = h.Sagad(workdir, broker.url, name='orders', conf_extra=TX + subscription(
        'inbox', ['events:order.approved', 'events:order.rejected'], orders.service.url))
    d_wh = {n: h.Sagad(workdir, broker.url, name=n, conf_extra=subscription(
        'commands', ['commands:%s.#' % n], wh[n].service.url)) for n in wh}
    daemons = [d_orders] + list(d_wh.values())
    for d in daemons:
        d.start()
    print('\n== 2PC: %d orders, each reserving stock at two warehouses all or nothing '
          '(stock: north %d, south %d) ==' % (len(TX_ORDERS), STOCK['north'], STOCK['south']))
    t0 = time.time()
    for i, (n, s) in sorted(TX_ORDERS.items()):
        print('  order-%d  north %d  south %d' % (i, n, s))
        st, js, _ = d_orders.publish('events', 'order.placed', json.dumps(
            {'order': i, 'items': {'north': n, 'south': s}}).encode(),
            {'Content-Type': 'application/json', 'Correlation-Id': 'order-%d' % i,
             'Message-Id': 'order-placed-%d' % i})
        if st != 202:
            raise SystemExit('publish failed: %s %s' % (st, js))
    h.wait_until(lambda: len(orders.final) >= len(TX_ORDERS), 60, 'every transaction finished')
    elapsed = time.time() - t0
    want_c = {'order-%d' % i for i, (n, s) in TX_ORDERS.items() if s <= STOCK['south']}
    want_a = {'order-%d' % i for i in TX_ORDERS} - want_c

    def consistent():
        """Both warehouses committed want_c and nothing else, north
        released what it held for want_a (south voted no on those), no
        stock held or in doubt, the stock counts add up."""
        states = {s['id']: s['state'] for s in
                  d_orders.admin_json('/v1/admin/sagas?limit=1000')[1]['sagas']}
        in_doubt = {n: d.metrics().get('sagad_tx_in_doubt', 0) for n, d in d_wh.items()}
        ok = (set(wh['north'].committed) == set(wh['south'].committed) == want_c and
              wh['north'].aborted == wh['south'].refused == want_a and
              not wh['south'].aborted and not wh['north'].held and not wh['south'].held and
              not any(in_doubt.values()) and
              {i for i, st in states.items() if st == 'completed'} == want_c and
              {i for i, st in states.items() if st == 'compensated'} == want_a and
              all(wh[n].stock == STOCK[n] - sum(TX_ORDERS[int(i[6:])][k] for i in want_c)
                  for k, n in enumerate(('north', 'south'))))
        return ok, states, in_doubt
    # The aborted event may come before a late yes vote's ABORT reaches
    # north (the coordinator aborts that one after the outcome): a while.
    deadline = time.time() + 30
    while not consistent()[0] and time.time() < deadline:
        time.sleep(0.2)
    ok, states, in_doubt = consistent()
    names = lambda ids: ' '.join(sorted(ids)) or '-'   # noqa: E731
    print('\n== results after %.1f s ==' % elapsed)
    for state in ('completed', 'compensated'):
        ids = [i for i, st in states.items() if st == state]
        print('  %-12s %d  %s' % ({'completed': 'committed', 'compensated': 'aborted'}[state],
                                  len(ids), names(ids)))
    for n, w in wh.items():
        print('  %-6s committed %s; held then released (ABORT) %s; voted no (409) %s'
              % (n, names(w.committed), names(w.aborted), names(w.refused)))
    print('  stock left: north %d, south %d; still held: %s; in doubt (sagad_tx_in_doubt): '
          'north %d, south %d' % (wh['north'].stock, wh['south'].stock,
                                  names(set(wh['north'].held) | set(wh['south'].held)),
                                  in_doubt['north'], in_doubt['south']))
    print('  every order committed at both warehouses or aborted at both, nothing held, '
          'nothing in doubt: %s' % ('yes' if ok else 'NO'))
    sid = sorted(want_a)[0]
    print('\n== sagactl tx %s (votes, decision, acknowledgements, history) ==' % sid)
    subprocess.run([os.path.join(h.top_builddir, 'src', 'sagactl'), '-s',
                    'http://127.0.0.1:%d' % d_orders.admin_port, 'tx', sid], check=False)
    for d in daemons:
        d.stop()
    broker.stop()
    for svc in list(wh.values()) + [orders]:
        svc.service.stop()
    if not ok:
        raise SystemExit(1)


def stay(d):
    """--ui: keep every process up for a look at the web page."""
    print('\n== the web page of the orders sagad: http://127.0.0.1:%d/ui/ '
          '(Ctrl-C stops the demo) ==' % d.admin_port, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print()


def main(workdir, trace=False, then=None, amqp=False):
    """The demo in workdir; then(orders sagad), if given, runs once every
    saga is finished and checked, before everything stops. amqp: the
    payment service behind its sagad's AMQP front door (pika) instead of
    HTTP."""
    stock, payment, orders = services.Stock(), services.Payment(amqp=amqp), services.Orders()
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
    if amqp:
        fd_port = h.free_port()
        d_payment = h.Sagad(workdir, broker.url, name='payment', token='demo-token',
                            conf_extra='amqp = { listen = "127.0.0.1:%d"; };\n' % fd_port +
                            subscription('commands', ['commands:payment.#'], 'amqp') + tr)
    else:
        d_payment = h.Sagad(workdir, broker.url, name='payment', conf_extra=subscription(
            'commands', ['commands:payment.#'], payment.service.url) + tr)
    for d in (d_orders, d_stock, d_payment):
        d.start()
    if amqp:
        payment.service.start('amqp://payment:demo-token@127.0.0.1:%d/%%2f' % fd_port,
                              'payment.commands')
        print('\n== the payment service speaks AMQP (pika) to its sagad\'s front door at '
              '127.0.0.1:%d; sagad consumes payment.commands through its inbox ==' % fd_port)
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
    payment.service.stop()      # an AMQP client first, before its sagad goes
    for d in (d_orders, d_stock, d_payment):
        d.stop()
    broker.stop()
    for s in (stock, orders):
        s.service.stop()
    if not ok:
        raise SystemExit(1)


def run(wd, args):
    if '--2pc' in args:
        return main_2pc(wd)
    check = not args and os.environ.get('top_builddir')
    # make check runs the payment service through the front door (the HTTP
    # path is the README's quick start, run by t/fresh.sh), then the 2PC one.
    main(wd, trace='--trace' in args, then=stay if '--ui' in args else None,
         amqp='--amqp' in args or bool(check))
    if check:
        sub = os.path.join(wd, '2pc')
        os.mkdir(sub)
        main_2pc(sub)


def pika_python(args):
    """The payment service through the front door needs pika, which Debian
    installs for its own /usr/bin/python3 (python3-pika): run under that one
    when this python3 is another without it."""
    amqp = '--amqp' in args or (not args and os.environ.get('top_builddir'))
    py = h.Pika.PYTHON
    if amqp and services.pika is None and os.path.realpath(sys.executable) != \
            os.path.realpath(py) and os.access(py, os.X_OK):
        os.execv(py, [py] + sys.argv)


if __name__ == '__main__':
    pika_python(sys.argv[1:])
    h.run_test(lambda wd: run(wd, sys.argv[1:]))
