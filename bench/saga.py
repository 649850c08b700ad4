#!/usr/bin/env python3
"""sagad saga benchmark (Python stdlib only; run from the build directory:
`python3 $top_srcdir/bench/saga.py`, after `make bench` and building
bench/sink).

The create-order saga of the contract (orchestrated, three steps:
stock.reserve, payment.authorize, order.approve), with three sagad
processes on one private RabbitMQ node, as in demo/: "orders" runs the
saga and delivers order.approve (subscription "commands") and the
order.approved/rejected events (subscription "events") to its service,
"stock" and "payment" deliver their commands to theirs. Each
service is a bench/sink, a C HTTP server that answers 200 {"ok":true} at
once (the reply sagad sends back as the step's success). A saga is started
by POSTing events/order.created to the orders sagad (bench/loadgen; the
saga id is the request's Message-Id). Per saga: 1 POST; through the broker
the start event, 3 commands, 3 replies and the completion event; 4
deliveries to services.

  (a) saturation: BENCH_SAGA_N sagas started as fast as loadgen can POST
      them (closed loop, 32 connections), BENCH_REPEAT times; completed
      sagas per second = N / (first POST -> the N-th order.approved event
      at the orders service, the sink's count polled every 50 ms), and the
      steady rate (slope between 10% and 90% of the completions). CPU time
      per saga of the daemons, the broker and the sinks.
  (b) latency at BENCH_SAGA_RATE (100) sagas/s for BENCH_LAT_SECONDS (10):
      saga duration finished_at - started_at of each saga from
      /v1/admin/sagas (started_at is when the orders sagad consumed the
      start event), POST -> finished_at (loadgen's send time), the
      sagad_saga_duration_seconds histogram (bucket resolution), and each
      step cut in three hops from the three stores (see hops()).
  (c) memory: the orders sagad's RSS with BENCH_SAGA_STORE (100,000)
      finished sagas in its store. The sagas finished in (a) and (b) are
      real; when they are fewer, the store is topped up offline (orders
      sagad stopped) by copying the finished sagas' rows (saga, saga_log,
      done inbox records, outbox_ids) under new ids, which is what the same
      number of real sagas leaves behind. Then the orders sagad is started
      on that store, runs 1,000 more sagas (100/s), serves /metrics and
      /v1/admin/sagas, and is restarted: VmRSS/VmHWM at each point.

Every figure is printed as name=value (with the 1-minute load average),
then a summary. Environment: BENCH_SAGA_N (33400: with the repeats and
(b), just over 100,000 real finished sagas), BENCH_REPEAT (3),
BENCH_SAGA_RATE (100), BENCH_LAT_SECONDS (10), BENCH_SAGA_STORE (100000),
BENCH_CONCURRENCY (64), BENCH_MAX_PENDING (65535), BENCH_CONNS (32),
BENCH_QUICK=1, BENCH_KEEP=1, BENCH_WORKDIR.
"""

import json
import os
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as common  # noqa: E402  (helpers of the outbox benchmark)
from run import h, say, kill_children, run_tool, kv, rss_kb, msum  # noqa: E402
from inbox import Sink, loadavg, cpu_s, broker_pids  # noqa: E402

env_int = common.env_int
QUICK = common.QUICK
SAGA_N = env_int('BENCH_SAGA_N', 1000 if QUICK else 33400)
REPEAT = env_int('BENCH_REPEAT', 1 if QUICK else 3)
SAGA_RATE = env_int('BENCH_SAGA_RATE', 100)
LAT_SECONDS = env_int('BENCH_LAT_SECONDS', 3 if QUICK else 10)
STORE_TARGET = env_int('BENCH_SAGA_STORE', 5000 if QUICK else 100000)
CONCURRENCY = env_int('BENCH_CONCURRENCY', 64)
MAX_PENDING = env_int('BENCH_MAX_PENDING', 65535)
QUEUE_TYPE = os.environ.get('BENCH_QUEUE_TYPE') or 'quorum'   # every queue of the run: quorum (default) or classic
CONNS = env_int('BENCH_CONNS', 32)
RATE_TARGET, P99_TARGET_MS, RSS_TARGET_MB = 500, 50.0, 64
SAGA = 'create-order'
LOADGEN = os.path.join(common.BUILDDIR, 'bench', 'loadgen')
SINK = os.path.join(common.BUILDDIR, 'bench', 'sink')
LIST_MAX = 1000          # /v1/admin/sagas?limit= maximum

