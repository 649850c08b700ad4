#!/bin/bash
# Installs, with apt-get, the Debian 12 packages that building sagad and
# running its tests and demo need; only what is missing, so that a machine
# that has them all needs no network.
set -eu
pkgs="build-essential autoconf automake pkg-config
	librabbitmq-dev libevent-dev libmsgpack-dev libconfig-dev libsqlite3-dev
	libjansson-dev libcmocka-dev libpq-dev
	rabbitmq-server postgresql python3 sqlite3 mandoc procps iproute2 openssl
	clang libclang-rt-14-dev"
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
apt-get install -y -qq --no-install-recommends $missing >/tmp/sagad-apt.log 2>&1 ||
	{ tail -30 /tmp/sagad-apt.log; exit 1; }
