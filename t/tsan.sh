#!/bin/bash
# The ThreadSanitizer pass of t/run.sh, runnable alone after `make dist`:
# builds the distribution tarball with --enable-tsan in build-tsan (TSan
# cannot share a process with AddressSanitizer, so not in build-san) and
# runs the unit tests and the scenarios that drive the broker threads
# (publish, consume) and the syncer thread. A race fails the run: a unit
# test exits at once (halt_on_error, exit code 66), and a report in a
# sagad's log fails its scenario (t/lib/harness.py, sanitizer_reports).
# inbox_faults.py pauses and resumes consumers (circuit, backlog) and loses
# the consume connection: the consume thread's wishes and reconnects.
# Measured: 6.5 minutes on two cores shared with other builds (the build
# 1.5, inbox_faults.py 2, publish.py 1.3); CI's budget for it is 8. If it
# must shrink, inbox_faults.py goes first.
set -eu
cd "$(dirname "$0")/.."
start=$(date +%s)
tarball=${1:-sagad-$(sed -n 's/^PACKAGE_VERSION = //p' Makefile).tar.gz}
rm -rf build-tsan && mkdir build-tsan
tar -xzf "$tarball" -C build-tsan --strip-components=1
cd build-tsan
./configure -q --enable-tsan
make -j"$(nproc)"
# Unit tests: every one (each takes a second or two under TSan).
units=$(cd t/unit && ls test_*.c | sed 's|^\(.*\)\.c$|t/unit/\1|' | tr '\n' ' ')
# history_size: longer stacks for the earlier access of a race, which is
# often in another turn of another thread's loop.
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 history_size=4"
make check TESTS="$units t/integration/publish.py t/integration/subscriptions.py \
    t/integration/sagas.py t/integration/inbox_faults.py" || { tail -200 test-suite.log; exit 1; }
echo "sagad: ThreadSanitizer pass in $(( $(date +%s) - start )) s"