figures = []


def fig(name, value, comment=''):
    if isinstance(value, float):
        value = ('%.3f' % value) if abs(value) < 1000 else ('%.1f' % value)
    figures.append((name, str(value), comment, loadavg()))
    print('%s=%s' % (name, value), flush=True)


SAGA_QUEUE = 'saga_queue_type = "%s";\n' % QUEUE_TYPE
SAGA_CONF = '''
sagas = (
  {
    name = "create-order";
    mode = "orchestrated";
    start = "events:order.created";
    timeout = 3600;
    steps = (
      { name = "reserve-stock";     command = "commands:stock.reserve";
        compensate = "commands:stock.release"; },
      { name = "authorize-payment"; command = "commands:payment.authorize";
        compensate = "commands:payment.cancel"; },
      { name = "approve";           command = "commands:order.approve"; }
    );
    completed = "events:order.approved";
    compensated = "events:order.rejected";
  }
);
'''


def subscriptions(*subs):
    """subs: (name, [bindings], deliver URL)"""
    return 'subscriptions = (\n%s\n);\n' % ',\n'.join(
        '  { name = "%s"; bind = [ %s ]; deliver = "%s"; concurrency = %d; max_pending = %d;'
        ' queue_type = "%s"; }'
        % (name, ', '.join('"%s"' % b for b in binds), url, CONCURRENCY, MAX_PENDING, QUEUE_TYPE)
        for name, binds, url in subs)


class Setup:
    def __init__(self, workdir):
        self.broker = h.Broker(workdir)
        self.broker.start()
        self.sinks = {n: Sink() for n in ('orders', 'stock', 'payment')}
        big = 'max_bytes = %dL;' % (16 << 30)
        so = self.sinks['orders'].base
        self.orders = h.Sagad(workdir, self.broker.url, name='orders', heartbeat=10,
                              store_extra=big, conf_extra=SAGA_CONF + SAGA_QUEUE + subscriptions(
                                  ('commands', ['commands:order.#'], so + '/commands'),
                                  ('events', ['events:order.approved', 'events:order.rejected'],
                                   so + '/events')))
        self.stock = h.Sagad(workdir, self.broker.url, name='stock', heartbeat=10,
                             store_extra=big, conf_extra=subscriptions(
                                 ('commands', ['commands:stock.#'], self.sinks['stock'].url)))
        self.payment = h.Sagad(workdir, self.broker.url, name='payment', heartbeat=10,
                               store_extra=big, conf_extra=subscriptions(
                                   ('commands', ['commands:payment.#'],
                                    self.sinks['payment'].url)))
        self.daemons = (self.orders, self.stock, self.payment)
        for d in self.daemons:
            d.start(args=())
        self.url = 'http://127.0.0.1:%d/v1/publish/events/order.created' % self.orders.port

    def stop(self):
        for s in self.sinks.values():
            s.stop()

    def cpu(self):
        """(sagad CPU s, broker CPU s, sinks CPU s) used so far."""
        return (cpu_s([d.proc.pid for d in self.daemons]), cpu_s(broker_pids(self.broker)),
                cpu_s([k.proc.pid for k in self.sinks.values()]))

    def quiet(self, timeout=300):
        """Wait until nothing is left in flight anywhere: no running saga,
        every outbox and inbox backlog empty, twice in a row."""
        def idle():
            for d in self.daemons:
                mm = d.metrics()
                if (msum(mm, 'sagad_outbox_pending') or msum(mm, 'sagad_inbox_backlog') or
                        msum(mm, 'sagad_inbox_inflight')):
                    return False
            return saga_counts(self.orders).get('running', 0) == 0
        h.wait_until(lambda: idle() and (time.sleep(0.5) or idle()), timeout,
                     'every daemon to be idle', interval=0.5)


