#!/usr/bin/env python3
"""Two-phase commit (sagad(8) TWO-PHASE COMMIT, sagad.conf(5) TRANSACTIONS).

One coordinating sagad (orders) with a transaction of two participants,
north and south, each a service behind its own sagad. Every case ends with
the invariant checked: all participants that prepared reach the same
outcome, each decision applied once at its service (the services dedup by
transaction id, and count what came again), none left in doubt.

Cases: both vote yes (committed, the outcome event); south votes no (409):
north, which voted yes, gets ABORT, south nothing more; south answers after
the prepare timeout (aborted; its late yes gets an ABORT too); the
coordinator killed (SIGKILL) while a vote is awaited: at restart the
transaction is aborted without waiting (presumed abort, in its history);
the coordinator killed after the decision with a COMMIT unacknowledged:
committed after the restart, the COMMIT applied once; south's service
refusing with 503 through phase 2: committed once it answers; the broker
restarted while a vote is awaited: committed; a participant's sagad killed
after its yes, before the decision, and after its service applied the
COMMIT, before the record of it (the COMMIT comes again, applied once);
the start event twice: one transaction. Then the participant's records
(repeats and late messages answered from them, a participant in doubt
asking) and the operators' commands (sagactl tx). `sagad -n` refuses bad transactions with FILE:LINE errors.
"""

import os
import sys
import threading

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from sagas import (Answer, Participant, api_publish, check_bad_conf, hist_entries,  # noqa: E402
                   saga_get, saga_state, sagactl, sagad_n, step_states, subscription_conf)

TX = '''transactions = (
  { name = "reserve-both"; start = "events:order.placed";
    participants = (
      { name = "north"; prepare = "commands:north.prepare";
        commit = "commands:north.commit"; abort = "commands:north.abort"; },
      { name = "south"; prepare = "commands:south.prepare";
        commit = "commands:south.commit"; abort = "commands:south.abort"; }
    );
    prepare_timeout = %s; decision_retry_initial = 0.2; decision_retry_max = 1;
    committed = "events:tx.committed"; aborted = "events:tx.aborted"; }
);
'''


def config_checks(wd):
    ok = TX % 3
    check_bad_conf(wd, 'a participant without abort', ok.replace(
        'commit = "commands:north.commit"; abort = "commands:north.abort"; },',
        'commit = "commands:north.commit"; },').replace(
        'prepare = "commands:north.prepare";', 'prepare = "commands:north.prepare"; # <-'),
        ['north', "needs 'abort'"])
    check_bad_conf(wd, 'a participant named twice', ok.replace(
        '{ name = "south"; prepare = "commands:south.prepare";',
        '{ name = "north"; prepare = "commands:south.prepare"; # <-'), ['north', 'twice'])
    mark = 'start = "events:order.placed"; # <-'
    check_bad_conf(wd, 'an unknown exchange', ok.replace(
        'start = "events:order.placed";', 'start = "nowhere:order.placed"; # <-'),
        ['transaction', 'nowhere'])
    check_bad_conf(wd, 'retry max below initial', ok.replace(
        'decision_retry_max = 1;', 'decision_retry_max = 0.1;').replace(
        'start = "events:order.placed";', mark), ['decision_retry_max'])
    check_bad_conf(wd, 'a transaction named as a saga', ok.replace(
        '"reserve-both"', '"twice"').replace('start = "events:order.placed";', mark) + '''sagas = (
  { name = "twice"; start = "events:x"; steps = ( { name = "a"; command = "commands:a"; } ); }
);
''', ['twice', 'saga'])
    check_bad_conf(wd, 'no participants', '''transactions = (
  { name = "empty"; start = "events:e"; participants = ( ); } # <-
);
''', ['at least one participant'])


