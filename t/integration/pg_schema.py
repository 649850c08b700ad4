#!/usr/bin/env python3
"""src/saga_pg_schema.c, the PostgreSQL saga store's schema and its
migrations (REPLICAS.md), driven by t/pgschema against a private PostgreSQL
(t/lib/pg.py): a fresh database gets every table at the current version; a
second run changes nothing; sagads starting together (held on the advisory
lock, then released at once) migrate once; a schema newer than this sagad
is refused; an odd schema name is quoted; a refused connection, a wrong
password and a role that may not create the schema give clear errors that
never show the password."""

import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402
import pg  # noqa: E402

TOOL = os.path.join(h.top_builddir, 't', 'pgschema')
TABLES = {'schema_version', 'instances', 'history', 'timers', 'consumed', 'early',
          'outbox', 'replicas', 'definitions'}
INDEXES = {'timers_due', 'outbox_claimed', 'consumed_at', 'early_at',
           'instances_pkey', 'instances_finished', 'history_pkey', 'outbox_saga',
           'definitions_pkey'}
SECRET = 'Wr0ng-s3cret'


def version():
    with open(os.path.join(h.top_srcdir, 'src', 'saga_pg_schema.h')) as f:
        for line in f:
            if line.startswith('#define SAGA_PG_SCHEMA_VERSION'):
                return int(line.split()[2])
    raise AssertionError('SAGA_PG_SCHEMA_VERSION not found')


def lock_key(schema):
    """saga_pg_lock_key: FNV-1a 64 of 'sagad schema ' + the name, signed."""
    x = 14695981039346656037
    for b in ('sagad schema ' + schema).encode():
        x = ((x ^ b) * 1099511628211) & 0xffffffffffffffff
    return x - (1 << 64) if x >= 1 << 63 else x


def migrate(conninfo, schema=None, wait=True):
    args = [TOOL, conninfo] + ([schema] if schema is not None else [])
    if not wait:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def out(p):
    return (p.stdout or '') + (p.stderr or '')


def lit(s):
    return pg.quote_literal(s)


def state(c, schema):
    """What the migration left: tables, columns, indexes, version rows."""
    tables = {r[0] for r in c.query(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s"
        % lit(schema))}
    cols = c.query("SELECT table_name, column_name, data_type FROM information_schema.columns"
                   " WHERE table_schema = %s ORDER BY 1, 2" % lit(schema))
    idx = {r[0] for r in c.query("SELECT indexname FROM pg_indexes WHERE schemaname = %s"
                                 % lit(schema))}
    versions = [r[0] for r in c.query('SELECT version FROM "%s".schema_version'
                                      % schema.replace('"', '""'))] \
        if 'schema_version' in tables else []
    return tables, cols, idx, versions


def fresh_and_again(db, c, n):
    p = migrate(db.conninfo)
    h.check(p.returncode == 0, 'a fresh database is migrated', detail=out(p))
    h.check(out(p).count('saga store schema migrated') == n,
            'one migration logged per version (%d)' % n, detail=out(p))
    tables, cols, idx, versions = state(c, 'sagad')
    h.check(tables == TABLES, 'schema "sagad" holds every table', detail=sorted(tables))
    h.check(INDEXES <= idx, 'the indexes are there', detail=sorted(idx))
    h.check(not {'instances_state', 'instances_id'} & idx,
            "version 4 dropped the instances' indexes that misled the update's plan",
            detail=sorted(idx))
    key = [r[0] for r in c.query(
        "SELECT a.attname FROM pg_index x JOIN pg_attribute a ON a.attrelid = x.indrelid"
        " AND a.attnum = ANY(x.indkey) WHERE x.indexrelid = 'sagad.instances_pkey'::regclass"
        " ORDER BY array_position(x.indkey::int2[], a.attnum)")]
    h.check(key == ['service', 'id', 'saga'], "the instances' key is led by id", detail=key)
    opts = c.scalar("SELECT array_to_string(reloptions, ',') FROM pg_class"
                    " WHERE oid = 'sagad.instances'::regclass")
    h.check(opts == 'fillfactor=70', 'instances leave room for HOT updates', detail=opts)
    h.check(versions == [str(n)], 'schema_version is %d, one row' % n, detail=versions)
    h.check(all(('service', 'text') in {(r[1], r[2]) for r in cols if r[0] == t}
                for t in TABLES - {'schema_version'}), 'every table has a service column')
    p = migrate(db.conninfo, 'sagad')
    h.check(p.returncode == 0 and 'migrated' not in out(p) and 'created' not in out(p),
            'a second run migrates nothing', detail=out(p))
    h.check(state(c, 'sagad') == (tables, cols, idx, versions), 'and changes nothing')


