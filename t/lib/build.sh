#!/bin/bash
# Builds sagad in place (demo/run.sh and t/run.sh): generates the build
# system and configures the tree first when needed. What an interrupted or
# failed earlier run left behind is made again, never trusted: configure
# counts as generated only once autoreconf finished (its stamp), and the
# Makefile only once configure finished (its stamp). ./configure takes
# this script's arguments.
set -eu
cd "$(dirname "$0")/../.."
gen=build-aux/autoreconf.stamp
conf=build-aux/configure.stamp
if [ ! -f $gen ] || [ ! -x configure ] || [ configure.ac -nt $gen ] || [ Makefile.am -nt $gen ]; then
	rm -f $gen $conf
	autoreconf -fi
	touch $gen
fi
if [ ! -f $conf ] || [ ! -f Makefile ] || [ configure -nt $conf ]; then
	rm -f $conf
	./configure "$@"
	touch $conf
fi
make -j"$(nproc)"
