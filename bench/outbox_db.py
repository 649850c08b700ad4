#!/usr/bin/env python3
"""Benchmark of the pgsql source (sagad-plugins(7)): the transactional
outbox in the service's own PostgreSQL, relayed by sagad to RabbitMQ.

Everything private: a PostgreSQL cluster (t/lib/pg.py; fsync and
synchronous_commit on, as in production), a RabbitMQ node and sagad
(t/lib/harness.py). Rows are written the way a service writes them: one
row per transaction, committed by writer threads over the unix socket.

  (a) live throughput: BENCH_WRITERS writers commit BENCH_N rows as fast as
      they can while sagad relays; timed from the first commit until
      sagad_published_total (polled every 10 ms) says the last row was
      confirmed by the broker. The writers' own commit rate is printed too:
      when the two are equal, PostgreSQL's commits are the bottleneck.
  (b) backlog throughput: with sagad stopped, BENCH_N rows are committed;
      then sagad starts and is timed from its start until every row is
      broker-confirmed: what the source can drain.
  (c) latency at BENCH_RATE rows/s (open loop, BENCH_LAT_SECONDS): for each
      row, commit (COMMIT answered) -> delivered to a consumer. The
      consumer gets a message right after the broker has routed it, about
      when the broker confirms it, so this is an upper bound of
      commit -> broker confirm. sagad's own sagad_publish_confirm_seconds
      (hand-over -> confirm) is printed beside it.
  (d) optional baseline (BENCH_NPM=1): the npm package
      pg-transactional-outbox with amqplib, when npm can install them.

(a) and (b) run BENCH_REPEAT times; medians are reported, as name=value
lines and a table. Environment: BENCH_N (20000), BENCH_WRITERS (16),
BENCH_LAT_WRITERS (16: writer connections sharing BENCH_RATE),
BENCH_REPEAT (3), BENCH_RATE (500), BENCH_LAT_SECONDS (20), BENCH_BATCH
(the source's batch, 100), BENCH_QUICK=1 (small numbers), BENCH_KEEP=1,
BENCH_NPM=1, BENCH_NPM_N (2000 rows for its throughput run), BENCH_NPM_POLL_MS
(10). Run from the build tree: python3 bench/outbox_db.py (needs
src/sagad, plugins/pgsql/.libs/pgsql.so, t/amqptool).
"""

import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

