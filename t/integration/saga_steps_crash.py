#!/usr/bin/env python3
"""The richer saga steps under crashes: 200 sagas (env SAGA_STEPS_CRASH_N)
of the book's create-order saga (conf/saga-book-create-order.conf: a
compensation-only step, data between steps, the pivot and retriable steps
after it) and of a saga with a parallel group and a conditional last step
(run or skipped by the start event), some refused on purpose
before the pivot, after it, and inside the group, while the orchestrating
sagad is killed with SIGKILL at random points and restarted.

Every saga must end as its plan says, each command and compensation
applied exactly once by its participant (by business key), nothing undone
past the pivot, the group's succeeded members undone and its later step
never sent when a member is refused. env SAGA_STEPS_CRASH_SEED repeats a
run's random kill points.
"""

import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from sagas import Answer, Participant, api_publish, saga_state  # noqa: E402
from saga_steps import book_sagas  # noqa: E402

N = int(os.environ.get('SAGA_STEPS_CRASH_N', '200'))
SEED = int(os.environ.get('SAGA_STEPS_CRASH_SEED', str(int(time.time()))))

FAN = '''
  { name = "fan"; start = "events:fan.start"; timeout = 300; retry_initial = 0.2; retry_max = 0.5;
    steps = (
      { name = "a"; command = "commands:fan.a"; compensate = "commands:fan.undo-a"; },
      { name = "b"; group = "g"; command = "commands:fan.b"; compensate = "commands:fan.undo-b"; },
      { name = "c"; group = "g"; command = "commands:fan.c"; compensate = "commands:fan.undo-c"; },
      { name = "d"; group = "g"; command = "commands:fan.d"; compensate = "commands:fan.undo-d"; },
      { name = "e"; command = "commands:fan.e"; when = "$start/total > 5"; }
    );
  }
'''


def sagas_conf():
    """The book's saga (from its example file) and the fan saga."""
    book = book_sagas().rstrip()
    return book[:book.rindex(')')].rstrip() + ',' + FAN + ');\n'


# Plans: (saga id, saga, how it goes)
BOOK_PLANS = ('ok', 'customer', 'payment', 'shop-twice')
FAN_PLANS = ('ok', 'c-refused', 'no-e')

# What each plan's participants apply, by routing key (the business key is
# (key, saga id)), and what they must never see.
APPLIED = {
    ('book', 'ok'): {'customer.authorize', 'depot.create-list', 'payment.confirm',
                     'depot.shop', 'order.approve'},
    ('book', 'customer'): {'order.reject'},
    ('book', 'payment'): {'customer.authorize', 'depot.create-list', 'depot.cancel-list',
                          'order.reject'},
    ('book', 'shop-twice'): {'customer.authorize', 'depot.create-list', 'payment.confirm',
                             'depot.shop', 'order.approve'},
    ('fan', 'ok'): {'fan.a', 'fan.b', 'fan.c', 'fan.d', 'fan.e'},
    ('fan', 'c-refused'): {'fan.a', 'fan.b', 'fan.d', 'fan.undo-a', 'fan.undo-b', 'fan.undo-d'},
    ('fan', 'no-e'): {'fan.a', 'fan.b', 'fan.c', 'fan.d'},     # total 1: e's condition false
}
FINAL = {('book', 'ok'): 'completed', ('book', 'customer'): 'compensated',
         ('book', 'payment'): 'compensated', ('book', 'shop-twice'): 'completed',
         ('fan', 'ok'): 'completed', ('fan', 'c-refused'): 'compensated',
         ('fan', 'no-e'): 'completed'}


