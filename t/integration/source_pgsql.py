#!/usr/bin/env python3
"""The pgsql source (plugins/pgsql, sagad-plugins(7)) against a private
PostgreSQL (t/lib/pg.py) and a private RabbitMQ node:

  - rows committed with business rows arrive (every property mapped);
    rolled-back rows never do; the table is emptied; metrics and /readyz
  - 10,000 rows from 4 concurrent writers: all arrive, each once, in
    commit order per writer
  - a NOTIFY storm: sagad stays responsive and rows still arrive
  - rows sagad cannot publish stay in the table, the others go on
  - PostgreSQL restarted (fast, then immediate) while writers write and
    sagad relays: /readyz says so, nothing lost, nothing twice
  - sagad SIGKILLed between its store commit and the delete: restarted on
    its store, it drops the rows as duplicates; a replica with a fresh
    store publishes them again and a consuming sagad's inbox delivers each
    message once
  - two replicas on one table share it without duplicates; exclusive mode
    keeps one active and one standing by, which takes over
  - broken tables (missing, missing column, wrong type, missing privilege)
    give errors naming the problem; fixed, the source recovers by itself
"""

import base64
import collections
import json
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402
import pg  # noqa: E402

Q = pg.quote_literal


def plugin_dir_has(name):
    for d in os.environ.get('SAGAD_PLUGIN_DIR', '').split(':'):
        if d and os.path.exists(os.path.join(d, name + '.so')):
            return True
    return False


def source_conf(db, **kv):
    kv.setdefault('conninfo', db.conninfo)
    kv.setdefault('retry_initial', 0.1)
    kv.setdefault('retry_max', 1)
    parts = []
    for k, v in kv.items():
        if isinstance(v, bool):
            parts.append('%s = %s;' % (k, 'true' if v else 'false'))
        elif isinstance(v, (int, float)):
            parts.append('%s = %s;' % (k, v))
        else:
            parts.append('%s = %s;' % (k, h.conf_str(v)))
    return '{ plugin = "pgsql"; %s }' % ' '.join(parts)


def outbox_sql(mid, key, body, table='sagad_outbox', exchange='events',
               ct='application/json', corr=None, headers=None):
    return ('INSERT INTO %s (message_id, exchange, routing_key, content_type, correlation_id, '
            'headers, body) VALUES (%s, %s, %s, %s, %s, %s, %s)'
            % (table, Q(mid), Q(exchange), Q(key), Q(ct) if ct else 'NULL',
               Q(corr) if corr else 'NULL',
               Q(json.dumps(headers)) if headers is not None else 'NULL',
               pg.bytea_literal(body.encode() if isinstance(body, str) else body)))


def new_sagad(wd, sub, broker, conf_extra, name='orders', start=True):
    d = os.path.join(wd, sub)
    os.makedirs(d, exist_ok=True)
    s = h.Sagad(d, broker.url, name=name, conf_extra=conf_extra)
    if start:
        s.start()
    return s


def src_metric(d, name, source='pgsql', default=0.0):
    m = d.metrics()
    return m.get('sagad_source_%s{source="%s"}' % (name, source), default)


def table_count(db, table='sagad_outbox'):
    with db.connect() as c:
        return int(c.scalar('SELECT count(*) FROM %s' % table))


def drain(tool, broker, queue, expect, timeout=60, extra_wait=2):
    """Wait for expect messages in queue, then consume all (and anything
    beyond, for extra_wait seconds)."""
    try:
        h.wait_until(lambda: tool.queue_len(broker.url, queue) >= expect, timeout,
                     '%d messages in %s' % (expect, queue), interval=0.2)
    except AssertionError as e:
        h.log('%s (have %d): checking what arrived' % (e, tool.queue_len(broker.url, queue)))
    return tool.consume(broker.url, queue, expect + 1000, extra_wait)


