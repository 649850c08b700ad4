#!/usr/bin/env python3
"""sagad benchmark driver (called by bench/run.sh; Python stdlib only).

One run, against a private RabbitMQ node started through t/lib/harness.py:

  (a) baseline: bench/direct publishes N persistent 256-byte messages with
      publisher confirms (window 1024) straight to the broker;
  (b) the same N through sagad: bench/loadgen POSTs them as fast as sagad
      answers, timed from the first request to the moment sagad's
      sagad_published_total says the last one was confirmed (polled every
      10 ms); ratio = sagad rate / direct rate. (a) and (b) alternate,
      BENCH_REPEAT times, and the medians are reported;
  (c) latency at a fixed 1,000 msg/s (open loop): POST->202 from loadgen,
      hand-over->confirm from sagad's sagad_publish_confirm_seconds
      histogram, and 202->delivered-to-a-consumer (an upper bound of
      202->confirmed) by timestamping amqptool's output lines;
  (d) memory and restart: with the broker down, BENCH_BACKLOG messages go
      into a fresh sagad; its RSS; restart with the broker still down (time
      to /healthz, RSS); broker back: time until relaying resumes and until
      the backlog is drained;
  (e) [added] baseline of the POST->202 floor: 1,000 write(4 KiB) +
      fdatasync on a file in the directory of sagad's store (fsync_p50_ms,
      fsync_p99_ms), measured at the start of the run;
  (f) [added] resume_up_s: a copy of the store taken in (d) with the full
      backlog is started by a second sagad while the broker is UP: time
      from its exec to the first rise of sagad_published_total.
  (g) [added] tracing on (BENCH_TRACING=0 leaves it out): (a) and (b)
      again, alternating, with a second sagad whose spans go to a
      collector stand-in (bench/sink answering 200) at sampling 1 (every
      message: a create and a publish span); ratio_traced = its rate /
      the direct rate of the same repeats; spans exported and dropped.

Every figure is printed as a name=value line as soon as it is known, and a
summary table at the end. Environment: BENCH_N (100000), BENCH_REPEAT (3),
BENCH_BACKLOG (1000000), BENCH_CONNS (32), BENCH_RATE (1000),
BENCH_LAT_SECONDS (10), BENCH_SIZE (256), BENCH_WINDOW (1024),
BENCH_TRACING (1), BENCH_QUICK=1 (small numbers, for a smoke test), BENCH_KEEP=1 (keep the
work directory), BENCH_WORKDIR (parent of the work directory).
"""

import http.client
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
sys.path.insert(0, os.path.join(SRCDIR, 't', 'lib'))
import harness as h  # noqa: E402


def env_int(name, default):
    v = os.environ.get(name)
    return int(v) if v not in (None, '') else default


QUICK = os.environ.get('BENCH_QUICK', '') not in ('', '0')
N = env_int('BENCH_N', 2000 if QUICK else 100000)
REPEAT = env_int('BENCH_REPEAT', 1 if QUICK else 3)
BACKLOG = env_int('BENCH_BACKLOG', 5000 if QUICK else 1000000)
CONNS = env_int('BENCH_CONNS', 32)
RATE = env_int('BENCH_RATE', 1000)
LAT_SECONDS = env_int('BENCH_LAT_SECONDS', 3 if QUICK else 10)
SIZE = env_int('BENCH_SIZE', 256)
WINDOW = env_int('BENCH_WINDOW', 1024)
QUEUE = 'bench.sink'
POLL_MS = 1.0            # counter polling during (c)
EXCHANGE, KEY = 'events', 'bench'
RSS_TARGET_MB = 32

LOADGEN = os.path.join(BUILDDIR, 'bench', 'loadgen')
DIRECT = os.path.join(BUILDDIR, 'bench', 'direct')

figures = []            # (name, value, comment) in the order measured
_children = []          # Popen objects of our own tools (loadgen, direct, amqptool)
_children_lock = threading.Lock()


