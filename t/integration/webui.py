#!/usr/bin/env python3
"""The operators' web page (sagad(8) WEB PAGE), over HTTP and in a real
headless browser (Debian's chromium, driven by Debian's python3-selenium
through chromedriver).

Two sagad processes on a private RabbitMQ: "orders" (admin token set)
runs a three-step orchestrated saga and has a subscription "audit" whose
service refuses one message (a dead letter); "stock" delivers the saga's
commands to a participant that refuses the third step of one saga.

Over HTTP: /ui redirects to /ui/; the page's files are served with their
types, a Content-Security-Policy of their own origin and nosniff, without
the token, while the admin API still needs it; names with a slash, a dot
first, an unknown type, a symbolic link or a directory are 404; POST is
405; `ui_dir = ""` (after SIGHUP) turns the page off and back on.

In chromium: the page asks for the token (a wrong one is refused), lists
the three sagas and filters them by state, a saga's timeline shows its
commands and then its compensations in reverse order (compensate charge,
then compensate reserve), the dead letter is replayed from the page and
reaches the service again, the outbox view loads; no console error but
the 401 of the first call.

Then the demo (demo/demo.py, its 40 orders) runs, and the page of its
orders sagad (no token there) lists its sagas: as many completed and
compensated as the demo counted, and a compensated order's timeline with
its compensation. Screenshots of each page go to
$top_builddir/t/integration/webui-screenshots/ (the README's picture is
7-demo-saga.png).
"""

import http.client
import json
import os
import shutil
import sys
import threading
import time

# selenium is Debian's python3-selenium: run by Debian's own python3,
# whatever python3 make check found first (as harness.Pika does for pika).
DEBIAN_PYTHON = '/usr/bin/python3'
try:
    import selenium  # noqa: F401
except ImportError:
    if os.path.realpath(sys.executable) != os.path.realpath(DEBIAN_PYTHON) and \
            os.access(DEBIAN_PYTHON, os.X_OK):
        os.execv(DEBIAN_PYTHON, [DEBIAN_PYTHON] + sys.argv)

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 'demo'))
import harness as h  # noqa: E402
import demo  # noqa: E402
from sagas import Answer, Participant, api_publish, saga_state, subscription_conf  # noqa: E402

TOKEN = 'webui-s3cret'

SAGA = '''sagas = (
  { name = "order"; start = "events:order.created"; timeout = 120;
    steps = (
      { name = "reserve"; command = "commands:stock.reserve"; compensate = "commands:stock.release"; timeout = 30; },
      { name = "charge";  command = "commands:pay.charge";    compensate = "commands:pay.refund";    timeout = 30; },
      { name = "ship";    command = "commands:ship.book";     compensate = "commands:ship.cancel";   timeout = 30; }
    );
    completed = "events:order.done"; compensated = "events:order.undone";
    retry_initial = 0.2; retry_max = 0.5;
  }
);
'''


def raw(port, method, path, headers=None):
    """One request as written (no normalisation): (status, headers, body)."""
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
    try:
        c.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            c.putheader(k, v)
        c.putheader('Content-Length', '0')
        c.endheaders()
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def ui_copy(wd):
    """The page's files, plus what must never be served."""
    src = os.path.join(h.top_srcdir, 'ui')
    dst = os.path.join(wd, 'ui')
    shutil.copytree(src, dst)
    with open(os.path.join(dst, 'store.db'), 'w') as f:
        f.write('not for the browser\n')
    with open(os.path.join(dst, '.hidden.js'), 'w') as f:
        f.write('// hidden\n')
    os.symlink('/etc/passwd', os.path.join(dst, 'link.js'))
    os.mkdir(os.path.join(dst, 'dir.js'))
    return dst


