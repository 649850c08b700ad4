#!/usr/bin/env python3
"""Consuming through the AMQP front door (issue 17) with pika: a
subscription with deliver = "amqp" is consumed from the broker through
sagad's inbox and handed to the client's basic.consume. The client's
queue.declare of it is answered (passive: sagad's arguments win); prefetch
holds; duplicate message ids are removed; ack records delivered;
nack/reject with requeue retry it (redelivered, dead-lettered once
max_attempts are spent), without requeue dead-letter it with the reason in
its headers; a client that goes with unacked deliveries has them
redelivered to the next; a SIGKILL of sagad with deliveries unacked
redelivers them after the restart; rabbitmq-c's amqp-consume gets its
messages; exclusive consumers, basic.cancel,
basic.get and unknown queues are refused clearly; metrics count it all."""

import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402

TOKEN = 'front-door-secret'
PY = h.Pika.PYTHON
CONSUMER = os.path.join(os.path.dirname(os.path.abspath(h.__file__)), 'frontdoor_consumer.py')
SUB = '''subscriptions = ( {
  name = "in"; queue = "fd.in"; deliver = "amqp"; queue_type = "classic";
  bind = ( "events:in.#" );
  max_attempts = 3; retry_initial = 0.2; retry_max = 0.5;
} );'''


