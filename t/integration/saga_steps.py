#!/usr/bin/env python3
"""Step kinds beyond command-and-reply (sagad.conf(5), SAGAS: steps):
compensation-only steps, one-way notification steps, data between steps
and conditions. The first saga is in the shape of
the create-order saga of *Microservices Patterns*: reject the order
(compensation only), reserve stock, tell the kitchen (a notification,
withdrawn by another one-way message when undone), authorize the payment.
Run against the embedded store, then (when PostgreSQL is installed) with
the sagas on a private PostgreSQL.

Checked: `sagad -n` accepts the new steps and refuses the wrong ones with
FILE:LINE errors; a completed saga runs nothing for the compensation-only
step, sends the notification once without reply_to and never waits for
it; a saga whose payment is refused undoes the payment's predecessors in
reverse order: the notification's withdrawal (one-way, not awaited), the
stock release (awaited), then the compensation-only step's reject with
the start event as its body; a choreographed saga with a
compensation-only step compensates it too; the history names what ran
and what did not.

The "shop" saga: a command body and headers built from the start event
and an earlier step's reply (JSON Pointers), a compensation body from the
step's own reply, a step run or skipped by its condition (a skipped step
is never compensated), and a reference that is missing in the start
event: the step fails with the pointer named in the history, and the
saga compensates.

The "fan" saga: a parallel group of three steps between two others: the
group's commands go out at once, the next step waits for all three; a
member refused while another is slow: the succeeded member and the step
before the group are compensated in reverse order, and the slow member,
whose success comes late, is compensated when it comes.

The "ship" saga: a choreographed compensation by event: the compensation
is published without reply_to, its participant answers with a failure
event first (the compensation is published again after a backoff, as a
new message) and then with a success event, which confirms it.

The book's create-order saga as conf/saga-book-create-order.conf writes
it (its sagas block, retries made quick), with four services (customers,
depot, payments, ordering): the happy path; the customer refused at
step 2 (the order rejected, with the start event); the payment refused
at the pivot (the shopping list cancelled with its id, then the order
rejected); initiate-shopping refused twice after the pivot (sent again
after a backoff, then completed, nothing compensated);
initiate-shopping refused every time (failed after retry_attempts,
`sagactl saga abort` refused past the pivot, `sagactl saga retry` once
the depot is mended: completed).
"""

import re

import json
import os
import sys

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from sagas import (CONF_HEAD, Answer, Event, Participant, check_bad_conf, hist_entries,  # noqa: E402
                   saga_get, saga_state, sagactl, sagad_n, step_states, subscription_conf)

