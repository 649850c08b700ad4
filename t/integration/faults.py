#!/usr/bin/env python3
"""Faults: (a) the broker stops while a client publishes at a steady pace,
(a2) the broker is killed; (b) sagad is killed (SIGKILL) while publishing and
restarted on the same store; (e) the broker blocks publishers and sagad gets
SIGTERM; (c) SIGHUP with a broken configuration file; (d) SIGTERM."""

import collections
import http.client
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402


def wait_drained(d, timeout, what):
    def ok():
        try:
            return d.metrics().get('sagad_outbox_pending') == 0
        except (OSError, http.client.HTTPException):
            return False
    h.wait_until(ok, timeout, 'sagad_outbox_pending == 0 (%s)' % what, interval=0.5)


def read_all(tool, url, queue, expect, timeout=3):
    msgs = tool.consume(url, queue, expect * 3 + 100, timeout=timeout)
    return [m.get('message_id') for m in msgs]


def first_order_ok(ids, prefix):
    """First occurrences appear in increasing order of their number."""
    seen, order = set(), []
    for m in ids:
        if m not in seen:
            seen.add(m)
            order.append(int(m[len(prefix):]))
    bad = [(x, y) for x, y in zip(order, order[1:]) if y < x]
    return bad


def phase_a(wd, broker, d, tool):
    h.log('== (a) broker stopped while a client publishes 2,000 messages at a steady pace')
    tool.declare_queue(broker.url, 'fa', [('events', 'a.#')])
    n, rate = 2000, 100.0
    statuses = {}
    errors = []
    done = threading.Event()

    def publisher():
        t0 = time.time()
        try:
            for i in range(n):
                delay = t0 + i / rate - time.time()
                if delay > 0:
                    time.sleep(delay)
                st, doc, _ = d.publish('events', 'a.%d' % i, b'a %d' % i,
                                       {'Message-Id': 'a-%d' % i})
                statuses[i] = st
                if st != 202:
                    errors.append((i, st, doc))
        except Exception as e:  # noqa: BLE001
            errors.append(('exception', repr(e)))
        finally:
            done.set()

    th = threading.Thread(target=publisher, daemon=True)
    th.start()
    h.wait_until(lambda: len(statuses) >= 400, 30, '400 messages accepted')
    broker.stop()
    h.log('broker stopped after %d accepted' % len(statuses))
    time.sleep(4)
    st, _ = d.admin_get('/readyz')
    h.check(st == 503, 'broker down: /readyz answers 503', st)
    m = d.metrics()
    h.check(m.get('sagad_broker_connected') == 0, 'broker down: sagad_broker_connected 0',
            m.get('sagad_broker_connected'))
    broker.start()
    h.log('broker started again with %d accepted' % len(statuses))
    th.join(120)
    h.check(done.is_set(), 'the publisher finished')
    h.check(not errors and len(statuses) == n, 'every one of the %d POSTs answered 202' % n,
            'errors %s' % errors[:5])
    wait_drained(d, 90, 'phase a')
    ids = read_all(tool, broker.url, 'fa', n)
    want = {'a-%d' % i for i in range(n)}
    missing = want - set(ids)
    h.check(not missing, 'all %d messages arrived (by message_id)' % n,
            '%d missing, e.g. %s' % (len(missing), sorted(missing)[:10]))
    h.log('phase a: %d deliveries, %d duplicates' % (len(ids), len(ids) - len(set(ids))))
    bad = first_order_ok(ids, 'a-')
    h.check(not bad, 'first occurrences in the order accepted', bad[:5])
    st, _ = d.admin_get('/readyz')
    h.check(st == 200, 'broker back: /readyz 200', st)