def http_checks(d, ui):
    port = d.admin_port
    st, hd, _ = raw(port, 'GET', '/ui')
    h.check(st == 301 and hd.get('location') == '/ui/', 'GET /ui redirects to /ui/', (st, hd))
    st, hd, body = raw(port, 'GET', '/ui/')
    h.check(st == 200 and hd.get('content-type') == 'text/html; charset=utf-8' and
            b'<title>sagad</title>' in body, 'GET /ui/ is index.html, without the token', (st, hd))
    csp = hd.get('content-security-policy', '')
    h.check("default-src 'none'" in csp and "script-src 'self'" in csp and
            "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp and
            hd.get('x-content-type-options') == 'nosniff',
            'the page has a Content-Security-Policy of its own origin and nosniff', hd)
    for name, ctype in (('app.js', 'text/javascript; charset=utf-8'),
                        ('timeline.js', 'text/javascript; charset=utf-8'),
                        ('style.css', 'text/css; charset=utf-8')):
        st, hd, body = raw(port, 'GET', '/ui/' + name)
        with open(os.path.join(ui, name), 'rb') as f:
            want = f.read()
        h.check(st == 200 and hd.get('content-type') == ctype and body == want,
                '/ui/%s is served whole as %s' % (name, ctype), (st, hd))
    for path in ('/ui/../%s.conf' % d.name, '/ui/%2e%2e%2fsagad.conf', '/ui/.hidden.js',
                 '/ui/store.db', '/ui/link.js', '/ui/dir.js', '/ui/missing.js', '/ui/a/app.js'):
        st, hd, body = raw(port, 'GET', path)
        h.check(st == 404 and b'not for the browser' not in body and b'root:' not in body,
                'GET %s: 404' % path, (st, body[:200]))
    st, hd, _ = raw(port, 'POST', '/ui/app.js')
    h.check(st == 405 and 'GET' in hd.get('allow', ''), 'POST /ui/app.js: 405 with Allow', (st, hd))
    st, _, _ = raw(port, 'GET', '/v1/admin/sagas')
    h.check(st == 401, 'the admin API still needs the token', st)
    st, _, body = raw(port, 'GET', '/v1/admin/status', {'Authorization': 'Bearer ' + TOKEN})
    h.check(st == 200 and b'"sagas":[{"name":"order","mode":"orchestrated",'
            b'"steps":["reserve","charge","ship"]}]' in body,
            'the status names the configured sagas (the page\'s filter)', body[:400])

    # ui_dir = "" turns the page off; reloadable.
    d.api_extra = 'ui_dir = "";'
    d.write_conf()
    d.hup()
    h.wait_until(lambda: raw(port, 'GET', '/ui/')[0] == 404, 10, 'the page off after SIGHUP')
    st, _, body = raw(port, 'GET', '/ui/app.js')
    h.check(st == 404 and b'api.ui_dir' in body, 'ui_dir = "": the page is off and says so', body)
    d.api_extra = 'ui_dir = %s;' % h.conf_str(ui)
    d.write_conf()
    d.hup()
    h.wait_until(lambda: raw(port, 'GET', '/ui/')[0] == 200, 10, 'the page back after SIGHUP')


# ---------------------------------------------------------------- browser

def browser(wd):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise AssertionError('python3-selenium is not installed (t/lib/deps.sh installs it)')
    for path in ('/usr/bin/chromium', '/usr/bin/chromedriver'):
        h.check(os.access(path, os.X_OK), '%s is there (t/lib/deps.sh installs it)' % path)
    opts = webdriver.ChromeOptions()
    opts.binary_location = '/usr/bin/chromium'
    for a in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
              '--window-size=1400,1000', '--user-data-dir=' + os.path.join(wd, 'chromium'),
              '--no-first-run', '--disable-extensions', '--disable-background-networking'):
        opts.add_argument(a)
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    svc = Service('/usr/bin/chromedriver', log_output=os.path.join(wd, 'chromedriver.log'))
    drv = webdriver.Chrome(service=svc, options=opts)
    drv.set_page_load_timeout(30)
    return drv


class Page:
    """The page in the browser, with waits on what it shows."""

    def __init__(self, drv, shots):
        self.drv = drv
        self.shots = shots

    def wait(self, js, what, timeout=20):
        h.wait_until(lambda: self.drv.execute_script(js), timeout, what, interval=0.2)

    def visible(self, view):
        return "return !document.getElementById('view-%s').hidden" % view

    def shot(self, name):
        path = os.path.join(self.shots, name + '.png')
        self.drv.save_screenshot(path)
        h.log('screenshot %s' % path)

    def js(self, code):
        return self.drv.execute_script(code)

    def click(self, selector):
        self.drv.find_element('css selector', selector).click()


