#!/usr/bin/env python3
"""sagad AMQP front door benchmark (Python stdlib only; run from the build
directory: `python3 $top_srcdir/bench/frontdoor.py`, after building
src/sagad, bench/direct, bench/consume and t/amqptool, or `make
bench-frontdoor`).

One run, on one private RabbitMQ node started through t/lib/harness.py,
with one sagad whose AMQP front door (amqp.listen, PLAIN login with the
API token as the password) relays to that node. The same rabbitmq-c
programs talk to the broker and to the front door; only the URL (host,
port, credentials) differs:

  (a) throughput: bench/direct publishes N persistent SIZE-byte messages
      with publisher confirms, WINDOW outstanding, (i) to the broker, (ii)
      to the front door (a confirm there means durable in sagad's store);
      rate = N / (first publish -> last confirm), as the client sees it.
      For (ii) also fd_relayed_rate: N / (start of direct -> sagad's
      outbox empty, polled every 10 ms), i.e. until the broker confirmed
      every message to sagad. (i) and (ii) alternate BENCH_REPEAT times;
      medians; ratio_publish = fd / direct (target >= 1.0).
  (b) latency: bench/direct -r RATE (open loop, RATE msg/s for
      LAT_SECONDS), publish -> confirm per message, to the broker, then to
      the front door: p50/p99 (target: the front door's p99 below the
      broker's).
  (c) consumption: BENCH_CONSUME_N messages loaded straight into the
      queue bench.in (declared by that sagad, classic); bench/consume (basic.qos PREFETCH, one basic.ack a
      message) takes them (i) from the broker, (ii) through the front door
      from a second sagad with the subscription `deliver = "amqp"` on that
      queue, which consumes it only while a front-door client consumes;
      rate = N / (consumer start -> N-th ack); ratio_consume = fd / direct
      (target >= 0.6). When that sagad refuses the configuration or the
      front door refuses basic.consume (540, or 404), the figure is
      fd_consume=unavailable and the run goes on.

Every figure is printed as name=value as soon as it is known, with the
1-minute load average at that moment in the summary. Environment: BENCH_N
(100000), BENCH_REPEAT (3), BENCH_WINDOW (1024), BENCH_SIZE (256),
BENCH_RATE (1000), BENCH_LAT_SECONDS (10), BENCH_CONSUME_N (100000),
BENCH_PREFETCH (256), BENCH_QUEUE_TYPE (classic: the queue of (c)), BENCH_PHASES (a,b,c: which phases to run),
BENCH_LAT_FRESH=1 ((b) on a second sagad with an empty store),
BENCH_QUICK=1 (small numbers, about a minute), BENCH_KEEP=1, BENCH_WORKDIR.
"""

import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as common  # noqa: E402  (helpers of the outbox benchmark)
from run import h, say, run_tool, kv, Metrics  # noqa: E402
from inbox import cpu_s, broker_pids, wipe_store  # noqa: E402
import saga as sb  # noqa: E402  (the benchmark frame, the figures and their table)
from saga import fig  # noqa: E402

env_int = common.env_int
QUICK = common.QUICK
N = env_int('BENCH_N', 5000 if QUICK else 100000)
REPEAT = env_int('BENCH_REPEAT', 1 if QUICK else 3)
WINDOW = env_int('BENCH_WINDOW', 1024)
SIZE = env_int('BENCH_SIZE', 256)
RATE = env_int('BENCH_RATE', 1000)
LAT_SECONDS = env_int('BENCH_LAT_SECONDS', 3 if QUICK else 10)
CONSUME_N = env_int('BENCH_CONSUME_N', 5000 if QUICK else 100000)
PREFETCH = env_int('BENCH_PREFETCH', 256)
PHASES = set((os.environ.get('BENCH_PHASES') or 'a,b,c').split(','))
EXCHANGE, KEY, QUEUE = 'events', 'bench.fd', 'bench.fd'
CQUEUE = 'bench.in'
TOKEN = 'bench-frontdoor-token'
PUBLISH_TARGET, CONSUME_TARGET = 1.0, 0.6

B = common.BUILDDIR
DIRECT = os.path.join(B, 'bench', 'direct')
CONSUME = os.path.join(B, 'bench', 'consume')

def median_of(xs):
    return 'median of ' + ' '.join('%.0f' % x for x in xs)


# ---------------------------------------------------------------- daemons

def amqp_conf(port, extra=''):
    return 'amqp = { listen = "127.0.0.1:%d"; };\n%s' % (port, extra)


def fd_url(port):
    # the user name is not checked; the password is the API token
    return 'amqp://bench:%s@127.0.0.1:%d/%%2f' % (TOKEN, port)


