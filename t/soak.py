#!/usr/bin/env python3
"""Soak test: a steady stream through ingress, relay and a subscription.

One private RabbitMQ node, one sagad with a subscription bound to the
exchange it publishes to, and a local HTTP sink as the subscription's
service. bench/loadgen POSTs SOAK_RATE messages a second (open loop) for
SOAK_SECONDS to /v1/publish/events/soak.N; sagad stores them, relays them
to the broker, consumes them back from its queue and delivers them to the
sink. Every SOAK_SAMPLE seconds one line shows sagad's resident memory
(VmRSS), open file descriptors, outbox backlog, published and delivered
counts.

Checks (exit 1 when one fails):
  - resident memory flat: the figure at the end of the load is at most
    SOAK_RSS_SLACK_MB (16) or SOAK_RSS_SLACK_PCT (20) % above the one at
    the end of the warm-up (the first SOAK_WARMUP seconds, default a quarter
    of the run, at most 60 s: SQLite's page cache and the buffers fill
    there); open file descriptors at most 2 more;
  - every request answered 202 and every message delivered (duplicates are
    counted and reported: at-least-once allows them, none are expected);
  - no level=error line in sagad's log; sagad stops with exit status 0.

Environment: SOAK_SECONDS (20: a smoke run; the release soak is 1800),
SOAK_RATE (2000 msg/s; when the machine cannot take it, the load still
stops after SOAK_SECONDS + SOAK_GRACE (30) with a WARNING and the rate
reached, and the checks apply to what was sent), SOAK_SIZE (256 bytes), SOAK_CONNS (16 loadgen
connections), SOAK_SAMPLE (10 s; 2 s for a run under a minute),
SOAK_WARMUP, SOAK_RSS_SLACK_MB, SOAK_RSS_SLACK_PCT, SOAK_DRAIN (300 s for the
deliveries to catch up after the load), SOAK_QUEUE_TYPE
(quorum), SOAK_CONCURRENCY (32 deliveries in flight), plus the harness's
(top_srcdir, top_builddir, SAGAD, SAGAD_KEEP). Run:

    top_srcdir=$PWD top_builddir=$PWD SOAK_SECONDS=1800 python3 t/soak.py
"""

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir') or
                                os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                't', 'lib'))
import harness as h  # noqa: E402


def env_num(name, default, conv=float):
    v = os.environ.get(name)
    return conv(v) if v not in (None, '') else default


SECONDS = env_num('SOAK_SECONDS', 20)
RATE = env_num('SOAK_RATE', 2000)
SIZE = env_num('SOAK_SIZE', 256, int)
CONNS = env_num('SOAK_CONNS', 16, int)
SAMPLE = env_num('SOAK_SAMPLE', 10 if SECONDS >= 60 else 2)
WARMUP = env_num('SOAK_WARMUP', min(60.0, SECONDS / 4.0))
RSS_SLACK_MB = env_num('SOAK_RSS_SLACK_MB', 16)
RSS_SLACK_PCT = env_num('SOAK_RSS_SLACK_PCT', 20)
QUEUE_TYPE = os.environ.get('SOAK_QUEUE_TYPE') or 'quorum'
CONCURRENCY = env_num('SOAK_CONCURRENCY', 32, int)
DRAIN = env_num('SOAK_DRAIN', 300)
GRACE = env_num('SOAK_GRACE', 30)
N = int(RATE * SECONDS)
RUNID = 'soak%d' % os.getpid()


