#!/usr/bin/env python3
"""TLS to the broker: the test makes its own CA, server and client
certificates (openssl), starts RabbitMQ with an AMQPS listener that requires
a client certificate, and runs sagad with amqps:// and broker.tls.

(a) ca + cert + key, connect by "localhost": messages flow, the broker sees
    a TLS connection with sagad's client certificate;
(b) a CA that did not sign the server certificate: no connection, a clear
    log line, /readyz 503, nothing published; and against a plain TCP
    listener sagad only ever sends TLS handshakes, never AMQP in the clear;
(c) a host name that the certificate does not carry (127.0.0.2): no
    connection, a log line naming the host name check;
(d) verify = false with the wrong CA and the wrong name: connects, flows;
(e) no client certificate while the broker requires one: no connection;
(f) sagad -n refuses tls settings with an amqp:// url.

rabbitmq-c 0.11 checks the host name against the DNS names of the
certificate's subjectAltName only (IP address entries are ignored; the CN
only when there is no subjectAltName at all): connecting by 127.0.0.1 to a
certificate with "IP:127.0.0.1" fails the check. The test prints what this
library does with that case, without asserting it.
"""

import os
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402


def openssl(*args, cwd):
    r = subprocess.run(['openssl'] + list(args), cwd=cwd, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise RuntimeError('openssl %s: %s' % (' '.join(args), r.stdout.decode(errors='replace')))


def make_pki(d):
    """ca.pem (signs server + client), other-ca.pem (signs nothing we use),
    server.pem (SAN DNS:localhost, IP:127.0.0.1), client.pem."""
    os.makedirs(d, exist_ok=True)
    for ca in ('ca', 'other-ca'):
        openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', ca + '.key',
                '-out', ca + '.pem', '-days', '2', '-subj', '/CN=sagad test %s' % ca,
                '-addext', 'basicConstraints=critical,CA:TRUE',
                '-addext', 'keyUsage=critical,keyCertSign,cRLSign', cwd=d)
    exts = {
        'server': 'subjectAltName=DNS:localhost,IP:127.0.0.1\n'
                  'extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n',
        'client': 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n',
    }
    for name, ext in exts.items():
        with open(os.path.join(d, name + '.ext'), 'w') as f:
            f.write(ext)
        cn = 'localhost' if name == 'server' else 'sagad-orders'
        openssl('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', name + '.key',
                '-out', name + '.csr', '-subj', '/CN=%s' % cn, cwd=d)
        openssl('x509', '-req', '-in', name + '.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key',
                '-CAcreateserial', '-out', name + '.pem', '-days', '2',
                '-extfile', name + '.ext', cwd=d)
    for f in os.listdir(d):
        os.chmod(os.path.join(d, f), 0o644)   # the node runs as user rabbitmq
    os.chmod(d, 0o755)
    return {k: os.path.join(d, k + '.pem') for k in ('ca', 'other-ca', 'server', 'client')} | {
        'server_key': os.path.join(d, 'server.key'), 'client_key': os.path.join(d, 'client.key')}


def tls_block(ca=None, cert=None, key=None, verify=None):
    parts = []
    if ca:
        parts.append('ca = %s;' % h.conf_str(ca))
    if cert:
        parts.append('cert = %s; key = %s;' % (h.conf_str(cert), h.conf_str(key)))
    if verify is not None:
        parts.append('verify = %s;' % ('true' if verify else 'false'))
    return 'tls = { %s };' % ' '.join(parts)


def amqps(host, port):
    return 'amqps://guest:guest@%s:%d/%%2f' % (host, port)


def new_sagad(wd, name, url, tls):
    return h.Sagad(wd, url, name=name, broker_extra=tls + '\n  reconnect_initial = 0.2;'
                   ' reconnect_max = 1;')


