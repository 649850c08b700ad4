#!/usr/bin/env python3
"""Subscriptions: what sagad does with the service's answers (2xx done;
409/422 on an event -> dead letter `rejected`; other 4xx -> `refused-<status>`
at once; 5xx and refused connections -> retries, then `attempts-exhausted`),
the delivery headers, replies to reply_to, ordered mode, the dead-letter
queue with its x-sagad-* headers, `sagactl dlq list` / `dlq replay`, the
metrics, and bad input (no or broken message id, bodies at and over the
subscription's max_message_bytes, broken header values)."""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402

LIMIT = 1048576          # max_message_bytes of the subscription "inbox"


def key_of(call):
    return call['headers'].get('sagad-routing-key', '')


def attempt_of(call):
    try:
        return int(call['headers'].get('sagad-attempt', '0'))
    except ValueError:
        return -1


def behaviour(state):
    def answer(call):
        key = key_of(call)
        att = attempt_of(call)
        if key.startswith('ord.'):
            mid = call['headers'].get('message-id', '')
            if mid == 'A-2' and att <= 3:
                return ('sleep', 0.1, 503)
            return ('sleep', 0.1, 200)
        if key.startswith('rp.'):
            return 200 if state.get('replay_ok') else 404
        table = {
            'sub.s201': 201, 'sub.s204': 204,
            'sub.r409': 409, 'sub.r422': 422, 'sub.r404': 404, 'sub.r400': 400,
            'sub.r410': 410, 'sub.e500': 500, 'sub.e502': 502,
        }
        if key == 'sub.s204':
            return 204          # no body: a 204 has none
        if key in table:
            return (table[key], b'{"answer":%d}' % table[key],
                    {'Content-Type': 'application/json'})
        if key in ('sub.flaky', 'sub.noid', 'sub.cmd.flaky'):
            if att <= (2 if key == 'sub.flaky' else 1):
                return 503
        if key.startswith('sub.cmd.ok') or key == 'sub.cmd.flaky':
            return (200, b'{"reserved":true}', {'Content-Type': 'application/json'})
        if key == 'sub.cmd.no':
            return (409, b'{"reason":"no stock"}', {'Content-Type': 'application/problem+json'})
        return 200
    return answer


def settled(d, subs):
    m = d.metrics()
    for s in subs:
        if m.get('sagad_inbox_backlog{subscription="%s"}' % s) != 0:
            return False
        if m.get('sagad_inbox_inflight{subscription="%s"}' % s) != 0:
            return False
    return m.get('sagad_outbox_pending') == 0 and m