SAGAS = '''sagas = (
  { name = "create-order"; start = "events:order.created"; timeout = 120;
    steps = (
      { name = "reject";    compensate = "commands:order.reject"; },
      { name = "reserve";   command = "commands:stock.reserve"; compensate = "commands:stock.release"; },
      { name = "kitchen";   command = "events:ticket.created"; notify = true;
                            compensate = "events:ticket.withdrawn"; },
      { name = "authorize"; command = "commands:payment.authorize"; }
    );
    completed = "events:order.approved"; compensated = "events:order.rejected";
    retry_initial = 0.2; retry_max = 0.5;
  },
  { name = "deliver"; mode = "choreographed"; start = "events:delivery.start"; timeout = 120;
    steps = (
      { name = "note";    compensate = "commands:order.reject"; },
      { name = "pick";    success = "events:delivery.picked"; failure = "events:delivery.lost"; }
    );
    compensated = "events:delivery.undone";
  },
  { name = "fan"; start = "events:fan.start"; timeout = 120; retry_initial = 0.2; retry_max = 0.5;
    steps = (
      { name = "a"; command = "commands:fan.a"; compensate = "commands:fan.undo-a"; },
      { name = "b"; group = "g"; command = "commands:fan.b"; compensate = "commands:fan.undo-b"; },
      { name = "c"; group = "g"; command = "commands:fan.c"; compensate = "commands:fan.undo-c"; },
      { name = "d"; group = "g"; command = "commands:fan.d"; compensate = "commands:fan.undo-d"; },
      { name = "e"; command = "commands:fan.e"; }
    );
  },
  { name = "late"; start = "events:late.start"; timeout = 120; retry_initial = 0.2; retry_max = 0.5;
    steps = (
      { name = "a"; command = "commands:late.a"; compensate = "commands:late.undo-a"; },
      { name = "p"; command = "commands:late.pay"; pivot = true; timeout = 1; attempts = 1; },
      { name = "c"; command = "commands:late.c"; }
    );
  },
  { name = "ship"; mode = "choreographed"; start = "events:ship.start"; timeout = 120;
    compensate_timeout = 10; retry_initial = 0.2; retry_max = 0.5;
    steps = (
      { name = "pack"; success = "events:ship.packed"; compensate = "events:ship.unpack";
        compensate_success = "events:ship.unpacked";
        compensate_failure = "events:ship.unpack-failed"; },
      { name = "send"; success = "events:ship.sent"; failure = "events:ship.lost"; }
    );
    compensated = "events:ship.undone";
  },
  { name = "shop"; start = "events:shop.created"; timeout = 120;
    steps = (
      { name = "list"; command = "commands:depot.list"; compensate = "commands:depot.unlist";
        body = { order = "$start/order"; saga = "$saga.id"; };
        compensate_body = { listId = "$steps.list.reply/listId"; why = "$$undo"; }; },
      { name = "express"; command = "commands:depot.express"; compensate = "commands:depot.slow";
        when = "$start/total > 100"; },
      { name = "shop"; command = "commands:depot.shop";
        body = { order = "$start/order"; listId = "$steps.list.reply/listId";
                 items = [ "$start/items/0", "fixed" ]; };
        headers = { x-list-id = "$steps.list.reply/listId"; x-total = "$start/total"; }; }
    );
    compensated = "events:shop.undone";
  }
);
'''

def config_checks(wd):
    d = os.path.join(wd, 'cfg')
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, 'good.conf')
    with open(path, 'w') as f:
        f.write(CONF_HEAD % {'dir': d} + SAGAS)
    rc, err = sagad_n(path)
    h.check(rc == 0, 'sagad -n: compensation-only and notify steps are valid', err)
    orch = '''sagas = (
  { name = "s"; start = "events:s.start";
    steps = (
%s
    );
  }
);
'''
    chore = orch.replace('start = "events:s.start";',
                         'mode = "choreographed"; start = "events:s.start";')
    check_bad_conf(wd, 'a step with neither command nor compensate', orch % (
        '      { name = "a"; timeout = 5; }  # <-'), ["'a'", "command", "compensate"])
    check_bad_conf(wd, 'a notify step without a command', orch % (
        '      { name = "a"; notify = true; compensate = "commands:b"; }  # <-'),
        ["'a'", "notify", "command"])
    check_bad_conf(wd, 'notify in a choreographed saga', chore % (
        '      { name = "a"; success = "events:a"; notify = true; }  # <-'),
        ["'a'", "notify", "orchestrated"])
    check_bad_conf(wd, 'a failure event without a success event', chore % (
        '      { name = "a"; failure = "events:a.no"; compensate = "commands:b"; }  # <-'),
        ["'a'", "failure", "success"])
    check_bad_conf(wd, 'a choreographed step with neither success nor compensate', chore % (
        '      { name = "a"; }  # <-'), ["'a'", "success", "compensate"])
    check_bad_conf(wd, 'a body that refers to a later step', orch % (
        '      { name = "a"; command = "commands:a"; body = { x = "$steps.b.reply/id"; }; },  # <-\n'
        '      { name = "b"; command = "commands:b"; }'), ["'a'", "body", "steps.b.reply"])
    check_bad_conf(wd, 'an unknown reference', orch % (
        '      { name = "a"; command = "commands:a"; body = { x = "$begin/id"; }; }  # <-'),
        ["'a'", "body", "unknown reference"])
    check_bad_conf(wd, 'a bad condition', orch % (
        '      { name = "a"; command = "commands:a"; when = "$start/total about 3"; }  # <-'),
        ["'a'", "when", "operator"])
    check_bad_conf(wd, "a header of sagad's own", orch % (
        '      { name = "a"; command = "commands:a"; headers = { x-sagad-step = "x"; }; }  # <-'),
        ["'a'", "headers", "x-sagad-step"])
    check_bad_conf(wd, 'a body for a step without a command', orch % (
        '      { name = "a"; compensate = "commands:a"; body = { x = 1; }; }  # <-'),
        ["'a'", "body"])
    check_bad_conf(wd, 'a group in a choreographed saga', chore % (
        '      { name = "a"; success = "events:a"; group = "g"; }  # <-'),
        ["'a'", "groups", "orchestrated"])
    check_bad_conf(wd, 'the members of a group apart', orch % (
        '      { name = "a"; command = "commands:a"; group = "g"; },\n'
        '      { name = "b"; command = "commands:b"; },\n'
        '      { name = "c"; command = "commands:c"; group = "g"; }  # <-'),
        ["'c'", "group 'g'", "follow one another"])
    check_bad_conf(wd, 'a member referring to another of its group', orch % (
        '      { name = "a"; command = "commands:a"; group = "g"; },\n'
        '      { name = "b"; command = "commands:b"; group = "g"; body = { x = "$steps.a.reply"; }; }  # <-'),
        ["'b'", "body", "no earlier step"])
    check_bad_conf(wd, 'two pivots', orch % (
        '      { name = "a"; command = "commands:a"; pivot = true; },\n'
        '      { name = "b"; command = "commands:b"; pivot = true; }  # <-'),
        ["'b'", "one pivot"])
    check_bad_conf(wd, 'a compensation after the pivot', orch % (
        '      { name = "a"; command = "commands:a"; pivot = true; },\n'
        '      { name = "b"; command = "commands:b"; compensate = "commands:c"; }  # <-'),
        ["'b'", "never compensated"])
    check_bad_conf(wd, "a choreographed condition on a reply", chore % (
        '      { name = "a"; success = "events:a"; },\n'
        '      { name = "b"; success = "events:b"; when = "$steps.a.reply/ok exists"; }  # <-'),
        ["'b'", "when", "start event only"])


