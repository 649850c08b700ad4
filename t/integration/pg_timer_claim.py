#!/usr/bin/env python3
"""The due-timer claim of the PostgreSQL saga store (src/saga_pgsql_batch.c,
round trip 1; issue 15) against a private PostgreSQL (t/lib/pg.py): one
replica fires each timer. The query is taken from the source as it is.

The race it must survive, forced: replica B's claim takes its snapshot
and is held there (its service parameter is a subquery that sleeps);
meanwhile replica A fires the timer (deletes its row, updates the
instance) and commits; then B's scan goes on with its snapshot, which
still holds the timer. Locking only the instance (FOR UPDATE OF i), B
would lock it, now free, and fire the timer a second time; locking the
timer row too, B finds it gone and skips it. The same forced race is run
with the old lock clause first, to show that it does fire twice (the
check can fail). Also: a due timer is claimed, one held by another
replica's transaction is skipped, not waited for."""

import os
import re
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402
import pg  # noqa: E402

TOOL = os.path.join(h.top_builddir, 't', 'pgschema')
HOLD = 1.5      # s B's claim is held after its snapshot


def claim_sql():
    """The claim as pgs_fetch_send sends it (its string literals joined)."""
    with open(os.path.join(h.top_srcdir, 'src', 'saga_pgsql_fetch.c')) as f:
        src = f.read()
    m = re.search(r'f->at_timers = pgs_fetch_add\(f,((?:\s*"(?:[^"\\]|\\.)*")+)', src)
    h.check(m is not None, 'the timer claim found in src/saga_pgsql_fetch.c')
    return ''.join(re.findall(r'"((?:[^"\\]|\\.)*)"', m.group(1)))


def bind(sql, service, now):
    """The claim with its parameters, in the saga store's schema."""
    return 'SET search_path = sagad; ' + sql.replace('$1', service).replace('$2', repr(now))


def arm(c):
    c.query("DELETE FROM sagad.timers; DELETE FROM sagad.instances;"
            "INSERT INTO sagad.instances (service, saga, id, state, started_at, updated_at,"
            " data) VALUES ('orders', 'order', 'x1', 0, 1, 1, '\\x00'::bytea);"
            "INSERT INTO sagad.timers (service, saga, id, kind, step, due)"
            " VALUES ('orders', 'order', 'x1', 1, 0, 1)")


def raced(db, sql, touch_instance):
    """B's claim held after its snapshot while A fires the timer: the rows
    B claims."""
    # B's claim alone (no SET in the same query string): "in pg_sleep"
    # then means after its snapshot
    held = bind(sql, "(SELECT 'orders'::text FROM pg_sleep(%g))" % HOLD, 1e12).split('; ', 1)[1]
    out = {}
    with db.connect() as c:
        arm(c)

    def b():
        with db.connect() as cb:
            cb.query('BEGIN')
            cb.query('SET search_path = sagad')
            try:
                out['rows'] = cb.query(held)
            except pg.PgError as e:
                out['error'] = str(e)
            cb.query('ROLLBACK')

    t = threading.Thread(target=b)
    t.start()
    with db.connect() as ca:
        h.wait_until(lambda: ca.scalar("SELECT count(*) FROM pg_stat_activity WHERE query"
                                       " LIKE '%pg_sleep%' AND state = 'active' AND"
                                       " wait_event = 'PgSleep' AND pid <> pg_backend_pid()")
                     == '1', 5, 'B claiming')
        ca.query('BEGIN; DELETE FROM sagad.timers WHERE id = \'x1\';' +
                 ("UPDATE sagad.instances SET state = 1, updated_at = 2 WHERE id = 'x1';"
                  if touch_instance else '') + 'COMMIT')
        h.check(ca.scalar("SELECT count(*) FROM pg_stat_activity WHERE query LIKE"
                          " '%pg_sleep%' AND state = 'active' AND pid <> pg_backend_pid()")
                == '1', 'A fired the timer while B was held')
    t.join(HOLD + 30)
    h.check('error' not in out, 'B claimed without an error', detail=out.get('error'))
    return out['rows']


def main(workdir):
    db = pg.Postgres(workdir)
    db.start()
    p = subprocess.run([TOOL, db.conninfo], capture_output=True, text=True, timeout=60)
    h.check(p.returncode == 0, 'the saga store schema', detail=p.stdout + p.stderr)
    sql = claim_sql()
    h.check('FOR UPDATE OF t, i SKIP LOCKED' in sql, 'the claim locks the timer and the '
            'instance: %s' % sql)

    with db.connect() as c:
        arm(c)
        rows = c.query(bind(sql, "'orders'", 1e12))
        h.check(len(rows) == 1 and rows[0][3] == 'x1', 'a due timer is claimed', detail=rows)
        h.check(c.query(bind(sql, "'orders'", 0.5)) == [], 'one not due is not')
        with db.connect() as other:
            other.query('BEGIN')
            h.check(len(other.query(bind(sql, "'orders'", 1e12))) == 1, 'A claims it')
            t0 = time.time()
            h.check(c.query(bind(sql, "'orders'", 1e12)) == [],
                    'B skips the timer A holds')
            h.check(time.time() - t0 < 1, 'without waiting for it')
            other.query('ROLLBACK')
        h.check(len(c.query(bind(sql, "'orders'", 1e12))) == 1,
                'A rolled back: the timer is due again')

    old = sql.replace('FOR UPDATE OF t, i', 'FOR UPDATE OF i')
    for touch in (True, False):
        how = 'the instance updated' if touch else 'the instance untouched'
        rows = raced(db, old, touch)
        h.check(len(rows) == 1, 'the old claim (OF i), forced race, %s: B fires the timer '
                'A fired (the race is real)' % how, detail=rows)
        rows = raced(db, sql, touch)
        h.check(rows == [], 'the claim, forced race, %s: B skips the timer A fired' % how,
                detail=rows)


if __name__ == '__main__':
    if not os.path.exists(TOOL):
        print('skipped: t/pgschema is not built (libpq missing)')
        sys.exit(77)
    if not pg.available():
        print('skipped: PostgreSQL server not installed (apt-get install postgresql)')
        sys.exit(77)
    h.run_test(main)
