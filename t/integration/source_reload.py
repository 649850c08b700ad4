#!/usr/bin/env python3
"""SIGHUP while sources relay (issue 14, A1): a reload must not free what
the running plugins still read (sagad-plugins(7): a source's strings live
as long as the source). Three sources in one sagad, against a private
PostgreSQL (t/lib/pg.py) and a private RabbitMQ node:

  - sqlite "sq" and pgsql "pg" relay rows from writers while sagad is sent
    SIGHUP twice
  - sqlite "late" retries a database file that does not exist yet: every
    retry after the reload opens its path again
  - the second reload changes the path of "late" (a restart-only key):
    logged, alone, as needing a restart, and the running path stays
  - then sagad's PostgreSQL connection is terminated, so the pgsql source
    connects again with its conninfo; the "late" file is created
  - every row arrives, each once; sagad is still running and its log has
    no sanitizer report

The memory errors show only in the AddressSanitizer build (./configure
--enable-sanitizers, the second half of t/run.sh); in a plain build freed
memory often still holds the old strings.
"""

import collections
import json
import os
import re
import sqlite3
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402
import pg  # noqa: E402

Q = pg.quote_literal
ROWS = 300          # per source
RATE = 100          # rows per second per writer


def plugin_dir_has(name):
    return any(d and os.path.exists(os.path.join(d, name + '.so'))
               for d in os.environ.get('SAGAD_PLUGIN_DIR', '').split(':'))


def sqlite_db(path):
    c = sqlite3.connect(path, timeout=5, isolation_level=None, check_same_thread=False)
    with open(os.path.join(h.top_srcdir, 'plugins', 'sqlite', 'schema.sql')) as f:
        c.executescript(f.read())
    return c


def sqlite_insert(c, mid, key, body):
    c.execute('BEGIN IMMEDIATE')
    c.execute('INSERT INTO sagad_outbox (message_id, exchange, routing_key, body) '
              'VALUES (?, ?, ?, ?)', (mid, 'events', key, body))
    c.execute('COMMIT')


def pg_insert(c, mid, key, body):
    c.query('INSERT INTO sagad_outbox (message_id, exchange, routing_key, body) VALUES '
            '(%s, %s, %s, %s)' % (Q(mid), Q('events'), Q(key), pg.bytea_literal(body.encode())))


def writer(insert, conn, prefix, out):
    t0 = time.time()
    for i in range(ROWS):
        dt = t0 + i / RATE - time.time()
        if dt > 0:
            time.sleep(dt)
        try:
            insert(conn, '%s-%d' % (prefix, i), '%s.row' % prefix, json.dumps({'i': i}))
        except Exception as e:  # noqa: BLE001 -- reported by the check below
            out.append((i, str(e)))
            return


def check_rows(msgs, prefix, n):
    seen = collections.Counter(m['message_id'] for m in msgs)
    missing = [i for i in range(n) if '%s-%d' % (prefix, i) not in seen]
    h.check(not missing, '%s: every row arrived (%d)' % (prefix, n), missing[:10])
    h.check(all(v == 1 for v in seen.values()), '%s: each once' % prefix,
            [k for k, v in seen.items() if v > 1][:10])


def drain(tool, broker, queue, expect, timeout=60):
    try:
        h.wait_until(lambda: tool.queue_len(broker.url, queue) >= expect, timeout,
                     '%d messages in %s' % (expect, queue), interval=0.2)
    except AssertionError as e:
        h.log('%s (have %d): checking what arrived' % (e, tool.queue_len(broker.url, queue)))
    return tool.consume(broker.url, queue, expect + 100, 2)


def terminate_sagad(db):
    with db.connect() as c:
        return int(c.scalar("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE application_name = 'sagad'"))