def at(p, key, cid):
    """The time the participant got (key, cid), or None."""
    for c in p.deliveries(key, cid):
        return c['t0']
    return None


def scenario(wd, saga_store=''):
    os.makedirs(wd)
    broker = h.Broker(wd)
    broker.start()
    stock, payment, orders_svc = Participant('stock'), Participant('payment'), Participant('orders')
    payment.rules[('payment.authorize', 'co2')] = Answer(409)
    orders = h.Sagad(wd, broker.url, name='orders', conf_extra=SAGAS + subscription_conf(
        'inbox', ['commands:order.#', 'events:order.approved', 'events:order.rejected',
                  'events:delivery.undone'], orders_svc.url) + saga_store)
    d_stock = h.Sagad(wd, broker.url, name='stock', conf_extra=subscription_conf(
        'inbox', ['commands:stock.#', 'events:ticket.#', 'events:delivery.start',
                  'commands:depot.#', 'events:ship.start', 'events:ship.unpack',
                  'commands:fan.#', 'commands:late.#'], stock.url))
    d_payment = h.Sagad(wd, broker.url, name='payment', conf_extra=subscription_conf(
        'inbox', ['commands:payment.#'], payment.url))
    for d in (d_stock, d_payment, orders):
        d.start()
    stock.sagad = d_stock
    stock.rules[('delivery.start', 'dl1')] = Answer(events=[Event('delivery.lost')])

    for cid in ('co1', 'co2'):
        st, js, _ = orders.publish('events', 'order.created', json.dumps({'order': cid}).encode(),
                                   {'Content-Type': 'application/json', 'Correlation-Id': cid,
                                    'Message-Id': 'start-' + cid})
        h.check(st == 202, 'start of %s accepted' % cid, js)
    st, js, _ = orders.publish('events', 'delivery.start', b'{"delivery": "dl1"}',
                               {'Content-Type': 'application/json', 'Correlation-Id': 'dl1',
                                'Message-Id': 'start-dl1'})
    h.check(st == 202, 'start of dl1 accepted', js)
    want = {'co1': 'completed', 'co2': 'compensated', 'dl1': 'compensated'}
    h.wait_until(lambda: all(saga_state(orders, c) == s for c, s in want.items()), 60,
                 'co1 completed, co2 and dl1 compensated',)

    # co1: nothing ran for reject; the notification went once, one-way.
    inst = saga_get(orders, 'co1')
    h.check(step_states(inst) == {'reject': 'succeeded', 'reserve': 'succeeded',
                                  'kitchen': 'succeeded', 'authorize': 'succeeded'},
            'co1: every step succeeded', inst['steps'])
    h.check(hist_entries(inst, 'compensation only: nothing to run', 'reject'),
            'co1: the history says the compensation-only step ran nothing')
    h.check(not orders_svc.deliveries('order.reject', 'co1'),
            'co1: the compensation-only step sent nothing')
    note = stock.deliveries('ticket.created', 'co1')
    h.check(len(note) == 1 and note[0]['kind'] == 'notification',
            'co1: the kitchen notification arrived once, Sagad-Kind notification', note)
    h.check([c['kind'] for c in orders_svc.deliveries('order.approved', 'co1')] == ['event'],
            'co1: the completed event went out once')
    h.check(inst['steps'][2]['attempts'] == 1, 'co1: the notification counts one attempt',
            inst['steps'])

    # co2: undone in reverse order, the one-way withdrawal not awaited.
    inst = saga_get(orders, 'co2')
    h.check(step_states(inst) == {'reject': 'compensated', 'reserve': 'compensated',
                                  'kitchen': 'compensated', 'authorize': 'failed'},
            'co2: every step before the refused payment compensated', inst['steps'])
    t_kitchen = at(stock, 'ticket.withdrawn', 'co2')
    t_release = at(stock, 'stock.release', 'co2')
    t_reject = at(orders_svc, 'order.reject', 'co2')
    # (The withdrawal is not awaited: it and the release may reach the
    # stock service in either order; the history below has the order sent.)
    h.check(None not in (t_kitchen, t_release, t_reject) and t_release <= t_reject,
            'co2: withdrawal and release arrived, then the reject', (t_kitchen, t_release, t_reject))
    rej = orders_svc.deliveries('order.reject', 'co2')
    h.check(len(rej) == 1 and rej[0]['kind'] == 'compensation' and
            rej[0]['body'] == {'order': 'co2'},
            "co2: the reject carries the start event (a compensation-only step has no reply)",
            rej)
    outs = [(e['what'], e['step']) for e in inst['history'] if e['dir'] == 'out']
    h.check(outs == [('command', 'reserve'), ('notification', 'kitchen'),
                     ('command', 'authorize'), ('compensate', 'kitchen'),
                     ('compensate', 'reserve'), ('compensate', 'reject'),
                     ('compensated', '')],
            'co2: what the saga sent, in order', outs)
    h.check(not [e for e in inst['history'] if e['dir'] == 'in' and e['step'] == 'kitchen'],
            'co2: nothing was awaited from the kitchen')

    # dl1: choreographed, the compensation-only step undone after the loss.
    inst = saga_get(orders, 'dl1')
    h.check(step_states(inst) == {'note': 'compensated', 'pick': 'failed'},
            'dl1: the compensation-only step of a choreographed saga is compensated',
            inst['steps'])
    h.check(len(orders_svc.deliveries('order.reject', 'dl1')) == 1,
            'dl1: its compensation sent once')
    shop(orders, stock)
    ship(orders, stock)
    fan(orders, stock)
    late_pivot(orders, stock)
    paging(orders)
    for d in (orders, d_stock, d_payment):
        d.stop()
    book(wd, broker, saga_store)
    broker.stop()
    for p in (stock, payment, orders_svc):
        p.stop()