def participant_records(broker, orders, d_north, north):
    """The participant's records: a PREPARE or COMMIT that comes again
    under another message id is answered from the record, not delivered;
    a PREPARE after the ABORT is a no vote the service never sees; a
    participant in doubt asks the coordinator, which answers ABORT for a
    transaction it has no record of (presumed abort)."""
    pk = h.Pika(broker.url)

    def tx_msg(key, cid, kind, step, mid):
        pk.publish('commands', key, '{}', message_id=mid, correlation_id=cid,
                   reply_to='orders.sagas', headers={
                       'x-sagad-saga': 'reserve-both', 'x-sagad-step': step,
                       'x-sagad-kind': kind})

    def answered():
        return d_north.metrics().get('sagad_tx_participant_answers_total', 0)

    before = answered()
    tx_msg('north.prepare', 't-ok', 'prepare', 'prepare:north', 'again-1')
    tx_msg('north.commit', 't-ok', 'commit', 'commit:north', 'again-2')
    tx_msg('north.prepare', 't-no', 'prepare', 'prepare:north', 'again-3')
    h.wait_until(lambda: answered() >= before + 3, 30, 'three answered from the record')
    for key, cid in (('north.prepare', 't-ok'), ('north.commit', 't-ok'),
                     ('north.prepare', 't-no')):
        h.check(len(north.deliveries(key, cid)) == 1,
                '%s %s again under a new message id: not delivered again' % (key, cid))

    # A transaction the coordinator never had: north votes yes, is in
    # doubt after in_doubt_timeout (2 s), asks, and is told ABORT.
    tx_msg('north.prepare', 't-ghost', 'prepare', 'prepare:north', 'ghost-1')
    h.wait_until(lambda: count_applied(north, 'north.abort', 't-ghost') == 1, 60,
                 't-ghost: the participant in doubt asked and was told ABORT')
    h.check(count_applied(north, 'north.prepare', 't-ghost') == 1, 't-ghost: prepared once')
    h.wait_until(lambda: d_north.metrics().get('sagad_tx_in_doubt', 1) == 0, 30,
                 't-ghost: nothing left in doubt')
    h.check(d_north.metrics().get('sagad_tx_status_questions_total', 0) >= 1,
            't-ghost: the question is counted')
    h.check(orders.metrics() is not None, 'the coordinator still answers')


def operators(broker, orders, d_south, south):
    """sagactl tx list, tx ID; and tx resolve for a participant in doubt
    whose coordinator cannot answer (a transaction no sagad coordinates)."""
    rc, out, err = sagactl(orders, 'tx', 'list')
    h.check(rc == 0 and 't-ok' in out and 'committed' in out and 't-no' in out,
            'sagactl tx list: the coordinated transactions', out + err)
    rc, out, err = sagactl(orders, 'tx', 'list', '--state', 'aborted')
    h.check(rc == 0 and 't-no' in out and 't-ok' not in out, 'sagactl tx list --state aborted',
            out + err)
    rc, out, err = sagactl(orders, 'tx', 't-no')
    # north's yes may come after south's no: then it is aborted unvoted
    h.check(rc == 0 and 'decision  abort' in out and 'vote no' in out and
            ('vote yes' in out or 'vote none' in out),
            'sagactl tx ID: the votes and the decision', out + err)
    rc, out, err = sagactl(d_south, 'tx', 't-ok')
    h.check(rc == 0 and 'participant south' in out and 'committed' in out,
            "sagactl tx ID at a participant: its record", out + err)
    rc, out, err = sagactl(orders, 'tx', 'list', '--state', 'nonsense')
    h.check(rc != 0 and 'state must be' in err, 'sagactl tx list: a bad state is refused',
            out + err)

    h.Pika(broker.url).publish('commands', 'south.prepare', '{}', message_id='lost-1',
                               correlation_id='t-lost', reply_to='orders.sagas', headers={
                                   'x-sagad-saga': 'vanished', 'x-sagad-step': 'prepare:south',
                                   'x-sagad-kind': 'prepare'})
    h.wait_until(lambda: count_applied(south, 'south.prepare', 't-lost') == 1, 30,
                 't-lost: south voted yes')
    rc, out, err = sagactl(d_south, 'tx', 'resolve', 't-nothing', 'commit')
    h.check(rc != 0 and 'no record' in err, 'sagactl tx resolve: nothing in doubt: refused',
            out + err)
    rc, out, err = sagactl(d_south, 'tx', 'resolve', 't-lost', 'commit')
    h.check(rc == 0 and 'WARNING' in err and '1 record' in out,
            'sagactl tx resolve: loud, one record', out + err)
    h.wait_until(lambda: [c for c in south.deliveries(cid='t-lost', applied=True)
                          if c['kind'] == 'commit'], 30, 't-lost: the COMMIT delivered to the service')
    h.wait_until(lambda: 'committed' in sagactl(d_south, 'tx', 't-lost')[1], 30,
                 't-lost: the record committed')
    rc, out, err = sagactl(d_south, 'tx', 't-lost')
    h.check(rc == 0 and 'by an operator' in out,
            'sagactl tx ID: the record says an operator decided', out + err)
    h.check('RESOLVED BY AN OPERATOR' in d_south.log(), 'the resolve is in the log')


def count_applied(p, key, cid):
    return len(p.deliveries(key, cid, applied=True))


