#!/usr/bin/env python3
"""src/pgconn.c, the asynchronous PostgreSQL connection (simple queries,
pipelines, the first error of a pipeline and its implicit transaction, a
pipeline bigger than the socket's buffers, the query deadline and the
reconnect), driven by t/pgconn against a private PostgreSQL
(t/lib/pg.py), over the unix socket and over TCP."""

import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402
import pg  # noqa: E402


def drive(conninfo, how):
    tool = os.path.join(h.top_builddir, 't', 'pgconn')
    p = subprocess.run([tool, conninfo], capture_output=True, text=True, timeout=120)
    for line in p.stdout.splitlines():
        h.log('%s: %s' % (how, line))
    h.check(p.returncode == 0 and 'FAIL' not in p.stdout,
            '%s: every check of t/pgconn passed' % how,
            detail=p.stdout[-2000:] + p.stderr[-2000:])


def main(workdir):
    db = pg.Postgres(workdir)
    db.start()
    drive(db.conninfo, 'unix socket')
    with db.connect() as c:
        c.query('DROP TABLE t; DROP TABLE big; DROP TABLE grow')
    drive(db.tcp_conninfo, 'tcp')


if __name__ == '__main__':
    if not os.path.exists(os.path.join(h.top_builddir, 't', 'pgconn')):
        print('skipped: t/pgconn is not built (libpq missing)')
        sys.exit(77)
    if not pg.available():
        print('skipped: PostgreSQL server not installed (apt-get install postgresql)')
        sys.exit(77)
    h.run_test(main)