def shop(orders, depot):
    """The "shop" saga: data between steps and conditions."""
    depot.rules['depot.list'] = lambda cid, n: Answer(body={'listId': 'L-' + cid, 'n': 2})
    depot.rules[('depot.shop', 'sh3')] = Answer(409)
    starts = {'sh1': {'order': 'o1', 'total': 150, 'items': ['apple']},
              'sh2': {'order': 'o2', 'total': 50, 'items': ['pear']},
              'sh3': {'order': 'o3', 'total': 20, 'items': ['fig']},
              'sh4': {'total': 500, 'items': []}}      # no "order": a data error
    for cid, body in starts.items():
        st, js, _ = orders.publish('events', 'shop.created', json.dumps(body).encode(),
                                   {'Content-Type': 'application/json', 'Correlation-Id': cid,
                                    'Message-Id': 'start-' + cid})
        h.check(st == 202, 'start of %s accepted' % cid, js)
    want = {'sh1': 'completed', 'sh2': 'completed', 'sh3': 'compensated', 'sh4': 'compensated'}
    h.wait_until(lambda: all(saga_state(orders, c) == s for c, s in want.items()), 60,
                 'the shop sagas finished: %s' % want)

    lst = depot.deliveries('depot.list', 'sh1')
    h.check(len(lst) == 1 and lst[0]['body'] == {'order': 'o1', 'saga': 'sh1'} and
            lst[0]['content_type'] == 'application/json',
            'sh1: the list command carries a body made from the start event and the saga id', lst)
    shp = depot.deliveries('depot.shop', 'sh1')
    h.check(len(shp) == 1 and shp[0]['body'] == {'order': 'o1', 'listId': 'L-sh1',
                                                 'items': ['apple', 'fixed']},
            'sh1: the shop command carries the list id from the list step\'s reply', shp)
    h.check(shp and shp[0]['amqp_headers'].get('x-list-id') == 'L-sh1' and
            shp[0]['amqp_headers'].get('x-total') == '150',
            'sh1: and headers made from them', shp and shp[0]['amqp_headers'])
    h.check(len(depot.deliveries('depot.express', 'sh1')) == 1,
            'sh1: total 150 > 100: the express step ran')

    inst = saga_get(orders, 'sh2')
    h.check(step_states(inst) == {'list': 'succeeded', 'express': 'skipped', 'shop': 'succeeded'}
            and not depot.deliveries('depot.express', 'sh2'),
            'sh2: total 50: the express step is skipped, the saga completes', inst['steps'])
    sk = hist_entries(inst, 'skipped: condition false', 'express')
    h.check(sk and sk[0]['detail'] == '$start/total > 100',
            'sh2: the history names the condition', sk)

    inst = saga_get(orders, 'sh3')
    h.check(step_states(inst) == {'list': 'compensated', 'express': 'skipped', 'shop': 'failed'},
            'sh3: the shop refused: the list undone, the skipped express not', inst['steps'])
    unl = depot.deliveries('depot.unlist', 'sh3')
    h.check(len(unl) == 1 and unl[0]['body'] == {'listId': 'L-sh3', 'why': '$undo'} and
            not depot.deliveries('depot.slow', 'sh3'),
            'sh3: the compensation body from the step\'s own reply ($$ a literal $)', unl)

    inst = saga_get(orders, 'sh4')
    err = hist_entries(inst, 'data error', 'list')
    h.check(step_states(inst)['list'] == 'failed' and not depot.deliveries('depot.list', 'sh4')
            and err and '/order' in err[0]['detail'] and '/order' in (inst['reason'] or ''),
            'sh4: a missing reference fails the step, nothing sent, the pointer named',
            (inst['steps'], err, inst['reason']))