def main(wd):
    broker = h.Broker(wd)
    broker.start()
    tool = h.AmqpTool()
    state = {}
    svc = h.Service(behaviour(state))
    dead_port = h.free_port()       # nothing listens there
    conf = '''
subscriptions = (
  { name = "inbox"; bind = [ "events:sub.#" ]; deliver = "%(url)s";
    concurrency = 4; timeout = 5; max_attempts = 3; retry_initial = 0.05; retry_max = 0.3;
    circuit_failures = 100; circuit_open = 1; max_message_bytes = %(limit)d; },
  { name = "ordered"; bind = [ "events:ord.#" ]; deliver = "%(url)s"; ordered = true;
    concurrency = 4; timeout = 2; max_attempts = 6; retry_initial = 1; retry_max = 2;
    circuit_failures = 100; circuit_open = 1; },
  { name = "nowhere"; bind = [ "events:gone.#" ]; deliver = "http://127.0.0.1:%(dead)d/x";
    timeout = 1; max_attempts = 3; retry_initial = 0.05; retry_max = 0.2;
    circuit_failures = 100; circuit_open = 1; },
  { name = "rp"; bind = [ "events:rp.#" ]; deliver = "%(url)s";
    timeout = 5; max_attempts = 2; retry_initial = 0.05; retry_max = 0.2;
    circuit_failures = 100; circuit_open = 1; }
);
''' % {'url': svc.url, 'limit': LIMIT, 'dead': dead_port}
    d = h.Sagad(wd, broker.url, name='orders', conf_extra=conf)
    d.start()
    url = broker.url
    tool.declare_queue(url, 'replies', [])

    # ------------------------------------------------------------ answer rules
    h.log('== answer rules')
    cases = [
        # key, message id, expected answers seen, fate, dead reason, last status
        ('sub.ok', 'ok-1', 1, 'done', None, None),
        ('sub.s201', 's201-1', 1, 'done', None, None),
        ('sub.s204', 's204-1', 1, 'done', None, None),
        ('sub.r409', 'r409-1', 1, 'dead', 'rejected', 409),
        ('sub.r422', 'r422-1', 1, 'dead', 'rejected', 422),
        ('sub.r404', 'r404-1', 1, 'dead', 'refused-404', 404),
        ('sub.r400', 'r400-1', 1, 'dead', 'refused-400', 400),
        ('sub.r410', 'r410-1', 1, 'dead', 'refused-410', 410),
        ('sub.e500', 'e500-1', 3, 'dead', 'attempts-exhausted', 500),
        ('sub.e502', 'e502-1', 3, 'dead', 'attempts-exhausted', 502),
        ('sub.flaky', 'flaky-1', 3, 'done', None, None),
    ]
    for key, mid, _, _, _, _ in cases:
        tool.send(url, 'events', key, body='body of %s' % mid, message_id=mid,
                  correlation_id='corr-' + mid, headers={'origin': 'rules'})
    tool.send(url, 'events', 'gone.1', body='to nowhere', message_id='gone-1')

    def rules_seen():
        for key, mid, n, _, _, _ in cases:
            if len(svc.with_id(mid)) < n:
                return False
        return True
    h.wait_until(rules_seen, 60, 'the service saw every rule case as often as expected')
    h.wait_until(lambda: settled(d, ['inbox', 'nowhere']), 60, 'inbox and nowhere settled')
    time.sleep(0.5)
    for key, mid, n, fate, reason, _ in cases:
        calls = svc.with_id(mid)
        atts = [attempt_of(c) for c in calls]
        h.check(atts == list(range(1, n + 1)),
                '%s (%s): delivered %d time(s), Sagad-Attempt %s' % (key, mid, n, atts),
                atts)

    dlq = tool.consume(url, 'orders.inbox.dlq', 100, timeout=3)
    by_id = {}
    for m in dlq:
        by_id.setdefault(m.get('message_id'), []).append(m)
    for key, mid, n, fate, reason, status in cases:
        got = by_id.get(mid, [])
        if fate == 'done':
            h.check(not got, '%s: not in orders.inbox.dlq' % mid, got)
            continue
        h.check(len(got) == 1, '%s: once in orders.inbox.dlq' % mid, got)
        m = got[0]
        hd = m.get('headers') or {}
        h.check(hd.get('x-sagad-dead-reason') == reason
                and hd.get('x-sagad-attempts') == str(n)
                and hd.get('x-sagad-last-status') == str(status)
                and 'x-sagad-last-error' in hd
                and hd.get('x-sagad-subscription') == 'inbox',
                '%s: x-sagad-dead-reason=%s attempts=%d last-status=%d subscription=inbox '
                '(last-error %r)' % (mid, reason, n, status, hd.get('x-sagad-last-error')), hd)
        h.check(m.get('body') == 'body of %s' % mid and m.get('correlation_id') == 'corr-' + mid
                and hd.get('origin') == 'rules',
                '%s: dead letter keeps body, correlation_id and headers' % mid, m)
    gone = tool.consume(url, 'orders.nowhere.dlq', 10, timeout=2)
    h.check(len(gone) == 1 and gone[0].get('message_id') == 'gone-1',
            'connection refused: gone-1 dead-lettered after the retries', gone)
    ghd = gone[0].get('headers') or {}
    h.check(ghd.get('x-sagad-dead-reason') == 'attempts-exhausted'
            and ghd.get('x-sagad-attempts') == '3' and ghd.get('x-sagad-last-status') == '0'
            and ghd.get('x-sagad-last-error'),
            'connection refused: attempts-exhausted after 3 attempts, last-status 0, '
            'last-error %r' % ghd.get('x-sagad-last-error'), ghd)

    m = d.metrics()
    n_success = sum(1 for c in cases if c[3] == 'done')
    n_dead = sum(1 for c in cases if c[3] == 'dead')
    n_retry = sum(c[2] - 1 for c in cases)
    lab = 'sagad_delivered_total{subscription="inbox",outcome="%s"}'
    h.check(m.get(lab % 'success') == n_success,
            'sagad_delivered_total{inbox,success} = %d' % n_success, m.get(lab % 'success'))
    h.check(m.get(lab % 'retry') == n_retry,
            'sagad_delivered_total{inbox,retry} = %d' % n_retry, m.get(lab % 'retry'))
    h.check(m.get(lab % 'dead-lettered') == n_dead,
            'sagad_delivered_total{inbox,dead-lettered} = %d' % n_dead,
            m.get(lab % 'dead-lettered'))
    # Every consumed message was acked once, after its inbox commit.
    h.check(m.get('sagad_inbox_ack_seconds_count{subscription="inbox"}') == len(cases),
            'sagad_inbox_ack_seconds{inbox}: one ack per consumed message (%d)' % len(cases),
            m.get('sagad_inbox_ack_seconds_count{subscription="inbox"}'))
    # Each ack waited for an fsync of the store's log, timed on its thread.
    h.check((m.get('sagad_store_fsync_seconds_count') or 0) >= 1,
            'sagad_store_fsync_seconds counts the syncer\'s fsyncs',
            m.get('sagad_store_fsync_seconds_count'))
    h.check(m.get('sagad_dead_lettered_total{subscription="inbox"}') == n_dead,
            'sagad_dead_lettered_total{inbox} = %d' % n_dead,
            m.get('sagad_dead_lettered_total{subscription="inbox"}'))
    h.check(m.get('sagad_dead_lettered_total{subscription="nowhere"}') == 1,
            'sagad_dead_lettered_total{nowhere} = 1')

    # ------------------------------------------------------------ headers
    h.log('== delivery headers')
    tool.send(url, 'events', 'sub.hdr.full', body='{"a":1}', message_id='hdr-1',
              correlation_id='corr-hdr', content_type='application/json', type='order.created',
              headers={'foo': 'bar', 'num': 42, 'flag': True, 'x-causation-id': 'cause-1'})
    tool.send(url, 'events', 'sub.hdr.bare', body='bare', message_id='hdr-2')
    for kind in ('command', 'compensation', 'bogus'):
        tool.send(url, 'events', 'sub.hdr.kind', body=kind, message_id='kind-' + kind,
                  headers={'x-sagad-kind': kind, 'x-sagad-saga': 'saga-7',
                           'x-sagad-step': 'reserve'})
    st, doc, _ = d.publish('events', 'sub.hdr.api', b'{"via":"api"}',
                           {'Message-Id': 'api-1', 'Correlation-Id': 'corr-api',
                            'Content-Type': 'application/json', 'Causation-Id': 'cause-api',
                            'Amqp-Header-Trace': 't-1', 'Amqp-Type': 'via.api'})
    h.check(st == 202, 'sagad publish API: 202 for sub.hdr.api', (st, doc))
    for mid in ('hdr-1', 'hdr-2', 'kind-command', 'kind-compensation', 'kind-bogus', 'api-1'):
        h.wait_until(lambda: svc.with_id(mid), 30, 'delivery of %s' % mid)
    c = svc.with_id('hdr-1')[0]
    want = {'content-type': 'application/json', 'message-id': 'hdr-1',
            'correlation-id': 'corr-hdr', 'sagad-subscription': 'inbox',
            'sagad-exchange': 'events', 'sagad-routing-key': 'sub.hdr.full',
            'sagad-attempt': '1', 'sagad-kind': 'event', 'amqp-header-foo': 'bar',
            'amqp-header-num': '42', 'amqp-header-flag': 'true',
            'amqp-header-x-causation-id': 'cause-1'}
    bad = {k: (v, c['headers'].get(k)) for k, v in want.items() if c['headers'].get(k) != v}
    h.check(not bad, 'hdr-1: Content-Type, Message-Id, Correlation-Id, Sagad-Subscription, '
            'Sagad-Exchange, Sagad-Routing-Key, Sagad-Attempt, Sagad-Kind, Amqp-Header-*',
            bad)
    h.check(c['body'] == b'{"a":1}' and c['path'] == '/messages' and c['answer'] == 200,
            'hdr-1: body and path as sent', c)
    h.check('sagad-saga' not in c['headers'] and 'sagad-step' not in c['headers'],
            'hdr-1: no Sagad-Saga / Sagad-Step outside a saga', c['headers'])
    c = svc.with_id('hdr-2')[0]
    h.check(c['headers'].get('content-type') and 'correlation-id' not in c['headers']
            and not [k for k in c['headers'] if k.startswith('amqp-header-')],
            'hdr-2 (no properties): a Content-Type (%s), no Correlation-Id, no Amqp-Header-*'
            % c['headers'].get('content-type'), c['headers'])
    for kind, want_kind in (('command', 'command'), ('compensation', 'compensation'),
                            ('bogus', 'event')):
        c = svc.with_id('kind-' + kind)[0]
        h.check(c['headers'].get('sagad-kind') == want_kind
                and c['headers'].get('sagad-saga') == 'saga-7'
                and c['headers'].get('sagad-step') == 'reserve',
                'x-sagad-kind=%s: Sagad-Kind %s, Sagad-Saga and Sagad-Step set'
                % (kind, want_kind), c['headers'])
    c = svc.with_id('api-1')[0]
    want = {'content-type': 'application/json', 'correlation-id': 'corr-api',
            'amqp-header-x-causation-id': 'cause-api', 'amqp-header-trace': 't-1',
            'sagad-routing-key': 'sub.hdr.api', 'sagad-exchange': 'events'}
    bad = {k: (v, c['headers'].get(k)) for k, v in want.items() if c['headers'].get(k) != v}
    h.check(not bad and c['body'] == b'{"via":"api"}',
            'published through sagad\'s own API and consumed back: headers mapped', bad)

    # ------------------------------------------------------------ replies
    h.log('== reply_to')
    for key, mid in (('sub.cmd.ok', 'cmd-ok'), ('sub.cmd.no', 'cmd-no'),
                     ('sub.cmd.flaky', 'cmd-flaky')):
        tool.send(url, 'events', key, body='{"order":1}', message_id=mid,
                  correlation_id='saga-' + mid, reply_to='replies',
                  headers={'x-sagad-kind': 'command', 'x-sagad-saga': 'saga-' + mid,
                           'x-sagad-step': 'reserve'})
    h.wait_until(lambda: len(svc.with_id('cmd-flaky')) >= 2 and svc.with_id('cmd-ok')
                 and svc.with_id('cmd-no'), 30, 'the three commands answered')
    h.wait_until(lambda: settled(d, ['inbox']), 30, 'inbox settled')
    replies = tool.consume(url, 'replies', 20, timeout=3)
    by_cid = {}
    for r in replies:
        by_cid.setdefault(r.get('correlation_id'), []).append(r)
    h.check(sorted(by_cid) == ['saga-cmd-flaky', 'saga-cmd-no', 'saga-cmd-ok']
            and all(len(v) == 1 for v in by_cid.values()),
            'one reply per command (the retried one too)',
            [(r.get('correlation_id'), (r.get('headers') or {}).get('x-sagad-outcome'))
             for r in replies])
    r = by_cid['saga-cmd-ok'][0]
    h.check(r.get('body') == '{"reserved":true}' and r.get('content_type') == 'application/json'
            and (r.get('headers') or {}).get('x-sagad-outcome') == 'success'
            and r.get('message_id'),
            '2xx: reply with the answer body, its Content-Type, the correlation id and '
            'x-sagad-outcome=success', r)
    r = by_cid['saga-cmd-no'][0]
    h.check(r.get('body') == '{"reason":"no stock"}'
            and r.get('content_type') == 'application/problem+json'
            and (r.get('headers') or {}).get('x-sagad-outcome') == 'failure',
            '409 on a command: reply with x-sagad-outcome=failure and the answer body', r)
    r = by_cid['saga-cmd-flaky'][0]
    h.check((r.get('headers') or {}).get('x-sagad-outcome') == 'success',
            '503 then 200: a single success reply', r)
    h.check(svc.with_id('cmd-ok')[0]['headers'].get('sagad-kind') == 'command',
            'a command is delivered with Sagad-Kind: command')
    stray = tool.consume(url, 'orders.inbox.dlq', 10, timeout=2)
    h.check(not stray, 'no command was dead-lettered (409 on a command is a failure reply)',
            [(m.get('message_id'), (m.get('headers') or {}).get('x-sagad-dead-reason'))
             for m in stray])
    m = d.metrics()
    h.check(m.get(lab % 'refused') == 1, 'sagad_delivered_total{inbox,refused} = 1',
            m.get(lab % 'refused'))

    # ------------------------------------------------------------ ordered
    h.log('== ordered = true')
    # Through sagad's own publish API (a millisecond each): all 15 must be
    # in the queue well before A-2's last retry (about 3 s after its
    # first), which an amqptool process per message (~200 ms each under
    # load) did not always manage.
    for i in range(1, 6):
        for key, prefix, cid in (('ord.a', 'A', 'cid-A'), ('ord.b', 'B', 'cid-B'),
                                 ('ord.n', 'N', None)):
            mid = '%s-%d' % (prefix, i)
            hdrs = {'Message-Id': mid}
            if cid:
                hdrs['Correlation-Id'] = cid
            st, doc, _ = d.publish('events', key, mid, hdrs)
            assert st == 202, ('ordered: %s not accepted' % mid, st, doc)
    h.wait_until(lambda: len(svc.find(lambda c: key_of(c).startswith('ord.')
                                      and c['end'] is not None)) >= 18,
                 90, '18 ordered deliveries (15 messages, A-2 three more times)')
    h.wait_until(lambda: settled(d, ['ordered']), 30, 'ordered settled')
    calls = sorted(svc.find(lambda c: key_of(c).startswith('ord.')), key=lambda c: c['start'])
    for cid, prefix in (('cid-A', 'A'), ('cid-B', 'B')):
        seq = [c for c in calls if c['headers'].get('correlation-id') == cid]
        names = [c['headers'].get('message-id') for c in seq]
        want = (['A-1', 'A-2', 'A-2', 'A-2', 'A-2', 'A-3', 'A-4', 'A-5'] if prefix == 'A'
                else ['B-%d' % i for i in range(1, 6)])
        h.check(names == want, '%s: delivered in broker order, retries included: %s'
                % (cid, names), names)
        overlap = [(a['headers'].get('message-id'), b['headers'].get('message-id'))
                   for a, b in zip(seq, seq[1:]) if b['start'] < a['answered']]
        h.check(not overlap, '%s: one delivery at a time' % cid, overlap)
    a2_last = [c for c in calls if c['headers'].get('message-id') == 'A-2'][-1]
    others = [c for c in calls if c['headers'].get('correlation-id') != 'cid-A']
    late = [c['headers'].get('message-id') for c in others if c['end'] > a2_last['start']]
    h.check(not late, 'cid-B and messages without a correlation id passed A-2 while it '
            'waited for its retries', late)
    h.check([attempt_of(c) for c in calls if c['headers'].get('message-id') == 'A-2']
            == [1, 2, 3, 4], 'A-2: Sagad-Attempt 1..4')

    # ------------------------------------------------------------ dlq + replay
    h.log('== dead letters: sagactl dlq list / replay')
    for i in range(1, 4):
        tool.send(url, 'events', 'rp.%d' % i, body='replay me %d' % i, message_id='rp-%d' % i)
    h.wait_until(lambda: all(svc.with_id('rp-%d' % i) for i in range(1, 4)), 30,
                 'rp-1..3 delivered (answered 404)')
    h.wait_until(lambda: settled(d, ['rp']), 30, 'rp settled')
    rc, out, err = h.sagactl(d, 'dlq', 'list', 'rp')
    h.check(rc == 0 and all('rp-%d' % i in out for i in range(1, 4)) and 'refused-404' in out,
            'sagactl dlq list rp: the three dead letters with reason refused-404', out)
    h.log('sagactl dlq list rp:\n' + out.rstrip())
    rc, doc, err = h.sagactl(d, 'dlq', 'list', 'rp', json_out=True)
    msgs = doc.get('messages') or []
    h.check(doc.get('count') == 3 and sorted(x.get('message_id') for x in msgs)
            == ['rp-1', 'rp-2', 'rp-3']
            and all(x.get('reason') == 'refused-404' and x.get('attempts') == 1
                    and x.get('last_status') == 404 for x in msgs),
            'sagactl --json dlq list rp: count 3, reason, attempts, last_status', doc)
    rc, out, err = h.sagactl(d, 'dlq', 'list', 'no-such-sub', check=False)
    h.check(rc == 1 and err.strip(), 'sagactl dlq list of an unknown subscription: exit 1 '
            'with a message', (rc, out, err))
    n_before = len(svc.with_id('rp-1'))
    state['replay_ok'] = True
    rc, out, err = h.sagactl(d, 'dlq', 'replay', 'rp', 'rp-1')
    h.check(rc == 0 and '1' in out, 'sagactl dlq replay rp rp-1: one put back', out)
    h.wait_until(lambda: len(svc.with_id('rp-1')) > n_before, 30, 'rp-1 delivered again')
    h.wait_until(lambda: settled(d, ['rp']), 30, 'rp settled')
    c = svc.with_id('rp-1')[-1]
    h.check(c['answer'] == 200 and attempt_of(c) == 1 and c['body'] == b'replay me 1',
            'replayed rp-1: delivered with its body, Sagad-Attempt 1, answered 200', c)
    h.check(len(svc.with_id('rp-2')) == 1 and len(svc.with_id('rp-3')) == 1,
            'rp-2 and rp-3 not replayed yet')
    rc, doc, err = h.sagactl(d, 'dlq', 'list', 'rp', json_out=True)
    h.check(doc.get('count') == 2 and sorted(x.get('message_id') for x in doc['messages'])
            == ['rp-2', 'rp-3'], 'dlq list after replaying rp-1: rp-2, rp-3', doc)
    rc, out, err = h.sagactl(d, 'dlq', 'replay', 'rp')
    h.check(rc == 0 and '2' in out, 'sagactl dlq replay rp (all): two put back', out)
    h.wait_until(lambda: len(svc.with_id('rp-2')) == 2 and len(svc.with_id('rp-3')) == 2,
                 30, 'rp-2 and rp-3 delivered again')
    h.wait_until(lambda: settled(d, ['rp']), 30, 'rp settled')
    rc, doc, err = h.sagactl(d, 'dlq', 'list', 'rp', json_out=True)
    h.check(doc.get('count') == 0 and not doc.get('messages'), 'dlq list rp: empty', doc)
    rc, doc, err = h.sagactl(d, 'dlq', 'replay', 'rp', json_out=True)
    h.check(doc.get('replayed') == 0, 'replay with nothing dead: 0 replayed', doc)
    m = d.metrics()
    h.check(m.get('sagad_delivered_total{subscription="rp",outcome="success"}') == 3,
            'sagad_delivered_total{rp,success} = 3 after the replays')
    rows = h.inbox_rows(d.store, 'rp')
    h.check(len(rows) == 3 and all(r['state'] == 1 for r in rows),
            'store: rp-1..3 recorded once each, done', rows)

    # ------------------------------------------------------------ bad input
    h.log('== bad input: message ids, sizes, header values')
    tool.send(url, 'events', 'sub.noid', body='no id here')
    tool.send(url, 'events', 'sub.noid2', body='no id either')
    tool.send(url, 'events', 'sub.emptyid', body='empty id', message_id='')
    tool.send(url, 'events', 'sub.crlfid', body='broken id',
              message_id_hex='6261640d0a49643a2078')   # "bad\r\nId: x"
    h.wait_until(lambda: len(svc.with_key('sub.noid')) >= 2 and svc.with_key('sub.noid2')
                 and svc.with_key('sub.emptyid') and svc.with_key('sub.crlfid'), 30,
                 'messages without a usable id delivered')
    ids = [c['headers'].get('message-id') for c in svc.with_key('sub.noid')]
    h.check(len(ids) == 2 and ids[0] and ids[0] == ids[1],
            'no message id: sagad derives one (%s), the same on the retry' % ids[0], ids)
    other = svc.with_key('sub.noid2')[0]['headers'].get('message-id')
    h.check(other and other != ids[0], 'another message without id gets another id (%s)'
            % other)
    for key in ('sub.emptyid', 'sub.crlfid'):
        c = svc.with_key(key)
        mid = c[0]['headers'].get('message-id')
        h.check(len(c) == 1 and mid and '\r' not in mid and '\n' not in mid
                and c[0]['answer'] == 200 and 'id' not in c[0]['headers'],
                '%s: delivered once with a clean derived Message-Id %r' % (key, mid), c)

    # bodies at and over the subscription's limit
    tool.send(url, 'events', 'sub.big.at', body_size=LIMIT, message_id='big-at')
    tool.send(url, 'events', 'sub.big.over', body_size=LIMIT + 1, message_id='big-over')
    tool.send(url, 'events', 'sub.big.huge', body_size=8 * LIMIT, message_id='big-huge')
    tool.send(url, 'events', 'sub.big.after', body='after the big ones', message_id='big-after')
    h.wait_until(lambda: svc.with_id('big-at') and svc.with_id('big-after'), 60,
                 'big-at and big-after delivered')
    h.wait_until(lambda: settled(d, ['inbox']), 30, 'inbox settled')
    c = svc.with_id('big-at')
    want_body = bytes(ord('a') + i % 26 for i in range(LIMIT))
    h.check(len(c) == 1 and c[0]['body'] == want_body,
            'a body of exactly max_message_bytes (%d) delivered intact' % LIMIT,
            [len(x['body']) for x in c])
    h.check(not svc.with_id('big-over') and not svc.with_id('big-huge'),
            'bodies over max_message_bytes never reach the service')
    dl = tool.consume(url, 'orders.inbox.dlq', 10, timeout=3)
    h.check(sorted(x.get('message_id') for x in dl) == ['big-huge', 'big-over']
            and all('x-death' in (x.get('headers') or {}) for x in dl)
            and sorted(len(x.get('body', '')) for x in dl) == [LIMIT + 1, 8 * LIMIT],
            'over the limit: dead-lettered whole by the queue\'s dead-letter setup '
            '(x-death header)', [(x.get('message_id'), len(x.get('body', '')),
                                  sorted(x.get('headers') or {})) for x in dl])
    m = d.metrics()
    h.check(m.get('sagad_too_large_total{subscription="inbox"}') == 2,
            'sagad_too_large_total{inbox} = 2', m.get('sagad_too_large_total{subscription="inbox"}'))

    # broken header values
    broken = {
        'good': 'fine',
        'crlf': 'a\r\nInjected: yes',
        'lf': 'b\nInjected2: yes',
        'ctl': 'c\x01\x02\x1b[31m',
        'nul': {'$str_hex': '610062'},
        'latin': {'$str_hex': 'ff fe'.replace(' ', '')},
        'bytes': {'$hex': '00ff10'},
        'long': 'x' * 70000,
        'nested': {'a': 1, 'b': {'c': 'd'}},
        'list': ['x', 1, True],
        'void': None,
        'float': 1.5,
        'bad name': 'space in the name',
        'colon:name': 'colon in the name',
        'Sagad-Attempt': '99',
        '': 'empty name',
    }
    tool.send(url, 'events', 'sub.broken', body='broken headers', message_id='broken-1',
              correlation_id='corr\r\nInjected3: yes', type='t\r\nInjected4: yes',
              content_type_hex='746578742f706c61696e0d0a496e6a6563746564353a20796573',
              headers=broken)
    tool.send(url, 'events', 'sub.after.broken', body='after', message_id='broken-after')
    h.wait_until(lambda: svc.with_id('broken-1') and svc.with_id('broken-after'), 30,
                 'broken-1 and broken-after delivered')
    h.wait_until(lambda: settled(d, ['inbox']), 30, 'inbox settled')
    c = svc.with_id('broken-1')
    h.check(len(c) == 1 and c[0]['answer'] == 200 and c[0]['body'] == b'broken headers',
            'broken header values: delivered once, answered 200', c)
    hd = c[0]['headers']
    inj = [k for k in hd if 'injected' in k]
    h.check(not inj, 'no header injected through CR/LF in values', c[0]['raw_headers'])
    h.check(hd.get('amqp-header-good') == 'fine' and hd.get('sagad-attempt') == '1'
            and hd.get('sagad-subscription') == 'inbox',
            'the sound headers are there; Sagad-Attempt not overridden by an AMQP header',
            c[0]['raw_headers'])
    names = [k for k, _ in c[0]['raw_headers']]
    h.check(len(names) == len(set(n.lower() for n in names)),
            'no header name twice', names)
    h.log('headers of broken-1: %s' % [(k, v[:40]) for k, v in c[0]['raw_headers']])
    h.check(d.running(), 'sagad still running')
    stray = [x for x in tool.consume(url, 'orders.inbox.dlq', 10, timeout=2)]
    h.check(not stray, 'nothing else dead-lettered', [x.get('message_id') for x in stray])

    # ------------------------------------------------------------ admin view
    h.log('== subscriptions overview')
    st, doc = d.admin_json('/v1/admin/subscriptions')
    subs = {s.get('name'): s for s in doc.get('subscriptions', [])}
    h.check(st == 200 and sorted(subs) == ['inbox', 'nowhere', 'ordered', 'rp'],
            'GET /v1/admin/subscriptions lists the four subscriptions', doc)
    h.check(all(s.get('backlog') == 0 and s.get('circuit') == 'closed' for s in subs.values()),
            'every backlog 0, every circuit closed', doc)
    h.check(subs['inbox'].get('dead_letters') == n_dead
            and subs['nowhere'].get('dead_letters') == 1 and subs['rp'].get('dead_letters') == 0,
            'dead_letters per subscription as in the store', doc)
    rc, out, err = h.sagactl(d, 'subscriptions')
    h.check(rc == 0 and all(n in out for n in subs), 'sagactl subscriptions lists them', out)
    h.log('sagactl subscriptions:\n' + out.rstrip())
    m = d.metrics()
    for s in subs:
        h.check(m.get('sagad_inbox_backlog{subscription="%s"}' % s) == 0,
                'sagad_inbox_backlog{%s} = 0' % s)
    h.check(m.get('sagad_duplicates_total{subscription="inbox"}') == 0,
            'sagad_duplicates_total{inbox} = 0 so far')
    tool.send(url, 'events', 'sub.ok', body='again', message_id='ok-1')
    h.wait_until(lambda: d.metrics().get('sagad_duplicates_total{subscription="inbox"}') == 1,
                 30, 'sagad_duplicates_total{inbox} = 1 after ok-1 came again')
    time.sleep(1)
    h.check(len(svc.with_id('ok-1')) == 1, 'the repeated ok-1 was not delivered again')
    rows = h.inbox_rows(d.store)
    dup = {}
    for r in rows:
        dup[(r['subscription'], r['message_id'])] = dup.get((r['subscription'],
                                                             r['message_id']), 0) + 1
    h.check(all(v == 1 for v in dup.values()), 'store: one inbox record per message id')
    h.check(not [r for r in rows if r['state'] == 0], 'store: nothing pending')
    rc = d.stop()
    h.check(rc == 0, 'SIGTERM: exit 0', rc)
    svc.stop()

    # Checked last so that a failure here leaves the rest of the coverage
    # intact: the recorded error of a refused connection must say so.
    err = ghd.get('x-sagad-last-error', '')
    h.check('timeout' not in err.lower(),
            'connection refused: x-sagad-last-error does not call it a timeout (%r)' % err, err)


h.run_test(main)
