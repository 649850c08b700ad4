#!/usr/bin/env python3
"""sagad two-phase commit benchmark (Python stdlib only; run from the
build directory: `python3 $top_srcdir/bench/tx.py`, after building
src/sagad, bench/loadgen, bench/sink and t/amqptool, or `make bench-tx`).

Issue 16's benchmark: a transaction with two participants against the
same business flow as an orchestrated saga, in one run, on one private
RabbitMQ node, with the same daemons:

  "orders"  the coordinator: transaction "reserve-both" (start
            events:order.placed; PREPARE/COMMIT/ABORT to north and south)
            and saga "reserve-saga" (start events:order.created; steps
            reserve-north, reserve-south, each with a compensation).
            Both end with events:order.reserved (or order.unavailable),
            delivered to the orders sink (/events): one per finished
            transaction or saga, which is what the phases count.
  "north",  participants: each delivers commands:<name>.# to its own
  "south"   bench/sink, which answers 200 at once (a yes vote, a done
            COMMIT, a reservation), so every transaction commits and
            every saga completes.

Per transaction: 1 POST; through the broker the start event, 2 PREPARE,
2 votes, 2 COMMIT, 2 acknowledgements and the outcome event; 4 deliveries
to the participants' services. Per saga: 1 POST; the start event, 2
commands, 2 replies and the outcome event; 2 deliveries.

The phases are bench/saga.py's (imported, not copied), each run once for
the transaction (figures tx_*) and once for the saga (saga_*):

  1. saturation: BENCH_TX_N (2,000) starts as fast as loadgen POSTs them
     (closed loop, 32 connections), BENCH_REPEAT (3) times, the
     transaction's and the saga's runs alternating so that the load of
     this shared machine falls on both alike; finished per second = N /
     (first POST -> the N-th outcome event at the orders sink).
  2. latency at BENCH_SAGA_RATE (100) starts/s for BENCH_LAT_SECONDS (10):
     duration finished_at - started_at of each from /v1/admin/sagas (a
     transaction is listed there as a saga of fixed shape).

ratio_tx_saga = tx_sat_rate / saga_sat_rate. Targets (issue 16): >= 300
transactions/s, p99 <= 50 ms at 100/s. Every figure is printed as
name=value, then a summary with the 1-minute load average of each.
Environment: BENCH_TX_N, and bench/saga.py's BENCH_REPEAT,
BENCH_SAGA_RATE, BENCH_LAT_SECONDS, BENCH_CONCURRENCY, BENCH_CONNS,
BENCH_QUEUE_TYPE, BENCH_KEEP=1, BENCH_WORKDIR.
"""

import os
import sys
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import saga as sb  # noqa: E402  (the saga benchmark: its phases and reports)
from saga import h, say, fig  # noqa: E402
from inbox import Sink, cpu_s, broker_pids  # noqa: E402

TX_N = sb.env_int('BENCH_TX_N', 500 if sb.QUICK else 2000)
TX_RATE_TARGET, P99_TARGET_MS = 300, 50.0
# bench/saga.py's reports read these two as module globals (the cores
# needed at the target rate, and the p99 target): issue 16's targets here.
sb.RATE_TARGET, sb.P99_TARGET_MS = TX_RATE_TARGET, P99_TARGET_MS


def participant(name):
    return ('{ name = "%s"; prepare = "commands:%s.prepare"; commit = "commands:%s.commit";'
            ' abort = "commands:%s.abort"; }' % ((name,) * 4))


def step(name):
    return ('{ name = "reserve-%s"; command = "commands:%s.reserve";'
            ' compensate = "commands:%s.release"; }' % ((name,) * 3))