def say(msg):
    print('# ' + msg, flush=True)


def fig(name, value, comment=''):
    """Record and print one figure."""
    if isinstance(value, float):
        value = ('%.3f' % value) if abs(value) < 1000 else ('%.1f' % value)
    figures.append((name, str(value), comment))
    print('%s=%s' % (name, value), flush=True)


# ---------------------------------------------------------------- processes

def spawn(cmd, **kw):
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, **kw)
    with _children_lock:
        _children.append(p)
    return p


def reap(p):
    with _children_lock:
        if p in _children:
            _children.remove(p)


def kill_children():
    with _children_lock:
        procs = list(_children)
        _children.clear()
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass


def run_tool(cmd, timeout):
    """Run one of our tools; returns (rc, stdout, stderr)."""
    p = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        reap(p)
        raise RuntimeError('%s: no result within %ss' % (os.path.basename(cmd[0]), timeout))
    reap(p)
    return p.returncode, out.decode(errors='replace'), err.decode(errors='replace')


def kv(line, prefix):
    """'prefix a=1 b=2' -> {'a': '1', 'b': '2'}."""
    for ln in line.splitlines():
        if ln.startswith(prefix + ' '):
            return dict(f.split('=', 1) for f in ln.split()[1:] if '=' in f)
    raise RuntimeError('no "%s" line in: %r' % (prefix, line[-500:]))


def rss_kb(pid, field='VmRSS'):
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    return 0


# ---------------------------------------------------------------- metrics

class Metrics:
    """Keep-alive GETs of sagad's /metrics."""

    def __init__(self, sagad):
        self.port = sagad.admin_port
        self.token = sagad.token
        self.conn = None

    def get(self):
        for attempt in (0, 1):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=10)
                hdrs = {'Authorization': 'Bearer ' + self.token} if self.token else {}
                self.conn.request('GET', '/metrics', headers=hdrs)
                r = self.conn.getresponse()
                text = r.read().decode('utf-8', 'replace')
                if r.will_close:
                    self.close()
                if r.status != 200:
                    raise RuntimeError('/metrics answered %d' % r.status)
                return h.parse_metrics(text)
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def msum(m, name):
    """Sum of every series of metric `name` (whatever its labels)."""
    return sum(v for k, v in m.items() if k == name or k.startswith(name + '{'))


def buckets(m, name):
    """{le (float): cumulative count} of a histogram (summed over labels)."""
    out = {}
    pre = name + '_bucket{'
    for k, v in m.items():
        if not k.startswith(pre):
            continue
        labels = k[len(pre):-1]
        le = None
        for part in labels.split(','):
            if part.strip().startswith('le='):
                le = part.split('=', 1)[1].strip().strip('"')
        if le is None:
            continue
        le = math.inf if le in ('+Inf', 'Inf', 'inf') else float(le)
        out[le] = out.get(le, 0.0) + v
    return out


def hist_quantile(q, before, after):
    """Prometheus histogram_quantile over the increase between two
    snapshots: linear interpolation inside the bucket. Returns
    (value_seconds, lower_bound, upper_bound) or None when empty."""
    les = sorted(after)
    inc = [(le, after[le] - before.get(le, 0.0)) for le in les]
    if not inc or inc[-1][1] <= 0:
        return None
    total = inc[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in inc:
        if c >= rank:
            if le == math.inf:
                return prev_le, prev_le, math.inf
            if c == prev_c:
                return le, prev_le, le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c), prev_le, le
        prev_le, prev_c = le, c
    return None


def pct(values, q):
    """Nearest-rank percentile of a sorted list."""
    if not values:
        return float('nan')
    k = max(0, min(len(values) - 1, math.ceil(q * len(values)) - 1))
    return values[k]


# ---------------------------------------------------------------- phases

def purge(broker, tool):
    return tool.purge(broker.url, QUEUE)


