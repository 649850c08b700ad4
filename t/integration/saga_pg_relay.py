#!/usr/bin/env python3
"""src/saga_pg_relay.c, the PostgreSQL saga outbox relay, driven by
t/pgrelay against a private PostgreSQL (t/lib/pg.py) and a private RabbitMQ
node:

  - rows claimed by this replica are published (properties and headers as
    props_pack wrote them), per saga in seq order, and deleted within seconds of
    their confirm
  - rows of a dead replica (claim older than grace) and unclaimed rows are
    taken over; rows of a live replica (claim refreshed) are not, until its
    claim goes stale
  - RabbitMQ stopped mid-run: rows stay in the table until confirmed;
    restarted, everything arrives (copies only of rows in flight)
  - PostgreSQL restarted mid-run: everything arrives, copies bounded
  - two relays (two replicas) on one table: every row at least once, per
    saga in seq order
"""

import collections
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402
import pg  # noqa: E402

SCHEMA = 'sagad'
SERVICE = 'orders'
GRACE = 3
QUEUE = 'relay-check'
TOOL = os.path.join(h.top_builddir, 't', 'pgrelay')
OUTBOX = '%s.outbox' % SCHEMA


class Relay:
    """One t/pgrelay run: a relay for replica name."""

    def __init__(self, workdir, conf, conninfo, name):
        self.name = name
        self.logfile = os.path.join(workdir, 'relay-%s.log' % name)
        self._log = open(self.logfile, 'ab')
        self.proc = subprocess.Popen([TOOL, 'run', conf, conninfo, SCHEMA, SERVICE, name,
                                      str(GRACE)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True)
        h._register(self)
        line = self.proc.stdout.readline()
        h.check(line.strip() == 'started', 'relay %s started' % name,
                detail=line + h.tail(self.logfile))

    def cmd(self, c):
        self.proc.stdin.write(c + '\n')
        self.proc.stdin.flush()

    def stats(self):
        self.cmd('stats')
        line = self.proc.stdout.readline().split()
        return {k: int(v) for k, v in (f.split('=') for f in line[1:])}

    def stop(self):
        self.cmd('quit')
        rc = self.proc.wait(30)
        self._cleanup()
        h.check(rc == 0, 'relay %s stopped cleanly' % self.name, detail=h.tail(self.logfile))

    def _cleanup(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        h._unregister(self)


def pack(*args):
    return subprocess.run([TOOL, 'pack'] + list(args), check=True, capture_output=True,
                          text=True).stdout.strip()


def props_of(saga):
    return pack('c=application/json', 'i=' + saga, 't=step', 'h:saga=' + saga,
                'h:x-kind=command')


def insert(c, rows):
    """rows: (message_id, saga, claimed_by, claimed_at[, exchange]); props
    per saga."""
    props = {}
    values = []
    for row in rows:
        mid, saga, by, at = row[:4]
        if saga not in props:
            props[saga] = props_of(saga)
        values.append("(%s, %s, %s, %s, '\\x%s'::bytea, %s, %s, %f, %s, %s)" % (
            pg.quote_literal(SERVICE), pg.quote_literal(mid),
            pg.quote_literal(row[4] if len(row) > 4 else 'events'),
            pg.quote_literal('saga.' + saga), props[saga], pg.bytea_literal(('body of ' + mid).encode()), pg.quote_literal(saga),
            time.time(), 'NULL' if by is None else pg.quote_literal(by),
            'NULL' if at is None else '%f' % at))
    for i in range(0, len(values), 1000):
        c.query('INSERT INTO %s (service, message_id, exchange, routing_key, props, body,'
                ' saga_id, created_at, claimed_by, claimed_at) VALUES %s'
                % (OUTBOX, ','.join(values[i:i + 1000])))


def insert_series(c, prefix, n, sagas, by):
    """n rows, message ids prefix-<i>, saga prefix-s<i % sagas>, claimed by
    by now: one statement (props of saga 'bulk')."""
    c.query("INSERT INTO %s (service, message_id, exchange, routing_key, props, body, saga_id,"
            " created_at, claimed_by, claimed_at) SELECT %s, %s || '-' || g, 'events',"
            " 'saga.bulk', '\\x%s'::bytea, convert_to('body ' || g, 'UTF8'),"
            " %s || '-s' || (g %% %d), %f, %s, %s FROM generate_series(0, %d) g"
            % (OUTBOX, pg.quote_literal(SERVICE), pg.quote_literal(prefix), props_of('bulk'),
               pg.quote_literal(prefix), sagas, time.time(),
               'NULL' if by is None else pg.quote_literal(by),
               'NULL' if by is None else '%f' % time.time(), n - 1))


def count(c, where='true'):
    return int(c.scalar('SELECT count(*) FROM %s WHERE %s' % (OUTBOX, where)))


def consume(broker, n, timeout=5):
    return broker.tool.consume(broker.url, QUEUE, n, timeout=timeout)


def num(mid):
    return int(mid.rsplit('-', 1)[1])


def check_order(msgs, what, sagas):
    """Bulk rows (insert_series): per saga (prefix-s<i % sagas[prefix]>),
    message numbers ascending when copies are left out. Returns the number
    of copies."""
    last, seen, copies = {}, set(), 0
    for m in msgs:
        mid = m['message_id']
        if mid in seen:
            copies += 1
            continue
        seen.add(mid)
        prefix, i = mid.rsplit('-', 1)[0], num(mid)
        key = (prefix, i % sagas[prefix])
        if last.get(key, -1) > i:
            raise AssertionError('%s: saga %s out of order: %s after number %d'
                                 % (what, key, mid, last[key]))
        last[key] = i
    h.log('%s: per saga in seq order (%d sagas)' % (what, len(last)))
    return copies


def wait_empty(c, timeout, what):
    h.wait_until(lambda: count(c) == 0, timeout, what)


def basic(db, broker, c, relay):
    rows = [('b%d-%d' % (s, i), 'b%d' % s, 'A', time.time()) for i in range(10) for s in range(5)]
    insert(c, rows)
    relay.cmd('kick')
    wait_empty(c, 20, 'the rows published and deleted')
    got = consume(broker, 100)
    h.check(len(got) == 50 and len({m['message_id'] for m in got}) == 50,
            'every row published once (50)', detail=len(got))
    m = [x for x in got if x['message_id'] == 'b3-7'][0]
    h.check(m['correlation_id'] == 'b3' and m['content_type'] == 'application/json' and
            m['type'] == 'step' and m['headers'].get('saga') == 'b3' and
            m['headers'].get('x-kind') == 'command' and m['body'] == 'body of b3-7' and
            m['routing_key'] == 'saga.b3' and m['exchange'] == 'events' and
            m['delivery_mode'] == 2, 'properties, headers, body as stored', detail=m)
    per_saga = collections.defaultdict(list)
    for x in got:
        per_saga[x['correlation_id']].append(num(x['message_id']))
    h.check(all(v == list(range(10)) for v in per_saga.values()) and len(per_saga) == 5,
            'per saga, rows in seq order', detail=dict(per_saga))
    st = relay.stats()
    h.check(st['published'] == 50 and st['deleted'] == 50 and st['held'] == 0 and
            st['inflight'] == 0 and st['taken'] == 0, 'stats: 50 published and deleted,'
            ' none taken over', detail=st)


def takeover(db, broker, c, relay):
    now = time.time()
    rows = [('dead%d-%d' % (s, i), 'dead%d' % s, 'dead', now - 100)
            for i in range(10) for s in range(2)]
    rows += [('free0-%d' % i, 'free0', None, None) for i in range(10)]
    rows += [('live%d-%d' % (s, i), 'live%d' % s, 'live', now)
             for i in range(10) for s in range(2)]
    # a saga whose first row a live replica holds: the dead one's later
    # rows of it must wait (order across replicas)
    rows += [('mixed0-0', 'mixed0', 'live', now), ('mixed0-1', 'mixed0', 'dead', now - 100)]
    insert(c, rows)
    stop = threading.Event()

    def keep_alive():
        with db.connect() as k:
            while not stop.is_set():
                k.query("UPDATE %s SET claimed_at = %f WHERE claimed_by = 'live'"
                        % (OUTBOX, time.time()))
                stop.wait(0.3)
    t = threading.Thread(target=keep_alive, daemon=True)
    t.start()
    relay.cmd('kick')
    h.wait_until(lambda: count(c, "claimed_by = 'dead' OR claimed_by IS NULL") <= 1, 20,
                 "the dead replica's and the unclaimed rows published")
    time.sleep(GRACE + 1)
    h.check(count(c, "claimed_by = 'live'") == 21 and count(c, "message_id = 'mixed0-1'") == 1,
            "a live replica's rows (claim refreshed) untouched after %ds, and the dead"
            " replica's row behind its saga's live row waits" % (GRACE + 1))
    got = consume(broker, 100, timeout=2)
    h.check(sorted(m['message_id'] for m in got) ==
            sorted(r[0] for r in rows if r[2] != 'live' and r[0] != 'mixed0-1'),
            'the 30 taken-over rows arrived, once each', detail=len(got))
    stop.set()
    t.join()
    h.log('the live replica stops refreshing: its claims go stale')
    wait_empty(c, GRACE + 10, "the stale replica's rows taken over")
    got = consume(broker, 100, timeout=2)
    h.check(len(got) == 22, 'its 21 rows and the mixed saga\'s second arrived', detail=len(got))
    h.check([m['message_id'] for m in got if m['correlation_id'] == 'mixed0'] ==
            ['mixed0-0', 'mixed0-1'], 'the mixed saga in seq order')
    st = relay.stats()
    h.check(st['taken'] == 52, 'stats: 52 rows taken over', detail=st)


def unroutable(db, broker, c, relay):
    """A row nobody's queue is bound for comes back (basic.return): it is
    retried after a backoff, the later rows of its saga wait behind it, other
    sagas go on; once a queue is bound it goes, then the rest of its saga."""
    now = time.time()
    insert(c, [('u0-0', 'u0', 'A', now, 'commands'), ('u0-1', 'u0', 'A', now),
               ('u1-0', 'u1', 'A', now), ('u1-1', 'u1', 'A', now)])
    relay.cmd('kick')
    h.wait_until(lambda: relay.stats()['unroutable'] >= 2, 20, 'the row returned, retried')
    got = consume(broker, 10, timeout=2)
    h.check(sorted(m['message_id'] for m in got) == ['u1-0', 'u1-1'],
            'the other saga went on; the returned row\'s saga waits behind it',
            detail=[m['message_id'] for m in got])
    h.check(count(c) == 2, 'the returned row and the one behind it stay in the table')
    broker.tool.declare_queue(broker.url, 'late', [('commands', '#')])
    wait_empty(c, 40, 'once bound, the returned row and the rest of its saga published')
    late = broker.tool.consume(broker.url, 'late', 10, timeout=2)
    h.check([m['message_id'] for m in late] == ['u0-0'], 'the returned row arrived, once',
            detail=late)
    got = consume(broker, 10, timeout=2)
    h.check([m['message_id'] for m in got] == ['u0-1'], 'then the row behind it')
    broker.tool.delete(broker.url, 'late')


def start_bulk(c, relay, prefix, n):
    """n rows of 300 sagas claimed by relay A; returns once 2000 are out."""
    insert_series(c, prefix, n, 300, 'A')
    before = relay.stats()['published']
    relay.cmd('kick')
    h.wait_until(lambda: relay.stats()['published'] - before >= 2000, 30, '2000 published')


def all_arrived(broker, n, what, sagas):
    """Consumes what came: every one of n rows, per saga in order; returns
    the number of copies."""
    got = consume(broker, n + 1000, timeout=5)
    ids = {m['message_id'] for m in got}
    copies = check_order(got, what, sagas)
    h.check(len(ids) == n, '%s: all %d rows arrived' % (what, n), detail=len(ids))
    h.log('%s: %d copies' % (what, copies))
    return copies


def settled(relay):
    st = relay.stats()
    return st['broker'] == 0 and st['deleted'] >= st['published']


def broker_restart(db, broker, c, relay):
    n = 20000
    start_bulk(c, relay, 'rmq', n)
    broker.kill()       # no goodbye: confirms of what is in flight never come
    # Confirmed rows linger up to 2 s for a reply's batch before their
    # DELETE (SAGA_PG_RELAY_LINGER): count once every confirmed row is gone.
    h.wait_until(lambda: settled(relay), 10, 'the confirmed rows deleted')
    left = count(c)
    h.check(0 < left < n, 'RabbitMQ killed mid-run (%d rows left)' % left)
    time.sleep(2)
    st = relay.stats()
    h.check(st['broker'] == 0 and count(c) == left,
            'while RabbitMQ is down the rows stay in the table', detail=(st, count(c)))
    broker.start()
    wait_empty(c, 120, 'everything published once RabbitMQ is back')
    copies = all_arrived(broker, n, 'RabbitMQ restart', {'rmq': 300})
    h.check(copies <= 256, 'copies only of rows in flight (at most the window, 256)')


def pg_restart(db, broker, c, relay):
    n = 20000
    start_bulk(c, relay, 'pgr', n)
    c.close()
    db.restart('fast')
    with db.connect() as c2:
        h.check(count(c2) > 0, 'PostgreSQL restarted mid-run')
        wait_empty(c2, 120, 'everything published after the PostgreSQL restart')
    copies = all_arrived(broker, n, 'PostgreSQL restart', {'pgr': 300})
    h.check(copies <= 512, 'copies bounded by the rows held (512)')
    st = relay.stats()
    h.check(st['pg'] == 1 and st['held'] == 0, 'the relay reconnected', detail=st)


def two_relays(db, broker, c, a, b):
    n = 10000
    insert_series(c, 'two', n, 200, None)       # unclaimed: both compete
    insert_series(c, 'twa', 2000, 50, 'A')
    insert_series(c, 'twb', 2000, 50, 'B')
    ta, tb = a.stats()['taken'], b.stats()['taken']
    a.cmd('kick')
    b.cmd('kick')
    wait_empty(c, 120, 'both relays emptied the table')
    copies = all_arrived(broker, n + 4000, 'two relays', {'two': 200, 'twa': 50, 'twb': 50})
    sa, sb = a.stats(), b.stats()
    h.log('two relays: A took %d, B took %d unclaimed rows, %d copies'
          % (sa['taken'] - ta, sb['taken'] - tb, copies))
    h.check(sa['taken'] - ta + sb['taken'] - tb >= n, 'the unclaimed rows were claimed')
    h.check(copies == 0, 'no copies while both live')


def failover(db, broker, c, a, b):
    """Relay A SIGKILLed mid-run: B takes its rows over once their claim is
    older than grace; at least once, copies only of what A held."""
    n = 5000
    insert_series(c, 'fo', n, 100, 'A')
    before, tb = a.stats()['published'], b.stats()['taken']
    a.cmd('kick')
    h.wait_until(lambda: a.stats()['published'] - before >= 500, 30, '500 published by A')
    a.proc.kill()
    a._cleanup()
    t0 = time.time()
    h.check(count(c) > 0, 'relay A killed mid-run (%d rows left)' % count(c))
    wait_empty(c, GRACE + 60, 'relay B took over and emptied the table')
    h.log('B took %d rows over, the table empty %.1fs after the kill'
          % (b.stats()['taken'] - tb, time.time() - t0))
    copies = all_arrived(broker, n, 'failover', {'fo': 100})
    h.check(copies <= 512, 'copies only of rows A held (at most 512)')


def main(workdir):
    db = pg.Postgres(workdir)
    db.start()
    broker = h.Broker(workdir)
    broker.start()
    broker.tool.declare_queue(broker.url, QUEUE, [('events', '#')])
    conf = h.Sagad(workdir, broker.url, name=SERVICE, heartbeat=2).conf
    c = db.connect()
    a = Relay(workdir, conf, db.conninfo, 'A')
    h.wait_until(lambda: a.stats()['broker'] == 1 and a.stats()['pg'] == 1, 30,
                 'relay A connected to both')
    basic(db, broker, c, a)
    takeover(db, broker, c, a)
    unroutable(db, broker, c, a)
    broker_restart(db, broker, c, a)
    pg_restart(db, broker, c, a)
    c = db.connect()
    b = Relay(workdir, conf, db.conninfo, 'B')
    h.wait_until(lambda: b.stats()['broker'] == 1 and b.stats()['pg'] == 1, 30,
                 'relay B connected to both')
    two_relays(db, broker, c, a, b)
    failover(db, broker, c, a, b)
    b.stop()


if __name__ == '__main__':
    if not os.path.exists(TOOL):
        print('skipped: t/pgrelay is not built (libpq missing)')
        sys.exit(77)
    if not pg.available():
        print('skipped: PostgreSQL server not installed (apt-get install postgresql)')
        sys.exit(77)
    h.run_test(main)
