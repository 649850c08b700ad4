#!/usr/bin/env python3
"""The sqlite source (plugins/sqlite, sagad-plugins(7)) on a real SQLite
file in WAL mode and a private RabbitMQ node, and plugin loading errors:

  - rows committed with business rows arrive (properties mapped); rolled
    back rows never do; the table is emptied; metrics; /readyz
  - commits are noticed through inotify (well before the slow poll)
  - 10,000 rows from 4 concurrent writers: all arrive, each once, in
    commit order per writer
  - a writer with a 200 ms busy timeout never sees SQLITE_BUSY while sagad
    deletes; the write lock is held for well under a millisecond
  - a file in rollback-journal mode works too
  - sagad SIGKILLed between its store commit and the delete (the write
    lock held by the test): restarted, it drops the rows as duplicates
  - rows sagad cannot publish stay in the table, the others go on
  - broken setups (missing file, table, column, seq not INTEGER PRIMARY
    KEY) name the problem; fixed, the source recovers by itself
  - plugins that fail: missing, wrong ABI, no descriptor, not a shared
    object, unknown key, failing init; loading by path; the shipped
    conf/source-*.conf examples pass sagad -n
"""

import base64
import collections
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402


def plugin_path(name):
    for d in os.environ.get('SAGAD_PLUGIN_DIR', '').split(':'):
        p = os.path.join(d, name + '.so')
        if d and os.path.exists(p):
            return p
    return None


def schema():
    with open(os.path.join(h.top_srcdir, 'plugins', 'sqlite', 'schema.sql')) as f:
        return f.read()


def open_db(path, timeout=5.0):
    """A connection as a service would have it: autocommit (explicit
    BEGIN), a busy timeout, synchronous=NORMAL (the usual WAL setting)."""
    c = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    c.execute('PRAGMA synchronous = NORMAL')
    return c


def create_db(path, journal='wal'):
    c = open_db(path)
    c.executescript(schema())
    if journal != 'wal':
        c.execute('PRAGMA journal_mode = %s' % journal)
    c.execute('CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, writer INT, n INT)')
    return c


def insert(c, mid, key, body, exchange='events', ct='application/json', corr=None,
           headers=None, table='sagad_outbox'):
    c.execute('INSERT INTO %s (message_id, exchange, routing_key, content_type, '
              'correlation_id, headers, body) VALUES (?, ?, ?, ?, ?, ?, ?)' % table,
              (mid, exchange, key, ct, corr,
               json.dumps(headers) if headers is not None else None, body))


def source_conf(path, **kv):
    kv.setdefault('path', path)
    kv.setdefault('retry_initial', 0.1)
    kv.setdefault('retry_max', 1)
    parts = []
    for k, v in kv.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            parts.append('%s = %s;' % (k, v))
        else:
            parts.append('%s = %s;' % (k, h.conf_str(v)))
    return '{ plugin = "sqlite"; %s }' % ' '.join(parts)


def new_sagad(wd, sub, broker, conf_extra, start=True):
    d = os.path.join(wd, sub)
    os.makedirs(d, exist_ok=True)
    s = h.Sagad(d, broker.url, conf_extra=conf_extra)
    if start:
        s.start()
    return s


def src_metric(d, name, source='sqlite', default=0.0):
    return d.metrics().get('sagad_source_%s{source="%s"}' % (name, source), default)


def count(path, table='sagad_outbox'):
    c = open_db(path)
    try:
        return c.execute('SELECT count(*) FROM %s' % table).fetchone()[0]
    finally:
        c.close()


def drain(tool, broker, queue, expect, timeout=60, extra_wait=2):
    try:
        h.wait_until(lambda: tool.queue_len(broker.url, queue) >= expect, timeout,
                     '%d messages in %s' % (expect, queue), interval=0.2)
    except AssertionError as e:
        h.log('%s (have %d): checking what arrived' % (e, tool.queue_len(broker.url, queue)))
    return tool.consume(broker.url, queue, expect + 1000, extra_wait)


def check_writers(msgs, writers, n, what):
    seen = collections.Counter()
    last, bad_order = {}, 0
    for m in msgs:
        b = json.loads(m['body'])
        seen[(b['w'], b['i'])] += 1
        if last.get(b['w'], -1) >= b['i']:
            bad_order += 1
        last[b['w']] = b['i']
    missing = [(w, i) for w in range(writers) for i in range(n) if (w, i) not in seen]
    h.check(not missing, '%s: every row arrived (%d)' % (what, writers * n), missing[:10])
    h.check(all(v == 1 for v in seen.values()), '%s: each once' % what,
            [k for k, v in seen.items() if v > 1][:10])
    h.check(bad_order == 0, '%s: in commit order per writer' % what, bad_order)