def phase_b(wd, broker, d, tool):
    h.log('== (b) sagad killed with SIGKILL while publishing 3,000 messages; restart on the '
          'same store')
    tool.declare_queue(broker.url, 'fb', [('events', 'b.#')])
    n = 3000
    answers = {}              # i -> status of the final answer (202 / 200)
    failures = collections.Counter()
    errors = []
    state = {'i': 0}
    done = threading.Event()

    conn = [None]

    def post(i):
        # A connection of the thread's own: d.kill() closes the harness's
        # shared one under it.
        if conn[0] is None:
            conn[0] = http.client.HTTPConnection('127.0.0.1', d.port, timeout=10)
        hdrs = {'Message-Id': 'b-%d' % i}
        if d.token is not None:
            hdrs['Authorization'] = 'Bearer ' + d.token
        try:
            conn[0].request('POST', '/v1/publish/events/b.%d' % i, body=b'b %d' % i,
                            headers=hdrs)
            r = conn[0].getresponse()
            data = r.read()
            if r.will_close:
                conn[0].close()
                conn[0] = None
            return r.status, data
        except Exception:
            conn[0].close()
            conn[0] = None
            raise

    def publisher():
        deadline = time.time() + 150
        i = 0
        try:
            while i < n and time.time() < deadline:
                try:
                    st, doc = post(i)
                except (OSError, http.client.HTTPException) as e:
                    failures[type(e).__name__] += 1
                    time.sleep(0.05)
                    continue          # same message again: it may or may not be stored
                if st in (200, 202):
                    answers[i] = st
                    i += 1
                    state['i'] = i
                else:
                    errors.append((i, st, doc))
                    time.sleep(0.05)
        finally:
            done.set()

    th = threading.Thread(target=publisher, daemon=True)
    th.start()
    h.wait_until(lambda: state['i'] >= 1000, 60, '1000 messages accepted')
    d.kill()
    killed_at = state['i']
    h.log('sagad killed (SIGKILL) with %d accepted' % killed_at)
    time.sleep(1)
    d.start()
    th.join(160)
    h.check(done.is_set() and len(answers) == n, 'all %d messages eventually accepted' % n,
            '%d accepted, errors %s' % (len(answers), errors[:5]))
    h.log('connection failures while sagad was down: %s' % dict(failures))
    dup_answers = [i for i, st in answers.items() if st == 200]
    h.log('answered 200 duplicate after the restart: %s' % dup_answers[:10])
    h.check(not errors, 'no error answers', errors[:5])
    wait_drained(d, 90, 'phase b')
    ids = read_all(tool, broker.url, 'fb', n)
    want = {'b-%d' % i for i in answers}
    missing = want - set(ids)
    h.check(not missing, 'every message that got 202/200 arrived at least once',
            '%d missing, e.g. %s' % (len(missing), sorted(missing, key=lambda s: int(s[2:]))[:10]))
    h.log('phase b: %d deliveries, %d duplicates on the wire' % (len(ids), len(ids) - len(set(ids))))
    bad = first_order_ok(ids, 'b-')
    h.check(not bad, 'first occurrences in the order accepted', bad[:5])


def phase_kill_broker(wd, broker, d, tool):
    h.log('== (a2) broker killed (SIGKILL) while a client publishes 1,000 messages')
    tool.declare_queue(broker.url, 'fk', [('events', 'k.#')])
    n = 1000
    errors = []
    accepted = []
    done = threading.Event()

    def publisher():
        try:
            for i in range(n):
                st, doc, _ = d.publish('events', 'k.%d' % i, b'k %d' % i,
                                       {'Message-Id': 'k-%d' % i})
                if st != 202:
                    errors.append((i, st, doc))
                accepted.append(i)
                time.sleep(0.005)
        except Exception as e:  # noqa: BLE001
            errors.append(('exception', repr(e)))
        finally:
            done.set()

    th = threading.Thread(target=publisher, daemon=True)
    th.start()
    h.wait_until(lambda: len(accepted) >= 300, 30, '300 messages accepted')
    broker.kill()
    h.log('broker killed after %d accepted' % len(accepted))
    time.sleep(2)
    broker.start()
    th.join(120)
    h.check(done.is_set() and not errors, 'every one of the %d POSTs answered 202' % n,
            errors[:5])
    wait_drained(d, 90, 'phase a2')
    ids = read_all(tool, broker.url, 'fk', n)
    missing = {'k-%d' % i for i in range(n)} - set(ids)
    h.check(not missing, 'all %d messages arrived after the broker crash' % n,
            '%d missing, e.g. %s' % (len(missing), sorted(missing)[:10]))
    h.log('phase a2: %d deliveries, %d duplicates' % (len(ids), len(ids) - len(set(ids))))
    h.check(not first_order_ok(ids, 'k-'), 'first occurrences in the order accepted')


def phase_blocked(wd, broker, d, tool):
    h.log('== (e) broker blocks publishers (memory alarm); SIGTERM while messages are '
          'unconfirmed')
    tool.declare_queue(broker.url, 'fe', [('events', 'e.#')])
    broker.ctl('set_vm_memory_high_watermark', '0')
    time.sleep(1)
    n = 50
    for i in range(n):
        st, doc, _ = d.publish('events', 'e.%d' % i, b'e %d' % i, {'Message-Id': 'e-%d' % i},
                               timeout=10)
        if st != 202:
            raise AssertionError('broker blocked: publish e-%d answered %s %r' % (i, st, doc))
    h.check(True, 'broker blocked: %d POSTs answered 202' % n)
    time.sleep(2)
    st, _ = d.admin_get('/healthz', timeout=5)
    h.check(st == 200, 'broker blocked: /healthz still answers', st)
    pending = d.metrics().get('sagad_outbox_pending')
    h.check(pending and pending > 0, 'broker blocked: messages stay pending (%s)' % pending)
    t0 = time.time()
    d.proc.send_signal(15)
    time.sleep(0.5)
    try:
        r = d.publish('events', 'e.late', b'late', {'Message-Id': 'e-late'}, timeout=5)
        h.check(r[0] == 503 and isinstance(r[1], dict) and 'error' in r[1]
                and 'retry-after' in r[2],
                'publish while draining: 503 with a JSON body and Retry-After', r)
    except (OSError, http.client.HTTPException) as e:
        h.log('publish while draining: not served (%s): the listener is closed'
              % type(e).__name__)
    rc = d.stop(timeout=d.drain_timeout + 15)
    el = time.time() - t0
    h.check(rc == 0, 'SIGTERM while blocked: exit 0 (%.1fs, drain_timeout %s)'
            % (el, d.drain_timeout), rc)
    h.check(el <= d.drain_timeout + 5, 'SIGTERM while blocked: exit within drain_timeout '
            '(+5 s)', el)
    broker.ctl('set_vm_memory_high_watermark', '0.4')
    d.start()
    wait_drained(d, 60, 'phase e')
    ids = read_all(tool, broker.url, 'fe', n)
    missing = {'e-%d' % i for i in range(n)} - set(ids)
    h.check(not missing, 'after the restart all %d messages arrived' % n,
            '%d missing, e.g. %s' % (len(missing), sorted(missing)[:10]))
    h.log('phase e: %d deliveries, %d duplicates' % (len(ids), len(ids) - len(set(ids))))


