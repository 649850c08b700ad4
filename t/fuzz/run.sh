#!/bin/bash
# Build the libFuzzer targets in t/fuzz and run each for FUZZ_SECONDS.
#
#   t/fuzz/run.sh [TARGET ...]        (default: every t/fuzz/fuzz_*.c)
#
# Environment: FUZZ_SECONDS (per target, default 30), FUZZ_CC (clang),
# FUZZ_BUILD (work directory, default $top_builddir/t/fuzz/build: objects,
# binaries and the growing corpora), FUZZ_ARGS (more libFuzzer options),
# FUZZ_NICE (nice level, default 10: the fuzzers yield to everything else).
#
# The daemon's modules (src/*.c but main.c and sagactl.c) are compiled
# again here with clang and -fsanitize=fuzzer-no-link,address,undefined
# (src/libsagad.a is gcc's, uninstrumented). A target that needs a static
# function includes its .c file and is linked without that module's object.
# Seeds are read from t/fuzz/corpus/TARGET (never written); new inputs go to
# $FUZZ_BUILD/corpus/TARGET. A crash, leak, UB report, timeout or broken
# invariant is saved to t/fuzz/crashes/TARGET-crash-<sha1> (reproduce with
# $FUZZ_BUILD/TARGET FILE) and makes this script exit 1, after the other
# targets ran. Inputs kept in t/fuzz/crashes/TARGET-* (reproducers of fixed
# or reported bugs) are replayed first: a target that still fails on one is
# not fuzzed and counts as failed. Exit 77 when clang's libFuzzer is missing (apt-get install
# clang libclang-rt-14-dev).
set -u
here=$(cd "$(dirname "$0")" && pwd)
top_srcdir=${top_srcdir:-$(cd "$here/../.." && pwd)}
top_builddir=${top_builddir:-$top_srcdir}
seconds=${FUZZ_SECONDS:-30}
cc=${FUZZ_CC:-clang}
build=${FUZZ_BUILD:-$top_builddir/t/fuzz/build}
crashes=${FUZZ_CRASHES:-$top_srcdir/t/fuzz/crashes}
nice=${FUZZ_NICE:-10}

if ! command -v "$cc" >/dev/null 2>&1; then
	echo "fuzz: $cc not found (apt-get install clang libclang-rt-14-dev)" >&2
	exit 77
fi
if ! echo 'int LLVMFuzzerTestOneInput(const char *d, long n) { return 0; }' |
    "$cc" -x c -fsanitize=fuzzer -o /dev/null - 2>/dev/null; then
	echo "fuzz: $cc cannot link -fsanitize=fuzzer (apt-get install libclang-rt-14-dev)" >&2
	exit 77
fi
if [ ! -f "$top_builddir/config.h" ]; then
	echo "fuzz: $top_builddir/config.h missing: run ./configure first" >&2
	exit 1
fi

pcs="librabbitmq libevent libevent_pthreads libconfig sqlite3 jansson libpq"
if pkg-config --exists msgpack-c; then pcs="$pcs msgpack-c"; else pcs="$pcs msgpack"; fi
pkg_cflags=$(pkg-config --cflags $pcs) || exit 1
pkg_libs=$(pkg-config --libs $pcs) || exit 1
san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
cflags="-g -O1 -std=gnu11 -Wall -Wno-unused-function $san
	-include $top_builddir/config.h -D_GNU_SOURCE -I$top_srcdir/src -I$top_srcdir/include
	-I$here -DSYSCONFDIR=\"/etc\" -DPKGLIBDIR=\"/usr/lib/sagad\" -DPKGDATADIR=\"/usr/share/sagad\" $pkg_cflags"

mkdir -p "$build/obj" "$build/corpus" "$crashes" || exit 1
# libconfig's own leak on a syntax error is suppressed (see lsan.supp).
export LSAN_OPTIONS="suppressions=$here/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"

# The modules, once (rebuilt when a source or header is newer).
modules=
for src in "$top_srcdir"/src/*.c; do
	m=$(basename "$src" .c)
	case $m in main|sagactl) continue ;; esac
	modules="$modules $m"
	obj=$build/obj/$m.o
	if [ ! -f "$obj" ] || [ -n "$(find "$top_srcdir/src" -newer "$obj" -name '*.[ch]' | head -1)" ]; then
		echo "fuzz: CC src/$m.c"
		# shellcheck disable=SC2086
		$cc $cflags -fsanitize=fuzzer-no-link -c "$src" -o "$obj" || exit 1
	fi
done

if [ $# -gt 0 ]; then
	targets="$*"
else
	targets=$(cd "$here" && ls fuzz_*.c | sed 's/\.c$//')
fi

failed=
for t in $targets; do
	t=${t%.c}
	src=$here/$t.c
	[ -f "$src" ] || { echo "fuzz: no target $src" >&2; exit 2; }
	# Modules the target includes itself (#include "xxx.c") are left out.
	incl=$(sed -n 's/^#include "\([a-z_]*\)\.c"$/\1/p' "$src" | tr "\n" " ")
	objs=
	for m in $modules; do
		case " $incl " in *" $m "*) continue ;; esac
		objs="$objs $build/obj/$m.o"
	done
	echo "fuzz: LINK $t"
	# shellcheck disable=SC2086
	$cc $cflags -fsanitize=fuzzer "$src" $objs $pkg_libs -ldl -lm -lpthread \
	    -o "$build/$t" || exit 1
	name=${t#fuzz_}
	work=$build/corpus/$name
	mkdir -p "$work"
	dict=
	[ -f "$here/$name.dict" ] && dict="-dict=$here/$name.dict"
	# Inputs that once broke this target stay as regression tests.
	regress=$(ls "$here/crashes/$name"-* 2>/dev/null)
	if [ -n "$regress" ]; then
		echo "fuzz: REPLAY $t: $(echo "$regress" | wc -l) saved input(s) from t/fuzz/crashes"
		# shellcheck disable=SC2086
		if ! "$build/$t" -runs=1 $regress >"$build/$t.replay.log" 2>&1; then
			echo "fuzz: $t FAILED on a saved input; log: $build/$t.replay.log"
			grep -E '^(Running:|==[0-9]+==ERROR|SUMMARY|fuzz invariant|.*runtime error)' \
			    "$build/$t.replay.log" | tail -4
			failed="$failed $t"
			continue
		fi
	fi
	echo "fuzz: RUN $t for ${seconds}s"
	log=$build/$t.log
	# shellcheck disable=SC2086
	nice -n "$nice" "$build/$t" -max_total_time="$seconds" -timeout=10 \
	    -rss_limit_mb=2048 -max_len=8192 -print_final_stats=1 \
	    -artifact_prefix="$crashes/$name-" $dict ${FUZZ_ARGS:-} \
	    "$work" "$here/corpus/$name" </dev/null >"$log" 2>&1
	rc=$?
	execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
	cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
	if [ $rc -ne 0 ]; then
		echo "fuzz: $t FAILED (exit $rc, ${execs:-?} executions); log: $log"
		grep -E '^(==[0-9]+==ERROR|SUMMARY|fuzz invariant|.*runtime error)' "$log" | head -5
		grep -o "Test unit written to .*" "$log" | tail -1
		failed="$failed $t"
	else
		echo "fuzz: $t ok: ${execs:-?} executions, $cov, corpus $(ls "$work" | wc -l) inputs"
	fi
done
if [ -n "$failed" ]; then
	echo "fuzz: failed:$failed"
	exit 1
fi
echo "fuzz: all targets ran ${seconds}s without findings"
