"""Test harness for sagad's integration scenarios (Python 3 standard library only).

A scenario is a script that does

    sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
    import harness as h

    def main(workdir):
        broker = h.Broker(workdir); broker.start()
        d = h.Sagad(workdir, broker.url); d.start()
        ...

    h.run_test(main)

Everything it starts (private RabbitMQ nodes, sagad processes) is stopped when
the script ends, however it ends: run_test() cleans up, atexit does too, and
a watchdog process kills what is left should the script itself be killed.

Environment: top_srcdir and top_builddir (absolute, exported by `make
check`; both default to the repository holding this file), SAGAD (path of
the daemon, default $top_builddir/src/sagad), AMQPTOOL (default
$top_builddir/t/amqptool, built into /tmp by gcc when missing), SAGAD_KEEP=1
keeps the work directory of a passing test too.
"""

import atexit
import http.client
import itertools
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
top_srcdir = os.path.abspath(os.environ.get('top_srcdir') or REPO)
top_builddir = os.path.abspath(os.environ.get('top_builddir') or REPO)

_T0 = time.time()


def log(msg):
    """Print one progress line (with the time since the test started)."""
    print('[%7.2f] %s' % (time.time() - _T0, msg), flush=True)


def check(cond, msg, detail=None):
    """Assert with a message; print what was checked when it holds."""
    if not cond:
        raise AssertionError(msg if detail is None else '%s: %s' % (msg, detail))
    log('ok: ' + msg)


def wait_drained(sagads, timeout):
    """Wait until every sagad's outbox is empty and its inbox backlog
    delivered, then check that it stays so for 2 s more."""
    def settled():
        for d in sagads:
            m = d.metrics()
            if m.get('sagad_outbox_pending', 1) != 0:
                return False
            if any(v for k, v in m.items() if k.startswith('sagad_inbox_backlog') or
                   k.startswith('sagad_inbox_inflight')):
                return False
        return True
    wait_until(settled, timeout, 'outboxes and inboxes drained', interval=0.5)
    time.sleep(2)
    wait_until(settled, 30, 'outboxes and inboxes still drained', interval=0.5)


def wait_until(pred, timeout, what, interval=0.1):
    """Poll pred() until it returns a true value (returned) or time is up."""
    deadline = time.time() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.time() >= deadline:
            raise AssertionError('timed out after %ss waiting for %s' % (timeout, what))
        time.sleep(interval)


# ---------------------------------------------------------------- processes

