#!/usr/bin/env python3
"""Every error answer of the publish API (CONTRACT section 4) with its JSON
body, then malformed and hostile input: sagad stays up, keeps accepting, and
delivers what it stored before."""

import os
import random
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402


def expect_error(resp, status, what):
    st, doc, hdrs = resp
    ok = (st == status and isinstance(doc, dict) and isinstance(doc.get('error'), str)
          and doc.get('error') != '' and isinstance(doc.get('message'), str))
    h.check(ok, '%s: %d {"error":..,"message":..}' % (what, status),
            'got %s %r' % (st, doc))
    h.check('json' in hdrs.get('content-type', ''), '%s: JSON Content-Type' % what,
            hdrs.get('content-type'))
    return doc


def expect_stored(resp, what):
    st, doc, _ = resp
    h.check(st == 202 and isinstance(doc, dict) and doc.get('status') == 'stored',
            '%s: 202 stored' % what, 'got %s %r' % (st, doc))
    return doc['message_id']


def alive(d, what):
    st, _ = d.admin_get('/healthz')
    h.check(st == 200, 'after %s: /healthz 200' % what, st)
    h.check(d.running(), 'after %s: sagad process still running' % what)


def status_of(reply):
    """HTTP status code of a raw reply, or None."""
    try:
        first = reply.split(b'\r\n', 1)[0].split()
        return int(first[1]) if first[0].startswith(b'HTTP/') else None
    except (IndexError, ValueError):
        return None


