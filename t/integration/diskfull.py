#!/usr/bin/env python3
"""A full disk and a damaged store.

(a) The store lives on a 4 MiB tmpfs that the test mounts; a filler file
    takes most of it. With the broker stopped, the service publishes 4 KiB
    messages until the disk is full: ingress answers 507 (JSON
    "store-full"), never 500, never a crash; /healthz stays 200 and /readyz
    turns 503. With the broker back (disk still full) relaying continues:
    every message that got a 202 reaches the broker. Deleting the filler
    brings ingress back (202), the outbox drains, and after a restart the
    store passes SQLite's integrity check.
(d) The store alone fills its file system (a tmpfs of its own, no filler):
    with the broker stopped, publish until 507; start the broker. Every
    accepted message reaches the broker, and publishing is answered 202
    again by itself, nothing else freed: sagad keeps the room it needs to
    delete confirmed messages and checkpoint. Nothing accepted is lost, no
    message reaches the broker more than twice, and a restart publishes
    nothing again. Then again with another program (a filler) taking
    every byte left free once the store answers 507: the same recovery.
    (DISKFULL_ONLY=alone or =foreign runs one of these alone.)
(b) A damaged store file makes sagad stop at startup with exit status 3
    and an error line naming the file, never a crash: a truncated file, a
    garbage header, garbage pages after the header, a text file, a store
    directory that cannot be written.

Needs root (mount); skipped (exit 77) where tmpfs cannot be mounted.
"""

import atexit
import collections
import os
import sqlite3
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402

SIZE = 4 * 1024 * 1024
FREE = 1024 * 1024          # left free for the fill-up phase
STEADY_FREE = 1536 * 1024   # left free for the steady phase
BODY = 4096
PROBLEMS = []       # strict findings, reported together at the end


def expect(cond, msg, detail=None):
    """A strict check that does not stop the scenario: what follows still
    runs, and the test fails at the end."""
    if cond:
        h.log('ok: ' + msg)
    else:
        h.log('FAILED: %s: %s' % (msg, detail))
        PROBLEMS.append('%s: %s' % (msg, detail))


def mount_tmpfs(path, size=SIZE):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=%d,mode=0755' % size, 'tmpfs', path],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return r.returncode == 0, r.stdout.decode(errors='replace').strip()


