#!/usr/bin/env python3
"""Sagas under crashes: 1,000 concurrent sagas (env SAGA_CRASH_N), three
quarters orchestrated (3 steps), one quarter choreographed (2 steps), some of
each failing on purpose. The orchestrating sagad is killed with SIGKILL at
random points (several times, once while the broker is down) and restarted;
the broker is restarted in the middle of the second batch.

Every saga must end completed or compensated as its plan says, with each
command and compensation applied by its participant exactly once: checked at
the participants by business key and by counting the deliveries their sagad
made (its metrics against what the service saw), and one final event per
saga. env SAGA_CRASH_SEED repeats a run's random kill points.
"""

import collections
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from sagas import (SAGA_STATES, Answer, Event, Participant, publish_spread,  # noqa: E402
                   saga_counts, saga_get, subscription_conf, wait_sagas_finished)

N = int(os.environ.get('SAGA_CRASH_N', '1000'))
SEED = int(os.environ.get('SAGA_CRASH_SEED', str(int(time.time()) % 100000)))

ORDER_SAGA = '''
  {
    name = "order";
    start = "events:order.created";
    timeout = 900;
    steps = (
      { name = "reserve";   command = "commands:stock.reserve";     compensate = "commands:stock.release";   timeout = 300; },
      { name = "authorize"; command = "commands:payment.authorize"; compensate = "commands:payment.cancel";  timeout = 300; },
      { name = "ship";      command = "commands:shipment.book";     compensate = "commands:shipment.cancel"; timeout = 300; }
    );
    completed = "events:done.order";
    compensated = "events:undone.order";
    compensate_timeout = 300;
  }'''

FULFIL_SAGA = '''
  {
    name = "fulfil";
    mode = "choreographed";
    start = "events:fulfil.start";
    timeout = 900;
    steps = (
      { name = "pay";  success = "events:payment.captured";   failure = "events:payment.failed";
        compensate = "commands:payment.refund"; },
      { name = "ship"; success = "events:shipment.scheduled"; failure = "events:shipment.failed";
        compensate = "commands:shipment.unschedule"; }
    );
    completed = "events:done.fulfil";
    compensated = "events:undone.fulfil";
  }'''

SAGAS = 'sagas = (%s,%s\n);\n' % (ORDER_SAGA, FULFIL_SAGA)
START_KEYS = {'order': 'order.created', 'fulfil': 'fulfil.start'}


def plan(i):
    """(saga id, saga, expected final state, what fails)."""
    if i % 4 == 3:
        cid = 'c-%05d' % i
        return (cid, 'fulfil', 'compensated', 'ship') if i % 3 == 0 else \
            (cid, 'fulfil', 'completed', None)
    cid = 'o-%05d' % i
    if i % 5 == 0:
        return cid, 'order', 'compensated', 'authorize'
    if i % 7 == 0:
        return cid, 'order', 'compensated', 'ship'
    return cid, 'order', 'completed', None


# The pieces below are shared with saga_pg.py (the same plans on the
# PostgreSQL saga store).

def participant_rules(stock, payment, by_cid):
    """The participants answer every command, compensation and start
    event after a little jitter; a saga's planned failure (plan()[3]) is a
    409 of its command or a failure event."""
    jrnd = random.Random()

    def jitter():
        return jrnd.random() * 0.02

    def fails(cid, what):
        return by_cid[cid][3] == what

    stock.rules['stock.reserve'] = lambda cid, n: Answer(200, jitter())
    stock.rules['stock.release'] = lambda cid, n: Answer(200, jitter())
    stock.rules['shipment.book'] = lambda cid, n: Answer(409 if fails(cid, 'ship') else 200, jitter())
    payment.rules['payment.authorize'] = lambda cid, n: Answer(
        409 if fails(cid, 'authorize') else 200, jitter())
    payment.rules['payment.cancel'] = lambda cid, n: Answer(200, jitter())
    payment.rules['payment.refund'] = lambda cid, n: Answer(200, jitter())
    payment.rules['fulfil.start'] = lambda cid, n: Answer(events=[] if n else [
        Event('payment.captured', delay=jitter())])
    stock.rules['fulfil.start'] = lambda cid, n: Answer(events=[] if n else [
        Event('shipment.failed' if fails(cid, 'ship') else 'shipment.scheduled',
              delay=0.1 + jitter())])


