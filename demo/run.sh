#!/bin/bash
# Quick start: installs what it needs, builds sagad, starts a private local
# RabbitMQ and runs the create-order saga across three services, each with
# its own sagad (see demo/demo.py). --trace: with an OpenTelemetry
# collector, each order's trace. --ui: stays up with the web page open.
# --2pc: the two-phase commit variant, stock at two warehouses. --amqp: the
# payment service keeps its RabbitMQ client (pika) and speaks AMQP to its
# sagad's front door instead of HTTP.
set -eu
cd "$(dirname "$0")/.."
bash t/lib/deps.sh demo
bash t/lib/build.sh
exec python3 demo/demo.py "$@"