def check_writers(msgs, writers, count, what, order=True):
    seen = collections.Counter()
    last = {}
    out_of_order = 0
    for m in msgs:
        b = json.loads(m['body'])
        key = (b['w'], b['i'])
        seen[key] += 1
        if order and last.get(b['w'], -1) >= b['i']:
            out_of_order += 1
        last[b['w']] = max(last.get(b['w'], -1), b['i'])
    missing = [(w, i) for w in range(writers) for i in range(count) if (w, i) not in seen]
    dups = [k for k, n in seen.items() if n > 1]
    h.check(not missing, '%s: every row arrived (%d)' % (what, writers * count), missing[:10])
    h.check(not dups, '%s: each once' % what, dups[:10])
    if order:
        h.check(out_of_order == 0, '%s: in commit order per writer' % what, out_of_order)


def main(wd):
    # The writers' commits need no fsync here (the benchmark keeps it).
    db = pg.Postgres(wd, settings={'client_connection_check_interval': "'100ms'",
                                   'synchronous_commit': 'off', 'max_connections': '60'})
    db.start()
    broker = h.Broker(wd)
    broker.start()
    tool = h.AmqpTool()
    with db.connect() as c:
        c.query(db.schema())
        c.query('CREATE TABLE orders (id bigserial PRIMARY KEY, writer int, n int, note text)')
        # For the crash test: a BEFORE DELETE trigger that holds the delete
        # while test_hold has a row.
        c.query("CREATE TABLE test_hold (x int);"
                "CREATE FUNCTION hold_delete() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                " IF EXISTS (SELECT 1 FROM test_hold) THEN PERFORM pg_sleep(60); END IF;"
                " RETURN NULL; END $$;"
                "CREATE TRIGGER hold_delete BEFORE DELETE ON sagad_outbox"
                " FOR EACH STATEMENT EXECUTE FUNCTION hold_delete()")
    for q, key in (('t.basic', 'basic.#'), ('t.load', 'load.#'), ('t.storm', 'storm.#'),
                   ('t.bad', 'bad.#'), ('t.restart', 'restart.#'), ('t.kill', 'kill.#'),
                   ('t.rep', 'rep.#'), ('t.ex', 'ex.#')):
        tool.declare_queue(broker.url, q, [('events', key)])

    d = new_sagad(wd, 'main', broker, 'sources = ( %s );' % source_conf(db))
    st, body = d.admin_get('/readyz')
    h.check(st == 200, '/readyz 200 once the source is connected', body)

    # ---- committed rows arrive, rolled-back rows never do
    with db.connect() as c:
        c.query("BEGIN; INSERT INTO orders (writer, n, note) VALUES (0, 1, 'a');"
                + outbox_sql('basic-1', 'basic.created', '{"order":1}', corr='saga-1',
                             headers={'x-tenant': 'acme', 'x-n': 7, 'x-null': None}) + ';'
                + outbox_sql('basic-2', 'basic.bin', b'\x00\x01\xff binary', ct='application/octet-stream')
                + '; COMMIT')
        c.query("BEGIN; INSERT INTO orders (writer, n, note) VALUES (0, 2, 'rolled back');"
                + outbox_sql('basic-rollback', 'basic.never', 'no') + '; ROLLBACK')
        c.query('BEGIN;' + outbox_sql('basic-3', 'basic.after', 'after') + '; COMMIT')
    msgs = drain(tool, broker, 't.basic', 3)
    ids = [m['message_id'] for m in msgs]
    h.check(ids == ['basic-1', 'basic-2', 'basic-3'], 'committed rows arrive in order, the '
            'rolled-back one never', ids)
    m1, m2 = msgs[0], msgs[1]
    h.check(m1['exchange'] == 'events' and m1['routing_key'] == 'basic.created' and
            m1['content_type'] == 'application/json' and m1['correlation_id'] == 'saga-1' and
            m1['body'] == '{"order":1}' and m1.get('app_id') == 'orders' and
            m1.get('delivery_mode') == 2, 'properties mapped', m1)
    h.check(h.untraced(m1) == {'x-tenant': 'acme', 'x-n': '7'},
            'headers: strings, a number as its text, null left out', m1.get('headers'))
    body2 = base64.b64decode(m2.get('body_b64', ''))
    h.check(body2 == b'\x00\x01\xff binary' and
            m2['content_type'] == 'application/octet-stream', 'a binary body arrives intact', m2)
    h.wait_until(lambda: table_count(db) == 0, 10, 'the outbox table to be emptied')
    h.check(True, 'relayed rows are deleted')
    h.check(src_metric(d, 'rows_read_total') == 3, 'rows_read counts the rows',
            src_metric(d, 'rows_read_total'))
    h.check(src_metric(d, 'ready') == 1, 'sagad_source_ready 1')
    h.check('sagad_source_lag_seconds{source="pgsql"}' in d.metrics(), 'lag_seconds exported')

    # ---- 10,000 rows, 4 concurrent writers
    t0 = time.time()
    w = pg.Writers(db, 4, 2500, lambda wr, i: (
        "BEGIN; INSERT INTO orders (writer, n) VALUES (%d, %d); %s; COMMIT"
        % (wr, i, outbox_sql('load-%d-%d' % (wr, i), 'load.%d' % wr,
                             json.dumps({'w': wr, 'i': i}))))).start()
    w.join()
    h.check(not w.errors, 'writers: no errors', w.errors[:3])
    t_written = time.time() - t0
    msgs = drain(tool, broker, 't.load', 10000, timeout=120)
    t_all = time.time() - t0
    h.log('10,000 rows: written in %.1fs, all at the broker after %.1fs' % (t_written, t_all))
    check_writers(msgs, 4, 2500, '4 writers x 2,500')
    h.check(len(msgs) == 10000, 'exactly 10,000 messages', len(msgs))
    h.wait_until(lambda: table_count(db) == 0, 10, 'the table to be emptied')

    # ---- a NOTIFY storm
    pid = d.proc.pid

    def cpu():
        with open('/proc/%d/stat' % pid) as f:
            parts = f.read().rsplit(')', 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf('SC_CLK_TCK')

    cpu0 = cpu()
    stop = threading.Event()

    def storm_small():
        with db.connect() as c:
            while not stop.is_set():
                c.query("NOTIFY sagad_outbox; NOTIFY sagad_outbox, 'x'")

    th = threading.Thread(target=storm_small, daemon=True)
    th.start()
    with db.connect() as c:
        t0 = time.time()
        c.query("SELECT pg_notify('sagad_outbox', g::text) FROM generate_series(1, 200000) g")
        h.log('200,000 notifications sent in one transaction (%.1fs)' % (time.time() - t0))
        c.query('BEGIN;' + outbox_sql('storm-1', 'storm.1', 'during the storm') + '; COMMIT')
    t0 = time.time()
    latencies = []
    for _ in range(20):
        t1 = time.time()
        st, _ = d.admin_get('/healthz', timeout=5)
        latencies.append(time.time() - t1)
        time.sleep(0.05)
    msgs = drain(tool, broker, 't.storm', 1, timeout=20)
    h.check([m['message_id'] for m in msgs] == ['storm-1'], 'a row committed during the storm '
            'arrives (%.2fs)' % (time.time() - t0))
    stop.set()
    th.join(10)
    h.check(max(latencies) < 1.0, 'sagad answers /healthz during the storm (max %.0f ms)'
            % (max(latencies) * 1000), latencies)
    used = cpu() - cpu0
    h.log('sagad CPU during the storm: %.2fs' % used)
    h.check(d.running(), 'sagad still running after the storm')

    # ---- rows sagad cannot publish stay; the others go on
    errors0 = src_metric(d, 'errors_total')
    with db.connect() as c:
        c.query('BEGIN;'
                + outbox_sql('bad-headers', 'bad.1', 'x', headers=[1, 2]) + ';'
                + outbox_sql('bad-key', 'bad.' + 'k' * 300, 'x') + ';'
                + outbox_sql('bad-exchange', 'bad.3', 'x', exchange='no spaces allowed') + ';'
                + outbox_sql('good-after-bad', 'bad.4', 'x') + '; COMMIT')
    msgs = drain(tool, broker, 't.bad', 1, timeout=20)
    h.check([m['message_id'] for m in msgs] == ['good-after-bad'],
            'a good row after bad ones arrives', [m['message_id'] for m in msgs])
    with db.connect() as c:
        left = sorted(r[0] for r in c.query('SELECT message_id FROM sagad_outbox'))
    h.check(left == ['bad-exchange', 'bad-headers', 'bad-key'], 'the bad rows stay in the table',
            left)
    h.check(src_metric(d, 'errors_total') >= errors0 + 3, 'errors counted',
            src_metric(d, 'errors_total'))
    log = d.log()
    h.check(any('msg="row left in the table"' in line and
                'reason="headers is not a JSON object"' in line for line in log.splitlines()) and
            'message_id=bad-key' in log, 'the log names the bad rows')
    with db.connect() as c:
        c.query("DELETE FROM test_hold; DELETE FROM sagad_outbox")
    d.stop()

    crash_tests(wd, db, broker, tool)
    restart_test(wd, db, broker, tool)
    replica_tests(wd, db, broker, tool)
    broken_tables(wd, db, broker)


def restart_test(wd, db, broker, tool):
    """PostgreSQL restarted twice while 3 writers write and sagad relays."""
    d = new_sagad(wd, 'restart', broker, 'sources = ( %s );' % source_conf(db, batch=50))
    writers, count = 3, 1200

    class W(pg.Writers):
        def committed(self, c, w, i):
            return bool(c.query('SELECT 1 FROM orders WHERE writer = %d AND n = %d AND '
                                "note = 'restart'" % (w + 100, i)))

    # synchronous_commit on: a commit answered must survive the crash
    w = W(db, writers, count, lambda wr, i: (
        "BEGIN; SET LOCAL synchronous_commit = on; INSERT INTO orders (writer, n, note) VALUES (%d, %d, 'restart'); %s; COMMIT"
        % (wr + 100, i, outbox_sql('restart-%d-%d' % (wr, i), 'restart.%d' % wr,
                                   json.dumps({'w': wr, 'i': i})))),
        rate=150, retry=True).start()
    time.sleep(2)
    db.stop('fast')
    reason = h.wait_until(lambda: (lambda r: r[0] == 503 and r[1])(d.admin_get('/readyz')), 10,
                          '/readyz 503 while PostgreSQL is down')
    h.check('PostgreSQL' in reason or 'connect' in reason or 'server' in reason,
            '/readyz says why: %s' % reason.strip())
    time.sleep(2)
    db.start()
    h.wait_until(lambda: d.admin_get('/readyz')[0] == 200, 15, 'ready again')
    h.check(True, 'the source reconnects after a fast shutdown')
    time.sleep(2)
    db.stop('immediate')
    time.sleep(1)
    db.start()
    h.wait_until(lambda: d.admin_get('/readyz')[0] == 200, 15, 'ready again')
    h.check(True, 'the source reconnects after an immediate shutdown (crash)')
    w.join()
    h.log('writers: %d errors (retried)' % len(w.errors))
    msgs = drain(tool, broker, 't.restart', writers * count, timeout=120, extra_wait=3)
    check_writers(msgs, writers, count, 'PostgreSQL restarts')
    h.check(src_metric(d, 'errors_total') >= 2, 'connection losses counted as errors',
            src_metric(d, 'errors_total'))
    h.wait_until(lambda: table_count(db) == 0, 10, 'the table to be emptied')
    d.stop()


def crash_tests(wd, db, broker, tool):
    """SIGKILL between the store commit and the delete."""
    svc = h.Service()
    consumer = new_sagad(wd, 'consumer', broker,
                         'subscriptions = ( { name = "in"; bind = [ "events:kill.#" ];'
                         ' deliver = %s; } );' % h.conf_str(svc.url), name='billing')
    conf = 'sources = ( %s );' % source_conf(db)
    p = new_sagad(wd, 'producer', broker, conf)
    n = 25

    def hold_and_publish(tag):
        with db.connect() as c:
            c.query('INSERT INTO test_hold VALUES (1)')
            c.query('BEGIN;' + ';'.join(outbox_sql('kill-%s-%d' % (tag, i), 'kill.%s' % tag,
                                                   json.dumps({'i': i})) for i in range(n))
                    + '; COMMIT')
        # published (so durable in the store), but the delete is held
        h.wait_until(lambda: p.metric('sagad_published_total', 0) >= n, 20,
                     'the %d rows to be published' % n)
        with db.connect() as c:
            waiting = c.scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                               "'sagad' AND query LIKE 'DELETE%'")
        h.check(table_count(db) == n and int(waiting) == 1, 'rows published and durable in '
                'the store, their delete not committed')

    def release():
        with db.connect() as c:
            c.query('DELETE FROM test_hold')
        # the killed sagad's backend notices the lost client
        # (client_connection_check_interval) and rolls back
        h.wait_until(lambda: _backends_gone(db), 10, 'the killed backend to end')

    hold_and_publish('a')
    p.kill()
    h.check(True, 'producer SIGKILLed')
    release()
    h.check(table_count(db) == n, 'the rows are still in the table (the delete rolled back)')
    p.start()
    h.wait_until(lambda: table_count(db) == 0, 20, 'the restarted producer to delete the rows')
    h.check(src_metric(p, 'duplicates_total') == n, 'restarted on its store, it drops them as '
            'duplicates', src_metric(p, 'duplicates_total'))
    msgs = tool.consume(broker.url, 't.kill', 1000, 3)
    ids = collections.Counter(m['message_id'] for m in msgs)
    h.check(len(ids) == n and max(ids.values()) == 1, 'the broker got each message once', ids)

    # A replica with a fresh store (the first one's store is gone): the
    # rows go out again; the consumer's inbox drops the repeats.
    hold_and_publish('b')
    p.kill()
    release()
    p2 = new_sagad(wd, 'producer2', broker, conf)
    h.wait_until(lambda: table_count(db) == 0, 20, 'the replica to relay and delete the rows')
    msgs = tool.consume(broker.url, 't.kill', 1000, 3)
    ids = collections.Counter(m['message_id'] for m in msgs)
    h.check(len(ids) == n and sum(ids.values()) == 2 * n, 'the fresh replica published them '
            'again (duplicates on the wire)', sum(ids.values()))
    h.wait_until(lambda: len(svc.ok_ids()) == 2 * n, 30, 'deliveries to the consumer')
    time.sleep(2)
    got = svc.ok_ids()
    h.check(len(got) == 2 * n and max(got.values()) == 1,
            'through the consumer\'s inbox every message reaches the service once',
            [k for k, v in got.items() if v > 1])
    dup = consumer.metric('sagad_duplicates_total{subscription="in"}', 0)
    h.check(dup >= n, 'the consumer counted the duplicates', dup)
    p.stop() if p.running() else None
    p2.stop()
    consumer.stop()
    svc.stop()


