#!/usr/bin/env python3
"""Versioned saga definitions (sagad.conf(5), SAGAS: changing a
definition), on the embedded store and (when PostgreSQL is installed) on
the shared one.

200 orchestrated sagas of version 1 wait at their second step (the
participant holds its answer) and 20 choreographed ones wait for their
event, when the orchestrating sagad is killed (SIGKILL), both definitions
are changed (a new one-way step, the last step's command renamed, the
choreographed step's event renamed) and it is started again. Checked:
every running instance keeps its version (admin API, sagactl), new
instances start on the new one; once the participant answers, the 200
finish on version 1 (its commands, never the new step's or the renamed
command), the new ones on version 2; each version's choreographed event
finishes its own instances only; nothing is logged as damaged, and the
store keeps both versions. On PostgreSQL, a rolling change: version 2
sagas started by one replica are finished by a replica still on the
version 1 file.
"""

import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from sagas import (Answer, Participant, api_publish, saga_get, saga_state, sagactl)  # noqa: E402

N = int(os.environ.get('SAGA_VERSIONS_N', '200'))

V1 = '''sagas = (
  { name = "order"; start = "events:order.created"; timeout = 600;
    steps = (
      { name = "reserve"; command = "commands:stock.reserve"; compensate = "commands:stock.release"; },
      { name = "pay";     command = "commands:pay.charge";    compensate = "commands:pay.refund"; timeout = 600; },
      { name = "ship";    command = "commands:ship.book"; }
    );
    completed = "events:order.done";
  },
  { name = "watch"; mode = "choreographed"; start = "events:watch.start"; timeout = 600;
    steps = ( { name = "packed"; success = "events:parcel.packed"; } );
    completed = "events:watch.done";
  }
);
'''
V2 = (V1.replace('{ name = "ship";    command = "commands:ship.book"; }',
                 '{ name = "tell"; command = "events:order.told"; notify = true; },\n'
                 '      { name = "ship";    command = "commands:ship.book2"; }')
      .replace('success = "events:parcel.packed"', 'success = "events:parcel.packed2"'))
V3 = V2.replace('{ name = "order"; start = "events:order.created"; timeout = 600;',
                '{ name = "order"; start = "events:order.created"; timeout = 601;')
assert V1 != V2 != V3 and 'ship.book2' in V2 and 'packed2' in V2


def versions(d, cids):
    """{saga id: version}; a sagad just restarted on the shared store may
    answer 503 for a moment: each is asked until it answers."""
    out = {}
    for cid in cids:
        got = []
        h.wait_until(lambda: got.append(saga_get(d, cid)) or got[-1], 30,
                     'saga %s readable' % cid, interval=0.2)
        out[cid] = got[-1].get('version')
    return out


def start(d, orders, watches):
    """The start events of orchestrated and choreographed sagas."""
    for key, cids in (('order.created', orders), ('watch.start', watches)):
        for cid in cids:
            api_publish(d.port, 'events', key, {'id': cid},
                        {'Correlation-Id': cid, 'Message-Id': 'start-' + cid})


