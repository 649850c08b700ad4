#!/bin/bash
# Run integration scenarios with every sagad process under valgrind memcheck.
#
#   t/valgrind.sh [t/integration/SCENARIO.py ...]   (default: all of them)
#
# sagad runs as
#   valgrind --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite
#            --suppressions=t/valgrind.supp src/sagad ...
# through a small wrapper script handed to the harness as SAGAD (the harness
# and the scenarios run $SAGAD as a program: a wrapper needs no change to
# them, and `sagad -n` runs are checked too). A memory error or a definite
# leak makes sagad exit 99, which the scenarios see as a wrong exit status;
# each process's report is kept in $VG_LOGDIR/vg.PID.log and every report
# with errors is printed at the end.
#
# Environment: top_srcdir, top_builddir (default: this repository),
# VG_LOGDIR (default: a new directory under /tmp, kept), VALGRIND_ARGS (more
# valgrind options). Under valgrind sagad is 20-50 times slower: a scenario
# that fails on a timing assertion while every valgrind report is clean is
# reported as such, not as a memory error.
#
# Exit status: 0 when every scenario passed and no report has errors; 1 when
# a report has errors (memory errors or definite leaks); 2 when only
# scenarios failed; 77 when valgrind is not installed.
set -u
here=$(cd "$(dirname "$0")" && pwd)
top_srcdir=${top_srcdir:-$(cd "$here/.." && pwd)}
top_builddir=${top_builddir:-$top_srcdir}
export top_srcdir top_builddir

command -v valgrind >/dev/null 2>&1 || { echo "valgrind: not installed (apt-get install valgrind)" >&2; exit 77; }
sagad=$top_builddir/src/sagad
[ -x "$sagad" ] || { echo "valgrind: $sagad not built" >&2; exit 1; }

logdir=${VG_LOGDIR:-$(mktemp -d /tmp/sagad-valgrind.XXXXXX)}
mkdir -p "$logdir"
wrapper=$logdir/sagad
cat >"$wrapper" <<EOF
#!/bin/sh
exec valgrind --error-exitcode=99 --leak-check=full \\
    --errors-for-leak-kinds=definite --show-leak-kinds=definite \\
    --num-callers=30 --track-origins=yes \\
    --suppressions="$top_srcdir/t/valgrind.supp" \\
    --log-file="$logdir/vg.%p.log" ${VALGRIND_ARGS:-} "$sagad" "\$@"
EOF
chmod +x "$wrapper"
export SAGAD=$wrapper
export SAGAD_PLUGIN_DIR=${SAGAD_PLUGIN_DIR:-$top_builddir/plugins/example/.libs:$top_builddir/plugins/sqlite/.libs:$top_builddir/plugins/pgsql/.libs}

if [ $# -eq 0 ]; then
	set -- "$top_srcdir"/t/integration/*.py
fi

failed=
for s in "$@"; do
	name=$(basename "$s" .py)
	echo "valgrind: RUN $name"
	start=$(date +%s)
	python3 "$s" >"$logdir/$name.out" 2>&1
	rc=$?
	secs=$(( $(date +%s) - start ))
	case $rc in
	0) echo "valgrind: PASS $name (${secs}s)" ;;
	77) echo "valgrind: SKIP $name" ;;
	*) echo "valgrind: FAIL $name (exit $rc, ${secs}s): $logdir/$name.out"
	   grep -E 'AssertionError|Error:' "$logdir/$name.out" | tail -3
	   failed="$failed $name" ;;
	esac
done

# Every process's report: errors (definite leaks count) from ERROR SUMMARY.
bad=0
nlogs=0
for f in "$logdir"/vg.*.log; do
	[ -f "$f" ] || continue
	nlogs=$((nlogs + 1))
	n=$(sed -n 's/.*ERROR SUMMARY: \([0-9]*\) errors.*/\1/p' "$f" | tail -1)
	if [ -n "$n" ] && [ "$n" -gt 0 ]; then
		bad=$((bad + 1))
		echo "valgrind: $n error(s) in $f:"
		sed -n '1,80p' "$f"
	elif grep -q 'definitely lost: [1-9]' "$f"; then
		bad=$((bad + 1))
		echo "valgrind: definite leak in $f:"
		sed -n '1,80p' "$f"
	fi
done
echo "valgrind: $nlogs sagad process(es) checked, $bad with errors; logs in $logdir"
[ $bad -eq 0 ] || exit 1
[ -z "$failed" ] || { echo "valgrind: scenarios failed (reports clean):$failed"; exit 2; }
exit 0