class Cast:
    """A started broker; the participants stock, payment and web, answering
    as participant_rules() says for the plans in by_cid; their sagads,
    started (stock and payment: their inboxes; web: the start events in,
    the final events to its service); and the orchestrator's sagad, orders,
    with orders_conf, not started. A short reconnect backoff keeps a run
    short after a broker restart."""

    def __init__(self, wd, by_cid, orders_conf, broker_extra='reconnect_max = 2;'):
        bx = broker_extra
        self.broker = h.Broker(wd)
        self.broker.start()
        self.stock, self.payment = Participant('stock'), Participant('payment')
        self.web = Participant('web')
        participant_rules(self.stock, self.payment, by_cid)
        url = self.broker.url
        self.d_web = h.Sagad(wd, url, name='web', broker_extra=bx, conf_extra=subscription_conf(
            'final', ['events:done.#', 'events:undone.#'], self.web.url))
        self.d_stock = h.Sagad(wd, url, name='stock', broker_extra=bx,
                               conf_extra=subscription_conf(
                                   'inbox', ['commands:stock.#', 'commands:shipment.#',
                                             'events:fulfil.start'], self.stock.url))
        self.d_payment = h.Sagad(wd, url, name='payment', broker_extra=bx,
                                 conf_extra=subscription_conf(
                                     'inbox', ['commands:payment.#', 'events:fulfil.start'],
                                     self.payment.url))
        self.orders = h.Sagad(wd, url, name='orders', broker_extra=bx, conf_extra=orders_conf)
        for d in (self.d_web, self.d_stock, self.d_payment):
            d.start(timeout=60)
        self.stock.sagad, self.payment.sagad = self.d_stock, self.d_payment

    def sagads(self):
        return (self.orders, self.d_web, self.d_stock, self.d_payment)

    def check(self, plans, extra_ok=(), extra_refused=(), extra_sagas=()):
        """Exactly once at the participants (check_participants), their
        sagads' counts, one final event per saga (of plans and of
        extra_sagas, other sagas in the plans' form)."""
        check_participants(plans, self.stock, self.payment, extra_ok, extra_refused)
        check_delivered_counts(((self.stock, self.d_stock, 'inbox'),
                                (self.payment, self.d_payment, 'inbox'),
                                (self.web, self.d_web, 'final')))
        check_final_events(list(plans) + list(extra_sagas), self.web)


def publish_starts(d_web, items, seconds, errors):
    """Publish the start events of items (plans) through the web sagad,
    spread over about seconds, with 4 threads (returned, started); errors
    collects what failed."""
    return publish_spread(d_web.port, items, lambda p: (
        'events', START_KEYS[p[1]], {'cid': p[0]},
        {'Correlation-Id': p[0], 'Message-Id': 'start-' + p[0]}), seconds, errors)


def expected_deliveries(plans):
    """What the participants must have seen: {(participant, key, cid): 1}
    answered 2xx, and the set of (participant, key, cid) refused."""
    expect_ok = collections.Counter()
    expect_refused = set()
    for cid, saga, state, what in plans:
        if saga == 'order':
            expect_ok[('stock', 'stock.reserve', cid)] = 1
            if what == 'authorize':
                expect_refused.add(('payment', 'payment.authorize', cid))
                expect_ok[('stock', 'stock.release', cid)] = 1
            else:
                expect_ok[('payment', 'payment.authorize', cid)] = 1
                if what == 'ship':
                    expect_refused.add(('stock', 'shipment.book', cid))
                    expect_ok[('payment', 'payment.cancel', cid)] = 1
                    expect_ok[('stock', 'stock.release', cid)] = 1
                else:
                    expect_ok[('stock', 'shipment.book', cid)] = 1
        else:
            expect_ok[('payment', 'fulfil.start', cid)] = 1
            expect_ok[('stock', 'fulfil.start', cid)] = 1
            if what == 'ship':
                expect_ok[('payment', 'payment.refund', cid)] = 1
    return expect_ok, expect_refused