def phase_direct(broker, tool, i):
    purge(broker, tool)
    rc, out, err = run_tool([DIRECT, broker.url, EXCHANGE, KEY, str(N), str(SIZE), str(WINDOW)],
                            timeout=max(120, N / 500))
    if rc != 0:
        raise RuntimeError('direct failed (exit %d): %s %s' % (rc, out, err.strip()))
    r = kv(out, 'direct')
    rate = float(r['rate'])
    fig('direct_rate_%d' % i, rate, 'msg/s, first publish to last confirm')
    got = tool.count(broker.url, QUEUE)
    if got != N:
        say('WARNING: queue holds %d messages after direct run %d, expected %d' % (got, i, N))
    return rate


class Poller(threading.Thread):
    """Polls /metrics every `interval` s; records when sagad_published_total
    first exceeds `base` and when it reaches `target`."""

    def __init__(self, sagad, base, target, interval=0.010, timeout=None):
        super().__init__(daemon=True)
        self.m = Metrics(sagad)
        self.base, self.target, self.interval = base, target, interval
        self.deadline = None if timeout is None else time.time() + timeout
        self.t_first = self.t_done = None
        self.last = base
        self.error = None
        self.stop_flag = threading.Event()

    def run(self):
        try:
            while not self.stop_flag.is_set():
                v = msum(self.m.get(), 'sagad_published_total')
                now = time.time_ns()
                self.last = v
                if self.t_first is None and v > self.base:
                    self.t_first = now
                if v >= self.target:
                    self.t_done = now
                    return
                if self.deadline is not None and time.time() > self.deadline:
                    return
                time.sleep(self.interval)
        except Exception as e:  # reported by the caller
            self.error = e
        finally:
            self.m.close()


def first_send_ns(path):
    with open(path) as f:
        line = f.readline().split()
    return int(line[1])


def phase_sagad(broker, tool, sagad, workdir, i):
    purge(broker, tool)
    base = msum(Metrics(sagad).get(), 'sagad_published_total')
    poller = Poller(sagad, base, base + N)
    poller.start()
    latfile = os.path.join(workdir, 'loadgen-b%d.txt' % i)
    url = 'http://127.0.0.1:%d/v1/publish/%s/%s' % (sagad.port, EXCHANGE, KEY)
    rc, out, err = run_tool([LOADGEN, '-u', url, '-n', str(N), '-s', str(SIZE),
                             '-c', str(CONNS), '-o', latfile, '-i', 'tp%d-%d' % (i, os.getpid())],
                            timeout=max(300, N / 200))
    r = kv(out, 'loadgen')
    ok = int(r['ok'])
    if rc != 0 or ok != N:
        say('WARNING: loadgen run %d: %s %s' % (i, out.strip(), err.strip()))
        poller.target = base + ok
    deadline = time.time() + max(120, N / 200)
    while poller.is_alive() and time.time() < deadline:
        poller.join(0.5)
    poller.stop_flag.set()
    poller.join(5)
    if poller.error:
        raise RuntimeError('polling /metrics: %s' % poller.error)
    if poller.t_done is None:
        raise RuntimeError('sagad published %d of %d messages within the time limit'
                           % (poller.last - base, ok))
    t0 = first_send_ns(latfile)
    secs = (poller.t_done - t0) / 1e9
    rate = ok / secs
    fig('sagad_ingress_rate_%d' % i, float(r['rate']), 'msg/s answered 202 (loadgen)')
    fig('sagad_ingress_p99_ms_%d' % i, float(r['p99_ms']), 'POST->202 under full load')
    fig('sagad_rate_%d' % i, rate, 'msg/s, first POST to last broker confirm')
    got = tool.count(broker.url, QUEUE)
    if got != ok:
        say('WARNING: queue holds %d messages after sagad run %d, expected %d' % (got, i, ok))
    return rate, float(r['rate']), float(r['p99_ms'])