def loadgen_path():
    """bench/loadgen from the build, else a private copy built by gcc."""
    p = os.path.join(h.top_builddir, 'bench', 'loadgen')
    if os.access(p, os.X_OK):
        return p
    src = os.path.join(h.top_srcdir, 'bench', 'loadgen.c')
    out = os.path.join(tempfile.gettempdir(), 'sagad-loadgen-%d' % os.getuid())
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
        r = subprocess.run(['gcc', '-O2', '-Wall', '-std=gnu11', src, '-o', out + '.tmp',
                            '-levent', '-lm'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            raise RuntimeError('cannot build loadgen: %s' % r.stdout.decode())
        os.rename(out + '.tmp', out)
    return out


class Sink:
    """The subscription's service: a minimal HTTP/1.1 keep-alive server on
    its own asyncio loop thread that answers 200 to every POST and records
    which loadgen message ids ("b-RUNID-i") arrived, and how often."""

    def __init__(self, n):
        self.seen = bytearray(n)
        self.count = 0
        self.dups = 0
        self.foreign = 0
        self.conns = 0
        self.loop = asyncio.new_event_loop()
        self.port = None
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        if not started.wait(10):
            raise RuntimeError('sink did not start')
        self.url = 'http://127.0.0.1:%d/messages' % self.port

    def _run(self, started):
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._conn, '127.0.0.1', 0, backlog=256))
        self.server = server
        self.port = server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()

    def _record(self, mid):
        prefix = ('b-%s-' % RUNID).encode()
        if mid and mid.startswith(prefix):
            try:
                i = int(mid[len(prefix):])
            except ValueError:
                i = -1
            if 0 <= i < len(self.seen):
                if self.seen[i]:
                    self.dups += 1
                else:
                    self.seen[i] = 1
                    self.count += 1
                return
        self.foreign += 1

    async def _conn(self, reader, writer):
        self.conns += 1
        try:
            while True:
                head = await reader.readuntil(b'\r\n\r\n')
                clen, mid = 0, None
                for line in head.split(b'\r\n')[1:]:
                    k, _, v = line.partition(b':')
                    k = k.strip().lower()
                    if k == b'content-length':
                        clen = int(v.strip())
                    elif k == b'message-id':
                        mid = v.strip()
                if clen:
                    await reader.readexactly(clen)
                self._record(mid)
                writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n')
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def stop(self):
        async def _shutdown():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.loop.stop()
        asyncio.run_coroutine_threadsafe(_shutdown(), self.loop)
        self.thread.join(10)


def proc_figures(pid):
    """(VmRSS in kB, open fds) of a process."""
    rss = 0
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                rss = int(line.split()[1])
    return rss, len(os.listdir('/proc/%d/fd' % pid))


def slope_kb_per_min(samples):
    """Least-squares slope of RSS over time (kB/min) of (t, rss) pairs."""
    if len(samples) < 3:
        return 0.0
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mr = sum(r for _, r in samples) / n
    den = sum((t - mt) ** 2 for t, _ in samples)
    if den == 0:
        return 0.0
    return sum((t - mt) * (r - mr) for t, r in samples) / den * 60.0