def screenshots():
    shots = os.path.join(h.top_builddir, 't', 'integration', 'webui-screenshots')
    os.makedirs(shots, exist_ok=True)
    return shots


def console_errors(drv):
    """Errors in the browser's console, but the 401 that asks for the token."""
    return [e for e in drv.get_log('browser') if e.get('level') == 'SEVERE' and
            '401' not in e.get('message', '')]


def browser_checks(wd, d, audit):
    drv = browser(wd)
    try:
        p = Page(drv, screenshots())
        base = 'http://127.0.0.1:%d/ui/' % d.admin_port
        drv.get(base)
        p.wait(p.visible('login'), 'the page asks for the token')
        p.shot('1-token')
        drv.find_element('id', 'token').send_keys('wrong')
        p.click('#login-form button')
        p.wait("return document.getElementById('login-error').textContent"
               ".indexOf('refused') >= 0", 'a wrong token is refused')
        drv.find_element('id', 'token').send_keys(TOKEN)
        p.click('#login-form button')
        p.wait(p.visible('sagas'), 'the sagas view after the token')
        p.wait("return document.querySelectorAll('#saga-table tbody tr').length == 3",
               'three sagas listed')
        ids = p.js("return Array.from(document.querySelectorAll('#saga-table tbody tr'))"
                   ".map(function (r) { return r.dataset.id; }).sort()")
        h.check(ids == ['w1', 'w2', 'w3'], 'the page lists the three sagas', ids)
        h.check(p.js("return document.getElementById('service').textContent").startswith('orders'),
                'the header names the service')
        p.shot('2-sagas')

        drv.find_element('id', 'filter-state').send_keys('compensated')
        p.click('#saga-filter button')
        p.wait("return location.hash == '#sagas?state=compensated' && "
               "document.querySelectorAll('#saga-table tbody tr').length == 1 && "
               "document.querySelector('#saga-table tbody tr').dataset.id == 'w3'",
               'the state filter leaves w3 alone')

        p.click('#saga-table tbody tr a')
        p.wait(p.visible('saga') + " && document.querySelectorAll('svg.timeline g.bar').length > 0",
               "w3's timeline")
        bars = p.js("return Array.from(document.querySelectorAll('svg.timeline g.bar'))"
                    ".map(function (g) { return [g.dataset.kind, g.dataset.step, g.dataset.result]; })")
        want = [['command', 'reserve', 'success'], ['command', 'charge', 'success'],
                ['command', 'ship', 'failure'], ['compensate', 'charge', 'success'],
                ['compensate', 'reserve', 'success']]
        h.check(bars == want, "w3's timeline: three commands, ship refused, then compensate "
                'charge and compensate reserve (reverse order)', bars)
        marks = p.js("return Array.from(document.querySelectorAll('svg.timeline g.mark'))"
                     ".map(function (g) { return g.dataset.what; })")
        h.check('compensating' in marks and 'compensated' in marks,
                'the timeline marks the state changes', marks)
        rows = p.js("return document.querySelectorAll('table.history tr').length")
        h.check(rows > 10, "w3's history is listed", rows)
        p.shot('3-saga-timeline')

        # The dead letter, replayed from the page.
        drv.get(base + '#dlq/audit')
        p.wait(p.visible('dlq') + " && document.querySelector('#dlq-table tbody tr') && "
               "document.querySelector('#dlq-table tbody tr').dataset.messageId == 'a-1'",
               'the dead letter of audit listed')
        p.shot('4-dead-letters')
        before = len(audit.deliveries('audit.entry'))
        audit.rules['audit.entry'] = Answer(200)
        p.click('#dlq-table tbody tr button')
        h.wait_until(lambda: audit.ok_count('audit.entry', '') >= 1, 30,
                     'the replayed dead letter reaches the service')
        h.check(len(audit.deliveries('audit.entry')) == before + 1,
                'the replay delivers the message once more')
        p.wait("return document.querySelectorAll('#dlq-table tbody tr').length == 0",
               'the dead letter is gone from the page', timeout=30)
        h.check('replayed' in p.js("return document.getElementById('message').textContent"),
                'the page says the replay was done')

        drv.get(base + '#outbox')
        p.wait(p.visible('outbox') + " && document.getElementById('outbox-summary')"
               ".textContent.indexOf('waiting') > 0", 'the outbox view')
        p.shot('5-outbox')

        errors = console_errors(drv)
        h.check(not errors, 'no error in the browser console (but the first 401)', errors)
    finally:
        drv.quit()