def together(db, c, n):
    """Four sagads at once, held on the advisory lock by this connection
    until all are waiting, then released together."""
    key = lock_key('together')
    c.query('SELECT pg_advisory_lock(%d)' % key)
    procs = [migrate(db.conninfo, 'together', wait=False) for _ in range(4)]
    h.wait_until(lambda: int(c.scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")) == 4,
        10, 'four migrations waiting on the lock')
    h.check(all(p.poll() is None for p in procs), 'they wait for the lock')
    c.query('SELECT pg_advisory_unlock(%d)' % key)
    outs = []
    for p in procs:
        so, se = p.communicate(timeout=60)
        h.check(p.returncode == 0, 'each of them succeeds', detail=so + se)
        outs.append(so + se)
    h.check(sum(o.count('saga store schema created') for o in outs) == 1 and
            sum(o.count('saga store schema migrated') for o in outs) == n,
            'the schema was created and migrated once', detail='\n'.join(outs))
    tables, _, _, versions = state(c, 'together')
    h.check(tables == TABLES and versions == [str(n)], 'complete, one version row')


def newer(db, c, n):
    c.query('UPDATE sagad.schema_version SET version = %d' % (n + 7))
    p = migrate(db.conninfo)
    h.check(p.returncode == 1 and 'is at version %d, newer than this sagad knows (%d)'
            % (n + 7, n) in out(p), 'a newer schema is refused, naming both versions',
            detail=out(p))
    c.query('UPDATE sagad.schema_version SET version = %d' % n)


def from_v1(db, c, n):
    """A schema at version 1 with an early event (a replica of the sagad
    before): migration 2 keeps the row (saga ''), and the key then has the
    definition, so one event may be kept for two definitions."""
    p = migrate(db.conninfo, 'old')
    h.check(p.returncode == 0, 'schema "old" migrated', detail=out(p))
    c.query('ALTER TABLE old.early DROP CONSTRAINT early_pkey;'
            'ALTER TABLE old.early DROP COLUMN saga;'
            'ALTER TABLE old.early ADD PRIMARY KEY (service, saga_id, message_id);'
            'DROP INDEX old.outbox_saga;'   # migration 3
            'ALTER TABLE old.instances DROP CONSTRAINT instances_pkey;'   # migration 4
            'ALTER TABLE old.instances ADD PRIMARY KEY (service, saga, id);'
            'ALTER TABLE old.instances RESET (fillfactor);'
            'CREATE INDEX instances_state ON old.instances(service, saga, state);'
            'CREATE INDEX instances_id ON old.instances(service, id);'
            'DROP TABLE old.definitions;'   # migration 5
            "INSERT INTO old.instances VALUES ('orders', 'pay', 's1', 0, 1, 1, NULL, '\\x01');"
            'UPDATE old.schema_version SET version = 1;'
            "INSERT INTO old.early (service, saga_id, message_id, exchange, routing_key, body, at)"
            " VALUES ('orders', 's1', 'e-1', 'events', 'paid', '\\x00'::bytea, 1)")
    p = migrate(db.conninfo, 'old')
    h.check(p.returncode == 0 and out(p).count('saga store schema migrated') == n - 1,
            'a version 1 schema is migrated to %d' % n, detail=out(p))
    h.check(c.query("SELECT saga, id FROM old.instances") == [['pay', 's1']],
            'its instance kept under the key of version 4')
    h.check(c.query("SELECT indexname FROM pg_indexes WHERE schemaname = 'old' AND"
                    " tablename = 'instances' ORDER BY 1") ==
            [['instances_finished'], ['instances_pkey']], 'and only its two indexes')
    h.check(c.query("SELECT saga_id, message_id, saga FROM old.early") ==
            [['s1', 'e-1', '']], "its early event kept, for no definition (saga '')")
    key = c.query("SELECT a.attname FROM pg_index x JOIN pg_attribute a ON"
                  " a.attrelid = x.indrelid AND a.attnum = ANY(x.indkey) WHERE"
                  " x.indrelid = 'old.early'::regclass AND x.indisprimary ORDER BY 1")
    h.check([r[0] for r in key] == ['message_id', 'saga', 'saga_id', 'service'],
            'early is keyed by service, saga_id, saga, message_id', detail=key)
    c.query("INSERT INTO old.early (service, saga_id, message_id, exchange, routing_key, body,"
            " at, saga) VALUES ('orders', 's1', 'e-1', 'events', 'paid', '\\x00'::bytea, 1,"
            " 'pay'), ('orders', 's1', 'e-1', 'events', 'paid', '\\x00'::bytea, 1, 'ship')")
    h.check(c.scalar("SELECT count(*) FROM old.early") == '3',
            'one event kept for two definitions')
    h.check(state(c, 'old')[:3] == state(c, 'sagad')[:3],
            'and the schema is the same as a fresh one')


def odd_name(db, c):
    name = 'We"ird sch\'ema; DROP'
    p = migrate(db.conninfo, name)
    tables = state(c, name)[0]
    h.check(p.returncode == 0 and tables == TABLES, 'a schema name with quotes is quoted',
            detail=out(p))


def refused(db):
    # a port nothing listens on
    port = h.free_port()
    p = migrate('host=127.0.0.1 port=%d user=postgres password=%s connect_timeout=5'
                % (port, SECRET))
    h.check(p.returncode == 1 and 'cannot connect to PostgreSQL' in out(p) and
            'refused' in out(p), 'a refused connection is a clear error', detail=out(p))
    h.check(SECRET not in out(p) and "password='***'" in out(p), 'its password masked',
            detail=out(p))
    p = migrate('host=127.0.0.1 port=%d dbname=postgres' % db.port, '')
    h.check(p.returncode == 1 and 'name is empty' in out(p), 'an empty schema name is refused',
            detail=out(p))


def passwords(db, c):
    """A role that logs in with a password (scram, a pg_hba line ahead of
    the test cluster's trust) and owns nothing."""
    hba = os.path.join(db.data, 'pg_hba.conf')
    with open(hba) as f:
        rules = f.read()
    with open(hba, 'w') as f:
        f.write('host all pwuser 127.0.0.1/32 scram-sha-256\n' + rules)
    c.query("SET password_encryption = 'scram-sha-256';"
            "CREATE ROLE pwuser LOGIN PASSWORD 'right-pw'; SELECT pg_reload_conf()")
    base = 'host=127.0.0.1 port=%d dbname=postgres user=pwuser' % db.port
    for how, ci in (('conninfo', "%s password='%s'" % (base, SECRET)),
                    ('URI', 'postgresql://pwuser:%s@127.0.0.1:%d/postgres' % (SECRET, db.port))):
        p = h.wait_until(lambda: (lambda p: p if 'authentication failed' in out(p) else None)(
            migrate(ci)), 10, 'the new pg_hba.conf')
        h.check(p.returncode == 1 and 'password authentication failed for user "pwuser"'
                in out(p), 'a wrong password (%s) is a clear error' % how, detail=out(p))
        h.check(SECRET not in out(p), 'the password is not shown (%s)' % how, detail=out(p))
    ok = base + " password='right-pw'"
    p = migrate(ok, 'denied')
    h.check(p.returncode == 1 and 'cannot create the schema' in out(p) and
            'permission denied' in out(p) and 'right-pw' not in out(p),
            'no CREATE on the database: a clear error', detail=out(p))
    c.query('GRANT USAGE ON SCHEMA sagad TO pwuser;'
            'GRANT SELECT ON sagad.schema_version TO pwuser')
    p = migrate(ok, 'sagad')
    h.check(p.returncode == 0, 'a role without CREATE uses a schema at the current version',
            detail=out(p))


def main(workdir):
    n = version()
    m = subprocess.run([TOOL, '--mask', "host=x password='a b\\'c' user=u"],
                       capture_output=True, text=True).stdout.strip()
    h.check("password='***'" in m and 'a b' not in m and "host='x'" in m,
            'a quoted password is masked: %s' % m)
    db = pg.Postgres(workdir)
    db.start()
    with db.connect() as c:
        fresh_and_again(db, c, n)
        together(db, c, n)
        newer(db, c, n)
        from_v1(db, c, n)
        odd_name(db, c)
        refused(db)
        passwords(db, c)


if __name__ == '__main__':
    if not os.path.exists(TOOL):
        print('skipped: t/pgschema is not built (libpq missing)')
        sys.exit(77)
    if not pg.available():
        print('skipped: PostgreSQL server not installed (apt-get install postgresql)')
        sys.exit(77)
    h.run_test(main)
