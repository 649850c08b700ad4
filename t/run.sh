#!/bin/bash
# The whole test suite on a fresh Debian 12 machine: installs what it needs,
# builds, runs the unit tests and the integration scenarios (private
# RabbitMQ and PostgreSQL instances), checks the distribution tarball, runs
# each fuzz target for 30 s, runs the quick start and the Debian package on
# fresh Debian 12 roots (t/fresh.sh), then the suite again built with
# AddressSanitizer and UndefinedBehaviorSanitizer, then the threaded part of
# it built with ThreadSanitizer (t/tsan.sh).
set -eu
cd "$(dirname "$0")/.."
start=$(date +%s)
bash t/lib/deps.sh
bash t/lib/build.sh

# Scenarios run one at a time: each boots its own broker.
make check || { tail -200 test-suite.log; exit 1; }
SAGAD_SKIP_INTEGRATION=1 make distcheck
sh t/manlint.sh
FUZZ_SECONDS=${FUZZ_SECONDS:-30} FUZZ_NICE=0 bash t/fuzz/run.sh
# The README's first command and the Debian package on fresh Debian 12
# roots (debootstrap; the base root is cached under FRESH_CACHE).
bash t/fresh.sh

# The same suite under the sanitizers, in a build directory of its own. CI
# has 90 minutes: if the first half used most of them, the sanitizer pass
# keeps to the unit tests and the scenarios that cover the most code.
# (From the tarball: a tree configured in place cannot host a VPATH build.)
rm -rf build-san && mkdir build-san
tar -xzf "sagad-$(sed -n 's/^PACKAGE_VERSION = //p' Makefile).tar.gz" -C build-san --strip-components=1
(
	cd build-san
	./configure -q --enable-sanitizers
	make -j"$(nproc)"
	# Memory errors and undefined behaviour fail the run; leaks are the
	# valgrind run's business (make valgrind, RELIABILITY.md): at exit the
	# test tools leave what the process is about to drop anyway.
	export ASAN_OPTIONS=abort_on_error=0:detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
	if [ $(( $(date +%s) - start )) -gt 2700 ]; then
		echo "sagad: time is short: sanitizer pass on the core scenarios only"
		make check TESTS="$(echo t/unit/test_conf t/unit/test_conf_table t/unit/test_util t/unit/test_props \
		    t/unit/test_store t/unit/test_metrics t/unit/test_ingress t/unit/test_acks \
		    t/unit/test_syncer t/unit/test_log t/unit/test_broker t/integration/publish.py \
		    t/integration/errors.py t/integration/subscriptions.py t/integration/sagas.py \
		    t/integration/saga_steps.py t/integration/tx.py t/integration/tx_pg.py t/unit/test_tx \
		    t/integration/source_reload.py \
		    demo/demo.py)" || { tail -200 test-suite.log; exit 1; }
	else
		make check || { tail -200 test-suite.log; exit 1; }
	fi
)
# Races fail the run; about 6.5 minutes (t/tsan.sh).
bash t/tsan.sh
echo "sagad: all tests passed in $(( $(date +%s) - start )) s"