def ship(orders, stock):
    """A choreographed compensation by event, refused once."""
    def packed():
        inst = saga_get(orders, 'sp1')
        return inst and step_states(inst)['pack'] == 'succeeded'
    stock.rules[('ship.start', 'sp1')] = Answer(events=[Event('ship.packed'),
                                                        Event('ship.lost', after=packed)])
    stock.rules[('ship.unpack', 'sp1')] = lambda cid, n: Answer(events=[
        Event('ship.unpack-failed' if n == 0 else 'ship.unpacked')])
    st, js, _ = orders.publish('events', 'ship.start', b'{"parcel": 1}',
                               {'Content-Type': 'application/json', 'Correlation-Id': 'sp1',
                                'Message-Id': 'start-sp1'})
    h.check(st == 202, 'start of sp1 accepted', js)
    h.wait_until(lambda: saga_state(orders, 'sp1') == 'compensated', 60, 'sp1 compensated')
    inst = saga_get(orders, 'sp1')
    unpack = stock.deliveries('ship.unpack', 'sp1')
    outs = [e['what'] for e in inst['history'] if e['dir'] == 'out' and e['step'] == 'pack']
    ins = [e['what'] for e in inst['history'] if e['dir'] == 'in' and e['step'] == 'pack']
    h.check(step_states(inst) == {'pack': 'compensated', 'send': 'failed'} and
            len(unpack) == 2 and len({c['message_id'] for c in unpack}) == 2 and
            all(c['kind'] == 'compensation' for c in unpack),
            'sp1: the compensation event published twice, as two messages', unpack)
    h.check(outs == ['compensate', 'compensate#2'] and
            ins == ['success', 'compensation failure', 'compensation success'],
            'sp1: the failure event retried it, the success event confirmed it', (outs, ins))


