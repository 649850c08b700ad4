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

Two modes in one run (BENCH_SAGA_MODES, default "a,b"), one after the
other, each with its own broker, sinks and daemons:

  a: one orders sagad on SQLite (figures without prefix);
  b: three orders replicas on the PostgreSQL saga store (figures b_*,
     bench/saga_pg.py: the setup, its own phases and figures);
  g: as a, but the saga's first three steps are one parallel group
     (reserve-stock, authorize-payment and check-fraud, the last at the
     payment service, sent at once), then approve: 4 commands, 4 replies
     (figures g_*: saturation and latency; not in the default modes);
  ratio_b_a = b_sat_rate / sat_rate (the issue's target: >= 0.5).

Phases of mode a (b runs 1 and 2 the same way, then its failover):

  1. saturation: BENCH_SAGA_N sagas started as fast as loadgen can POST
     them (closed loop, 32 connections), BENCH_REPEAT times; completed
     sagas per second = N / (first POST -> the N-th order.approved event
     at the orders service, the sink's count polled every 50 ms), and the
     steady rate (slope between 10% and 90% of the completions). CPU time
     per saga of each process group (sat_cpu_<part>_ms).
  2. latency at BENCH_SAGA_RATE (100) sagas/s for BENCH_LAT_SECONDS (10):
     saga duration finished_at - started_at of each saga from
     /v1/admin/sagas (started_at is when the orders sagad consumed the
     start event), POST -> finished_at (loadgen's send time), the
     sagad_saga_duration_seconds histogram (bucket resolution), and each
     step cut in three hops from the stores (see hops()).
  3. memory: the orders sagad's RSS with BENCH_SAGA_STORE (100,000)
     finished sagas in its store. The sagas finished in 1 and 2 are
     real; when they are fewer, the store is topped up offline (orders
     sagad stopped) by copying the finished sagas' rows (saga, saga_log,
     done inbox records, outbox_ids) under new ids, which is what the same
     number of real sagas leaves behind. Then the orders sagad is started
     on that store, runs 1,000 more sagas (100/s), serves /metrics and
     /v1/admin/sagas, and is restarted: VmRSS/VmHWM at each point.

Every figure is printed as name=value (with the 1-minute load average),
then a summary. Environment: BENCH_SAGA_MODES, BENCH_SAGA_N (33400: with
the repeats and phase 2, just over 100,000 real finished sagas), BENCH_REPEAT (3),
BENCH_SAGA_RATE (100), BENCH_LAT_SECONDS (10), BENCH_SAGA_STORE (100000),
BENCH_CONCURRENCY (64), BENCH_MAX_PENDING (65535), BENCH_CONNS (32),
BENCH_QUICK=1, BENCH_KEEP=1, BENCH_WORKDIR; mode b's in bench/saga_pg.py.
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
STALL_SECONDS = env_int('BENCH_STALL_SECONDS', 120)
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

# Mode g: the same saga with a parallel group of three steps.
SAGA_CONF_GROUP = SAGA_CONF.replace('''      { name = "reserve-stock";     command = "commands:stock.reserve";
        compensate = "commands:stock.release"; },
      { name = "authorize-payment"; command = "commands:payment.authorize";
        compensate = "commands:payment.cancel"; },''', '''      { name = "reserve-stock";     group = "checks"; command = "commands:stock.reserve";
        compensate = "commands:stock.release"; },
      { name = "authorize-payment"; group = "checks"; command = "commands:payment.authorize";
        compensate = "commands:payment.cancel"; },
      { name = "check-fraud";       group = "checks"; command = "commands:payment.check"; },''')
assert SAGA_CONF_GROUP != SAGA_CONF


def subscriptions(*subs):
    """subs: (name, [bindings], deliver URL)"""
    return 'subscriptions = (\n%s\n);\n' % ',\n'.join(
        '  { name = "%s"; bind = [ %s ]; deliver = "%s"; concurrency = %d; max_pending = %d;'
        ' queue_type = "%s"; }'
        % (name, ', '.join('"%s"' % b for b in binds), url, CONCURRENCY, MAX_PENDING, QUEUE_TYPE)
        for name, binds, url in subs)


class Setup:
    """The broker, the three sinks and the daemons of one mode: (a) one
    orders sagad on SQLite (pg None), or (b) `replicas` orders sagads (same
    service, each its own directory, store and ports) keeping their sagas in
    PostgreSQL (pg: a bench/saga_pg.Store)."""

    def __init__(self, workdir, pg=None, replicas=1, saga_conf=SAGA_CONF):
        self.pg = pg
        self.broker = h.Broker(workdir)
        self.broker.start()
        self.sinks = {n: Sink() for n in ('orders', 'stock', 'payment')}
        big = 'max_bytes = %dL;' % (16 << 30)
        so = self.sinks['orders'].base
        orders_conf = saga_conf + SAGA_QUEUE + (pg.conf() if pg else '') + subscriptions(
            ('commands', ['commands:order.#'], so + '/commands'),
            ('events', ['events:order.approved', 'events:order.rejected'], so + '/events'))
        self.replicas = []
        for k in range(replicas):
            wd = workdir
            if pg:
                wd = os.path.join(workdir, 'orders%d' % (k + 1))
                os.makedirs(wd, exist_ok=True)
            self.replicas.append(h.Sagad(wd, self.broker.url, name='orders', heartbeat=10,
                                         store_extra=big, conf_extra=orders_conf))
        self.orders = self.replicas[0]
        self.stock = h.Sagad(workdir, self.broker.url, name='stock', heartbeat=10,
                             store_extra=big, conf_extra=subscriptions(
                                 ('commands', ['commands:stock.#'], self.sinks['stock'].url)))
        self.payment = h.Sagad(workdir, self.broker.url, name='payment', heartbeat=10,
                               store_extra=big, conf_extra=subscriptions(
                                   ('commands', ['commands:payment.#'],
                                    self.sinks['payment'].url)))
        self.daemons = tuple(self.replicas) + (self.stock, self.payment)
        for d in self.daemons:
            d.start(args=())
        self.urls = ['http://127.0.0.1:%d/v1/publish/events/order.created' % d.port
                     for d in self.replicas]
        self.url = self.urls[0]

    def stop(self):
        for s in self.sinks.values():
            s.stop()
        for d in self.daemons:
            if d.running():
                d.stop()
        self.broker.stop()

    def cpu_parts(self):
        """{part: CPU s used so far}: each orders sagad ('orders', or
        'orders1'.. with replicas), 'participants' (stock and payment
        sagads), 'broker', 'sinks', and 'postgres' (the postmaster and its
        children) in (b)."""
        out = {}
        for k, d in enumerate(self.replicas):
            out['orders%s' % (k + 1 if self.pg else '')] = cpu_s([d.proc.pid]) if d.running() \
                else 0.0
        out['participants'] = cpu_s([self.stock.proc.pid, self.payment.proc.pid])
        out['broker'] = cpu_s(broker_pids(self.broker))
        out['sinks'] = cpu_s([k.proc.pid for k in self.sinks.values()])
        if self.pg:
            out['postgres'] = cpu_s([self.pg.db.proc.pid])
        return out

    def cpu(self):
        """(sagad CPU s, broker CPU s, sinks CPU s, postgres CPU s) so far."""
        p = self.cpu_parts()
        return (sum(v for k, v in p.items() if k.startswith('orders') or k == 'participants'),
                p['broker'], p['sinks'], p.get('postgres', 0.0))

    def histogram(self):
        """sagad_saga_duration_seconds summed over the running replicas."""
        out = {}
        for d in self.replicas:
            if d.running():
                for le, c in common.buckets(d.metrics(), 'sagad_saga_duration_seconds').items():
                    out[le] = out.get(le, 0) + c
        return out

    def running_sagas(self):
        if self.pg:
            return self.pg.running()
        return saga_counts(self.orders).get('running', 0)

    def quiet(self, timeout=300):
        """Wait until nothing is left in flight anywhere: no running saga,
        every outbox and inbox backlog empty (and PostgreSQL's saga outbox),
        twice in a row."""
        def idle():
            for d in self.daemons:
                if not d.running():
                    continue
                mm = d.metrics()
                if (msum(mm, 'sagad_outbox_pending') or msum(mm, 'sagad_inbox_backlog') or
                        msum(mm, 'sagad_inbox_inflight')):
                    return False
            if self.pg and self.pg.outbox():
                return False
            return self.running_sagas() == 0
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
    would slow down what is measured. Gives up when no saga has finished
    for BENCH_STALL_SECONDS (120): the daemons are stuck, not slow."""

    def __init__(self, s, target, interval=0.05, timeout=600):
        super().__init__(daemon=True)
        self.s, self.target, self.interval = s, target, interval
        self.deadline = time.time() + timeout
        self.samples = []
        self.error = None

    def run(self):
        moved, last = time.time(), None
        try:
            while time.time() < self.deadline:
                v = ended(self.s)
                self.samples.append((time.time_ns(), v))
                if v >= self.target:
                    return
                if v != last:
                    moved, last = time.time(), v
                elif time.time() - moved > STALL_SECONDS:
                    self.error = RuntimeError('stalled: no saga finished for %d s (%d of %d)'
                                              % (STALL_SECONDS, v, self.target))
                    return
                time.sleep(self.interval)
        except Exception as e:  # reported by the caller
            self.error = e


def first_send_ns(path):
    with open(path) as f:
        return int(f.readline().split()[1])


def push(s, n, runid, latfile, rate=None, urls=None):
    """loadgen: n starts POSTed to the orders sagads' publish API, its
    connections spread over `urls` (default: every replica's)."""
    cmd = [LOADGEN, '-n', str(n), '-s', '64', '-c', str(CONNS), '-o', latfile, '-i', runid]
    for u in urls or s.urls:
        cmd += ['-u', u]
    if rate:
        cmd += ['-r', str(rate)]
    rc, out, err = run_tool(cmd, timeout=max(300, n / 50))
    r = kv(out, 'loadgen')
    if rc != 0 or int(r['ok']) != n:
        raise RuntimeError('loadgen: %s %s' % (out.strip(), err.strip()))
    return r


def cpu_per_saga(p0, p1, n):
    """{part: CPU ms per saga} between two cpu_parts()."""
    return {k: (p1[k] - p0[k]) * 1000 / n for k in p1}


def cpu_groups(c):
    """(sagad, broker, sinks, postgres) CPU ms per saga from cpu_per_saga."""
    return (sum(v for k, v in c.items() if k.startswith('orders') or k == 'participants'),
            c['broker'], c['sinks'], c.get('postgres', 0.0))


def phase_saturation(s, workdir, i, pre='', n=None):
    n = n or SAGA_N
    base = ended(s)
    prog = Progress(s, base + n, timeout=max(600, n / 20))
    prog.start()
    latfile = os.path.join(workdir, '%ssat-%d.txt' % (pre, i))
    c0 = s.cpu_parts()
    r = push(s, n, '%ssat%d-%d' % (pre, i, os.getpid()), latfile)
    prog.join()
    c1 = s.cpu_parts()
    if prog.error:
        if s.pg:
            s.pg.diagnose()
        raise RuntimeError('saturation run %d: %s' % (i, prog.error))
    t_last, v_last = prog.samples[-1]
    if v_last < base + n:
        raise RuntimeError('%d of %d sagas finished in time' % (v_last - base, n))
    t0 = first_send_ns(latfile)
    rate = n / ((t_last - t0) / 1e9)
    # steady rate: slope between 10% and 90% of the completions
    lo, hi = base + 0.1 * n, base + 0.9 * n
    a = next(x for x in prog.samples if x[1] >= lo)
    b = next(x for x in prog.samples if x[1] >= hi)
    steady = (b[1] - a[1]) / max(1e-9, (b[0] - a[0]) / 1e9)
    fig('%ssat_rate_%d' % (pre, i), rate, 'sagas/s, first POST -> last finished (POSTs took '
        '%s s)' % r['seconds'])
    fig('%ssat_steady_rate_%d' % (pre, i), steady, 'sagas/s, 10%..90% of the completions')
    s.quiet()
    return rate, steady, float(r['rate']), cpu_per_saga(c0, c1, n)


def read_sent(latfile):
    """{message id: send time (s)} from loadgen's -o file."""
    sent = {}
    with open(latfile) as f:
        for line in f:
            mid, send_ns, _ = line.split()
            sent[mid] = int(send_ns) / 1e9
    return sent


def saga_times(s, runid, n):
    """[(id, state, started_at, finished_at)] of the sagas of loadgen run
    runid: from /v1/admin/sagas (SQLite), or from PostgreSQL's instances."""
    if s.pg:
        return s.pg.times('b-%s-' % runid)
    st, doc = s.orders.admin_json('/v1/admin/sagas?limit=%d' % min(n, LIST_MAX))
    return [(sg['id'], sg['state'], sg['started_at'], sg.get('finished_at'))
            for sg in doc['sagas']]


def phase_latency(s, workdir, tag='', pre='', with_hops=True):
    n = SAGA_RATE * LAT_SECONDS
    h0 = s.histogram()
    base = ended(s)
    latfile = os.path.join(workdir, '%slat%s.txt' % (pre, tag))
    runid = '%slat%s-%d' % (pre, tag, os.getpid())
    c0 = s.cpu_parts()
    r = push(s, n, runid, latfile, rate=SAGA_RATE)
    h.wait_until(lambda: ended(s) >= base + n, 120, 'the paced sagas to finish', interval=0.05)
    cpu = cpu_per_saga(c0, s.cpu_parts(), n)
    h1 = s.histogram()
    s.quiet()
    sent = read_sent(latfile)
    durs, e2e, states, ids = [], [], {}, []
    for sid, state, started, finished in saga_times(s, runid, n):
        if sid not in sent:
            continue
        ids.append(sid)
        states[state] = states.get(state, 0) + 1
        if finished:
            durs.append((finished - started) * 1000)
            e2e.append((finished - sent[sid]) * 1000)
    durs.sort()
    e2e.sort()
    out = {'rate': float(r['rate']), 'n': len(durs), 'states': states,
           'p50': common.pct(durs, 0.5), 'p99': common.pct(durs, 0.99),
           'max': durs[-1] if durs else float('nan'),
           'e2e_p50': common.pct(e2e, 0.5), 'e2e_p99': common.pct(e2e, 0.99),
           'post_p99': float(r['p99_ms']), 'cpu': cpu,
           'hops': hops(s, ids) if with_hops else ([], [], [])}
    for q in (0.5, 0.99):
        res = common.hist_quantile(q, h0, h1)
        out['hist_p%d' % round(q * 100)] = res
    return out


def orders_logs(s, ids):
    """{saga id: [(at, dir, what, message_id)]} in order: the orders saga
    log in the SQLite store, or the history table in PostgreSQL."""
    if s.pg:
        return s.pg.logs(ids)
    o = sqlite3.connect('file:%s?mode=ro' % s.orders.store, uri=True, timeout=30)
    out = {}
    try:
        for sid in ids:
            row = o.execute('SELECT row FROM saga WHERE saga = ? AND id = ?', (SAGA, sid)).fetchone()
            if row:
                out[sid] = o.execute('SELECT at, dir, what, message_id FROM saga_log WHERE '
                                     'row = ? ORDER BY id', row).fetchall()
    finally:
        o.close()
    return out


def hops(s, ids):
    """Where a step's time goes, from the stores (read-only, while the
    daemons run): for each command of the sagas `ids`, (1) orders' saga log
    'out' -> the participant's inbox received_at (orders' outbox commit,
    relay, broker, participant's consume), (2) received_at -> finished_at
    (participant's inbox commit, ack, HTTP delivery, the service's answer),
    (3) finished_at -> orders' saga log 'in' (the reply's outbox commit,
    relay, broker, orders' consume and saga step). ms, sorted lists. In (b)
    order.approve is delivered by whichever replica consumed it: every
    replica's store is asked."""
    dbs = {d: sqlite3.connect('file:%s?mode=ro' % d.store, uri=True, timeout=30)
           for d in s.daemons}
    out = ([], [], [])
    try:
        part = ([dbs[s.stock]], [dbs[s.payment]], [dbs[d] for d in s.replicas])
        for sid, logs in orders_logs(s, ids).items():
            cmds = [l for l in logs if l[1] == 'out' and l[2] == 'command']
            succ = [l for l in logs if l[1] == 'in' and l[2] == 'success']
            for cmd, ok, cands in zip(cmds, succ, part):
                for db in cands:
                    x = db.execute('SELECT received_at, finished_at FROM inbox WHERE '
                                   'subscription = ? AND message_id = ?',
                                   ('commands', cmd[3])).fetchone()
                    if x:
                        break
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


def table(t_start, title, note=None, skip=None):
    """The summary every benchmark of this family ends with (this one,
    bench/tx.py, bench/frontdoor.py): title, each figure with the load at
    the moment it was taken (not the per-repeat name_N ones, nor those
    skip(name) leaves out), the time taken."""
    print()
    print('=' * 86)
    print(title)
    if note:
        print(note)
    print('-' * 86)
    w = max(len(n) for n, _, _, _ in figures)
    print('%-*s  %12s  %5s  %s' % (w, 'figure', 'value', 'load', 'comment'))
    for name, value, comment, la in figures:
        if (name[-2:-1] == '_' and name[-1].isdigit()) or (skip and skip(name)):
            continue
        print('%-*s  %12s  %5.2f  %s' % (w, name, value, la, comment))
    print('-' * 86)
    print('total %.0f s' % (time.time() - t_start))
    print('=' * 86, flush=True)


def summary(t_start):
    table(t_start, 'sagad saga benchmark summary  (N=%d x %d, %d sagas/s x %d s, store %d, '
          'concurrency=%d, max_pending=%d%s)' % (SAGA_N, REPEAT, SAGA_RATE, LAT_SECONDS,
                                                 STORE_TARGET, CONCURRENCY, MAX_PENDING,
                                                 ', QUICK' if QUICK else ''))


def report_saturation(pre, runs, what):
    """Figures of REPEAT saturation runs [(rate, steady, ingress, cpu)]."""
    med = statistics.median
    rates = [r[0] for r in runs]
    each = lambda xs: 'median of ' + ' '.join('%.0f' % x for x in xs)
    fig(pre + 'sat_rate', med(rates), 'sagas/s completed, %s (%s)' % (each(rates), what))
    fig(pre + 'sat_steady_rate', med(r[1] for r in runs), 'sagas/s, ' + each([r[1] for r in runs]))
    fig(pre + 'sat_post_rate', med(r[2] for r in runs), 'starts/s accepted (202) meanwhile')
    cpus = [r[3] for r in runs]
    for part in cpus[0]:
        fig('%ssat_cpu_%s_ms' % (pre, part), med(c[part] for c in cpus), 'CPU per saga, ' + {
            'orders': 'the orders sagad', 'participants': 'stock + payment sagads',
            'broker': 'RabbitMQ', 'sinks': 'the three bench/sink',
            'postgres': 'PostgreSQL (postmaster + children)'}.get(part, 'orders replica'))
    groups = [cpu_groups(c) for c in cpus]
    total = sum(med(g[k] for g in groups) for k in range(4))
    fig(pre + 'sat_cpu_ms', total, 'CPU per saga, every process')
    fig(pre + 'sat_cores_at_target', total * RATE_TARGET / 1000, 'CPU cores that %d sagas/s '
        'need at that cost (this machine: %d, shared)' % (RATE_TARGET, os.cpu_count()))
    return med(rates)


def report_latency(pre, res):
    fig(pre + 'lat_post_rate', res['rate'], 'starts/s offered %d' % SAGA_RATE)
    fig(pre + 'lat_sagas', res['n'], 'states ' + json.dumps(res['states']))
    fig(pre + 'lat_p50_ms', res['p50'], 'finished_at - started_at')
    fig(pre + 'lat_p99_ms', res['p99'], '(target <= %g)' % P99_TARGET_MS)
    fig(pre + 'lat_max_ms', res['max'])
    fig(pre + 'lat_post_to_done_p50_ms', res['e2e_p50'], 'POST sent -> finished_at')
    fig(pre + 'lat_post_to_done_p99_ms', res['e2e_p99'])
    fig(pre + 'lat_post_p99_ms', res['post_p99'], 'POST -> 202 of the start event')
    fig(pre + 'lat_cpu_ms', sum(cpu_groups(res['cpu'])), 'CPU per saga at %d/s: ' % SAGA_RATE +
        ', '.join('%s %.2f' % kv_ for kv_ in res['cpu'].items()))
    for k, (name, what) in enumerate((
            ('command', "orders' outbox -> broker -> participant's inbox"),
            ('service', "participant's inbox commit -> service answered"),
            ('reply', "reply outbox -> broker -> orders' saga step"))):
        v = res['hops'][k]
        fig('%slat_hop_%s_p50_ms' % (pre, name), common.pct(v, 0.5), what + ' (3 a saga)')
        fig('%slat_hop_%s_p99_ms' % (pre, name), common.pct(v, 0.99))
    for q in ('hist_p50', 'hist_p99'):
        v = res[q]
        fig('%slat_%s_ms' % (pre, q), 'n/a' if v is None else v[0] * 1000,
            '' if v is None else 'sagad_saga_duration_seconds, bucket (%g, %g] ms'
            % (v[1] * 1000, v[2] * 1000))
    fig(pre + 'lat_target_met', 'yes' if res['p99'] <= P99_TARGET_MS else 'no',
        'p99 <= %g ms' % P99_TARGET_MS)


def mode_a(workdir):
    """One orders sagad on SQLite: saturation, latency, memory."""
    s = Setup(workdir)
    try:
        say('A: one orders sagad on SQLite; saturation: %d x %d sagas' % (REPEAT, SAGA_N))
        runs = [phase_saturation(s, workdir, i) for i in range(1, REPEAT + 1)]
        rate = report_saturation('', runs, 'one orders sagad, SQLite')
        counts = saga_counts(s.orders)
        fig('sat_states', ' '.join('%s:%d' % kv_ for kv_ in sorted(counts.items()) if kv_[1]),
            'sagad_sagas after saturation')
        fig('sat_target_met', 'yes' if rate >= RATE_TARGET else 'no', '>= %d sagas/s'
            % RATE_TARGET)
        say('A: latency at %d sagas/s for %d s' % (SAGA_RATE, LAT_SECONDS))
        report_latency('', phase_latency(s, workdir))
        say('A: memory with %d finished sagas' % STORE_TARGET)
        worst = phase_memory(s, workdir)
        fig('mem_target_met', 'yes' if worst <= RSS_TARGET_MB else 'no',
            '<= %d MB (worst of the two VmRSS)' % RSS_TARGET_MB)
        return rate
    finally:
        s.stop()


def mode_g(workdir):
    """Mode a's saturation and latency with a parallel group of three."""
    s = Setup(workdir, saga_conf=SAGA_CONF_GROUP)
    try:
        say('G: one orders sagad on SQLite, a parallel group of three steps; saturation: '
            '%d x %d sagas' % (REPEAT, SAGA_N))
        runs = [phase_saturation(s, workdir, i, pre='g') for i in range(1, REPEAT + 1)]
        rate = report_saturation('g_', runs, 'one orders sagad, SQLite, parallel group')
        say('G: latency at %d sagas/s for %d s' % (SAGA_RATE, LAT_SECONDS))
        report_latency('g_', phase_latency(s, workdir, pre='g', with_hops=False))
        return rate
    finally:
        s.stop()


def frame(prefix, banner, body, report=None):
    """What every run of this benchmark, bench/tx.py and bench/frontdoor.py
    shares: signals end it cleanly, a work directory (prefix;
    banner(workdir) says what runs), the load and the fsync floor as
    figures, body(workdir), the daemons' log tails on a failure, then the
    summary (report(t_start), this benchmark's by default) and the
    clean-up. Returns the exit code."""
    def on_signal(signum, frame):
        for sg in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sg, signal.SIG_IGN)
        sys.exit(128 + signum)
    for sg in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sg, on_signal)
    workdir = tempfile.mkdtemp(prefix=prefix, dir=os.environ.get('BENCH_WORKDIR') or None)
    os.chmod(workdir, 0o755)
    say(banner(workdir))
    t_start = time.time()
    ok = False
    try:
        fig('uptime', open('/proc/loadavg').read().strip(), '/proc/loadavg at the start')
        lat = common.fsync_probe(workdir)
        fig('fsync_p50_ms', common.pct(lat, 0.5), '1,000 x write(4 KiB)+fdatasync in the work '
            'directory (the floor of every commit)')
        fig('fsync_p99_ms', common.pct(lat, 0.99))
        body(workdir)
        fig('uptime_end', open('/proc/loadavg').read().strip(), '/proc/loadavg at the end')
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
        kill_children()
        h.cleanup_all()
        if figures:
            (report or summary)(t_start)
        if ok and not os.environ.get('BENCH_KEEP'):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say('work directory kept: %s' % workdir)
        print('bench: %s' % ('ok' if ok else 'FAILED'), flush=True)
    return 0 if ok else 1


def run_modes(workdir, modes):
    rate_a = rate_b = None
    if 'a' in modes:
        wd = os.path.join(workdir, 'a')
        os.makedirs(wd)
        rate_a = mode_a(wd)
    if 'b' in modes:
        import saga_pg
        wd = os.path.join(workdir, 'b')
        os.makedirs(wd)
        rate_b = saga_pg.mode_b(wd, sys.modules[__name__])
    if 'g' in modes:
        wd = os.path.join(workdir, 'g')
        os.makedirs(wd)
        rate_g = mode_g(wd)
        if rate_a:
            fig('ratio_g_a', rate_g / rate_a, 'g_sat_rate / sat_rate (same run)')
    if rate_a and rate_b:
        fig('ratio_b_a', rate_b / rate_a, 'b_sat_rate / sat_rate (target >= 0.5)')


def main():
    modes = [m.strip() for m in (os.environ.get('BENCH_SAGA_MODES') or 'a,b').split(',')]
    if not modes or set(modes) - {'a', 'b', 'g'}:
        print('bench: BENCH_SAGA_MODES: a comma list of a, b, g', file=sys.stderr)
        return 2
    for p in (LOADGEN, SINK, h.sagad_path()):
        if not os.access(p, os.X_OK):
            print('bench: %s missing: build it first' % p, file=sys.stderr)
            return 2
    if 'b' in modes:
        import saga_pg
        if not saga_pg.pg.available():
            print('bench: mode b needs PostgreSQL (apt-get install postgresql)', file=sys.stderr)
            return 2
    return frame('sagad-saga-', lambda wd: 'work directory %s; modes %s; N=%d repeat=%d rate=%d '
                 'store=%d' % (wd, ','.join(modes), SAGA_N, REPEAT, SAGA_RATE, STORE_TARGET),
                 lambda wd: run_modes(wd, modes))


if __name__ == '__main__':
    sys.exit(main())
