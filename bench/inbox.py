#!/usr/bin/env python3
"""sagad inbox benchmark (Python stdlib only; run from the build directory:
`python3 $top_srcdir/bench/inbox.py`, after `make bench` and building
bench/consume, bench/pace and bench/sink).

One run, against a private RabbitMQ node started through t/lib/harness.py,
with one sagad subscription (quorum queue `bench.inbox`, bound to
events:bench.in) delivering to bench/sink, a C HTTP service that answers
200 {"ok":true} at once on keep-alive connections:

  (a) baseline: with sagad stopped, bench/direct loads N messages of SIZE
      bytes into the queue; bench/consume (rabbitmq-c, basic.qos PREFETCH,
      one basic.ack per message) consumes them. Rate = N / (program start ->
      N-th ack written).
  (b) the same N through sagad: loaded into the same queue with sagad
      stopped (fresh store each time), then sagad is started; rate = N /
      (exec of sagad -> the sink's arrival time of the N-th request). Then
      the run waits until sagad has acked everything (queue empty) and
      checks that the sink got each message once.
      (a) and (b) alternate BENCH_REPEAT times; medians; ratio = b / a.
  (c) latency: bench/pace publishes RATE msg/s for LAT_SECONDS straight to
      the exchange, the message id carrying the send time (CLOCK_REALTIME,
      ns); the sink records arrival - send for each message. p50/p99/max,
      plus sagad's own sagad_delivery_seconds histogram. Baseline first:
      the same paced stream consumed by bench/consume (broker alone).

Every figure is printed as name=value (with the 1-minute load average at
the time), then a summary. Environment: BENCH_N (100000), BENCH_REPEAT (3),
BENCH_CONCURRENCY (64), BENCH_MAX_PENDING (1024), BENCH_PREFETCH (basic.qos of
both the baseline and sagad's subscription; default 2 x concurrency,
sagad's own default), BENCH_RATE
(1000), BENCH_LAT_SECONDS (10), BENCH_SIZE (256), BENCH_QUEUE_TYPE
(quorum), BENCH_SWEEP ("C:P[:F],...": instead of (a)-(c), one (b) run per
concurrency:max_pending[:prefetch], for tuning), BENCH_QUICK=1, BENCH_KEEP=1,
BENCH_WORKDIR.
"""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as common  # noqa: E402  (helpers of the outbox benchmark)
from run import h, say, spawn, reap, kill_children, run_tool, kv, rss_kb, Metrics, msum  # noqa: E402,F401

env_int = common.env_int
QUICK = common.QUICK
N = env_int('BENCH_N', 5000 if QUICK else 100000)
REPEAT = env_int('BENCH_REPEAT', 1 if QUICK else 3)
CONCURRENCY = env_int('BENCH_CONCURRENCY', 64)
MAX_PENDING = env_int('BENCH_MAX_PENDING', 1024)
PREFETCH = env_int('BENCH_PREFETCH', min(65535, 2 * CONCURRENCY))
RATE = env_int('BENCH_RATE', 1000)
LAT_SECONDS = env_int('BENCH_LAT_SECONDS', 3 if QUICK else 10)
SIZE = env_int('BENCH_SIZE', 256)
QUEUE_TYPE = os.environ.get('BENCH_QUEUE_TYPE') or 'quorum'
SWEEP = os.environ.get('BENCH_SWEEP', '')
EXCHANGE, KEY, QUEUE = 'events', 'bench.in', 'bench.inbox'
RATIO_TARGET, P99_TARGET_MS = 0.6, 10.0

B = common.BUILDDIR
DIRECT = os.path.join(B, 'bench', 'direct')
CONSUME = os.path.join(B, 'bench', 'consume')
PACE = os.path.join(B, 'bench', 'pace')
SINK = os.path.join(B, 'bench', 'sink')

figures = []
LAST_ACK = [float('nan'), float('nan')]     # of the last (b) run, ms


def loadavg():
    with open('/proc/loadavg') as f:
        return float(f.read().split()[0])