def fan(orders, p):
    """A parallel group."""
    import threading
    gate = threading.Event()
    p.rules[('fan.b', 'pg1')] = Answer(200, delay=0.5)
    p.rules[('fan.c', 'pg2')] = Answer(409, delay=0.5)    # after d's success
    p.rules[('fan.b', 'pg2')] = Answer(200, gate=gate)
    for cid in ('pg1', 'pg2'):
        st, js, _ = orders.publish('events', 'fan.start', b'{"n": 1}',
                                   {'Content-Type': 'application/json', 'Correlation-Id': cid,
                                    'Message-Id': 'start-' + cid})
        h.check(st == 202, 'start of %s accepted' % cid, js)
    h.wait_until(lambda: saga_state(orders, 'pg1') == 'completed', 60, 'pg1 completed')

    def one(key, cid):
        got = p.deliveries(key, cid)
        return got[0] if len(got) == 1 else None
    b, c, d, e = (one('fan.' + s, 'pg1') for s in 'bcde')
    h.check(None not in (b, c, d, e) and c['t0'] < b['t'] and d['t0'] < b['t'] and
            e['t0'] >= max(b['t'], c['t'], d['t']),
            'pg1: b, c and d sent at once (c and d before the slow b answered), e after all three',
            (b, c, d, e))

    h.wait_until(lambda: p.has_started('fan.b', 'pg2') and saga_state(orders, 'pg2') and
                 step_states(saga_get(orders, 'pg2'))['d'] in ('compensated', 'compensating'),
                 30, 'pg2: compensating while b waits')
    inst = saga_get(orders, 'pg2')
    h.check(inst['state'] in ('compensating', 'compensated') and step_states(inst)['b'] == 'failed',
            'pg2: c refused: compensating, the waiting b given up for now', inst['steps'])
    gate.set()          # b's success now comes, late
    h.wait_until(lambda: saga_state(orders, 'pg2') == 'compensated' and
                 step_states(saga_get(orders, 'pg2'))['b'] == 'compensated', 60,
                 'pg2 compensated, the late b too')
    inst = saga_get(orders, 'pg2')
    h.check(step_states(inst) == {'a': 'compensated', 'b': 'compensated', 'c': 'failed',
                                  'd': 'compensated', 'e': 'pending'},
            'pg2: a, d and the late b compensated, e never started', inst['steps'])
    comps = [e['step'] for e in inst['history'] if e['dir'] == 'out' and e['what'] == 'compensate']
    h.check(comps.index('d') < comps.index('a') and len(comps) == 3 and
            not p.deliveries('fan.undo-c', 'pg2') and not p.deliveries('fan.e', 'pg2'),
            'pg2: d undone before a (reverse order), b when its success came; c never', comps)


def late_pivot(orders, p):
    """The pivot's success after its timeout started the compensation."""
    p.rules[('late.pay', 'lp1')] = Answer(200, delay=2.5)
    st, js, _ = orders.publish('events', 'late.start', b'{"n": 1}',
                               {'Content-Type': 'application/json', 'Correlation-Id': 'lp1',
                                'Message-Id': 'start-lp1'})
    h.check(st == 202, 'start of lp1 accepted', js)
    h.wait_until(lambda: saga_state(orders, 'lp1') == 'failed', 60, 'lp1 failed')
    inst = saga_get(orders, 'lp1')
    h.check('pivot p succeeded after the compensation' in (inst['reason'] or '') and
            step_states(inst)['p'] == 'succeeded' and not p.deliveries('late.c', 'lp1'),
            'lp1: the pivot succeeded late: failed for an operator, not compensated',
            (inst['reason'], inst['steps']))
    rc, out, err = sagactl(orders, 'saga', 'retry', 'lp1')
    h.wait_until(lambda: saga_state(orders, 'lp1') == 'completed', 30, 'lp1 completed')
    h.check(rc == 0 and len(p.deliveries('late.c', 'lp1')) == 1,
            'lp1: sagactl saga retry goes on from the pivot', (rc, out, err))