def main(wd):
    db = pg.Postgres(wd, settings={'synchronous_commit': 'off'})
    db.start()
    broker = h.Broker(wd)
    broker.start()
    tool = h.AmqpTool()
    for q, key in (('r.sq', 'sq.#'), ('r.pg', 'pg.#'), ('r.late', 'late.#')):
        tool.declare_queue(broker.url, q, [('events', key)])
    with db.connect() as c:
        c.query(db.schema())
    sq_path = os.path.join(wd, 'service.db')
    late_path = os.path.join(wd, 'late.db')
    sq = sqlite_db(sq_path)
    sources = ('sources = (\n'
               '  { plugin = "sqlite"; name = "sq"; path = %s; retry_initial = 0.1; retry_max = 0.5; },\n'
               '  { plugin = "pgsql"; name = "pg"; conninfo = %s; retry_initial = 0.1; retry_max = 0.5; },\n'
               '  { plugin = "sqlite"; name = "late"; path = %s; retry_initial = 0.1; retry_max = 0.3; }\n'
               ');' % (h.conf_str(sq_path), h.conf_str(db.conninfo), h.conf_str(late_path)))
    os.makedirs(os.path.join(wd, 'sagad'))
    d = h.Sagad(os.path.join(wd, 'sagad'), broker.url, conf_extra=sources)
    d.start(wait_ready=False)
    h.wait_until(lambda: 'source=pg' in d.log() and 'relaying' in d.log(), 20,
                 'the sources to start')

    # ---- HUP twice while both writers write and "late" retries
    errors = []
    pconn = db.connect()
    ths = [threading.Thread(target=writer, args=(sqlite_insert, sq, 'sq', errors)),
           threading.Thread(target=writer, args=(pg_insert, pconn, 'pg', errors))]
    for t in ths:
        t.start()
    time.sleep(0.5)
    for n in (1, 2):
        if n == 2:
            # sources need a restart: the changed path is named and ignored
            d.conf_extra = sources.replace(h.conf_str(late_path),
                                           h.conf_str(late_path + '.other'))
            d.drain_timeout = 4
            d.write_conf()
        d.hup()
        h.wait_until(lambda: d.log().count('configuration reloaded') >= n, 10,
                     'the reload to be logged')
        time.sleep(0.7)     # several retries of "late" on the new configuration
    h.check(d.running(), 'sagad runs on after two SIGHUPs with three sources')
    warned = [line for line in d.log().splitlines() if 'needs a restart' in line]
    h.check(len(warned) == 1 and re.search(r' keys=("sources"|sources)( |$)', warned[0]),
            'the changed source is named, alone, as needing a restart', warned)

    # ---- the pgsql source connects again (its conninfo read after the reload)
    n = terminate_sagad(db)
    h.check(n >= 1, "sagad's PostgreSQL connection terminated (%d)" % n, n)
    h.wait_until(lambda: d.log().count('connected to PostgreSQL') >= 2, 20,
                 'the pgsql source to connect again')
    h.wait_until(lambda: (lambda m: m.get('sagad_source_ready{source="pg"}') == 1)(d.metrics()),
                 20, 'the pgsql source to be ready again')
    h.check(True, 'the pgsql source connected again after the reloads')
    for t in ths:
        t.join()
    h.check(not errors, 'writers: no errors', errors[:3])

    # ---- the "late" file appears: the source opens it with its path
    late = sqlite_db(late_path)
    for i in range(20):
        sqlite_insert(late, 'late-%d' % i, 'late.row', json.dumps({'i': i}))
    h.wait_until(lambda: d.admin_get('/readyz')[0] == 200, 20, 'every source ready')
    h.check(True, 'the "late" source opened its file after the reloads')

    check_rows(drain(tool, broker, 'r.sq', ROWS), 'sq', ROWS)
    check_rows(drain(tool, broker, 'r.pg', ROWS), 'pg', ROWS)
    check_rows(drain(tool, broker, 'r.late', 20), 'late', 20)
    h.check(d.running(), 'sagad still running')
    log = d.log()
    h.check('AddressSanitizer' not in log and 'runtime error' not in log,
            'no sanitizer report in the log', h.tail(d.logfile, 40))
    rc = d.stop()
    h.check(rc == 0, 'sagad stops cleanly', rc)
    pconn.close()
    sq.close()
    late.close()


if __name__ == '__main__':
    if not (plugin_dir_has('sqlite') and plugin_dir_has('pgsql')):
        print('skipped: the sqlite and pgsql plugins are not both in $SAGAD_PLUGIN_DIR')
        sys.exit(77)
    if not pg.available():
        print('skipped: PostgreSQL is not installed')
        sys.exit(77)
    h.run_test(main)