SRCDIR = os.path.abspath(os.environ.get('top_srcdir') or
                         os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
BUILDDIR = os.path.abspath(os.environ.get('top_builddir') or os.getcwd())
os.environ.setdefault('top_srcdir', SRCDIR)
os.environ.setdefault('top_builddir', BUILDDIR)
if 'SAGAD_PLUGIN_DIR' not in os.environ:
    os.environ['SAGAD_PLUGIN_DIR'] = os.path.join(BUILDDIR, 'plugins', 'pgsql', '.libs')
sys.path.insert(0, os.path.join(SRCDIR, 't', 'lib'))
import harness as h  # noqa: E402
import pg  # noqa: E402


def env_int(name, default):
    v = os.environ.get(name)
    return int(v) if v not in (None, '') else default


QUICK = os.environ.get('BENCH_QUICK', '') not in ('', '0')
N = env_int('BENCH_N', 3000 if QUICK else 20000)
WRITERS = env_int('BENCH_WRITERS', 16)
LAT_WRITERS = env_int('BENCH_LAT_WRITERS', 16)
REPEAT = env_int('BENCH_REPEAT', 1 if QUICK else 3)
RATE = env_int('BENCH_RATE', 500)
LAT_SECONDS = env_int('BENCH_LAT_SECONDS', 5 if QUICK else 20)
BATCH = env_int('BENCH_BATCH', 100)
NPM_N = env_int('BENCH_NPM_N', 2000)
SIZE = 256
QUEUE = 'bench.outbox'
figures = []


def say(msg):
    print('# ' + msg, flush=True)


def fig(name, value, comment=''):
    if isinstance(value, float):
        value = ('%.3f' % value) if abs(value) < 1000 else ('%.1f' % value)
    figures.append((name, str(value), comment))
    print('%s=%s' % (name, value), flush=True)


def pct(values, q):
    if not values:
        return float('nan')
    values = sorted(values)
    k = max(0, min(len(values) - 1, math.ceil(q * len(values)) - 1))
    return values[k]


def row_sql(key, i, body):
    return row_sql_id('%s-%d' % (key, i), body)


def row_sql_id(mid, body):
    return ("BEGIN; INSERT INTO sagad_outbox (message_id, exchange, routing_key, content_type, "
            "body) VALUES ('%s', 'events', 'bench.row', 'application/json', %s); COMMIT"
            % (mid, pg.bytea_literal(body)))


def body_of(i):
    b = json.dumps({'i': i}).encode()
    return b + b' ' * (SIZE - len(b))


def published(d):
    return d.metrics().get('sagad_published_total', 0.0)


def wait_published(d, target, timeout):
    """Poll sagad_published_total every 10 ms; the time it reached target."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if published(d) >= target:
            return time.time()
        time.sleep(0.01)
    raise RuntimeError('only %d of %d published after %ss' % (published(d), target, timeout))


def write_rows(db, key, n, writers, rate=None):
    per = n // writers
    w = pg.Writers(db, writers, per,
                   lambda wr, i: row_sql('%s-%d' % (key, wr), i, body_of(wr * per + i)),
                   rate=(rate / writers) if rate else None)
    return w


def purge(broker, tool):
    tool.purge(broker.url, QUEUE)


def phase_live(db, d, broker, tool, rnd):
    purge(broker, tool)
    base = published(d)
    w = write_rows(db, 'live%d' % rnd, N, WRITERS)
    t0 = time.time()
    w.start()
    t_end = wait_published(d, base + (N // WRITERS) * WRITERS, 600)
    w.join()
    t_written = max(w.commits.values()) - t0
    n = (N // WRITERS) * WRITERS
    if w.errors:
        say('WARNING: writer errors: %s' % w.errors[:3])
    return n / t_written, n / (t_end - t0), t_end - max(w.commits.values())


def phase_backlog(db, d, broker, tool, rnd):
    """(source read rate, relay rate): rows taken from PostgreSQL (and
    deleted) per second, rows broker-confirmed per second."""
    purge(broker, tool)
    d.stop()
    w = write_rows(db, 'backlog%d' % rnd, N, WRITERS)
    w.start().join()
    n = (N // WRITERS) * WRITERS
    t0 = time.time()
    d.start(wait_ready=False)
    t_read = None
    deadline = t0 + 600
    while time.time() < deadline:
        m = d.metrics()
        now = time.time()
        if t_read is None and m.get('sagad_source_rows_deleted_total{source="pgsql"}', 0) >= n:
            t_read = now
        if m.get('sagad_published_total', 0) >= n:
            return n / ((t_read or now) - t0), n / (now - t0)
        time.sleep(0.01)
    raise RuntimeError('backlog not drained in 600 s')


def hist(d, name):
    out = {}
    for k, v in d.metrics().items():
        if k.startswith(name + '_bucket{'):
            le = k.split('le="')[1].split('"')[0]
            out[float('inf') if le == '+Inf' else float(le)] = v
    return out


def hist_quantile(q, before, after):
    les = sorted(after)
    inc = [(le, after[le] - before.get(le, 0.0)) for le in les]
    if not inc or inc[-1][1] <= 0:
        return None
    rank = q * inc[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in inc:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / max(c - prev_c, 1e-9))
        prev_le, prev_c = le, c
    return None


def consumer(broker, tool, queue, n):
    """amqptool consume in the background: ({message_id: arrival time},
    process, reader thread)."""
    cmd = [tool.path, broker.url, 'consume', queue, str(n), '15']
    if shutil.which('stdbuf'):
        cmd = ['stdbuf', '-oL'] + cmd
    cons = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    seen = {}

    def reader():
        for line in cons.stdout:
            t = time.time()
            try:
                seen[json.loads(line)['message_id']] = t
            except (ValueError, KeyError):
                pass
    rt = threading.Thread(target=reader, daemon=True)
    rt.start()
    time.sleep(1.0)
    return seen, cons, rt


def consumer_wait(cons, rt, timeout=60):
    try:
        cons.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(cons.pid, signal.SIGKILL)
        cons.wait()
    rt.join(10)


def latency_run(db, broker, tool, queue, prefix, make_sql, seconds=None, wait=60):
    """BENCH_RATE rows/s for seconds (BENCH_LAT_SECONDS); returns
    (achieved rate, delays in ms, missing after wait seconds)."""
    n = RATE * (seconds or LAT_SECONDS)
    seen, cons, rt = consumer(broker, tool, queue, n)
    writers = LAT_WRITERS
    per = n // writers
    w = pg.Writers(db, writers, per, lambda wr, i: make_sql('%s-%d-%d' % (prefix, wr, i),
                                                            wr * per + i),
                   rate=RATE / writers)
    t0 = time.time()
    w.start().join()
    elapsed = max(w.commits.values()) - t0
    consumer_wait(cons, rt, wait)
    delays = []
    for (wr, i), tc in w.commits.items():
        t = seen.get('%s-%d-%d' % (prefix, wr, i))
        if t is not None:
            delays.append((t - tc) * 1000)
    return len(w.commits) / elapsed, delays, writers * per - len(delays)


def phase_latency(db, d, broker, tool, wd):
    purge(broker, tool)
    h0 = hist(d, 'sagad_publish_confirm_seconds')
    rate, delays, missing = latency_run(db, broker, tool, QUEUE, 'lat',
                                        lambda mid, i: row_sql_id(mid, body_of(i)))
    h1 = hist(d, 'sagad_publish_confirm_seconds')
    fig('lat_offered_rate', RATE, 'rows/s, %d writers, single-row transactions' % LAT_WRITERS)
    fig('lat_achieved_rate', rate, 'rows/s committed')
    fig('lat_commit_to_consumer_p50_ms', pct(delays, 0.5), 'upper bound of commit->confirm')
    fig('lat_commit_to_consumer_p99_ms', pct(delays, 0.99), 'target: <= 20 ms')
    fig('lat_commit_to_consumer_max_ms', max(delays) if delays else float('nan'))
    fig('lat_missing', missing, 'rows not seen by the consumer')
    for q in (0.5, 0.99):
        v = hist_quantile(q, h0, h1)
        fig('lat_handover_to_confirm_hist_p%d_ms' % round(q * 100),
            v * 1000 if v is not None else 'n/a', 'sagad_publish_confirm_seconds, interpolated')
    return delays


# The baseline's relay: pg-transactional-outbox's polling listener (its
# logical-replication listener needs wal_level=logical and a replication
# role) publishing each message with amqplib on a confirm channel, the
# handler resolving on the broker's confirm.
NPM_DRIVER = r"""
const amqp = require('amqplib');
const { Client } = require('pg');
const o = require('pg-transactional-outbox');
const [mode, sockdir, port, url, batch, interval] = process.argv.slice(2);
const db = { host: sockdir, port: +port, user: 'postgres', database: 'postgres' };
const setup = { outboxOrInbox: 'outbox', database: 'postgres', schema: 'public',
  table: 'outbox', listenerRole: 'postgres', nextMessagesName: 'next_outbox_messages' };
(async () => {
  if (mode === 'setup') {
    const c = new Client(db); await c.connect();
    await c.query(o.DatabaseSetup.dropAndCreateTable(setup));
    await c.query(o.DatabaseSetup.createPollingFunction(setup));
    await c.query(o.DatabaseSetup.setupPollingIndexes(setup));
    await c.end(); return;
  }
  const conn = await amqp.connect(url);
  const ch = await conn.createConfirmChannel();
  const handler = { handle: (m) => new Promise((res, rej) => ch.publish('events', 'bench.npm',
      Buffer.from(JSON.stringify(m.payload)), { persistent: true, messageId: m.payload.key,
      contentType: 'application/json' }, (err) => err ? rej(err) : res())) };
  o.initializePollingMessageListener({ outboxOrInbox: 'outbox', dbListenerConfig: db,
    settings: { dbSchema: 'public', dbTable: 'outbox', nextMessagesFunctionName:
      'next_outbox_messages', nextMessagesBatchSize: +batch,
      nextMessagesPollingIntervalInMs: +interval, enableMaxAttemptsProtection: false,
      enablePoisonousMessageProtection: false, messageCleanupIntervalInMs: 0 } },
    handler, o.getDisabledLogger());
  console.log('listening');
})().catch((e) => { console.error(e); process.exit(1); });
"""


def npm_row_sql(mid, i, segment, parallel):
    # ordered: one segment per writer, 'sequential': the library keeps each
    # writer's order (as sagad does), handing out the oldest message of
    # every segment per poll. unordered: 'parallel', any message any time.
    payload = json.dumps({'key': mid, 'i': i, 'pad': 'x' * 200})
    return ("BEGIN; INSERT INTO outbox (id, aggregate_type, aggregate_id, message_type, segment, "
            "concurrency, payload) VALUES (gen_random_uuid(), 'bench', '%d', 'row', '%s', '%s', "
            "%s); COMMIT" % (i, segment, 'parallel' if parallel else 'sequential',
                             pg.quote_literal(payload)))


def npm_baseline(wd, db, broker, tool):
    """pg-transactional-outbox + amqplib, if npm installs them quickly."""
    if not shutil.which('npm') or not shutil.which('node'):
        fig('npm_baseline', 'skipped', 'npm/node not installed')
        return
    ndir = os.path.join(wd, 'npm')
    os.makedirs(ndir)
    t0 = time.time()
    try:
        r = subprocess.run(['npm', 'install', '--no-audit', '--no-fund', '--silent',
                            'pg-transactional-outbox@0.5', 'amqplib', 'pg'], cwd=ndir,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    except subprocess.TimeoutExpired:
        fig('npm_baseline', 'skipped', 'npm install took over 300 s')
        return
    if r.returncode != 0:
        fig('npm_baseline', 'skipped', 'npm install failed in %.0fs: %s'
            % (time.time() - t0, r.stdout.decode(errors='replace').strip()[-200:]))
        return
    say('npm install: %.0fs' % (time.time() - t0))
    drv = os.path.join(ndir, 'driver.js')
    with open(drv, 'w') as f:
        f.write(NPM_DRIVER)
    interval = env_int('BENCH_NPM_POLL_MS', 10)
    args = [db.sockdir, str(db.port), broker.url, str(BATCH), str(interval)]
    r = subprocess.run(['node', drv, 'setup'] + args, cwd=ndir, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=60)
    if r.returncode != 0:
        fig('npm_baseline', 'failed', 'setup: %s' % r.stdout.decode(errors='replace')[-300:])
        return
    qn = QUEUE + '.npm'
    tool.declare_queue(broker.url, qn, [('events', 'bench.npm')])
    node = subprocess.Popen(['node', drv, 'listen'] + args, cwd=ndir, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        line = node.stdout.readline().decode(errors='replace').strip()
        if line != 'listening':
            fig('npm_baseline', 'failed', 'listener: %s %s'
                % (line, node.stdout.read(400).decode(errors='replace')))
            return
        for mode, par in (('ordered', False), ('unordered', True)):
            # live throughput: until the consumer has every row
            n = (NPM_N // WRITERS) * WRITERS
            seen, cons, rt = consumer(broker, tool, qn, n)
            per = n // WRITERS
            w = pg.Writers(db, WRITERS, per, lambda wr, i: npm_row_sql(
                'npm%s-%d-%d' % (mode, wr, i), i, 'w%d' % wr, par))
            t0 = time.time()
            w.start().join()
            consumer_wait(cons, rt)
            if len(seen) < n:
                say('WARNING: npm baseline (%s): %d of %d rows arrived' % (mode, len(seen), n))
            t_end = max(seen.values()) if seen else time.time()
            fig('npm_%s_live_writer_commit_rate' % mode, n / (max(w.commits.values()) - t0),
                'rows/s')
            fig('npm_%s_live_relay_throughput' % mode, len(seen) / (t_end - t0),
                'rows/s until consumed (%d rows, poll %d ms, batch %d)' % (n, interval, BATCH))
            tool.purge(broker.url, qn)
            with db.connect() as c:
                c.query('DELETE FROM outbox')
            rate, delays, missing = latency_run(db, broker, tool, qn, 'npmlat' + mode,
                                                lambda mid, i: npm_row_sql(
                                                    mid, i, mid.rsplit('-', 1)[0], par),
                                                seconds=min(LAT_SECONDS, 10), wait=30)
            fig('npm_%s_lat_achieved_rate' % mode, rate, 'rows/s committed')
            fig('npm_%s_lat_commit_to_consumer_p50_ms' % mode, pct(delays, 0.5))
            fig('npm_%s_lat_commit_to_consumer_p99_ms' % mode, pct(delays, 0.99))
            fig('npm_%s_lat_missing' % mode, missing, 'not consumed 30 s after the last commit')
            tool.purge(broker.url, qn)
            with db.connect() as c:
                c.query('DELETE FROM outbox')
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()


def main(wd):
    say('N=%d writers=%d repeat=%d rate=%d lat_seconds=%d batch=%d'
        % (N, WRITERS, REPEAT, RATE, LAT_SECONDS, BATCH))
    say('machine: %d CPUs, load average %s' % (os.cpu_count(),
                                                open('/proc/loadavg').read().split()[0]))
    db = pg.Postgres(wd, settings={'max_connections': '50'})
    db.start()
    db.create_outbox()
    broker = h.Broker(wd)
    broker.start()
    tool = h.AmqpTool()
    tool.declare_queue(broker.url, QUEUE, [('events', 'bench.#')])
    d = h.Sagad(wd, broker.url, conf_extra='sources = ( { plugin = "pgsql"; conninfo = %s; '
                'batch = %d; } );' % (h.conf_str(db.conninfo), BATCH))
    d.start(args=())

    live, writer_rates, tails, backlog, backlog_read = [], [], [], [], []
    for rnd in range(REPEAT):
        wr, rate, tail = phase_live(db, d, broker, tool, rnd)
        say('live run %d: writers committed %.0f rows/s, relayed %.0f rows/s, last row '
            'confirmed %.0f ms after its commit' % (rnd + 1, wr, rate, tail * 1000))
        writer_rates.append(wr)
        live.append(rate)
        tails.append(tail * 1000)
        br, b = phase_backlog(db, d, broker, tool, rnd)
        say('backlog run %d: source read and deleted %.0f rows/s, relayed %.0f rows/s'
            % (rnd + 1, br, b))
        backlog.append(b)
        backlog_read.append(br)
    fig('live_writer_commit_rate', statistics.median(writer_rates), 'rows/s, %d writers, median'
        % WRITERS)
    fig('live_relay_throughput', statistics.median(live), 'rows/s until broker-confirmed, median')
    fig('live_last_row_delay_ms', statistics.median(tails), 'last commit -> all confirmed')
    fig('backlog_source_read_throughput', statistics.median(backlog_read),
        'rows/s taken and deleted by the source, from sagad start, median')
    fig('backlog_relay_throughput', statistics.median(backlog),
        'rows/s broker-confirmed, from sagad start, median')
    phase_latency(db, d, broker, tool, wd)
    d.stop()
    if os.environ.get('BENCH_NPM'):
        npm_baseline(wd, db, broker, tool)
    else:
        fig('npm_baseline', 'skipped', 'set BENCH_NPM=1 to try pg-transactional-outbox + amqplib')

    print()
    print('%-40s %12s  %s' % ('figure', 'value', ''))
    for name, value, comment in figures:
        print('%-40s %12s  %s' % (name, value, comment))


if __name__ == '__main__':
    if not pg.available():
        print('outbox_db: PostgreSQL server not installed (apt-get install postgresql)')
        sys.exit(2)
    workdir = tempfile.mkdtemp(prefix='sagad-bench-outbox-')
    os.chmod(workdir, 0o755)
    ok = False
    try:
        main(workdir)
        ok = True
    finally:
        h.cleanup_all()
        if ok and not os.environ.get('BENCH_KEEP'):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print('# work directory kept: %s' % workdir)
