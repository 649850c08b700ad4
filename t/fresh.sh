#!/bin/bash
# The README's quick start on a fresh Debian 12 machine, and the Debian
# package on another one: what a new user meets first, checked on a root
# made by debootstrap rather than on this machine's installed packages.
#
#   bash t/fresh.sh [all|demo|package]      (as root; default all)
#
# demo:    in a fresh root, the README's first command, exactly as written,
#          must end with the demo's verdict line. Before that, the same
#          command is run once with one package (FRESH_DROP, default libtool)
#          taken out of t/lib/packages.txt: it must fail, which shows that
#          this check can fail and, once the list is whole again, that the
#          second run recovers from what the failed one left in the tree.
# package: builds the .deb files (dpkg-buildpackage) in that root, runs
#          lintian, then installs them in a second fresh root with apt-get
#          (the dependencies come from the package's Depends), runs a
#          sidecar as user sagad against a private RabbitMQ, and purges
#          (t/lib/fresh-package.sh, run inside that root).
#
# Environment:
#   FRESH_CACHE  where the base root is kept as a tarball, with the .deb
#                files apt downloaded (default /var/cache/sagad-fresh): only
#                the first run downloads a system. Each root gets a copy of
#                those files and gives back what it added, so that two runs
#                at once do not share apt's lock.
#   FRESH_WORK   where the roots are unpacked (default /var/tmp)
#   FRESH_DROP   the package the failing first run goes without ("" skips it)
#   FRESH_KEEP=1 keeps the roots (and their logs) after the run
#
# The source is `git archive HEAD`: what is committed, not the work tree.
# The mirror is read from this machine's apt configuration. /proc, /sys and
# /dev are mounted in each root and unmounted on every exit path, signals
# included; a root is deleted only once nothing is mounted under it.
set -eu
cd "$(dirname "$0")/.."
top=$(pwd)
what=${1:-all}
case $what in all|demo|package) ;; *) echo "usage: t/fresh.sh [all|demo|package]" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "t/fresh.sh: needs root (chroot, mount)" >&2; exit 2; }
cache=${FRESH_CACHE:-/var/cache/sagad-fresh}
drop=${FRESH_DROP-libtool}
work=$(mktemp -d "${FRESH_WORK:-/var/tmp}/sagad-fresh.XXXXXX")
roots=()
start=$(date +%s)

say() { echo "fresh: [$(( $(date +%s) - start ))s] $*"; }
fail() { echo "fresh: FAIL: $*" >&2; exit 1; }

# -------------------------------------------------------------- cleanup

# Processes whose root directory is inside $1 (what the scripts started
# in the chroot and left running, a RabbitMQ's epmd for instance).
root_pids() {
	local p r
	for p in /proc/[0-9]*; do
		r=$(readlink "$p/root" 2>/dev/null) || continue
		case $r in "$1"|"$1"/*) echo "${p#/proc/}" ;; esac
	done
}

mounts_under() { awk -v r="$1" '$2 == r || index($2, r "/") == 1 { print $2 }' /proc/mounts; }

release_root() {
	local r=$1 pids m
	pids=$(root_pids "$r")
	[ -n "$pids" ] && kill -KILL $pids 2>/dev/null && sleep 0.5
	# deepest first, so that /dev/pts goes before /dev
	for m in $(mounts_under "$r" | sort -r); do
		umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
	done
	if [ -n "$(mounts_under "$r")" ]; then
		echo "fresh: still mounted under $r, not deleted:" >&2
		mounts_under "$r" >&2
		return 1
	fi
}

cleanup() {
	local rc=$? r ok=1
	# A second signal must not cut the cleanup short and leave mounts.
	trap '' INT TERM HUP
	trap - EXIT
	for r in "${roots[@]}"; do
		release_root "$r" || ok=0
		keep_downloads "$r"
	done
	if [ "${FRESH_KEEP:-0}" = 1 ] || [ $ok = 0 ]; then
		echo "fresh: roots kept in $work"
	else
		rm -rf --one-file-system "$work"
	fi
	exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# ---------------------------------------------------------- the roots

# Debian 12's repositories as this machine's apt knows them.
apt_sources() {
	apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' 'Identifier: Packages' |
		awk '$2 ~ /^bookworm/' | sort -u
}

# The base system, made once by debootstrap and kept as a tarball.
base_tarball() {
	local tar=$cache/bookworm-minbase.tar mirror tmp
	[ -s "$tar" ] && return
	command -v debootstrap >/dev/null || fail "debootstrap missing: bash t/lib/deps.sh"
	mirror=$(apt_sources | awk '$2 == "bookworm" { print $1; exit }')
	[ -n "$mirror" ] || fail "no Debian bookworm repository in this machine's apt configuration"
	say "debootstrap --variant=minbase bookworm from $mirror"
	mkdir -p "$cache"
	tmp=$work/debootstrap
	debootstrap --variant=minbase bookworm "$tmp" "$mirror" >"$work/debootstrap.log" 2>&1 ||
		{ tail -20 "$work/debootstrap.log"; fail "debootstrap"; }
	tar -C "$tmp" -cf "$tar.part" .
	mv "$tar.part" "$tar"
	rm -rf --one-file-system "$tmp"
}

# A fresh root at $work/$1, mounted and ready for chroot.
new_root() {
	local r=$work/$1
	mkdir -p "$r" "$cache/archives"
	tar -C "$r" -xf "$cache/bookworm-minbase.tar"
	roots+=("$r")
	apt_sources | awk '{ print "deb " $1 " " $2 " " $3 }' >"$r/etc/apt/sources.list"
	# What a machine has and a bare root lacks: names for loopback.
	printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$r/etc/hosts"
	cp /etc/resolv.conf "$r/etc/resolv.conf" 2>/dev/null || true
	# Packages must not start their services in the root (as in a container).
	printf '#!/bin/sh\nexit 101\n' >"$r/usr/sbin/policy-rc.d"
	chmod +x "$r/usr/sbin/policy-rc.d"
	mount -t proc proc "$r/proc"
	mount -t sysfs sysfs "$r/sys"
	mount --rbind /dev "$r/dev"
	mount --make-rslave "$r/dev"
	find "$cache/archives" -maxdepth 1 -name '*.deb' -exec cp -t "$r/var/cache/apt/archives" {} +
}

# What apt downloaded in root $1 goes to the cache for the next runs.
keep_downloads() {
	local d
	for d in "$1"/var/cache/apt/archives/*.deb; do
		[ -e "$d" ] && [ ! -e "$cache/archives/${d##*/}" ] && cp "$d" "$cache/archives/" || true
	done
}

