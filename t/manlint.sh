#!/bin/sh
# Man page check: every page must lint clean at the STYLE level and render
# without macro text leaking into what a reader sees.
#
# 1. `mandoc -Tlint -W style`: any message fails the check, except that a
#    cross-reference names a page not installed on this machine (our own
#    pages are not installed when the check runs, and mandoc.db may be out
#    of date). Those are two exact message forms, matched whole.
# 2. The page rendered with -Tutf8 and -Tascii (overstrike removed): a line
#    that starts with a dot-macro (".It", ".Xr"), a dot-macro glued to text
#    ("answered..It Cm"), or two mdoc macro names in a row ("Pq Vt",
#    "Qq Li"), is macro source that escaped into the output; this happens
#    when a macro line gets joined onto a text line. The second pattern
#    needs two names in a row, the first of them never an English word, so
#    that it cannot fire on real text.
#
# Usage: t/manlint.sh [page...]   (default: man/*.[0-9])
set -u
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- man/*.[0-9]

# mdoc macro names (mdoc(7)); ENGLISHLESS excludes the ones that are also
# common words (No, Do, In, At, An, So, Op, Em, St, Er, Ad, Ms, It...).
MACROS='Ad|An|Ap|Ar|At|Bc|Bd|Bf|Bk|Bl|Bo|Bq|Brc|Bro|Brq|Bsx|Bt|Bx|Cd|Cm|D1|Db|Dc|Dd|Dl|Do|Dq|Dt|Dv|Dx|Ec|Ed|Ef|Ek|El|Em|En|Eo|Er|Es|Ev|Ex|Fa|Fc|Fd|Fl|Fn|Fo|Fr|Ft|Fx|Hf|Ic|In|It|Lb|Li|Lk|Lp|Ms|Mt|Nd|Nm|No|Ns|Nx|Oc|Oo|Op|Os|Ot|Ox|Pa|Pc|Pf|Po|Pp|Pq|Qc|Ql|Qo|Qq|Re|Rs|Rv|Sc|Sh|Sm|So|Sq|Ss|St|Sx|Sy|Ta|Tn|Ud|Ux|Va|Vt|Xc|Xo|Xr'
ENGLISHLESS='Ar|Bl|Bd|Cm|Dq|Dv|Ed|El|Ev|Fa|Fl|Fn|Ic|Li|Nm|Ns|Pa|Pf|Pp|Pq|Ql|Qq|Sh|Sq|Ss|Sx|Sy|Va|Vt|Xr'
LEAK="(^|[[:space:](.])\\.($MACROS)([[:space:]]|\$)|(^|[[:space:]])($ENGLISHLESS)[[:space:]]+($MACROS)([[:space:]]|\$)"
XREF_MISSING='^mandoc: [^:]+:[0-9]+:[0-9]+: STYLE: referenced manual not found: Xr [A-Za-z0-9._-]+ [0-9][a-z]*( \([0-9]+ times\))?$'
DB_STALE='^mandoc: outdated mandoc\.db lacks [A-Za-z0-9._-]+\([0-9][a-z]*\) entry, run makewhatis [^ ]+$'

fail=0
for page in "$@"; do
	lint=$(mandoc -Tlint -W style "$page" 2>&1 | grep -Ev "$XREF_MISSING|$DB_STALE")
	if [ -n "$lint" ]; then
		printf '%s: mandoc -Tlint:\n%s\n' "$page" "$lint"
		fail=1
	fi
	for fmt in utf8 ascii; do
		if ! out=$(mandoc -T"$fmt" "$page" 2>/dev/null); then
			echo "$page: mandoc -T$fmt failed"
			fail=1
			continue
		fi
		leaks=$(printf '%s\n' "$out" | sed 's/.\x08//g' | grep -nE "$LEAK")
		if [ -n "$leaks" ]; then
			printf '%s: macro text in the -T%s output:\n%s\n' "$page" "$fmt" "$leaks"
			fail=1
		fi
	done
done
[ $fail -eq 0 ] && echo "manlint: $# pages clean"
exit $fail
