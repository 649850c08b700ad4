#!/bin/bash
# Installs, with apt-get, the Debian 12 packages listed in t/lib/packages.txt
# (the one list: debian/control's Build-Depends are checked against it).
#
#   deps.sh         everything: build, tests, benchmarks, packaging
#   deps.sh demo    what demo/run.sh needs: the compiler, the build
#                   dependencies, python3 and rabbitmq-server
#   deps.sh package what dpkg-buildpackage and lintian need
#
# Only what is missing is installed, so that a machine that has it all
# needs no network.
set -eu
here=$(dirname "$0")
case "${1:-all}" in
demo) roles="tool build demo" ;;
package) roles="tool build check pack" ;;
all) roles="tool build check demo test pack" ;;
*) echo "usage: deps.sh [demo|package|all]" >&2; exit 2 ;;
esac
pkgs=$(awk -v roles=" $roles " '!/^#/ && NF == 2 && index(roles, " " $2 " ") { print $1 }' \
	"$here/packages.txt")
# A package counts as there when it is installed, or when an installed
# package provides it: a nodejs from another repository than Debian's
# provides (and conflicts with) npm, and asking apt for Debian's npm would
# replace that nodejs.
provided=" $(dpkg-query -W -f='${db:Status-Abbrev} ${Provides}\n' 2>/dev/null |
	awk '/^ii/ { $1 = ""; print }' | tr ',' '\n' | sed 's/(.*//' | tr -s ' \n' ' ') "
missing=
for p in $pkgs; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
		case "$provided" in *" $p "*) ;; *) missing="$missing $p" ;; esac
done
if [ -n "$missing" ]; then
	echo "installing:$missing"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	# Installing rabbitmq-server and postgresql tries to start their system
	# services, which a container refuses; the tests start private instances.
	log=$(mktemp /tmp/sagad-apt.XXXXXX)
	apt-get install -y -qq --no-install-recommends $missing >"$log" 2>&1 ||
		{ tail -30 "$log"; rm -f "$log"; exit 1; }
	rm -f "$log"
fi

# amqplib, the Node.js client of t/integration/frontdoor_node.py, from the
# npm registry into a cache directory that test looks in (SAGAD_NODE_DIR),
# pinned so that every machine runs the same client; only when it is not
# there already, so that a machine that has it needs no network.
case " $roles " in *" test "*)
	node_dir=${SAGAD_NODE_DIR:-/var/cache/sagad-test/node}
	amqplib=2.3.1
	have=$(node -p "require('$node_dir/node_modules/amqplib/package.json').version" 2>/dev/null || true)
	if [ "$have" != "$amqplib" ]; then
		echo "installing: amqplib@$amqplib (npm) into $node_dir"
		mkdir -p "$node_dir"
		log=$(mktemp /tmp/sagad-npm.XXXXXX)
		npm install --prefix "$node_dir" --no-audit --no-fund --no-save --loglevel=error \
			"amqplib@$amqplib" >"$log" 2>&1 || { tail -30 "$log"; rm -f "$log"; exit 1; }
		rm -f "$log"
	fi
	;;
esac