def demo_page(wd, d):
    """The demo's orders sagad (no token): its sagas on the page."""
    _, status = d.admin_json('/v1/admin/sagas?limit=1000')
    counts = {}
    for s in status['sagas']:
        counts[s['state']] = counts.get(s['state'], 0) + 1
    drv = browser(os.path.join(wd, 'demo-browser'))
    try:
        p = Page(drv, screenshots())
        drv.get('http://127.0.0.1:%d/ui/#sagas?limit=1000' % d.admin_port)
        p.wait(p.visible('sagas') + " && document.querySelectorAll('#saga-table tbody tr')"
               ".length == %d" % len(status['sagas']), "the demo's sagas listed")
        shown = p.js("var c = {}; document.querySelectorAll('#saga-table tbody tr .state')"
                     ".forEach(function (e) { c[e.textContent] = (c[e.textContent] || 0) + 1; });"
                     " return c;")
        h.check(shown == counts and counts.get('compensated') and counts.get('completed'),
                "the page lists the demo's %d sagas by state, as the API does" %
                len(status['sagas']), (shown, counts))
        p.shot('6-demo-sagas')
        sid = sorted(s['id'] for s in status['sagas'] if s['state'] == 'compensated')[0]
        drv.get('http://127.0.0.1:%d/ui/#saga/%s' % (d.admin_port, sid))
        p.wait(p.visible('saga') + " && document.querySelectorAll('svg.timeline g.bar').length",
               "a compensated order's timeline")
        comp = p.js("return Array.from(document.querySelectorAll("
                    "'svg.timeline g.bar.compensate')).map(function (g) { return g.dataset.step; })")
        h.check(comp == ['reserve-stock'], '%s: its timeline shows the stock release' % sid, comp)
        p.shot('7-demo-saga')
        errors = console_errors(drv)
        h.check(not errors, 'no error in the browser console on the demo', errors)
    finally:
        drv.quit()


def main(wd):
    broker = h.Broker(wd)
    broker.start()
    ui = ui_copy(wd)
    stock, audit = Participant('stock'), Participant('audit')
    stock.rules[('ship.book', 'w3')] = Answer(409)
    audit.rules['audit.entry'] = Answer(422)
    d_stock = h.Sagad(wd, broker.url, name='stock', conf_extra=subscription_conf(
        'inbox', ['commands:#'], stock.url))
    d = h.Sagad(wd, broker.url, name='orders', token=TOKEN,
                api_extra='ui_dir = %s;' % h.conf_str(ui),
                conf_extra=SAGA + subscription_conf('audit', ['events:audit.#'], audit.url))
    d_stock.start()
    d.start()
    stock.sagad = d_stock
    for cid in ('w1', 'w2', 'w3'):
        api_publish(d_stock.port, 'events', 'order.created', {'order': cid},
                    {'Correlation-Id': cid, 'Message-Id': 'start-' + cid})
    api_publish(d_stock.port, 'events', 'audit.entry', {'entry': 1}, {'Message-Id': 'a-1'})
    want = {'w1': 'completed', 'w2': 'completed', 'w3': 'compensated'}
    h.wait_until(lambda: all(saga_state(d, c) == s for c, s in want.items()), 60,
                 'the three sagas finished')
    h.wait_until(lambda: json.loads(d.admin_get('/v1/admin/dlq/audit')[1])['count'] == 1, 30,
                 'the audit message dead-lettered')

    http_checks(d, ui)
    browser_checks(wd, d, audit)
    stock.stop()
    audit.stop()
    for x in (d, d_stock):
        x.stop()
    broker.stop()

    demo_wd = os.path.join(wd, 'demo')
    os.makedirs(demo_wd)
    demo.main(demo_wd, then=lambda orders: demo_page(wd, orders))


h.run_test(main)
