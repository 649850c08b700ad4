#!/usr/bin/env python3
"""The AMQP front door passes topology through (issue 17, part 3): pika
declares, binds, purges, unbinds and deletes exchanges and queues through
sagad's amqp.listen, and the same checks made on the broker directly with
pika see the result; the broker's errors (406 for a redeclare with other
arguments, 404 for a passive declare of a missing queue) come back with
the code and text the broker gives to a direct client; a server-named
queue gets the broker's name; basic.qos is answered; with the broker down a
topology call closes the connection with 320 CONNECTION_FORCED within the
connect timeout, and publishing goes on."""

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402

TOKEN = 'front-door-secret'
PY = h.Pika.PYTHON
CLIENT = os.path.join(os.path.dirname(os.path.abspath(h.__file__)), 'frontdoor_client.py')


def topo(url, *ops, timeout=120):
    """The calls, in order on one connection: one dict per call."""
    r = subprocess.run([PY, CLIENT, 'topo', url, json.dumps(ops)], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    lines = [json.loads(l) for l in r.stdout.decode().splitlines() if l.strip()]
    if len(lines) < len(ops) and not (lines and lines[-1].get('connection')):
        h.log('client stderr: ' + r.stderr.decode(errors='replace')[-800:])
    return lines


def main(wd):
    h.Pika('amqp://unused')		# Skip without python3-pika
    broker = h.Broker(wd)
    broker.start()
    direct = broker.url
    port = h.free_port()
    d = h.Sagad(wd, broker.url, name='orders', token=TOKEN,
                conf_extra='amqp = { listen = "127.0.0.1:%d"; };' % port)
    d.start()
    fd = 'amqp://svc:%s@127.0.0.1:%d/%%2f' % (TOKEN, port)

    # -- declare and bind through the front door; seen on the broker
    r = topo(fd, ['xdecl', 'fdt.x', 'topic'], ['qdecl', 'fdt.q', {'durable': True}],
             ['bind', 'fdt.q', 'fdt.x', 'k.#'], ['qos', 10])
    h.check([l.get('ok') for l in r] == [True] * 4,
            'exchange.declare, queue.declare, queue.bind, basic.qos answered', r)
    h.check(r[1].get('queue') == 'fdt.q' and r[1].get('messages') == 0 and
            r[1].get('consumers') == 0, "queue.declare-ok: the broker's name and counts", r[1:2])
    r = topo(direct, ['xdecl_passive', 'fdt.x'], ['qdecl', 'fdt.q', {'passive': True}],
             ['publish', 'fdt.x', 'k.1', 'direct-1'], ['publish', 'fdt.x', 'k.2', 'direct-2'],
             ['publish', 'fdt.x', 'other', 'direct-3'])
    h.check([l.get('ok') for l in r] == [True] * 5, 'on the broker: the exchange and queue exist', r)

    def queued():
        return h.AmqpTool().count(direct, 'fdt.q') == 2
    h.wait_until(queued, 20, 'on the broker: the binding routes k.# to fdt.q (2 of 3 messages)')

    # -- message counts and purge come from the broker
    r = topo(fd, ['qdecl', 'fdt.q', {'passive': True}], ['purge', 'fdt.q'])
    h.check(r[0].get('messages') == 2, 'passive queue.declare-ok: message_count 2', r)
    h.check(r[1].get('ok') and r[1].get('messages') == 2, 'queue.purge-ok: message_count 2', r)
    h.check(h.AmqpTool().count(direct, 'fdt.q') == 0, 'on the broker: fdt.q is empty')

    # -- the broker's errors, exactly as it gives them to a direct client
    errs = (['qdecl', 'fdt.q', {'durable': True, 'arguments': {'x-max-length': 5}}],
            ['qdecl', 'fdt.missing', {'passive': True}],
            ['xdecl', 'fdt.x', 'fanout'],
            ['qdecl', 'fdt.q', {'passive': True}])
    want = topo(direct, *errs)
    got = topo(fd, *errs)
    h.check(want[0].get('code') == 406 and got[0] == want[0],
            'a redeclare with other arguments: 406 PRECONDITION_FAILED, same text',
            (got[:1], want[:1]))
    h.check(want[1].get('code') == 404 and got[1] == want[1],
            'a passive declare of a missing queue: 404 NOT_FOUND, same text', (got[1:2], want[1:2]))
    h.check(want[2].get('code') == 406 and got[2] == want[2],
            'an exchange redeclared with another type: 406, same text', (got[2:3], want[2:3]))
    h.check(got[3].get('ok') is True,
            'after three channel errors the next call works (a fresh broker channel)', got[3:])
    log = d.log()
    h.check('broker refused a topology call' in log and 'PRECONDITION_FAILED' in log,
            'the refusals are logged')
    h.check('topology call passed to the broker' in log, 'the forwarded calls are logged (debug)')

    # -- a server-named queue
    r = topo(fd, ['qdecl', '', {'durable': False, 'auto_delete': False}])
    name = r[0].get('queue', '') if r else ''
    h.check(name.startswith('amq.gen-'), 'a server-named queue: the broker names it', r)
    r = topo(direct, ['qdecl', name, {'passive': True}])
    h.check(r and r[0].get('ok') is True, 'on the broker: %s exists' % name, r)

    # -- unbind and delete
    r = topo(fd, ['unbind', 'fdt.q', 'fdt.x', 'k.#'], ['qdel', 'fdt.q'], ['qdel', name],
             ['xdel', 'fdt.x'])
    h.check([l.get('ok') for l in r] == [True] * 4,
            'queue.unbind, queue.delete (twice), exchange.delete answered', r)
    r = topo(direct, ['qdecl', 'fdt.q', {'passive': True}], ['qdecl', name, {'passive': True}],
             ['xdecl_passive', 'fdt.x'])
    h.check([l.get('code') for l in r] == [404] * 3, 'on the broker: all three are gone', r)
    m = h.parse_metrics(d.admin_get('/metrics')[1])
    h.check(m.get('sagad_amqp_topology_calls_total') == 14,
            'sagad_amqp_topology_calls_total counts the 14 calls passed through',
            m.get('sagad_amqp_topology_calls_total'))

    # -- the broker down: 320 CONNECTION_FORCED, bounded; publishing goes on
    broker.stop()
    t0 = time.time()
    r = topo(fd, ['qos', 5], ['qdecl', 'fdt.down', {'durable': True}])
    took = time.time() - t0
    h.check(len(r) == 2 and r[0].get('ok') is True and r[1].get('connection') is True and
            r[1].get('code') == 320 and 'CONNECTION_FORCED' in r[1].get('text', '') and
            'queue.declare' in r[1].get('text', ''),
            'broker down: queue.declare closes the connection with 320 CONNECTION_FORCED', r)
    h.check(took < 20, 'and that within the connect timeout (%.1f s)' % took, took)
    h.check('broker unreachable' in d.log(), 'and is logged')
    h.check('closed while idle' in d.log(),
            'the topology connection the broker closed was noticed before the call')
    r = topo(fd, ['publish', '', 'fdt.later', 'after-down'])
    h.check(r and r[0].get('ok') is True, 'broker down: publishing through the front door goes on', r)

    rc = d.stop()
    h.check(rc == 0, 'SIGTERM: exit 0', rc)


h.run_test(main)
