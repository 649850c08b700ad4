#!/usr/bin/env python3
"""A RabbitMQ cluster (issue 15 part 4): three private nodes joined with
`rabbitmqctl join_cluster`; every sagad has the three in broker.url. While
sagas (orchestrated, some compensating) run and a stream of plain messages
goes through an outbox to a subscription, the node the orchestrator is
connected to is killed (SIGKILL), later restarted, then the node it moved to
is killed too.

Checked: every sagad is on a live node (both broker connections, per
sagad_broker_node) within two heartbeats of each kill (the time is logged);
`sagactl status` names the node; every saga ends as planned with each
command and compensation applied exactly once at its participant; every
message of the stream delivered exactly once. With RabbitMQ 3.10, a
publishing channel opened while a quorum queue elects a new leader can get
only basic.nack for that queue from then on; sagad drops such a connection
after 5 s of nacks alone (logged, and noted here when it happened).
env CLUSTER_N: sagas (400).
"""

import collections
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from sagas import (Answer, Participant, publish_spread, saga_get, sagactl,  # noqa: E402
                   subscription_conf)

N = int(os.environ.get('CLUSTER_N', '400'))
FEED = 3 * N
HEARTBEAT = 2

SAGAS = '''
sagas = (
  {
    name = "order";
    start = "events:order.created";
    timeout = 900;
    steps = (
      { name = "reserve";   command = "commands:stock.reserve";     compensate = "commands:stock.release";   timeout = 300; },
      { name = "authorize"; command = "commands:payment.authorize"; compensate = "commands:payment.cancel";  timeout = 300; }
    );
    completed = "events:done.order";
    compensated = "events:undone.order";
    compensate_timeout = 300;
  }
);
'''


def plan(i):
    cid = 'o-%05d' % i
    return (cid, 'compensated', True) if i % 5 == 0 else (cid, 'completed', False)


NODE_RE = re.compile(r'sagad_broker_node\{role="(\w+)",node="[^"]*:(\d+)"\}')


def nodes_of(d):
    """{role: port} of the nodes d's connections are up on."""
    try:
        m = d.metrics()
    except Exception:  # noqa: BLE001
        return {}
    out = {}
    for k, v in m.items():
        mo = NODE_RE.match(k)
        if mo and v == 1:
            out[mo.group(1)] = int(mo.group(2))
    return out