def flows(d, broker, tool, queue, n):
    tool.declare_queue(broker.url, queue, [('events', queue + '.#')])
    for i in range(n):
        st, doc, _ = d.publish('events', '%s.%d' % (queue, i), b'x %d' % i,
                               {'Message-Id': '%s-%d' % (queue, i)})
        if st != 202:
            raise AssertionError('publish %d answered %d %s' % (i, st, doc))
    h.wait_until(lambda: d.metric('sagad_outbox_pending') == 0, 60,
                 'the outbox drained over TLS')
    got = {m['message_id'] for m in tool.consume(broker.url, queue, n + 10, timeout=3)}
    missing = {'%s-%d' % (queue, i) for i in range(n)} - got
    h.check(not missing, '%s: all %d messages published over TLS arrived' % (queue, n),
            sorted(missing)[:5])


def refused(d, n_pub, pattern, what, wait=8):
    """sagad d runs but never connects: readyz 503, connected 0, accepted
    messages stay pending, a log line matching pattern."""
    sts = [d.publish('events', 'never.%d' % i, b'n', {'Message-Id': 'never-%d' % i})[0]
           for i in range(n_pub)]
    h.check(sts == [202] * n_pub, '%s: ingress still accepts (202) while the broker is '
            'unreachable' % what, sts)
    h.wait_until(lambda: pattern in d.log(), 20, '%s: log line with %r' % (what, pattern))
    time.sleep(wait)
    st, body = d.admin_get('/readyz')
    m = d.metrics()
    h.check(st == 503 and m.get('sagad_broker_connected') == 0,
            '%s: /readyz 503 and sagad_broker_connected 0 after %ds' % (what, wait),
            (st, body, m.get('sagad_broker_connected')))
    h.check(m.get('sagad_outbox_pending') == n_pub and m.get('sagad_published_total') == 0,
            '%s: nothing published, %d pending' % (what, n_pub),
            (m.get('sagad_outbox_pending'), m.get('sagad_published_total')))
    lines = [l for l in d.log().splitlines() if pattern in l]
    h.log('%s: %d such log lines, e.g.: %s' % (what, len(lines), lines[0]))
    h.check('msg="broker connected"' not in d.log(),
            '%s: no connection ever logged as established' % what)
    return lines