def phase_c(wd, broker, d, tool):
    h.log('== (c) SIGHUP with a broken configuration file')
    tool.declare_queue(broker.url, 'fc', [('events', 'c.#')])
    good = d.conf_text()
    pid = d.proc.pid
    sent = []

    def publish_ok(tag):
        st, doc, _ = d.publish('events', 'c.%s' % tag, b'c', {'Message-Id': 'c-%s' % tag})
        h.check(st == 202, 'publish after %s: 202' % tag, (st, doc))
        sent.append('c-%s' % tag)

    for tag, text, what in (
            ('syntax', good + 'broken = {\n  x = 1\n', 'a syntax error'),
            ('unknown', good + 'bogus_reload_key = 1;\n', 'an unknown key'),
            ('noservice', good.replace('service = "orders";\n', ''), 'no service'),
            ('empty', '', 'an empty file')):
        before = len(d.log())
        d.write_conf(text)
        d.hup()
        time.sleep(1.5)
        h.check(d.running() and d.proc.pid == pid, 'SIGHUP with %s: sagad still running' % what)
        st, _ = d.admin_get('/readyz')
        h.check(st == 200, 'SIGHUP with %s: /readyz 200' % what, st)
        publish_ok(tag)
        new = d.log()[before:]
        lines = [ln for ln in new.splitlines()
                 if os.path.basename(d.conf) in ln or 'reload' in ln.lower()
                 or 'config' in ln.lower()]
        h.check(lines, 'SIGHUP with %s: the log says why' % what, 'new log:\n%s' % new[-1500:])
        h.log('   log: %s' % ' | '.join(lines[-3:])[:400])
    # a missing file
    os.rename(d.conf, d.conf + '.away')
    d.hup()
    time.sleep(1.5)
    os.rename(d.conf + '.away', d.conf)
    h.check(d.running(), 'SIGHUP with the file missing: sagad still running')
    publish_ok('missing')

    d.write_conf(good)
    d.hup()
    time.sleep(1.5)
    h.check(d.running() and d.proc.pid == pid, 'SIGHUP with the fixed file: still running')
    st, _ = d.admin_get('/readyz')
    h.check(st == 200, 'SIGHUP with the fixed file: /readyz 200', st)
    publish_ok('fixed')
    wait_drained(d, 30, 'phase c')
    ids = read_all(tool, broker.url, 'fc', len(sent))
    h.check(set(ids) == set(sent), 'phase c: the %d messages arrived' % len(sent),
            (sorted(ids), sorted(sent)))


def phase_d(wd, broker, d, tool):
    h.log('== (d) SIGTERM')
    tool.declare_queue(broker.url, 'fd', [('events', 'd.#')])
    st, doc, _ = d.publish('events', 'd.1', b'd', {'Message-Id': 'd-1'})
    h.check(st == 202, 'publish before SIGTERM: 202', (st, doc))
    t0 = time.time()
    rc = d.stop()
    h.check(rc == 0, 'SIGTERM: exit code 0 (%.1fs)' % (time.time() - t0), rc)
    # nothing committed is lost: a restart on the same store publishes
    # whatever was not confirmed before the stop
    d.start()
    wait_drained(d, 30, 'phase d')
    ids = read_all(tool, broker.url, 'fd', 1, timeout=3)
    h.check('d-1' in ids, 'the message published before SIGTERM arrived', ids)
    h.check(d.stop() == 0, 'second SIGTERM: exit code 0')


def main(wd):
    broker = h.Broker(wd)
    broker.start()
    tool = h.AmqpTool()
    d = h.Sagad(wd, broker.url, name='orders',
                conf_extra='outbox = { retry_initial = 0.1; retry_max = 1; };')
    d.start()
    phase_a(wd, broker, d, tool)
    phase_kill_broker(wd, broker, d, tool)
    phase_b(wd, broker, d, tool)
    phase_blocked(wd, broker, d, tool)
    phase_c(wd, broker, d, tool)
    phase_d(wd, broker, d, tool)


h.run_test(main)
