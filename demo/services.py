"""The demo's three participant services (Python standard library only).

Each is a tiny HTTP service that its own sagad calls with the messages of
its subscription. They follow the rules of a saga participant (sagad.conf(5),
SAGAS): handlers are idempotent by business key, a refusal is answered with
409, and the answer body is what the orchestrator passes to a compensation.
The warehouses of the 2PC variant (demo.py --2pc) are participants of a
transaction instead (sagad.conf(5), TRANSACTIONS): PREPARE, COMMIT and
ABORT, idempotent by transaction id.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:
    import pika
except ImportError:         # only the --amqp variant needs it
    pika = None


class Service:
    """A participant: name -> handler(kind, routing_key, body) -> (status, dict);
    with tx=True, handler(kind, routing_key, body, transaction id) (the
    Sagad-Transaction header sagad adds to PREPARE, COMMIT and ABORT)."""

    def __init__(self, name, handler, tx=False):
        self.name = name
        self.handler = handler
        self.lock = threading.Lock()
        self.calls = []          # (routing_key, message_id, attempt, status)
        service = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def do_POST(self):
                n = int(self.headers.get('Content-Length') or 0)
                body = self.rfile.read(n)
                key = self.headers.get('Sagad-Routing-Key', '')
                try:
                    data = json.loads(body or b'{}')
                except ValueError:
                    data = {}
                args = (self.headers.get('Sagad-Kind', 'event'), key, data)
                if tx:
                    args += (self.headers.get('Sagad-Transaction'),)
                status, answer = service.handler(*args)
                with service.lock:
                    service.calls.append((key, self.headers.get('Message-Id'),
                                          self.headers.get('Sagad-Attempt'), status))
                out = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass        # sagad closing idle keep-alive connections

        self.server = Server(('127.0.0.1', 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = 'http://127.0.0.1:%d/messages' % self.port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def count(self, key, status=None):
        with self.lock:
            return sum(1 for k, _, _, s in self.calls
                       if k == key and (status is None or s == status))


class AmqpService:
    """The same participant behind sagad's AMQP front door instead of HTTP
    (demo.py --amqp): its own RabbitMQ client, pika, consumes the
    subscription's queue from sagad (deliver = "amqp") and answers each
    command RPC style, to its reply_to with its correlation id; a refusal
    (what the HTTP service answers with 409) carries x-sagad-outcome:
    failure. sagad adds the saga's headers to the reply (sagad(8), THE AMQP
    FRONT DOOR, Sagas). The handler is the HTTP service's."""

    def __init__(self, name, handler):
        if pika is None:
            raise SystemExit('the --amqp variant needs pika (apt-get install python3-pika)')
        self.name = name
        self.handler = handler
        self.calls = []
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = None

    def start(self, url, queue):
        """Consume queue through the front door at url (amqp://...)."""
        conn = pika.BlockingConnection(pika.URLParameters(url))
        self.thread = threading.Thread(target=self.serve, args=(conn, queue), daemon=True)
        self.thread.start()

    def serve(self, conn, queue):
        try:
            self.consume(conn, queue)
        except pika.exceptions.AMQPError as e:
            if not self.stopping:
                print('payment service: its AMQP connection failed: %r' % e, flush=True)

    def consume(self, conn, queue):
        ch = conn.channel()
        ch.basic_qos(prefetch_count=16)
        for method, props, body in ch.consume(queue, inactivity_timeout=0.2):
            if self.stopping:
                break
            if method is None:
                continue
            headers = props.headers or {}
            kind = headers.get('x-sagad-kind', 'event')
            try:
                data = json.loads(body or b'{}')
            except ValueError:
                data = {}
            status, answer = self.handler(kind, method.routing_key, data)
            if props.reply_to:
                ch.basic_publish('', props.reply_to, json.dumps(answer).encode(),
                                 pika.BasicProperties(
                                     delivery_mode=2, correlation_id=props.correlation_id,
                                     content_type='application/json',
                                     headers=None if status < 300 else
                                     {'x-sagad-outcome': 'failure'}))
            ch.basic_ack(method.delivery_tag)
            with self.lock:
                self.calls.append((method.routing_key, props.message_id, None, status))
        ch.cancel()
        conn.close()

    def stop(self):
        self.stopping = True
        if self.thread:
            self.thread.join(10)