def make_sagad(workdir, broker, name, extra=''):
    port = h.free_port()
    d = h.Sagad(workdir, broker.url, name=name, heartbeat=10, token=TOKEN,
                store_extra='max_bytes = %dL;' % (16 << 30), conf_extra=amqp_conf(port, extra))
    d.fd_port = port
    return d


# sagad declares the subscription's queue with arguments of its own (its
# dead-letter exchange), so it is the one to declare it; classic by default
# here, so that the broker's share of the cost stays small next to sagad's.
QUEUE_TYPE = os.environ.get('BENCH_QUEUE_TYPE') or 'classic'
CONSUME_SUB = '''subscriptions = (
  { name = "in"; queue = "%s"; queue_type = "%s"; deliver = "amqp"; }
);''' % (CQUEUE, QUEUE_TYPE)


# ---------------------------------------------------------------- (a) (b)

def direct(url, n, timeout, rate=None, exchange=EXCHANGE, key=KEY):
    cmd = [DIRECT] + (['-r', str(rate)] if rate else []) + \
        [url, exchange, key, str(n), str(SIZE), str(WINDOW)]
    rc, out, err = run_tool(cmd, timeout=timeout)
    if rc != 0:
        raise RuntimeError('direct %s failed (exit %d): %s %s' % (url.split('@')[-1], rc, out,
                                                                  err.strip()))
    return kv(out, 'direct')


def empty_queue(broker, tool, queue):
    if tool.count(broker.url, queue):
        tool.purge(broker.url, queue)


def wait_relayed(d, n_expected, timeout):
    """Poll sagad's outbox until it is empty and n_expected more messages
    were confirmed by the broker; returns the time (time.time()) seen."""
    m = Metrics(d)
    try:
        deadline = time.time() + timeout
        while True:
            mm = m.get()
            if mm.get('sagad_outbox_pending', 1) == 0 and \
                    common.msum(mm, 'sagad_published_total') >= n_expected:
                return time.time()
            if time.time() > deadline:
                raise RuntimeError('sagad relayed %d of %d in %d s' % (
                    common.msum(mm, 'sagad_published_total'), n_expected, timeout))
            time.sleep(0.01)
    finally:
        m.close()


def published_total(d):
    m = Metrics(d)
    try:
        return common.msum(m.get(), 'sagad_published_total')
    finally:
        m.close()


def phase_publish_direct(broker, tool, i):
    empty_queue(broker, tool, QUEUE)
    b0 = cpu_s(broker_pids(broker))
    r = direct(broker.url, N, timeout=max(120, N / 200))
    bcpu = (cpu_s(broker_pids(broker)) - b0) * 1e6 / N
    fig('direct_rate_%d' % i, float(r['rate']), 'msg/s, first publish -> last confirm')
    return float(r['rate']), bcpu


def phase_publish_fd(broker, tool, d, i):
    empty_queue(broker, tool, QUEUE)
    before = published_total(d)
    s0, b0 = cpu_s([d.proc.pid]), cpu_s(broker_pids(broker))
    t_start = time.time()
    r = direct(fd_url(d.fd_port), N, timeout=max(120, N / 200))
    t_relayed = wait_relayed(d, before + N, timeout=max(120, N / 200))
    scpu = (cpu_s([d.proc.pid]) - s0) * 1e6 / N
    bcpu = (cpu_s(broker_pids(broker)) - b0) * 1e6 / N
    got = tool.count(broker.url, QUEUE)
    if got != N:
        say('WARNING: the queue holds %d messages after %d through the front door' % (got, N))
    rate, relayed = float(r['rate']), N / (t_relayed - t_start)
    fig('fd_rate_%d' % i, rate, 'msg/s, first publish -> last confirm (durable in sagad)')
    fig('fd_relayed_rate_%d' % i, relayed, 'msg/s, direct start -> outbox empty')
    return rate, relayed, scpu, bcpu


def phase_throughput(broker, tool, d):
    say('(a) throughput: %d x %d persistent messages of %d B, window %d'
        % (REPEAT, N, SIZE, WINDOW))
    drate, frate, relayed, dbcpu, scpu, fbcpu = [], [], [], [], [], []
    for i in range(1, REPEAT + 1):
        r, c = phase_publish_direct(broker, tool, i)
        drate.append(r)
        dbcpu.append(c)
        r, rr, c1, c2 = phase_publish_fd(broker, tool, d, i)
        frate.append(r)
        relayed.append(rr)
        scpu.append(c1)
        fbcpu.append(c2)
    fig('direct_rate', statistics.median(drate), 'msg/s to the broker, ' + median_of(drate))
    fig('fd_rate', statistics.median(frate), 'msg/s to the front door, ' + median_of(frate))
    fig('fd_relayed_rate', statistics.median(relayed), 'msg/s until the broker has them all, '
        + median_of(relayed))
    fig('direct_broker_cpu_us', statistics.median(dbcpu), 'CPU per message, RabbitMQ, (i)')
    fig('fd_sagad_cpu_us', statistics.median(scpu), 'CPU per message, sagad (confirm + relay)')
    fig('fd_broker_cpu_us', statistics.median(fbcpu), 'CPU per message, RabbitMQ, (ii)')
    ratio = statistics.median(frate) / statistics.median(drate)
    fig('ratio_publish', ratio, 'fd_rate / direct_rate (target >= %g)' % PUBLISH_TARGET)
    fig('ratio_publish_target_met', 'yes' if ratio >= PUBLISH_TARGET else 'no')
    fig('ratio_relayed', statistics.median(relayed) / statistics.median(drate),
        'fd_relayed_rate / direct_rate (no target: what the broker sees)')