def main(wd):
    plans = [plan(i) for i in range(N)]
    by_cid = {p[0]: p for p in plans}
    cluster = h.Cluster(wd, 3)
    cluster.start()
    url = cluster.url

    stock, payment, web = Participant('stock'), Participant('payment'), Participant('web')
    stock.rules['stock.reserve'] = lambda cid, n: Answer(200, 0.002)
    stock.rules['stock.release'] = lambda cid, n: Answer(200, 0.002)
    payment.rules['payment.authorize'] = lambda cid, n: Answer(
        409 if by_cid[cid][2] else 200, 0.002)
    payment.rules['payment.cancel'] = lambda cid, n: Answer(200, 0.002)
    feed = h.Service(lambda call: 200)

    bx = 'reconnect_initial = 0.1; reconnect_max = 1;'
    d_web = h.Sagad(wd, url, name='web', broker_extra=bx, heartbeat=HEARTBEAT,
                    conf_extra=subscription_conf('final', ['events:done.#', 'events:undone.#'],
                                                 web.url))
    d_stock = h.Sagad(wd, url, name='stock', broker_extra=bx, heartbeat=HEARTBEAT,
                      conf_extra=subscription_conf('inbox', ['commands:stock.#'], stock.url))
    d_payment = h.Sagad(wd, url, name='payment', broker_extra=bx, heartbeat=HEARTBEAT,
                        conf_extra=subscription_conf('inbox', ['commands:payment.#'],
                                                     payment.url))
    d_feed = h.Sagad(wd, url, name='feed', broker_extra=bx, heartbeat=HEARTBEAT,
                     conf_extra=subscription_conf('feed', ['events:feed.#'], feed.url))
    orders = h.Sagad(wd, url, name='orders', broker_extra=bx, heartbeat=HEARTBEAT,
                     conf_extra=SAGAS)
    sagads = (d_web, d_stock, d_payment, d_feed, orders)
    for d in sagads:
        d.start(timeout=60)
    stock.sagad, payment.sagad = d_stock, d_payment

    first = nodes_of(orders)
    h.check(first.get('publish') == cluster.nodes[0].port,
            'sagad starts on the first node of broker.url (metrics: %s)' % first, first)
    rc, out, _ = sagactl(orders, 'status')
    h.check(rc == 0 and ('127.0.0.1:%d' % cluster.nodes[0].port) in out,
            'sagactl status names the connected node', out[-600:])

    errors = []
    seconds = 40.0

    def publish(items, make):
        return publish_spread(d_web.port, items, make, seconds, errors, threads=2)

    t_start = time.time()
    threads = publish(plans, lambda p: ('events', 'order.created', {'cid': p[0]},
                                        {'Correlation-Id': p[0], 'Message-Id': 'start-' + p[0]}))
    threads += publish(list(range(FEED)), lambda i: ('events', 'feed.%d' % i, {'i': i},
                                                    {'Message-Id': 'feed-%d' % i}))

    moves = []

    def kill_connected(what):
        port = nodes_of(orders).get('publish')
        victim = cluster.by_port(port)
        h.check(victim is not None and victim.running(),
                '%s: the orchestrator is on a running node (port %s)' % (what, port))
        victim.kill()
        t0 = time.time()
        h.log('%s: SIGKILL node %s (port %d)' % (what, victim.node, port))

        def all_moved():
            for d in sagads:
                n = nodes_of(d)
                if set(n) != {'publish', 'consume'} or port in n.values():
                    return False
            return True
        h.wait_until(all_moved, 60, 'every sagad on a live node after %s' % what, interval=0.05)
        dt = time.time() - t0
        moves.append(dt)
        h.log('%s: every sagad (both connections) on a live node %.2f s after the kill: %s'
              % (what, dt, {d.name: nodes_of(d) for d in sagads}))
        h.check(dt <= 2 * HEARTBEAT, '%s: on a live node within two heartbeats (%.2f s <= %d s)'
                % (what, dt, 2 * HEARTBEAT), dt)
        return victim

    time.sleep(8)
    v1 = kill_connected('kill 1')
    time.sleep(6)
    v1.start()
    h.wait_until(lambda: v1.node in cluster.running_nodes(v1), 60, 'the killed node rejoined')
    h.log('node %s restarted and rejoined' % v1.node)
    time.sleep(4)
    v2 = kill_connected('kill 2')
    h.check(v2 is not v1, 'the second kill hits another node')
    for t in threads:
        t.join(180)
    h.check(not errors, 'all %d start events and %d feed messages accepted by the web sagad'
            % (N, FEED), errors[:5])

    def counts():
        m = orders.metrics()
        return {st: int(m.get('sagad_sagas{saga="order",state="%s"}' % st, 0))
                for st in ('running', 'completed', 'compensating', 'compensated', 'failed')}
    h.wait_until(lambda: counts()['completed'] + counts()['compensated'] == N, 180,
                 'every saga completed or compensated', interval=1)
    h.log('all %d sagas finished %.1f s after the first start event' % (N, time.time() - t_start))

    h.wait_drained(sagads, 90)

    want = collections.Counter(p[1] for p in plans)
    c = counts()
    h.check(c['completed'] == want['completed'] and c['compensated'] == want['compensated']
            and c['failed'] == 0, 'sagas as planned: %s' % dict(want), c)
    wrong = [(cid, st) for cid, st, _ in plans
             if (saga_get(orders, cid, 'order') or {}).get('state') != st]
    h.check(not wrong, 'every saga instance in its planned final state', wrong[:10])

    expect = collections.Counter()
    for cid, st, fails in plans:
        expect[('stock', 'stock.reserve', cid)] = 1
        if fails:
            expect[('stock', 'stock.release', cid)] = 1
        else:
            expect[('payment', 'payment.authorize', cid)] = 1
    for p in (stock, payment):
        got = collections.Counter((p.name, x['key'], x['cid']) for x in p.deliveries()
                                  if 200 <= x['status'] < 300)
        want_p = {k: v for k, v in expect.items() if k[0] == p.name}
        diff = {k: (got.get(k, 0), want_p.get(k, 0)) for k in set(got) | set(want_p)
                if got.get(k, 0) != want_p.get(k, 0)}
        h.check(not diff, '%s: every command and compensation applied exactly once (%d)'
                % (p.name, sum(got.values())), sorted(diff.items())[:10])
        h.check(not p.repeats, '%s: no business key applied twice' % p.name,
                list(p.repeats.items())[:10])
    fin = collections.Counter(x['cid'] for x in web.deliveries())
    h.check(len(fin) == N and all(v == 1 for v in fin.values()),
            'one final event per saga (%d)' % N, [k for k, v in fin.items() if v != 1][:10])
    ok = feed.ok_ids()
    missing = [i for i in range(FEED) if not ok.get('feed-%d' % i)]
    twice = [k for k, v in ok.items() if v > 1]
    h.check(not missing, 'every feed message delivered (%d)' % FEED, missing[:10])
    h.check(not twice, 'no feed message delivered twice', twice[:10])
    for d in sagads:
        moved = d.log().count('broker moving to the next node')
        h.check(moved >= 2, 'sagad %s logged its moves (%d)' % (d.name, moved))
    for d in sagads:
        n = d.log().count('every publish nacked')
        if n:
            h.log('NOTE: sagad %s dropped a publishing connection whose publishes were all '
                  'nacked, %d time(s)' % (d.name, n))
    h.log('time to a live node after each kill: %s s (bound %d s)'
          % (', '.join('%.2f' % x for x in moves), 2 * HEARTBEAT))
    for d in sagads:
        h.check(d.stop() == 0, 'sagad %s stops cleanly' % d.name)
    feed.stop()
    cluster.stop()


if __name__ == '__main__':
    h.run_test(main)