def scenario(wd, saga_store=''):
    os.makedirs(wd)
    broker = h.Broker(wd)
    broker.start()
    p = Participant('svc')
    gate = threading.Event()
    # Every payment is held (the subscription's timeout and concurrency
    # let all of them wait at once) until the definitions have changed.
    p.rules['pay.charge'] = Answer(200, gate=gate, gate_timeout=300)
    d_svc = h.Sagad(wd, broker.url, name='svc', conf_extra='''subscriptions = (
  { name = "inbox"; bind = [ "commands:#", "events:order.told" ]; deliver = "%s";
    concurrency = 512; timeout = 600; max_attempts = 10; retry_initial = 0.2; retry_max = 2; }
);
''' % p.url)
    orders = h.Sagad(wd, broker.url, name='orders', conf_extra=V1 + saga_store)
    d_svc.start()
    orders.start()
    old = ['o%03d' % i for i in range(N)]
    watch_old = ['w%02d' % i for i in range(20)]
    start(d_svc, old, watch_old)
    h.wait_until(lambda: len({c for _, k, c, _ in p.started if k == 'pay.charge'}) == N, 120,
                 'every version 1 saga waiting at its second step')
    h.wait_until(lambda: all(saga_state(orders, c) == 'running' for c in watch_old), 60,
                 'the choreographed sagas started')
    v1 = versions(orders, old[:3] + watch_old[:1])
    h.check(all(v and len(v) == 16 for v in v1.values()) and v1['o000'] == v1['o001'],
            'each instance records its definition\'s version', v1)

    orders.kill()
    orders.conf_extra = V2 + saga_store
    orders.write_conf()
    r = subprocess.run([h.sagad_path(), '-n', '-s', '-f', orders.conf], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    out = r.stdout.decode()
    h.check(r.returncode == 0 and
            ('saga order: %d unfinished instance(s) of version %s' % (N, v1['o000'])) in out and
            ('saga watch: 20 unfinished instance(s) of version %s' % v1['w00']) in out and
            'saga order: version ' in out,
            'sagad -n -s: the running instances each change affects, by version', out)
    orders.start()
    log = orders.log()
    h.check('saga definition of another version' in log and 'damaged' not in log,
            'restarted on changed definitions: logged, nothing damaged')
    after = versions(orders, old + watch_old)
    h.check(all(after[c] == v1['o000'] for c in old) and
            all(after[c] == v1['w00'] for c in watch_old),
            'after the change every running instance keeps its version',
            {c: v for c, v in after.items() if v not in (v1['o000'], v1['w00'])})
    rc, out, err = sagactl(orders, 'saga', 'o007')
    h.check(rc == 0 and ('version %s' % v1['o000']) in out, 'sagactl saga shows the version', out)
    rc, out, err = sagactl(orders, 'sagas', '--name', 'order', '--limit', '5')
    h.check(rc == 0 and v1['o000'] in out.splitlines()[1], 'sagactl sagas shows it too', out)

    new = ['n%02d' % i for i in range(20)]
    watch_new = ['x%02d' % i for i in range(5)]
    start(d_svc, new, watch_new)
    h.wait_until(lambda: all(saga_get(orders, c) for c in new + watch_new), 60,
                 'the new sagas started')
    v2 = versions(orders, new[:1] + watch_new[:1])
    h.check(v2['n00'] not in (None, v1['o000']) and v2['x00'] not in (None, v1['w00']),
            'new instances start on the new version', (v1, v2))

    gate.set()          # every held payment answers now
    time.sleep(0.5)
    orders.kill()       # and once more in the middle of it
    orders.start()
    # the events of each version: each finishes its own instances only. A
    # version 2 event for a version 1 instance first: it must not count.
    o0 = orders.metric('sagad_saga_orphans_total', 0)
    api_publish(d_svc.port, 'events', 'parcel.packed2', {'p': 'w00'},
                {'Correlation-Id': 'w00', 'Message-Id': 'packed2-w00'})
    h.wait_until(lambda: orders.metric('sagad_saga_orphans_total', 0) > o0, 30,
                 "the version 2 event handled (as nobody's) for w00")
    inst = saga_get(orders, 'w00')
    h.check(inst['state'] == 'running' and
            not [e for e in inst['history'] if e['message_id'] == 'packed2-w00'],
            'a version 2 event does not touch a version 1 instance', inst['history'])
    for cid in watch_old:
        api_publish(d_svc.port, 'events', 'parcel.packed', {'p': cid},
                    {'Correlation-Id': cid, 'Message-Id': 'packed-' + cid})
    for cid in watch_new:
        api_publish(d_svc.port, 'events', 'parcel.packed2', {'p': cid},
                    {'Correlation-Id': cid, 'Message-Id': 'packed2-' + cid})
    h.wait_until(lambda: all(saga_state(orders, c) == 'completed'
                             for c in old + new + watch_old + watch_new), 180,
                 'every saga completed')
    on_v1 = [c for c in old if p.deliveries('ship.book2', c) or p.deliveries('order.told', c)]
    h.check(not on_v1 and all(len(p.deliveries('ship.book', c)) == 1 for c in old),
            'the %d old sagas finished on version 1 (ship.book, no new step)' % N, on_v1[:5])
    h.check(all(len(p.deliveries('ship.book2', c)) == 1 and p.deliveries('order.told', c)
                and not p.deliveries('ship.book', c) for c in new),
            'the new sagas ran version 2 (the one-way step, ship.book2)')
    h.check('damaged' not in orders.log(), 'no instance was ever ignored as damaged')
    if saga_store:
        rolling(wd, broker, orders, d_svc, p, saga_store)
    for x in (orders, d_svc):
        if x.running():
            x.stop()
    broker.stop()
    p.stop()


def rolling(wd, broker, orders, d_svc, p, saga_store):
    """A rolling change on the shared store: a second replica runs the
    version 2 file; the first is restarted on a version 3 and starts
    sagas, then dies: the replica on the older file finishes them, having
    read version 3 from the store when it met it."""
    os.makedirs(os.path.join(wd, 'b'))
    other = h.Sagad(os.path.join(wd, 'b'), broker.url, name='orders', conf_extra=V2 + saga_store)
    other.start()
    orders.kill()
    orders.conf_extra = V3 + saga_store
    orders.write_conf()
    orders.start()
    gate = threading.Event()
    p.rules['pay.charge'] = Answer(200, gate=gate, gate_timeout=300)
    roll = ['r%02d' % i for i in range(20)]
    start(d_svc, roll, [])
    h.wait_until(lambda: len({c for _, k, c, _ in p.started if k == 'pay.charge' and
                              c in roll}) == len(roll), 60, 'the sagas at their payment')
    v3 = [c for c in roll if (saga_get(orders, c) or {}).get('version') not in
          (None, saga_get(orders, 'n00')['version'])]
    orders.kill()       # only the replica on the older file is left
    gate.set()
    h.wait_until(lambda: all(saga_state(other, c) == 'completed' for c in roll), 120,
                 'the sagas finished by the replica on the version 2 file')
    h.check(v3 and all(len(p.deliveries('ship.book2', c)) == 1 and p.deliveries('order.told', c)
                       for c in roll) and 'damaged' not in other.log() and
            'saga definition of another version' in other.log(),
            'rolling change: %d version 3 sagas finished by a replica on the version 2 file'
            % len(v3), v3)
    other.stop()


def main(wd):
    import pg
    pg.on_both_stores(wd, scenario)


if __name__ == '__main__':
    h.run_test(main)