_given_ports = set()


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on (and that this
    process has not handed out before)."""
    for _ in range(100):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        finally:
            s.close()
        if port not in _given_ports:
            _given_ports.add(port)
            return port
    raise RuntimeError('no free port found')


_live = []          # objects with a _cleanup() method, still running
_live_lock = threading.Lock()


def _register(obj):
    with _live_lock:
        if obj not in _live:
            _live.append(obj)


def _unregister(obj):
    with _live_lock:
        if obj in _live:
            _live.remove(obj)


def cleanup_all():
    """Kill everything this process started (brokers last)."""
    with _live_lock:
        objs = list(_live)
    objs.sort(key=lambda o: isinstance(o, Broker))
    for o in objs:
        try:
            o._cleanup()
        except Exception:   # keep cleaning
            traceback.print_exc()


atexit.register(cleanup_all)


def _on_signal(signum, frame):
    # Turn a termination signal into SystemExit so that atexit runs.
    raise SystemExit(128 + signum)


def _install_signal_handlers():
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        try:
            signal.signal(sig, _on_signal)
        except (ValueError, OSError):
            pass


def _watchdog(pgid):
    """A detached sh that kills process group pgid once this process is gone
    (covers a test killed with SIGKILL). Returns its Popen."""
    script = ('while kill -0 "$0" 2>/dev/null; do sleep 1; done; '
              'kill -TERM "-$1" 2>/dev/null; sleep 5; kill -KILL "-$1" 2>/dev/null')
    return subprocess.Popen(['sh', '-c', script, str(os.getpid()), str(pgid)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _stop_watchdog(wd):
    if wd is None:
        return
    try:
        os.killpg(wd.pid, signal.SIGKILL)   # its own session: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass
    try:
        wd.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _descendants(pid):
    """Pids of every descendant of pid (from /proc)."""
    children = {}
    for d in os.listdir('/proc'):
        if not d.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % d) as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(')') + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def _kill_tree(proc):
    """SIGKILL a Popen started with start_new_session, its process group and
    every descendant (some Erlang helpers make their own sessions)."""
    if proc is None:
        return
    pids = _descendants(proc.pid) if proc.poll() is None else []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


def tail(path, n=40, skip_debug=False):
    try:
        with open(path, 'rb') as f:
            lines = f.read().decode('utf-8', 'replace').splitlines()
    except OSError as e:
        return '(cannot read %s: %s)' % (path, e)
    if skip_debug:
        lines = [l for l in lines if 'level=debug' not in l]
    return '\n'.join(lines[-n:])


# ---------------------------------------------------------------- amqptool

def amqptool_path():
    p = os.environ.get('AMQPTOOL')
    if p:
        return p
    p = os.path.join(top_builddir, 't', 'amqptool')
    if os.access(p, os.X_OK):
        return p
    # Not built by make (yet): build a private copy.
    src = os.path.join(top_srcdir, 't', 'amqptool.c')
    out = os.path.join(tempfile.gettempdir(), 'sagad-amqptool-%d' % os.getuid())
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
        # src/amqp_headers.h picks rabbitmq-c's headers by config.h's probe
        # (without one, the old place, <amqp.h>).
        config_h = os.path.join(top_builddir, 'config.h')
        cmd = ['gcc', '-O1', '-Wall', '-Wextra', '-std=gnu11', '-I', os.path.join(top_srcdir, 'src')]
        cmd += ['-include', config_h] if os.path.exists(config_h) else []
        cmd += [src, '-o', out + '.tmp', '-lrabbitmq', '-ljansson']
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            raise RuntimeError('cannot build amqptool: %s\n%s'
                               % (' '.join(cmd), r.stdout.decode(errors='replace')))
        os.rename(out + '.tmp', out)
    return out


class AmqpTool:
    """Thin wrapper around t/amqptool."""

    def __init__(self, path=None):
        self.path = path or amqptool_path()

    def run(self, url, *args, timeout=60, check=True):
        r = subprocess.run([self.path, url] + [str(a) for a in args],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError('amqptool %s failed (exit %d): %s'
                               % (' '.join(str(a) for a in args), r.returncode,
                                  r.stderr.decode(errors='replace').strip()))
        return r

    def ping(self, url):
        try:
            return self.run(url, 'ping', timeout=20, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def declare_queue(self, url, queue, bindings=(('events', '#'),)):
        self.run(url, 'declare', queue, *['%s:%s' % (ex, key) for ex, key in bindings])

    def consume(self, url, queue, count, timeout=5):
        """Up to count messages (acked), stopping after timeout seconds
        without one. A list of dicts, in delivery order."""
        r = self.run(url, 'consume', queue, count, timeout,
                     timeout=timeout + 60 + count * 0.01)
        return [json.loads(line) for line in r.stdout.decode().splitlines() if line.strip()]

    def queue_len(self, url, queue):
        return int(self.run(url, 'count', queue).stdout)

    count = queue_len

    def purge(self, url, queue):
        return int(self.run(url, 'purge', queue).stdout)

    def delete(self, url, queue):
        return int(self.run(url, 'delete', queue).stdout)

    def delete_exchange(self, url, exchange):
        self.run(url, 'xdelete', exchange)

    def publish(self, url, exchange, key, body, message_id=None):
        args = ['publish', exchange, key, body] + ([message_id] if message_id else [])
        self.run(url, *args)

    def send(self, url, exchange, key, timeout=120, **spec):
        """`amqptool send`: publish with any properties (see t/amqptool.c:
        body, body_hex, body_size, message_id, message_id_hex,
        correlation_id, reply_to, type, content_type, content_type_hex,
        expiration, timestamp, persistent, headers, count). Waits for the
        confirms; returns how many were published."""
        spec = dict(spec, exchange=exchange, key=key)
        r = self.run(url, 'send', json.dumps(spec), timeout=timeout)
        return int(r.stdout.decode().strip() or 0)


class Pika:
    """pika, RabbitMQ's Python client (t/lib/pika_client.py), under Debian's
    /usr/bin/python3, where the package python3-pika puts it. Raises Skip
    when it is not installed (t/lib/deps.sh installs it)."""

    PYTHON = '/usr/bin/python3'

    def __init__(self, url):
        self.url = url
        self.script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'pika_client.py')
        r = subprocess.run([self.PYTHON, '-c', 'import pika'], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if r.returncode != 0:
            raise Skip('python3-pika is not installed (t/lib/deps.sh installs it)')

    def _run(self, *args, timeout=60):
        r = subprocess.run([self.PYTHON, self.script, args[0], self.url] + [str(a) for a in args[1:]],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError('pika %s failed (exit %d): %s' % (
                args[0], r.returncode, r.stderr.decode(errors='replace').strip()[-600:]))
        return [json.loads(l) for l in r.stdout.decode().splitlines() if l.strip()]

    def declare(self, queue, *bindings):
        self._run('declare', queue, *bindings)

    def publish(self, exchange, key, body='', message_id=None, headers=None,
                correlation_id=None, reply_to=None):
        self._run('publish', exchange, key, json.dumps(
            {'body': body, 'message_id': message_id, 'headers': headers or {},
             'correlation_id': correlation_id, 'reply_to': reply_to}))

    def get(self, queue, count, timeout=5):
        """Up to count messages (acked): dicts with exchange, routing_key,
        message_id, correlation_id, headers and body."""
        return self._run('get', queue, count, timeout, timeout=timeout + 60)


# ---------------------------------------------------------------- RabbitMQ

def _rabbitmq_server():
    for p in ('/usr/lib/rabbitmq/bin/rabbitmq-server',):
        if os.access(p, os.X_OK):
            return p
    p = shutil.which('rabbitmq-server')
    if p:
        return p
    raise RuntimeError('rabbitmq-server not found: the integration tests need it '
                       '(apt-get install rabbitmq-server)')


def _rabbitmqctl():
    for p in ('/usr/lib/rabbitmq/bin/rabbitmqctl',):
        if os.access(p, os.X_OK):
            return p
    p = shutil.which('rabbitmqctl')
    if p:
        return p
    raise RuntimeError('rabbitmqctl not found (apt-get install rabbitmq-server)')


def _rabbitmq_user():
    """(uid, gid, home) to run the node as, or None to run as ourselves."""
    if os.getuid() != 0:
        return None
    try:
        pw = pwd.getpwnam('rabbitmq')
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid, pw.pw_dir


def _make_traversable(path):
    """The node runs as user rabbitmq: every directory above its own must be
    searchable by others."""
    os.chmod(path, os.stat(path).st_mode | 0o755)
    p = os.path.dirname(os.path.abspath(path))
    while p and p != '/':
        if not os.stat(p).st_mode & 0o001:
            raise RuntimeError('%s is not searchable by other users; the RabbitMQ node '
                               '(user rabbitmq) cannot reach its data under it' % p)
        p = os.path.dirname(p)


class Broker:
    """A private RabbitMQ node: own node name, AMQP and distribution ports,
    data and log directories under workdir, no plugins. The ports stay the
    same across restarts."""

    _seq = itertools.count(1)

    def __init__(self, workdir, boot_timeout=90, tls=None, host='127.0.0.1', wrap=None,
                 conf_extra=''):
        """tls: None (default: no TLS listener), or a dict with cacert,
        certfile, keyfile (paths) and optionally verify ('verify_peer' or
        'verify_none', default verify_peer), fail_if_no_peer_cert (bool,
        default False), hosts (addresses to listen on, default [host])
        -- adds an AMQPS listener on self.tls_port (URL in self.tls_url),
        through ssl_options in a rabbitmq.conf. host: the address of the
        AMQP listener(s). wrap: argv prefix for rabbitmq-server and
        rabbitmqctl (e.g. ['ip', 'netns', 'exec', NS]). conf_extra: more
        rabbitmq.conf lines."""
        n = next(Broker._seq)
        self.node = 'sagadt%d%d@localhost' % (os.getpid(), n)
        self.dir = os.path.join(os.path.abspath(workdir), 'rabbitmq%d' % n)
        self.host = host
        self.wrap = list(wrap or [])
        self.port = free_port()
        self.dist_port = free_port()
        self.url = 'amqp://guest:guest@%s:%d/%%2f' % (host, self.port)
        self.tls = dict(tls) if tls else None
        self.tls_port = free_port() if tls else None
        self.tls_url = ('amqps://guest:guest@localhost:%d/%%2f' % self.tls_port) if tls else None
        self.boot_timeout = boot_timeout
        self.proc = None
        self._wd = None
        self._logf = None
        self.logfile = os.path.join(self.dir, 'server.out')
        self.tool = AmqpTool()
        self.user = _rabbitmq_user()

        _make_traversable(workdir)
        for d in ('', 'mnesia', 'log'):
            os.makedirs(os.path.join(self.dir, d), exist_ok=True)
        with open(os.path.join(self.dir, 'enabled_plugins'), 'w') as f:
            f.write('[].\n')
        open(os.path.join(self.dir, 'rabbitmq-env.conf'), 'w').close()
        conf = []
        if self.tls:
            t = self.tls
            for i, a in enumerate(t.get('hosts') or [host]):
                conf.append('listeners.ssl.%d = %s:%d' % (i + 1, a, self.tls_port))
            conf += ['ssl_options.cacertfile = %s' % t['cacert'],
                     'ssl_options.certfile = %s' % t['certfile'],
                     'ssl_options.keyfile = %s' % t['keyfile'],
                     'ssl_options.verify = %s' % t.get('verify', 'verify_peer'),
                     'ssl_options.fail_if_no_peer_cert = %s'
                     % ('true' if t.get('fail_if_no_peer_cert') else 'false')]
        if conf_extra:
            conf.append(conf_extra)
        if conf:
            # RABBITMQ_CONFIG_FILE (below) names <dir>/rabbitmq: this is
            # its new-style form; without tls or conf_extra there is none.
            with open(os.path.join(self.dir, 'rabbitmq.conf'), 'w') as f:
                f.write('\n'.join(conf) + '\n')
        if self.user:
            for root, dirs, files in os.walk(self.dir):
                for x in [root] + [os.path.join(root, y) for y in dirs + files]:
                    os.chown(x, self.user[0], self.user[1])

    def _env(self):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith('RABBITMQ_') and not k.startswith('ERL_')}
        d = self.dir
        env.update(
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS=self.host,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=os.path.join(d, 'mnesia'),
            RABBITMQ_LOG_BASE=os.path.join(d, 'log'),
            RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(d, 'enabled_plugins'),
            RABBITMQ_ENABLED_PLUGINS='',
            RABBITMQ_CONFIG_FILE=os.path.join(d, 'rabbitmq'),
            RABBITMQ_ADVANCED_CONFIG_FILE=os.path.join(d, 'advanced.config'),
            RABBITMQ_CONF_ENV_FILE=os.path.join(d, 'rabbitmq-env.conf'),
            RABBITMQ_PID_FILE=os.path.join(d, 'pid'),
            # the distribution listener on loopback only
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}',
        )
        if self.user:
            home = self.user[2]
            env.update(HOME=home, USER='rabbitmq', LOGNAME='rabbitmq')
        return env

    def _popen_user_args(self):
        if not self.user or self.wrap:
            return {}
        return dict(user=self.user[0], group=self.user[1], extra_groups=[])

    def _argv(self, exe):
        """exe with the wrap prefix; a wrapped command (run as root, e.g.
        ip netns exec) drops to the node's user through setpriv."""
        if not self.wrap:
            return [exe]
        su = []
        if self.user:
            su = ['setpriv', '--reuid=%d' % self.user[0], '--regid=%d' % self.user[1],
                  '--clear-groups', '--']
        return self.wrap + su + [exe]

    def start(self):
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError('broker %s already running' % self.node)
        t0 = time.time()
        self._logf = open(self.logfile, 'ab')
        self.proc = subprocess.Popen(
            self._argv(_rabbitmq_server()), cwd=self.dir, env=self._env(),
            stdin=subprocess.DEVNULL, stdout=self._logf, stderr=subprocess.STDOUT,
            start_new_session=True, **self._popen_user_args())
        _register(self)
        self._wd = _watchdog(self.proc.pid)
        deadline = t0 + self.boot_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError('RabbitMQ node %s exited with %s while booting:\n%s\n%s'
                                   % (self.node, self.proc.returncode, tail(self.logfile, 30),
                                      tail(os.path.join(self.dir, 'log', self.node + '.log'), 30)))
            if self._port_open() and self.tool.ping(self.url):
                break
            if time.time() > deadline:
                self.kill()
                raise RuntimeError('RabbitMQ node %s not up after %ss:\n%s'
                                   % (self.node, self.boot_timeout, tail(self.logfile, 30)))
            time.sleep(0.25)
        log('broker %s up on port %d (%.1fs)' % (self.node, self.port, time.time() - t0))

    def _port_open(self):
        try:
            socket.create_connection((self.host, self.port), 0.5).close()
            return True
        except OSError:
            return False

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def _finish(self):
        _stop_watchdog(self._wd)
        self._wd = None
        if self._logf:
            self._logf.close()
            self._logf = None
        _unregister(self)

    def stop(self, timeout=60):
        """Graceful stop (SIGTERM to the server script, which stops the node
        properly); waits for the exit."""
        if not self.running():
            self._finish()
            return
        t0 = time.time()
        pids = _descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log('broker %s did not stop within %ss: killing it' % (self.node, timeout))
            _kill_tree(self.proc)
        # leftovers (helpers in their own sessions) must not outlive the node
        for p in pids:
            try:
                os.kill(p, 0)
            except OSError:
                continue
            deadline = time.time() + 5
            while time.time() < deadline:
                try:
                    os.kill(p, 0)
                except OSError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
        self._finish()
        log('broker %s stopped (%.1fs)' % (self.node, time.time() - t0))

    def kill(self):
        """SIGKILL the node and everything it started."""
        if self.proc is not None:
            _kill_tree(self.proc)
        self._finish()
        log('broker %s killed' % self.node)

    def restart(self):
        self.stop()
        self.start()

    def ctl(self, *args, timeout=60):
        """Run rabbitmqctl against this node; returns its stdout."""
        r = subprocess.run(self._argv(_rabbitmqctl()) + ['-n', self.node] + list(args),
                           env=self._env(),
                           cwd=self.dir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout,
                           **self._popen_user_args())
        if r.returncode != 0:
            raise RuntimeError('rabbitmqctl %s: exit %d: %s' % (' '.join(args), r.returncode,
                                                               r.stderr.decode(errors='replace')))
        return r.stdout.decode(errors='replace')

    def log_tail(self, n=30):
        return tail(os.path.join(self.dir, 'log', self.node + '.log'), n)

    def _cleanup(self):
        self.kill()