def _backends_gone(db):
    with db.connect() as c:
        return int(c.scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                            "'sagad'")) == 0


def replica_tests(wd, db, broker, tool):
    conf = 'sources = ( %s );' % source_conf(db, batch=20)
    r1 = new_sagad(wd, 'rep1', broker, conf)
    r2 = new_sagad(wd, 'rep2', broker, conf)
    w = pg.Writers(db, 4, 1000, lambda wr, i: (
        "BEGIN; %s; COMMIT" % outbox_sql('rep-%d-%d' % (wr, i), 'rep.%d' % wr,
                                         json.dumps({'w': wr, 'i': i})))).start()
    w.join()
    h.check(not w.errors, 'writers: no errors', w.errors[:3])
    msgs = drain(tool, broker, 't.rep', 4000, timeout=120, extra_wait=3)
    check_writers(msgs, 4, 1000, 'two replicas', order=False)
    a, b = src_metric(r1, 'rows_read_total'), src_metric(r2, 'rows_read_total')
    h.log('replica 1 read %d rows, replica 2 %d' % (a, b))
    h.check(a + b == 4000 and a > 0 and b > 0, 'both replicas took a share, no row twice',
            (a, b))
    r1.stop()
    r2.stop()

    # exclusive: one relays, the other stands by and takes over
    with db.connect() as c:
        c.query(db.schema('ex_outbox'))
    conf = 'sources = ( %s );' % source_conf(db, table='ex_outbox', exclusive=True,
                                               poll_interval=0.2)
    e1 = new_sagad(wd, 'ex1', broker, conf)
    e2 = new_sagad(wd, 'ex2', broker, conf)
    with db.connect() as c:
        for i in range(200):
            c.query(outbox_sql('ex-%d' % i, 'ex.1', json.dumps({'w': 0, 'i': i}),
                               table='ex_outbox'))
    msgs = drain(tool, broker, 't.ex', 200, timeout=30)
    a, b = src_metric(e1, 'rows_read_total'), src_metric(e2, 'rows_read_total')
    h.check(sorted((a, b)) == [0, 200], 'exclusive: one replica relays everything', (a, b))
    check_writers(msgs, 1, 200, 'exclusive replica')
    active, standby = (e1, e2) if a else (e2, e1)
    h.check(standby.admin_get('/readyz')[0] == 200, 'the standby is ready')
    h.check('standing by' in standby.log(), 'the standby says it stands by')
    active.stop()
    with db.connect() as c:
        for i in range(200, 300):
            c.query(outbox_sql('ex-%d' % i, 'ex.1', json.dumps({'w': 0, 'i': i}),
                               table='ex_outbox'))
    msgs = drain(tool, broker, 't.ex', 100, timeout=30)
    h.check(sorted(json.loads(m['body'])['i'] for m in msgs) == list(range(200, 300)) and
            src_metric(standby, 'rows_read_total') == 100, 'the standby took over')
    standby.stop()


