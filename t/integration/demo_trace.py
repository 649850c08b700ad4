#!/usr/bin/env python3
"""The demo with --trace (demo/run.sh --trace): its three sagad export
spans to the demo's collector, and every order has one trace that covers
every hop across the three services (demo/demo.py: report_traces)."""

import os
import sys

TOP = os.environ.get('top_srcdir', '.')
sys.path.insert(0, os.path.join(TOP, 't', 'lib'))
sys.path.insert(0, os.path.join(TOP, 'demo'))
import harness as h  # noqa: E402
import demo  # noqa: E402

if __name__ == '__main__':
    h.run_test(lambda wd: demo.main(wd, trace=True))