def saga_counts(d):
    """{state: count} from the sagad_sagas gauge (one SQL count in sagad)."""
    out = {}
    for k, v in d.metrics().items():
        if k.startswith('sagad_sagas{') and 'saga="%s"' % SAGA in k:
            out[k.split('state="', 1)[1].split('"', 1)[0]] = int(v)
    return out


def ended(s):
    """order.approved/order.rejected events delivered to the orders service
    so far: one per finished saga (the sink counts requests per path)."""
    return s.sinks['orders'].stats()['paths'].get('/events', 0)


class Progress(threading.Thread):
    """Samples ended() every interval: [(time_ns, count)]. It asks only the
    sink: a GET /metrics on the orders sagad counts the saga table in SQL and
    would slow down what is measured."""

    def __init__(self, s, target, interval=0.05, timeout=600):
        super().__init__(daemon=True)
        self.s, self.target, self.interval = s, target, interval
        self.deadline = time.time() + timeout
        self.samples = []
        self.error = None

    def run(self):
        try:
            while time.time() < self.deadline:
                v = ended(self.s)
                self.samples.append((time.time_ns(), v))
                if v >= self.target:
                    return
                time.sleep(self.interval)
        except Exception as e:  # reported by the caller
            self.error = e


def first_send_ns(path):
    with open(path) as f:
        return int(f.readline().split()[1])


def push(s, n, runid, latfile, rate=None):
    cmd = [LOADGEN, '-u', s.url, '-n', str(n), '-s', '64', '-c', str(CONNS), '-o', latfile,
           '-i', runid]
    if rate:
        cmd += ['-r', str(rate)]
    rc, out, err = run_tool(cmd, timeout=max(300, n / 50))
    r = kv(out, 'loadgen')
    if rc != 0 or int(r['ok']) != n:
        raise RuntimeError('loadgen: %s %s' % (out.strip(), err.strip()))
    return r


def phase_saturation(s, workdir, i):
    base = ended(s)
    prog = Progress(s, base + SAGA_N, timeout=max(600, SAGA_N / 20))
    prog.start()
    latfile = os.path.join(workdir, 'sat-%d.txt' % i)
    c0 = s.cpu()
    r = push(s, SAGA_N, 'sat%d-%d' % (i, os.getpid()), latfile)
    prog.join()
    c1 = s.cpu()
    if prog.error:
        raise RuntimeError('polling /metrics: %s' % prog.error)
    t_last, v_last = prog.samples[-1]
    if v_last < base + SAGA_N:
        raise RuntimeError('%d of %d sagas finished in time' % (v_last - base, SAGA_N))
    t0 = first_send_ns(latfile)
    rate = SAGA_N / ((t_last - t0) / 1e9)
    # steady rate: slope between 10% and 90% of the completions
    lo, hi = base + 0.1 * SAGA_N, base + 0.9 * SAGA_N
    a = next(x for x in prog.samples if x[1] >= lo)
    b = next(x for x in prog.samples if x[1] >= hi)
    steady = (b[1] - a[1]) / max(1e-9, (b[0] - a[0]) / 1e9)
    fig('sat_rate_%d' % i, rate, 'sagas/s, first POST -> last finished (POSTs took %s s)'
        % r['seconds'])
    fig('sat_steady_rate_%d' % i, steady, 'sagas/s, 10%..90% of the completions')
    cpu = [(b - a) * 1000 / SAGA_N for a, b in zip(c0, c1)]
    s.quiet()
    return rate, steady, float(r['rate']), cpu