def paging(orders):
    """/v1/admin/sagas page by page, and sagactl sagas --all."""
    import urllib.parse
    st, whole = orders.admin_json('/v1/admin/sagas?limit=1000')
    want = [(s['saga'], s['id']) for s in whole['sagas']]
    h.check(st == 200 and len(want) >= 10 and whole.get('next') is None,
            'paging: one page of 1000 holds every instance, no next', len(want))
    got, after, pages = [], None, 0
    while True:
        q = '/v1/admin/sagas?limit=3' + ('&after=' + urllib.parse.quote(after, safe='')
                                         if after else '')
        st, j = orders.admin_json(q)
        got += [(s['saga'], s['id']) for s in j['sagas']]
        pages += 1
        after = j.get('next')
        if not after or pages > 20:
            break
    h.check(got == want, 'paging: pages of 3 through "next" give every instance once, in order',
            (pages, got, want))
    st, _ = orders.admin_get('/v1/admin/sagas?after=nonsense')
    h.check(st == 400, 'paging: a malformed cursor: 400', st)
    rc, out, err = sagactl(orders, 'sagas', '--all', '--limit', '4')
    ids = [line.split()[0] for line in out.splitlines()[1:]]
    h.check(rc == 0 and sorted(ids) == sorted(i for _, i in want),
            'paging: sagactl sagas --all --limit 4 lists every instance', (rc, out, err))
    rc, out, err = sagactl(orders, 'sagas', '--limit', '4')
    h.check(rc == 0 and len(out.splitlines()) == 5 and '--after' in err,
            'paging: sagactl sagas --limit 4 says there is more, with the cursor', (out, err))


def book_sagas():
    """The sagas block of conf/saga-book-create-order.conf, retries quick."""
    with open(os.path.join(h.top_srcdir, 'conf', 'saga-book-create-order.conf')) as f:
        text = f.read()
    block = re.search(r'^sagas = \(.*^\);$', text, re.S | re.M).group(0)
    return (block.replace('retry_initial = 0.5; retry_max = 30;', 'retry_initial = 0.2; retry_max = 0.5;')
            .replace('retry_attempts = 10;', 'retry_attempts = 4;'))


