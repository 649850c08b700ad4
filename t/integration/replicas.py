#!/usr/bin/env python3
"""Fair sharing: two sagad replicas of one service consume the same queue.
Replica A's service answers 503 for a while (SAGAD_REPLICA_503_SECONDS,
default 60) while a producer publishes at a steady pace (SAGAD_REPLICA_RATE
messages a second, default 20); replica B's service
is healthy. A takes only a bounded backlog, its circuit opens and it stops
consuming, so B delivers nearly everything. When A's service recovers, A
delivers what it held; every message is delivered and recorded by exactly
one replica."""

import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402

PERIOD = float(os.environ.get('SAGAD_REPLICA_503_SECONDS', '60'))
RATE = int(os.environ.get('SAGAD_REPLICA_RATE', '20'))    # messages per second
MAX_PENDING, CONCURRENCY = 8, 4


def conf_for(url):
    return '''
subscriptions = (
  { name = "inbox"; bind = [ "events:fair.#" ]; deliver = "%s";
    concurrency = %d; max_pending = %d; timeout = 2; max_attempts = 100000;
    retry_initial = 0.1; retry_max = 1; circuit_failures = 3; circuit_open = 1; }
);
''' % (url, CONCURRENCY, MAX_PENDING)


def main(wd):
    broker = h.Broker(wd)
    broker.start()
    tool = h.AmqpTool()
    url = broker.url
    state = {'until': None}

    def sick(call):
        return 503 if state['until'] is None or time.time() < state['until'] else 200
    svc_a = h.Service(sick)
    svc_b = h.Service(lambda call: ('sleep', 0.005, 200))
    reps = []
    for name, svc in (('a', svc_a), ('b', svc_b)):
        sub = os.path.join(wd, 'replica-' + name)
        os.makedirs(sub)
        reps.append(h.Sagad(sub, url, name='orders', conf_extra=conf_for(svc.url)))
    ra, rb = reps
    ra.start()
    rb.start()
    metric = 'sagad_%s{subscription="inbox"}'

    h.log('== replica A\'s service answers 503 for %gs; %d messages a second are published'
          % (PERIOD, RATE))
    t0 = time.time()
    state['until'] = t0 + PERIOD
    publish_for = max(PERIOD - 8, 5)
    batches = []
    errors = []

    def producer():
        i = 0
        while time.time() < t0 + publish_for:
            try:
                tool.send(url, 'events', 'fair.x', body='fair %d {n}' % i,
                          message_id='f-%d-{n}' % i, count=RATE)
                batches.append(i)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
                return
            i += 1
            delay = t0 + i - time.time()
            if delay > 0:
                time.sleep(delay)
    th = threading.Thread(target=producer, daemon=True)
    th.start()
    samples = []
    # Until a few seconds after the producer stops, leaving time (under
    # load too) for what is read below before the 503 period ends.
    while time.time() < t0 + publish_for + 2:
        m = ra.metrics()
        samples.append((time.time() - t0, m.get(metric % 'circuit_open'),
                        m.get(metric % 'consuming'), m.get(metric % 'inbox_backlog')))
        time.sleep(1)
    th.join(30)
    # What A delivered, read first: at PERIOD its service recovers.
    a_ok_before = sum(1 for i in ['f-%d-%d' % (b, n) for b in batches for n in range(RATE)]
                      if svc_a.ok_ids().get(i))
    elapsed_a = time.time() - t0
    h.check(not errors and not th.is_alive(), 'the producer published %d messages'
            % (len(batches) * RATE), errors)
    ids = ['f-%d-%d' % (b, n) for b in batches for n in range(RATE)]
    total = len(ids)

    # Still within the 503 period: where is everything?
    m_a = ra.metrics()
    held = m_a.get(metric % 'inbox_backlog')
    b_ok = svc_b.ok_ids()
    by_b = sum(1 for i in ids if b_ok.get(i))
    in_queue = tool.count(url, 'orders.inbox')
    elapsed = time.time() - t0
    h.log('after %.0fs: replica B delivered %d of %d, replica A holds %s, %d in the queue; '
          'A circuit open in %d of %d samples, consuming in %d'
          % (elapsed, by_b, total, held, in_queue,
             sum(1 for s in samples if s[1] == 1), len(samples),
             sum(1 for s in samples if s[2] == 1)))
    h.check(elapsed_a < PERIOD, 'A\'s deliveries read while its service still answers 503 '
            '(%.0fs)' % elapsed_a)
    h.check(held is not None and held <= 2 * (MAX_PENDING + 2 * CONCURRENCY),
            'replica A took only a bounded backlog (%s; max_pending %d)' % (held, MAX_PENDING),
            held)
    h.check(by_b >= 0.9 * total,
            'replica B delivered nearly everything while A\'s service failed: %d of %d (%.1f%%)'
            % (by_b, total, 100.0 * by_b / max(total, 1)),
            'B delivered %d of %d, A holds %s, %d still in the queue (B did not keep up with '
            '%d messages a second)' % (by_b, total, held, in_queue, RATE))
    late = [s for s in samples if s[0] > 10]
    h.check(late and all(s[2] == 0 for s in late[-5:]),
            'replica A is not consuming while its service fails (sagad_consuming 0)', samples[-5:])
    h.check(sum(1 for s in late if s[1] == 1) >= len(late) / 2,
            'replica A\'s circuit is open (or probing) most of the time', samples)
    h.check(a_ok_before == 0, 'replica A delivered nothing during the 503 period')

    h.log('== replica A\'s service recovers')
    h.wait_until(lambda: time.time() > state['until'], PERIOD, 'the end of the 503 period')

    def all_delivered():
        a, b = svc_a.ok_ids(), svc_b.ok_ids()
        return all(a.get(i) or b.get(i) for i in ids)
    h.wait_until(all_delivered, 60, 'every message delivered by one of the replicas')
    h.wait_until(lambda: ra.metrics().get(metric % 'inbox_backlog') == 0
                 and rb.metrics().get(metric % 'inbox_backlog') == 0, 30, 'both backlogs empty')
    a_ok, b_ok = svc_a.ok_ids(), svc_b.ok_ids()
    by_a = [i for i in ids if a_ok.get(i)]
    both = [i for i in ids if a_ok.get(i) and b_ok.get(i)]
    h.log('in the end: replica A delivered %d, replica B %d' % (len(by_a), total - len(by_a)))
    h.check(not both, 'no message delivered by both replicas', both[:10])
    h.check(tool.count(url, 'orders.inbox') == 0, 'queue orders.inbox empty')
    m_a, m_b = ra.metrics(), rb.metrics()
    h.check(m_a.get(metric % 'dead_lettered_total') == 0
            and m_b.get(metric % 'dead_lettered_total') == 0, 'nothing dead-lettered')
    h.check(m_a.get(metric % 'circuit_open') == 0 and m_a.get(metric % 'consuming') == 1,
            'replica A: circuit closed, consuming again')
    for r in reps:
        h.check(r.stop() == 0, 'replica %s: SIGTERM, exit 0' % os.path.basename(r.dir)[-1])
    rows_a = [x for x in h.inbox_rows(ra.store, 'inbox') if x['state'] == 1]
    rows_b = [x for x in h.inbox_rows(rb.store, 'inbox') if x['state'] == 1]
    ids_a = {x['message_id'] for x in rows_a}
    ids_b = {x['message_id'] for x in rows_b}
    h.check(len(rows_a) + len(rows_b) == total and ids_a | ids_b == set(ids)
            and not ids_a & ids_b,
            'stores: every message recorded done by exactly one replica (A %d, B %d)'
            % (len(ids_a), len(ids_b)), (len(rows_a), len(rows_b), total))
    svc_a.stop()
    svc_b.stop()


h.run_test(main)