def broken_tables(wd, db, broker):
    with db.connect() as c:
        c.query("CREATE TABLE no_key (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                " message_id text UNIQUE, exchange text, content_type text, correlation_id text,"
                " headers jsonb, body bytea, created_at timestamptz DEFAULT now());"
                "CREATE TABLE int_body (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                " message_id text UNIQUE, exchange text, routing_key text, content_type text,"
                " correlation_id text, headers jsonb, body integer,"
                " created_at timestamptz DEFAULT now());"
                "CREATE ROLE weak LOGIN; GRANT SELECT ON sagad_outbox TO weak")
    cases = [
        ('missing', dict(table='not_there'), 'table not_there does not exist'),
        ('nokey', dict(table='no_key'), 'table no_key: column routing_key is missing'),
        ('intbody', dict(table='int_body'),
         'table int_body: column body has type integer, expected bytea, text, json or jsonb'),
        ('weak', dict(conninfo=db.conninfo.replace('user=postgres', 'user=weak')),
         'role weak lacks the UPDATE privilege on table sagad_outbox'),
        ('noserver', dict(conninfo='host=%s port=%d user=postgres' % (db.sockdir, db.port + 1)),
         'No such file or directory'),
    ]
    for name, kv, expect in cases:
        d = new_sagad(wd, 'broken-' + name, broker, 'sources = ( %s );'
                      % source_conf(db, name=name, **kv), start=False)
        d.start(wait_ready=False)
        reason = h.wait_until(lambda: (lambda r: r[0] == 503 and expect in r[1] and r[1])(
            d.admin_get('/readyz')), 10, '/readyz naming the problem: %s' % expect)
        h.check(True, '%s: /readyz 503: %s' % (name, json.loads(reason)['reason']))
        h.check(expect in d.log(), '%s: the log says it too' % name)
        h.check(src_metric(d, 'ready', name) == 0, '%s: sagad_source_ready 0' % name)
        if name == 'missing':
            with db.connect() as c:
                c.query(db.schema('not_there'))
            h.wait_until(lambda: d.admin_get('/readyz')[0] == 200, 10, 'ready once created')
            h.check(True, 'missing: the table created, the source recovers by itself')
        d.stop()


if __name__ == '__main__':
    if not plugin_dir_has('pgsql'):
        print('skipped: the pgsql plugin is not built (libpq missing) or SAGAD_PLUGIN_DIR unset')
        sys.exit(77)
    if not pg.available():
        print('skipped: PostgreSQL server not installed (apt-get install postgresql)')
        sys.exit(77)
    h.run_test(main)