def wait_idle(pids, limit=30.0, window=0.5, busy=0.10):
    """Seconds until the processes use under `busy` of a core over a
    `window`, at most `limit`: (b) should not start while (a)'s work is
    still going on in sagad or RabbitMQ. (In the runs of 6 Dec they were
    idle at once, 0.5 s, and (b)'s p99 outliers came with the machine's
    load whether or not (a) ran on the same store: bench/README.md.)"""
    t0 = time.time()
    while time.time() - t0 < limit:
        c0 = cpu_s(pids)
        time.sleep(window)
        if (cpu_s(pids) - c0) / window < busy:
            break
    return time.time() - t0


def phase_latency(broker, tool, d):
    n = RATE * LAT_SECONDS
    say('(b) publish -> confirm latency at %d msg/s for %d s' % (RATE, LAT_SECONDS))
    fig('lat_settle_s', wait_idle([d.proc.pid] + broker_pids(broker)),
        'wait for sagad and RabbitMQ to be idle (< 10% of a core) before (b)')
    p99 = {}
    for who, url in (('direct', broker.url), ('fd', fd_url(d.fd_port))):
        empty_queue(broker, tool, QUEUE)
        before = published_total(d)
        r = direct(url, n, timeout=LAT_SECONDS + 120, rate=RATE)
        fig('lat_%s_rate' % who, float(r['rate']), 'msg/s offered %d (late_max %s ms)'
            % (RATE, r['late_max_ms']))
        fig('lat_%s_p50_ms' % who, float(r['lat_p50_ms']), 'publish -> confirm')
        fig('lat_%s_p99_ms' % who, float(r['lat_p99_ms']))
        fig('lat_%s_max_ms' % who, float(r['lat_max_ms']))
        p99[who] = float(r['lat_p99_ms'])
        if who == 'fd':
            wait_relayed(d, before + n, timeout=120)
    fig('lat_target_met', 'yes' if p99['fd'] < p99['direct'] else 'no',
        "front door p99 below the broker's")


# ---------------------------------------------------------------- (c)

def preload(broker, tool, n):
    """n messages straight into CQUEUE through the default exchange."""
    empty_queue(broker, tool, CQUEUE)
    direct(broker.url, n, timeout=max(120, n / 500), exchange='', key=CQUEUE)
    got = tool.count(broker.url, CQUEUE)
    if got != n:
        raise RuntimeError('%s holds %d messages after loading %d' % (CQUEUE, got, n))


def consume(url, n):
    """(rate, cpu_s, None) or (None, None, reason) when basic.consume is
    refused."""
    rc, out, err = run_tool([CONSUME, url, CQUEUE, str(n), str(PREFETCH)],
                            timeout=max(120, n / 200))
    if rc == 3:
        return None, None, 'basic.consume refused: ' + err.strip()[-200:]
    if rc != 0:
        raise RuntimeError('consume failed (exit %d): %s %s' % (rc, out, err.strip()))
    r = kv(out, 'consume')
    return float(r['rate']), float(r['cpu_s']), None


def start_consume_sagad(d):
    """Start the deliver = "amqp" sagad; None, or why it is unavailable."""
    wipe_store(d)
    try:
        d.start(args=())
    except RuntimeError as e:
        if 'deliver' in str(e):
            return 'sagad refuses deliver = "amqp": ' + \
                [ln for ln in str(e).splitlines() if 'deliver' in ln][-1].strip()[-200:]
        raise
    return None


def declare_consume_queue(broker, tool, d):
    """The queue as sagad declares it (started once, then stopped), or,
    when sagad cannot consume through its front door, a plain one for the
    baseline. None, or why the front door's part is unavailable."""
    why = start_consume_sagad(d)
    if why is None:
        h.wait_until(lambda: tool.run(broker.url, 'count', CQUEUE, check=False).returncode == 0,
                     30, 'sagad to declare %s' % CQUEUE, interval=0.2)
        d.stop()
    else:
        tool.declare_queue(broker.url, CQUEUE, [])
    return why