class Cluster:
    """A RabbitMQ cluster of n private nodes (Broker objects: own node
    names, ports and data dirs) on this machine, joined with `rabbitmqctl
    join_cluster` to the first. The Erlang cookie is shared: every node runs
    with the same HOME (ours, or user rabbitmq's). self.url is the list
    sagad accepts in broker.url (comma-separated, in node order)."""

    def __init__(self, workdir, n=3, **kw):
        self.nodes = [Broker(workdir, **kw) for _ in range(n)]
        self.url = ','.join(b.url for b in self.nodes)

    def start(self):
        t0 = time.time()
        first = self.nodes[0]
        for b in self.nodes:
            b.start()
        for b in self.nodes[1:]:
            b.ctl('stop_app')
            b.ctl('join_cluster', first.node)
            b.ctl('start_app')
        running = self.running_nodes(first)
        if sorted(running) != sorted(b.node for b in self.nodes):
            raise RuntimeError('cluster not formed: running nodes %s' % running)
        log('cluster of %d nodes up (%.1fs)' % (len(self.nodes), time.time() - t0))

    def running_nodes(self, via):
        """The running nodes as seen by node via (a Broker)."""
        out = via.ctl('cluster_status', '--formatter', 'json')
        return json.loads(out[out.index('{'):]).get('running_nodes', [])

    def by_port(self, port):
        for b in self.nodes:
            if b.port == port:
                return b
        return None

    def stop(self):
        for b in reversed(self.nodes):
            if b.running():
                b.stop()


