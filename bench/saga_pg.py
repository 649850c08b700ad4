"""Mode b of bench/saga.py: three orders replicas on the PostgreSQL saga
store (issue 15). Imported by saga.py, which it calls back for the phases
both modes share (saturation, latency); not a script of its own.

Three sagad processes with service "orders", each with its own directory,
local store (the publish API's outbox, its subscriptions' inboxes) and
ports, and the same `saga_store = { backend = "pgsql"; conninfo = ...; }`:
they share the sagas, competing consumers on `orders.sagas`. PostgreSQL is
a private cluster (t/lib/pg.py) with fsync on and the other settings of a
plain installation (printed as pg_* figures); the sagads reach it over its
unix socket. The stock and payment sagads, the sinks and RabbitMQ are as in
mode a.

Starts are POSTed spread over the three replicas' publish APIs (loadgen's
connections round-robin over the three URLs), as a load balancer in front
of them would: each replica then relays a third of the start events from
its own outbox, as in a deployment.

  1. saturation: BENCH_SAGA_N_B sagas (10,000; quick 600), BENCH_REPEAT
     times, as mode a; CPU per saga of each replica, PostgreSQL (the
     postmaster and every child: backends, walwriter, checkpointer, ...),
     RabbitMQ, the participants and the sinks.
  2. latency at BENCH_SAGA_RATE sagas/s, as mode a (durations from the
     instances table, hops from the history table and the inboxes).
  3. failover: BENCH_FAIL_SECONDS (10) at BENCH_SAGA_RATE sagas/s, POSTed
     to replicas 1 and 2 only; halfway, replica 3 is killed (SIGKILL).
     Figures: the longest time without a completion after the kill (and
     before it, for comparison), the time from the kill to the completion
     of the last saga that was in flight at the kill, the longest duration
     (POST -> finished) of the sagas started in the second before the
     kill, and every saga's final state. Replica 3 gets no POSTs because
     starts it accepted and had not relayed yet would sit in its local
     outbox until it restarts: that is the outbox's at-least-once
     guarantee of one sagad, not the sagas' failover.

Environment: BENCH_SAGA_N_B, BENCH_REPLICAS (3), BENCH_FAIL_SECONDS (10),
BENCH_RELAY_GRACE (saga_store.relay_grace; default: sagad's, 2 s),
BENCH_PG_SETTINGS (extra postgresql.conf lines, "k=v;k=v").
"""

import os
import signal
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as common  # noqa: E402
from run import h  # noqa: E402

sys.path.insert(0, os.path.join(h.top_srcdir, 't', 'lib'))
import pg  # noqa: E402

REPLICAS = common.env_int('BENCH_REPLICAS', 3)
FAIL_SECONDS = common.env_int('BENCH_FAIL_SECONDS', 10)
RELAY_GRACE = os.environ.get('BENCH_RELAY_GRACE')
STATES = {0: 'running', 1: 'completed', 2: 'compensating', 3: 'compensated', 4: 'failed'}
SHOWN = ('server_version', 'fsync', 'synchronous_commit', 'wal_sync_method', 'full_page_writes',
         'shared_buffers', 'wal_buffers', 'max_wal_size', 'checkpoint_timeout', 'commit_delay',
         'max_connections')
# what a plain installation has (t/lib/pg.py sets shared_buffers = 32MB)
SETTINGS = {'shared_buffers': '128MB'}
# pg_stat_statements (contrib, in Debian's postgresql-15): where PostgreSQL's
# time goes, per statement; BENCH_PG_STATEMENTS=0 leaves it out
STATEMENTS = os.environ.get('BENCH_PG_STATEMENTS', '1') != '0'


def S_say(msg):
    common.say(msg)


def sql_list(xs):
    return ', '.join(pg.quote_literal(x) for x in xs)