def main(wd):
    broker = h.Broker(wd)
    broker.start()
    tool = h.AmqpTool()
    for q, key in (('s.basic', 'basic.#'), ('s.load', 'load.#'), ('s.busy', 'busy.#'),
                   ('s.journal', 'journal.#'), ('s.kill', 'kill.#'), ('s.bad', 'bad.#')):
        tool.declare_queue(broker.url, q, [('events', key)])
    svc_dir = os.path.join(wd, 'service')
    os.makedirs(svc_dir)
    path = os.path.join(svc_dir, 'orders.db')
    c = create_db(path)

    # poll_interval 30: anything quicker is inotify's doing
    d = new_sagad(wd, 'main', broker, 'sources = ( %s );' % source_conf(path, poll_interval=30))
    h.check(d.admin_get('/readyz')[0] == 200, '/readyz 200 with the file open')

    # ---- committed rows arrive, rolled-back ones never
    c.execute('BEGIN IMMEDIATE')
    c.execute('INSERT INTO orders (writer, n) VALUES (0, 1)')
    insert(c, 'basic-1', 'basic.created', '{"order":1}', corr='saga-1',
           headers={'x-tenant': 'acme', 'x-n': 7, 'x-null': None})
    insert(c, 'basic-2', 'basic.bin', b'\x00\x01\xff binary', ct='application/octet-stream')
    c.execute('COMMIT')
    t_commit = time.time()
    c.execute('BEGIN IMMEDIATE')
    c.execute('INSERT INTO orders (writer, n) VALUES (0, 2)')
    insert(c, 'basic-rollback', 'basic.never', 'no')
    c.execute('ROLLBACK')
    # consume right away: arrival well within the 30 s poll means inotify
    msgs = tool.consume(broker.url, 's.basic', 2, 10)
    t_arrive = time.time() - t_commit
    h.check(len(msgs) == 2 and t_arrive < 5, 'commits noticed without the 30 s poll '
            '(%.0f ms to the consumer)' % (t_arrive * 1000), len(msgs))
    c.execute('BEGIN IMMEDIATE')
    insert(c, 'basic-3', 'basic.after', 'after')
    c.execute('COMMIT')
    msgs += drain(tool, broker, 's.basic', 1)
    ids = [m['message_id'] for m in msgs]
    h.check(ids == ['basic-1', 'basic-2', 'basic-3'], 'committed rows in order, the rolled-back '
            'one never', ids)
    m1, m2 = msgs[0], msgs[1]
    h.check(m1['routing_key'] == 'basic.created' and m1['exchange'] == 'events' and
            m1['content_type'] == 'application/json' and m1['correlation_id'] == 'saga-1' and
            m1['body'] == '{"order":1}' and m1.get('delivery_mode') == 2,
            'properties mapped', m1)
    h.check(h.untraced(m1) == {'x-tenant': 'acme', 'x-n': '7'}, 'headers mapped',
            m1.get('headers'))
    h.check(base64.b64decode(m2.get('body_b64', '')) == b'\x00\x01\xff binary',
            'a BLOB body arrives intact', m2)
    h.wait_until(lambda: count(path) == 0, 10, 'the table to be emptied')
    h.check(True, 'relayed rows are deleted')
    h.check(src_metric(d, 'rows_read_total') == 3, 'rows_read counted',
            src_metric(d, 'rows_read_total'))
    h.check('sagad_source_lag_seconds{source="sqlite"}' in d.metrics(), 'lag exported')

    # ---- 10,000 rows from 4 writers
    errors = []

    def writer(w, n, key, timeout, rate=None):
        conn = open_db(path, timeout=timeout)
        t0 = time.time()
        for i in range(n):
            if rate:
                dt = t0 + i / rate - time.time()
                if dt > 0:
                    time.sleep(dt)
            try:
                conn.execute('BEGIN IMMEDIATE')
                conn.execute('INSERT INTO orders (writer, n) VALUES (?, ?)', (w, i))
                insert(conn, '%s-%d-%d' % (key, w, i), '%s.%d' % (key, w),
                       json.dumps({'w': w, 'i': i}))
                conn.execute('COMMIT')
            except sqlite3.OperationalError as e:
                errors.append((w, i, str(e)))
                try:
                    conn.execute('ROLLBACK')
                except sqlite3.OperationalError:
                    pass
        conn.close()

    t0 = time.time()
    ths = [threading.Thread(target=writer, args=(w, 2500, 'load', 10)) for w in range(4)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    h.check(not errors, 'writers: no errors', errors[:3])
    t_written = time.time() - t0
    msgs = drain(tool, broker, 's.load', 10000, timeout=120)
    h.log('10,000 rows: written in %.1fs, at the broker after %.1fs'
          % (t_written, time.time() - t0))
    check_writers(msgs, 4, 2500, '4 writers x 2,500')
    h.check(len(msgs) == 10000, 'exactly 10,000 messages', len(msgs))

    # ---- a writer with a short busy timeout is never refused
    errors.clear()
    t0 = time.time()
    ths = [threading.Thread(target=writer, args=(w, 1500, 'busy', 0.2, 300)) for w in range(2)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    msgs = drain(tool, broker, 's.busy', 3000, timeout=60)
    h.check(not errors, '2 writers with a 200 ms busy timeout, 3,000 commits while sagad '
            'deletes: no SQLITE_BUSY', errors[:3])
    check_writers(msgs, 2, 1500, 'busy-timeout writers')
    lock = src_metric(d, 'lock_max_seconds')
    h.check(0 < lock < 0.2, 'sagad held the write lock at most %.2f ms' % (lock * 1000), lock)
    d.stop()

    journal_mode(wd, broker, tool)
    crash(wd, broker, tool, path)
    bad_rows(wd, broker, tool, path)
    broken(wd, broker)
    plugin_errors(wd)


def journal_mode(wd, broker, tool):
    path = os.path.join(wd, 'service', 'journal.db')
    c = create_db(path, journal='delete')
    h.check(c.execute('PRAGMA journal_mode').fetchone()[0] == 'delete', 'a rollback-journal file')
    d = new_sagad(wd, 'journal', broker, 'sources = ( %s );' % source_conf(path, poll_interval=30))
    for i in range(50):
        c.execute('BEGIN IMMEDIATE')
        insert(c, 'journal-%d' % i, 'journal.x', json.dumps({'w': 0, 'i': i}))
        c.execute('COMMIT')
    msgs = drain(tool, broker, 's.journal', 50, timeout=20)
    check_writers(msgs, 1, 50, 'rollback-journal mode')
    h.check('not in WAL mode' in d.log(), 'sagad warns about the journal mode')
    h.wait_until(lambda: count(path) == 0, 10, 'the table emptied')
    d.stop()
    c.close()


def crash(wd, broker, tool, path):
    """SIGKILL after the store commit, before the delete (the test holds
    the write lock, so sagad cannot delete)."""
    # The rows are committed and the write lock taken before sagad starts:
    # started earlier, sagad (told by inotify) could read, store and delete
    # them in the moment between the commit and the lock (CI saw it twice).
    d = new_sagad(wd, 'crash', broker, 'sources = ( %s );' % source_conf(path), start=False)
    c = open_db(path)
    holder = open_db(path)
    n = 30
    c.execute('BEGIN IMMEDIATE')
    for i in range(n):
        insert(c, 'kill-%d' % i, 'kill.x', json.dumps({'w': 0, 'i': i}))
    c.execute('COMMIT')
    holder.execute('BEGIN IMMEDIATE')     # the write lock: sagad's delete waits
    d.start()
    h.wait_until(lambda: d.metric('sagad_published_total', 0) >= n, 20, 'the rows published')
    time.sleep(0.3)
    h.check(count(path) == n, 'published and durable in the store, not deleted (write lock held)')
    d.kill()
    h.check(True, 'sagad SIGKILLed')
    holder.execute('ROLLBACK')
    holder.close()
    d.start()
    h.wait_until(lambda: count(path) == 0, 20, 'the restarted sagad to delete the rows')
    h.check(src_metric(d, 'duplicates_total') == n, 'restarted, it drops them as duplicates',
            src_metric(d, 'duplicates_total'))
    msgs = tool.consume(broker.url, 's.kill', 1000, 3)
    ids = collections.Counter(m['message_id'] for m in msgs)
    h.check(len(ids) == n and max(ids.values()) == 1, 'the broker got each message once', ids)
    d.stop()
    c.close()


def bad_rows(wd, broker, tool, path):
    d = new_sagad(wd, 'badrows', broker, 'sources = ( %s );' % source_conf(path))
    c = open_db(path)
    c.execute('BEGIN IMMEDIATE')
    insert(c, 'bad-headers', 'bad.1', 'x', headers=[1, 2])
    c.execute("INSERT INTO sagad_outbox (message_id, routing_key, headers, body) VALUES "
              "('bad-json', 'bad.2', '{not json', 'x')")
    insert(c, 'bad-key', 'bad.' + 'k' * 300, 'x')
    insert(c, 'good-after-bad', 'bad.4', 'x')
    c.execute('COMMIT')
    msgs = drain(tool, broker, 's.bad', 1, timeout=20)
    h.check([m['message_id'] for m in msgs] == ['good-after-bad'], 'a good row after bad ones '
            'arrives', [m['message_id'] for m in msgs])
    left = sorted(r[0] for r in c.execute('SELECT message_id FROM sagad_outbox'))
    h.check(left == ['bad-headers', 'bad-json', 'bad-key'], 'the bad rows stay in the table', left)
    h.check(src_metric(d, 'errors_total') >= 3, 'errors counted', src_metric(d, 'errors_total'))
    h.check(any('msg="row left in the table"' in line and
                'reason="headers is not a JSON object"' in line for line in d.log().splitlines()),
            'the log names the bad rows')
    c.execute('DELETE FROM sagad_outbox')
    d.stop()
    c.close()


def broken(wd, broker):
    bdir = os.path.join(wd, 'broken')
    os.makedirs(bdir)
    nokey = os.path.join(bdir, 'nokey.db')
    c = open_db(nokey)
    c.execute('CREATE TABLE sagad_outbox (seq INTEGER PRIMARY KEY, message_id TEXT, exchange TEXT,'
              ' content_type TEXT, correlation_id TEXT, headers TEXT, body BLOB, created_at REAL)')
    c.close()
    textseq = os.path.join(bdir, 'textseq.db')
    c = open_db(textseq)
    c.execute('CREATE TABLE sagad_outbox (seq TEXT, message_id TEXT, exchange TEXT, routing_key '
              'TEXT, content_type TEXT, correlation_id TEXT, headers TEXT, body BLOB, '
              'created_at REAL)')
    c.close()
    notable = os.path.join(bdir, 'notable.db')
    open_db(notable).execute('CREATE TABLE other (x)')
    missing = os.path.join(bdir, 'missing.db')
    cases = [
        ('missing', missing, 'database file %s does not exist' % missing),
        ('notable', notable, 'table sagad_outbox does not exist in %s' % notable),
        ('nokey', nokey, 'column routing_key is missing'),
        ('textseq', textseq, 'column seq must be INTEGER PRIMARY KEY'),
    ]
    for name, p, expect in cases:
        d = new_sagad(wd, 'broken-' + name, broker,
                      'sources = ( %s );' % source_conf(p, name=name), start=False)
        d.start(wait_ready=False)
        reason = h.wait_until(lambda: (lambda r: r[0] == 503 and expect in r[1] and r[1])(
            d.admin_get('/readyz')), 10, '/readyz naming the problem: %s' % expect)
        h.check(True, '%s: /readyz 503: %s' % (name, json.loads(reason)['reason']))
        h.check(expect in d.log(), '%s: the log says it too' % name)
        h.check(src_metric(d, 'ready', name) == 0, '%s: sagad_source_ready 0' % name)
        if name == 'missing':
            create_db(missing).close()
            h.wait_until(lambda: d.admin_get('/readyz')[0] == 200, 10, 'ready once created')
            h.check(True, 'missing: the file created, the source recovers by itself')
        d.stop()


BAD_PLUGINS = {
    'badabi': '''
#include "sagad/plugin.h"
static int i(const struct sagad_host_api *a, struct sagad_host *h, void **s, char *e, size_t n)
{ (void)a; (void)h; (void)s; (void)e; (void)n; return 0; }
static void st(void *s) { (void)s; }
const struct sagad_plugin sagad_plugin = { .abi = 99, .name = "badabi", .init = i, .stop = st };
''',
    'nosym': 'int not_a_plugin = 1;\n',
    'failinit': '''
#include <stdio.h>
#include "sagad/plugin.h"
static const char *const keys[] = { "anything", NULL };
static int i(const struct sagad_host_api *a, struct sagad_host *h, void **s, char *e, size_t n)
{ (void)a; (void)h; (void)s; snprintf(e, n, "the test says no"); return -1; }
static void st(void *s) { (void)s; }
const struct sagad_plugin sagad_plugin = { .abi = SAGAD_PLUGIN_ABI, .name = "failinit",
  .version = "0", .keys = keys, .init = i, .stop = st };
''',
}


def run_sagad(args, env=None, timeout=20):
    r = subprocess.run([h.sagad_path()] + args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=timeout, env=env)
    return r.returncode, r.stderr.decode(errors='replace')


def plugin_errors(wd):
    pdir = os.path.join(wd, 'plugins')
    os.makedirs(pdir)
    for name, src in BAD_PLUGINS.items():
        with open(os.path.join(pdir, name + '.c'), 'w') as f:
            f.write(src)
        cmd = ['gcc', '-shared', '-fPIC', '-Wall', '-Wextra', '-I',
               os.path.join(h.top_srcdir, 'include'), os.path.join(pdir, name + '.c'), '-o',
               os.path.join(pdir, name + '.so')]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        h.check(r.returncode == 0 and not r.stdout.strip(), 'built the test plugin %s' % name,
                r.stdout.decode(errors='replace'))
    with open(os.path.join(pdir, 'garbage.so'), 'w') as f:
        f.write('not an ELF file\n')
    env = dict(os.environ, SAGAD_PLUGIN_DIR=pdir + ':' + os.environ.get('SAGAD_PLUGIN_DIR', ''))
    url = 'amqp://guest:guest@127.0.0.1:1/%2f'
    base = h.Sagad(os.path.join(wd, 'plugins'), url, name='plug').conf_text()
    cases = [
        ('missing', 'plugin = "nope";', "plugin 'nope' not found"),
        ('wrong ABI', 'plugin = "badabi";', 'built for ABI 99, this sagad has ABI 2'),
        ('no descriptor', 'plugin = "nosym";', 'not a sagad plugin (no sagad_plugin symbol)'),
        ('not a shared object', 'plugin = "garbage";', 'cannot load plugin'),
        ('missing path', 'plugin = "%s";' % os.path.join(pdir, 'none.so'), 'cannot load plugin'),
        ('unknown key', 'plugin = "sqlite"; path = "/x.db"; bogus = 1;',
         "unknown key 'bogus' for plugin sqlite"),
    ]
    conf = os.path.join(pdir, 'case.conf')
    for what, src, expect in cases:
        text = base + 'sources = (\n  { %s }\n);\n' % src
        with open(conf, 'w') as f:
            f.write(text)
        rc, err = run_sagad(['-n', '-f', conf], env=env)
        line = text.count('\n') - 1
        h.check(rc == 1 and ('%s:%d: ' % (conf, line)) in err and expect in err,
                'sagad -n, %s: exit 1, %s:LINE: ...%s...' % (what, os.path.basename(conf), expect),
                'exit %d: %s' % (rc, err))
    # by path: accepted
    for name in ('sqlite', 'pgsql'):
        p = plugin_path(name)
        if not p:
            continue
        with open(conf, 'w') as f:
            f.write(base + 'sources = ( { plugin = "%s"; %s } );\n'
                    % (p, 'path = "/x.db";' if name == 'sqlite' else 'conninfo = "";'))
        rc, err = run_sagad(['-n', '-f', conf], env=env)
        h.check(rc == 0, 'a plugin loaded by path (%s) passes sagad -n' % name, err)

    # failing init: sagad refuses to start, with the plugin's reason
    for what, src, expect in (
            ('failing init', 'plugin = "failinit"; anything = 1;',
             'plugin failinit failed to start: the test says no'),
            ('sqlite without path', 'plugin = "sqlite";',
             "'path' (a string: the service's database file) is required"),
            ('sqlite, bad batch', 'plugin = "sqlite"; path = "/x.db"; batch = 0;',
             "'batch' must be a number of at least 1")):
        with open(conf, 'w') as f:
            f.write(base + 'sources = ( { %s } );\n' % src)
        rc, err = run_sagad(['-f', conf], env=env)
        h.check(rc == 3 and expect in err, '%s: sagad exits 3 saying why' % what,
                'exit %d: %s' % (rc, err[-600:]))

    # the shipped examples
    for name in ('sqlite', 'pgsql'):
        ex = os.path.join(h.top_srcdir, 'conf', 'source-%s.conf' % name)
        if not plugin_path(name):
            h.log('the %s plugin is not built: conf/source-%s.conf not checked' % (name, name))
            continue
        rc, err = run_sagad(['-n', '-f', ex])
        h.check(rc == 0, 'conf/source-%s.conf passes sagad -n' % name, err)


if __name__ == '__main__':
    if not plugin_path('sqlite'):
        print('skipped: the sqlite plugin is not in $SAGAD_PLUGIN_DIR')
        sys.exit(77)
    h.run_test(main)