def phase_traced(broker, tool, workdir):
    """(g): the throughput of (a)/(b) with spans exported at sampling 1."""
    from inbox import Sink     # bench/inbox.py imports this module
    col = Sink()
    sagad = h.Sagad(workdir, broker.url, name='traced', heartbeat=10,
                    store_extra='max_bytes = %dL;' % (16 << 30),
                    conf_extra='tracing = { endpoint = "%s/v1/traces"; sampling = 1; };\n'
                    % col.base)
    sagad.start(args=())
    try:
        drates, srates = [], []
        for i in range(1, REPEAT + 1):
            drates.append(phase_direct(broker, tool, 100 + i))
            srates.append(phase_sagad(broker, tool, sagad, workdir, 100 + i)[0])
        time.sleep(2)          # the last batch of spans
        m = Metrics(sagad).get()
        each = lambda xs: 'median of ' + ' '.join('%.0f' % x for x in xs)
        fig('direct_rate_traced_run', statistics.median(drates), 'msg/s, ' + each(drates))
        fig('sagad_traced_rate', statistics.median(srates), 'msg/s with tracing, ' + each(srates))
        fig('ratio_traced', statistics.median(srates) / statistics.median(drates),
            'sagad with tracing / direct, same repeats (target >= 0.6)')
        for res in ('exported', 'dropped', 'failed'):
            fig('trace_spans_%s' % res, msum(m, 'sagad_trace_spans_total{result="%s"}' % res),
                'spans')
        fig('trace_requests', col.stats()['paths'].get('/v1/traces', 0), 'POSTs to the collector')
    finally:
        sagad.stop()
        col.stop()


