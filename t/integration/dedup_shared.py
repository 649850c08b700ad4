#!/usr/bin/env python3
"""Inbox deduplication across replicas (issue 15 part 3): two sagad
replicas of one service consume one subscription with dedup = "shared",
their claims in a private PostgreSQL (t/lib/pg.py), delivering to one
service that counts message ids.

Checked: `sagad -n` refuses dedup = "shared" without the PostgreSQL store
and an unknown dedup value; copies of one message id published several
times, spread over both replicas, reach the service once; a replica
SIGKILLed between its commit and its ack (PostgreSQL frozen with SIGSTOP,
so that its claims cannot finish; the broker hands its unacked messages to
the other replica) and restarted: every message is delivered once, by
whichever replica holds its claim; the consumed table has one claim per
message id, named by a replica's store.

The replica id: both sagads run on one host, so a name made of host and
store file name (both stores are orders.db) would not tell them apart;
each store's random id (GET /v1/admin/status) is 32 hex digits, differs
between the two, and is the same after a's restart; every claim names
one of the two.

Skipped (77) when PostgreSQL is not installed.
"""

import collections
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import pg  # noqa: E402

SUB = '''subscriptions = (
  { name = "inbox"; bind = [ "events:item.#" ]; deliver = "%s"; concurrency = 8;
    timeout = 30; max_attempts = 10; retry_initial = 0.2; retry_max = 1; %s }
);
'''


def store_conf(conninfo):
    return 'saga_store = { backend = "pgsql"; conninfo = %s; };\n' % h.conf_str(conninfo)


def conf_errors(wd):
    """dedup = "shared" needs the PostgreSQL store; only two values."""
    d = h.Sagad(wd, 'amqp://guest:guest@127.0.0.1:1/%2f', name='cfgcheck',
                conf_extra=SUB % ('http://127.0.0.1:1/', 'dedup = "shared";'))
    r = subprocess.run([h.sagad_path(), '-n', '-f', d.conf], capture_output=True, text=True)
    h.check(r.returncode != 0 and 'dedup = "shared" needs saga_store.backend = "pgsql"' in r.stderr,
            'sagad -n: dedup = "shared" without the PostgreSQL store is refused', r.stderr)
    d.conf_extra = SUB % ('http://127.0.0.1:1/', 'dedup = "both";')
    d.write_conf()
    r = subprocess.run([h.sagad_path(), '-n', '-f', d.conf], capture_output=True, text=True)
    h.check(r.returncode != 0 and 'dedup must be "local" or "shared"' in r.stderr,
            'sagad -n: an unknown dedup value is refused', r.stderr)


def pg_pids(db):
    return [db.proc.pid] + h._descendants(db.proc.pid)


def pg_signal(db, sig):
    for pid in pg_pids(db):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def delivered(svc):
    with svc.lock:
        return collections.Counter(c['headers'].get('message-id') for c in svc.calls
                                   if c.get('answer') == 200)


def wait_all(svc, ids, timeout, what):
    h.wait_until(lambda: set(delivered(svc)) >= set(ids), timeout, what)


def replica_id(d):
    return d.admin_json('/v1/admin/status')[1]['store']['replica_id']