# The decision retry only matters when a participant refuses a COMMIT,
# which the sinks never do; prepare_timeout is far above any vote's time.
COORDINATOR_CONF = '''
transactions = (
  { name = "reserve-both"; start = "events:order.placed";
    participants = ( %s, %s );
    prepare_timeout = 60; decision_retry_initial = 0.5; decision_retry_max = 30;
    committed = "events:order.reserved"; aborted = "events:order.unavailable"; }
);
sagas = (
  { name = "reserve-saga"; mode = "orchestrated"; start = "events:order.created";
    timeout = 3600;
    steps = ( %s, %s );
    completed = "events:order.reserved"; compensated = "events:order.unavailable"; }
);
''' % (participant('north'), participant('south'), step('north'), step('south'))


class Setup(sb.Setup):
    """The broker, three sinks and three sagads (orders the coordinator,
    north and south the participants). bench/saga.py's phases use it
    through its attributes (orders, urls, sinks['orders'], daemons,
    replicas, pg) and methods (cpu_parts, quiet, histogram, stop), so
    its constructor and the two that differ are here, the rest inherited."""

    def __init__(self, workdir):
        self.pg = None
        self.broker = h.Broker(workdir)
        self.broker.start()
        self.sinks = {n: Sink() for n in ('orders', 'north', 'south')}
        big = 'max_bytes = %dL;' % (16 << 30)
        self.orders = h.Sagad(workdir, self.broker.url, name='orders', heartbeat=10,
                              store_extra=big, conf_extra=COORDINATOR_CONF + sb.SAGA_QUEUE +
                              sb.subscriptions(('events', ['events:order.reserved',
                                                           'events:order.unavailable'],
                                                self.sinks['orders'].base + '/events')))
        self.replicas = [self.orders]
        self.parts = [h.Sagad(workdir, self.broker.url, name=n, heartbeat=10, store_extra=big,
                              conf_extra=sb.subscriptions(('commands', ['commands:%s.#' % n],
                                                           self.sinks[n].url)))
                      for n in ('north', 'south')]
        self.daemons = (self.orders,) + tuple(self.parts)
        for d in self.daemons:
            d.start(args=())
        base = 'http://127.0.0.1:%d/v1/publish/events/' % self.orders.port
        self.tx_url, self.saga_url = base + 'order.placed', base + 'order.created'
        self.urls = [self.tx_url]      # what push() POSTs to: set per phase

    def cpu_parts(self):
        """CPU s so far, under bench/saga.py's part names (its reports sum
        'orders' and 'participants' as sagad): 'participants' is north +
        south here."""
        return {'orders': cpu_s([self.orders.proc.pid]),
                'participants': cpu_s([d.proc.pid for d in self.parts]),
                'broker': cpu_s(broker_pids(self.broker)),
                'sinks': cpu_s([k.proc.pid for k in self.sinks.values()])}

    def running_sagas(self):
        """Running transactions and sagas of every name (sagad_sagas)."""
        return sum(int(v) for k, v in self.orders.metrics().items()
                   if k.startswith('sagad_sagas{') and 'state="running"' in k)


def states(s):
    """'name:state:count ...' from the coordinator's sagad_sagas gauge."""
    out = []
    for k, v in sorted(s.orders.metrics().items()):
        if k.startswith('sagad_sagas{') and int(v):
            name = k.split('saga="', 1)[1].split('"', 1)[0]
            out.append('%s:%s:%d' % (name, k.split('state="', 1)[1].split('"', 1)[0], int(v)))
    return ' '.join(out)


def tx_phases(s, latfile):
    """Where a transaction's time goes, from the history of each one of a
    loadgen run (GET /v1/admin/sagas/ID): prepare = started_at -> the last
    vote recorded (PREPAREs out, through both participants, votes back);
    commit = the last vote -> finished_at (the decision written durably
    with the COMMITs, which leave only then, and both acknowledgements
    back). The history's 'out commit' entries carry the time the step ran,
    before that write, so they cannot split the second part further.
    ms, sorted lists."""
    out = ([], [])
    for sid in sb.read_sent(latfile):
        st, doc = s.orders.admin_json('/v1/admin/sagas/' + urllib.parse.quote(sid, safe=''))
        inst = next((i for i in doc.get('instances', []) if i['saga'] == 'reserve-both'), None) \
            if st == 200 else None
        if not inst or not inst.get('finished_at'):
            continue
        votes = [e['at'] for e in inst['history']
                 if e['dir'] == 'in' and e['step'].startswith('prepare:')]
        if len(votes) == 2:
            out[0].append((max(votes) - inst['started_at']) * 1000)
            out[1].append((inst['finished_at'] - max(votes)) * 1000)
    return [sorted(x) for x in out]


