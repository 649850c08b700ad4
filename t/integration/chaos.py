#!/usr/bin/env python3
"""Fault injection: SIGKILL of the publishing sagad at random moments and
broker restarts, during a paced run.

    service clients --HTTP--> sagad "orders" --AMQP--> RabbitMQ
        RabbitMQ --> queue billing.inbox --> sagad "billing" --HTTP--> sink
        RabbitMQ --> queue chaos.tap (a wire tap, read at the end)

Clients publish CHAOS_N messages (default 5,000) with their own message ids,
paced over CHAOS_DURATION seconds (default 100), from CHAOS_CLIENTS threads
(default 4); a request cut by a kill is sent again with the same id until it
gets an answer (202 stored, or 200 duplicate: stored by the cut attempt).
Meanwhile "orders" gets SIGKILL CHAOS_KILLS times (default 5) at random
moments (each waits for its broker link to be up, so that it hits a sagad
with publishes in flight) and is restarted on its store, and the broker is restarted
CHAOS_RESTARTS times (default 5; alternately a clean stop and a SIGKILL of
the node; one per slot of the first 80% of the run, with at least 6 s of
up-time in between: on a slow machine they run past the publishing). "billing" is never killed: it is the consuming service's sagad.

Checks: every accepted message (202/200) is on the wire at least once (the
tap), and is delivered to the sink through billing's inbox exactly once.
Printed: lost, duplicated-on-wire, delivered-twice, and the rest of the
figures. CHAOS_SEED makes a run repeatable. The long run:

    CHAOS_N=100000 CHAOS_KILLS=20 top_srcdir=$PWD top_builddir=$PWD \\
        python3 t/integration/chaos.py
"""

import collections
import http.client
import http.server
import itertools
import os
import random
import socketserver
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402

N = int(os.environ.get('CHAOS_N', '5000'))
KILLS = int(os.environ.get('CHAOS_KILLS', '5'))
RESTARTS = int(os.environ.get('CHAOS_RESTARTS', '5'))
CLIENTS = int(os.environ.get('CHAOS_CLIENTS', '4'))
DURATION = float(os.environ.get('CHAOS_DURATION', str(max(100.0, N / 250.0))))
SEED = int(os.environ.get('CHAOS_SEED', str(int(time.time()) % 100000)))
MIN_UP = 6.0        # seconds of broker up-time between two restarts


class Sink:
    """The consuming service: counts 2xx deliveries by Message-Id."""

    def __init__(self):
        self.lock = threading.Lock()
        self.count = collections.Counter()
        self.first = {}
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get('Content-Length') or 0)
                if n:
                    self.rfile.read(n)
                mid = self.headers.get('Message-Id')
                with sink.lock:
                    sink.count[mid] += 1
                    sink.first.setdefault(mid, time.time())
                self.send_response(200)
                self.send_header('Content-Length', '0')
                self.end_headers()

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(('127.0.0.1', 0), Handler)
        self.url = 'http://127.0.0.1:%d/messages' % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def snapshot(self):
        with self.lock:
            return collections.Counter(self.count)


class Clients:
    """CLIENTS threads publishing ids c-0 .. c-(N-1), paced at N/DURATION a
    second overall."""

    def __init__(self, d):
        self.d = d
        self.rate = N / DURATION
        self.next = itertools.count()
        self.lock = threading.Lock()
        self.answers = {}               # id -> 202 / 200
        self.errors = []                # unexpected answers
        self.cut = collections.Counter()   # connection failures by kind
        self.worst = 0.0
        self.done = threading.Event()
        self.t0 = time.time()
        self.ths = [threading.Thread(target=self.run, daemon=True) for _ in range(CLIENTS)]
        for t in self.ths:
            t.start()

    def run(self):
        conn = None
        while True:
            with self.lock:
                i = next(self.next)
            if i >= N:
                break
            delay = self.t0 + i / self.rate - time.time()
            if delay > 0:
                time.sleep(delay)
            mid = 'c-%d' % i
            while True:
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection('127.0.0.1', self.d.port, timeout=30)
                    t = time.time()
                    conn.request('POST', '/v1/publish/events/chaos.%d' % (i % 16),
                                 body=b'chaos %d' % i, headers={'Message-Id': mid})
                    r = conn.getresponse()
                    r.read()
                    dt = time.time() - t
                    if r.will_close:
                        conn.close()
                        conn = None
                except (OSError, http.client.HTTPException) as e:
                    if conn is not None:
                        conn.close()
                        conn = None
                    with self.lock:
                        self.cut[type(e).__name__] += 1
                    time.sleep(0.05)
                    continue
                if r.status in (200, 202):
                    with self.lock:
                        self.answers[mid] = r.status
                        self.worst = max(self.worst, dt)
                    break
                with self.lock:
                    self.errors.append((mid, r.status))
                time.sleep(0.1)
        if conn is not None:
            conn.close()

    def join(self, timeout):
        deadline = time.time() + timeout
        for t in self.ths:
            t.join(max(0.1, deadline - time.time()))
        return not any(t.is_alive() for t in self.ths)