def check_participants(plans, stock, payment, extra_ok=(), extra_refused=()):
    """Every command, compensation and start event of the plans (and the
    (participant, key, cid) of extra_ok) applied exactly once, nothing
    else; the planned refusals (and extra_refused) and no other; no
    message id delivered twice; every event published."""
    expect_ok, expect_refused = expected_deliveries(plans)
    expect_ok.update({k: 1 for k in extra_ok})
    expect_refused |= set(extra_refused)
    for p in (stock, payment):
        got_ok = collections.Counter((p.name, c['key'], c['cid']) for c in p.deliveries()
                                     if 200 <= c['status'] < 300)
        want_ok = collections.Counter({k: v for k, v in expect_ok.items() if k[0] == p.name})
        diff = {k: (got_ok.get(k, 0), want_ok.get(k, 0)) for k in set(got_ok) | set(want_ok)
                if got_ok.get(k, 0) != want_ok.get(k, 0)}
        h.check(not diff, '%s: every command, compensation and start event applied exactly '
                'once, nothing else (%d deliveries answered 2xx)' % (p.name, sum(got_ok.values())),
                sorted(diff.items())[:10])
        h.check(not p.repeats, '%s: no business key applied twice' % p.name,
                list(p.repeats.items())[:10])
        refused = {(p.name, c['key'], c['cid']) for c in p.deliveries() if c['status'] == 409}
        want_ref = {k for k in expect_refused if k[0] == p.name}
        h.check(refused == want_ref, '%s: the planned refusals (409) and no other' % p.name,
                (sorted(refused - want_ref)[:5], sorted(want_ref - refused)[:5]))
        ids = collections.Counter(c['message_id'] for c in p.deliveries()
                                  if 200 <= c['status'] < 300)
        twice = {k: v for k, v in ids.items() if v > 1}
        h.check(not twice, '%s: its sagad delivered no message id twice' % p.name,
                list(twice.items())[:10])
        h.check(not p.publish_errors, '%s: every event published' % p.name, p.publish_errors[:5])


def check_delivered_counts(pairs):
    """pairs of (participant, its sagad, subscription): the sagad counted
    the same deliveries as its service saw."""
    for p, d, sub in pairs:
        m = d.metrics()
        got = {o: int(m.get('sagad_delivered_total{subscription="%s",outcome="%s"}' % (sub, o), -1))
               for o in ('success', 'refused', 'retry', 'dead-lettered')}
        seen = {'success': len([c for c in p.deliveries() if 200 <= c['status'] < 300]),
                'refused': len([c for c in p.deliveries() if c['status'] in (409, 422)]),
                'retry': 0, 'dead-lettered': 0}
        h.check(got == seen, '%s sagad: sagad_delivered_total matches the service (%s)'
                % (p.name, seen), got)
        h.log('%s sagad: %d duplicates dropped by its inbox' %
              (p.name, m.get('sagad_duplicates_total{subscription="%s"}' % sub, 0)))


def check_final_states(orders, plans):
    """Every saga of the plans in its planned final state, as the admin
    API of orders shows it."""
    wrong = []
    for cid, saga, state, _ in plans:
        inst = saga_get(orders, cid, saga)
        if not inst or inst['state'] != state:
            wrong.append((cid, state, inst and inst['state'], inst and inst.get('reason')))
    h.check(not wrong, 'every saga instance in its planned final state', wrong[:10])


def check_final_events(plans, web):
    """One completed/compensated event per saga of the plans, as its final
    state, at the web service."""
    fin = collections.defaultdict(list)
    for c in web.deliveries():
        fin[c['cid']].append((c['key'], c['message_id']))
    bad = []
    for cid, saga, state, _ in plans:
        key = '%s.%s' % ('done' if state == 'completed' else 'undone', saga)
        mid = '%s:%s:%s' % (cid, saga, state)
        if fin.get(cid) != [(key, mid)]:
            bad.append((cid, fin.get(cid), key))
    h.check(not bad and len(fin) == len(plans),
            'one completed/compensated event per saga (%d)' % len(plans), bad[:10])


