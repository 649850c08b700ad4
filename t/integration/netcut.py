#!/usr/bin/env python3
"""A network cut that is not a clean close.

The broker runs in a network namespace that the test creates, reached over
a veth pair with link-local addresses (169.254.x.y/30, only between this
host's namespaces: nothing leaves the machine). One sagad publishes to it
and consumes from it (a subscription delivering to a local HTTP sink), with
broker.heartbeat = 2, while a client publishes 20 messages a second.

(a) the namespace's end of the link is taken down for 10 s (5 heartbeats):
    no FIN, no RST, packets just vanish;
(b) the broker's processes are stopped with SIGSTOP for 10 s (the same
    silence, seen from a live TCP peer), then SIGCONT.

Each time: sagad notices within two heartbeats (+ the heartbeat/2 timer
tick and 1 s of polling slack): sagad_broker_connected 0 and a "broker
connection lost" log line for both connections; it never hangs: ingress
keeps answering 202 within 2 s and /healthz answers throughout; after the
link is back it reconnects and everything accepted is delivered to the
sink exactly once. Figures: detection time per connection, reconnection
time, publish latency during the cut, duplicates on the wire.

Without permission for network namespaces (not root, or no CAP_SYS_ADMIN)
only (b) runs, with the broker on loopback. Namespaces and links are removed
at the end, and any process left in the namespace is killed by pid.
"""

import atexit
import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402

HB = 2
CUT = 10.0
RATE = 20.0
LAT_BOUND = 2.0
DETECT_BOUND = 2 * HB + HB / 2.0 + 2.0     # slack for a loaded 2-core CI machine