def chaos_thread(name, times, action, log):
    def run():
        t0 = time.time()
        for k, at in enumerate(times):
            delay = t0 + at - time.time()
            if delay > 0:
                time.sleep(delay)
            t = time.time()
            try:
                what = action(k)
            except Exception as e:  # noqa: BLE001
                log.append((time.time() - t0, name, 'FAILED: %r' % e))
                raise
            log.append((t - t0, name, '%s (%.1fs)' % (what, time.time() - t)))
            h.log('chaos: %s %d/%d: %s (%.1fs)' % (name, k + 1, len(times), what,
                                                  time.time() - t))
    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def main(wd):
    rnd = random.Random(SEED)
    h.log('chaos: N=%d kills=%d restarts=%d clients=%d duration=%.0fs seed=%d'
          % (N, KILLS, RESTARTS, CLIENTS, DURATION, SEED))
    broker = h.Broker(wd)
    broker.start()
    tool = h.AmqpTool()
    tool.declare_queue(broker.url, 'chaos.tap', [('events', 'chaos.#')])
    sink = Sink()
    billing = h.Sagad(wd, broker.url, name='billing',
                      conf_extra='subscriptions = ( { name = "inbox"; bind = [ "events:chaos.#" ];'
                                 ' deliver = %s; concurrency = 16; } );' % h.conf_str(sink.url))
    billing.start()
    orders = h.Sagad(wd, broker.url, name='orders')
    orders.start()

    # Kills at random moments; broker restarts one per slot of the first 80%
    # of the run (a restart takes ~10 s here), so that the broker is up a
    # good part of the time.
    kill_times = sorted(rnd.uniform(0.03, 0.9) * DURATION for _ in range(KILLS))
    slot = 0.8 * DURATION / max(1, RESTARTS)
    restart_times = [k * slot + rnd.uniform(0.05, 0.35) * slot for k in range(RESTARTS)]
    events = []
    kills_at = []
    kills_up = []

    def kill(k):
        # Most kills should hit a sagad that is publishing: wait (a while)
        # for its broker link, then a random moment more.
        pending = link = None
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                link = orders.metric('sagad_broker_connected')
            except (OSError, http.client.HTTPException, AssertionError):
                link = None
            if link == 1:
                break
            time.sleep(0.2)
        time.sleep(rnd.uniform(0, 0.5))
        try:
            m = orders.metrics()
            pending = '%d pending, %d in flight' % (m.get('sagad_outbox_pending', -1),
                                                     m.get('sagad_outbox_inflight', -1))
        except (OSError, http.client.HTTPException, AssertionError):
            pass
        orders.kill()
        if link == 1:
            kills_up.append(k)
        kills_at.append(time.time())
        time.sleep(rnd.uniform(0, 1.0))
        orders.start(wait_ready=False, timeout=30)
        return 'SIGKILL orders (link %s, %s), restarted' % ('up' if link == 1 else 'down',
                                                           pending)

    last_up = [time.time()]

    def restart(k):
        # at least MIN_UP seconds of broker up-time between two restarts
        delay = last_up[0] + MIN_UP - time.time()
        if delay > 0:
            time.sleep(delay)
        if k % 2 == 0:
            broker.stop()
            how = 'stopped'
        else:
            broker.kill()
            how = 'SIGKILLed'
        time.sleep(rnd.uniform(0, 2.0))
        broker.start()
        last_up[0] = time.time()
        return 'broker %s and started again' % how

    t0 = time.time()
    clients = Clients(orders)
    th_k = chaos_thread('kill', kill_times, kill, events)
    th_r = chaos_thread('broker', restart_times, restart, events)
    h.check(clients.join(DURATION * 3 + 300), 'the clients finished')
    t_pub = time.time() - t0
    th_k.join(300)
    th_r.join(300)
    h.check(not th_k.is_alive() and not th_r.is_alive(), 'the chaos threads finished')
    t_chaos = time.time() - t0
    h.log('published in %.1fs (%.0f/s); chaos over after %.1fs; connection failures seen by '
          'clients: %s' % (t_pub, N / t_pub, t_chaos, dict(clients.cut)))
    h.check(not clients.errors, 'no answer other than 202/200', clients.errors[:5])
    accepted = set(clients.answers)
    n200 = sum(1 for v in clients.answers.values() if v == 200)
    h.check(len(accepted) == N, 'all %d messages accepted (%d answered 200 duplicate after a '
            'cut request)' % (N, n200), len(accepted))
    if not orders.running():
        orders.start(wait_ready=False)
    h.wait_until(lambda: orders.admin_get('/readyz')[0] == 200, 120, 'orders ready')
    h.wait_until(lambda: orders.metric('sagad_outbox_pending') == 0, 120 + N / 40,
                 'the outbox of orders drained', interval=1)

    def delivered():
        got = sink.snapshot()
        return sum(1 for m in accepted if got[m]) == len(accepted)
    try:
        h.wait_until(delivered, 120 + N / 40, 'every accepted message at the sink', interval=1)
    except AssertionError:
        pass
    time.sleep(5)
    got = sink.snapshot()
    lost = sorted(m for m in accepted if not got[m])
    twice = sorted(m for m in accepted if got[m] > 1)
    strays = sorted(m for m in got if m not in accepted)
    t_done = time.time() - t0
    wire = collections.Counter()
    while True:
        batch = tool.consume(broker.url, 'chaos.tap', 20000, timeout=3)
        for m in batch:
            wire[m['message_id']] += 1
        if len(batch) < 20000:
            break
    not_on_wire = sorted(m for m in accepted if not wire[m])
    dup_wire = sum(wire.values()) - len(wire)
    inbox_dups = billing.metric('sagad_duplicates_total{subscription="inbox"}')
    ok_out = billing.metric('sagad_delivered_total{subscription="inbox",outcome="success"}')
    figs = [
        'N=%d, %d SIGKILLs of the publishing sagad (%d with its broker link up), %d broker '
        'restarts (%d clean, %d SIGKILL), seed %d'
        % (N, len(kills_at), len(kills_up), RESTARTS, (RESTARTS + 1) // 2, RESTARTS // 2, SEED),
        'published in %.1fs (%.0f msg/s), everything delivered after %.1fs; worst publish '
        'answer %.0f ms; requests cut by a kill and sent again: %d'
        % (t_pub, N / t_pub, t_done, clients.worst * 1e3, sum(clients.cut.values())),
        'accepted %d (202: %d, 200 duplicate: %d)' % (len(accepted), len(accepted) - n200, n200),
        'lost: %d; not on the wire: %d' % (len(lost), len(not_on_wire)),
        'duplicated on the wire: %d copies beyond the first (%d ids on the wire); dropped by '
        'the consuming inbox: %s' % (dup_wire, len(wire), inbox_dups),
        'delivered twice: %d; deliveries to the sink: %d (billing ok outcomes %s); strays %d'
        % (len(twice), sum(got.values()), ok_out, len(strays)),
    ]
    for e in sorted(events):
        h.log('  at %6.1fs %s: %s' % e)
    h.log('figures:\n  ' + '\n  '.join(figs))
    h.check(not not_on_wire, 'every accepted message on the wire at least once',
            not_on_wire[:10])
    h.check(not lost, 'every accepted message delivered to the consuming service', lost[:10])
    h.check(not twice, 'no message delivered twice to the consuming service', twice[:10])
    h.check(not strays, 'no delivery of an id that was never accepted', strays[:10])
    h.check(billing.stop() == 0 and orders.stop() == 0, 'both sagads stop with 0')


h.run_test(main)