def phase_latency(s, workdir, tag=''):
    n = SAGA_RATE * LAT_SECONDS
    h0 = common.buckets(s.orders.metrics(), 'sagad_saga_duration_seconds')
    base = ended(s)
    latfile = os.path.join(workdir, 'lat%s.txt' % tag)
    runid = 'lat%s-%d' % (tag, os.getpid())
    c0 = s.cpu()
    r = push(s, n, runid, latfile, rate=SAGA_RATE)
    h.wait_until(lambda: ended(s) >= base + n, 120, 'the paced sagas to finish', interval=0.05)
    cpu = [(b - a) * 1000 / n for a, b in zip(c0, s.cpu())]
    h1 = common.buckets(s.orders.metrics(), 'sagad_saga_duration_seconds')
    s.quiet()
    sent = {}
    with open(latfile) as f:
        for line in f:
            mid, send_ns, _ = line.split()
            sent[mid] = int(send_ns) / 1e9
    st, doc = s.orders.admin_json('/v1/admin/sagas?limit=%d' % min(n, LIST_MAX))
    durs, e2e, states = [], [], {}
    for sg in doc['sagas']:
        if sg['id'] not in sent:
            continue
        states[sg['state']] = states.get(sg['state'], 0) + 1
        if sg.get('finished_at'):
            durs.append((sg['finished_at'] - sg['started_at']) * 1000)
            e2e.append((sg['finished_at'] - sent[sg['id']]) * 1000)
    durs.sort()
    e2e.sort()
    hop = hops(s, [sg['id'] for sg in doc['sagas'] if sg['id'] in sent])
    out = {'rate': float(r['rate']), 'n': len(durs), 'states': states,
           'p50': common.pct(durs, 0.5), 'p99': common.pct(durs, 0.99),
           'max': durs[-1] if durs else float('nan'),
           'e2e_p50': common.pct(e2e, 0.5), 'e2e_p99': common.pct(e2e, 0.99),
           'post_p99': float(r['p99_ms']), 'cpu': cpu, 'hops': hop}
    for q in (0.5, 0.99):
        res = common.hist_quantile(q, h0, h1)
        out['hist_p%d' % round(q * 100)] = res
    return out


def hops(s, ids):
    """Where a step's time goes, from the three stores (read-only, while the
    daemons run): for each command of the sagas `ids`, (1) orders' saga log
    'out' -> the participant's inbox received_at (orders' outbox commit,
    relay, broker, participant's consume), (2) received_at -> finished_at
    (participant's inbox commit, ack, HTTP delivery, the service's answer),
    (3) finished_at -> orders' saga log 'in' (the reply's outbox commit,
    relay, broker, orders' consume and saga step). ms, sorted lists."""
    dbs = {d.name: sqlite3.connect('file:%s?mode=ro' % d.store, uri=True, timeout=30)
           for d in s.daemons}
    out = ([], [], [])
    try:
        o = dbs['orders']
        part = (dbs['stock'], dbs['payment'], dbs['orders'])   # subscription "commands" each
        for sid in ids:
            row = o.execute('SELECT row FROM saga WHERE saga = ? AND id = ?', (SAGA, sid)).fetchone()
            if not row:
                continue
            logs = o.execute('SELECT at, dir, what, message_id FROM saga_log WHERE row = ? '
                             'ORDER BY id', row).fetchall()
            cmds = [l for l in logs if l[1] == 'out' and l[2] == 'command']
            succ = [l for l in logs if l[1] == 'in' and l[2] == 'success']
            for cmd, ok, db in zip(cmds, succ, part):
                x = db.execute('SELECT received_at, finished_at FROM inbox WHERE '
                               'subscription = ? AND message_id = ?',
                               ('commands', cmd[3])).fetchone()
                if not x or not x[1]:
                    continue
                out[0].append((x[0] - cmd[0]) * 1000)
                out[1].append((x[1] - x[0]) * 1000)
                out[2].append((ok[0] - x[1]) * 1000)
    finally:
        for db in dbs.values():
            db.close()
    return [sorted(x) for x in out]


def rss(d):
    return rss_kb(d.proc.pid) / 1024.0, rss_kb(d.proc.pid, 'VmHWM') / 1024.0


