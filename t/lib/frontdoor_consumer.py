"""A pika consumer of sagad's AMQP front door, for
t/integration/frontdoor_consume.py: run by Debian's /usr/bin/python3
(python3-pika). One argument, a JSON plan; one JSON line on stdout per
delivery, then {"end": ...}.

  url, queue          where to consume
  prefetch, global    basic.qos (0: none sent)
  exclusive, no_ack   basic.consume's flags
  declare             queue.declare the queue first (durable, no arguments)
  verdicts            {message_id: ["nack-requeue", "ack", ...]}: the
                      verdict for each delivery of that id in turn (the last
                      one repeats); others get "default"
  default             "ack", "reject", "reject-requeue", "nack", "nack-requeue"
                      or "hold" (never settled)
  stop_after          stop after this many deliveries (0: at idle)
  idle                seconds without a delivery that end the run
  exit                "close" (cancel, close the connection) or "kill"
                      (os._exit: the socket goes with deliveries unacked)
"""

import json
import os
import sys

import pika


def out(**kw):
    sys.stdout.write(json.dumps(kw) + '\n')
    sys.stdout.flush()


def settle(ch, tag, verdict):
    if verdict == 'ack':
        ch.basic_ack(tag)
    elif verdict == 'reject':
        ch.basic_reject(tag, requeue=False)
    elif verdict == 'reject-requeue':
        ch.basic_reject(tag, requeue=True)
    elif verdict == 'nack':
        ch.basic_nack(tag, requeue=False)
    elif verdict == 'nack-requeue':
        ch.basic_nack(tag, requeue=True)


def run(plan):
    conn = pika.BlockingConnection(pika.URLParameters(plan['url']))
    ch = conn.channel()
    if plan.get('declare'):
        ok = ch.queue_declare(plan['queue'], durable=True)
        out(declared=ok.method.queue, messages=ok.method.message_count)
    if plan.get('prefetch'):
        ch.basic_qos(prefetch_count=plan['prefetch'], global_qos=bool(plan.get('global')))
    seen = {}
    held = 0
    n = 0
    gen = ch.consume(plan['queue'], auto_ack=bool(plan.get('no_ack')),
                     exclusive=bool(plan.get('exclusive')),
                     inactivity_timeout=plan.get('idle', 2))
    for method, props, body in gen:
        if method is None:
            break
        mid = props.message_id
        k = seen.get(mid, 0)
        seen[mid] = k + 1
        steps = plan.get('verdicts', {}).get(mid)
        verdict = plan.get('default', 'ack') if not steps else steps[min(k, len(steps) - 1)]
        if plan.get('no_ack'):
            verdict = 'none'
        if verdict == 'hold':
            held += 1
        out(id=mid, tag=method.delivery_tag, redelivered=method.redelivered,
            routing_key=method.routing_key, verdict=verdict, held=held,
            headers={k2: (v.decode() if isinstance(v, bytes) else v)
                     for k2, v in (props.headers or {}).items()},
            correlation_id=props.correlation_id, body=body.decode(errors='replace'))
        settle(ch, method.delivery_tag, verdict)
        n += 1
        if plan.get('stop_after') and n >= plan['stop_after']:
            break
    if plan.get('exit') == 'kill':
        out(end='kill', n=n)
        os._exit(0)
    ch.cancel()
    conn.close()
    out(end='close', n=n)


def main():
    plan = json.loads(sys.argv[1])
    try:
        run(plan)
    except pika.exceptions.ChannelClosedByBroker as e:
        out(end='channel-closed', code=e.reply_code, text=e.reply_text)
    except pika.exceptions.ConnectionClosedByBroker as e:
        out(end='connection-closed', code=e.reply_code, text=e.reply_text)


if __name__ == '__main__':
    main()
