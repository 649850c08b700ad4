#!/usr/bin/env python3
"""Two-phase commits under crashes: TX_CRASH_N (300) transactions of two
participants started over about 20 s, one in ten with a planned no vote
from south. Meanwhile the coordinator is killed with SIGKILL twice at
random moments (so before a decision, just after one, in the middle of
phase 2, whatever the moment holds), a participant's sagad once, and the
broker is restarted once; each comes back.

The invariant, for every transaction: it ends committed or aborted; when
committed, both participants applied the COMMIT exactly once and no ABORT;
when aborted, no COMMIT anywhere, and each participant that voted yes
applied the ABORT exactly once; a planned no vote ends aborted; no
participant record is left in doubt, and no PREPARE was applied twice.
TX_CRASH_SEED repeats a run's random kill points.
"""

import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from sagas import Answer, Participant, publish_spread, saga_state, subscription_conf  # noqa: E402
from tx import TX  # noqa: E402

N = int(os.environ.get('TX_CRASH_N', '300'))
SEED = int(os.environ.get('TX_CRASH_SEED', str(int(time.time()) % 100000)))


def no_vote(cid):
    return int(cid[2:]) % 10 == 7


def applied(p, key, cid):
    return len(p.deliveries(key, cid, applied=True))


def main(wd):
    rnd = random.Random(SEED)
    h.log('seed %d (TX_CRASH_SEED repeats it), %d transactions' % (SEED, N))
    broker = h.Broker(wd)
    broker.start()
    north, south = Participant('north'), Participant('south')
    jrnd = random.Random(SEED + 1)
    for p in (north, south):
        for phase in ('prepare', 'commit', 'abort'):
            p.rules['%s.%s' % (p.name, phase)] = lambda cid, n: Answer(200, jrnd.random() * 0.02)
    south.rules['south.prepare'] = lambda cid, n: Answer(409 if no_vote(cid) else 200,
                                                         jrnd.random() * 0.02)
    bx = 'reconnect_max = 2;'
    orders = h.Sagad(wd, broker.url, name='orders', broker_extra=bx, conf_extra=TX % 5)
    d_north = h.Sagad(wd, broker.url, name='north', broker_extra=bx,
                      conf_extra=subscription_conf('inbox', ['commands:north.#'], north.url) +
                      'in_doubt_timeout = 5;\n')
    d_south = h.Sagad(wd, broker.url, name='south', broker_extra=bx,
                      conf_extra=subscription_conf('inbox', ['commands:south.#'], south.url) +
                      'in_doubt_timeout = 5;\n')
    for d in (d_north, d_south, orders):
        d.start(timeout=60)

    cids = ['t-%05d' % i for i in range(N)]
    errors = []
    threads = publish_spread(orders.port, cids, lambda cid: (
        'events', 'order.placed', {'order': cid},
        {'Correlation-Id': cid, 'Message-Id': 'start-' + cid}), 20, errors)

    def chaos():
        for at, what in sorted([(rnd.uniform(2, 6), 'orders'), (rnd.uniform(7, 10), 'north'),
                                (rnd.uniform(11, 13), 'broker'),
                                (rnd.uniform(15, 19), 'orders')]):
            time.sleep(max(0, at - (time.time() - t0)))
            h.log('chaos at %.1fs: %s' % (time.time() - t0, what))
            if what == 'broker':
                broker.restart()
            else:
                d = orders if what == 'orders' else d_north
                d.kill()
                time.sleep(rnd.uniform(0.2, 1.5))
                d.start(timeout=60)

    t0 = time.time()
    chaos()
    for t in threads:
        t.join()
    h.check(not errors, 'every start event published', errors[:5])

    def counts():
        m = orders.metrics()
        return {st: m.get('sagad_sagas{saga="reserve-both",state="%s"}' % st, 0)
                for st in ('running', 'compensating', 'completed', 'compensated', 'failed')}
    h.wait_until(lambda: counts()['completed'] + counts()['compensated'] == N, 240,
                 'every transaction committed or aborted')

    states = {c: saga_state(orders, c) for c in cids}
    bad = []
    for cid in cids:
        committed = states[cid] == 'completed'
        if no_vote(cid) and committed:
            bad.append((cid, 'committed despite a no vote'))
        for p in (north, south):
            n = p.name
            prep, com, ab = (applied(p, '%s.%s' % (n, x), cid) for x in ('prepare', 'commit',
                                                                         'abort'))
            if prep > 1:
                bad.append((cid, n, 'PREPARE applied %d times' % prep))
            if committed and (com != 1 or ab):
                bad.append((cid, n, 'committed: commit %d, abort %d' % (com, ab)))
            if not committed and com:
                bad.append((cid, n, 'aborted but COMMIT applied'))

    def aborts_landed():
        missing = []
        for cid in cids:
            if states[cid] == 'completed':
                continue
            for p in (north, south):
                n = p.name
                if applied(p, '%s.prepare' % n, cid) and applied(p, '%s.abort' % n, cid) != 1:
                    missing.append((cid, n))
        return missing
    h.wait_until(lambda: not aborts_landed(), 60, 'every yes voter of an aborted one got ABORT once')
    h.check(not bad, 'the invariant holds for all %d transactions' % N, bad[:10])
    h.log('%d committed, %d aborted' % (sum(1 for s in states.values() if s == 'completed'),
                                        sum(1 for s in states.values() if s == 'compensated')))
    for d in (d_north, d_south):
        h.wait_until(lambda: d.metrics().get('sagad_tx_in_doubt', 1) == 0 and
                     d.metrics().get('sagad_tx_participant_records{state="prepared"}', 1) == 0,
                     60, '%s: no record left prepared or in doubt' % d.name)
    for d in (orders, d_north, d_south):
        d.stop()
    for p in (north, south):
        p.stop()


if __name__ == '__main__':
    h.run_test(main)