def top_up(store, target):
    """Copy finished sagas (and what they leave in the store) under new ids
    until `target` finished sagas are there. sagad must be stopped.
    Returns how many were added."""
    db = sqlite3.connect(store, timeout=60, isolation_level=None)
    try:
        have = db.execute('SELECT count(*) FROM saga WHERE state IN (1, 3)').fetchone()[0]
        if have >= target or have == 0:
            return 0
        src = db.execute('SELECT row, saga, id, state, started_at, updated_at, finished_at, '
                         'data FROM saga WHERE state IN (1, 3) ORDER BY row').fetchall()
        logs = {}
        for row in db.execute('SELECT l.row, l.at, l.dir, l.what, l.step, l.message_id, '
                              'l.detail FROM saga_log l JOIN saga s ON s.row = l.row '
                              'WHERE s.state IN (1, 3) ORDER BY l.id'):
            logs.setdefault(row[0], []).append(row[1:])
        inbox = db.execute('SELECT subscription, message_id, exchange, routing_key, props, '
                           'body, state, attempts, due_at, received_at, finished_at, '
                           'last_status, last_error, dead_reason FROM inbox WHERE state = 1'
                           ).fetchall()
        ids = db.execute('SELECT message_id, at FROM outbox_ids').fetchall()
        per_saga_inbox = len(inbox) / len(src)
        per_saga_ids = len(ids) / len(src)
        need = target - have
        added, k = 0, 0
        db.execute('BEGIN')
        while added < need:
            k += 1
            sfx = '~c%d' % k
            part = src[:need - added]
            for (row, saga, sid, state, st, up, fin, data) in part:
                cur = db.execute('INSERT INTO saga(saga, id, state, started_at, updated_at, '
                                 'finished_at, data) VALUES (?, ?, ?, ?, ?, ?, ?)',
                                 (saga, sid + sfx, state, st, up, fin, data))
                nrow = cur.lastrowid
                db.executemany('INSERT INTO saga_log(row, at, dir, what, step, message_id, '
                               'detail) VALUES (?, ?, ?, ?, ?, ?, ?)',
                               [(nrow,) + lg for lg in logs.get(row, [])])
            added += len(part)
            # the inbox records and published ids of as many sagas
            frac = len(part) / len(src)
            ni, no = int(len(inbox) * frac), int(len(ids) * frac)
            db.executemany('INSERT INTO inbox(subscription, message_id, exchange, routing_key, '
                           'props, body, state, attempts, due_at, received_at, finished_at, '
                           'last_status, last_error, dead_reason) '
                           'VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
                           [(r[0], r[1] + sfx) + tuple(r[2:]) for r in inbox[:ni]])
            db.executemany('INSERT INTO outbox_ids(message_id, at) VALUES (?, ?)',
                           [(r[0] + sfx, r[1]) for r in ids[:no]])
        db.execute('COMMIT')
        db.execute('PRAGMA wal_checkpoint(TRUNCATE)')
        say('store topped up: %d finished sagas copied (%d copies of %d; %.1f inbox records '
            'and %.1f published ids per saga)' % (added, k, len(src), per_saga_inbox,
                                                   per_saga_ids))
        return added
    finally:
        db.close()


def timed_get(d, path):
    t0 = time.time()
    st, body = d.admin_get(path, timeout=60)
    return (time.time() - t0) * 1000, st, body