def phase_latency(broker, tool, sagad, workdir):
    n = RATE * LAT_SECONDS
    purge(broker, tool)
    m = Metrics(sagad)
    h0 = buckets(m.get(), 'sagad_publish_confirm_seconds')
    # Consumer first; stdbuf makes its stdout line-buffered so that each
    # message's line reaches us when amqptool has it, not a 4 KiB later.
    cmd = [tool.path, broker.url, 'consume', QUEUE, str(n), '15']
    if shutil.which('stdbuf'):
        cmd = ['stdbuf', '-oL'] + cmd
    else:
        say('WARNING: no stdbuf: consumer timestamps include stdio buffering')
    cons = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []

    def reader():
        for line in cons.stdout:
            seen.append((time.time_ns(), line))
    rt = threading.Thread(target=reader, daemon=True)
    rt.start()
    # sagad_published_total sampled every POLL_MS: (receive time, value)
    samples = []
    pstop = threading.Event()
    base = msum(m.get(), 'sagad_published_total')

    def counter_poller():
        pm = Metrics(sagad)
        try:
            while not pstop.is_set():
                v = msum(pm.get(), 'sagad_published_total')
                samples.append((time.time_ns(), v))
                time.sleep(POLL_MS / 1000.0)
        finally:
            pm.close()
    pt = threading.Thread(target=counter_poller, daemon=True)
    pt.start()
    time.sleep(1.0)     # let basic.consume settle
    if cons.poll() is not None:
        raise RuntimeError('amqptool consume exited early: %s' % cons.stderr.read().decode())
    latfile = os.path.join(workdir, 'loadgen-lat.txt')
    url = 'http://127.0.0.1:%d/v1/publish/%s/%s' % (sagad.port, EXCHANGE, KEY)
    rc, out, err = run_tool([LOADGEN, '-u', url, '-n', str(n), '-s', str(SIZE), '-c',
                             str(CONNS), '-r', str(RATE), '-o', latfile,
                             '-i', 'lat-%d' % os.getpid()], timeout=LAT_SECONDS + 120)
    r = kv(out, 'loadgen')
    if rc != 0:
        say('WARNING: loadgen (latency): %s %s' % (out.strip(), err.strip()))
    try:
        cons.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(cons.pid, signal.SIGKILL)
        cons.wait()
    rt.join(10)
    reap(cons)
    pstop.set()
    pt.join(10)
    h1 = buckets(m.get(), 'sagad_publish_confirm_seconds')
    m.close()

    fig('lat_achieved_rate', float(r['rate']), 'msg/s offered %d' % RATE)
    fig('lat_post_to_202_p50_ms', float(r['p50_ms']), 'loadgen, from scheduled send')
    fig('lat_post_to_202_p99_ms', float(r['p99_ms']))
    fig('lat_post_to_202_max_ms', float(r['max_ms']))

    for q in (0.5, 0.99):
        res = hist_quantile(q, h0, h1)
        name = 'lat_confirm_hist_p%d_ms' % round(q * 100)
        if res is None:
            fig(name, 'n/a', 'sagad_publish_confirm_seconds empty or missing')
        else:
            v, lo, hi = res
            fig(name, v * 1000, 'hand-over->confirm, interpolated in bucket (%g, %g] ms'
                % (lo * 1000, hi * 1000))

    # 202 -> delivered to the consumer, per message id
    sent = {}
    with open(latfile) as f:
        for line in f:
            mid, send_ns, lat_ns = line.split()
            if int(lat_ns) >= 0:
                sent[mid] = (int(send_ns), int(send_ns) + int(lat_ns))
    e2e, post_e2e, missing = [], [], 0
    for t, line in seen:
        try:
            mid = json.loads(line).get('message_id')
        except ValueError:
            continue
        if mid in sent:
            post_e2e.append((t - sent[mid][0]) / 1e6)
            e2e.append((t - sent[mid][1]) / 1e6)
    missing = len(sent) - len(e2e)

    # 202 -> confirmed, from the counter: sagad publishes in acceptance order
    # and the broker confirms in order on a channel, so the k-th 202 (in
    # time order) is confirmed by the first sample showing base + k. An
    # upper bound, within one polling interval plus one /metrics round trip.
    acks = sorted(t202 for _, t202 in sent.values())
    conf_lat, j = [], 0
    for k, t202 in enumerate(acks, 1):
        while j < len(samples) and samples[j][1] < base + k:
            j += 1
        if j == len(samples):
            break
        conf_lat.append((samples[j][0] - t202) / 1e6)
    # per message, for a closer look: message_id t_send t_202 t_consumer (ns)
    seen_at = {}
    for t, line in seen:
        try:
            seen_at[json.loads(line).get('message_id')] = t
        except ValueError:
            pass
    with open(os.path.join(workdir, 'latency-detail.txt'), 'w') as f:
        for mid, (ts, t202) in sorted(sent.items(), key=lambda x: x[1][0]):
            f.write('%s %d %d %d\n' % (mid, ts, t202, seen_at.get(mid, -1)))
    with open(os.path.join(workdir, 'published-samples.txt'), 'w') as f:
        for t, v in samples:
            f.write('%d %d\n' % (t, v - base))
    conf_lat.sort()
    gaps = sorted((b[0] - a[0]) / 1e6 for a, b in zip(samples, samples[1:]))

    e2e.sort()
    post_e2e.sort()
    fig('lat_202_to_confirm_poll_p50_ms', pct(conf_lat, 0.5),
        'counter polled every %.1f ms (median gap), upper bound' % pct(gaps, 0.5))
    fig('lat_202_to_confirm_poll_p99_ms', pct(conf_lat, 0.99))
    fig('lat_202_to_consumer_p50_ms', pct(e2e, 0.5), 'delivery to a consumer (not a bound)')
    fig('lat_202_to_consumer_p99_ms', pct(e2e, 0.99))
    fig('lat_post_to_consumer_p50_ms', pct(post_e2e, 0.5))
    fig('lat_post_to_consumer_p99_ms', pct(post_e2e, 0.99))
    if missing:
        say('WARNING: %d of %d accepted messages not seen by the consumer' % (missing, len(sent)))
    fig('lat_consumer_missing', missing)


