#!/bin/bash
# The whole test suite on a fresh Debian 12 machine: installs what it needs,
# builds, runs the unit tests and the integration scenarios (private
# RabbitMQ and PostgreSQL instances), then checks the distribution tarball.
set -eu
cd "$(dirname "$0")/.."
bash t/lib/deps.sh
[ -x configure ] || autoreconf -fi
[ -f Makefile ] || ./configure
make -j"$(nproc)"
# Scenarios run one at a time: each boots its own broker.
make check || { cat test-suite.log | tail -200; exit 1; }
SAGAD_SKIP_INTEGRATION=1 make distcheck
mandoc -Tlint -W warning man/*.[0-9]
echo "sagad: all tests passed"