# ---------------------------------------------------------------- sagad

def sagad_path():
    return os.environ.get('SAGAD') or os.path.join(top_builddir, 'src', 'sagad')


def conf_str(s):
    """A libconfig string literal."""
    return '"%s"' % s.replace('\\', '\\\\').replace('"', '\\"')


def parse_metrics(text):
    """Prometheus text format -> {'name{labels}': float} (labels verbatim)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        if '{' in line:
            end = line.rindex('}')
            key, rest = line[:end + 1], line[end + 1:].split()
        else:
            parts = line.split()
            key, rest = parts[0], parts[1:]
        if not rest:
            continue
        try:
            out[key] = float(rest[0])
        except ValueError:
            pass
    return out


class Sagad:
    """One sagad process with a generated configuration in workdir. Ports,
    store and configuration file stay the same across restarts."""

    def __init__(self, workdir, broker_url, name='orders', conf_extra='',
                 exchanges=(('events', 'topic'), ('commands', 'topic')),
                 api_extra='', store_extra='', broker_extra='', token=None,
                 drain_timeout=5, heartbeat=2, connect_timeout=2):
        self.dir = os.path.abspath(workdir)
        self.name = name
        self.broker_url = broker_url
        self.conf_extra = conf_extra
        self.exchanges = exchanges
        self.api_extra = api_extra
        self.store_extra = store_extra
        self.broker_extra = broker_extra
        self.drain_timeout = drain_timeout
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.port = free_port()
        self.admin_port = free_port()
        self.conf = os.path.join(self.dir, name + '.conf')
        self.store = os.path.join(self.dir, name + '.db')
        self.logfile = os.path.join(self.dir, name + '.log')
        self.token = token
        self.token_file = os.path.join(self.dir, name + '.token')
        if token is not None:
            with open(self.token_file, 'w') as f:
                f.write(token + '\n')
        self.proc = None
        self._wd = None
        self._conn = None
        self._conn_used = False
        self.write_conf()

    def conf_text(self):
        api = ['listen = %s;' % conf_str('127.0.0.1:%d' % self.port),
               'admin_listen = %s;' % conf_str('127.0.0.1:%d' % self.admin_port)]
        if self.token is not None:
            api.append('token_file = %s;' % conf_str(self.token_file))
        if self.api_extra:
            api.append(self.api_extra)
        store = ['path = %s;' % conf_str(self.store)]
        if self.store_extra:
            store.append(self.store_extra)
        broker = ['url = %s;' % conf_str(self.broker_url),
                  'heartbeat = %s;' % self.heartbeat,
                  'connect_timeout = %s;' % self.connect_timeout]
        if self.broker_extra:
            broker.append(self.broker_extra)
        lines = [
            '# generated by t/lib/harness.py',
            'service = %s;' % conf_str(self.name),
            'broker = {\n  %s\n};' % '\n  '.join(broker),
            'store = {\n  %s\n};' % '\n  '.join(store),
            'api = {\n  %s\n};' % '\n  '.join(api),
            'drain_timeout = %s;' % self.drain_timeout,
        ]
        if self.exchanges is not None:
            lines.append('exchanges = (\n%s\n);' % ',\n'.join(
                '  { name = %s; type = %s; }' % (conf_str(n), conf_str(t))
                for n, t in self.exchanges))
        if self.conf_extra:
            lines.append(self.conf_extra)
        return '\n'.join(lines) + '\n'

    def write_conf(self, text=None):
        """(Re)write the configuration file (the generated one by default)."""
        with open(self.conf, 'w') as f:
            f.write(self.conf_text() if text is None else text)

    # -- process

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait_ready=True, timeout=20, args=('-v',)):
        if self.running():
            raise RuntimeError('sagad %s already running' % self.name)
        exe = sagad_path()
        if not os.access(exe, os.X_OK):
            raise RuntimeError('%s not found or not executable: build it first (make)' % exe)
        with open(self.logfile, 'ab') as logf:
            logf.write(('--- harness: starting %s -f %s %s at %s\n'
                        % (exe, self.conf, ' '.join(args), time.strftime('%H:%M:%S'))).encode())
            logf.flush()
            self.proc = subprocess.Popen([exe, '-f', self.conf] + list(args), cwd=self.dir,
                                         stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                         start_new_session=True)
        _register(self)
        self._wd = _watchdog(self.proc.pid)
        path = '/readyz' if wait_ready else '/healthz'
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError('sagad exited with %s during startup; log:\n%s'
                                   % (self.proc.returncode, tail(self.logfile, 40)))
            try:
                st, _ = self.admin_get(path, timeout=2)
                if st == 200:
                    break
            except (OSError, http.client.HTTPException):
                pass
            if time.time() - t0 > timeout:
                raise RuntimeError('sagad: %s not 200 within %ss; log:\n%s'
                                   % (path, timeout, tail(self.logfile, 40)))
            time.sleep(0.1)
        log('sagad %s started, pid %d, %s ok (%.1fs)' % (self.name, self.proc.pid, path,
                                                         time.time() - t0))
        return self

    def _finish(self):
        self.close()
        _stop_watchdog(self._wd)
        self._wd = None
        _unregister(self)

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Send sig and wait for the exit; returns the exit code (negative:
        killed by that signal). Raises when it does not exit in time."""
        if self.proc is None:
            raise RuntimeError('sagad never started')
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_tree(self.proc)
                self._finish()
                raise AssertionError('sagad did not exit within %ss after signal %d'
                                     % (timeout, sig))
        self._finish()
        return self.proc.returncode

    def kill(self):
        if self.proc is not None:
            _kill_tree(self.proc)
        self._finish()
        return self.proc.returncode if self.proc else None

    def hup(self):
        self.proc.send_signal(signal.SIGHUP)

    def log(self):
        try:
            with open(self.logfile, 'rb') as f:
                return f.read().decode('utf-8', 'replace')
        except OSError:
            return ''

    def _cleanup(self):
        self.kill()

    # -- HTTP

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method, path, body=None, headers=None, timeout=30):
        """One request on the persistent API connection (reconnecting and
        retrying once when a reused keep-alive connection turns out closed).
        Returns (status, body bytes, {lowercased header: value})."""
        hdrs = {}
        if self.token is not None:
            hdrs['Authorization'] = 'Bearer ' + self.token
        hdrs.update(headers or {})
        hdrs = {k: v for k, v in hdrs.items() if v is not None}   # None removes a header
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=timeout)
                self._conn_used = False
            reused = self._conn_used
            try:
                self._conn.request(method, path, body=body, headers=hdrs)
                resp = self._conn.getresponse()
                data = resp.read()
                self._conn_used = True
                if resp.will_close:
                    self.close()
                return resp.status, data, {k.lower(): v for k, v in resp.getheaders()}
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected,
                    http.client.BadStatusLine) as e:
                self.close()
                if attempt == 0 and reused:
                    continue
                raise
            except Exception:
                self.close()
                raise

    def publish(self, exchange, key, body=b'', headers=None, timeout=30):
        """POST /v1/publish/{exchange}/{key}: (status, parsed JSON or None,
        headers)."""
        path = '/v1/publish/%s/%s' % (urllib.parse.quote(exchange, safe=''),
                                      urllib.parse.quote(key, safe=''))
        if isinstance(body, str):
            body = body.encode()
        st, data, hdrs = self.request('POST', path, body, headers, timeout)
        try:
            doc = json.loads(data) if data else None
        except ValueError:
            doc = None
        return st, doc, hdrs

    def admin_get(self, path, timeout=10):
        """GET on the admin listener (a fresh connection): (status, body text)."""
        c = http.client.HTTPConnection('127.0.0.1', self.admin_port, timeout=timeout)
        try:
            hdrs = {}
            if self.token is not None:
                hdrs['Authorization'] = 'Bearer ' + self.token
            c.request('GET', path, headers=hdrs)
            r = c.getresponse()
            return r.status, r.read().decode('utf-8', 'replace')
        finally:
            c.close()

    def admin_json(self, path, timeout=10):
        st, text = self.admin_get(path, timeout)
        return st, json.loads(text)

    def metrics(self):
        st, text = self.admin_get('/metrics')
        if st != 200:
            raise AssertionError('/metrics answered %d: %s' % (st, text[:200]))
        return parse_metrics(text)

    def metric(self, name, default=None):
        return self.metrics().get(name, default)