def plan(i):
    if i % 3 == 2:
        return ('f%04d' % i, 'fan', FAN_PLANS[(i // 3) % len(FAN_PLANS)])
    return ('b%04d' % i, 'book', BOOK_PLANS[i % len(BOOK_PLANS)])


def rules(svc, by_cid):
    jrnd = random.Random()

    def ans(refuse, cid, n):
        return Answer(409 if refuse(by_cid[cid][2], n) else 200, jrnd.random() * 0.03)

    def rule(refuse=lambda how, n: False):
        return lambda cid, n: ans(refuse, cid, n)
    svc['customers'].rules['customer.authorize'] = rule(lambda how, n: how == 'customer')
    svc['payments'].rules['payment.confirm'] = rule(lambda how, n: how == 'payment')
    svc['depot'].rules['depot.create-list'] = lambda cid, n: Answer(
        200, jrnd.random() * 0.03, body={'id': 'SL-' + cid})
    svc['depot'].rules['depot.shop'] = rule(lambda how, n: how == 'shop-twice' and n < 2)
    for key in ('depot.cancel-list', 'order.reject', 'order.approve', 'fan.a', 'fan.b', 'fan.d',
                'fan.e', 'fan.undo-a', 'fan.undo-b', 'fan.undo-c', 'fan.undo-d'):
        svc['depot'].rules[key] = rule()
        svc['ordering'].rules[key] = rule()
    svc['depot'].rules['fan.c'] = rule(lambda how, n: how == 'c-refused')


def main(wd):
    rnd = random.Random(SEED)
    h.log('N=%d, SAGA_STEPS_CRASH_SEED=%d' % (N, SEED))
    plans = [plan(i) for i in range(N)]
    by_cid = {p[0]: p for p in plans}
    broker = h.Broker(wd)
    broker.start()
    svc = {n: Participant(n) for n in ('customers', 'depot', 'payments', 'ordering')}
    rules(svc, by_cid)
    subs = ('subscriptions = (\n' + ',\n'.join(
        '  { name = "%s"; bind = [ %s ]; deliver = "%s"; concurrency = 32; max_attempts = 20;'
        ' retry_initial = 0.2; retry_max = 1; }'
        % (n, ', '.join('"%s"' % b for b in binds), svc[n].url)
        for n, binds in (('customers', ['commands:customer.#']),
                         ('depot', ['commands:depot.#', 'commands:fan.#']),
                         ('payments', ['commands:payment.#']),
                         ('ordering', ['commands:order.#']))) + '\n);\n')
    services = h.Sagad(wd, broker.url, name='services', conf_extra=subs)
    ordering = h.Sagad(wd, broker.url, name='ordering', conf_extra=sagas_conf(),
                       broker_extra='reconnect_max = 2;')
    services.start()
    ordering.start()

    def publish(items):
        # spread over about 5 s, so that the kills find sagas at every step
        gap = 5.0 / max(1, len(items))
        for cid, saga, _ in items:
            time.sleep(gap)
            key = 'order.created' if saga == 'book' else 'fan.start'
            total = 1 if by_cid[cid][2] == 'no-e' else 10
            body = {'orderId': 'O-' + cid, 'consumerId': 'C-' + cid, 'total': total,
                    'items': ['x']}
            api_publish(services.port, 'events', key, body,
                        {'Correlation-Id': cid, 'Message-Id': 'start-' + cid}, deadline=120)

    import threading
    threads = [threading.Thread(target=publish, args=(plans[k::4],), daemon=True)
               for k in range(4)]
    for t in threads:
        t.start()
    kills = 0
    t0 = time.time()
    while kills < 4 and time.time() - t0 < 60:
        time.sleep(rnd.uniform(0.3, 1.5))
        ordering.kill()
        kills += 1
        down = rnd.uniform(0, 0.6)
        h.log('SIGKILL orchestrator (%d); restart in %.2f s' % (kills, down))
        time.sleep(down)
        ordering.start(timeout=90)
    for t in threads:
        t.join()

    def finished():
        return all(saga_state(ordering, cid) == FINAL[(saga, how)] for cid, saga, how in plans)
    h.wait_until(finished, 240, 'every saga ended as planned', interval=1)
    h.log('%d sagas ended as planned, %d SIGKILLs, %.1f s' % (N, kills, time.time() - t0))

    wrong = []
    for cid, saga, how in plans:
        want = APPLIED[(saga, how)]
        got = set()
        for p in svc.values():
            got |= {k for (k, c) in p.effects if c == cid}
        if got != want:
            wrong.append((cid, saga, how, sorted(got ^ want)))
    h.check(not wrong, 'every saga: exactly the planned commands and compensations applied '
            '(nothing undone past the pivot, no later step after a refused group member)',
            wrong[:5])
    # A command resent after a crash has its first id: the participant's
    # sagad drops it, so no service sees an applied command again.
    repeats = [(p.name, k) for p in svc.values() for k, v in p.repeats.items() if v]
    h.check(not repeats, 'no service got an applied command or compensation twice', repeats[:5])
    for x in (ordering, services):
        x.stop()
    broker.stop()
    for p in svc.values():
        p.stop()


h.run_test(main)