class Store:
    """The private PostgreSQL of mode b and the queries the benchmark asks
    of the saga store (each on a fresh connection: called from threads)."""

    def __init__(self, workdir):
        settings = dict(SETTINGS)
        if STATEMENTS:
            settings['shared_preload_libraries'] = "'pg_stat_statements'"
            settings['pg_stat_statements.track_planning'] = 'on'
        for kv in (os.environ.get('BENCH_PG_SETTINGS') or '').split(';'):
            if '=' in kv:
                k, v = kv.split('=', 1)
                settings[k.strip()] = v.strip()
        self.db = pg.Postgres(os.path.join(workdir, 'pg'), settings=settings, fsync=True)
        self.db.start()
        if STATEMENTS:
            self.rows('CREATE EXTENSION pg_stat_statements')

    def conf(self):
        extra = ('  relay_grace = %s;\n' % RELAY_GRACE) if RELAY_GRACE else ''
        return '\nsaga_store = {\n  backend = "pgsql";\n  conninfo = %s;\n%s};\n' % (
            h.conf_str(self.db.conninfo), extra)

    def rows(self, sql):
        with self.db.connect() as c:
            return c.query(sql)

    def settings(self):
        return {k: self.rows('SHOW %s' % k)[0][0] for k in SHOWN}

    def running(self):
        return int(self.rows("SELECT count(*) FROM sagad.instances WHERE service = 'orders' "
                             "AND state IN (0, 2)")[0][0])

    def outbox(self):
        return int(self.rows("SELECT count(*) FROM sagad.outbox WHERE service = 'orders'")[0][0])

    def times(self, prefix):
        """[(id, state name, started_at, finished_at)] of the ids starting
        with prefix."""
        return [(i, STATES.get(int(st), st), float(a), float(b) if b else None)
                for i, st, a, b in self.rows(
                    "SELECT id, state, started_at, finished_at FROM sagad.instances WHERE "
                    "service = 'orders' AND id LIKE %s" % pg.quote_literal(prefix + '%'))]

    def logs(self, ids):
        out = {}
        for k in range(0, len(ids), 500):
            for sid, at, d, what, mid in self.rows(
                    "SELECT id, at, dir, what, message_id FROM sagad.history WHERE "
                    "service = 'orders' AND id IN (%s) ORDER BY id, seq" % sql_list(ids[k:k + 500])):
                out.setdefault(sid, []).append((float(at), d, what, mid))
        return out

    def statements_reset(self):
        if STATEMENTS:
            self.rows('SELECT pg_stat_statements_reset()')

    def statements(self, fig, pre, nsagas, top=8):
        """The top statements by execution time since the last reset, as
        figures: ms of execution per saga (calls per saga, mean ms)."""
        if not STATEMENTS:
            return
        rows = self.rows("SELECT calls, total_exec_time, total_plan_time, rows, regexp_replace("
                         "query, '\\s+', ' ', 'g') FROM pg_stat_statements WHERE query NOT LIKE "
                         "'%%pg_stat%%' AND query NOT LIKE '%% sagad.%%' "
                         "ORDER BY total_exec_time DESC LIMIT %d" % top)
        for k, (calls, total, plan, nrows, q) in enumerate(rows):
            calls, total, plan = int(calls), float(total), float(plan)
            fig('%spg_stmt_%d_ms' % (pre, k + 1), total / nsagas, '%.2f calls/saga, mean %.3f ms '
                '(+ planning %.3f ms/saga), %s rows: %s' % (calls / nsagas, total / max(1, calls),
                                                            plan / nsagas, nrows, q[:150]))
        plan, total, calls = (float(x) for x in self.rows(
            "SELECT sum(total_plan_time), sum(total_exec_time), sum(calls) FROM pg_stat_statements "
            "WHERE query NOT LIKE '%pg_stat%' AND query NOT LIKE '% sagad.%'")[0])
        fig(pre + 'pg_plan_ms', plan / nsagas, 'planning time per saga, all statements (execution '
            '%.3f ms/saga, %.1f statements/saga)' % (total / nsagas, calls / nsagas))

    def diagnose(self):
        """What PostgreSQL is doing (for a stalled run): its sessions by
        state and wait, the longest running statement, the outbox."""
        try:
            for row in self.rows("SELECT state, coalesce(wait_event, '-'), count(*), "
                                 "max(now() - query_start)::text, left(regexp_replace(max(query), "
                                 "'\\s+', ' ', 'g'), 100) FROM pg_stat_activity WHERE "
                                 "datname = 'postgres' GROUP BY 1, 2 ORDER BY 3 DESC"):
                S_say('postgres sessions: %s' % ' | '.join(str(x) for x in row))
            S_say('saga outbox rows: %s; instances by state: %s' % (
                self.outbox(), self.rows("SELECT state, count(*) FROM sagad.instances "
                                         "GROUP BY 1 ORDER BY 1")))
        except Exception as e:  # noqa: BLE001  (a diagnosis only)
            S_say('postgres diagnosis failed: %s' % e)

    def sizes(self):
        return self.rows("SELECT pg_size_pretty(pg_database_size('postgres'))")[0][0]


