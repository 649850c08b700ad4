#!/usr/bin/env python3
"""Replicas of the orchestrating service on one PostgreSQL saga store
(issue 15, REPLICAS.md): three sagad processes with the same service
("orders"), the same sagas and the same saga_store conninfo, each with its
own local store and ports, competing for orders.sagas; the participants
of t/integration/saga_crash.py (its plans, services and checks).

Phase 1: N sagas (env SAGA_REPL_N, default 1,000; a planned share fail and
compensate). Replica A runs alone first and arms the step timers of a few
"held" sagas whose command is not answered (the participant holds it);
then B and C start, A is SIGKILLed before the timers are due and never
restarted, later B is SIGKILLed and restarted. Checked: every saga in its
planned end state; every command, compensation and start event applied
exactly once at its participant, one final event per saga; no orphan
(sagad_saga_orphans_total summed over replicas, scraped up to each kill);
the held sagas' step timeouts fired on a survivor after A's death, each
command delivered once and its late success compensated once; the
failover: for each saga, the gap between consecutive entries of its
history (its start event's publish time first) that spans a kill, at most
FAILOVER_MAX s (printed).

Phase 2: N/4 more sagas with PostgreSQL stopped for a few seconds in the
middle (t/lib/pg.py): while it is down the saga queue keeps its messages
(ready or unacked, from rabbitmqctl) and no command of a saga started
meanwhile reaches its participant; afterwards every saga completes,
exactly once at the participants.

Printed: each replica's share of the sagas started (the `consumed` table's
replica of each start event, and sagad_sagas_started_total), the run time.
Skipped (77) when PostgreSQL is not installed."""

import collections
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import pg  # noqa: E402
from sagas import Answer, saga_get, hist_entries  # noqa: E402
from sagas import SAGA_STATES, publish_spread, saga_counts, wait_sagas_finished  # noqa: E402
from saga_crash import (FULFIL_SAGA, ORDER_SAGA, START_KEYS, Cast,  # noqa: E402
                        check_final_states, plan)

N = int(os.environ.get('SAGA_REPL_N', '1000'))
HELD = 4                 # sagas whose step timer must fire on a survivor
HELD_TMO = 10.0          # their step timeout, s
PG_DOWN = 5.0            # s PostgreSQL is down in phase 2
FAILOVER_MAX = 10.0      # s: the documented bound (~5 s) plus RabbitMQ's detection

HELD_SAGA = '''  {
    name = "held";
    start = "events:held.created";
    timeout = 300;
    steps = (
      { name = "reserve"; command = "commands:stock.reserve"; compensate = "commands:stock.release";
        timeout = %g; attempts = 1; }
    );
    completed = "events:done.held";
    compensated = "events:undone.held";
  }
''' % HELD_TMO

# the crash test's sagas ("order" orchestrated, "fulfil" choreographed) and "held"
SAGAS = 'sagas = (%s,%s,\n%s);\n' % (ORDER_SAGA, FULFIL_SAGA, HELD_SAGA)

NAMES = ('order', 'fulfil', 'held')


class Replicas:
    """The three replicas, and the last metrics scraped from each
    incarnation (a SIGKILLed sagad's counters die with it: they are
    scraped right before each kill and twice a second meanwhile)."""

    def __init__(self, wd, broker, conf, a):
        self.r = {'A': a}       # A: the cast's orchestrator (saga_crash.Cast)
        for name in ('B', 'C'):
            d = os.path.join(wd, 'replica-' + name)
            os.makedirs(d)
            # same service, sagas and saga store; its own local store and ports
            self.r[name] = h.Sagad(d, broker.url, name='orders', broker_extra='reconnect_max = 2;',
                                   conf_extra=conf)
        self.scraped = {}        # (name, pid) -> metrics
        self.pids = {}           # pid -> name
        self.ids = {}            # the store's replica id -> name
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = None

    def start(self, name):
        d = self.r[name]
        d.start(timeout=60)
        self.pids[d.proc.pid] = name
        self.ids[d.admin_json('/v1/admin/status')[1]['store']['replica_id']] = name
        return d

    def scrape(self, name):
        d = self.r[name]
        if not d.running():
            return None
        try:
            m = d.metrics()
        except (OSError, AssertionError, ValueError):
            return None
        with self.lock:
            self.scraped[(name, d.proc.pid)] = m
        return m

    def kill(self, name):
        self.scrape(name)
        pid = self.r[name].proc.pid
        self.r[name].kill()
        t = time.time()
        h.log('SIGKILL replica %s (pid %d)' % (name, pid))
        return t

    def monitor(self):
        def run():
            while not self.stopping:
                for name, d in self.r.items():
                    if d.running():
                        self.scrape(name)
                time.sleep(0.5)
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def live(self):
        return [d for d in self.r.values() if d.running()]

    def total(self, prefix):
        """prefix summed over every incarnation's last scrape."""
        with self.lock:
            return sum(v for m in self.scraped.values() for k, v in m.items()
                       if k == prefix or k.startswith(prefix + '{'))

    def started(self):
        return self.total('sagad_sagas_started_total')


