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
missing=
for p in $pkgs; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
		missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "installing:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Installing rabbitmq-server and postgresql tries to start their system
# services, which a container refuses; the tests start private instances.
log=$(mktemp /tmp/sagad-apt.XXXXXX)
apt-get install -y -qq --no-install-recommends $missing >"$log" 2>&1 ||
	{ tail -30 "$log"; rm -f "$log"; exit 1; }
rm -f "$log"