def phase_failover(S, s, workdir):
    """Replica REPLICAS killed halfway through a paced run (see the module
    docstring). Returns the seconds from the kill to the completion of the
    last saga in flight at the kill."""
    fig = S.fig
    n = S.SAGA_RATE * FAIL_SECONDS
    victim = s.replicas[-1]
    base = S.ended(s)
    prog = S.Progress(s, base + n, interval=0.02, timeout=300)
    latfile = os.path.join(workdir, 'failover.txt')
    runid = 'fail-%d' % os.getpid()
    box = {}

    def load():
        try:
            box['r'] = S.push(s, n, runid, latfile, rate=S.SAGA_RATE, urls=s.urls[:-1])
        except Exception as e:  # noqa: BLE001  (reported below)
            box['err'] = e
    t = threading.Thread(target=load, daemon=True)
    prog.start()
    t.start()
    time.sleep(FAIL_SECONDS / 2.0)
    t_kill = time.time()
    victim.stop(sig=signal.SIGKILL)
    h.log('failover: replica %d killed (SIGKILL) at %.3f' % (len(s.replicas), t_kill))
    t.join(FAIL_SECONDS + 300)
    prog.join()
    if 'err' in box:
        raise box['err']
    sent = S.read_sent(latfile)
    # The sink counts deliveries, and the killed replica's unacked ones
    # come again through another replica (local dedup): the count may be
    # reached with a saga still running. Wait for PostgreSQL's word.
    deadline = time.time() + 60
    while True:
        times = {i: (st, a, b) for i, st, a, b in s.pg.times('b-%s-' % runid)}
        if time.time() > deadline or all(times.get(i, ('missing',))[0] in
                                         ('completed', 'compensated', 'failed') for i in sent):
            break
        time.sleep(0.2)
    states = {}
    for i in sent:
        st = times.get(i, ('missing',))[0]
        states[st] = states.get(st, 0) + 1
    fig('b_fail_sagas', len(sent), 'final states ' + ' '.join(
        '%s:%d' % kv for kv in sorted(states.items())))
    # longest time without a completion, before and after the kill
    samples = [(ns / 1e9, v) for ns, v in prog.samples]
    t_first = min(sent.values())

    def longest_gap(lo, hi):
        best, last = 0.0, None
        for ts, v in samples:
            if ts < lo or ts > hi:
                continue
            if last is None or v > last[1]:
                if last is not None:
                    best = max(best, ts - last[0])
                last = (ts, v)
        return best
    t_end = samples[-1][0]
    fig('b_fail_gap_before_s', longest_gap(t_first + 0.5, t_kill),
        'longest time without a completion before the kill (sink polled every 20 ms)')
    fig('b_fail_gap_after_s', longest_gap(t_kill, t_end), 'same, from the kill on')
    inflight = [i for i, ts in sent.items() if ts <= t_kill and
                not (times.get(i) and times[i][2] and times[i][2] <= t_kill)]
    fins = [times[i][2] for i in inflight if times.get(i) and times[i][2]]
    unfinished = len(inflight) - len(fins)
    moving = (max(fins) - t_kill) if fins else float('nan')
    fig('b_fail_inflight', len(inflight), 'sagas POSTed before the kill and not finished at it '
        '(%d never finished)' % unfinished)
    fig('b_fail_recovered_s', moving, 'kill -> the last of those finished (target <= 5)')
    last_sec = sorted((times[i][2] - ts) * 1000 for i, ts in sent.items()
                      if t_kill - 1 <= ts <= t_kill and times.get(i) and times[i][2])
    fig('b_fail_max_ms', last_sec[-1] if last_sec else float('nan'),
        'longest POST -> finished of the %d sagas POSTed in the second before the kill (p50 %.1f)'
        % (len(last_sec), common.pct(last_sec, 0.5)))
    fig('b_fail_target_met', 'yes' if moving <= 5 and not unfinished else 'no',
        'every saga in flight at the kill finished within 5 s of it')
    return moving


def mode_b(workdir, S):
    """S: the saga.py module (its phases and figures)."""
    fig = S.fig
    n = common.env_int('BENCH_SAGA_N_B', 600 if S.QUICK else 10000)
    store = Store(workdir)
    for k, v in store.settings().items():
        fig('pg_' + k, v, 'PostgreSQL setting (SHOW)')
    s = S.Setup(workdir, pg=store, replicas=REPLICAS)
    try:
        S.say('B: %d orders replicas on PostgreSQL; saturation: %d x %d sagas'
              % (REPLICAS, S.REPEAT, n))
        store.statements_reset()
        runs = [S.phase_saturation(s, workdir, i, pre='b_', n=n) for i in range(1, S.REPEAT + 1)]
        rate = S.report_saturation('b_', runs, '%d replicas on PostgreSQL, POSTs spread over '
                                   'them' % REPLICAS)
        store.statements(fig, 'b_sat_', n * S.REPEAT)
        fig('b_pg_size', store.sizes(), 'database size after the saturation runs')
        S.say('B: latency at %d sagas/s for %d s' % (S.SAGA_RATE, S.LAT_SECONDS))
        store.statements_reset()
        S.report_latency('b_', S.phase_latency(s, workdir, pre='b_'))
        store.statements(fig, 'b_lat_', S.SAGA_RATE * S.LAT_SECONDS)
        if REPLICAS > 1 and FAIL_SECONDS > 0:
            S.say('B: failover: replica %d killed during %d s at %d sagas/s'
                  % (REPLICAS, FAIL_SECONDS, S.SAGA_RATE))
            phase_failover(S, s, workdir)
        return rate
    finally:
        s.stop()
        store.db.stop()