def phase_backlog(broker, tool, workdir):
    purge(broker, tool)
    d = h.Sagad(workdir, broker.url, name='backlog', heartbeat=2,
                store_extra='max_bytes = %dL;' % (16 << 30), drain_timeout=5)
    d.start(args=())
    m = Metrics(d)
    say('stopping the broker')
    broker.stop()
    h.wait_until(lambda: msum(m.get(), 'sagad_broker_connected') == 0, 30,
                 'sagad to notice the broker is down')
    url = 'http://127.0.0.1:%d/v1/publish/%s/%s' % (d.port, EXCHANGE, KEY)
    say('pushing %d messages into sagad with the broker down' % BACKLOG)
    rc, out, err = run_tool([LOADGEN, '-u', url, '-n', str(BACKLOG), '-s', str(SIZE),
                             '-c', str(CONNS), '-i', 'bl-%d' % os.getpid()],
                            timeout=max(600, BACKLOG / 100))
    r = kv(out, 'loadgen')
    if rc != 0:
        say('WARNING: loadgen (backlog): %s %s' % (out.strip(), err.strip()))
    accepted = int(r['ok'])
    fig('backlog_ingress_rate', float(r['rate']), 'msg/s answered 202, broker down')
    fig('backlog_accepted', accepted)
    fig('backlog_errors', int(r['errors']))
    fig('rss_mb', rss_kb(d.proc.pid) / 1024.0, 'VmRSS after the backlog (target <= %d)'
        % RSS_TARGET_MB)
    fig('rss_peak_mb', max(rss_kb(d.proc.pid), rss_kb(d.proc.pid, 'VmHWM')) / 1024.0,
        'VmHWM while ingesting')
    mm = m.get()
    fig('backlog_outbox_pending', int(msum(mm, 'sagad_outbox_pending')))
    fig('store_mb', msum(mm, 'sagad_store_bytes') / 1048576.0)
    m.close()

    t0 = time.time()
    code = d.stop(timeout=60)
    fig('stop_s', time.time() - t0, 'SIGTERM to exit, broker down (exit %s)' % code)
    copy_store(d, workdir)     # (f) [added]
    t0 = time.time()
    d.start(wait_ready=False, args=())
    fig('start_s', time.time() - t0, 'start to /healthz 200, broker down, 0.1 s polling')
    fig('start_rss_mb', rss_kb(d.proc.pid) / 1024.0, 'VmRSS at /healthz')
    m = Metrics(d)
    time.sleep(1.0)
    mm = m.get()
    fig('start_rss_1s_mb', rss_kb(d.proc.pid) / 1024.0, 'VmRSS 1 s later')
    pending = msum(mm, 'sagad_outbox_pending')
    fig('restart_outbox_pending', int(pending))
    base = msum(mm, 'sagad_published_total')

    say('starting the broker again')
    t0 = time.time()
    broker.start()
    t_up = time.time()
    fig('broker_boot_s', t_up - t0)
    poller = Poller(d, base, base + 1, timeout=300)
    poller.run()    # in this thread: until the first confirm
    if poller.error:
        raise poller.error
    if poller.t_done is None:
        raise RuntimeError('sagad did not resume publishing within 300 s of the broker restart')
    fig('resume_s', poller.t_done / 1e9 - t_up, 'broker up -> sagad_published_total rising')
    # drain: every accepted message published
    rss_max = 0
    deadline = time.time() + max(300, BACKLOG / 500)
    while True:
        mm = m.get()
        rss_max = max(rss_max, rss_kb(d.proc.pid))
        done = msum(mm, 'sagad_published_total') - base
        if done >= pending and msum(mm, 'sagad_outbox_pending') == 0:
            break
        if time.time() > deadline:
            raise RuntimeError('backlog not drained: %d of %d published' % (done, pending))
        time.sleep(0.05)
    t_done = time.time()
    fig('drain_s', t_done - t_up, 'broker up -> outbox empty')
    fig('drain_rate', pending / max(1e-9, t_done - t_up), 'msg/s')
    fig('drain_rss_max_mb', rss_max / 1024.0, 'max VmRSS sampled while draining')
    m.close()
    got = tool.count(broker.url, QUEUE)
    if got < accepted:
        say('WARNING: queue holds %d messages after the drain, %d were accepted' % (got, accepted))
    fig('backlog_queue_count', got)
    d.stop()