class Stock:
    """Reserves and releases stock; some reservations are slow."""

    def __init__(self, slow_every=7, slow_seconds=1.5):
        self.reserved = {}           # order -> reservation id (idempotent)
        self.released = set()
        self.slow_every = slow_every
        self.slow_seconds = slow_seconds
        self.lock = threading.Lock()
        self.service = Service('stock', self.handle)

    def handle(self, kind, key, order):
        oid = order.get('order', 0)
        if key == 'stock.reserve':
            if self.slow_every and oid % self.slow_every == 0:
                time.sleep(self.slow_seconds)     # a slow warehouse
            with self.lock:
                rid = self.reserved.setdefault(oid, 'r-%d' % oid)
            return 200, {'order': oid, 'reservation': rid}
        if key == 'stock.release':
            with self.lock:
                self.released.add(oid)
            return 200, {'order': oid, 'released': True}
        return 422, {'error': 'unknown command'}


class Payment:
    """Authorizes payments up to a limit; refuses the others with 409."""

    def __init__(self, limit=900, amqp=False):
        self.limit = limit
        self.authorized = {}
        self.cancelled = set()
        self.refused = set()
        self.lock = threading.Lock()
        self.service = (AmqpService if amqp else Service)('payment', self.handle)

    def handle(self, kind, key, order):
        oid = order.get('order', 0)
        if key == 'payment.authorize':
            if order.get('amount', 0) > self.limit:
                with self.lock:
                    self.refused.add(oid)
                return 409, {'order': oid, 'reason': 'amount over the card limit'}
            with self.lock:
                pid = self.authorized.setdefault(oid, 'p-%d' % oid)
            return 200, {'order': oid, 'payment': pid}
        if key == 'payment.cancel':
            with self.lock:
                self.cancelled.add(oid)
            return 200, {'order': oid, 'cancelled': True}
        return 422, {'error': 'unknown command'}


class Orders:
    """Approves orders and records how each one ended."""

    def __init__(self):
        self.approved = set()
        self.final = {}
        self.lock = threading.Lock()
        self.service = Service('order', self.handle)

    def handle(self, kind, key, order):
        oid = order.get('order', 0)
        with self.lock:
            if key == 'order.approve':
                self.approved.add(oid)
                return 200, {'order': oid, 'approved': True}
            if key in ('order.approved', 'order.rejected'):
                self.final[oid] = key.split('.')[1]
                return 200, {}
        return 422, {'error': 'unknown message'}


class Warehouse:
    """A participant of the 2PC variant: PREPARE holds the order's quantity
    if there is enough stock (a yes vote) or answers 409 (no); COMMIT makes
    the hold final, ABORT puts it back. A repeated message finds the
    transaction's record and answers as before, changing nothing."""

    def __init__(self, name, stock):
        self.name = name
        self.stock = stock           # units free to hold
        self.held = {}               # transaction -> units held, awaiting the decision
        self.committed = {}          # transaction -> units
        self.aborted = set()         # held, then released by ABORT
        self.refused = set()         # voted no
        self.lock = threading.Lock()
        self.service = Service(name, self.handle, tx=True)

    def handle(self, kind, key, order, tx):
        want = order.get('items', {}).get(self.name, 0)
        with self.lock:
            if kind == 'prepare':
                if tx in self.held or tx in self.committed:
                    return 200, {'held': want}
                if tx in self.refused or tx in self.aborted or want > self.stock:
                    self.refused.add(tx)
                    return 409, {'reason': 'only %d left at %s' % (self.stock, self.name)}
                self.stock -= want
                self.held[tx] = want
                return 200, {'held': want}
            if kind == 'commit':
                if tx in self.held:
                    self.committed[tx] = self.held.pop(tx)
                return 200, {'committed': tx in self.committed}
            if kind == 'abort':
                if tx in self.held:
                    self.stock += self.held.pop(tx)
                    self.aborted.add(tx)
                return 200, {'aborted': True}
        return 422, {'error': 'unknown message'}
