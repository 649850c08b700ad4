#!/usr/bin/env python3
"""t/integration/sagas.py again, with the orchestrator's sagas on a private
PostgreSQL (saga_store = { backend = "pgsql"; }): one replica on the shared
store keeps every promise of the embedded one (REPLICAS.md, step 2).
Skipped (77) when PostgreSQL is not installed."""

import os
import sys

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import pg  # noqa: E402
import sagas  # noqa: E402

if __name__ == '__main__':
    if not pg.available():
        print('skipped: PostgreSQL server not installed (apt-get install postgresql)')
        sys.exit(77)
    h.run_test(sagas.main_pg)