def phase_consume(broker, tool, d):
    say('(c) consumption: %d x %d messages, prefetch %d, one ack each, %s queue'
        % (REPEAT, CONSUME_N, PREFETCH, QUEUE_TYPE))
    direct_rates, fd_rates = [], []
    why = declare_consume_queue(broker, tool, d)
    cpu = {'direct_broker': [], 'direct_client': [], 'fd_broker': [], 'fd_sagad': [],
           'fd_client': []}
    per_msg = lambda x: x * 1e6 / CONSUME_N     # noqa: E731  (s -> us a message)
    for i in range(1, REPEAT + 1):
        preload(broker, tool, CONSUME_N)
        b0 = cpu_s(broker_pids(broker))
        r, c, _ = consume(broker.url, CONSUME_N)
        fig('consume_direct_rate_%d' % i, r, 'msg/s, start -> N-th ack')
        direct_rates.append(r)
        cpu['direct_broker'].append(per_msg(cpu_s(broker_pids(broker)) - b0))
        cpu['direct_client'].append(per_msg(c))
        if why is not None:
            continue
        preload(broker, tool, CONSUME_N)
        why = start_consume_sagad(d)
        if why is None:
            s0, b0 = cpu_s([d.proc.pid]), cpu_s(broker_pids(broker))
            r, c, why = consume(fd_url(d.fd_port), CONSUME_N)
        if why is None:
            fd_rates.append(r)
            fig('consume_fd_rate_%d' % i, r, 'msg/s, start -> N-th ack through sagad')
            h.wait_until(lambda: tool.count(broker.url, CQUEUE) == 0, 60,
                         'sagad to ack every message to the broker', interval=0.2)
            cpu['fd_sagad'].append(per_msg(cpu_s([d.proc.pid]) - s0))
            cpu['fd_broker'].append(per_msg(cpu_s(broker_pids(broker)) - b0))
            cpu['fd_client'].append(per_msg(c))
        if d.running():
            d.stop()
    fig('consume_direct_rate', statistics.median(direct_rates), median_of(direct_rates))
    fig('consume_direct_cpu_us', statistics.median(cpu['direct_broker']),
        'CPU per message, RabbitMQ (client %.1f us)' % statistics.median(cpu['direct_client']))
    if why is not None:
        fig('fd_consume', 'unavailable', why)
        return
    fig('consume_fd_rate', statistics.median(fd_rates), median_of(fd_rates))
    fig('consume_fd_cpu_us', statistics.median(cpu['fd_sagad']),
        'CPU per message, sagad (RabbitMQ %.1f us, client %.1f us)'
        % (statistics.median(cpu['fd_broker']), statistics.median(cpu['fd_client'])))
    ratio = statistics.median(fd_rates) / statistics.median(direct_rates)
    fig('ratio_consume', ratio, 'consume_fd_rate / consume_direct_rate (target >= %g)'
        % CONSUME_TARGET)
    fig('ratio_consume_target_met', 'yes' if ratio >= CONSUME_TARGET else 'no')


# ---------------------------------------------------------------- report

def summary(t_start):
    sb.table(t_start, 'sagad AMQP front door benchmark summary  (N=%d x %d, size=%d B, '
             'window=%d, rate=%d/s x %d s, consume N=%d prefetch=%d%s)'
             % (N, REPEAT, SIZE, WINDOW, RATE, LAT_SECONDS, CONSUME_N, PREFETCH,
                ', QUICK' if QUICK else ''))


def run(workdir):
    tool = h.AmqpTool()
    broker = h.Broker(workdir)
    broker.start()
    tool.declare_queue(broker.url, QUEUE, [(EXCHANGE, KEY)])
    d = make_sagad(workdir, broker, 'fd')
    d.start(args=())
    if 'a' in PHASES:
        phase_throughput(broker, tool, d)
    if 'b' in PHASES:
        if os.environ.get('BENCH_LAT_FRESH') and 'a' in PHASES:
            # (b) on a sagad with an empty store, the broker as (a) left it:
            # tells sagad's state after (a) from the broker's
            d.stop()
            d = make_sagad(workdir, broker, 'fdlat')
            d.start(args=())
        phase_latency(broker, tool, d)
    d.stop()
    if 'c' in PHASES:
        phase_consume(broker, tool, make_sagad(workdir, broker, 'fdc', CONSUME_SUB))


def main():
    for p in (DIRECT, CONSUME, h.sagad_path()):
        if not os.access(p, os.X_OK):
            print('bench: %s missing: build it first' % p, file=sys.stderr)
            return 2
    return sb.frame('sagad-fd-', lambda wd: 'work directory %s; N=%d repeat=%d window=%d '
                    'rate=%d consume_n=%d prefetch=%d' % (wd, N, REPEAT, WINDOW, RATE,
                                                          CONSUME_N, PREFETCH), run, summary)


if __name__ == '__main__':
    sys.exit(main())
