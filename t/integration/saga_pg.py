#!/usr/bin/env python3
"""Sagas on the PostgreSQL saga store (saga_store = { backend = "pgsql"; },
issue 15): one orchestrating sagad ("orders") whose sagas live in a private
PostgreSQL (t/lib/pg.py), with the participants and plans of saga_crash.py
(stock, payment, web) on a private RabbitMQ.

Checked: the generated configuration is valid (sagad -n) and sagad creates
the schema; a few hundred sagas (env SAGA_PG_N), three quarters
orchestrated, one quarter choreographed, some failing on purpose, reach
their planned state, in the admin API and in the schema's instances table,
with every command and compensation applied exactly once and compensations
in reverse order; a saga timeout and a step timeout fire (their timers are
rows of the timers table); `sagactl saga retry` and `sagactl saga abort`,
an abort repeated answering 409 (harmless), and one while PostgreSQL is
down answering 503 (outcome unknown);
SIGKILL of the orchestrator mid-run; PostgreSQL stopped for a few seconds
mid-run (the start events of that time stay in the saga queue, nothing of
theirs reaches a participant) and started again; a saga whose lock
another session holds (its batch cancelled six times, then ended by
lock_timeout) is retried as a transient error, never refused, and
completes once the lock is released; the password of the conninfo is
never shown; the replicas table names both runs of the orchestrator
(before and after the SIGKILL) by its store's replica id and the run's
start (id:ms), with this host and each run's pid beside.

Skipped (77) when PostgreSQL is not installed, and, after the parts that
need no PostgreSQL backend (PostgreSQL up, sagad -n), while this sagad
refuses backend "pgsql" (the backend is not wired in yet).
"""

import os
import re
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import pg  # noqa: E402
from sagas import Answer, api_publish, hist_entries, saga_get, sagactl  # noqa: E402
from saga_crash import (FULFIL_SAGA, ORDER_SAGA, START_KEYS, Cast,  # noqa: E402
                        check_final_states, plan, publish_starts)

N = int(os.environ.get('SAGA_PG_N', '300'))
SERVICE = 'orders'
SECRET = 'pg-s3cret'
STATES = {0: 'running', 1: 'completed', 2: 'compensating', 3: 'compensated', 4: 'failed'}

# A saga timeout, a step timeout, and a saga whose compensation gives up
# soon (failed, for `sagactl saga retry`).
MORE_SAGAS = '''
  { name = "timed"; start = "events:timed.created"; timeout = 4;
    steps = ( { name = "reserve"; command = "commands:stock.reserve";
                compensate = "commands:stock.release"; timeout = 60; } );
    completed = "events:done.timed"; compensated = "events:undone.timed"; },
  { name = "steptmo"; start = "events:steptmo.created"; timeout = 120;
    steps = ( { name = "reserve"; command = "commands:stock.reserve";
                compensate = "commands:stock.release"; timeout = 1; attempts = 2; } );
    completed = "events:done.steptmo"; compensated = "events:undone.steptmo"; },
  { name = "manual"; start = "events:manual.created"; timeout = 300;
    steps = ( { name = "reserve"; command = "commands:stock.reserve";
                compensate = "commands:stock.release"; timeout = 120; },
              { name = "authorize"; command = "commands:payment.authorize";
                compensate = "commands:payment.cancel"; timeout = 120; } );
    completed = "events:done.manual"; compensated = "events:undone.manual";
    compensate_attempts = 2; compensate_timeout = 10; retry_initial = 0.2; retry_max = 0.5; }'''
MORE_KEYS = {'timed': 'timed.created', 'steptmo': 'steptmo.created', 'manual': 'manual.created'}


def saga_store_conf(conninfo):
    return 'saga_store = {\n  backend = "pgsql";\n  conninfo = %s;\n  schema = "sagad";\n' \
        '  relay_grace = 2;\n};\n' % h.conf_str(conninfo)


def pg_rows(db, sql):
    """sql's rows on a fresh connection (PostgreSQL may have been restarted)."""
    with db.connect() as c:
        return c.query(sql)