# Runs a command as root in the root $1, with a login's environment. In
# the background, so that a signal to this script is handled at once (bash
# runs traps only between foreground commands); cleanup ends what it left.
in_root() {
	local r=$1
	shift
	chroot "$r" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
		PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		"$@" &
	wait $!
}

# The tree as committed, unpacked at $1.
put_source() {
	mkdir -p "$1"
	git -C "$top" archive HEAD | tar -x -C "$1"
}

# The first command of the README's quick start, as written there.
readme_first_command() {
	awk '/^## Quick start/ { q = 1 } q && /^```sh/ { getline; sub(/[ \t]*#.*/, ""); print; exit }' \
		"$top/README.md"
}

# ------------------------------------------------------------- checks

verdict='every refused payment compensated (stock released), every other order approved: yes'

check_demo() {
	local r=$work/a cmd
	cmd=$(readme_first_command)
	[ -n "$cmd" ] || fail "no command in the README's quick start"
	new_root a
	put_source "$r/root/sagad"
	if [ -n "$drop" ]; then
		say "first run of '$cmd' without $drop (must fail)"
		grep -q "^$drop " "$r/root/sagad/t/lib/packages.txt" || fail "$drop is not in t/lib/packages.txt"
		sed -i "/^$drop /d" "$r/root/sagad/t/lib/packages.txt"
		if in_root "$r" bash -c "cd /root/sagad && $cmd" >"$work/demo-broken.log" 2>&1; then
			fail "the demo passed without $drop: this check cannot see a missing package"
		fi
		say "failed as it must: $(grep -m1 -iE 'error|not found' "$work/demo-broken.log" || tail -1 "$work/demo-broken.log")"
		git -C "$top" show HEAD:t/lib/packages.txt >"$r/root/sagad/t/lib/packages.txt"
	fi
	say "'$cmd' in a fresh Debian 12 root"
	in_root "$r" bash -c "cd /root/sagad && $cmd" >"$work/demo.log" 2>&1 ||
		{ tail -40 "$work/demo.log"; fail "the README's first command failed in a fresh root"; }
	grep -qF "$verdict" "$work/demo.log" ||
		{ tail -40 "$work/demo.log"; fail "the demo did not end with its verdict"; }
	say "demo passed: $(grep -F 'completed' "$work/demo.log" | head -1 | tr -s ' ')"
}

check_package() {
	local a=$work/a b=$work/b ports
	[ -d "$a" ] || new_root a
	say "dpkg-buildpackage in the fresh root"
	put_source "$a/root/pkg/sagad"
	in_root "$a" bash -c 'cd /root/pkg/sagad && bash t/lib/deps.sh package &&
		dpkg-buildpackage -us -uc -b' >"$work/build.log" 2>&1 ||
		{ tail -40 "$work/build.log"; fail "dpkg-buildpackage"; }
	in_root "$a" bash -c 'cd /root/pkg && lintian --tag-display-limit 0 *.changes' \
		>"$work/lintian.txt" 2>&1 || true
	say "lintian: $(grep -c '^E:' "$work/lintian.txt" || true) errors, $(grep -c '^W:' "$work/lintian.txt" || true) warnings"
	cat "$work/lintian.txt"
	if grep -q '^E:' "$work/lintian.txt"; then fail "lintian reports errors"; fi

	new_root b
	mkdir -p "$b/root/debs"
	cp "$a"/root/pkg/*.deb "$b/root/debs/"
	cp "$top/t/lib/fresh-package.sh" "$b/root/"
	ports=$(python3 -c 'import socket
for i in range(4):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1], end=" ")')
	say "installing the package in a second fresh root"
	# shellcheck disable=SC2086
	in_root "$b" bash /root/fresh-package.sh $ports >"$work/package.log" 2>&1 ||
		{ tail -60 "$work/package.log"; fail "the package test"; }
	grep '^package:' "$work/package.log"
}

base_tarball
case $what in
all) check_demo; check_package ;;
demo) check_demo ;;
package) check_package ;;
esac
say "passed"