# ---------------------------------------------------------------- (e), (f) [added]

FSYNC_N = 1000


def fsync_probe(workdir, n=FSYNC_N):
    """write(4 KiB) + fdatasync, n times, appending to a file in workdir:
    sorted latencies in ms."""
    path = os.path.join(workdir, 'fsync-probe.dat')
    block = b'x' * 4096
    lat = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            os.write(fd, block)
            os.fdatasync(fd)
            lat.append((time.perf_counter_ns() - t0) / 1e6)
    finally:
        os.close(fd)
        os.unlink(path)
    return sorted(lat)


def phase_fsync(workdir):
    """(e) the floor under POST->202, in the directory of sagad's stores."""
    lat = fsync_probe(workdir)
    fig('fsync_p50_ms', pct(lat, 0.5), '%d x write(4 KiB)+fdatasync next to the store, load %.2f'
        % (FSYNC_N, os.getloadavg()[0]))
    fig('fsync_p99_ms', pct(lat, 0.99))


RESUME_COPY = 'resume'      # the (f) daemon's name: its store is <workdir>/resume.db


def copy_store(d, workdir):
    """(f) keep a copy of the stopped daemon's store (database + WAL) with
    the full backlog, for phase_resume_up."""
    dst = os.path.join(workdir, RESUME_COPY + '.db')
    for sfx in ('', '-wal'):
        if os.path.exists(d.store + sfx):
            shutil.copyfile(d.store + sfx, dst + sfx)


def phase_resume_up(broker, tool, workdir):
    """(f) sagad started on the backlog store while the broker is up: exec
    -> first rise of sagad_published_total."""
    d = h.Sagad(workdir, broker.url, name=RESUME_COPY, heartbeat=2,
                store_extra='max_bytes = %dL;' % (16 << 30), drain_timeout=5)
    if not os.path.exists(d.store):
        raise RuntimeError('no copy of the backlog store (phase (d) did not get that far)')
    purge(broker, tool)
    t0 = time.time_ns()
    d.start(wait_ready=False, args=())
    t_health = time.time_ns()
    poller = Poller(d, 0, 1, interval=0.005, timeout=120)
    poller.run()    # in this thread: until the first confirm
    if poller.error:
        raise poller.error
    if poller.t_first is None:
        raise RuntimeError('sagad did not start relaying its backlog within 120 s')
    m = Metrics(d)
    pending = msum(m.get(), 'sagad_outbox_pending')
    m.close()
    fig('resume_up_s', (poller.t_first - t0) / 1e9, 'exec -> sagad_published_total rising, '
        'broker up, %d pending (target <= 2 s); /healthz after %.3f s'
        % (pending, (t_health - t0) / 1e9))
    d.stop(timeout=60)
    purge(broker, tool)


# ---------------------------------------------------------------- main

def summary(t_start):
    print()
    print('=' * 78)
    print('sagad benchmark summary  (N=%d x %d, size=%d B, conns=%d, backlog=%d%s)'
          % (N, REPEAT, SIZE, CONNS, BACKLOG, ', QUICK' if QUICK else ''))
    print('-' * 78)
    w = max(len(n) for n, _, _ in figures)
    for name, value, comment in figures:
        if name[-2:-1] == '_' and name[-1].isdigit():
            continue        # per-repeat values: the medians stand for them
        print('%-*s  %12s  %s' % (w, name, value, comment))
    print('-' * 78)
    print('total %.0f s' % (time.time() - t_start))
    print('=' * 78, flush=True)