def umount(path):
    for _ in range(20):
        r = subprocess.run(['umount', path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if r.returncode == 0 or not os.path.ismount(path):
            return
        time.sleep(0.5)
    h.log('warning: could not unmount %s: %s' % (path, r.stdout.decode(errors='replace')))


def df(path):
    s = os.statvfs(path)
    return s.f_bavail * s.f_frsize


def integrity(path):
    db = sqlite3.connect('file:%s?mode=ro' % path, uri=True, timeout=10)
    try:
        return db.execute('PRAGMA integrity_check').fetchall()
    finally:
        db.close()


def fill(path, free):
    """Grow the filler file at path until about free bytes stay free."""
    with open(path, 'ab') as f:
        n = max(0, df(os.path.dirname(path)) - free)
        f.write(b'\0' * n)
        f.flush()
        os.fsync(f.fileno())


def phase_full(wd, broker, tool, disk):
    h.log('== (a) the store on a %d MiB tmpfs, filled up while the broker is down'
          % (SIZE >> 20))
    filler = os.path.join(disk, 'filler')
    tool.declare_queue(broker.url, 'full', [('events', 'full.#')])
    d = h.Sagad(wd, broker.url, name='orders')
    d.store = os.path.join(disk, 'orders.db')
    d.write_conf()
    broker.stop()
    d.start(wait_ready=False)
    fill(filler, FREE)
    h.log('%d KiB free on the tmpfs' % (df(disk) >> 10))
    accepted = []
    statuses = {}
    first_full = None
    t0 = time.time()
    i = 0
    while time.time() - t0 < 90:
        mid = 'f-%d' % i
        st, doc, _ = d.publish('events', 'full.%d' % i, bytes([97 + i % 26]) * BODY,
                               {'Message-Id': mid}, timeout=30)
        statuses[st] = statuses.get(st, 0) + 1
        if st == 202:
            accepted.append(mid)
        elif st == 507:
            if first_full is None:
                first_full = (i, doc, df(disk))
            if statuses[507] >= 20:
                break
        else:
            raise AssertionError('publish %d while filling the disk: %d %s' % (i, st, doc))
        i += 1
    h.check(first_full is not None, 'the disk filled up: 507 after %d messages of %d bytes '
            '(%s KiB free then)' % (first_full[0] if first_full else -1, BODY,
                                   first_full[2] >> 10 if first_full else '?'), statuses)
    h.check(first_full[1] and first_full[1].get('error') == 'store-full',
            'the 507 body is JSON with error "store-full"', first_full[1])
    h.log('answers while filling: %s' % statuses)
    h.check(set(statuses) <= {202, 507}, 'only 202 and 507 answers (no 500)', statuses)
    h.check(d.running(), 'sagad still runs with the disk full')
    st, _ = d.admin_get('/healthz')
    h.check(st == 200, '/healthz 200 with the disk full', st)
    st, body = d.admin_get('/readyz')
    h.log('/readyz with the disk full and the broker down: %d %s' % (st, body.strip()))
    h.check(st == 503, '/readyz 503', st)
    st, doc, _ = d.publish('events', 'full.x', b'x' * BODY, {'Message-Id': 'f-x'})
    h.check(st == 507, 'still 507 a moment later', st)
    pending_full = d.metric('sagad_outbox_pending')
    h.log('outbox pending with the disk full: %s (accepted %d)' % (pending_full, len(accepted)))

    h.log('-- broker back, the disk still full: relaying continues')
    broker.start()
    t_relay = time.time()
    got = collections.Counter()

    def arrived():
        for m in tool.consume(broker.url, 'full', 5000, timeout=2):
            got[m['message_id']] += 1
        return set(accepted) <= set(got)
    h.wait_until(arrived, 120, 'every 202 message at the broker while the disk is full',
                 interval=1)
    h.check(True, 'all %d messages that got a 202 reached the broker with the disk still full '
            '(%.1fs)' % (len(accepted), time.time() - t_relay))
    time.sleep(3)
    arrived()
    h.check(d.running(), 'sagad still runs')
    m = d.metrics()
    h.log('disk still full, broker back: outbox pending %s, published_total %s, copies at the '
          'broker %d for %d ids' % (m.get('sagad_outbox_pending'), m.get('sagad_published_total'),
                                    sum(got.values()), len(got)))
    storm = sum(got.values())
    expect(storm <= 10 * len(accepted), 'disk full, broker back: confirmed messages that cannot '
           'be marked in the store are not republished in a tight loop (at most 10 copies per '
           'message at the broker)', '%d copies of %d messages in %.0fs, published_total %s'
           % (storm, len(got), time.time() - t_relay, m.get('sagad_published_total')))
    st, doc, _ = d.publish('events', 'full.y', b'y' * BODY, {'Message-Id': 'f-y'})
    h.log('ingress after relaying, filler still there: %d %s' % (st, (doc or {}).get('error', '')))
    if st == 202:
        accepted.append('f-y')

    h.log('-- filler deleted: ingress recovers')
    os.unlink(filler)
    t_rec = time.time()

    def recovered():
        st, doc, _ = d.publish('events', 'full.r', b'r' * BODY, {'Message-Id': 'r-0'})
        return st in (200, 202)
    h.wait_until(recovered, 30, 'a 202 once space is free', interval=0.5)
    accepted.append('r-0')
    h.check(True, 'ingress answers 202 again %.1fs after the filler was deleted'
            % (time.time() - t_rec))
    for i in range(1, 20):
        st, doc, _ = d.publish('events', 'full.r', b'r' * BODY, {'Message-Id': 'r-%d' % i})
        if st != 202:
            raise AssertionError('after recovery, publish %d: %d %s' % (i, st, doc))
        accepted.append('r-%d' % i)
    h.check(True, '20 more messages accepted after recovery')
    h.wait_until(lambda: d.metric('sagad_outbox_pending') == 0, 60, 'the outbox drained')
    st, _ = d.admin_get('/readyz')
    h.check(st == 200, '/readyz 200 again', st)
    h.wait_until(arrived, 60, 'every accepted message at the broker', interval=1)
    h.check(True, 'all %d accepted messages arrived (%d copies in all)'
            % (len(accepted), sum(got.values())))
    rc = d.stop()
    h.check(rc == 0, 'SIGTERM: exit 0', rc)
    res = integrity(d.store)
    h.check(res == [('ok',)], 'PRAGMA integrity_check of the store: ok', res)
    d.start()
    h.check(d.metric('sagad_outbox_pending') == 0, 'restarted on the same store: nothing pending')
    d.stop()
    return {'accepted': len(accepted), 'first_507_after': first_full[0],
            'copies': sum(got.values())}


def phase_steady(wd, broker, tool, disk):
    """Little live data, a lot of traffic, little free space: the store must
    not report itself full because its write-ahead log keeps growing."""
    h.log('== (c) steady traffic with %d KiB free: the outbox stays small' % (STEADY_FREE >> 10))
    tool.declare_queue(broker.url, 'steady', [('events', 'steady.#')])
    d = h.Sagad(wd, broker.url, name='steady')
    d.store = os.path.join(disk, 'steady.db')
    d.write_conf()
    d.start()
    filler = os.path.join(disk, 'filler2')
    fill(filler, STEADY_FREE)
    n, full = 1000, []
    max_pending = 0
    for i in range(n):
        st, doc, _ = d.publish('events', 'steady.%d' % i, b's' * BODY, {'Message-Id': 's-%d' % i})
        if st == 507:
            full.append(i)
        elif st != 202:
            raise AssertionError('steady publish %d: %d %s' % (i, st, doc))
        if i % 25 == 24:
            max_pending = max(max_pending, d.metric('sagad_outbox_pending'))
            if full:
                break
            # Keep the live data small whatever the load on this machine:
            # what is under test is that space freed by relayed messages is
            # reused, not how fast a loaded broker confirms.
            h.wait_until(lambda: d.metric('sagad_outbox_pending') <= 25, 60,
                         'the outbox relayed (pending <= 25)')
    sizes = {os.path.basename(p): os.path.getsize(os.path.join(disk, p))
             for p in os.listdir(disk) if p.startswith('steady.db')}
    h.log('after %d publishes: max outbox pending seen %d, store files %s, %d KiB free'
          % (i + 1, max_pending, sizes, df(disk) >> 10))
    expect(not full, '%d x %d bytes through an outbox of at most ~%d messages with %d KiB '
           'free: no 507' % (n, BODY, max_pending, STEADY_FREE >> 10),
           'first 507 at message %s; the -wal file holds %s bytes' % (
               full[:1], sizes.get('steady.db-wal')))
    d.stop()
    os.unlink(filler)


ALONE_SIZE = 2 * 1024 * 1024


def phase_alone(wd, broker, tool, disk, foreign=False):
    """Issue 14, A7: nothing but the store on its file system. Once the
    disk is full, deleting a confirmed message needs room in the write-ahead
    log: sagad must have kept it, or it refuses every publish for good.
    foreign: then another program takes every byte left free."""
    h.log('== (d) the store alone fills a %d MiB tmpfs while the broker is down%s'
          % (ALONE_SIZE >> 20, '; then a filler takes the rest' if foreign else ''))
    tool.declare_queue(broker.url, 'alone', [('events', 'alone.#')])
    d = h.Sagad(wd, broker.url, name='alone')
    d.store = os.path.join(disk, 'alone.db')
    d.write_conf()
    broker.stop()
    d.start(wait_ready=False)
    accepted, statuses, i = [], collections.Counter(), 0
    t0 = time.time()
    while time.time() - t0 < 90 and statuses[507] < 20:
        mid = 'a-%d' % i
        st, doc, _ = d.publish('events', 'alone.%d' % i, bytes([97 + i % 26]) * BODY,
                               {'Message-Id': mid}, timeout=30)
        statuses[st] += 1
        if st == 202:
            accepted.append(mid)
        elif st != 507:
            raise AssertionError('publish %d while filling the disk: %d %s' % (i, st, doc))
        i += 1
    h.check(statuses[507] >= 20, 'the store filled its disk: %d accepted, then 507 (%d KiB '
            'free)' % (len(accepted), df(disk) >> 10), dict(statuses))
    h.log('store files when full: %s' % {p: os.path.getsize(os.path.join(disk, p))
                                         for p in os.listdir(disk)})
    filler = os.path.join(disk, 'filler')
    if foreign:
        try:
            fill(filler, 0)
        except OSError as e:
            h.log('filler: %s' % e)
        h.log('a filler took the rest: %d KiB free' % (df(disk) >> 10))

    h.log('-- broker back: confirmed messages free their room, publishing resumes')
    broker.start()
    got = collections.Counter()

    def arrived():
        for m in tool.consume(broker.url, 'alone', 5000, timeout=2):
            got[m['message_id']] += 1
        return set(accepted) <= set(got)
    h.wait_until(arrived, 120, 'every accepted message at the broker', interval=1)
    t_back = time.time()
    resumed = []

    def resumes():
        mid = 'a-r-%d' % len(resumed)
        st, doc, _ = d.publish('events', 'alone.r', b'r' * BODY, {'Message-Id': mid})
        if st == 202:
            accepted.append(mid)
            resumed.append(mid)
        return st == 202
    ok = True
    try:
        h.wait_until(resumes, 60, 'a 202 again, nothing freed but by sagad', interval=1)
    except AssertionError:
        ok = False
    m = d.metrics()
    expect(ok, 'publishing answered 202 again %.1fs after the broker came back, with nothing '
           'freed but by sagad' % (time.time() - t_back),
           'still 507 after 60 s: outbox pending %s; last log lines:\n%s'
           % (m.get('sagad_outbox_pending'), h.tail(d.logfile, 8, skip_debug=True)))
    if ok:
        for k in range(40):
            mid = 'a-s-%d' % k
            st, doc, _ = d.publish('events', 'alone.s', b's' * BODY, {'Message-Id': mid})
            if st == 202:
                accepted.append(mid)
            else:
                expect(False, 'steady publishing after recovery', 'publish %d: %d %s'
                       % (k, st, doc))
                break
            if k % 10 == 9:
                h.wait_until(lambda: d.metric('sagad_outbox_pending') == 0, 60,
                             'the outbox drained')
        h.wait_until(lambda: d.metric('sagad_outbox_pending') == 0, 60, 'the outbox drained')
        h.wait_until(arrived, 60, 'every accepted message at the broker', interval=1)
    rc = d.stop()
    h.check(rc == 0, 'SIGTERM: exit 0', rc)
    res = integrity(d.store)
    h.check(res == [('ok',)], 'PRAGMA integrity_check of the store: ok', res)
    before = sum(got.values())
    d.start(wait_ready=False)
    time.sleep(3)
    pending = d.metric('sagad_outbox_pending')
    arrived()
    expect(pending == 0 and sum(got.values()) == before, 'restarted: nothing pending, nothing '
           'published again', 'pending %s, %d more copies at the broker'
           % (pending, sum(got.values()) - before))
    d.stop()
    if os.path.exists(filler):
        os.unlink(filler)
    for p in os.listdir(disk):
        os.unlink(os.path.join(disk, p))
    twice = sorted(k for k, v in got.items() if v > 2)
    expect(not twice, '%d accepted, none lost, none at the broker more than twice '
           '(%d copies in all)' % (len(accepted), sum(got.values())), twice[:10])
    h.check(set(accepted) <= set(got), 'nothing accepted is lost',
            sorted(set(accepted) - set(got))[:10])


def damaged(wd, broker, name, how):
    """A store made by a normal run, then damaged by how(path); sagad must
    exit 3 with a line naming the file."""
    d = h.Sagad(wd, broker.url, name=name)
    d.start()
    for i in range(300):
        st, _, _ = d.publish('events', 'dmg.%d' % i, b'd' * 1000, {'Message-Id': 'd-%d' % i})
        assert st == 202, st
    d.stop()
    for sfx in ('-wal', '-shm'):
        if os.path.exists(d.store + sfx):
            os.unlink(d.store + sfx)
    what = how(d.store)
    t0 = time.time()
    try:
        d.start(timeout=20)
        raise AssertionError('%s: sagad started on a damaged store' % what)
    except RuntimeError:
        pass
    rc = d.proc.returncode
    lines = [l for l in d.log().splitlines() if 'level=error' in l]
    h.check(rc == 3, '%s: exit status 3 (%.1fs)' % (what, time.time() - t0), (rc, lines))
    h.check(any(d.store in l for l in lines), '%s: an error line names the file' % what, lines)
    h.log('%s: %s' % (what, lines[-1] if lines else '(no error line)'))
    return lines


def phase_damaged(wd, broker):
    h.log('== (b) damaged store files')

    def truncate(p):
        n = os.path.getsize(p)
        with open(p, 'r+b') as f:
            f.truncate(n // 2 + 123)
        return 'truncated to half (%d of %d bytes)' % (n // 2 + 123, n)

    def header(p):
        with open(p, 'r+b') as f:
            f.write(b'this is not an SQLite header, it is damage' * 2 + b'\0' * 16)
        return 'garbage over the 100-byte header'

    def pages(p):
        n = os.path.getsize(p)
        with open(p, 'r+b') as f:
            f.seek(4096)
            f.write(os.urandom(n - 4096))
        return 'random bytes over every page after the first'

    def text(p):
        with open(p, 'w') as f:
            f.write('hello\n' * 1000)
        return 'a text file'

    for name, how in (('trunc', truncate), ('hdr', header), ('pages', pages), ('text', text)):
        damaged(wd, broker, name, how)

    h.log('-- a store path that cannot be created')
    d = h.Sagad(wd, broker.url, name='nodir')
    d.store = os.path.join(wd, 'no', 'such', 'dir', 'nodir.db')
    d.write_conf()
    try:
        d.start(timeout=20)
        raise AssertionError('sagad started without a store directory')
    except RuntimeError:
        pass
    lines = [l for l in d.log().splitlines() if 'level=error' in l]
    h.check(d.proc.returncode == 3 and any(d.store in l for l in lines),
            'missing store directory: exit 3, the path in the error line', lines)


def main(wd):
    if os.geteuid() != 0:
        print('skipped: needs root to mount a tmpfs')
        sys.exit(77)
    disk = os.path.join(wd, 'disk')
    ok, err = mount_tmpfs(disk)
    if not ok:
        print('skipped: cannot mount a tmpfs here: %s' % err)
        sys.exit(77)
    atexit.register(umount, disk)
    alone = os.path.join(wd, 'alone')
    ok, err = mount_tmpfs(alone, ALONE_SIZE)
    if not ok:
        print('skipped: cannot mount a second tmpfs here: %s' % err)
        sys.exit(77)
    atexit.register(umount, alone)
    try:
        broker = h.Broker(wd)
        broker.start()
        tool = h.AmqpTool()
        only = os.environ.get('DISKFULL_ONLY')    # one phase, when working on it
        if only in ('alone', 'foreign'):
            phase_alone(wd, broker, tool, alone, foreign=only == 'foreign')
            if PROBLEMS:
                raise AssertionError('%d strict check(s) failed:\n  %s'
                                     % (len(PROBLEMS), '\n  '.join(PROBLEMS)))
            return
        phase_damaged(wd, broker)
        figs = phase_full(wd, broker, tool, disk)
        h.log('figures: tmpfs %d MiB, %d KiB free, first 507 after %d x %d-byte messages; '
              '%d accepted, 0 lost, %d copies at the broker'
              % (SIZE >> 20, FREE >> 10, figs['first_507_after'], BODY, figs['accepted'],
                 figs['copies']))
        phase_steady(wd, broker, tool, disk)
        phase_alone(wd, broker, tool, alone)
        phase_alone(wd, broker, tool, alone, foreign=True)
        if PROBLEMS:
            raise AssertionError('%d strict check(s) failed:\n  %s'
                                 % (len(PROBLEMS), '\n  '.join(PROBLEMS)))
    finally:
        h.log('files on the tmpfs: %s' % {p: os.path.getsize(os.path.join(disk, p))
                                          for p in os.listdir(disk)})
        h.cleanup_all()
        umount(disk)
        umount(alone)


h.run_test(main)
