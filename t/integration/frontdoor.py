#!/usr/bin/env python3
"""The AMQP front door (issue 17, first slice): pika publishes with
confirms to sagad's amqp.listen while the broker is down; every confirm
means durable in sagad, and once the broker is up every message arrives in
order, once, with its properties; a full store nacks. A wrong password is refused with 403, an
unsupported method closes its channel with 540 naming it, a client speaking
another protocol gets the AMQP header back, and a SIGKILL during a
confirmed stream loses no confirmed message."""

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402

N = int(os.environ.get('SAGAD_FRONTDOOR_N', '300'))
TOKEN = 'front-door-secret'
PY = h.Pika.PYTHON
CLIENT = os.path.join(os.path.dirname(os.path.abspath(h.__file__)), 'frontdoor_client.py')


def client(*args, timeout=120):
    r = subprocess.run([PY, CLIENT] + [str(a) for a in args], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    lines = [json.loads(l) for l in r.stdout.decode().splitlines() if l.strip()]
    return r.returncode, lines, r.stderr.decode(errors='replace')


def amqp_publish(url, lines):
    """rabbitmq-c's amqp-publish (Debian amqp-tools), one message a line,
    no confirms: None when it is not installed."""
    exe = shutil.which('amqp-publish')
    if not exe:
        return None
    r = subprocess.run([exe, '-u', url, '-e', 'events', '-r', 'fd.tools', '-p', '-l',
                        '-H', 'x-tool: amqp-publish'],
                       input=''.join(l + '\n' for l in lines).encode(),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    return r.returncode, r.stderr.decode(errors='replace')


def raw_frame_error(port):
    """A client that sends a frame whose frame-end is not 0xCE after the
    protocol header: the reply code of sagad's connection.close."""
    s = socket.create_connection(('127.0.0.1', port), timeout=10)
    s.sendall(b'AMQP\x00\x00\x09\x01')
    s.sendall(struct.pack('>BHI', 1, 0, 4) + b'\x00\x0a\x00\x0b' + b'\xcd')
    got = b''
    while True:
        b = s.recv(4096)
        if not b:
            break
        got += b
    s.close()
    codes = []
    while len(got) >= 7:	# frames: type, channel, size, payload, 0xCE
        t, ch, n = struct.unpack('>BHI', got[:7])
        payload = got[7:7 + n]
        if t == 1 and payload[:4] == b'\x00\x0a\x00\x32':	# connection.close
            codes.append(struct.unpack('>H', payload[4:6])[0])
        got = got[8 + n:]
    return codes


def garbage_header(port):
    s = socket.create_connection(('127.0.0.1', port), timeout=10)
    s.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
    got = b''
    while True:
        b = s.recv(64)
        if not b:
            break
        got += b
    s.close()
    return got


def main(wd):
    h.Pika('amqp://unused')		# Skip without python3-pika
    broker = h.Broker(wd)
    broker.start()
    tool = h.AmqpTool()
    tool.declare_queue(broker.url, 'fdq', [('events', 'fd.#')])
    broker.stop()

    port = h.free_port()
    # reconnect_max: the broker comes back within seconds, not 30
    d = h.Sagad(wd, broker.url, name='orders', token=TOKEN, broker_extra='reconnect_max = 1;',
                conf_extra='amqp = { listen = "127.0.0.1:%d"; };' % port)
    d.start(wait_ready=False)
    url = 'amqp://svc:%s@127.0.0.1:%d/%%2f?heartbeat=10' % (TOKEN, port)

    # -- broker down: confirms come from sagad's store
    t0 = time.time()
    rc, lines, err = client('publish', url, N, 'down')
    confirmed = [l['confirmed'] for l in lines if 'confirmed' in l]
    h.check(rc == 0 and confirmed == ['down-%d' % i for i in range(N)],
            '%d persistent publishes confirmed by the front door with the broker down (%.1fs)'
            % (N, time.time() - t0), (rc, len(confirmed), err[-500:]))
    pending = h.parse_metrics(d.admin_get('/metrics')[1])
    h.check(pending.get('sagad_outbox_pending', 0) >= N, 'all %d in the outbox' % N,
            pending.get('sagad_outbox_pending'))
    h.check(pending.get('sagad_amqp_acks_total') == N, 'sagad_amqp_acks_total %d' % N,
            pending.get('sagad_amqp_acks_total'))

    tools = amqp_publish(url.split('?')[0], ['tools-%d' % i for i in range(3)])
    if tools is None:
        h.log('amqp-publish not installed (amqp-tools): its part skipped')
    else:
        h.check(tools[0] == 0, "rabbitmq-c's amqp-publish publishes 3 lines", tools)

    # -- refusals
    rc, lines, err = client('login', 'amqp://svc:wrong@127.0.0.1:%d/%%2f' % port)
    h.check(lines and lines[0].get('ok') is False and
            ('403' in lines[0].get('text', '') or 'ACCESS_REFUSED' in lines[0].get('text', '')
             or 'Authentication' in lines[0].get('error', '')),
            'wrong password: login refused with ACCESS_REFUSED', (lines, err[-300:]))
    for method in ('basic.get', 'tx.select'):
        rc, lines, err = client('refuse', url, method)
        h.check(rc == 0 and lines and lines[0].get('code') == 540 and
                method in lines[0].get('text', ''),
                '%s: channel closed 540 naming the method' % method, (lines, err[-300:]))
        h.check(any(l.get('after') for l in lines),
                '%s: the connection goes on (a new channel publishes)' % method, lines)
    h.check(garbage_header(port) == b'AMQP\x00\x00\x09\x01',
            'an HTTP request gets the AMQP 0-9-1 protocol header back, then close')
    h.check(raw_frame_error(port) == [501],
            'a frame-end other than 0xCE: connection.close 501 FRAME_ERROR, then EOF')
    h.check('method not implemented' in d.log(), 'the refusals are logged')

    # -- broker up: all arrive, in order, once
    broker.start()

    def drained():
        m = h.parse_metrics(d.admin_get('/metrics')[1])
        return m.get('sagad_broker_connected') == 1 and m.get('sagad_outbox_pending') == 0
    h.wait_until(drained, 120, 'sagad reconnected and its outbox drained')
    # N, the 2 after the refusals, amqp-publish's 3 (and a duplicate or more
    # would be found by the wait of 10 s)
    got = tool.consume(broker.url, 'fdq', N + 2 + (3 if tools is not None else 0) + 1,
                       timeout=10)
    ids = [m.get('message_id') for m in got]
    down = [i for i in ids if i.startswith('down-')]
    h.check(down == ['down-%d' % i for i in range(N)],
            'broker up: the %d messages arrive in order, once' % N,
            (len(down), down[:5], [x for x in ids if not x.startswith('down-')][:5]))
    first = next((m for m in got if m.get('message_id') == 'down-7'), {})
    h.check(json.loads(first.get('body', '{}')).get('n') == 7 and
            first.get('routing_key') == 'fd.7',
            'body and routing key carried', first)
    h.check(sorted(i for i in ids if i.startswith('after-')) ==
            ['after-basic.get', 'after-tx.select'],
            'the publishes after a refusal arrive too', ids[-5:])

    if tools is not None:
        tm = [m for m in got if m.get('routing_key') == 'fd.tools']
        h.check([m.get('body', '').rstrip('\n') for m in tm] == ['tools-0', 'tools-1', 'tools-2'] and
                all(h.is_uuid7(m.get('message_id'), near=time.time()) for m in tm),
                "amqp-publish's 3 messages arrive in order, with generated UUIDv7 ids", tm)
        h.check(all((m.get('headers') or {}).get('x-tool') == 'amqp-publish' for m in tm),
                'its header carried', tm[:1])

    # -- SIGKILL during a confirmed stream: every confirmed message arrives
    p = subprocess.Popen([PY, CLIENT, 'publish', url, '5000', 'kill'], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    confirmed = []
    while len(confirmed) < 400:
        line = p.stdout.readline()
        if not line:
            break
        confirmed.append(json.loads(line)['confirmed'])
    d.kill()
    for line in p.stdout:
        confirmed.append(json.loads(line)['confirmed'])
    p.wait(30)
    h.check(400 <= len(confirmed) < 5000, 'SIGKILL during the stream: %d confirmed before it'
            % len(confirmed), len(confirmed))
    d.start()
    got = tool.consume(broker.url, 'fdq', 5000, timeout=10)
    ids = [m.get('message_id') for m in got]
    missing = set(confirmed) - set(ids)
    h.check(not missing, 'after the restart every confirmed message arrived (%d of %d)'
            % (len(confirmed) - len(missing), len(confirmed)), sorted(missing)[:5])
    seen = []
    for i in ids:
        if i not in seen:
            seen.append(i)
    h.check(seen == sorted(seen, key=lambda x: int(x.split('-')[1])),
            'in publish order (first arrivals)', seen[:10])
    # -- a pipelined confirm stream (pika's SelectConnection): every tag
    # settled once, in order, runs of them by one basic.ack with multiple
    P = 2000
    rc, lines, err = client('pipeline', url, P)
    acks = lines[0]['acks'] if lines else []
    covered, in_order = 0, True
    for name, tag, multiple in acks:
        in_order = in_order and name == 'Basic.Ack' and tag > covered and (multiple or
                                                                          tag == covered + 1)
        covered = tag
    h.check(rc == 0 and in_order and covered == P,
            'SelectConnection, %d publishes at once: acked in order, each once' % P,
            (rc, acks[:5], err[-300:]))
    h.check(len(acks) < P, 'multiple=true acks: %d frames for %d publishes' % (len(acks), P),
            len(acks))

    # -- heartbeats both ways, channel.flow
    rc, lines, err = client('heartbeat', url.split('?')[0])
    h.check(lines[:1] == [{'alive': True}],
            "heartbeat=1: alive after 4 s of pika's heartbeats; channel.flow answered",
            (lines, err[-300:]))
    h.check(len(lines) > 1 and lines[1].get('dropped') is True,
            'a client silent for two heartbeat intervals is dropped', lines)
    h.check('missed two heartbeats' in d.log(), 'and that is logged')

    rc = d.stop()
    h.check(rc == 0, 'SIGTERM: exit 0', rc)

    # -- a store that refuses (full): basic.nack, nothing acked
    port2 = h.free_port()
    tiny = h.Sagad(wd, broker.url, name='tiny', store_extra='max_bytes = 65536;',
                   conf_extra='amqp = { listen = "127.0.0.1:%d"; };' % port2)
    tiny.start(wait_ready=False)   # a full store is not ready
    rc, lines, err = client('big', 'amqp://x:y@127.0.0.1:%d/%%2f' % port2, 20, 20000)
    h.check(rc == 0 and lines and lines[0]['nacked'] > 0 and
            lines[0]['acked'] + lines[0]['nacked'] == 20,
            'store full: basic.nack (no token: any credentials)', (lines, err[-300:]))
    m = h.parse_metrics(tiny.admin_get('/metrics')[1])
    h.check(m.get('sagad_amqp_nacks_total') == lines[0]['nacked'] and
            m.get('sagad_amqp_acks_total') == lines[0]['acked'],
            'sagad_amqp_nacks_total and _acks_total agree', m.get('sagad_amqp_nacks_total'))


h.run_test(main)