def raw_request(port, data, read_timeout=5, close_write=False, host='127.0.0.1'):
    """Send raw bytes to port; return what comes back until the peer closes
    or read_timeout passes (b'' when nothing)."""
    s = socket.create_connection((host, port), 5)
    try:
        s.settimeout(read_timeout)
        try:
            if data:
                s.sendall(data)
            if close_write:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        chunks = []
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
        except (socket.timeout, OSError):
            pass
        return b''.join(chunks)
    finally:
        s.close()


# ---------------------------------------------------------------- service

class Service:
    """A stdlib HTTP service that sagad delivers to (a subscription's
    deliver URL, Service.url). Every request is recorded in Service.calls
    (dicts: 'headers' {lowercased name: value}, 'raw_headers' [(name,
    value)], 'body' bytes, 'path', 'start' (request read), 'answered'
    (about to answer), 'end' (answer written), 'answer' (what was done),
    'conn' (a connection number); times from time.time()). behaviour(call)
    decides the answer, and may be replaced at any time:

      200, or (status, body[, {header: value}])   that answer
      'garbage'   bytes that are not HTTP, then close the connection
      'close'     close the connection without an answer
      'half'      "200 OK" announcing 1000 body bytes, 7 of them, then close
      'hang'      never answer (until release() or stop())
      ('raw', bytes)                               those bytes, then close
      ('sleep', seconds, answer)                   answer after a delay

    after(call), when set, runs once the answer is written.
    stop() closes the listener and every open connection (sagad then
    meets "connection refused"); start() listens again on the same port."""

    def __init__(self, behaviour=None, port=0, path='/messages'):
        self.behaviour = behaviour or (lambda call: 200)
        self.after = None
        self.lock = threading.Lock()
        self.calls = []
        self.path = path
        self._conns = {}
        self._conn_seq = itertools.count(1)
        self._release = threading.Event()
        self.server = None
        self.port = port
        self.start()
        self.url = 'http://127.0.0.1:%d%s' % (self.port, path)

    def _handler_class(self):
        import http.server
        svc = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def setup(self):
                super().setup()
                self.conn_no = next(svc._conn_seq)
                with svc.lock:
                    svc._conns[self.conn_no] = self.connection

            def finish(self):
                try:
                    super().finish()
                finally:
                    with svc.lock:
                        svc._conns.pop(self.conn_no, None)

            def log_message(self, *args):
                pass

            def do_POST(self):
                self._serve()

            def do_GET(self):
                self._serve()

            def _serve(self):
                n = int(self.headers.get('Content-Length') or 0)
                body = self.rfile.read(n) if n else b''
                call = {'headers': {k.lower(): v for k, v in self.headers.items()},
                        'raw_headers': list(self.headers.items()),
                        'body': body, 'path': self.path, 'start': time.time(),
                        'answered': None, 'end': None, 'answer': None,
                        'conn': self.conn_no}
                with svc.lock:
                    svc.calls.append(call)
                try:
                    answer = svc.behaviour(call)
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    answer = (500, ('behaviour raised %r' % e).encode())
                release = svc._release
                while isinstance(answer, tuple) and answer and answer[0] == 'sleep':
                    release.wait(answer[1])
                    answer = answer[2]
                call['answer'] = answer
                call['answered'] = time.time()
                try:
                    self._answer(answer, release)
                except OSError:
                    self.close_connection = True
                call['end'] = time.time()
                if svc.after is not None:
                    svc.after(call)

            def _answer(self, answer, release):
                if answer == 'garbage':
                    self.wfile.write(b'this is not HTTP at all\r\n\x00\xff\r\n\r\n')
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if answer == 'close':
                    self.close_connection = True
                    return
                if isinstance(answer, tuple) and answer and answer[0] == 'raw':
                    self.wfile.write(answer[1])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if answer == 'half':
                    self.wfile.write(b'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n'
                                     b'Content-Length: 1000\r\n\r\npartial')
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if answer == 'hang':
                    release.wait(600)
                    self.close_connection = True
                    return
                if isinstance(answer, int):
                    status, out, hdrs = answer, b'', {}
                else:
                    status, out = answer[0], answer[1]
                    hdrs = answer[2] if len(answer) > 2 else {}
                if isinstance(out, str):
                    out = out.encode()
                self.send_response(status)
                for k, v in hdrs.items():
                    self.send_header(k, v)
                self.send_header('Content-Length', str(len(out)))
                self.end_headers()
                self.wfile.write(out)
                self.wfile.flush()

        return Handler

    def start(self):
        import socketserver

        class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
            allow_reuse_address = True
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request, client_address):
                pass

        self.server = Server(('127.0.0.1', self.port), self._handler_class())
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={'poll_interval': 0.1},
                         daemon=True).start()
        return self

    def stop(self):
        """Stop listening and close every connection."""
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        self.server = None
        with self.lock:
            conns = list(self._conns.values())
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.release()

    def release(self):
        """Let every hanging request go (closed without an answer)."""
        ev, self._release = self._release, threading.Event()
        ev.set()

    def snapshot(self):
        with self.lock:
            return list(self.calls)

    def find(self, pred):
        return [c for c in self.snapshot() if pred(c)]

    def with_id(self, message_id):
        return self.find(lambda c: c['headers'].get('message-id') == message_id)

    def with_key(self, key):
        return self.find(lambda c: c['headers'].get('sagad-routing-key') == key)

    def ok_ids(self):
        """Message-Ids that got a 2xx answer (a Counter)."""
        import collections
        return collections.Counter(
            c['headers'].get('message-id') for c in self.snapshot()
            if c['end'] is not None and _status_of(c['answer']) in range(200, 300))