def phase_memory(s, workdir):
    d = s.orders
    counts = saga_counts(d)
    real = counts.get('completed', 0) + counts.get('compensated', 0)
    fig('mem_real_finished', real, 'finished sagas in the store from (a) and (b)')
    fig('mem_rss_before_mb', rss(d)[0], 'orders sagad VmRSS after (a) and (b), HWM %.1f MB'
        % rss(d)[1])
    d.stop()
    added = top_up(d.store, STORE_TARGET)
    fig('mem_copied', added, 'finished sagas copied offline to reach %d' % STORE_TARGET)
    t0 = time.time()
    d.start(args=())
    fig('mem_start_s', time.time() - t0, 'orders sagad start -> /readyz 200')
    fig('mem_rss_start_mb', rss(d)[0], 'VmRSS at /readyz with the full store')
    res = phase_latency(s, workdir, tag='-mem')
    fig('mem_lat_p99_ms', res['p99'], '1,000 more sagas at %d/s with the full store' % SAGA_RATE)
    ms, st, _ = timed_get(d, '/metrics')
    fig('mem_metrics_ms', ms, 'one GET /metrics (counts sagas by state in SQL)')
    ms, st, _ = timed_get(d, '/v1/admin/sagas?limit=%d' % LIST_MAX)
    fig('mem_list_ms', ms, 'GET /v1/admin/sagas?limit=%d' % LIST_MAX)
    counts = saga_counts(d)
    fin = counts.get('completed', 0) + counts.get('compensated', 0)
    fig('mem_finished', fin, 'finished sagas in the store (sagad_sagas)')
    r, hwm = rss(d)
    fig('mem_rss_mb', r, 'orders sagad VmRSS, %d finished sagas (target <= %d)'
        % (fin, RSS_TARGET_MB))
    fig('mem_hwm_mb', hwm, 'VmHWM since this start')
    fig('mem_store_mb', os.path.getsize(d.store) / 1048576.0, 'orders store file')
    d.stop()
    t0 = time.time()
    d.start(args=())
    fig('mem_restart_s', time.time() - t0, 'restart -> /readyz 200')
    fig('mem_restart_rss_mb', rss(d)[0], 'VmRSS at /readyz after the restart')
    time.sleep(1)
    timed_get(d, '/metrics')
    timed_get(d, '/v1/admin/sagas?limit=%d' % LIST_MAX)
    r2, hwm2 = rss(d)
    fig('mem_restart_rss_1s_mb', r2, 'VmRSS 1 s later, after /metrics and a saga list')
    fig('mem_restart_hwm_mb', hwm2)
    for p in (s.stock, s.payment):
        fig('mem_rss_%s_mb' % p.name, rss(p)[0], 'participant sagad VmRSS')
    return max(r, r2)


def summary(t_start):
    print()
    print('=' * 86)
    print('sagad saga benchmark summary  (N=%d x %d, %d sagas/s x %d s, store %d, '
          'concurrency=%d, max_pending=%d%s)' % (SAGA_N, REPEAT, SAGA_RATE, LAT_SECONDS,
                                                 STORE_TARGET, CONCURRENCY, MAX_PENDING,
                                                 ', QUICK' if QUICK else ''))
    print('-' * 86)
    w = max(len(n) for n, _, _, _ in figures)
    print('%-*s  %12s  %5s  %s' % (w, 'figure', 'value', 'load', 'comment'))
    for name, value, comment, la in figures:
        if name[-2:-1] == '_' and name[-1].isdigit():
            continue
        print('%-*s  %12s  %5.2f  %s' % (w, name, value, la, comment))
    print('-' * 86)
    print('total %.0f s' % (time.time() - t_start))
    print('=' * 86, flush=True)


