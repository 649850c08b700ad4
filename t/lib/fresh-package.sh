#!/bin/bash
# Run by t/fresh.sh inside a fresh Debian 12 root holding the built .deb
# files in /root/debs: installs them with apt-get (their dependencies come
# from the package's own Depends), checks an example configuration, runs a
# sidecar as user sagad against a private RabbitMQ, publishes one message
# through it and reads it from the queue, then purges the package and
# checks that only what Debian policy keeps is left (the system user).
#
#   fresh-package.sh AMQP_PORT DIST_PORT API_PORT ADMIN_PORT
#
# Every result line starts with "package:".
set -eu
amqp_port=$1 dist_port=$2 api_port=$3 admin_port=$4
export DEBIAN_FRONTEND=noninteractive
ok() { echo "package: ok: $*"; }
fail() { echo "package: FAIL: $*" >&2; exit 1; }

rabbit_pid= sagad_pid=
stop_all() {
	[ -n "$sagad_pid" ] && kill "$sagad_pid" 2>/dev/null && wait "$sagad_pid" 2>/dev/null
	[ -n "$rabbit_pid" ] && { rabbitmqctl -n fresh@localhost stop >/dev/null 2>&1 || kill "$rabbit_pid"; }
	wait 2>/dev/null || true
}
trap stop_all EXIT

# Every path named for sagad outside apt's and dpkg's own records.
sagad_paths() {
	find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /root/debs -o -path /root/t -o -path /tmp \
		-o -path /var/cache/apt -o -path /var/lib/apt -o -path /var/lib/dpkg -o -path /var/log \) \
		-prune -o -name '*sagad*' -print | sort
}
mkdir -p /root/t
sagad_paths >/root/t/paths-before

apt-get update -qq
apt-get install -y -qq --no-install-recommends /root/debs/sagad_*.deb /root/debs/sagad-dev_*.deb \
	>/root/t/install.log 2>&1 || { tail -30 /root/t/install.log; fail "apt-get install of the .deb files"; }
ok "installed: $(dpkg-query -W -f='${Package} ${Version}, ' sagad sagad-dev)"

# What the package put in place.
examples=/usr/share/doc/sagad/examples
for f in /usr/sbin/sagad /usr/bin/sagactl /usr/include/sagad/plugin.h \
	/lib/systemd/system/sagad@.service /usr/share/man/man8/sagad.8.gz \
	/usr/share/man/man5/sagad.conf.5.gz $examples/minimal.conf \
	$examples/prometheus/sagad-alerts.yml $examples/prometheus/sagad-rules.yml \
	$examples/grafana/sagad-dashboard.json; do
	[ -e "$f" ] || fail "$f missing"
done
ls /usr/lib/*/sagad/plugins/sqlite.so /usr/lib/*/sagad/plugins/pgsql.so >/dev/null ||
	fail "the source plugins are missing"
getent passwd sagad >/dev/null || fail "no system user sagad"
[ "$(stat -c %U:%G /var/lib/sagad)" = sagad:sagad ] || fail "/var/lib/sagad is not owned by sagad"
ok "files, system user sagad, /var/lib/sagad owned by it"

# The daemon runs with what Depends brought: every example checks.
for f in $examples/*.conf; do
	(cd $examples && sagad -n -f "$f") >/root/t/check.log 2>&1 ||
		{ cat /root/t/check.log; fail "sagad -n -f $f"; }
done
ok "sagad -n accepts every example configuration ($(ls $examples/*.conf | wc -l))"

# A private RabbitMQ, and the tools to look into it.
apt-get install -y -qq --no-install-recommends rabbitmq-server amqp-tools curl \
	>/root/t/install-tools.log 2>&1 || { tail -30 /root/t/install-tools.log; fail "installing the test tools"; }
runuser -u rabbitmq -- env HOME=/var/lib/rabbitmq RABBITMQ_NODENAME=fresh@localhost \
	RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$amqp_port" \
	RABBITMQ_DIST_PORT="$dist_port" \
	RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}' \
	rabbitmq-server >/root/t/rabbitmq.log 2>&1 &
rabbit_pid=$!
url="amqp://guest:guest@127.0.0.1:$amqp_port/%2f"
for _ in $(seq 120); do
	amqp-declare-queue --url="$url" -d -q fresh >/dev/null 2>&1 && break
	kill -0 $rabbit_pid 2>/dev/null || { tail -20 /root/t/rabbitmq.log; fail "RabbitMQ exited"; }
	sleep 1
done
amqp-declare-queue --url="$url" -d -q fresh >/dev/null || fail "RabbitMQ did not come up"
ok "private RabbitMQ on port $amqp_port, queue fresh declared"

# One sidecar, as an administrator would set it up for a service.
cat >/etc/sagad/fresh.conf <<EOF
service = "fresh";
broker = { url = "$url"; };
api = { listen = "127.0.0.1:$api_port"; admin_listen = "127.0.0.1:$admin_port"; };
EOF
setpriv --reuid=sagad --regid=sagad --init-groups -- sagad -f /etc/sagad/fresh.conf >/root/t/daemon.log 2>&1 &
sagad_pid=$!
for _ in $(seq 100); do
	curl -fs "http://127.0.0.1:$admin_port/readyz" >/dev/null && break
	kill -0 $sagad_pid 2>/dev/null || { cat /root/t/daemon.log; fail "sagad exited"; }
	sleep 0.2
done
[ "$(stat -c %U /proc/$sagad_pid)" = sagad ] || fail "sagad does not run as user sagad"
code=$(curl -s -o /root/t/answer -w '%{http_code}' -X POST --data-binary 'hello from a fresh machine' \
	-H 'Message-Id: fresh-1' "http://127.0.0.1:$api_port/v1/publish/-/fresh")
[ "$code" = 202 ] || { cat /root/t/answer /root/t/daemon.log; fail "publish answered $code"; }
body=
for _ in $(seq 50); do
	body=$(amqp-get --url="$url" -q fresh 2>/dev/null) && break
	sleep 0.2
done
[ "$body" = 'hello from a fresh machine' ] || { cat /root/t/daemon.log; fail "the message is not on the queue (got '$body')"; }
[ "$(stat -c %U /var/lib/sagad/fresh.db)" = sagad ] || fail "the store is not /var/lib/sagad/fresh.db owned by sagad"
ok "sidecar as user sagad: publish answered 202, the message read from queue fresh"
code=$(curl -s -o /root/t/page -w '%{http_code}' "http://127.0.0.1:$admin_port/ui/")
[ "$code" = 200 ] && grep -q '<title>sagad</title>' /root/t/page ||
	fail "the web page is not served from /usr/share/sagad/ui (HTTP $code)"
ok "the web page for operators is served from the package's /usr/share/sagad/ui"
stop_all
rabbit_pid= sagad_pid=

# Purge. The administrator's own file goes first, as policy leaves it.
rm /etc/sagad/fresh.conf
apt-get purge -y -qq sagad sagad-dev >/root/t/purge.log 2>&1 || { cat /root/t/purge.log; fail "apt-get purge"; }
sagad_paths >/root/t/paths-after
if ! diff /root/t/paths-before /root/t/paths-after >/root/t/paths.diff; then
	cat /root/t/paths.diff
	fail "the purge left files behind"
fi
getent passwd sagad >/dev/null && ok "purged: nothing named sagad left but the system user (Debian policy keeps users)"
echo "package: passed"