def _status_of(answer):
    if isinstance(answer, int):
        return answer
    if isinstance(answer, tuple) and answer and isinstance(answer[0], int):
        return answer[0]
    return None


def inbox_rows(store_path, subscription=None):
    """The inbox table of a sagad store (read-only): a list of dicts with
    id, subscription, message_id, state (0 pending, 1 done, 2 dead),
    attempts, last_status, last_error, dead_reason."""
    import sqlite3
    db = sqlite3.connect('file:%s?mode=ro' % store_path, uri=True, timeout=10)
    try:
        q = ('SELECT id, subscription, message_id, state, attempts, last_status, '
             'coalesce(last_error, \'\'), coalesce(dead_reason, \'\') FROM inbox')
        args = ()
        if subscription is not None:
            q += ' WHERE subscription = ?'
            args = (subscription,)
        cols = ('id', 'subscription', 'message_id', 'state', 'attempts', 'last_status',
                'last_error', 'dead_reason')
        return [dict(zip(cols, r)) for r in db.execute(q + ' ORDER BY id', args)]
    finally:
        db.close()


def sagactl(d, *args, json_out=False, check=True, timeout=30):
    """Run src/sagactl against sagad d's admin API: (exit code, stdout,
    stderr); with json_out, --json and the parsed stdout instead."""
    exe = os.environ.get('SAGACTL') or os.path.join(top_builddir, 'src', 'sagactl')
    cmd = [exe, '-s', 'http://127.0.0.1:%d' % d.admin_port]
    if d.token is not None:
        cmd += ['-t', d.token_file]
    if json_out:
        cmd.append('--json')
    cmd += [str(a) for a in args]
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=timeout)
    out, err = r.stdout.decode(errors='replace'), r.stderr.decode(errors='replace')
    if check and r.returncode != 0:
        raise AssertionError('%s: exit %d: %s' % (' '.join(cmd), r.returncode, err.strip()))
    if json_out and r.returncode == 0:
        out = json.loads(out)
    return r.returncode, out, err


