"""pika against sagad's AMQP front door, for t/integration/frontdoor.py:
run by Debian's /usr/bin/python3 (python3-pika), one command a run, its
results as JSON lines on stdout.

  publish URL N PREFIX     N persistent messages (message ids PREFIX-0...)
                           on a confirm channel, one line per confirm
  big URL N SIZE           N messages of SIZE bytes on a confirm channel:
                           how many were acked and nacked
  pipeline URL N           N publishes at once on a SelectConnection
                           confirm channel: every basic.ack/nack received
  heartbeat URL            heartbeat=1: kept alive while pika serves its
                           heartbeats (and channel.flow answered), dropped
                           by sagad after two silent intervals
  login URL                open and close a connection: the outcome
  refuse URL METHOD        basic.get or tx.select: the channel's close
  topo URL OPS             a JSON list of topology calls, made in order on
                           one connection (a new channel after a channel
                           error): one line per call, its answer's fields
                           or the close (channel or connection) with its
                           code and text; the same script runs against the
                           broker directly for reference
"""

import json
import sys
import time

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


def pipeline(url, n):
    n = int(n)
    acks = []

    def on_confirm(frame):
        m = frame.method
        acks.append([m.NAME, m.delivery_tag, bool(m.multiple)])
        if m.delivery_tag >= n:
            conn.close()

    def on_select_ok(_frame):
        for i in range(n):
            ch.basic_publish('events', 'fd.pipe', b'%d' % i,
                             pika.BasicProperties(delivery_mode=2, message_id='pipe-%d' % i))

    def on_channel(channel):
        global ch
        ch = channel
        ch.confirm_delivery(on_confirm, callback=on_select_ok)

    conn = pika.SelectConnection(pika.URLParameters(url),
                                 on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
                                 on_close_callback=lambda c, e: c.ioloop.stop())
    conn.ioloop.call_later(60, conn.ioloop.stop)
    conn.ioloop.start()
    out(acks=acks)


def heartbeat(url):
    c = pika.BlockingConnection(pika.URLParameters(url + '?heartbeat=1'))
    ch = c.channel()
    c.sleep(4)			# pika sends and reads heartbeats meanwhile
    ch.flow(False)
    ch.flow(True)
    ch.basic_publish('events', 'fd.hb', b'alive', pika.BasicProperties(message_id='hb-alive'))
    out(alive=True)
    time.sleep(5)		# silent: no heartbeats from pika now
    try:
        c.process_data_events(0)
        ch.basic_publish('events', 'fd.hb', b'late', pika.BasicProperties(message_id='hb-late'))
        c.process_data_events(1)
        out(dropped=False)
    except pika.exceptions.AMQPError as e:
        out(dropped=True, error=type(e).__name__)


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
            if method == 'basic.get':
                ch.basic_get('fd.nope')
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


def topo_call(ch, op, *a):
    """One call; the fields of its -ok as a dict."""
    if op == 'xdecl':
        ch.exchange_declare(a[0], a[1], durable=True, arguments=a[2] if len(a) > 2 else None)
        return {}
    if op == 'xdecl_passive':
        ch.exchange_declare(a[0], passive=True)
        return {}
    if op == 'xdel':
        ch.exchange_delete(a[0])
        return {}
    if op == 'qdecl':
        kw = a[1] if len(a) > 1 else {}
        r = ch.queue_declare(a[0], **kw).method
        return {'queue': r.queue, 'messages': r.message_count, 'consumers': r.consumer_count}
    if op == 'bind':
        ch.queue_bind(a[0], a[1], a[2])
        return {}
    if op == 'unbind':
        ch.queue_unbind(a[0], a[1], a[2])
        return {}
    if op == 'purge':
        return {'messages': ch.queue_purge(a[0]).method.message_count}
    if op == 'qdel':
        return {'messages': ch.queue_delete(a[0]).method.message_count}
    if op == 'qos':
        ch.basic_qos(prefetch_count=a[0])
        return {}
    if op == 'publish':
        ch.basic_publish(a[0], a[1], b'topo', pika.BasicProperties(message_id=a[2]))
        return {}
    raise ValueError(op)


def topo(url, ops):
    t0 = time.time()
    try:
        c = connect(url)
    except pika.exceptions.AMQPError as e:
        out(op='connect', ok=False, error=type(e).__name__)
        return
    ch = c.channel()
    for call in json.loads(ops):
        t0 = time.time()
        try:
            out(op=call[0], ok=True, **topo_call(ch, *call))
        except pika.exceptions.ChannelClosedByBroker as e:
            out(op=call[0], ok=False, code=e.reply_code, text=e.reply_text)
            ch = c.channel()
        except (pika.exceptions.ConnectionClosedByBroker, pika.exceptions.StreamLostError,
                pika.exceptions.ConnectionWrongStateError) as e:
            out(op=call[0], ok=False, connection=True, code=getattr(e, 'reply_code', 0),
                text=getattr(e, 'reply_text', repr(e)), seconds=round(time.time() - t0, 1))
            return
    c.close()


if __name__ == '__main__':
    {'publish': publish, 'big': big, 'pipeline': pipeline, 'heartbeat': heartbeat, 'login': login, 'refuse': refuse,
     'topo': topo}[sys.argv[1]](*sys.argv[2:])