def summary(t_start):
    # The comments come from bench/saga.py's reports: there "saga" is a
    # transaction too in the tx_* figures, and "stock + payment" is north
    # + south. Its per-hop figures need its saga's stores: not measured.
    sb.table(t_start, 'sagad 2PC benchmark summary  (N=%d x %d, %d starts/s x %d s%s)'
             % (TX_N, sb.REPEAT, sb.SAGA_RATE, sb.LAT_SECONDS, ', QUICK' if sb.QUICK else ''),
             note='tx_*: the transaction, saga_*: the saga; "per saga" = per transaction or '
             'saga; participants = north + south', skip=lambda name: '_hop_' in name)


def run(workdir):
    s = Setup(workdir)
    try:
        runs = {'tx': [], 'saga': []}
        say('saturation: %d x %d transactions and %d x %d sagas, alternating'
            % (sb.REPEAT, TX_N, sb.REPEAT, TX_N))
        for i in range(1, sb.REPEAT + 1):
            for kind, url in (('tx', s.tx_url), ('saga', s.saga_url)):
                s.urls = [url]
                runs[kind].append(sb.phase_saturation(s, workdir, i, pre=kind + '_', n=TX_N))
        rate_tx = sb.report_saturation('tx_', runs['tx'], '2PC, two participants')
        rate_saga = sb.report_saturation('saga_', runs['saga'], 'saga, two steps')
        fig('sat_states', states(s), 'sagad_sagas of the coordinator after saturation')
        fig('tx_sat_target_met', 'yes' if rate_tx >= TX_RATE_TARGET else 'no',
            '>= %d transactions/s' % TX_RATE_TARGET)
        fig('ratio_tx_saga', rate_tx / rate_saga, 'tx_sat_rate / saga_sat_rate (same run)')
        for kind, url in (('tx', s.tx_url), ('saga', s.saga_url)):
            say('%s: latency at %d starts/s for %d s' % (kind, sb.SAGA_RATE, sb.LAT_SECONDS))
            s.urls = [url]
            sb.report_latency(kind + '_', sb.phase_latency(s, workdir, pre=kind + '_',
                                                           with_hops=False))
        # sb.phase_latency's loadgen file for the transactions: 'tx_lat.txt'
        phases = tx_phases(s, os.path.join(workdir, 'tx_lat.txt'))
        for k, (name, what) in enumerate((
                ('prepare', 'started_at -> the last vote in'),
                ('commit', 'the last vote -> finished_at (decision, COMMITs, acks)'))):
            fig('tx_lat_%s_p50_ms' % name, sb.common.pct(phases[k], 0.5),
                '%s (%d transactions)' % (what, len(phases[k])))
            fig('tx_lat_%s_p99_ms' % name, sb.common.pct(phases[k], 0.99))
    finally:
        s.stop()


def main():
    for p in (sb.LOADGEN, sb.SINK, h.sagad_path()):
        if not os.access(p, os.X_OK):
            print('bench: %s missing: build it first' % p, file=sys.stderr)
            return 2
    return sb.frame('sagad-tx-', lambda wd: 'work directory %s; N=%d repeat=%d rate=%d'
                    % (wd, TX_N, sb.REPEAT, sb.SAGA_RATE), run, summary)


if __name__ == '__main__':
    sys.exit(main())
