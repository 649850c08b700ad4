#!/bin/sh
# Stands in for the unit tests in a tree configured without cmocka.
echo "the unit tests need cmocka: apt-get install libcmocka-dev, then ./configure again" >&2
exit 1