def consume(url, timeout=120, **plan):
    plan = dict(plan, url=url)
    r = subprocess.run([PY, CONSUMER, json.dumps(plan)], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    lines = [json.loads(l) for l in r.stdout.decode().splitlines() if l.strip()]
    got = [l for l in lines if 'id' in l]
    end = [l for l in lines if 'end' in l]
    return got, (end[0] if end else {'end': None, 'stderr': r.stderr.decode()[-800:]})


def ids(got):
    return [g['id'] for g in got]


def bad_conf(wd):
    """deliver = "amqp" without the front door: sagad -n names the fix."""
    d = h.Sagad(wd, 'amqp://guest:guest@127.0.0.1:1/%2f', name='bad', conf_extra=SUB)
    r = subprocess.run([h.sagad_path(), '-n', '-f', d.conf], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=30)
    h.check(r.returncode != 0 and b'needs the front door' in r.stdout,
            'sagad -n: deliver = "amqp" without amqp.listen is an error naming it', r.stdout)


def main(wd):
    pk = h.Pika('amqp://unused')	# Skip without python3-pika
    bad_conf(wd)
    broker = h.Broker(wd)
    broker.start()
    pk = h.Pika(broker.url)
    port = h.free_port()
    d = h.Sagad(wd, broker.url, name='svc', token=TOKEN,
                conf_extra='amqp = { listen = "127.0.0.1:%d"; };\n%s' % (port, SUB))
    d.start()
    url = 'amqp://svc:%s@127.0.0.1:%d/%%2f' % (TOKEN, port)
    tool = h.AmqpTool()

    # -- nobody consumes: the messages wait in the broker's queue
    for i in range(40):
        pk.publish('events', 'in.%d' % i, json.dumps({'n': i}), message_id='m-%d' % i,
                   headers={'seq': str(i)}, correlation_id='c-%d' % (i % 4))
    for i in range(5):	# the same ids again: removed by the inbox
        pk.publish('events', 'in.dup', 'dup', message_id='m-%d' % i)
    time.sleep(1)
    h.check(tool.queue_len(broker.url, 'fd.in') == 45,
            'no front-door consumer: sagad leaves the 45 messages in the broker queue',
            tool.queue_len(broker.url, 'fd.in'))

    # -- prefetch 5, held: exactly five come; the declare is answered
    got, end = consume(url, queue='fd.in', declare=True, prefetch=5, default='hold',
                       idle=2, exit='kill')
    h.check(len(got) == 5 and ids(got) == ['m-%d' % i for i in range(5)],
            'prefetch 5: five deliveries while none is acked, in broker order',
            (ids(got), end))
    h.check(got and got[0]['headers'].get('seq') == '0' and got[0]['correlation_id'] == 'c-0'
            and got[0]['body'] == '{"n": 0}' and got[0]['routing_key'] == 'in.0',
            'properties, headers, routing key and body as published', got[:1])
    # -- the five come again, redelivered, to the next consumer; all 40 once
    got, end = consume(url, queue='fd.in', prefetch=10, idle=3)
    h.check(ids(got) == ['m-%d' % i for i in range(40)],
            'the next consumer gets all 40 in order, each once, duplicates removed',
            (ids(got), end))
    h.check([g['redelivered'] for g in got[:5]] == [True] * 5 and
            not any(g['redelivered'] for g in got[5:]),
            'the 5 left unacked by the killed client come redelivered=true, the rest not',
            [g['redelivered'] for g in got])
    h.wait_until(lambda: h.parse_metrics(d.admin_get('/metrics')[1]).get(
        'sagad_amqp_client_acks_total') == 40, 10, 'client acks counted')
    m = h.parse_metrics(d.admin_get('/metrics')[1])
    h.check(m.get('sagad_amqp_delivered_total') == 45 and
            m.get('sagad_amqp_redelivered_total') == 5,
            'sagad_amqp_delivered_total 45, redelivered 5',
            (m.get('sagad_amqp_delivered_total'), m.get('sagad_amqp_redelivered_total')))

    # -- verdicts: requeue then ack; reject; nack; always requeue (poison)
    for mid in ('v-requeue', 'v-reject', 'v-nack', 'v-poison', 'v-ok'):
        pk.publish('events', 'in.v', mid, message_id=mid)
    got, end = consume(url, queue='fd.in', prefetch=1, idle=4, verdicts={
        'v-requeue': ['nack-requeue', 'ack'], 'v-reject': ['reject'], 'v-nack': ['nack'],
        'v-poison': ['reject-requeue']})
    seen = ids(got)
    h.check(seen.count('v-requeue') == 2 and seen.count('v-reject') == 1 and
            seen.count('v-nack') == 1 and seen.count('v-poison') == 3 and
            seen.count('v-ok') == 1,
            'requeued twice-seen, rejected once, poison three times (max_attempts), ok once',
            seen)
    again = [g for g in got if g['id'] == 'v-requeue']
    h.check([g['redelivered'] for g in again] == [False, True],
            'a requeued message comes back redelivered=true', again)
    dead = pk.get('fd.in.dlq', 10, timeout=3)
    reasons = {x['message_id']: x['headers'].get('x-sagad-dead-reason') for x in dead}
    h.check(reasons == {'v-reject': 'rejected', 'v-nack': 'rejected',
                        'v-poison': 'attempts-exhausted'},
            'dead letters with their reason: rejected (reject, nack), attempts-exhausted (poison)',
            reasons)
    h.check(any(x['headers'].get('x-sagad-last-error') == 'rejected by the consumer'
                for x in dead), 'the last error says who refused', dead)

    # -- refusals
    got, end = consume(url, queue='fd.nothere', idle=1)
    h.check(end.get('end') == 'channel-closed' and end.get('code') == 404 and
            'front-door subscription' in end.get('text', ''),
            'basic.consume of a queue without a front-door subscription: 404 saying so', end)
    holder = subprocess.Popen([PY, CONSUMER, json.dumps(
        {'url': url, 'queue': 'fd.in', 'exclusive': True, 'idle': 6})],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    h.wait_until(lambda: h.parse_metrics(d.admin_get('/metrics')[1]).get(
        'sagad_amqp_consumers') == 1, 10, 'the exclusive consumer is on')
    subs = {x['name']: x for x in d.admin_json('/v1/admin/subscriptions')[1]['subscriptions']}
    h.check(subs['in']['consumers'] == 1 and subs['in']['deliver'] == 'amqp' and
            subs['in']['consuming'], 'the admin view: one consumer, consuming', subs['in'])
    got, end = consume(url, queue='fd.in', idle=1)
    h.check(end.get('end') == 'channel-closed' and end.get('code') == 403 and
            'exclusive' in end.get('text', ''),
            'a second consumer of a queue held exclusive: 403 ACCESS_REFUSED', end)
    holder.communicate(timeout=60)
    h.wait_until(lambda: h.parse_metrics(d.admin_get('/metrics')[1]).get(
        'sagad_amqp_consumers') == 0, 10, 'consumers cancelled: gauge back to 0')

    # -- rabbitmq-c's own consumer (amqp-tools)
    exe = shutil.which('amqp-consume')
    if not exe:
        h.log('amqp-consume not installed (amqp-tools): its part skipped')
    else:
        for i in range(5):
            pk.publish('events', 'in.tool', 'tool-%d;' % i, message_id='tool-%d' % i)
        r = subprocess.run([exe, '-u', url, '-q', 'fd.in', '-c', '5', '-p', '2', 'cat'],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=60)
        h.check(r.returncode == 0 and r.stdout == b''.join(b'tool-%d;' % i for i in range(5)),
                "rabbitmq-c's amqp-consume (prefetch 2) gets the five, in order, once",
                (r.returncode, r.stdout, r.stderr[-300:]))

    # -- SIGKILL of sagad while a client holds deliveries unacked
    for i in range(6):
        pk.publish('events', 'in.k', 'k', message_id='k-%d' % i)
    before = h.parse_metrics(d.admin_get('/metrics')[1]).get('sagad_amqp_delivered_total')
    holder = subprocess.Popen([PY, CONSUMER, json.dumps(
        {'url': url, 'queue': 'fd.in', 'prefetch': 3, 'default': 'hold', 'idle': 30})],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    h.wait_until(lambda: h.parse_metrics(d.admin_get('/metrics')[1]).get(
        'sagad_amqp_delivered_total', 0) >= before + 3, 20, 'three held by a client')
    d.kill()
    holder.kill()
    holder.communicate(timeout=30)
    d.start()
    got, end = consume(url, queue='fd.in', prefetch=2, idle=3)
    h.check(sorted(ids(got)) == ['k-%d' % i for i in range(6)],
            'after SIGKILL and restart: all six delivered, none lost', (ids(got), end))
    h.check(all(g['redelivered'] for g in got[:3]),
            'the three that were out unacked come redelivered=true', got[:3])
    h.check(tool.queue_len(broker.url, 'fd.in') == 0, 'the broker queue is empty')

    # -- basic.get: refused with a hint, connection kept
    rc = subprocess.run([PY, os.path.join(os.path.dirname(CONSUMER), 'frontdoor_client.py'),
                         'refuse', url, 'basic.get'], stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, timeout=60)
    line = json.loads(rc.stdout.decode().splitlines()[0])
    h.check(line.get('code') == 540 and 'basic.consume' in line.get('text', ''),
            'basic.get: 540 NOT_IMPLEMENTED with the hint to use basic.consume', line)
    d.stop()
    broker.stop()


if __name__ == '__main__':
    h.run_test(main)
