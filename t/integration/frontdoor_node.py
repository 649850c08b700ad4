#!/usr/bin/env python3
"""The AMQP front door under Node.js's amqplib (t/lib/frontdoor_node.js):
a confirm channel (createConfirmChannel) publishes N messages through
sagad's amqp.listen in three runs on one connection, the broker stopped
after the first and started again after the second; every publish is
confirmed, and all arrive at a queue read straight from the broker, once
and in order. Then a consumer with channel.prefetch(5) through the front
door on a `deliver = "amqp"` subscription (written while that was being
added, with a skip for a sagad that refused it; the skip went once it
landed on main): every message once, in order, at most 5 unacked.

node and amqplib: t/lib/deps.sh installs them (amqplib from the npm
registry into SAGAD_NODE_DIR, default /var/cache/sagad-test/node). When
either is missing the test is skipped, except under CI (CI set in the
environment, as .ci/run's caller does), where it fails: there they are
part of what the suite promises to run."""

import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402

N = int(os.environ.get('SAGAD_FRONTDOOR_NODE_N', '200'))
PREFETCH = 5
CONSUME_N = 20
TOKEN = 'node-front-door-secret'
NODE_DIR = os.environ.get('SAGAD_NODE_DIR', '/var/cache/sagad-test/node')
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(h.__file__)), 'frontdoor_node.js')


def missing_tool(why):
    """Skipped on a developer's machine, a failure under CI."""
    if os.environ.get('CI', '') not in ('', '0', 'false'):
        raise AssertionError('%s, and CI is set: t/lib/deps.sh should have installed it' % why)
    raise h.Skip('%s (t/lib/deps.sh installs it)' % why)


def find_node():
    node = shutil.which('node') or shutil.which('nodejs')
    if node is None:
        missing_tool('node is not installed')
    modules = os.path.join(NODE_DIR, 'node_modules')
    if not os.path.isfile(os.path.join(modules, 'amqplib', 'package.json')):
        missing_tool('amqplib is not installed under %s' % modules)
    return node, dict(os.environ, NODE_PATH=modules)