def main(wd):
    config_checks(wd)
    broker = h.Broker(wd)
    broker.start()
    north, south, observer = Participant('north'), Participant('south'), Participant('observer')
    orders = h.Sagad(wd, broker.url, name='orders', conf_extra=TX % 3 + subscription_conf(
        'watch', ['events:tx.#'], observer.url))
    d_north = h.Sagad(wd, broker.url, name='north', conf_extra=subscription_conf(
        'inbox', ['commands:north.#'], north.url) + 'in_doubt_timeout = 2;\n')
    d_south = h.Sagad(wd, broker.url, name='south', conf_extra=subscription_conf(
        'inbox', ['commands:south.#'], south.url))
    rc, err = sagad_n(orders.conf)
    h.check(rc == 0, 'sagad -n: the coordinator configuration is valid', err)
    for d in (d_north, d_south, orders):
        d.start()
    parts = {'north': north, 'south': south}

    def start(cid, mid=None):
        api_publish(orders.port, 'events', 'order.placed', {'order': cid},
                    {'Correlation-Id': cid, 'Message-Id': mid or 'start-' + cid})

    def finished(cid, state, timeout=60):
        h.wait_until(lambda: saga_state(orders, cid) == state, timeout,
                     '%s %s' % (cid, state))

    def count(p, phase, cid):
        return len(parts[p].deliveries('%s.%s' % (p, phase), cid, applied=True))

    def outcome(cid, want):
        """The invariant: every participant that prepared has the one
        outcome, applied once; the others got nothing after their vote."""
        for p in parts:
            prepared = count(p, 'prepare', cid)
            h.check(prepared <= 1, '%s %s: PREPARE applied at most once' % (cid, p))
            h.check(parts[p].repeats[('%s.commit' % p, cid)] == 0 or count(p, 'commit', cid) == 1,
                    '%s %s: a COMMIT that came again was not applied again' % (cid, p))
            if want == 'committed':
                h.wait_until(lambda: count(p, 'commit', cid) == 1, 30, '%s %s commit' % (cid, p))
                h.check(count(p, 'abort', cid) == 0, '%s %s: no ABORT' % (cid, p))
            elif prepared:
                h.wait_until(lambda: count(p, 'abort', cid) == 1, 30, '%s %s abort' % (cid, p))
                h.check(count(p, 'commit', cid) == 0, '%s %s: no COMMIT' % (cid, p))
        key = 'tx.%s' % want
        h.wait_until(lambda: len(observer.deliveries(key, cid)) >= 1, 30,
                     '%s: the %s event' % (cid, key))
        h.check(len(observer.deliveries(key, cid)) == 1, '%s: one %s event' % (cid, key))

    # ---- both vote yes
    start('t-ok')
    finished('t-ok', 'completed')
    outcome('t-ok', 'committed')
    calls = north.deliveries('north.prepare', 't-ok')
    h.check(calls[0]['kind'] == 'prepare' and calls[0]['saga'] == 'reserve-both',
            't-ok: the service is told Sagad-Kind: prepare and the transaction', calls[0])
    h.check(north.deliveries('north.commit', 't-ok')[0]['kind'] == 'commit',
            't-ok: Sagad-Kind: commit')
    inst = saga_get(orders, 't-ok')
    h.check(step_states(inst).get('decision') == 'succeeded',
            't-ok: the decision is a step of the transaction', inst)

    # ---- south votes no
    south.rules[('south.prepare', 't-no')] = Answer(status=409)
    start('t-no')
    finished('t-no', 'compensated')
    outcome('t-no', 'aborted')
    h.check(north.deliveries('north.abort', 't-no')[0]['kind'] == 'abort',
            't-no: Sagad-Kind: abort')
    h.check(not south.deliveries('south.abort', 't-no'),
            't-no: south, which voted no, gets no ABORT')

    # ---- south answers after the prepare timeout: aborted, its late yes too
    gate = threading.Event()
    south.rules[('south.prepare', 't-slow')] = Answer(gate=gate)
    start('t-slow')
    h.wait_until(lambda: count('north', 'abort', 't-slow') == 1, 30, 't-slow: north aborted')
    h.check(saga_state(orders, 't-slow') == 'compensating',
            't-slow: aborting, not aborted, while south may have prepared')
    gate.set()
    h.wait_until(lambda: count('south', 'abort', 't-slow') == 1, 30,
                 't-slow: south, which had not voted, gets its ABORT after its PREPARE')
    finished('t-slow', 'compensated')
    outcome('t-slow', 'aborted')
    h.check([p['vote'] for p in saga_get(orders, 't-slow')['transaction']['participants']] ==
            ['yes', 'yes'], "t-slow: the votes as the coordinator saw them (south's late)",
            saga_get(orders, 't-slow')['transaction'])

    # ---- the coordinator killed while a vote is awaited: presumed abort
    gate = threading.Event()
    south.rules[('south.prepare', 't-crash1')] = Answer(gate=gate)
    orders.stop()
    orders.conf_extra = TX % 60 + subscription_conf('watch', ['events:tx.#'], observer.url)
    orders.write_conf()
    orders.start()
    start('t-crash1')
    h.wait_until(lambda: count('north', 'prepare', 't-crash1') == 1 and
                 south.has_started('south.prepare', 't-crash1'), 30, 't-crash1: both prepared')
    h.wait_until(lambda: step_states(saga_get(orders, 't-crash1') or {'steps': []}).get(
        'prepare:north') == 'succeeded', 30, "t-crash1: north's yes recorded")
    orders.kill()
    orders.start()
    h.check(saga_state(orders, 't-crash1') == 'compensating',
            't-crash1: aborted at once at the restart (not after the 60 s prepare timeout)')
    h.check(hist_entries(saga_get(orders, 't-crash1'), 'presumed abort'),
            't-crash1: its history says presumed abort', saga_get(orders, 't-crash1'))
    gate.set()
    finished('t-crash1', 'compensated', timeout=30)
    outcome('t-crash1', 'aborted')

    # ---- the coordinator killed after the decision, a COMMIT unacknowledged
    gate = threading.Event()
    north.rules[('north.commit', 't-crash2')] = Answer(gate=gate)
    start('t-crash2')
    h.wait_until(lambda: north.has_started('north.commit', 't-crash2'), 30,
                 't-crash2: the COMMIT reached north')
    orders.kill()
    gate.set()
    orders.start()
    finished('t-crash2', 'completed')
    outcome('t-crash2', 'committed')

    # ---- south's service refusing (503) through phase 2
    south.rules[('south.commit', 't-down')] = [Answer(status=503)] * 3 + [Answer()]
    start('t-down')
    finished('t-down', 'completed')
    outcome('t-down', 'committed')
    h.check(len(south.deliveries('south.commit', 't-down')) == 4,
            't-down: the COMMIT delivered until the service took it')

    # ---- the broker restarted while a vote is awaited
    gate = threading.Event()
    south.rules[('south.prepare', 't-broker')] = Answer(gate=gate)
    start('t-broker')
    h.wait_until(lambda: south.has_started('south.prepare', 't-broker'), 30,
                 't-broker: south preparing')
    broker.restart()
    gate.set()
    finished('t-broker', 'completed', timeout=120)
    outcome('t-broker', 'committed')

    # ---- a participant's sagad killed after its yes, before the decision
    gate = threading.Event()
    south.rules[('south.prepare', 't-pcrash1')] = Answer(gate=gate)
    start('t-pcrash1')
    h.wait_until(lambda: step_states(saga_get(orders, 't-pcrash1') or {'steps': []}).get(
        'prepare:north') == 'succeeded', 30, "t-pcrash1: north's yes recorded")
    d_north.kill()
    gate.set()
    h.wait_until(lambda: step_states(saga_get(orders, 't-pcrash1') or {'steps': []}).get(
        'decision') == 'succeeded', 30, 't-pcrash1: decided while north is down')
    d_north.start()
    finished('t-pcrash1', 'completed')
    outcome('t-pcrash1', 'committed')

    # ---- a participant's sagad killed after its service applied the COMMIT,
    # before it recorded that: the COMMIT comes again, applied once
    gate = threading.Event()
    north.rules[('north.commit', 't-pcrash2')] = Answer(gate=gate)
    start('t-pcrash2')
    h.wait_until(lambda: north.has_started('north.commit', 't-pcrash2'), 30,
                 't-pcrash2: the COMMIT reached the service')
    d_north.kill()
    gate.set()
    h.wait_until(lambda: count_applied(north, 'north.commit', 't-pcrash2') == 1, 30,
                 't-pcrash2: the service applied it')
    d_north.start()
    finished('t-pcrash2', 'completed')
    outcome('t-pcrash2', 'committed')
    h.check(north.repeats[('north.commit', 't-pcrash2')] >= 1 and
            count_applied(north, 'north.commit', 't-pcrash2') == 1,
            't-pcrash2: delivered again after the restart, applied once',
            north.deliveries('north.commit', 't-pcrash2'))

    # ---- the start event twice: one transaction
    start('t-twice', mid='first')
    start('t-twice', mid='second')
    finished('t-twice', 'completed')
    outcome('t-twice', 'committed')
    h.check(len(north.deliveries('north.prepare', 't-twice')) == 1,
            't-twice: one PREPARE')

    m = orders.metrics()
    h.check(m.get('sagad_transactions_decided_total{transaction="reserve-both",'
                  'decision="commit"}', 0) >= 3 and
            m.get('sagad_transaction_prepare_seconds_count{transaction="reserve-both"}', 0) >= 3,
            'metrics: the decisions since the last restart, and the prepare phase timed',
            {k: v for k, v in m.items() if 'transaction' in k})
    participant_records(broker, orders, d_north, north)
    operators(broker, orders, d_south, south)

    for d in (orders, d_north, d_south):
        d.stop()
    for p in (north, south, observer):
        p.stop()


if __name__ == '__main__':
    h.run_test(main)