def sh(*args, check=True):
    r = subprocess.run(list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    if check and r.returncode != 0:
        raise RuntimeError('%s: exit %d: %s' % (' '.join(args), r.returncode,
                                                r.stdout.decode(errors='replace').strip()))
    return r.returncode, r.stdout.decode(errors='replace')


class Netns:
    """A namespace with one veth pair to this one; the addresses are the
    first free 169.254.N.(4k+1|4k+2)/30 found."""

    def __init__(self):
        pid = os.getpid()
        self.host_ip = self.ns_ip = None
        self.name = 'sagadcut%d' % pid
        self.host_if = 'scA%d' % (pid % 10000000)
        self.ns_if = 'scB%d' % (pid % 10000000)
        self.made = False
        try:
            _, used = sh('ip', '-4', '-o', 'addr', 'show')
        except OSError:
            return
        for n in range(200 + pid % 40, 255):
            for k in range(0, 64):
                a = '169.254.%d.%d' % (n, 4 * k + 1)
                b = '169.254.%d.%d' % (n, 4 * k + 2)
                if ('169.254.%d.%d/' % (n, 4 * k + 1) not in used and
                        '169.254.%d.%d/' % (n, 4 * k + 2) not in used):
                    self.host_ip, self.ns_ip = a, b
                    return
        raise RuntimeError('no free 169.254.x.y/30')

    def create(self):
        try:
            rc, out = sh('ip', 'netns', 'add', self.name, check=False)
        except OSError as e:        # no ip(8)
            return str(e)
        if rc != 0:
            return out.strip()
        self.made = True
        atexit.register(self.destroy)
        sh('ip', 'link', 'add', self.host_if, 'type', 'veth', 'peer', 'name', self.ns_if)
        sh('ip', 'link', 'set', self.ns_if, 'netns', self.name)
        sh('ip', 'addr', 'add', self.host_ip + '/30', 'dev', self.host_if)
        sh('ip', 'link', 'set', self.host_if, 'up')
        sh('ip', '-n', self.name, 'addr', 'add', self.ns_ip + '/30', 'dev', self.ns_if)
        sh('ip', '-n', self.name, 'link', 'set', self.ns_if, 'up')
        sh('ip', '-n', self.name, 'link', 'set', 'lo', 'up')
        h.log('namespace %s: %s (%s) <-> %s (%s)' % (self.name, self.host_if, self.host_ip,
                                                    self.ns_if, self.ns_ip))
        return None

    def link(self, up):
        sh('ip', '-n', self.name, 'link', 'set', self.ns_if, 'up' if up else 'down')

    def pids(self):
        rc, out = sh('ip', 'netns', 'pids', self.name, check=False)
        return [int(x) for x in out.split()] if rc == 0 else []

    def destroy(self):
        if not self.made:
            return
        self.made = False
        for p in self.pids():       # what the broker left (epmd): started by this test
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        sh('ip', 'link', 'del', self.host_if, check=False)
        sh('ip', 'netns', 'del', self.name, check=False)
        rc, out = sh('ip', 'netns', 'list', check=False)
        h.log('namespace %s removed%s' % (self.name, ' (STILL LISTED)' if self.name in out
                                         else ''))


class Publisher:
    """RATE messages a second through fresh connections; records latency
    and every answer."""

    def __init__(self, d, prefix):
        self.d, self.prefix = d, prefix
        self.accepted, self.errors, self.lat = [], [], []
        self.stop_ev = threading.Event()
        self.th = threading.Thread(target=self.run, daemon=True)
        self.th.start()

    def run(self):
        i, t0 = 0, time.time()
        while not self.stop_ev.is_set():
            delay = t0 + i / RATE - time.time()
            if delay > 0:
                time.sleep(delay)
            mid = '%s-%d' % (self.prefix, i)
            t = time.time()
            try:
                c = http.client.HTTPConnection('127.0.0.1', self.d.port, timeout=30)
                c.request('POST', '/v1/publish/events/cut.%d' % i, body=b'c %d' % i,
                          headers={'Message-Id': mid})
                r = c.getresponse()
                r.read()
                c.close()
                self.lat.append((t, time.time() - t))
                if r.status == 202:
                    self.accepted.append(mid)
                else:
                    self.errors.append((mid, r.status))
            except (OSError, http.client.HTTPException) as e:
                self.errors.append((mid, repr(e)))
            i += 1

    def stop(self):
        self.stop_ev.set()
        self.th.join(60)


class Probe:
    def __init__(self, d):
        self.d, self.worst, self.fail = d, 0.0, []
        self.stop_ev = threading.Event()
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        while not self.stop_ev.is_set():
            t = time.time()
            try:
                st, _ = self.d.admin_get('/healthz', timeout=10)
                if st != 200:
                    self.fail.append(st)
            except (OSError, http.client.HTTPException) as e:
                self.fail.append(repr(e))
            self.worst = max(self.worst, time.time() - t)
            time.sleep(0.1)


TS = re.compile(r'^ts=(\S+) ')


def log_time(line):
    import datetime
    m = TS.match(line)
    return datetime.datetime.strptime(m.group(1), '%Y-%m-%dT%H:%M:%S.%fZ').replace(
        tzinfo=datetime.timezone.utc).timestamp()


def lost_lines(d, since):
    out = {}
    for line in d.log().splitlines():
        if 'msg="broker connection lost"' in line and TS.match(line):
            t = log_time(line)
            role = re.search(r'role=(\w+)', line).group(1)
            if t >= since - 0.5 and role not in out:
                out[role] = (t, line)
    return out


def silence(what, d, sink, cut, restore, figs):
    h.log('== %s for %.0f s (heartbeat %ds)' % (what, CUT, HB))
    pub = Publisher(d, what.split()[0])
    probe = Probe(d)
    time.sleep(2)
    h.check(d.metric('sagad_broker_connected') == 1, '%s: connected before the cut' % what)
    cut()
    t_cut = time.time()     # the cut is certain once cut() returned (it spawns ip, stops pids)
    h.log('%s: cut' % what)
    t_seen = None
    while time.time() - t_cut < CUT:
        if t_seen is None and d.metric('sagad_broker_connected') == 0:
            t_seen = time.time()
        time.sleep(0.1)
    lost = lost_lines(d, t_cut)
    st, body = d.admin_get('/readyz')
    restore()
    t_back = time.time()
    h.log('%s: restored after %.1fs' % (what, t_back - t_cut))
    h.check(t_seen is not None, '%s: sagad_broker_connected turned 0 during the cut' % what)
    det = {role: t - t_cut for role, (t, _) in lost.items()}
    h.log('%s: detection: metric after %.1fs; log lines: %s' % (
        what, t_seen - t_cut, ', '.join('%s %.1fs' % kv for kv in sorted(det.items()))))
    for role, (_, line) in sorted(lost.items()):
        h.log('  ' + line)
    h.check(set(det) == {'publish', 'consume'},
            '%s: both connections logged "broker connection lost"' % what, det)
    h.check(max(det.values()) <= DETECT_BOUND and t_seen - t_cut <= DETECT_BOUND,
            '%s: noticed within two heartbeats + timer tick + slack (%.1fs)' % (what, DETECT_BOUND),
            det)
    h.check(st == 503, '%s: /readyz 503 during the cut' % what, (st, body))
    h.wait_until(lambda: d.admin_get('/readyz')[0] == 200, 60, 'ready again after %s' % what,
                 interval=0.2)
    t_ready = time.time() - t_back
    h.log('%s: ready again %.1fs after the link came back' % (what, t_ready))
    time.sleep(2)
    pub.stop()
    probe.stop_ev.set()
    during = [dt for t, dt in pub.lat if t_cut <= t <= t_back]
    h.check(not pub.errors, '%s: every publish answered 202 (%d, %d during the cut)'
            % (what, len(pub.accepted), len(during)), pub.errors[:5])
    worst = max(dt for _, dt in pub.lat)
    h.check(worst <= LAT_BOUND, '%s: every publish answered within %.1fs (worst %.0f ms, '
            'worst during the cut %.0f ms)' % (what, LAT_BOUND, worst * 1e3,
                                                max(during) * 1e3), worst)
    h.check(not probe.fail and probe.worst <= LAT_BOUND,
            '%s: /healthz answered throughout (worst %.0f ms)' % (what, probe.worst * 1e3),
            probe.fail[:5])

    def delivered():
        ok = sink.ok_ids()
        return all(ok.get(m) for m in pub.accepted)
    h.wait_until(delivered, 90, '%s: every accepted message delivered to the sink' % what,
                 interval=0.5)
    t_all = time.time() - t_back
    time.sleep(3)
    ok = sink.ok_ids()
    twice = [m for m in pub.accepted if ok.get(m, 0) > 1]
    h.check(not twice, '%s: all %d accepted messages delivered to the sink, none twice'
            % (what, len(pub.accepted)), twice[:5])
    figs.append('%s %.0fs: noticed after %s (metric %.1fs); ready %.1fs after restore, all '
                'delivered %.1fs after restore; %d published (%d during the cut), worst publish '
                '%.0f ms, 0 lost, 0 delivered twice'
                % (what, CUT, ', '.join('%s %.1fs' % kv for kv in sorted(det.items())),
                   t_seen - t_cut, t_ready, t_all, len(pub.accepted), len(during), worst * 1e3))
    return pub.accepted


def broker_pids(broker):
    return [broker.proc.pid] + h._descendants(broker.proc.pid)


def main(wd):
    ns = None
    reason = None
    if os.geteuid() != 0:
        reason = 'not root'
    else:
        ns = Netns()
        reason = ns.create()
    figs = []
    try:
        if reason:
            h.log('network namespaces not available (%s): only the SIGSTOP variant runs' % reason)
            figs.append('network namespaces not available here (%s)' % reason)
            broker = h.Broker(wd)
        else:
            broker = h.Broker(wd, host=ns.ns_ip, wrap=['ip', 'netns', 'exec', ns.name],
                              conf_extra='loopback_users = none')
        broker.start()
        sink = h.Service()
        d = h.Sagad(wd, broker.url, name='orders', heartbeat=HB,
                    conf_extra='subscriptions = ( { name = "inbox"; bind = [ "events:cut.#" ];'
                               ' deliver = %s; concurrency = 8; } );' % h.conf_str(sink.url))
        d.start()
        accepted = []
        if not reason:
            accepted += silence('link down', d, sink, lambda: ns.link(False),
                                lambda: ns.link(True), figs)
        pids = []

        def stop():
            pids[:] = broker_pids(broker)
            for p in pids:
                os.kill(p, signal.SIGSTOP)

        def cont():
            for p in pids:
                os.kill(p, signal.SIGCONT)
        accepted += silence('SIGSTOP broker', d, sink, stop, cont, figs)
        ok = sink.ok_ids()
        h.log('sink: %d deliveries for %d ids; inbox duplicates dropped: %s'
              % (sum(ok.values()), len(ok), d.metric('sagad_duplicates_total{subscription="inbox"}')))
        h.check(d.stop() == 0, 'SIGTERM: exit 0')
        broker.kill()
    finally:
        h.cleanup_all()
        if ns:
            ns.destroy()
    h.log('figures:\n  ' + '\n  '.join(figs))


h.run_test(main)