def pg_instances(db):
    """{(saga, id): state name} of the service's instances."""
    return {(saga, cid): STATES.get(int(st), st) for saga, cid, st in pg_rows(
        db, 'SELECT saga, id, state FROM sagad.instances WHERE service = %s'
        % pg.quote_literal(SERVICE))}


def pg_count(db, table, where=''):
    return int(pg_rows(db, 'SELECT count(*) FROM sagad.%s WHERE service = %s%s'
                       % (table, pg.quote_literal(SERVICE), where))[0][0])


def saga_queue(broker):
    """(ready, unacked) messages of the service's saga queue."""
    for line in broker.ctl('list_queues', '-q', 'name', 'messages_ready',
                           'messages_unacknowledged').splitlines():
        f = line.split()
        if len(f) == 3 and f[0] == SERVICE + '.sagas':
            return int(f[1]), int(f[2])
    return 0, 0


def start_one(d_web, cid, saga):
    key = MORE_KEYS.get(saga) or START_KEYS[saga]
    api_publish(d_web.port, 'events', key, {'cid': cid},
                {'Correlation-Id': cid, 'Message-Id': 'start-' + cid})


def lock_held(db, d_web, orders):
    """pg-lk1 starts while another session holds the advisory lock of its
    saga id (the saga store's batch waits on it): six cancels of the
    waiting statement (57014) and then lock_timeout (55P03, 10 s) are
    transient errors: the batch is retried after a backoff, never counted
    toward the job's tries (PGS_ATTEMPTS = 5 would have refused it)."""
    key = 'hashtextextended(%s || chr(31) || %s, 0)' % (pg.quote_literal(SERVICE),
                                                       pg.quote_literal('pg-lk1'))
    waiting_sql = ("SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                   " AND wait_event = 'advisory' AND query LIKE '%pg_advisory_xact_lock(k)%'")
    failures = 'sagad_saga_store_failures_total'
    transient = 'sagad_saga_store_transient_failures_total'
    transient0 = orders.metric(transient, 0)
    locker = db.connect()
    locker.query('SELECT pg_advisory_lock(%s)' % key)
    start_one(d_web, 'pg-lk1', 'order')
    with db.connect() as c:
        # the job alone fails five times: the old rule refused it at the fifth
        for i in range(6):
            before = orders.metric(failures, 0)
            h.wait_until(lambda: c.query(waiting_sql), 15,
                         'pg-lk1: the saga store waits for the lock (%d)' % (i + 1), interval=0.05)
            for pid, in c.query(waiting_sql):
                c.query('SELECT pg_cancel_backend(%s)' % pid)
            h.wait_until(lambda: orders.metric(failures, 0) > before, 15,
                         'pg-lk1: the cancelled batch rolled back (%d)' % (i + 1), interval=0.05)
        h.log('pg-lk1: its batch cancelled 6 times; now waiting for lock_timeout')
        h.wait_until(lambda: c.query(waiting_sql), 15,
                     'pg-lk1: the saga store waits for the lock again', interval=0.05)
        before = orders.metric(failures, 0)
        h.wait_until(lambda: orders.metric(failures, 0) > before and '55P03' in orders.log(),
                     20, 'pg-lk1: lock_timeout (10 s) ends the wait: 55P03')
    h.check(orders.metric(transient, 0) - transient0 >= 7,
            'the 6 cancels and the lock_timeout counted as transient failures (%g)'
            % (orders.metric(transient, 0) - transient0))
    h.check(not (saga_get(orders, 'pg-lk1') or {}).get('state'),
            'pg-lk1: not started while the lock is held')
    locker.close()
    h.check('failed every try' not in orders.log(),
            'no saga job refused for a transient error (seven in a row)')


def check_replicas(db, orders, pids):
    """The replicas table: a run is its store's id and its start (id:ms),
    its host and pid beside; a restart keeps the id, not the run."""
    rid = orders.admin_json('/v1/admin/status')[1]['store']['replica_id']
    h.check(re.fullmatch('[0-9a-f]{32}', rid), 'the store\'s replica id: 32 hex digits', rid)
    rows = pg_rows(db, 'SELECT replica, host, pid FROM sagad.replicas WHERE service = %s'
                   % pg.quote_literal(SERVICE))
    runs = [r for r, host, pid in rows if re.fullmatch(re.escape(rid) + ':[0-9]+', r) and
            host == socket.gethostname() and int(pid) in pids]
    h.check(len(runs) == 2 and len(rows) == 2,
            'sagad.replicas: the two runs of orders (pids %s), named id:ms, host and pid beside'
            % sorted(pids), rows)


def main(wd):
    plans = [plan(i) for i in range(N)]
    # started while PostgreSQL is down: orchestrated, all complete
    down = [('pg-down-%02d' % i, 'order', 'completed', None) for i in range(10)]
    # started while another session holds its saga id's lock
    locked = [('pg-lk1', 'order', 'completed', None)]
    by_cid = {p[0]: p for p in plans + down + locked}

    db = pg.Postgres(wd)
    db.start()
    conninfo = db.conninfo + " password='%s'" % SECRET   # trust: never sent, never shown
    cast = Cast(wd, by_cid, 'sagas = (%s,%s,%s\n);\n' % (ORDER_SAGA, FULFIL_SAGA, MORE_SAGAS) +
                saga_store_conf(conninfo))
    broker, orders, stock, payment = cast.broker, cast.orders, cast.stock, cast.payment
    d_web = cast.d_web
    r = subprocess.run([h.sagad_path(), '-n', '-f', orders.conf], capture_output=True,
                       text=True, timeout=30)
    h.check(r.returncode == 0, 'sagad -n: the configuration with saga_store pgsql is valid',
            r.stderr)
    h.check(SECRET not in r.stdout + r.stderr, 'sagad -n does not show the password')
    try:
        orders.start(timeout=60)
    except (AssertionError, RuntimeError):
        if 'saga_store: backend \\"pgsql\\" is not available' in orders.log():
            raise h.Skip('this sagad refuses saga_store backend "pgsql" (not wired in yet)')
        raise
    tables = {t for t, in pg_rows(db, "SELECT table_name FROM information_schema.tables "
                                      "WHERE table_schema = 'sagad'")}
    h.check({'instances', 'history', 'timers', 'outbox'} <= tables,
            'sagad created the schema "sagad" in PostgreSQL', sorted(tables))

    # ---- the timeouts, retry and abort: their participants wait on gates
    specials = [('pg-tt1', 'timed', 'compensated', None), ('pg-st1', 'steptmo', 'compensated', None),
                ('pg-cn1', 'manual', 'compensated', None), ('pg-ab1', 'manual', 'compensated', None)]
    tt1_go, st1_go, ab1_go = threading.Event(), threading.Event(), threading.Event()
    stock.rules[('stock.reserve', 'pg-tt1')] = Answer(200, gate=tt1_go)
    stock.rules[('stock.reserve', 'pg-st1')] = Answer(200, gate=st1_go)
    payment.rules[('payment.authorize', 'pg-cn1')] = Answer(409)
    stock.rules[('stock.release', 'pg-cn1')] = Answer(409)
    payment.rules[('payment.authorize', 'pg-ab1')] = Answer(200, gate=ab1_go)
    for cid, saga, _, _ in specials:
        start_one(d_web, cid, saga)
    # the timers are rows in PostgreSQL (the saga timeout fires after 4 s)
    h.wait_until(lambda: pg_count(db, 'timers', " AND id = 'pg-tt1'") >= 1, 3.5,
                 'pg-tt1: its timers in sagad.timers', interval=0.05)

    errors = []
    half = N // 2
    t0 = time.time()
    # ---- batch 1, with a SIGKILL of the orchestrator in the middle
    threads = publish_starts(d_web, plans[:half], max(4.0, half / 60.0), errors)
    h.wait_until(lambda: pg_count(db, 'instances') >= half // 3, 60,
                 'a third of batch 1 in the instances table')
    pids = {orders.proc.pid}
    h.wait_until(lambda: pg_count(db, 'replicas', ' AND pid = %d' % orders.proc.pid) == 1, 10,
                 'the first run\'s heartbeat in sagad.replicas (every 5 s)')
    orders.kill()
    h.log('SIGKILL orchestrator (batch 1)')
    orders.start(timeout=60)
    pids.add(orders.proc.pid)

    # ---- the timeouts fire (after the restart: their timers were in PostgreSQL)
    h.wait_until(lambda: hist_entries(saga_get(orders, 'pg-tt1') or {}, 'saga timeout'), 30,
                 'pg-tt1: the saga timeout (4 s) fired')
    tt1_go.set()        # its reserve succeeds late: compensated
    h.wait_until(lambda: hist_entries(saga_get(orders, 'pg-st1') or {}, 'step timeout', 'reserve'),
                 30, 'pg-st1: the step timeout (2 x 1 s) fired')
    st1_go.set()

    # ---- abort and retry
    h.wait_until(lambda: payment.has_started('payment.authorize', 'pg-ab1'), 30,
                 'payment.authorize of pg-ab1 reaching the payment service')
    h.check(pg_count(db, 'timers', " AND id = 'pg-ab1'") >= 1,
            'pg-ab1: its step timer in sagad.timers while authorize runs')
    rc, out, err = sagactl(orders, 'saga', 'abort', 'pg-ab1')
    h.check(rc == 0 and 'pg-ab1' in out, 'sagactl saga abort pg-ab1: exit 0', (rc, out, err))
    rc, out, err = sagactl(orders, 'saga', 'abort', 'pg-ab1')
    h.check(rc == 1 and '409 wrong-state' in err,
            'the abort repeated (as after a 503): 409 wrong-state, nothing changed', (rc, out, err))
    ab1_go.set()
    h.wait_until(lambda: (saga_get(orders, 'pg-cn1') or {}).get('state') == 'failed', 60,
                 'pg-cn1: its compensation refused twice: failed')
    h.check(pg_instances(db).get(('manual', 'pg-cn1')) == 'failed',
            'pg-cn1 failed in sagad.instances too')
    stock.rules[('stock.release', 'pg-cn1')] = Answer(200)       # the participant is fixed
    rc, out, err = sagactl(orders, 'saga', 'retry', 'pg-cn1')
    h.check(rc == 0 and 'pg-cn1' in out, 'sagactl saga retry pg-cn1: exit 0', (rc, out, err))
    for t in threads:
        t.join()

    # ---- batch 2, with PostgreSQL stopped for a few seconds while its
    # sagas run; start events sent meanwhile must wait in the saga queue
    threads = publish_starts(d_web, plans[half:], max(4.0, (N - half) / 60.0), errors)
    h.wait_until(lambda: pg_count(db, 'instances') >= half + (N - half) // 3, 60,
                 'a third of batch 2 in the instances table')
    db.stop('fast')
    t_down = time.time()
    for cid, saga, _, _ in down:
        start_one(d_web, cid, saga)
    rc, out, err = sagactl(orders, 'saga', 'abort', 'pg-ab1')
    h.check(rc == 1 and '503 store-unavailable' in err and 'may or may not have taken effect'
            in err, 'PostgreSQL down: a saga command answers 503, its outcome unknown',
            (rc, out, err))
    h.wait_until(lambda: d_web.metric('sagad_outbox_pending', 1) == 0 and
                 sum(saga_queue(broker)) >= len(down), 30,
                 'the start events sent while PostgreSQL is down: published, in the saga queue')
    while time.time() - t_down < 4:      # down for 4 s: the scenario, not a check
        time.sleep(0.2)
    ready, unacked = saga_queue(broker)
    h.check(ready + unacked >= len(down),
            'PostgreSQL down for 4 s: the saga queue still holds the %d start events sent '
            'meanwhile (ready %d, unacked %d)' % (len(down), ready, unacked))
    h.check(not any(stock.has_started('stock.reserve', cid) for cid, _, _, _ in down),
            'PostgreSQL down: no command of a saga started meanwhile reached a participant')
    db.start()
    for t in threads:
        t.join()
    h.check(not errors, 'every start event accepted by the web sagad', errors[:5])
    lock_held(db, d_web, orders)

    # ---- every saga ends, in the admin API and in PostgreSQL
    everything = plans + down + specials + locked

    def finished():
        st = pg_instances(db)
        return sum(1 for s in st.values() if s in ('completed', 'compensated')) == len(everything)
    h.wait_until(finished, 180, 'every saga completed or compensated in sagad.instances',
                 interval=1)
    h.log('all %d sagas finished %.1f s after the first start event'
          % (len(everything), time.time() - t0))
    h.wait_until(lambda: pg_count(db, 'outbox') == 0, 60, 'the saga outbox in PostgreSQL empty')
    h.wait_drained(cast.sagads(), 60)
    st = pg_instances(db)
    wrong = [(cid, state, st.get((saga, cid))) for cid, saga, state, _ in everything
             if st.get((saga, cid)) != state]
    h.check(not wrong, 'every saga in its planned state in sagad.instances', wrong[:10])
    h.check(pg_count(db, 'instances') == len(everything),
            'SELECT count(*) FROM sagad.instances WHERE service = %r: %d, no more'
            % (SERVICE, len(everything)))
    h.check(pg_count(db, 'timers') == 0, 'no timer left in sagad.timers')
    check_final_states(orders, everything)
    rc, out, err = sagactl(orders, 'saga', 'pg-cn1')
    h.check(rc == 0 and 'compensated' in out, 'sagactl saga pg-cn1: compensated', (rc, out, err))

    # ---- exactly once at the participants, compensations in reverse order
    extra_ok = [(p, k, c) for c, _, _, _ in specials
                for p, k in (('stock', 'stock.reserve'), ('stock', 'stock.release'))] + \
        [('payment', 'payment.authorize', 'pg-ab1'), ('payment', 'payment.cancel', 'pg-ab1')]
    cast.check(plans + down + locked, extra_ok, [('payment', 'payment.authorize', 'pg-cn1'),
                                        ('stock', 'stock.release', 'pg-cn1')], specials)
    backwards = []
    for cid, saga, _, what in plans:
        if saga == 'order' and what == 'ship':
            cancel = payment.deliveries('payment.cancel', cid, status=200)
            release = stock.deliveries('stock.release', cid, status=200)
            if not (cancel and release and cancel[0]['t'] <= release[0]['t0']):
                backwards.append(cid)
    h.check(not backwards, 'ship refused: payment.cancel answered before stock.release began '
            '(reverse order)', backwards[:10])

    # ---- the relay: the rows of this sagad's commits handed to it in
    # memory, no claim query for them; every row published once
    handed = orders.metric('sagad_saga_outbox_handed_total')
    published = orders.metric('sagad_saga_outbox_published_total')
    claimed = orders.metric('sagad_saga_outbox_claimed_total')
    h.log('saga outbox: %s handed, %s claimed, %s published' % (handed, claimed, published))
    h.check(handed and handed > 0, 'saga outbox rows handed to the relay by the commits',
            (handed, claimed, published))
    h.check(published is not None and published >= handed,
            'every handed row published', (handed, claimed, published))
    # commands are deleted by their reply's batch (saga_store_delivered),
    # not by the relay, and the outbox is empty once the relay's linger
    # (1 to 2 s after the last confirm) is over
    replied = orders.metric('sagad_saga_outbox_replied_total')
    h.check(replied and replied > 0, 'saga outbox rows deleted by their replies\' batches',
            (replied, published))
    with db.connect() as c:
        h.wait_until(lambda: c.scalar('SELECT count(*) FROM sagad.outbox') == '0', 10,
                     'the saga outbox emptied')

    check_replicas(db, orders, pids)

    # ---- the password is never shown
    st_code, status = orders.admin_json('/v1/admin/status')
    h.check(SECRET not in orders.log() and SECRET not in repr(status),
            'the conninfo password is in neither the log nor the admin status')
    for d in cast.sagads():
        h.check(d.stop() == 0, 'sagad %s stops cleanly' % d.name)
    broker.stop()
    db.stop()


if __name__ == '__main__':
    if not pg.available():
        print('skipped: PostgreSQL server not installed (apt-get install postgresql)')
        sys.exit(77)
    h.run_test(main)