def main(wd):
    t_run = time.time()
    h.log('N=%d' % N)
    db = pg.Postgres(os.path.join(wd, 'pg'))
    db.start()

    M = max(4, N // 4)
    plans1 = [plan(i) for i in range(N)]
    plans2 = [plan(i) for i in range(N, N + M)]
    plans = plans1 + plans2
    by_cid = {p[0]: p for p in plans}
    held = ['h-%d' % i for i in range(HELD)]

    conf = SAGAS + '\nsaga_store = { backend = "pgsql"; conninfo = %s; };\n' % h.conf_str(
        db.conninfo)
    cast = Cast(wd, by_cid, conf)
    broker, stock = cast.broker, cast.stock
    d_web, d_stock, d_payment = cast.d_web, cast.d_stock, cast.d_payment
    gates = {cid: threading.Event() for cid in held}
    for cid in held:
        # the command is held unanswered (at most 25 s) until its timer fired
        stock.rules[('stock.reserve', cid)] = Answer(200, gate=gates[cid])
    reps = Replicas(wd, broker, conf, cast.orders)

    sent = {}                # saga id -> time its start event was published

    def publisher(items, seconds, errors):
        def make(p):
            sent[p[0]] = time.time()
            return ('events', START_KEYS[p[1]], {'cid': p[0]},
                    {'Correlation-Id': p[0], 'Message-Id': 'start-' + p[0]})
        return publish_spread(d_web.port, items, make, seconds, errors)
    A, B, C = reps.r['A'], reps.r['B'], reps.r['C']

    # ---- A alone arms the held sagas' step timers
    reps.start('A')
    reps.monitor()
    for cid in held:
        A.publish('events', 'held.created', b'{"cid": "%s"}' % cid.encode(),
                  {'Correlation-Id': cid, 'Message-Id': 'start-' + cid})
    h.wait_until(lambda: all(stock.has_started('stock.reserve', cid) for cid in held), 30,
                 'the held sagas\' commands at the stock service')
    t_held = time.time()
    h.log('held sagas armed by A alone (step timeout %.0f s)' % HELD_TMO)

    # ---- phase 1: N sagas; B and C join, A killed for good, B killed and restarted
    errors = []
    t1 = time.time()
    threads = publisher(plans1, max(4.0, N / 50.0), errors)
    reps.start('B')
    reps.start('C')
    h.wait_until(lambda: reps.started() >= HELD + N // 10 and
                 all(reps.scrape(n) and reps.scrape(n).get(
                     'sagad_sagas_started_total{saga="order"}', 0) > 0 for n in ('A', 'B', 'C')),
                 60, 'every replica starting sagas', interval=0.2)
    kills = [reps.kill('A')]
    h.check(kills[0] < t_held + HELD_TMO - 1,
            'A killed %.1f s after it armed the held timers, before they are due (%.0f s)'
            % (kills[0] - t_held, HELD_TMO))

    h.wait_until(lambda: reps.started() >= HELD + N // 2, 90, 'half the sagas started',
                 interval=0.2)
    kills.append(reps.kill('B'))
    time.sleep(1.0)       # down for a while (not an assertion)
    reps.start('B')

    # the held sagas: their timers fire on B or C (A is dead)
    for cid in held:
        h.wait_until(lambda: hist_entries(saga_get(C, cid) or {}, 'step timeout', 'reserve'),
                     HELD_TMO + 30, '%s: step timeout' % cid, interval=0.2)
        gates[cid].set()      # its late success now
    fired = []
    for cid in held:
        i = saga_get(C, cid)
        sent_at = [e for e in i['history'] if e['what'] == 'command'][0]['at']
        fired_at = hist_entries(i, 'step timeout', 'reserve')[0]['at']
        fired.append(fired_at - sent_at)
        h.check(fired_at > kills[0] and HELD_TMO - 0.05 <= fired_at - sent_at,
                '%s: armed by A, its step timeout fired on a survivor after A\'s death, '
                '%.2f s after the command (due %.0f s)' % (cid, fired_at - sent_at, HELD_TMO),
                (sent_at, fired_at, kills[0]))
    h.log('held sagas: step timeouts fired %.2f..%.2f s after their commands (due %.0f s)'
          % (min(fired), max(fired), HELD_TMO))

    for t in threads:
        t.join()
    h.check(not errors, 'all %d start events of phase 1 accepted by the web sagad' % N,
            errors[:5])

    def counts():
        return saga_counts(C, NAMES)

    wait_sagas_finished(C, NAMES, N + HELD, 120, 'every saga of phase 1 finished')
    h.log('phase 1: %d sagas finished %.1f s after the first start event' % (N, time.time() - t1))

    # ---- phase 2: PostgreSQL stopped for PG_DOWN s in the middle of M sagas
    t2 = time.time()
    threads = publisher(plans2, max(4.0, M / 40.0), errors)
    ids2 = set(p[0] for p in plans2)
    h.wait_until(lambda: len([c for c in list(sent) if c in ids2]) >= M // 4, 60,
                 'a quarter of phase 2 published', interval=0.1)
    db.stop('fast')
    t_down = time.time()
    held_msgs, down = [], [True]

    def sample():
        # rabbitmqctl takes seconds: sample in the background while it is down
        while down[0]:
            out = broker.ctl('list_queues', 'name', 'messages_ready', 'messages_unacknowledged')
            if not down[0]:
                break
            for line in out.splitlines():
                f = line.split()
                if len(f) == 3 and f[0] == 'orders.sagas' and f[1].isdigit():
                    held_msgs.append((round(time.time() - t_down, 1), int(f[1]), int(f[2])))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    h.wait_until(lambda: held_msgs and time.time() >= t_down + PG_DOWN, PG_DOWN + 30,
                 'a look at the saga queue while PostgreSQL is down', interval=0.1)
    down[0] = False
    db.start()
    t_up = time.time()
    sampler.join(60)
    h.log('PostgreSQL was down %.1f s; orders.sagas (s since down, ready, unacked): %s'
          % (t_up - t_down, held_msgs))
    h.check(held_msgs and held_msgs[-1][1] + held_msgs[-1][2] > 0,
            'while PostgreSQL is down the saga queue keeps its messages (ready or unacked: '
            'nothing acked that is not committed)', held_msgs)
    during = [p[0] for p in plans2 if p[1] == 'order' and t_down < sent.get(p[0], 0) < t_up]
    early_cmds = [(c['cid'], round(c['t0'] - t_up, 2)) for c in stock.deliveries('stock.reserve')
                  if c['cid'] in set(during) and c['t0'] < t_up]
    h.check(during and not early_cmds, 'nothing of the %d orchestrated sagas started while '
            'PostgreSQL was down reached a participant before it came back' % len(during),
            early_cmds[:10])
    for t in threads:
        t.join()
    h.check(not errors, 'all %d start events of phase 2 accepted by the web sagad' % M,
            errors[:5])
    wait_sagas_finished(C, NAMES, N + M + HELD, 120, 'every saga of phase 2 finished')
    h.log('phase 2: %d sagas finished %.1f s after the first start event, %.1f s after '
          'PostgreSQL came back' % (M, time.time() - t2, time.time() - t_up))

    h.wait_drained(reps.live() + [d_web, d_stock, d_payment], 60)

    # ---- end states
    want = collections.Counter((p[1], p[2]) for p in plans)
    want[('held', 'compensated')] = HELD

    def as_planned():
        try:
            return counts() == {(s, st): want.get((s, st), 0)
                                for s in NAMES for st in SAGA_STATES}
        except (OSError, AssertionError):
            return False
    # the gauges are the last count plus this replica's changes: wait for a refresh
    try:
        h.wait_until(as_planned, 20, 'the saga gauges as planned', interval=1)
    except AssertionError:
        pass
    c = counts()
    h.check(as_planned(), 'sagad_sagas by saga and state as planned: %s' %
            {'%s/%s' % k: v for k, v in sorted(want.items())},
            {'%s/%s' % k: v for k, v in c.items() if v})
    check_final_states(C, plans)

    # ---- exactly once at the participants, one final event per saga
    cast.check(plans, extra_ok=[('stock', k, cid) for cid in held
                                for k in ('stock.reserve', 'stock.release')],
               extra_sagas=[(cid, 'held', 'compensated', 'reserve') for cid in held])
    h.check(all(len(stock.deliveries('stock.reserve', cid)) == 1 for cid in held),
            'held sagas: each command delivered once (no resend), its late success '
            'compensated once')

    # ---- no orphan
    for d in reps.live():
        reps.scrape([n for n, x in reps.r.items() if x is d][0])
    orphans = {'%s/%d' % k: int(m.get('sagad_saga_orphans_total', 0))
               for k, m in sorted(reps.scraped.items())}
    h.check(sum(orphans.values()) == 0, 'no orphan counted by any replica (%s)' % orphans,
            orphans)
    h.log('choreographed events kept until their start (sagad_saga_early_total, summed over '
          'incarnations): %d' % reps.total('sagad_saga_early_total'))

    # ---- failover: the gaps in the sagas' histories that span a kill
    hists = {cid: saga_get(C, cid, saga) for cid, saga, _, _ in plans}
    worst = []
    for cid, saga, state, _ in plans1:
        inst = hists[cid]
        ents = [(sent[cid], 'published')] + [
            (e['at'], '%s %s%s' % (e['dir'], e['what'], ' ' + e['step'] if e['step'] else ''))
            for e in inst.get('history', [])]
        for (a, wa), (b, wb) in zip(ents, ents[1:]):
            for k in kills:
                if a < k <= b:
                    worst.append((b - a, cid, k, '%s -> %s' % (wa, wb)))
    worst.sort(reverse=True)
    gap = worst[0][0] if worst else 0.0
    h.log('failover: %d saga history gaps span a kill; the longest %.2f s (%s); top 5: %s'
          % (len(worst), gap, worst[0][1] if worst else '-',
             ['%.2f %s (%s)' % (g, c, w) for g, c, _, w in worst[:5]]))
    h.check(gap <= FAILOVER_MAX, 'no saga waited longer than %.0f s across a replica\'s death '
            '(longest %.2f s)' % (FAILOVER_MAX, gap), worst[:5])
    pg_gaps = []
    for cid, saga, state, _ in plans2:
        at = [sent[cid]] + [e['at'] for e in hists[cid].get('history', [])]
        pg_gaps += [b - a for a, b in zip(at, at[1:]) if a < t_up and b > t_down]
    h.log('PostgreSQL restart: %d saga history gaps span the outage (%.1f s); the longest %.2f s'
          % (len(pg_gaps), t_up - t_down, max(pg_gaps or [0])))

    # ---- shares: who started the sagas
    c = db.connect()
    # a run's name is its store's id and start; its pid is in replicas
    rows = c.query("SELECT c.replica, r.pid, count(*) FROM sagad.consumed c"
                   " LEFT JOIN sagad.replicas r USING (service, replica)"
                   " WHERE c.service = 'orders' AND c.message_id LIKE 'start-%'"
                   " GROUP BY c.replica, r.pid ORDER BY c.replica")
    c.close()
    share = collections.Counter()
    for replica, pid, n in rows:
        # a run killed before its first heartbeat has no pid: its start
        name = reps.ids.get(replica.split(':')[0], '?')
        run = 'pid %d' % int(pid) if pid not in (None, '') else 'started %s' % replica.split(':')[1]
        share['%s (%s)' % (name, run)] += int(n)
    total = sum(share.values())
    h.log('start events consumed per replica incarnation (PostgreSQL `consumed`): %s'
          % ', '.join('%s %d (%.0f%%)' % (k, v, 100.0 * v / max(1, total))
                      for k, v in sorted(share.items())))
    started = {'%s (pid %d)' % k: int(sum(v for key, v in m.items()
                                          if key.startswith('sagad_sagas_started_total')))
               for k, m in sorted(reps.scraped.items())}
    h.log('sagad_sagas_started_total per incarnation (last scrape): %s, sum %d of %d'
          % (started, sum(started.values()), N + M + HELD))
    h.check(total == N + M + HELD, 'every start event consumed once (%d)' % total, share)
    per = collections.Counter()
    for k, v in share.items():
        per[k[0]] += v
    h.check(all(per[n] > 0 for n in ('A', 'B', 'C')), 'every replica started sagas: %s'
            % dict(per))

    for d in reps.live() + [d_web, d_stock, d_payment]:
        h.check(d.stop() == 0, 'sagad %s (%s) stops cleanly' % (d.name, d.dir))
    broker.stop()
    db.stop()
    h.log('run time %.1f s (failover max gap %.2f s)' % (time.time() - t_run, gap))


if __name__ == '__main__':
    if not pg.available():
        print('skipped: PostgreSQL server not installed (apt-get install postgresql)')
        sys.exit(77)
    h.run_test(main)