def main(wd):
    h.log('soak: %d s at %d msg/s (%d messages of %d bytes), %d connections, '
          'queue %s, sample every %ss, warm-up %ss'
          % (SECONDS, RATE, N, SIZE, CONNS, QUEUE_TYPE, SAMPLE, WARMUP))
    loadgen = loadgen_path()
    broker = h.Broker(wd)
    broker.start()
    sink = Sink(N)
    sub = ('subscriptions = ( { name = "soak"; queue_type = "%s"; bind = [ "events:soak.#" ];\n'
           '  deliver = "%s"; concurrency = %d; max_pending = %d; ordered = false;\n'
           '  timeout = 10; max_attempts = 10; retry_initial = 0.2; retry_max = 5; } );'
           % (QUEUE_TYPE, sink.url, CONCURRENCY, CONCURRENCY * 8))
    d = h.Sagad(wd, broker.url, conf_extra=sub, heartbeat=10, connect_timeout=5)
    d.start(args=())          # info level: debug lines at this rate would be the test
    pid = d.proc.pid

    url = 'http://127.0.0.1:%d/v1/publish/events/soak.load' % d.port
    lg_out = os.path.join(wd, 'loadgen.out')
    t0 = time.time()
    lg = subprocess.Popen([loadgen, '-u', url, '-n', str(N), '-s', str(SIZE), '-c', str(CONNS),
                           '-r', str(RATE), '-i', RUNID, '-t', '30'],
                          stdout=open(lg_out, 'w'), stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL)
    samples = []           # (t, rss kB, fds)
    cut = False
    start_fig = None
    h.log('%7s %9s %5s %8s %10s %10s %10s' % ('t', 'rss_kB', 'fds', 'outbox', 'published',
                                              'delivered', 'sink'))
    next_at = t0
    while True:
        done = lg.poll() is not None
        now = time.time()
        if not done and now - t0 > SECONDS + GRACE:
            # The machine cannot take RATE: the load stops on time anyway
            # (the soak is about holding a load for SOAK_SECONDS).
            lg.kill()
            lg.wait()
            cut = True
            done = True
        if now >= next_at or done:
            next_at += SAMPLE
            rss, fds = proc_figures(pid)
            m = d.metrics()
            delivered = sum(v for k, v in m.items()
                            if k.startswith('sagad_delivered_total') and 'success' in k)
            t = now - t0
            samples.append((t, rss, fds))
            h.log('%7.0f %9d %5d %8d %10d %10d %10d'
                  % (t, rss, fds, m.get('sagad_outbox_pending', -1),
                     m.get('sagad_published_total', -1), delivered, sink.count))
            if start_fig is None and t >= WARMUP:
                start_fig = (t, rss, fds)
        if done:
            break
        if d.proc.poll() is not None:
            raise AssertionError('sagad exited (%s) during the soak' % d.proc.returncode)
        time.sleep(min(0.5, max(0.0, next_at - time.time())))
    end_fig = samples[-1]
    if start_fig is None:
        start_fig = samples[0]
    with open(lg_out) as f:
        lg_text = f.read()
    h.log('loadgen: %s' % lg_text.strip().replace('\n', ' | '))
    r = dict(kv.split('=', 1) for kv in lg_text.split() if '=' in kv)
    m = d.metrics()
    accepted = int(m.get('sagad_accepted_total', 0))
    refused = int(m.get('sagad_publish_rejected_total', 0) + m.get('sagad_store_full_total', 0))
    if cut:
        # loadgen was stopped before its summary: sagad's counters say
        # what was answered (202) and refused; requests in flight at the
        # kill may have been stored without their answer being read.
        r = {'ok': str(accepted), 'errors': str(refused),
             'rate': '%.0f' % (accepted / (time.time() - t0))}
        h.log('WARNING: %d msg/s not reached: %d of %d messages sent in %d s (%s msg/s); '
              'load stopped on time' % (RATE, accepted, N, SECONDS + GRACE, r['rate']))

    # Everything accepted must come out at the sink.
    ok_n = accepted if cut else int(r.get('ok', 0))
    t_load = time.time() - t0
    sink_at_load_end = sink.count
    h.wait_until(lambda: sink.count >= ok_n, DRAIN,
                 'the sink to receive the %d accepted messages (has %d)' % (ok_n, sink.count),
                 interval=0.5)
    t_drained = time.time() - t0
    rss_d, fds_d = proc_figures(pid)
    h.log('after drain (%.0f s after the load ended): rss_kB=%d fds=%d sink=%d dups=%d foreign=%d'
          % (t_drained - t_load, rss_d, fds_d, sink.count, sink.dups, sink.foreign))
    h.log('rates: ingress %s msg/s (loadgen), delivered %.0f msg/s during the load, '
          '%.0f msg/s overall' % (r.get('rate'), sink_at_load_end / t_load, sink.count / t_drained))
    rc = d.stop()
    sink.stop()
    log_text = d.log()
    errors = [l for l in log_text.splitlines() if 'level=error' in l]
    warns = [l for l in log_text.splitlines() if 'level=warn' in l]

    second_half = [(t, rss) for t, rss, _ in samples if t >= samples[-1][0] / 2]
    slope = slope_kb_per_min(second_half)
    slack_kb = max(RSS_SLACK_MB * 1024, start_fig[1] * RSS_SLACK_PCT / 100.0)
    print('soak figures: seconds=%d rate=%d planned=%d ok=%s errors=%s delivered=%d dups=%d '
          'rss_start_kB=%d rss_end_kB=%d rss_max_kB=%d rss_slope_2nd_half_kB_per_min=%.1f '
          'fds_start=%d fds_end=%d log_errors=%d log_warnings=%d exit=%s cut=%s'
          % (SECONDS, RATE, N, r.get('ok'), r.get('errors'), sink.count, sink.dups,
             start_fig[1], end_fig[1], max(s[1] for s in samples), slope,
             start_fig[2], end_fig[2], len(errors), len(warns), rc, cut), flush=True)
    for l in (errors + warns)[:10]:
        h.log('log: ' + l)
    h.check(rc == 0, 'sagad stopped with exit status 0', 'exit %s' % rc)
    h.check(r.get('errors') == '0' and refused == 0 and (cut or ok_n == N),
            'every publish answered 2xx', 'loadgen: %s, refused %d' % (lg_text.strip(), refused))
    h.check(sink.count == ok_n, 'every accepted message delivered once or more',
            '%d of %d' % (sink.count, ok_n))
    h.check(end_fig[1] - start_fig[1] <= slack_kb,
            'resident memory flat: %d kB at %ds -> %d kB at %ds (slack %d kB)'
            % (start_fig[1], start_fig[0], end_fig[1], end_fig[0], slack_kb),
            'grew %d kB' % (end_fig[1] - start_fig[1]))
    h.check(end_fig[2] - start_fig[2] <= 2,
            'open descriptors flat: %d -> %d' % (start_fig[2], end_fig[2]))
    h.check(not errors, 'no error in the log', '%d lines, first: %s'
            % (len(errors), errors[0] if errors else ''))


if __name__ == '__main__':
    h.run_test(main, name='soak')
