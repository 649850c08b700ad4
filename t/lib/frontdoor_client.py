"""pika against sagad's AMQP front door, for t/integration/frontdoor.py:
run by Debian's /usr/bin/python3 (python3-pika), one command a run, its
results as JSON lines on stdout.

  publish URL N PREFIX     N persistent messages (message ids PREFIX-0...)
                           on a confirm channel, one line per confirm
  big URL N SIZE           N messages of SIZE bytes on a confirm channel:
                           how many were acked and nacked
  login URL                open and close a connection: the outcome
  refuse URL METHOD        queue.declare or tx.select: the channel's close
"""

import json
import sys

import pika


def out(**kw):
    sys.stdout.write(json.dumps(kw) + '\n')
    sys.stdout.flush()


def connect(url):
    return pika.BlockingConnection(pika.URLParameters(url))


def publish(url, n, prefix):
    with connect(url) as c:
        ch = c.channel()
        ch.confirm_delivery()
        for i in range(int(n)):
            mid = '%s-%d' % (prefix, i)
            # basic_publish returns once the confirm is in (raises on nack).
            ch.basic_publish('events', 'fd.%d' % i, json.dumps({'n': i}).encode(),
                             pika.BasicProperties(delivery_mode=2, message_id=mid,
                                                  content_type='application/json',
                                                  headers={'seq': i, 'who': 'pika'}))
            out(confirmed=mid)


def big(url, n, size):
    acked = nacked = 0
    with connect(url) as c:
        ch = c.channel()
        ch.confirm_delivery()
        for _ in range(int(n)):
            try:
                ch.basic_publish('events', 'fd.big', b'x' * int(size),
                                 pika.BasicProperties(delivery_mode=2))
                acked += 1
            except pika.exceptions.NackError:
                nacked += 1
    out(acked=acked, nacked=nacked)


def login(url):
    try:
        with connect(url):
            out(ok=True)
    except pika.exceptions.AMQPError as e:
        out(ok=False, error=type(e).__name__, text=repr(e))


def refuse(url, method):
    with connect(url) as c:
        ch = c.channel()
        try:
            if method == 'queue.declare':
                ch.queue_declare('fd.nope')
            else:
                ch.tx_select()
            out(ok=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            out(ok=False, code=e.reply_code, text=e.reply_text)
        # the connection lives on: a new channel publishes
        ch = c.channel()
        ch.confirm_delivery()
        ch.basic_publish('events', 'fd.after', b'after', pika.BasicProperties(message_id='after-' + method))
        out(after=True)


if __name__ == '__main__':
    {'publish': publish, 'big': big, 'login': login, 'refuse': refuse}[sys.argv[1]](*sys.argv[2:])
