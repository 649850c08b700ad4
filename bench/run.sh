#!/bin/bash
# sagad benchmark: `make bench` runs this from the build directory.
#
# Finds the binaries under the build directory (the current directory, or
# $top_builddir) and the harness under the source directory (the parent of
# this script's directory, or $top_srcdir), then runs bench/run.py, which
# starts a private RabbitMQ node and sagad through t/lib/harness.py and
# prints every figure as name=value plus a summary table.
#
# Environment: BENCH_QUICK=1 (smoke test), BENCH_N, BENCH_REPEAT,
# BENCH_BACKLOG, BENCH_CONNS, BENCH_RATE, BENCH_LAT_SECONDS, BENCH_SIZE,
# BENCH_WINDOW, BENCH_KEEP=1, BENCH_WORKDIR (see bench/run.py).
set -u

srcdir=$(cd "$(dirname "$0")/.." && pwd)
top_srcdir=$(cd "${top_srcdir:-$srcdir}" && pwd)
top_builddir=$(cd "${top_builddir:-.}" && pwd)
export top_srcdir top_builddir
export SAGAD="${SAGAD:-$top_builddir/src/sagad}"
if [ -z "${AMQPTOOL:-}" ] && [ -x "$top_builddir/t/amqptool" ]; then
	export AMQPTOOL="$top_builddir/t/amqptool"
fi

missing=
for f in bench/loadgen bench/direct src/sagad; do
	[ -x "$top_builddir/$f" ] || missing="$missing $f"
done
if [ -n "$missing" ]; then
	echo "bench: not built in $top_builddir:$missing (run: make bench)" >&2
	exit 2
fi

child=
cleanup() {
	# run.py stops its brokers, daemons and tools when it gets SIGTERM
	if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
		kill -TERM "$child" 2>/dev/null
		wait "$child" 2>/dev/null
	fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

python3 -u "$top_srcdir/bench/run.py" &
child=$!
wait "$child"
rc=$?
child=
exit $rc