def main():
    def on_signal(signum, frame):
        for sg in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sg, signal.SIG_IGN)
        sys.exit(128 + signum)
    for sg in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sg, on_signal)
    for p in (LOADGEN, SINK, h.sagad_path()):
        if not os.access(p, os.X_OK):
            print('bench: %s missing: build it first' % p, file=sys.stderr)
            return 2
    workdir = tempfile.mkdtemp(prefix='sagad-saga-', dir=os.environ.get('BENCH_WORKDIR') or None)
    os.chmod(workdir, 0o755)
    say('work directory %s; N=%d repeat=%d rate=%d store=%d'
        % (workdir, SAGA_N, REPEAT, SAGA_RATE, STORE_TARGET))
    t_start = time.time()
    ok = False
    s = None
    try:
        s = Setup(workdir)
        lat = common.fsync_probe(workdir)
        fig('fsync_p50_ms', common.pct(lat, 0.5), '1,000 x write(4 KiB)+fdatasync in the work '
            'directory (the floor of every commit)')
        fig('fsync_p99_ms', common.pct(lat, 0.99))
        say('(a) saturation: %d x %d sagas' % (REPEAT, SAGA_N))
        rates, steadies, ingress, cpus = [], [], [], []
        for i in range(1, REPEAT + 1):
            r, st, ing, cpu = phase_saturation(s, workdir, i)
            rates.append(r)
            steadies.append(st)
            ingress.append(ing)
            cpus.append(cpu)
        each = lambda xs: 'median of ' + ' '.join('%.0f' % x for x in xs)
        fig('sat_rate', statistics.median(rates), 'sagas/s completed, ' + each(rates))
        fig('sat_steady_rate', statistics.median(steadies), 'sagas/s, ' + each(steadies))
        fig('sat_post_rate', statistics.median(ingress), 'starts/s accepted (202) meanwhile')
        for k, what in enumerate(('sagad', 'broker', 'sinks')):
            fig('sat_%s_cpu_ms' % what, statistics.median(c[k] for c in cpus),
                'CPU per saga, %s (%s)' % (what, 'the three daemons' if k == 0 else
                                           'RabbitMQ' if k == 1 else 'the three bench/sink'))
        need = sum(statistics.median(c[k] for c in cpus) for k in range(3)) * RATE_TARGET / 1000
        fig('sat_cores_at_target', need, 'CPU cores that %d sagas/s need at that cost '
            '(this machine: %d, shared)' % (RATE_TARGET, os.cpu_count()))
        counts = saga_counts(s.orders)
        fig('sat_states', ' '.join('%s:%d' % kv_ for kv_ in sorted(counts.items()) if kv_[1]),
            'sagad_sagas after (a)')
        fig('sat_target_met', 'yes' if statistics.median(rates) >= RATE_TARGET else 'no',
            '>= %d sagas/s' % RATE_TARGET)

        say('(b) latency at %d sagas/s for %d s' % (SAGA_RATE, LAT_SECONDS))
        res = phase_latency(s, workdir)
        fig('lat_post_rate', res['rate'], 'starts/s offered %d' % SAGA_RATE)
        fig('lat_sagas', res['n'], 'states ' + json.dumps(res['states']))
        fig('lat_p50_ms', res['p50'], 'finished_at - started_at (/v1/admin/sagas)')
        fig('lat_p99_ms', res['p99'], '(target <= %g)' % P99_TARGET_MS)
        fig('lat_max_ms', res['max'])
        fig('lat_post_to_done_p50_ms', res['e2e_p50'], 'POST sent -> finished_at')
        fig('lat_post_to_done_p99_ms', res['e2e_p99'])
        fig('lat_post_p99_ms', res['post_p99'], 'POST -> 202 of the start event')
        fig('lat_cpu_ms', sum(res['cpu']), 'CPU per saga at %d/s: sagad %.2f, broker %.2f, '
            'sinks %.2f' % ((SAGA_RATE,) + tuple(res['cpu'])))
        for k, (name, what) in enumerate((
                ('command', "orders' outbox -> broker -> participant's inbox"),
                ('service', "participant's inbox commit -> service answered"),
                ('reply', "reply outbox -> broker -> orders' saga step"))):
            v = res['hops'][k]
            fig('lat_hop_%s_p50_ms' % name, common.pct(v, 0.5), what + ' (per step, 3 a saga)')
            fig('lat_hop_%s_p99_ms' % name, common.pct(v, 0.99))
        for q in ('hist_p50', 'hist_p99'):
            v = res[q]
            fig('lat_%s_ms' % q, 'n/a' if v is None else v[0] * 1000,
                '' if v is None else 'sagad_saga_duration_seconds, bucket (%g, %g] ms'
                % (v[1] * 1000, v[2] * 1000))
        fig('lat_target_met', 'yes' if res['p99'] <= P99_TARGET_MS else 'no',
            'p99 <= %g ms' % P99_TARGET_MS)

        say('(c) memory with %d finished sagas' % STORE_TARGET)
        worst = phase_memory(s, workdir)
        fig('mem_target_met', 'yes' if worst <= RSS_TARGET_MB else 'no',
            '<= %d MB (worst of the two VmRSS)' % RSS_TARGET_MB)
        ok = True
    except BaseException as e:
        if not isinstance(e, SystemExit):
            import traceback
            traceback.print_exc()
        for d in list(h._live):
            if isinstance(d, h.Sagad):
                print('---- tail of %s' % d.logfile)
                print(h.tail(d.logfile, 20))
    finally:
        if s is not None:
            s.stop()
        kill_children()
        h.cleanup_all()
        if figures:
            summary(t_start)
        if ok and not os.environ.get('BENCH_KEEP'):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say('work directory kept: %s' % workdir)
        print('bench: %s' % ('ok' if ok else 'FAILED'), flush=True)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