_UUID7 = None


TRACEPARENT_NEW = re.compile(r'^00-[0-9a-f]{32}-[0-9a-f]{16}-01$')


def untraced(m):
    """A consumed message's headers without its traceparent, which must be
    absent (tracing.new_traces auto without an endpoint, the default) or
    one sagad started (sagad(8), TRACE CONTEXT): else {'traceparent': it}."""
    hd = dict(m.get('headers') or {})
    if 'traceparent' not in hd:
        return hd
    tp = hd.pop('traceparent')
    return hd if TRACEPARENT_NEW.match(tp) else {'traceparent': tp}


def is_uuid7(s, near=None, slack=300):
    """True when s is a UUIDv7 string (lowercase or uppercase hex); with
    near (a Unix time), its embedded time must be within slack seconds."""
    global _UUID7
    import re
    if _UUID7 is None:
        _UUID7 = re.compile(r'^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-7[0-9a-fA-F]{3}-'
                            r'[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}$')
    if not isinstance(s, str) or not _UUID7.match(s):
        return False
    if near is not None:
        ms = int(s.replace('-', '')[:12], 16)
        return abs(ms / 1000.0 - near) <= slack
    return True


# ---------------------------------------------------------------- running

_SANITIZER = None


def sanitizer_reports(logfiles, context=40):
    """The sanitizer reports (ThreadSanitizer, AddressSanitizer,
    UndefinedBehaviorSanitizer) found in the given sagad logs, each with
    the lines that follow it; '' when there are none. sagad's stderr goes
    to its log, and a report does not always end the process: TSan goes
    on after a race unless halt_on_error is set, and a scenario may kill
    the daemon before its exit code would tell."""
    global _SANITIZER
    import re
    if _SANITIZER is None:
        _SANITIZER = re.compile(r'(WARNING|ERROR|FATAL): (Thread|Address|Leak)Sanitizer'
                                r'|SUMMARY: \w*Sanitizer|: runtime error: ')
    out = []
    for path in logfiles:
        try:
            with open(path, 'rb') as f:
                lines = f.read().decode('utf-8', 'replace').splitlines()
        except OSError:
            continue
        hits = [i for i, l in enumerate(lines) if _SANITIZER.search(l)]
        if hits:
            first = hits[0]
            out.append('---- sanitizer report in %s (%d matching lines; the first):\n%s'
                       % (path, len(hits), '\n'.join(lines[first:first + context])))
    return '\n'.join(out)