def main():
    def on_signal(signum, frame):
        # once: a second signal (run.sh forwards what the group also got)
        # must not interrupt the cleanup
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        sys.exit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    for p in (LOADGEN, DIRECT, h.sagad_path()):
        if not os.access(p, os.X_OK):
            print('bench: %s missing: build it first (make bench)' % p, file=sys.stderr)
            return 2
    parent = os.environ.get('BENCH_WORKDIR') or None
    workdir = tempfile.mkdtemp(prefix='sagad-bench-', dir=parent)
    os.chmod(workdir, 0o755)
    say('work directory %s; N=%d repeat=%d backlog=%d conns=%d'
        % (workdir, N, REPEAT, BACKLOG, CONNS))
    t_start = time.time()
    ok = False
    try:
        tool = h.AmqpTool()
        broker = h.Broker(workdir)
        broker.start()
        tool.declare_queue(broker.url, QUEUE, [(EXCHANGE, '#')])
        phase_fsync(workdir)    # (e) [added]

        sagad = h.Sagad(workdir, broker.url, name='bench', heartbeat=10,
                        store_extra='max_bytes = %dL;' % (16 << 30))
        sagad.start(args=())
        say('(a)/(b) throughput, %d x %d messages of %d B' % (REPEAT, N, SIZE))
        drates, srates, irates, ip99s = [], [], [], []
        for i in range(1, REPEAT + 1):
            drates.append(phase_direct(broker, tool, i))
            s, ing, p99 = phase_sagad(broker, tool, sagad, workdir, i)
            srates.append(s)
            irates.append(ing)
            ip99s.append(p99)
        each = lambda xs: 'median of ' + ' '.join('%.0f' % x for x in xs)
        fig('direct_rate', statistics.median(drates), 'msg/s baseline, ' + each(drates))
        fig('sagad_rate', statistics.median(srates), 'msg/s POST->confirmed, ' + each(srates))
        fig('sagad_ingress_rate', statistics.median(irates), 'msg/s POST->202, ' + each(irates))
        fig('sagad_ingress_p99_ms', statistics.median(ip99s), 'POST->202 at full load, median')
        fig('ratio', statistics.median(srates) / statistics.median(drates), 'sagad/direct')
        fig('load_avg_ab', os.getloadavg()[0], '1-min load average after (a)/(b)')  # [added]

        if os.environ.get('BENCH_TRACING', '1') != '0':
            say('(g) throughput with tracing on, sampling 1')
            phase_traced(broker, tool, workdir)
            fig('load_avg_g', os.getloadavg()[0], '1-min load average after (g)')  # [added]

        say('(c) latency at %d msg/s for %d s' % (RATE, LAT_SECONDS))
        phase_latency(broker, tool, sagad, workdir)
        fig('load_avg_c', os.getloadavg()[0], '1-min load average after (c)')  # [added]
        sagad.stop()

        say('(d) backlog of %d messages, broker down' % BACKLOG)
        phase_backlog(broker, tool, workdir)
        fig('load_avg_d', os.getloadavg()[0], '1-min load average after (d)')  # [added]
        say('(f) restart on the backlog with the broker up')
        phase_resume_up(broker, tool, workdir)     # (f) [added]
        fig('load_avg_f', os.getloadavg()[0], '1-min load average after (f)')  # [added]
        fig('rss_target_met', 'yes' if float(dict((n, v) for n, v, _ in figures)['rss_mb'])
            <= RSS_TARGET_MB else 'no', '<= %d MB' % RSS_TARGET_MB)
        ok = True
    except BaseException as e:
        if not isinstance(e, SystemExit):
            import traceback
            traceback.print_exc()
        for s in list(h._live):
            if isinstance(s, h.Sagad):
                print('---- tail of %s' % s.logfile)
                print(h.tail(s.logfile, 30))
    finally:
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
