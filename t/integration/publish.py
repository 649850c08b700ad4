#!/usr/bin/env python3
"""The outbox end to end: 10,000 messages POSTed on one keep-alive
connection reach RabbitMQ in order with the contract's properties;
duplicates are answered 200 and sent once; the default exchange works;
metrics and admin JSON."""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402

N = int(os.environ.get('SAGAD_PUBLISH_N', '10000'))


def headers_for(i):
    hd = {'Content-Type': 'application/json'}
    if i % 2 == 0:
        hd['Message-Id'] = 'm-%d' % i
    if i % 3 == 0:
        hd['Correlation-Id'] = 'c-%d' % i
    if i % 5 == 0:
        hd['Causation-Id'] = 'cause-%d' % i
    if i % 7 == 0:
        hd['Amqp-Header-Foo'] = 'bar'
    if i % 11 == 0:
        hd['Amqp-Type'] = 'order.created'
    if i % 13 == 0:
        hd['Amqp-Expiration'] = '3600000'
    return hd


def main(wd):
    broker = h.Broker(wd)
    broker.start()
    tool = h.AmqpTool()
    tool.declare_queue(broker.url, 'pubq', [('events', '#')])
    tool.declare_queue(broker.url, 'direct.q', [])

    d = h.Sagad(wd, broker.url, name='orders')
    d.start()

    # -- 10,000 publishes
    t_start = time.time()
    ids = []
    first_headers = None
    for i in range(N):
        body = json.dumps({'n': i}).encode()
        st, doc, hdrs = d.publish('events', 'k.%d' % i, body, headers_for(i))
        if st != 202 or not isinstance(doc, dict) or doc.get('status') != 'stored':
            raise AssertionError('publish #%d: expected 202 {"status":"stored"}, got %d %r'
                                 % (i, st, doc))
        mid = doc.get('message_id')
        if i % 2 == 0:
            if mid != 'm-%d' % i:
                raise AssertionError('publish #%d: message_id %r, sent Message-Id m-%d'
                                     % (i, mid, i))
        elif not h.is_uuid7(mid, near=time.time()):
            raise AssertionError('publish #%d: generated message_id %r is not a current UUIDv7'
                                 % (i, mid))
        if first_headers is None:
            first_headers = hdrs
        ids.append(mid)
    dt = time.time() - t_start
    h.check(True, '%d POSTs answered 202 {"message_id","status":"stored"} (%.1fs, %.0f/s)'
            % (N, dt, N / dt))
    h.check('json' in first_headers.get('content-type', ''),
            '202 answer has a JSON Content-Type', first_headers.get('content-type'))
    gen = [m for i, m in enumerate(ids) if i % 2]
    h.check(len(set(gen)) == len(gen), 'generated message ids are unique')

    # -- duplicates
    st, doc, _ = d.publish('events', 'k.dup', b'again', {'Message-Id': 'm-0'})
    h.check(st == 200 and doc == {'message_id': 'm-0', 'status': 'duplicate'},
            'second POST of Message-Id m-0 answers 200 status duplicate', (st, doc))
    st1, doc1, _ = d.publish('events', 'dup.1', b'first', {'Message-Id': 'dup-1'})
    st2, doc2, _ = d.publish('events', 'dup.1', b'second', {'Message-Id': 'dup-1'})
    h.check(st1 == 202 and doc1.get('status') == 'stored', 'new Message-Id dup-1: 202 stored',
            (st1, doc1))
    h.check(st2 == 200 and doc2 == {'message_id': 'dup-1', 'status': 'duplicate'},
            'repeated Message-Id dup-1: 200 duplicate', (st2, doc2))

    # -- the default exchange
    st, doc, _ = d.publish('-', 'direct.q', b'to the queue', {'Message-Id': 'direct-1'})
    h.check(st == 202, 'POST /v1/publish/-/direct.q answers 202', (st, doc))

    # -- metrics
    total = N + 2

    def settled():
        m = d.metrics()
        return (m.get('sagad_published_total', 0) >= total
                and m.get('sagad_outbox_pending') == 0) and m
    m = h.wait_until(settled, 30, 'sagad_published_total >= %d and sagad_outbox_pending == 0'
                     % total)
    h.check(m['sagad_published_total'] >= N, 'sagad_published_total = %g (>= %d)'
            % (m['sagad_published_total'], N))
    h.check(m['sagad_outbox_pending'] == 0, 'sagad_outbox_pending back to 0')
    for name in ('sagad_outbox_oldest_age_seconds', 'sagad_broker_connected',
                 'sagad_store_bytes', 'sagad_publish_confirm_seconds_count'):
        h.check(name in m, 'metric %s present (%s)' % (name, m.get(name)))
    h.check(m.get('sagad_broker_connected') == 1, 'sagad_broker_connected is 1')

    # -- read back (everything is confirmed by now: a short idle timeout)
    t0 = time.time()
    msgs = tool.consume(broker.url, 'pubq', N + 100, timeout=3)
    h.log('consumed %d messages from pubq in %.1fs' % (len(msgs), time.time() - t0))
    main_msgs = [m for m in msgs if m.get('routing_key', '').startswith('k.')]
    extra = [m for m in msgs if not m.get('routing_key', '').startswith('k.')]
    h.check(len(main_msgs) == N, 'all %d messages on the wire exactly once' % N,
            'got %d (k.* routing keys)' % len(main_msgs))
    keys = [m['routing_key'] for m in main_msgs]
    h.check(keys == ['k.%d' % i for i in range(N)], 'in the order they were accepted',
            'first difference at %s' % next((j for j, k in enumerate(keys) if k != 'k.%d' % j),
                                            None))
    now = time.time()
    for i, m in enumerate(main_msgs):
        hd = headers_for(i)
        want = {
            'exchange': 'events',
            'delivery_mode': 2,
            'message_id': ids[i],
            'app_id': 'orders',
            'content_type': 'application/json',
            'body': json.dumps({'n': i}),
        }
        if 'Correlation-Id' in hd:
            want['correlation_id'] = hd['Correlation-Id']
        if 'Amqp-Type' in hd:
            want['type'] = hd['Amqp-Type']
        if 'Amqp-Expiration' in hd:
            want['expiration'] = hd['Amqp-Expiration']
        for k, v in want.items():
            if m.get(k) != v:
                raise AssertionError('message k.%d: %s is %r, expected %r; message: %r'
                                     % (i, k, m.get(k), v, m))
        ts = m.get('timestamp')
        if not isinstance(ts, int) or not (t_start - 5 <= ts <= now + 5):
            raise AssertionError('message k.%d: timestamp %r not between %d and %d (%r)'
                                 % (i, ts, t_start - 5, now + 5, m))
        headers = m.get('headers') or {}
        if 'Causation-Id' in hd and headers.get('x-causation-id') != hd['Causation-Id']:
            raise AssertionError('message k.%d: header x-causation-id %r, expected %r (%r)'
                                 % (i, headers.get('x-causation-id'), hd['Causation-Id'], m))
        if 'Amqp-Header-Foo' in hd and headers.get('foo') != 'bar':
            raise AssertionError('message k.%d: header foo %r, expected "bar" (%r)'
                                 % (i, headers.get('foo'), m))
        if 'Amqp-Header-Foo' not in hd and 'foo' in headers:
            raise AssertionError('message k.%d: header foo present but not sent (%r)' % (i, m))
    h.check(True, 'every message: delivery_mode 2, message_id, app_id=orders, timestamp, '
            'content_type, correlation_id, x-causation-id, foo, type, expiration as sent')

    dups = [m for m in extra if m.get('message_id') in ('m-0', 'dup-1')]
    h.check(len([m for m in dups if m['message_id'] == 'dup-1']) == 1,
            'dup-1 on the wire exactly once', dups)
    h.check(not [m for m in dups if m['message_id'] == 'm-0'],
            'the duplicate of m-0 was not sent again', dups)
    h.check(not [m for m in extra if m.get('message_id') not in ('dup-1',)],
            'nothing else on pubq', [m for m in extra if m.get('message_id') != 'dup-1'][:3])
    if dups:
        h.check(dups[0].get('body') == 'first', 'dup-1 carries the first body', dups[0])

    dq = tool.consume(broker.url, 'direct.q', 10, timeout=2)
    h.check(len(dq) == 1 and dq[0].get('body') == 'to the queue'
            and dq[0].get('exchange') == '' and dq[0].get('routing_key') == 'direct.q',
            'default exchange "-": delivered to queue direct.q', dq)

    # -- admin JSON
    for path in ('/v1/admin/status', '/v1/admin/outbox'):
        st, text = d.admin_get(path)
        h.check(st == 200, 'GET %s answers 200' % path, (st, text[:200]))
        try:
            doc = json.loads(text)
        except ValueError:
            raise AssertionError('GET %s: not JSON: %r' % (path, text[:300]))
        h.check(isinstance(doc, (dict, list)), 'GET %s returns JSON: %s'
                % (path, json.dumps(doc)[:150]))
    st, _ = d.admin_get('/healthz')
    h.check(st == 200, '/healthz 200')
    st, _ = d.admin_get('/readyz')
    h.check(st == 200, '/readyz 200')

    rc = d.stop()
    h.check(rc == 0, 'SIGTERM: exit 0', rc)


h.run_test(main)