class SniffServer:
    """A plain TCP listener that records the first bytes of every
    connection, then closes it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.first = []
        self.stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            c.settimeout(3)
            try:
                data = c.recv(16)
            except OSError:
                data = b''
            self.first.append(data)
            c.close()

    def close(self):
        self.stop = True
        self.sock.close()


def main(wd):
    tool = h.AmqpTool()
    pki = make_pki(os.path.join(wd, 'pki'))
    broker = h.Broker(wd, tls={'cacert': pki['ca'], 'certfile': pki['server'],
                               'keyfile': pki['server_key'], 'verify': 'verify_peer',
                               'fail_if_no_peer_cert': True,
                               'hosts': ['127.0.0.1', '127.0.0.2']})
    broker.start()
    port = broker.tls_port

    h.log('== (f) sagad -n: tls settings need amqps://')
    bad = new_sagad(wd, 'badconf', broker.url, tls_block(ca=pki['ca']))
    r = subprocess.run([h.sagad_path(), '-n', '-f', bad.conf], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    err = r.stderr.decode()
    h.check(r.returncode == 1 and 'amqps' in err and bad.conf + ':' in err,
            'sagad -n: tls with amqp:// is refused with FILE:LINE (exit 1)',
            (r.returncode, err))

    h.log('== (a) amqps://localhost with ca, client cert and key')
    d = new_sagad(wd, 'good', amqps('localhost', port),
                  tls_block(pki['ca'], pki['client'], pki['client_key']))
    d.start()
    flows(d, broker, tool, 'tlsa', 200)
    out = broker.ctl('list_connections', 'client_properties', 'ssl', 'ssl_protocol',
                     'peer_cert_subject')
    lines = [l for l in out.splitlines() if 'sagad' in l]
    h.check(lines and all('\ttrue\t' in l for l in lines),
            'the broker sees sagad\'s connection(s) as TLS', out)
    h.check(all('CN=sagad-orders' in l for l in lines),
            'the broker sees sagad\'s client certificate (CN=sagad-orders)', out)
    h.log('broker view: %s' % ' | '.join(l.split('\t', 1)[1] for l in lines))
    h.check(d.stop() == 0, 'sagad (a) stopped with 0')

    h.log('== (b) wrong CA')
    d = new_sagad(wd, 'wrongca', amqps('localhost', port),
                  tls_block(pki['other-ca'], pki['client'], pki['client_key']))
    d.start(wait_ready=False)
    refused(d, 5, 'SSL peer cert verification failed', 'wrong CA')
    h.check(d.stop() == 0, 'sagad (b) stopped with 0')

    h.log('== (b2) no fallback to plaintext: a plain TCP peer only ever sees TLS handshakes')
    sniff = SniffServer()
    d = new_sagad(wd, 'sniff', amqps('localhost', sniff.port),
                  tls_block(pki['ca'], pki['client'], pki['client_key']))
    d.start(wait_ready=False)
    h.wait_until(lambda: len(sniff.first) >= 4, 30, '4 connection attempts to the plain peer')
    d.stop()
    sniff.close()
    starts = sorted({b[:3].hex() for b in sniff.first})
    h.check(all(b[:1] == b'\x16' for b in sniff.first if b) and
            not any(b.startswith(b'AMQP') for b in sniff.first),
            '%d connections, each began with a TLS handshake record (0x16), none with '
            '"AMQP" in the clear' % len(sniff.first), starts)

    h.log('== (c) host name not in the certificate (127.0.0.2)')
    d = new_sagad(wd, 'wrongname', amqps('127.0.0.2', port),
                  tls_block(pki['ca'], pki['client'], pki['client_key']))
    d.start(wait_ready=False)
    refused(d, 3, 'SSL hostname verification failed', 'host name mismatch')
    h.check(d.stop() == 0, 'sagad (c) stopped with 0')

    h.log('== (c2) what rabbitmq-c does with an IP subjectAltName (127.0.0.1, informational)')
    d = new_sagad(wd, 'ipsan', amqps('127.0.0.1', port),
                  tls_block(pki['ca'], pki['client'], pki['client_key']))
    d.start(wait_ready=False)
    try:
        h.wait_until(lambda: d.admin_get('/readyz')[0] == 200 or
                     'verification failed' in d.log(), 20, 'connected or refused')
    except AssertionError:
        pass
    ipsan = ('connects' if d.admin_get('/readyz')[0] == 200 else
             'refused (%s)' % ('hostname check' if 'hostname verification' in d.log()
                               else 'other'))
    h.log('connecting by 127.0.0.1 with "IP:127.0.0.1" in the certificate: %s' % ipsan)
    d.stop()

    h.log('== (d) verify = false: wrong CA and wrong name, still connects')
    d = new_sagad(wd, 'noverify', amqps('127.0.0.2', port),
                  tls_block(pki['other-ca'], pki['client'], pki['client_key'], verify=False))
    d.start()
    flows(d, broker, tool, 'tlsd', 50)
    h.check(d.stop() == 0, 'sagad (d) stopped with 0')

    h.log('== (e) no client certificate while the broker requires one')
    d = new_sagad(wd, 'nocert', amqps('localhost', port), tls_block(pki['ca']))
    d.start(wait_ready=False)
    h.wait_until(lambda: 'broker connect failed' in d.log(), 20, 'a connect failure')
    time.sleep(4)
    st, _ = d.admin_get('/readyz')
    h.check(st == 503 and d.metric('sagad_broker_connected') == 0,
            'no client certificate: never connected', st)
    line = [l for l in d.log().splitlines() if 'broker connect failed' in l][0]
    h.log('no client certificate: %s' % line)
    h.check(d.stop() == 0, 'sagad (e) stopped with 0')
    h.log('figures: tls ok=250 messages; wrong CA, wrong name, no client cert refused; '
          'IP SAN with rabbitmq-c 0.11: %s' % ipsan)


h.run_test(main)