def fig(name, value, comment=''):
    if isinstance(value, float):
        value = ('%.3f' % value) if abs(value) < 1000 else ('%.1f' % value)
    la = loadavg()
    figures.append((name, str(value), comment, la))
    print('%s=%s' % (name, value), flush=True)


def cpu_s(pids):
    """CPU seconds (user + system, every thread) used so far by the
    processes pids and their descendants (those alive now)."""
    tck = os.sysconf('SC_CLK_TCK')
    total = 0
    for pid in set(pids) | set(p for q in pids for p in h._descendants(q)):
        try:
            with open('/proc/%d/stat' % pid) as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(')') + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / tck


def broker_pids(broker):
    return [broker.proc.pid] if broker.proc is not None else []


# ---------------------------------------------------------------- the sink

class Sink:
    """bench/sink on a free port."""

    def __init__(self):
        self.port = h.free_port()
        self.proc = spawn([SINK, '-p', str(self.port)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
        line = self.proc.stdout.readline().decode()
        if not line.startswith('sink port='):
            raise RuntimeError('sink did not start: %r %s' % (line, self.proc.stderr.read()))
        self.base = 'http://127.0.0.1:%d' % self.port
        self.url = self.base + '/messages'

    def _req(self, method, path):
        r = urllib.request.Request('http://127.0.0.1:%d%s' % (self.port, path), method=method,
                                   data=b'' if method == 'POST' else None)
        with urllib.request.urlopen(r, timeout=30) as resp:
            return resp.read()

    def stats(self):
        return json.loads(self._req('GET', '/stats'))

    def latencies_ms(self):
        return sorted(int(x) / 1e6 for x in self._req('GET', '/latencies').split())

    def reset(self):
        self._req('POST', '/reset')

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        reap(self.proc)


# ---------------------------------------------------------------- sagad

def make_sagad(workdir, broker, sink, conc, pending, prefetch, name='inbox'):
    sub = '''subscriptions = (
  { name = "in"; queue = "%s"; queue_type = "%s"; bind = [ "%s:%s" ];
    deliver = "%s"; concurrency = %d; max_pending = %d; prefetch = %d; timeout = 10; }
);''' % (QUEUE, QUEUE_TYPE, EXCHANGE, KEY, sink.url, conc, pending, prefetch)
    return h.Sagad(workdir, broker.url, name=name, heartbeat=10, conf_extra=sub,
                   store_extra='max_bytes = %dL;' % (16 << 30))


def wipe_store(d):
    for suffix in ('', '-wal', '-shm', '-journal'):
        try:
            os.unlink(d.store + suffix)
        except FileNotFoundError:
            pass


def preload(broker, tool, n):
    if tool.count(broker.url, QUEUE) != 0:
        tool.purge(broker.url, QUEUE)
    rc, out, err = run_tool([DIRECT, broker.url, EXCHANGE, KEY, str(n), str(SIZE), '1024'],
                            timeout=max(120, n / 500))
    if rc != 0:
        raise RuntimeError('direct failed (exit %d): %s %s' % (rc, out, err.strip()))
    got = tool.count(broker.url, QUEUE)
    if got != n:
        raise RuntimeError('queue holds %d messages after loading %d' % (got, n))
    return float(kv(out, 'direct')['rate'])


def phase_baseline(broker, tool, i):
    preload(broker, tool, N)
    b0 = cpu_s(broker_pids(broker))
    rc, out, err = run_tool([CONSUME, broker.url, QUEUE, str(N), str(PREFETCH)],
                            timeout=max(120, N / 200))
    bcpu = cpu_s(broker_pids(broker)) - b0
    if rc != 0:
        raise RuntimeError('consume failed (exit %d): %s %s' % (rc, out, err.strip()))
    r = kv(out, 'consume')
    rate = float(r['rate'])
    fig('consume_rate_%d' % i, rate, 'msg/s, start -> N-th ack (first msg after %s s)'
        % r['first_s'])
    left = tool.count(broker.url, QUEUE)
    if left:
        say('(the queue still counts %d messages after consume run %d: acks not yet applied)'
            % (left, i))
    return rate, N / float(r['run_s']), float(r['cpu_s']) * 1e6 / N, bcpu * 1e6 / N


class Stalled(Exception):
    pass


def phase_sagad(broker, tool, sink, d, i, tag='', limit=None):
    """Loaded queue, sagad stopped -> start it, time until the sink has N.
    With limit (seconds), give up then: Stalled(rate so far)."""
    wipe_store(d)
    preload(broker, tool, N)
    sink.reset()
    b0 = cpu_s(broker_pids(broker))
    t_exec = time.time_ns()
    d.start(args=())
    deadline = time.time() + (limit or max(120, N / 100))
    while True:
        st = sink.stats()
        if st['count'] >= N:
            break
        if d.proc.poll() is not None:
            raise RuntimeError('sagad exited with %s' % d.proc.returncode)
        if time.time() > deadline:
            if limit:
                reconnects = d.log().count('broker connection lost')
                d.stop()
                raise Stalled('%d of %d in %.0f s (%.0f msg/s), %d broker connections lost'
                              % (st['count'], N, (time.time_ns() - t_exec) / 1e9,
                                 st['count'] / ((time.time_ns() - t_exec) / 1e9), reconnects))
            raise RuntimeError('the sink got %d of %d messages in time' % (st['count'], N))
        time.sleep(0.02)
    secs = (st['last_ns'] - t_exec) / 1e9
    run_s = (st['last_ns'] - st['first_ns']) / 1e9
    rate = N / secs
    rss = rss_kb(d.proc.pid) / 1024.0
    # every message acked to the broker, and delivered once
    m = Metrics(d)
    h.wait_until(lambda: msum(m.get(), 'sagad_delivered_total') >= N and
                 tool.count(broker.url, QUEUE) == 0, 120, 'sagad to ack every message',
                 interval=0.2)
    mm = m.get()
    m.close()
    ack = common.buckets(mm, 'sagad_inbox_ack_seconds')
    q = [common.hist_quantile(x, {}, ack) for x in (0.5, 0.99)]
    if q[0] and q[1]:
        LAST_ACK[:] = [q[0][0] * 1e3, q[1][0] * 1e3]
        say('arrival -> broker ack p50 %.2f ms, p99 %.2f ms (sagad_inbox_ack_seconds)'
            % tuple(LAST_ACK))
    scpu = cpu_s([d.proc.pid])      # its whole life: start, N messages
    bcpu = cpu_s(broker_pids(broker)) - b0
    time.sleep(0.2)
    got = sink.stats()['count']
    d.stop()
    fig('sagad_rate%s_%d' % (tag, i), rate, 'msg/s, exec -> N-th request at the sink '
        '(first after %.3f s)' % ((st['first_ns'] - t_exec) / 1e9))
    if got != N:
        say('WARNING: the sink got %d requests for %d messages' % (got, N))
    dups = msum(mm, 'sagad_duplicates_total')
    ok = sum(v for k, v in mm.items()
             if k.startswith('sagad_delivered_total{') and 'outcome="success"' in k)
    if ok != N or dups:
        say('WARNING: delivered success=%d duplicates=%d (N=%d)' % (ok, dups, N))
    return rate, N / run_s, rss, scpu * 1e6 / N, bcpu * 1e6 / N


def phase_latency_direct(broker, tool):
    """The broker alone: pace -> queue -> bench/consume, same rate."""
    n = RATE * LAT_SECONDS
    if tool.count(broker.url, QUEUE):
        tool.purge(broker.url, QUEUE)
    cons = spawn([CONSUME, broker.url, QUEUE, str(n), str(PREFETCH)],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.0)     # connected and consuming
    rc, out, err = run_tool([PACE, broker.url, EXCHANGE, KEY, str(n), str(RATE), str(SIZE),
                             'dlat%d' % os.getpid()], timeout=LAT_SECONDS + 120)
    if rc != 0:
        raise RuntimeError('pace failed (exit %d): %s %s' % (rc, out, err.strip()))
    try:
        cout, cerr = cons.communicate(timeout=120)
    finally:
        reap(cons)
    if cons.returncode != 0:
        raise RuntimeError('consume failed: %s' % cerr.decode(errors='replace'))
    r = kv(cout.decode(), 'consume')
    fig('lat_direct_p50_ms', float(r['lat_p50_ms']), 'publish -> bench/consume, no sagad')
    fig('lat_direct_p99_ms', float(r['lat_p99_ms']))


def phase_latency(broker, tool, sink, d):
    n = RATE * LAT_SECONDS
    d.start(args=())
    sink.reset()
    m = Metrics(d)
    h0 = common.buckets(m.get(), 'sagad_delivery_seconds')
    rc, out, err = run_tool([PACE, broker.url, EXCHANGE, KEY, str(n), str(RATE), str(SIZE),
                             'lat%d' % os.getpid()], timeout=LAT_SECONDS + 120)
    if rc != 0:
        raise RuntimeError('pace failed (exit %d): %s %s' % (rc, out, err.strip()))
    r = kv(out, 'pace')
    h.wait_until(lambda: sink.stats()['count'] >= n, 60, 'the sink to get every message',
                 interval=0.1)
    lat = sink.latencies_ms()
    h1 = common.buckets(m.get(), 'sagad_delivery_seconds')
    m.close()
    d.stop()
    fig('lat_publish_rate', float(r['rate']), 'msg/s offered %d (pace late_max %s ms)'
        % (RATE, r['late_max_ms']))
    fig('lat_messages', len(lat))
    fig('lat_p50_ms', common.pct(lat, 0.5), 'publish -> sink')
    fig('lat_p99_ms', common.pct(lat, 0.99), 'publish -> sink (target <= %g)' % P99_TARGET_MS)
    fig('lat_max_ms', lat[-1] if lat else float('nan'))
    for q in (0.5, 0.99):
        res = common.hist_quantile(q, h0, h1)
        name = 'lat_delivery_hist_p%d_ms' % round(q * 100)
        if res is None:
            fig(name, 'n/a')
        else:
            fig(name, res[0] * 1000, 'sagad_delivery_seconds, in bucket (%g, %g] ms'
                % (res[1] * 1000, res[2] * 1000))
    return common.pct(lat, 0.99)


def summary(t_start):
    print()
    print('=' * 86)
    print('sagad inbox benchmark summary  (N=%d x %d, size=%d B, concurrency=%d, '
          'max_pending=%d, prefetch=%d, %s%s)' % (N, REPEAT, SIZE, CONCURRENCY, MAX_PENDING,
                                                  PREFETCH, QUEUE_TYPE, ', QUICK' if QUICK else ''))
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
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        sys.exit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    for p in (DIRECT, CONSUME, PACE, SINK, h.sagad_path()):
        if not os.access(p, os.X_OK):
            print('bench: %s missing: build it first' % p, file=sys.stderr)
            return 2
    workdir = tempfile.mkdtemp(prefix='sagad-inbox-', dir=os.environ.get('BENCH_WORKDIR') or None)
    os.chmod(workdir, 0o755)
    say('work directory %s; N=%d repeat=%d concurrency=%d max_pending=%d prefetch=%d'
        % (workdir, N, REPEAT, CONCURRENCY, MAX_PENDING, PREFETCH))
    t_start = time.time()
    ok = False
    sink = None
    try:
        tool = h.AmqpTool()
        broker = h.Broker(workdir)
        broker.start()
        sink = Sink()
        lat = common.fsync_probe(workdir)
        fig('fsync_p50_ms', common.pct(lat, 0.5), '1,000 x write(4 KiB)+fdatasync in the work '
            'directory (the floor of every commit)')
        fig('fsync_p99_ms', common.pct(lat, 0.99))
        if SWEEP:
            for k, pair in enumerate(SWEEP.split(','), 1):
                nums = [int(x) for x in pair.split(':')]
                conc, pend = nums[:2]
                pref = nums[2] if len(nums) > 2 else min(65535, 2 * conc)
                d = make_sagad(workdir, broker, sink, conc, pend, pref, name='sweep%d' % k)
                d.start(args=())    # declares the queue and its binding
                d.stop()
                try:
                    rate, run_rate, rss, scpu, bcpu = phase_sagad(broker, tool, sink, d, 1,
                                                      tag='_c%d_p%d_f%d' % (conc, pend, pref),
                                                      limit=max(60, N / 200))
                except Stalled as e:
                    fig('sweep_c%d_p%d_f%d' % (conc, pend, pref), 'stalled', str(e))
                    continue
                reconnects = d.log().count('broker connection lost')
                fig('sweep_c%d_p%d_f%d' % (conc, pend, pref), rate, 'msg/s (first->last %.0f msg/s), '
                    'RSS %.1f MB, CPU per message sagad %.1f us, RabbitMQ %.1f us, ack p50 %.2f '
                    'p99 %.2f ms, %d broker connections lost'
                    % (run_rate, rss, scpu, bcpu, LAST_ACK[0], LAST_ACK[1], reconnects))
            ok = True
            return 0
        d = make_sagad(workdir, broker, sink, CONCURRENCY, MAX_PENDING, PREFETCH)
        d.start(args=())        # declares the queue and its binding
        d.stop()
        say('(a)/(b) throughput, %d x %d messages of %d B' % (REPEAT, N, SIZE))
        base, base_run, srates, srun, rsss = [], [], [], [], []
        ccpu, cbcpu, scpu, sbcpu = [], [], [], []
        for i in range(1, REPEAT + 1):
            r, rr, c1, c2 = phase_baseline(broker, tool, i)
            base.append(r)
            base_run.append(rr)
            ccpu.append(c1)
            cbcpu.append(c2)
            s, sr, rss, c1, c2 = phase_sagad(broker, tool, sink, d, i)
            srates.append(s)
            srun.append(sr)
            rsss.append(rss)
            scpu.append(c1)
            sbcpu.append(c2)
        each = lambda xs: 'median of ' + ' '.join('%.0f' % x for x in xs)
        fig('consume_rate', statistics.median(base), 'msg/s baseline, ' + each(base))
        fig('consume_run_rate', statistics.median(base_run), 'msg/s first msg -> last ack')
        fig('sagad_rate', statistics.median(srates), 'msg/s exec -> N at the sink, ' + each(srates))
        fig('sagad_run_rate', statistics.median(srun), 'msg/s first -> last at the sink')
        fig('sagad_rss_mb', statistics.median(rsss), 'VmRSS when the sink had N')
        fig('consume_cpu_us', statistics.median(ccpu), 'CPU per message, bench/consume')
        fig('consume_broker_cpu_us', statistics.median(cbcpu), 'CPU per message, RabbitMQ, (a)')
        fig('sagad_cpu_us', statistics.median(scpu), 'CPU per message, sagad (whole run)')
        fig('sagad_broker_cpu_us', statistics.median(sbcpu), 'CPU per message, RabbitMQ, (b)')
        fig('sink_cpu_s', cpu_s([sink.proc.pid]), 'CPU of bench/sink for the whole run')
        ratio = statistics.median(srates) / statistics.median(base)
        fig('ratio', ratio, 'sagad/consume (target >= %g)' % RATIO_TARGET)
        fig('ratio_target_met', 'yes' if ratio >= RATIO_TARGET else 'no')

        say('(c) latency at %d msg/s for %d s' % (RATE, LAT_SECONDS))
        phase_latency_direct(broker, tool)
        wipe_store(d)
        p99 = phase_latency(broker, tool, sink, d)
        fig('lat_target_met', 'yes' if p99 <= P99_TARGET_MS else 'no',
            'p99 <= %g ms' % P99_TARGET_MS)
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
        if sink is not None:
            sink.stop()
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
