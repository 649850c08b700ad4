#!/usr/bin/env python3
"""Two-phase commit with prepared transactions in the service's own
PostgreSQL (sagad.conf(5): prepared_conninfo_file; sagad(8) TWO-PHASE
COMMIT).

The participant north is a service that, for a PREPARE, writes its row in
a private PostgreSQL (max_prepared_transactions = 10) and ends with
PREPARE TRANSACTION '<Sagad-Gid>'; its sagad finishes the prepared
transaction itself at COMMIT or ABORT, and the service never sees those.
south is a plain HTTP participant.

Checked: committed (north's row visible, nothing left prepared); south
votes no (north's row rolled back); north's service down through phase 2
(committed all the same); north's PostgreSQL down when the COMMIT comes
(committed once it is back); a prepared transaction of a decided
transaction found at north's sagad's start (rolled back from its record);
and the service is never called for COMMIT or ABORT.
"""

import os
import sys
import threading

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import pg  # noqa: E402
from sagas import Answer, Participant, api_publish, saga_state, subscription_conf  # noqa: E402
from tx import TX  # noqa: E402


class PgParticipant(Participant):
    """A service that prepares its work in PostgreSQL: a yes vote is a row
    written and PREPARE TRANSACTION'd under the gid sagad gives."""

    def __init__(self, name, db):
        self.db = db
        super().__init__(name)

    def _handle(self, hdrs, raw):
        gid = hdrs.get('Sagad-Gid')
        if hdrs.get('Sagad-Kind') == 'prepare' and gid:
            ans = self._rule(hdrs.get('Sagad-Routing-Key', ''), hdrs.get('Correlation-Id', ''),
                             0)
            if 200 <= ans.status < 300:
                with self.db.connect() as c:
                    if not c.query("SELECT 1 FROM pg_prepared_xacts WHERE gid = %s"
                                   % pg.quote_literal(gid)):
                        c.query("BEGIN; INSERT INTO reserved (tx) VALUES (%s); "
                                "PREPARE TRANSACTION %s"
                                % (pg.quote_literal(hdrs.get('Correlation-Id')),
                                   pg.quote_literal(gid)))
        return super()._handle(hdrs, raw)


def main(wd):
    if not pg.available():
        raise h.Skip('PostgreSQL is not installed')
    db = pg.Postgres(os.path.join(wd, 'pg'), settings={'max_prepared_transactions': '10'})
    db.start()
    with db.connect() as c:
        c.query('CREATE TABLE reserved (tx text PRIMARY KEY)')
    conninfo = os.path.join(wd, 'north.conninfo')
    with open(conninfo, 'w') as f:
        f.write(db.conninfo + '\n')
    broker = h.Broker(wd)
    broker.start()
    north, south = PgParticipant('north', db), Participant('south')
    orders = h.Sagad(wd, broker.url, name='orders', conf_extra=TX % 3)
    d_north = h.Sagad(wd, broker.url, name='north', conf_extra=subscription_conf(
        'inbox', ['commands:north.#'], north.url,
        'prepared_conninfo_file = %s;' % h.conf_str(conninfo)))
    d_south = h.Sagad(wd, broker.url, name='south', conf_extra=subscription_conf(
        'inbox', ['commands:south.#'], south.url))
    for d in (d_north, d_south, orders):
        d.start()

    def start(cid):
        api_publish(orders.port, 'events', 'order.placed', {'order': cid},
                    {'Correlation-Id': cid, 'Message-Id': 'start-' + cid})

    def finished(cid, state, timeout=60):
        h.wait_until(lambda: saga_state(orders, cid) == state, timeout, '%s %s' % (cid, state))

    def rows(cid):
        with db.connect() as c:
            return len(c.query('SELECT tx FROM reserved WHERE tx = %s' % pg.quote_literal(cid)))

    def prepared():
        with db.connect() as c:
            return [r[0] for r in c.query('SELECT gid FROM pg_prepared_xacts')]

    def phase2_not_called(cid):
        calls = [c for c in north.deliveries(cid=cid) if c['kind'] in ('commit', 'abort')]
        h.check(not calls, '%s: the service is not called for COMMIT or ABORT' % cid, calls)

    # ---- committed
    start('p-ok')
    finished('p-ok', 'completed')
    h.wait_until(lambda: rows('p-ok') == 1, 30, "p-ok: north's row committed")
    h.check(not prepared(), 'p-ok: nothing left prepared', prepared())
    phase2_not_called('p-ok')

    # ---- south votes no: north's prepared transaction is rolled back
    south.rules[('south.prepare', 'p-no')] = Answer(status=409)
    start('p-no')
    finished('p-no', 'compensated')
    h.wait_until(lambda: not prepared(), 30, 'p-no: rolled back')
    h.check(rows('p-no') == 0, "p-no: north's row is not there")
    phase2_not_called('p-no')

    # ---- north's service down through phase 2
    gate = threading.Event()
    south.rules[('south.prepare', 'p-down')] = Answer(gate=gate)
    start('p-down')
    h.wait_until(lambda: len(prepared()) == 1, 30, 'p-down: north prepared')
    north.stop()
    gate.set()
    finished('p-down', 'completed')
    h.wait_until(lambda: rows('p-down') == 1, 30, 'p-down: committed by sagad, service down')
    h.check(not prepared(), 'p-down: nothing left prepared', prepared())
    north = PgParticipant('north', db)
    d_north.stop()
    d_north.conf_extra = subscription_conf('inbox', ['commands:north.#'], north.url,
                                           'prepared_conninfo_file = %s;' % h.conf_str(conninfo))
    d_north.write_conf()
    d_north.start()

    # ---- north's PostgreSQL down when the COMMIT comes
    gate = threading.Event()
    south.rules[('south.prepare', 'p-pgdown')] = Answer(gate=gate)
    start('p-pgdown')
    h.wait_until(lambda: len(prepared()) == 1, 30, 'p-pgdown: north prepared')
    db.stop()
    gate.set()
    h.wait_until(lambda: 'not finished' in d_north.log() or 'PostgreSQL lost' in d_north.log(),
                 30, 'p-pgdown: the COMMIT waits for PostgreSQL')
    db.start()
    finished('p-pgdown', 'completed')
    h.wait_until(lambda: rows('p-pgdown') == 1, 30, 'p-pgdown: committed once PostgreSQL is back')
    h.check(not prepared(), 'p-pgdown: nothing left prepared', prepared())

    # ---- found prepared at start-up, decided before: finished from the record
    gid = 'sagad:north:reserve-both:p-no:north'
    d_north.stop()
    with db.connect() as c:
        c.query("BEGIN; INSERT INTO reserved (tx) VALUES ('p-stale'); PREPARE TRANSACTION %s"
                % pg.quote_literal(gid))
    h.check(prepared() == [gid], 'a stale prepared transaction of p-no (aborted) is there')
    d_north.start()
    h.wait_until(lambda: not prepared(), 30, 'at start-up: rolled back from the record')
    h.check(rows('p-stale') == 0, 'its row is gone')
    h.check('prepared transaction decided before' in d_north.log(), 'the start-up pass says so')

    for d in (orders, d_north, d_south):
        d.stop()
    for p in (north, south):
        p.stop()
    db.stop()


if __name__ == '__main__':
    h.run_test(main)