def main(wd):
    rnd = random.Random(1234)
    broker = h.Broker(wd)
    broker.start()
    tool = h.AmqpTool()
    tool.declare_queue(broker.url, 'errq', [('events', '#')])
    accepted = set()

    # ---------------------------------------------------------- daemon A
    a = h.Sagad(wd, broker.url, name='alpha', api_extra='max_message_bytes = 1024;')
    a.start()

    accepted.add(expect_stored(a.publish('events', 'ok.1', b'x', {'Message-Id': 'ok-1'}),
                               'valid publish'))
    accepted.add(expect_stored(a.publish('events', 'ok.empty', b'', {'Message-Id': 'ok-empty'}),
                               'empty body'))
    accepted.add(expect_stored(a.publish('events', 'ok.1024', b'b' * 1024,
                                         {'Message-Id': 'ok-1024'}),
                               'body of exactly max_message_bytes (1024)'))
    mid255 = 'i' * 255
    accepted.add(expect_stored(a.publish('events', 'ok.255', b'x', {'Message-Id': mid255}),
                               'Message-Id of 255 bytes'))
    st, body, hd = a.request('POST', '/v1/publish/ev%65nts/a%2Fb', b'pct',
                             {'Message-Id': 'ok-pct'})
    h.check(st == 202, 'percent-encoded names (ev%65nts/a%2Fb) accepted', (st, body))
    accepted.add('ok-pct')

    # 400
    expect_error(a.publish('bad name', 'k'), 400, 'exchange name with a space')
    expect_error(a.publish('x' * 256, 'k'), 400, 'exchange name of 256 bytes')
    expect_error(a.publish('nosuch', 'k'), 400, 'unknown exchange (exchanges configured)')
    expect_error(a.publish('events', 'r' * 256), 400, 'routing key of 256 bytes')
    expect_error(a.publish('events', 'k', b'x', {'Amqp-Expiration': 'abc'}), 400,
                 'Amqp-Expiration: abc')
    expect_error(a.publish('events', 'k', b'x', {'Amqp-Expiration': '-5'}), 400,
                 'Amqp-Expiration: -5')
    expect_error(a.publish('events', 'k', b'x', {'Message-Id': 'i' * 256}), 400,
                 'Message-Id of 256 bytes')
    expect_error(a.publish('events', 'k', b'x', {'Correlation-Id': 'c' * 256}), 400,
                 'Correlation-Id of 256 bytes')
    # 404
    st, body, hd = a.request('GET', '/nope')
    expect_error((st, _json(body), hd), 404, 'GET /nope')
    st, body, hd = a.request('POST', '/v1/other/events/k', b'x')
    expect_error((st, _json(body), hd), 404, 'POST /v1/other/events/k')
    # 405
    for method in ('GET', 'PUT', 'DELETE'):
        st, body, hd = a.request(method, '/v1/publish/events/k')
        expect_error((st, _json(body), hd), 405, '%s on the publish path' % method)
        h.check('POST' in hd.get('allow', ''), '%s on the publish path: Allow: POST' % method,
                hd.get('allow'))
    # 413
    expect_error(a.publish('events', 'k', b'b' * 1025, {'Message-Id': 'too-big-1'}), 413,
                 'body of 1025 bytes (max_message_bytes 1024)')
    expect_error(a.publish('events', 'k', b'b' * 65536, {'Message-Id': 'too-big-2'}), 413,
                 'body of 64 KiB (max_message_bytes 1024)')
    alive(a, 'the error answers')

    # ---------------------------------------------------------- hostile input
    # Confirmed first: a confirm lost with the broker's stop would make the
    # message go out again after it, and "each once" below false.
    h.wait_until(lambda: a.metric('sagad_outbox_pending') == 0, 30, 'all confirmed')
    broker.stop()
    for i in range(50):
        accepted.add(_stored_quiet(a.publish('events', 'pre.%d' % i, b'pre %d' % i,
                                             {'Message-Id': 'pre-%d' % i}), 'pre-%d' % i))
    h.check(True, 'broker down: 50 messages stored (202)')
    a.close()

    port = a.port
    r = h.raw_request(port, b'\x00\xff\x13GARBAGE\x7f\r\n\r\n', read_timeout=3)
    h.log('garbage request line -> %r' % r[:60])
    alive(a, 'garbage bytes')

    r = h.raw_request(port, b'POST /v1/publish/events/half HTTP/1.1\r\nHost: x\r\n'
                      b'Content-Length: 10\r\nMessage-Id: half-1\r\n', read_timeout=1,
                      close_write=True)
    h.log('half request (headers without end, then close) -> %r' % r[:60])
    alive(a, 'a half request')

    big = (b'POST /v1/publish/events/big HTTP/1.1\r\nHost: x\r\nX-Big: ' + b'a' * 1000000
           + b'\r\nContent-Length: 1\r\n\r\nx')
    r = h.raw_request(port, big, read_timeout=5)
    st = status_of(r)
    h.log('1 MB header -> %r' % r[:80])
    h.check(st is None or 400 <= st < 500, 'a 1 MB header is refused (4xx or closed)', st)
    alive(a, 'a huge header')

    r = h.raw_request(port, b'POST /v1/publish/events/short HTTP/1.1\r\nHost: x\r\n'
                      b'Message-Id: short-body\r\nContent-Length: 100\r\n\r\nabc',
                      read_timeout=1, close_write=True)
    h.log('body shorter than Content-Length, then close -> %r' % r[:60])
    alive(a, 'a short body')

    for i in range(20):
        r = h.raw_request(port, bytes(rnd.getrandbits(8) for _ in range(5000)), read_timeout=0.5)
    r = h.raw_request(port, os.urandom(1 << 20), read_timeout=2)
    # a valid request (5 bytes of body) followed by garbage: the request
    # itself may be stored
    r = h.raw_request(port, b'POST /v1/publish/events/cl5 HTTP/1.1\r\nHost: x\r\n'
                      b'Message-Id: cl5\r\nContent-Length: 5\r\n\r\n' + os.urandom(3000),
                      read_timeout=1)
    h.log('valid request + 3000 random bytes -> %r' % r[:40])
    # Stored or not (its 202 may come after the 1 s read): the same id
    # again is 200 if it was, 202 if not; stored either way now.
    st, doc, _ = a.publish('events', 'cl5', b'again', {'Message-Id': 'cl5'})
    h.check(st in (200, 202), 'cl5: its id again is 200 (stored) or 202 (new)', (st, doc))
    accepted.add('cl5')
    r = h.raw_request(port, b'POST /v1/publish/events/x HTTP/1.1\r\nHost: x\r\n'
                      b'Transfer-Encoding: chunked\r\nMessage-Id: chunky\r\n\r\n'
                      b'zz\r\nnot hex\r\n', read_timeout=1)
    r = h.raw_request(port, b'POST /v1/publish/events/x HTTP/1.1\r\nHost: x\r\n'
                      b'Content-Length: -1\r\nMessage-Id: neg\r\n\r\n', read_timeout=1)
    r = h.raw_request(port, b'POST /v1/publish/events/x HTTP/1.1\r\nHost: x\r\n'
                      b'Content-Length: 99999999999999999999999\r\nMessage-Id: huge-cl\r\n\r\n',
                      read_timeout=1)
    r = h.raw_request(a.admin_port, os.urandom(20000), read_timeout=1)
    r = h.raw_request(a.admin_port, b'GET /' + b'a' * 100000 + b' HTTP/1.1\r\n\r\n',
                      read_timeout=2)
    h.log('random bytes to the API and admin ports sent')
    alive(a, 'random bytes')

    # many idle connections do not stop others from being served
    idle = [socket.create_connection(('127.0.0.1', port), 5) for _ in range(200)]
    try:
        accepted.add(expect_stored(a.publish('events', 'idle.1', b'x', {'Message-Id': 'idle-1'}),
                                   'publish while 200 idle connections are open'))
    finally:
        for s in idle:
            s.close()
    a.close()
    alive(a, 'idle connections')

    # the short body was not stored: the same id is new
    accepted.add(expect_stored(a.publish('events', 'short', b'complete',
                                         {'Message-Id': 'short-body'}),
                               'Message-Id of the cut request is still new'))
    broker.start()
    accepted.add(expect_stored(a.publish('events', 'post.1', b'after', {'Message-Id': 'post-1'}),
                               'publish after the hostile input'))

    def drained():
        m = a.metrics()
        return m.get('sagad_outbox_pending') == 0
    h.wait_until(drained, 90, 'sagad_outbox_pending == 0 after the broker came back')
    msgs = tool.consume(broker.url, 'errq', 1000, timeout=5)
    got = [m.get('message_id') for m in msgs]
    h.check(set(got) == accepted, 'exactly the %d accepted messages reached the broker'
            % len(accepted), 'missing %s, unexpected %s'
            % (sorted(accepted - set(got))[:10],
               [m for m in msgs if m.get('message_id') not in accepted][:5]))
    h.check(len(got) == len(set(got)), 'each once', len(got))
    pct = [m for m in msgs if m.get('message_id') == 'ok-pct']
    h.check(pct and pct[0].get('exchange') == 'events' and pct[0].get('routing_key') == 'a/b',
            'percent-decoded exchange and routing key on the wire', pct)
    h.check(all(len(m.get('body', '')) <= 1024 for m in msgs), 'no oversized body was sent')

    # ---------------------------------------------------------- daemon B: token
    b = h.Sagad(wd, broker.url, name='beta', token='s3cret-token')
    b.start()
    expect_error(b.publish('events', 'k', b'x', {'Authorization': None}), 401, 'no token')
    expect_error(b.publish('events', 'k', b'x', {'Authorization': 'Bearer wrong'}), 401,
                 'wrong token')
    expect_error(b.publish('events', 'k', b'x', {'Authorization': 'Bearer s3cret-tokenX'}), 401,
                 'token with a suffix')
    expect_error(b.publish('events', 'k', b'x', {'Authorization': 'Basic czNjcmV0LXRva2Vu'}),
                 401, 'Basic instead of Bearer')
    expect_stored(b.publish('events', 'tok.1', b'x', {'Message-Id': 'tok-1'}), 'right token')
    h.check(b.stop() == 0, 'beta: SIGTERM exit 0')

    # ---------------------------------------------------------- daemon C: 507, 503
    dead = 'amqp://guest:guest@127.0.0.1:%d/%%2f' % h.free_port()
    c = h.Sagad(wd, dead, name='gamma', store_extra='max_bytes = 65536;', drain_timeout=4)
    c.start(wait_ready=False)
    st, _ = c.admin_get('/readyz')
    h.check(st == 503, 'no broker: /readyz 503', st)
    full = None
    for i in range(200):
        r = c.publish('events', 'fill.%d' % i, b'f' * 16384, {'Message-Id': 'fill-%d' % i})
        if r[0] != 202:
            full = (i, r)
            break
    h.check(full is not None, 'store.max_bytes = 65536: a 507 within 200 x 16 KiB', full)
    h.log('first refusal after %d messages' % full[0])
    expect_error(full[1], 507, 'store full')
    alive(c, 'store full')

    t0 = time.time()
    c.proc.send_signal(15)
    time.sleep(0.3)
    try:
        r = c.publish('events', 'late', b'x', {'Message-Id': 'late-1'}, timeout=5)
        if r[0] == 503:
            expect_error(r, 503, 'publish while draining')
            h.check('retry-after' in r[2], 'draining: Retry-After header', r[2])
        else:
            h.log('draining: publish answered %s %r (not caught in the window)' % (r[0], r[1]))
    except (OSError, Exception) as e:
        h.log('draining: publish not served (%s: %s): the listener is closed'
              % (type(e).__name__, e))
    try:
        c.proc.wait(30)
    except Exception:
        pass
    rc = c.stop()
    h.check(rc == 0, 'SIGTERM with messages pending (broker unreachable): exit 0 '
            '(%.1fs)' % (time.time() - t0), rc)

    h.check(a.stop() == 0, 'alpha: SIGTERM exit 0')


def _json(body):
    import json
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


def _stored_quiet(resp, what):
    st, doc, _ = resp
    if st != 202 or not isinstance(doc, dict) or doc.get('status') != 'stored':
        raise AssertionError('%s: expected 202 stored, got %s %r' % (what, st, doc))
    return doc['message_id']


h.run_test(main)