class Skip(Exception):
    """Raised by a test that finds, once under way, that what it tests is
    not there (a feature this build lacks): run_test cleans up and exits
    77 (skipped), saying why."""


def run_test(fn, name=None):
    """Run fn(workdir) in a fresh temporary directory; print ok or the
    traceback (with the tail of every sagad log), clean up everything, exit
    0 (pass), 1 (fail) or 77 (fn raised Skip)."""
    if os.environ.get('SAGAD_SKIP_INTEGRATION'):
        # make distcheck: the integration suite already ran in the tree.
        print('skipped: SAGAD_SKIP_INTEGRATION is set')
        sys.exit(77)
    _install_signal_handlers()
    name = name or os.path.splitext(os.path.basename(sys.argv[0]))[0]
    workdir = tempfile.mkdtemp(prefix='sagad-%s-' % name)
    os.chmod(workdir, 0o755)
    log('%s: work directory %s' % (name, workdir))
    ok, failure, skipped = False, '', None
    sagads, brokers = [], []
    orig_sagad_init, orig_broker_init = Sagad.__init__, Broker.__init__

    def sagad_init(self, *a, **k):
        orig_sagad_init(self, *a, **k)
        sagads.append(self)

    def broker_init(self, *a, **k):
        orig_broker_init(self, *a, **k)
        brokers.append(self)

    Sagad.__init__, Broker.__init__ = sagad_init, broker_init
    try:
        fn(workdir)
        ok = True
    except Skip as e:
        ok, skipped = True, str(e)
    except BaseException as e:
        traceback.print_exc()
        sys.stdout.flush()
        failure = '%s: %s' % (type(e).__name__, e)
    finally:
        Sagad.__init__, Broker.__init__ = orig_sagad_init, orig_broker_init
    if not ok:
        for d in sagads:
            # Debug lines (retry schedules) would push the story out of
            # the part of the output CI keeps.
            print('---- tail of %s (debug lines left out)' % d.logfile)
            print(tail(d.logfile, 25, skip_debug=True))
        for b in brokers:
            print('---- tail of %s' % os.path.join(b.dir, 'log', b.node + '.log'))
            print(b.log_tail(15))
    try:
        cleanup_all()
    except BaseException:
        traceback.print_exc()
    reports = sanitizer_reports(d.logfile for d in sagads)
    if reports:
        # A race or a memory error fails the scenario even when every
        # check held (t/run.sh: the sanitizer and ThreadSanitizer passes).
        print(reports)
        if ok:
            ok, failure = False, 'sanitizer report in a sagad log (above)'
    if ok and not os.environ.get('SAGAD_KEEP'):
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print('work directory kept: %s' % workdir)
    if not ok:
        # Again at the very end: CI shows only the tail of the output.
        print('failure: %s' % failure[:2000])
    if ok and skipped is not None:
        print('skipped: %s' % skipped, flush=True)
        sys.exit(77)
    print('ok' if ok else 'FAIL', flush=True)
    sys.exit(0 if ok else 1)
