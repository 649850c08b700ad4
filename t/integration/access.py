#!/usr/bin/env python3
"""Access control.

(a) api.token_file: every request on both listeners needs
    "Authorization: Bearer <token>" (401 with WWW-Authenticate otherwise),
    except the probes /healthz and /readyz on the admin listener;
(b) unix sockets: api.listen / api.admin_listen = "unix:/path" are created
    with api.socket_mode (default 0660), and answer HTTP;
(c) admin_listen on a non-loopback address is refused by sagad -n (exit 1,
    FILE:LINE) unless admin_allow_remote = true (never started: no listener
    off loopback in the tests);
(d) user = "nobody": root privileges dropped after binding (uid/gid/groups
    and capabilities in /proc/PID/status), the store stays writable across a
    restart, unix sockets belong to that user;
(e) secrets (broker password, in the url or in password_file, and the API
    token) never appear in the log (at -vv, through connect failures, login
    refusals, reloads and broken configurations), in /v1/admin/status,
    /metrics, /v1/admin/subscriptions or `sagactl status`.
"""

import grp
import http.client
import json
import os
import pwd
import re
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402

ERR_LINE = re.compile(r'^(.+?):(\d+): (.+)$')


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=10):
        super().__init__('localhost', timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def unix_request(path, method, url, body=None, headers=None, timeout=10):
    c = UnixHTTPConnection(path, timeout)
    try:
        c.request(method, url, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read().decode('utf-8', 'replace'), dict(r.getheaders())
    finally:
        c.close()


def tcp_request(port, method, url, body=None, headers=None, timeout=10):
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
    try:
        c.request(method, url, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read().decode('utf-8', 'replace'), dict(r.getheaders())
    finally:
        c.close()


def sagad_n(conf):
    r = subprocess.run([h.sagad_path(), '-n', '-f', conf], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)
    return r.returncode, r.stdout.decode(errors='replace'), r.stderr.decode(errors='replace')


def line_of(text, needle):
    for i, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError('%r not in the configuration' % needle)


def proc_status(pid):
    out = {}
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            k, _, v = line.partition(':')
            out[k] = v.split()
    return out


# ------------------------------------------------------------------ (a)

def phase_token(wd, broker):
    h.log('== (a) bearer token on both listeners')
    token = 'tok-%d-Xq9' % os.getpid()
    d = h.Sagad(wd, broker.url, name='tokened', token=token,
                conf_extra='subscriptions = ( { name = "in"; bind = [ "events:tok.#" ];'
                           ' deliver = "http://127.0.0.1:9/x"; } );')
    d.start()
    good = {'Authorization': 'Bearer ' + token}
    bads = {'none': {}, 'wrong': {'Authorization': 'Bearer nope'},
            'prefix': {'Authorization': 'Bearer ' + token[:-1]},
            'suffix': {'Authorization': 'Bearer ' + token + 'x'},
            'basic': {'Authorization': 'Basic ' + token},
            'bare': {'Authorization': token}}
    api = [('POST', '/v1/publish/events/tok.a'), ('GET', '/v1/publish/events/tok.a'),
           ('POST', '/nowhere')]
    admin = [('GET', '/metrics'), ('GET', '/v1/admin/status'), ('GET', '/v1/admin/outbox'),
             ('GET', '/v1/admin/subscriptions'), ('GET', '/v1/admin/sagas'),
             ('GET', '/v1/admin/sagas/some-id'), ('POST', '/v1/admin/sagas/some-id/retry'),
             ('GET', '/v1/admin/dlq/in'), ('POST', '/v1/admin/dlq/in/replay')]
    n = 0
    for port, routes in ((d.port, api), (d.admin_port, admin)):
        for method, url in routes:
            for what, hdrs in bads.items():
                st, body, rh = tcp_request(port, method, url, b'x' if method == 'POST' else None,
                                           hdrs)
                doc = json.loads(body) if body.startswith('{') else {}
                if st != 401 or doc.get('error') != 'unauthorized' or \
                        'bearer' not in rh.get('WWW-Authenticate', '').lower():
                    raise AssertionError('%s %s port %d with %s token: %d %s %s'
                                         % (method, url, port, what, st, body, rh))
                n += 1
    h.check(True, '%d requests without the right token on both listeners: all 401 '
            '"unauthorized" with WWW-Authenticate: Bearer' % n)
    st, body, _ = tcp_request(d.port, 'POST', '/v1/publish/events/tok.a', b'x',
                              dict(good, **{'Message-Id': 'tok-ok'}))
    h.check(st == 202, 'ingress with the token: 202', (st, body))
    st, body, _ = tcp_request(d.port, 'POST', '/v1/publish/events/tok.a', b'x',
                              {'authorization': 'bearer ' + token, 'Message-Id': 'tok-ok2'})
    h.log('ingress with "authorization: bearer <token>" (lowercase scheme): %d' % st)
    for method, url in admin[:5]:
        st, body, _ = tcp_request(d.admin_port, method, url, None, good)
        h.check(st == 200, 'admin %s with the token: 200' % url, (st, body[:200]))
    for url in ('/healthz', '/readyz'):
        for hdrs in ({}, {'Authorization': 'Bearer nope'}):
            st, body, _ = tcp_request(d.admin_port, 'GET', url, None, hdrs)
            h.check(st == 200, 'probe %s open without a valid token (%s): 200'
                    % (url, 'no header' if not hdrs else 'wrong token'), (st, body))
    st, body, _ = tcp_request(d.port, 'GET', '/healthz', None, {})
    h.check(st == 401, 'the service listener has no open probe: /healthz there is 401', st)
    rc, out, err = h.sagactl(d, 'status', check=False)
    h.check(rc == 0, 'sagactl -t TOKENFILE status works', err)
    d.token = None      # sagactl without -t
    rc, out, err = h.sagactl(d, 'status', check=False)
    h.check(rc == 1 and ('401' in err or 'unauthorized' in err.lower()),
            'sagactl without the token: exit 1 naming the refusal', (rc, err.strip()))
    d.token = token
    # SIGHUP reads the token file again (sagad.conf(5))
    new = token + '-rotated'
    with open(d.token_file, 'w') as f:
        f.write(new + '\n')
    d.hup()
    h.wait_until(lambda: 'configuration reloaded' in d.log(), 10, 'the reload')
    st_old = tcp_request(d.port, 'POST', '/v1/publish/events/tok.a', b'x',
                         dict(good, **{'Message-Id': 'tok-rot-1'}))[0]
    st_new = tcp_request(d.port, 'POST', '/v1/publish/events/tok.a', b'x',
                         {'Authorization': 'Bearer ' + new, 'Message-Id': 'tok-rot-2'})[0]
    st_adm = tcp_request(d.admin_port, 'GET', '/metrics', None,
                         {'Authorization': 'Bearer ' + new})[0]
    h.check((st_old, st_new, st_adm) == (401, 202, 200),
            'token rotated by SIGHUP: old token 401, new one 202 (ingress) and 200 (admin)',
            (st_old, st_new, st_adm))
    d.stop()
    return token


# ------------------------------------------------------------------ (b)

def start_unix(d, admin_sock=None):
    """Start d; when admin_sock is given the admin API is on that unix
    socket, and the harness's readiness poll goes there."""
    if admin_sock:
        def admin_get(path, timeout=10):
            st, body, _ = unix_request(admin_sock, 'GET', path, timeout=timeout)
            return st, body
        d.admin_get = admin_get
    d.start()


def phase_unix(wd, broker):
    h.log('== (b) unix sockets and socket_mode')
    sdir = os.path.join(wd, 'run')
    os.makedirs(sdir, exist_ok=True)
    api_sock = os.path.join(sdir, 'api.sock')
    d = h.Sagad(wd, broker.url, name='unixdef')
    d.write_conf(d.conf_text().replace('listen = "127.0.0.1:%d";' % d.port,
                                       'listen = %s;' % h.conf_str('unix:' + api_sock)))
    old = os.umask(0o022)
    try:
        start_unix(d)
    finally:
        os.umask(old)
    mode = os.stat(api_sock).st_mode & 0o7777
    h.check(mode == 0o660, 'api.listen unix socket, default socket_mode: mode 0660', oct(mode))
    st, body, _ = unix_request(api_sock, 'POST', '/v1/publish/events/unix.a', b'u',
                               {'Message-Id': 'unix-a'})
    h.check(st == 202, 'publish over the unix socket: 202', (st, body))
    d.stop()
    h.check(True, 'stopped; socket file %s after the stop'
            % ('left' if os.path.exists(api_sock) else 'removed'))

    admin_sock = os.path.join(sdir, 'admin.sock')
    if not os.path.exists(api_sock):
        # a stale socket file, as a crashed daemon leaves it
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(api_sock)
        s.close()
    d2 = h.Sagad(wd, broker.url, name='unix600', api_extra='socket_mode = "0600";')
    text = d2.conf_text()
    text = text.replace('listen = "127.0.0.1:%d";' % d2.port,
                        'listen = %s;' % h.conf_str('unix:' + api_sock), 1)
    text = text.replace('admin_listen = "127.0.0.1:%d";' % d2.admin_port,
                        'admin_listen = %s;' % h.conf_str('unix:' + admin_sock))
    d2.write_conf(text)
    old = os.umask(0)
    try:
        start_unix(d2, admin_sock)
    finally:
        os.umask(old)
    h.check(os.path.exists(api_sock), 'a stale file at the socket path was replaced')
    for p in (api_sock, admin_sock):
        mode = os.stat(p).st_mode & 0o7777
        h.check(mode == 0o600, 'socket_mode = "0600" under umask 0: %s mode 0600'
                % os.path.basename(p), oct(mode))
    st, body, _ = unix_request(admin_sock, 'GET', '/metrics')
    h.check(st == 200 and 'sagad_outbox_pending' in body, 'admin over its unix socket: /metrics')
    st, body, _ = unix_request(api_sock, 'POST', '/v1/publish/events/unix.b', b'u',
                               {'Message-Id': 'unix-b'})
    h.check(st == 202, 'publish over the 0600 socket: 202', (st, body))
    d2.stop()

    h.log('-- socket_mode values sagad -n refuses')
    for bad in ('"0999"', '"rw-rw----"', '"01777"', '660'):
        d3 = h.Sagad(wd, broker.url, name='badmode', api_extra='socket_mode = %s;' % bad)
        rc, _, err = sagad_n(d3.conf)
        h.log('socket_mode = %s: sagad -n exit %d %s' % (bad, rc, err.strip()[:120]))
        h.check(rc == 1 and d3.conf + ':' in err, 'socket_mode = %s refused (exit 1, FILE:LINE)'
                % bad, (rc, err))


# ------------------------------------------------------------------ (c)

def phase_admin_remote(wd, broker):
    h.log('== (c) admin_listen off loopback')
    for addr, ok in (('0.0.0.0:7601', False), ('[::]:7601', False), ('192.0.2.10:7601', False),
                     ('example.org:7601', False), (':7601', None),
                     ('127.0.0.2:7601', True), ('localhost:7601', True), ('[::1]:7601', True)):
        d = h.Sagad(wd, broker.url, name='adm')
        text = d.conf_text().replace('admin_listen = "127.0.0.1:%d";' % d.admin_port,
                                     'admin_listen = %s;' % h.conf_str(addr))
        d.write_conf(text)
        rc, out, err = sagad_n(d.conf)
        if ok is None:      # no host at all: malformed, whatever admin_allow_remote says
            want = '%s:%d:' % (d.conf, line_of(text, 'admin_listen'))
            h.check(rc == 1 and err.startswith(want), 'admin_listen = "%s" refused: %s'
                    % (addr, err.strip().replace(d.dir + '/', '')), (rc, err))
            continue
        if ok:
            h.check(rc == 0, 'admin_listen = "%s" (loopback) accepted by sagad -n' % addr,
                    (rc, err))
            continue
        want = '%s:%d:' % (d.conf, line_of(text, 'admin_listen'))
        h.check(rc == 1 and any(l.startswith(want) and 'admin_allow_remote' in l
                                for l in err.splitlines()),
                'admin_listen = "%s" refused: exit 1, "%s ..." naming admin_allow_remote'
                % (addr, want.replace(d.dir + '/', '')), (rc, err))
        d.write_conf(text.replace('api = {', 'api = {\n  admin_allow_remote = true;'))
        rc, out, err = sagad_n(d.conf)
        h.check(rc == 0, 'admin_listen = "%s" with admin_allow_remote = true: sagad -n 0'
                % addr, (rc, err))


# ------------------------------------------------------------------ (d)

def phase_user(wd, broker):
    h.log('== (d) user = "nobody"')
    if os.geteuid() != 0:
        h.log('not root: privilege drop not tested')
        return
    nobody = pwd.getpwnam('nobody')
    sdir = os.path.join(wd, 'nobody-run')
    os.makedirs(sdir, exist_ok=True)
    api_sock = os.path.join(sdir, 'api.sock')
    tool = h.AmqpTool()
    tool.declare_queue(broker.url, 'usr', [('events', 'usr.#')])
    d = h.Sagad(wd, broker.url, name='dropper', conf_extra='user = "nobody";')
    d.write_conf(d.conf_text().replace('listen = "127.0.0.1:%d";' % d.port,
                                       'listen = %s;' % h.conf_str('unix:' + api_sock)))
    # The store directory stays root's (0755): the worst case for SQLite's
    # -wal and -shm files, which sagad creates before the drop.
    for round_ in (1, 2):
        d.start()
        s = proc_status(d.proc.pid)
        h.check(s['Uid'] == [str(nobody.pw_uid)] * 4 and s['Gid'] == [str(nobody.pw_gid)] * 4,
                'round %d: /proc/PID/status Uid %s Gid %s (nobody)'
                % (round_, ' '.join(s['Uid']), ' '.join(s['Gid'])), (s['Uid'], s['Gid']))
        groups = s.get('Groups', [])
        h.check('0' not in groups, 'round %d: no root group left (Groups: %s)'
                % (round_, ' '.join(groups) or '-'), groups)
        h.check(s['CapEff'] == ['0000000000000000'] and s['CapPrm'] == ['0000000000000000'],
                'round %d: no capabilities (CapEff, CapPrm 0)' % round_, (s['CapEff'], s['CapPrm']))
        h.check('privileges dropped' in d.log(), 'round %d: logged "privileges dropped"' % round_)
        for i in range(50):
            st, body, _ = unix_request(api_sock, 'POST', '/v1/publish/events/usr.%d' % i, b'n',
                                       {'Message-Id': 'usr-%d-%d' % (round_, i)})
            if st != 202:
                raise AssertionError('round %d publish %d as nobody: %d %s'
                                     % (round_, i, st, body))
        h.check(True, 'round %d: 50 messages accepted (202) by the unprivileged sagad' % round_)
        h.wait_until(lambda: d.metric('sagad_outbox_pending') == 0, 30, 'outbox drained')
        st, body = d.admin_get('/readyz')
        h.check(st == 200, 'round %d: /readyz 200 (store writable)' % round_, body)
        for suffix in ('', '-wal', '-shm'):
            p = d.store + suffix
            if os.path.exists(p):
                h.log('round %d: %s owned by %s, mode %o'
                      % (round_, os.path.basename(p), pwd.getpwuid(os.stat(p).st_uid).pw_name,
                         os.stat(p).st_mode & 0o777))
        st_sock = os.stat(api_sock)
        h.log('round %d: api socket owned by %s:%s mode %o'
              % (round_, pwd.getpwuid(st_sock.st_uid).pw_name,
                 grp.getgrgid(st_sock.st_gid).gr_name, st_sock.st_mode & 0o777))
        rc = d.stop()
        h.check(rc == 0, 'round %d: SIGTERM exit 0 as nobody' % round_, rc)
        if 'level=error' in d.log():
            errs = [l for l in d.log().splitlines() if 'level=error' in l]
            raise AssertionError('errors in the log as nobody: %s' % errs[:5])
    got = {m['message_id'] for m in tool.consume(broker.url, 'usr', 200, timeout=3)}
    want = {'usr-%d-%d' % (r, i) for r in (1, 2) for i in range(50)}
    h.check(want <= got, 'all 100 messages accepted as nobody reached the broker',
            sorted(want - got)[:5])
    h.check(st_sock.st_uid == nobody.pw_uid,
            'the unix socket belongs to the user sagad runs as (nobody), so that its group '
            'can be granted access', (st_sock.st_uid, oct(st_sock.st_mode)))


# ------------------------------------------------------------------ (e)

def phase_secrets(wd, broker, token):
    h.log('== (e) secrets never in logs or admin output')
    pw = 'Pw-%d-zz8K' % os.getpid()
    broker.ctl('add_user', 'sagadsec', pw)
    broker.ctl('set_permissions', '-p', '/', 'sagadsec', '.*', '.*', '.*')
    url = 'amqp://sagadsec:%s@127.0.0.1:%d/%%2f' % (pw, broker.port)
    d = h.Sagad(wd, url, name='secret', token=token,
                conf_extra='subscriptions = ( { name = "in"; bind = [ "events:sec.#" ];'
                           ' deliver = "http://127.0.0.1:9/x"; max_attempts = 1; } );')
    d.start(args=('-v', '-v'))
    st, body, _ = d.request('POST', '/v1/publish/events/sec.a', b's', {'Message-Id': 'sec-a'})
    h.check(st == 202, 'publish with the user sagadsec: 202', st)
    outputs = {}
    for path in ('/v1/admin/status', '/metrics', '/v1/admin/subscriptions', '/v1/admin/outbox',
                 '/v1/admin/dlq/in'):
        outputs[path] = d.admin_get(path)[1]
    outputs['sagactl status'] = h.sagactl(d, 'status')[1]
    outputs['sagactl --json status'] = json.dumps(h.sagactl(d, 'status', json_out=True)[1])
    h.check('sagadsec' in outputs['/v1/admin/status'],
            '/v1/admin/status shows the broker user', outputs['/v1/admin/status'][:300])
    # The password gets refused: log lines about a login failure.
    broker.ctl('change_password', 'sagadsec', pw + 'changed')
    broker.ctl('close_all_connections', 'test')
    h.wait_until(lambda: 'login refused' in d.log() or 'ACCESS_REFUSED' in d.log()
                 or 'connect failed' in d.log(), 30, 'a failed login in the log')
    broker.ctl('change_password', 'sagadsec', pw)
    h.wait_until(lambda: d.admin_get('/readyz')[0] == 200, 40, 'reconnected')
    # A reload with a changed password in the url (needs a restart: logged).
    d.broker_url = url.replace(pw, pw + 'reload')
    d.write_conf()
    d.hup()
    h.wait_until(lambda: 'needs a restart' in d.log(), 10, 'the reload warning')
    # A broken file on reload, holding the password.
    text = d.conf_text().replace('heartbeat = 2;', 'heartbeat = "%s";' % pw)
    d.write_conf(text)
    d.hup()
    h.wait_until(lambda: 'reload refused' in d.log(), 10, 'the refused reload')
    d.broker_url = url
    d.write_conf()
    d.stop()
    # The password in password_file, and a broker that refuses it.
    pwfile = os.path.join(wd, 'broker.pw')
    with open(pwfile, 'w') as f:
        f.write(pw + 'wrong\n')
    d2 = h.Sagad(wd, 'amqp://sagadsec@127.0.0.1:%d/%%2f' % broker.port, name='pwfile',
                 broker_extra='password_file = %s;' % h.conf_str(pwfile), token=token)
    d2.start(wait_ready=False, args=('-v', '-v'))
    h.wait_until(lambda: 'connect failed' in d2.log(), 20, 'the refused login')
    outputs['pwfile status'] = d2.admin_get('/v1/admin/status')[1]
    d2.stop()
    # Broken configurations that hold the password: sagad -n output.
    bad = h.Sagad(wd, 'amqp://sagadsec:%s@127.0.0.1:notaport/%%2f' % pw, name='badurl',
                  broker_extra='password_file = %s;' % h.conf_str(pwfile))
    rc, out, err = sagad_n(bad.conf)
    h.check(rc == 1, 'a malformed url with a password: sagad -n exit 1', (rc, err))
    outputs['sagad -n (bad url)'] = out + err
    bad2 = h.Sagad(wd, url, name='badurl2', broker_extra='password_file = %s;' % h.conf_str(pwfile))
    rc, out, err = sagad_n(bad2.conf)
    h.check(rc == 1, 'password in the url and password_file: sagad -n exit 1', (rc, err))
    outputs['sagad -n (both)'] = out + err
    outputs['log secret'] = d.log()
    outputs['log pwfile'] = d2.log()
    for what, text in outputs.items():
        for secret, name in ((pw, 'broker password'), (token, 'API token')):
            if secret in text:
                lines = [l for l in text.splitlines() if secret in l]
                raise AssertionError('%s appears in %s: %s' % (name, what, lines[:3]))
    nlines = len(outputs['log secret'].splitlines()) + len(outputs['log pwfile'].splitlines())
    h.check(True, 'neither the broker password nor the token in %d log lines (-vv, login '
            'refusals, reloads), sagad -n errors, status, metrics, subscriptions, outbox, '
            'dlq, sagactl' % nlines)
    masked = [l for l in outputs['log secret'].splitlines() if 'sagad starting' in l]
    h.log('start line: %s' % (masked[0] if masked else '(none)'))


def main(wd):
    broker = h.Broker(wd)
    broker.start()
    token = phase_token(wd, broker)
    phase_unix(wd, broker)
    phase_admin_remote(wd, broker)
    phase_secrets(wd, broker, token)
    phase_user(wd, broker)


h.run_test(main)
