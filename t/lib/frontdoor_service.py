"""A service that speaks only AMQP, through sagad's front door, for
t/integration/frontdoor_saga.py: run by Debian's /usr/bin/python3
(python3-pika). Arguments: URL ROLE QUEUE IDLE. It consumes QUEUE
(prefetch 10) and, for each message, publishes its reaction on a confirm
channel of the same connection with the correlation id passed on (as a
choreographed saga's participant must), then acks the message. One JSON
line on stdout per message handled. Ends after IDLE seconds without one.

  payments  order.approved -> payment.captured, or payment.failed when
            the body's amount is over 1000; payment.refund-requested ->
            payment.refunded
  shipping  payment.captured -> shipment.scheduled, or shipment.failed when
            the body's amount is over 100
  stock     the commands of an orchestrated saga, answered RPC style: a
            reply to the command's reply_to on the default exchange with
            its correlation id, nothing more (sagad adds the saga's
            headers); stock.reserve refused (header x-sagad-outcome:
            failure) when the amount is over 100, stock.charge when over
            50; stock.release succeeds
"""

import json
import sys

import pika


def reaction(role, key, body):
    amount = json.loads(body or b'{}').get('amount', 0)
    if role == 'payments' and key == 'order.approved':
        return 'payment.failed' if amount > 1000 else 'payment.captured'
    if role == 'payments' and key == 'payment.refund-requested':
        return 'payment.refunded'
    if role == 'shipping' and key == 'payment.captured':
        return 'shipment.failed' if amount > 100 else 'shipment.scheduled'
    return None


def answer(key, body):
    """The stock service's verdict on a command: True, or False (refused)."""
    amount = json.loads(body or b'{}').get('amount', 0)
    return not ((key == 'stock.reserve' and amount > 100) or
                (key == 'stock.charge' and amount > 50))


def reply(pub, props, key, body):
    ok = answer(key, body)
    pub.basic_publish('', props.reply_to, json.dumps({'ok': ok}).encode(), pika.BasicProperties(
        delivery_mode=2, correlation_id=props.correlation_id,
        headers=None if ok else {'x-sagad-outcome': 'failure'}))
    return 'reply-%s' % ('ok' if ok else 'refused')


def main(url, role, queue, idle):
    conn = pika.BlockingConnection(pika.URLParameters(url))
    sub = conn.channel()
    pub = conn.channel()
    pub.confirm_delivery()
    sub.basic_qos(prefetch_count=10)
    for method, props, body in sub.consume(queue, inactivity_timeout=float(idle)):
        if method is None:
            break
        out = None
        if role == 'stock' and props.reply_to:
            out = reply(pub, props, method.routing_key, body)
        else:
            out = reaction(role, method.routing_key, body)
        if out and role != 'stock':
            pub.basic_publish('events', out, body, pika.BasicProperties(
                delivery_mode=2, correlation_id=props.correlation_id,
                message_id='%s:%s' % (props.message_id, out),
                content_type='application/json'))
        sub.basic_ack(method.delivery_tag)
        sys.stdout.write(json.dumps({'got': method.routing_key, 'cid': props.correlation_id,
                                     'sent': out, 'redelivered': method.redelivered}) + '\n')
        sys.stdout.flush()
    sub.cancel()
    conn.close()


if __name__ == '__main__':
    main(*sys.argv[1:])