def main(wd):
    rnd = random.Random(SEED)
    h.log('N=%d, SAGA_CRASH_SEED=%d' % (N, SEED))
    plans = [plan(i) for i in range(N)]
    by_cid = {p[0]: p for p in plans}

    cast = Cast(wd, by_cid, SAGAS)
    broker, orders = cast.broker, cast.orders
    d_web, d_stock, d_payment = cast.d_web, cast.d_stock, cast.d_payment
    orders.start(timeout=60)

    errors = []

    def publisher(items, seconds):
        return publish_starts(d_web, items, seconds, errors)

    kills = []

    def kill_orchestrator(why, wait_ready=True, down=None):
        down = rnd.uniform(0, 0.8) if down is None else down
        orders.kill()
        kills.append(time.time())
        h.log('SIGKILL orchestrator (%s); restart in %.2f s' % (why, down))
        time.sleep(down)
        orders.start(wait_ready=wait_ready, timeout=90)

    t_start = time.time()
    half = N // 2
    # ---- batch 1: three kills at random points
    threads = publisher(plans[:half], max(4.0, half / 60.0))
    for k in range(3):
        time.sleep(rnd.uniform(0.5, 3.0))
        kill_orchestrator('batch 1, kill %d' % (k + 1))
    for t in threads:
        t.join()
    h.log('batch 1 published (%d start events)' % half)

    # ---- batch 2: a kill, a broker restart, a kill while the broker is down, a kill after
    threads = publisher(plans[half:], max(4.0, (N - half) / 60.0))
    time.sleep(rnd.uniform(0.5, 2.0))
    kill_orchestrator('batch 2, before the broker restart')
    time.sleep(rnd.uniform(0.5, 2.0))
    h.log('broker restart in the middle of batch 2')
    broker.stop()
    kill_orchestrator('broker down', wait_ready=False, down=rnd.uniform(0.2, 1.0))
    time.sleep(rnd.uniform(0.5, 2.0))
    broker.start()
    time.sleep(rnd.uniform(1.0, 3.0))
    kill_orchestrator('batch 2, after the broker restart')
    for t in threads:
        t.join()
    h.check(not errors, 'all %d start events accepted by the web sagad' % N, errors[:5])
    h.log('batch 2 published')
    # ---- up to two more kills while sagas are still in progress
    for k in range(2):
        time.sleep(rnd.uniform(0.2, 1.0))
        m = orders.metrics()
        busy = sum(v for key, v in m.items() if key.startswith('sagad_sagas{') and
                   ('"running"' in key or '"compensating"' in key))
        if not busy:
            break
        kill_orchestrator('draining, %d sagas in progress' % busy)
    h.log('%d SIGKILLs of the orchestrator in all' % len(kills))

    # ---- every saga ends
    names = ('order', 'fulfil')
    wait_sagas_finished(orders, names, N, 180, 'every saga completed or compensated')
    h.log('all %d sagas finished %.1f s after the first start event' % (N, time.time() - t_start))

    # let everything settle: every outbox empty, every backlog delivered
    h.wait_drained((orders, d_web, d_stock, d_payment), 60)

    want = collections.Counter((p[1], p[2]) for p in plans)
    c = saga_counts(orders, names)
    h.check(all(c[(s, st)] == want[(s, st)] for s in names for st in SAGA_STATES),
            'sagad_sagas by saga and state as planned: %s' %
            {'%s/%s' % k: v for k, v in sorted(want.items())},
            {'%s/%s' % k: v for k, v in c.items() if v})
    check_final_states(orders, plans)

    # ---- exactly once at the participants
    cast.check(plans)
    m = orders.metrics()
    h.log('orchestrator (since its last restart): %d duplicates dropped by the saga inbox, '
          '%d saga-level duplicates' % (m.get('sagad_duplicates_total{subscription="_sagas"}', 0),
                                        sum(v for k, v in m.items()
                                            if k.startswith('sagad_saga_duplicates_total'))))

    # Not a failure of this test (nothing is lost), but worth seeing: the
    # broker closing a consumer connection (RabbitMQ 3.10 crashes the channel
    # when a quorum queue consumer is cancelled and consumed again with the
    # same consumer tag, rabbitmq-server#5927).
    for d in (orders, d_web, d_stock, d_payment):
        n541 = d.log().count('541 INTERNAL_ERROR')
        if n541:
            h.log('NOTE: sagad %s: the broker closed its connection with 541 INTERNAL_ERROR %d '
                  'time(s) (see its log and the broker log)' % (d.name, n541))
    for d in (orders, d_web, d_stock, d_payment):
        h.check(d.stop() == 0, 'sagad %s stops cleanly' % d.name)
    broker.stop()


if __name__ == '__main__':
    h.run_test(main)
