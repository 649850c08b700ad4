"""A RabbitMQ client that nobody here wrote, for the tests: pika (Debian's
python3-pika), run by Debian's /usr/bin/python3 whatever python runs the
test (harness.Pika). One command a run; its results as JSON lines.

  declare URL QUEUE [EXCHANGE:KEY ...]   a durable queue and its bindings
  publish URL EXCHANGE KEY SPEC          SPEC: JSON {body, message_id,
                                         headers, correlation_id,
                                         reply_to}; waits for the confirm
  get URL QUEUE COUNT TIMEOUT            up to COUNT messages (acked),
                                         stopping TIMEOUT s after the last
"""

import json
import sys
import time

import pika


def connect(url):
    return pika.BlockingConnection(pika.URLParameters(url))


def declare(url, queue, *binds):
    with connect(url) as c:
        ch = c.channel()
        ch.queue_declare(queue, durable=True)
        for b in binds:
            ex, key = b.split(':', 1)
            ch.queue_bind(queue, ex, routing_key=key)


def publish(url, exchange, key, spec):
    spec = json.loads(spec)
    props = pika.BasicProperties(message_id=spec.get('message_id'),
                                 correlation_id=spec.get('correlation_id'),
                                 reply_to=spec.get('reply_to'),
                                 headers=spec.get('headers'), delivery_mode=2)
    with connect(url) as c:
        ch = c.channel()
        ch.confirm_delivery()
        ch.basic_publish(exchange, key, spec.get('body', '').encode(), props, mandatory=True)


def get(url, queue, count, timeout):
    count, timeout = int(count), float(timeout)
    with connect(url) as c:
        ch = c.channel()
        got, last = 0, time.time()
        while got < count and time.time() - last < timeout:
            method, props, body = ch.basic_get(queue)
            if method is None:
                time.sleep(0.05)
                continue
            ch.basic_ack(method.delivery_tag)
            got, last = got + 1, time.time()
            hdrs = {k: (v.decode() if isinstance(v, bytes) else v)
                    for k, v in (props.headers or {}).items()}
            print(json.dumps({'exchange': method.exchange, 'routing_key': method.routing_key,
                              'message_id': props.message_id,
                              'correlation_id': props.correlation_id,
                              'headers': hdrs, 'body': body.decode('utf-8', 'replace')}),
                  flush=True)


if __name__ == '__main__':
    {'declare': declare, 'publish': publish, 'get': get}[sys.argv[1]](*sys.argv[2:])