def node_proc(node, env, *args):
    return subprocess.Popen([node, SCRIPT] + [str(a) for a in args], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def read_until(p, key, lines):
    """JSON lines of p appended to lines up to the first one with key."""
    while True:
        raw = p.stdout.readline()
        if not raw:
            raise AssertionError('node client ended early: %s'
                                 % p.stderr.read().decode(errors='replace')[-800:])
        line = json.loads(raw)
        lines.append(line)
        if key in line:
            return line


def relayed(d):
    m = h.parse_metrics(d.admin_get('/metrics')[1])
    return m.get('sagad_broker_connected') == 1 and m.get('sagad_outbox_pending') == 0


def publish_across_restart(node, env, url, broker, d):
    """Three runs on one confirm channel: broker up, down, up again."""
    p = node_proc(node, env, 'publish', url, N, 'node', 3)
    lines = []
    try:
        first = read_until(p, 'phase', lines)
        # Stopped with a publish in flight between sagad and the broker, the
        # broker may keep it without having confirmed it: sagad sends it
        # again (at least once, sagad(8)), and the check of "once" below
        # would fail for a reason this test is not about.
        h.wait_until(lambda: relayed(d), 60, 'the first run relayed to the broker')
        h.log('first run confirmed (%d) and relayed; stopping the broker'
              % first['confirmed'])
        broker.stop()
        p.stdin.write(b'go\n')
        p.stdin.flush()
        second = read_until(p, 'phase', lines)
        h.log('second run confirmed with the broker down (%d); starting it'
              % second['confirmed'])
        broker.start()
        p.stdin.write(b'go\n')
        p.stdin.flush()
        read_until(p, 'done', lines)
        p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, lines


def check_consumer(node, env, broker, tool, wd):
    """channel.prefetch(5) through the front door on a deliver = "amqp"
    subscription: every message once, in queue order, never more than 5
    unacked, the broker's queue empty after the acks."""
    port = h.free_port()
    dc = h.Sagad(wd, broker.url, name='nodec', token=TOKEN,
                 conf_extra='amqp = { listen = "127.0.0.1:%d"; };\n'
                 'subscriptions = ( { name = "in"; queue = "fdnode.in"; '
                 'queue_type = "classic"; deliver = "amqp"; } );' % port)
    dc.start()
    # sagad declares the queue (with its dead-letter arguments) at start
    h.wait_until(lambda: tool.run(broker.url, 'count', 'fdnode.in', check=False).returncode == 0,
                 30, 'sagad to declare fdnode.in', interval=0.2)
    tool.send(broker.url, '', 'fdnode.in', message_id='c-{n}', body='x', count=CONSUME_N)
    p = node_proc(node, env, 'consume', 'amqp://svc:%s@127.0.0.1:%d/%%2f' % (TOKEN, port),
                  'fdnode.in', CONSUME_N, PREFETCH)
    try:
        outp, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    lines = [json.loads(x) for x in outp.decode().splitlines() if x.strip()]
    res = lines[-1] if lines else {}
    h.check(p.returncode == 0 and 'got' in res,
            'the amqplib consumer ran (basic.consume accepted)',
            (p.returncode, res, err.decode(errors='replace')[-500:]))
    h.check(res['got'] == ['c-%d' % i for i in range(CONSUME_N)],
            'prefetch(%d): the %d messages consumed through the front door, once, in order'
            % (PREFETCH, CONSUME_N), res)
    h.check(res['max_unacked'] <= PREFETCH, 'never more than %d unacked (at most %d seen)'
            % (PREFETCH, res['max_unacked']), res)
    h.wait_until(lambda: tool.count(broker.url, 'fdnode.in') == 0, 30,
                 'the queue emptied by the acks')
    h.log('ok: the broker queue is empty after the acks')
    h.check(dc.stop() == 0, 'the consuming sagad: SIGTERM, exit 0')


def main(wd):
    node, env = find_node()
    broker = h.Broker(wd)
    broker.start()
    tool = h.AmqpTool()
    tool.declare_queue(broker.url, 'fdnode', [('events', 'node.#')])
    port = h.free_port()
    # reconnect_max: the broker comes back within seconds, not 30
    d = h.Sagad(wd, broker.url, name='orders', token=TOKEN, broker_extra='reconnect_max = 1;',
                conf_extra='amqp = { listen = "127.0.0.1:%d"; };' % port)
    d.start()
    url = 'amqp://svc:%s@127.0.0.1:%d/%%2f?heartbeat=10' % (TOKEN, port)

    rc, lines = publish_across_restart(node, env, url, broker, d)
    confirmed = [x['confirmed'] for x in lines if 'confirmed' in x and len(x) == 1]
    nacked = [x['nacked'] for x in lines if 'nacked' in x]
    h.check(rc == 0 and not nacked and sorted(confirmed, key=lambda x: int(x.split('-')[1])) ==
            ['node-%d' % i for i in range(N)],
            'amqplib confirm channel: %d publishes confirmed across a broker stop and start'
            % N, (rc, len(confirmed), nacked[:5]))

    h.wait_until(lambda: relayed(d), 120, 'sagad reconnected and its outbox drained')
    got = tool.consume(broker.url, 'fdnode', N + 1, timeout=10)
    ids = [m.get('message_id') for m in got]
    h.check(ids == ['node-%d' % i for i in range(N)],
            'at the broker: the %d messages once, in publish order' % N,
            (len(ids), sorted(set(i for i in ids if ids.count(i) > 1))[:5], ids[:3], ids[-3:]))
    m7 = next((m for m in got if m.get('message_id') == 'node-7'), {})
    h.check(json.loads(m7.get('body', '{}')).get('n') == 7 and m7.get('routing_key') == 'node.7',
            'body and routing key carried', m7)

    check_consumer(node, env, broker, tool, wd)
    h.check(d.stop() == 0, 'SIGTERM: exit 0')


h.run_test(main)