def main(wd):
    conf_errors(wd)
    broker = h.Broker(wd)
    broker.start()
    db = pg.Postgres(os.path.join(wd, 'pg'))
    db.start()
    svc = h.Service()
    extra = SUB % (svc.url, 'dedup = "shared";') + store_conf(db.conninfo)
    for r in ('a', 'b'):
        os.makedirs(os.path.join(wd, r), exist_ok=True)
    a = h.Sagad(os.path.join(wd, 'a'), broker.url, name='orders', conf_extra=extra)
    b = h.Sagad(os.path.join(wd, 'b'), broker.url, name='orders', conf_extra=extra)
    a.start()
    b.start()
    ids0 = {'a': replica_id(a), 'b': replica_id(b)}
    h.check(all(re.fullmatch('[0-9a-f]{32}', i) for i in ids0.values()) and
            ids0['a'] != ids0['b'],
            'two stores on one host (both orders.db) have distinct random replica ids', ids0)
    tool = h.AmqpTool()

    # ---- copies of one id, spread over both replicas: delivered once
    n = tool.send(broker.url, 'events', 'item.copy', body='{"n":{n}}',
                  message_id='copy-{n}', count=200)
    n += tool.send(broker.url, 'events', 'item.copy', body='{"n":{n}}',
                   message_id='copy-{n}', count=200)
    h.check(n == 400, 'published 200 ids twice')
    ids = ['copy-%d' % i for i in range(200)]
    wait_all(svc, ids, 60, 'every copy-* id delivered')
    h.wait_drained([a, b], 60)
    got = delivered(svc)
    h.check(all(got[i] == 1 for i in ids), 'each of 200 ids published twice reached the service once',
            {i: got[i] for i in ids if got[i] != 1})
    shares = (a.metric('sagad_duplicates_total{subscription="inbox"}', 0),
              b.metric('sagad_duplicates_total{subscription="inbox"}', 0))
    h.check(sum(shares) == 200, 'the 200 copies were counted as duplicates (a, b: %s)' % (shares,))

    # ---- a replica killed between its commit and its ack
    # PostgreSQL frozen: the claims of both replicas wait; a's records are
    # durable in its own store, unacked.
    pg_signal(db, signal.SIGSTOP)
    try:
        tool.send(broker.url, 'events', 'item.kill', body='{"n":{n}}', message_id='kill-{n}',
                  count=100)
        held = 'sagad_inbox_backlog{subscription="inbox"}'
        # (each replica holds up to its prefetch, 2 x concurrency)
        h.wait_until(lambda: a.metric(held, 0) >= 8 and b.metric(held, 0) >= 8, 30,
                     'both replicas hold kill-* messages (claims waiting)')
        held_a = a.metric(held, 0)
        a.kill()
        h.log('replica a SIGKILLed holding %d records whose claims wait' % held_a)
    finally:
        pg_signal(db, signal.SIGCONT)
    kill_ids = ['kill-%d' % i for i in range(100)]
    # b gets a's unacked messages again; the claims decide.
    a.start()
    h.check(replica_id(a) == ids0['a'], 'a restart keeps the replica id (%s)' % ids0['a'])
    wait_all(svc, kill_ids, 90, 'every kill-* id delivered (a restarted)')
    h.wait_until(lambda: all(delivered(svc)[i] >= 1 for i in kill_ids), 30, 'settled')
    time.sleep(1.0)  # a late second delivery would show here
    got = delivered(svc)
    h.check(all(got[i] == 1 for i in kill_ids),
            'each kill-* id reached the service once across the kill and the restart',
            {i: got[i] for i in kill_ids if got[i] != 1})
    with db.connect() as c:
        rows = c.query("SELECT message_id, replica FROM sagad.consumed WHERE service = 'orders'"
                       " AND subscription = 'inbox' AND message_id LIKE 'kill-%'")
    per = collections.Counter(r[0] for r in rows)
    h.check(len(per) == 100 and set(per.values()) == {1},
            'one claim per kill-* id in PostgreSQL (%d claims)' % len(rows))
    names = {v: k for k, v in ids0.items()}
    owners = collections.Counter(names.get(r[1], r[1]) for r in rows)
    h.log('claims by replica store: %s' % dict(owners))
    h.check(set(owners) <= {'a', 'b'}, 'every claim names one of the two stores\' ids',
            dict(owners))
    for d in (a, b):
        h.check(d.stop() == 0, 'replica %s stops cleanly' % d.dir)
    db.stop()
    broker.stop()


if __name__ == '__main__':
    if not pg.available():
        print('skipped: PostgreSQL server not installed (apt-get install postgresql)')
        sys.exit(77)
    h.run_test(main)