def book(wd, broker, saga_store):
    """The book's create-order saga, four services."""
    svc = {n: Participant(n) for n in ('customers', 'depot', 'payments', 'ordering')}
    subs = ('subscriptions = (\n' + ',\n'.join(
        '  { name = "%s"; bind = [ %s ]; deliver = "%s"; max_attempts = 10; retry_initial = 0.2; }'
        % (n, ', '.join('"%s"' % b for b in binds), svc[n].url)
        for n, binds in (('customers', ['commands:customer.#']), ('depot', ['commands:depot.#']),
                         ('payments', ['commands:payment.#']),
                         ('ordering', ['commands:order.#', 'events:order.approved',
                                       'events:order.rejected']))) + '\n);\n')
    services = h.Sagad(wd, broker.url, name='services', conf_extra=subs)
    ordering = h.Sagad(wd, broker.url, name='ordering', conf_extra=book_sagas() + saga_store)
    services.start()
    ordering.start()
    svc['depot'].rules['depot.create-list'] = lambda cid, n: Answer(body={'id': 'SL-' + cid})
    svc['customers'].rules[('customer.authorize', 'bk2')] = Answer(409)
    svc['payments'].rules[('payment.confirm', 'bk3')] = Answer(409)
    svc['depot'].rules[('depot.shop', 'bk4')] = [Answer(409), Answer(409), Answer(200)]
    svc['depot'].rules[('depot.shop', 'bk5')] = Answer(409)
    for cid in ('bk1', 'bk2', 'bk3', 'bk4', 'bk5'):
        body = {'orderId': 'O-' + cid, 'consumerId': 'C-1', 'total': 42, 'items': ['tea']}
        st, js, _ = ordering.publish('events', 'order.created', json.dumps(body).encode(),
                                     {'Content-Type': 'application/json', 'Correlation-Id': cid,
                                      'Message-Id': 'start-' + cid})
        h.check(st == 202, 'book: start of %s accepted' % cid, js)
    want = {'bk1': 'completed', 'bk2': 'compensated', 'bk3': 'compensated', 'bk4': 'completed',
            'bk5': 'failed'}
    h.wait_until(lambda: all(saga_state(ordering, c) == s for c, s in want.items()), 90,
                 'book: %s' % want)
    d = svc['depot']

    shop1 = d.deliveries('depot.shop', 'bk1')
    h.check(len(shop1) == 1 and shop1[0]['body'] == {'orderId': 'O-bk1', 'shoppingListId': 'SL-bk1'},
            'book bk1: initiate-shopping carries the shopping list id', shop1)
    pay1 = svc['payments'].deliveries('payment.confirm', 'bk1')
    h.check(pay1 and pay1[0]['amqp_headers'].get('x-consumer-id') == 'C-1',
            'book bk1: confirm-payment carries its header', pay1)
    h.check(not svc['ordering'].deliveries('order.reject', 'bk1'),
            'book bk1: reject-order (compensation only) never sent')

    inst = saga_get(ordering, 'bk2')
    rej = svc['ordering'].deliveries('order.reject', 'bk2')
    h.check(step_states(inst)['reject-order'] == 'compensated' and len(rej) == 1 and
            rej[0]['body']['orderId'] == 'O-bk2' and not d.deliveries('depot.create-list', 'bk2'),
            'book bk2: customer refused: the order rejected with the start event', (inst['steps'], rej))

    canc = d.deliveries('depot.cancel-list', 'bk3')
    rej = svc['ordering'].deliveries('order.reject', 'bk3')
    h.check(len(canc) == 1 and canc[0]['body'] == {'shoppingListId': 'SL-bk3'} and len(rej) == 1
            and canc[0]['t0'] <= rej[0]['t0'] and not d.deliveries('depot.shop', 'bk3'),
            'book bk3: payment refused at the pivot: list cancelled with its id, then the order '
            'rejected', (canc, rej))

    inst = saga_get(ordering, 'bk4')
    shop4 = d.deliveries('depot.shop', 'bk4')
    ids = [c['message_id'] for c in shop4]
    h.check([c['status'] for c in shop4] == [409, 409, 200] and len(set(ids)) == 1 and
            not d.deliveries('depot.cancel-list', 'bk4') and
            not svc['ordering'].deliveries('order.reject', 'bk4'),
            'book bk4: refused twice after the pivot: sent again (the same message, which the '
            "depot's sagad forgot when it was refused), then done, nothing compensated", ids)
    h.check(len(hist_entries(inst, 'refused after the pivot: sent again later',
                             'initiate-shopping')) == 2, 'book bk4: the history shows both retries')

    inst = saga_get(ordering, 'bk5')
    h.check(len(d.deliveries('depot.shop', 'bk5')) == 4 and 'after the pivot' in inst['reason'] and
            step_states(inst)['create-shopping-list'] == 'succeeded' and
            not d.deliveries('depot.cancel-list', 'bk5'),
            'book bk5: refused every time: failed after retry_attempts (4), nothing undone',
            (inst['reason'], inst['steps']))
    rc, out, err = sagactl(ordering, 'saga', 'abort', 'bk5')
    h.check(rc != 0 and saga_state(ordering, 'bk5') == 'failed',
            'book bk5: sagactl saga abort is refused past the pivot', (rc, out, err))
    d.rules[('depot.shop', 'bk5')] = Answer(200)
    rc, out, err = sagactl(ordering, 'saga', 'retry', 'bk5')
    h.check(rc == 0, 'book bk5: sagactl saga retry: exit 0', (rc, out, err))
    h.wait_until(lambda: saga_state(ordering, 'bk5') == 'completed', 30,
                 'book bk5 completed after the retry')
    h.check(len(svc['ordering'].deliveries('order.approve', 'bk5')) == 1,
            'book bk5: approved once')
    for x in (ordering, services):
        x.stop()
    for p in svc.values():
        p.stop()


def main(wd):
    import pg
    config_checks(wd)
    pg.on_both_stores(wd, scenario)


if __name__ == '__main__':
    h.run_test(main)
