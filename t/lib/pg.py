"""A private PostgreSQL for sagad's tests and benchmarks (Python 3 standard
library only).

    import harness as h, pg
    db = pg.Postgres(workdir); db.start()      # initdb + postgres, own port
    c = db.connect()                           # a tiny wire-protocol client
    c.query("CREATE TABLE t (x int)")
    rows = c.query("SELECT x FROM t")          # [['1'], ...] (text values)
    db.conninfo                                # for sagad: host=... port=...

The cluster lives in workdir/pgdata, listens on 127.0.0.1 and a unix socket
in workdir/pgsock on a port of its own, with trust authentication, and runs
as user postgres when the test runs as root (PostgreSQL refuses root). It
is never the system cluster: nothing under /var/lib/postgresql or
/run/postgresql is touched. The server is registered with the harness, so
it is killed when the test ends, however it ends.

Environment: PG_BINDIR (default: the newest /usr/lib/postgresql/*/bin).
"""

import glob
import os
import pwd
import signal
import socket
import struct
import subprocess
import threading
import time

import harness as h


def bindir():
    d = os.environ.get('PG_BINDIR')
    if d:
        return d
    cands = sorted(glob.glob('/usr/lib/postgresql/*/bin/postgres'),
                   key=lambda p: int(p.split('/')[4]) if p.split('/')[4].isdigit() else 0)
    if not cands:
        raise RuntimeError('PostgreSQL server not found (apt-get install postgresql)')
    return os.path.dirname(cands[-1])


def available():
    try:
        bindir()
        return True
    except RuntimeError:
        return False


def on_both_stores(wd, scenario):
    """scenario(workdir, saga_store_conf) on the embedded store, then (when
    PostgreSQL is installed) with the sagas on a private PostgreSQL."""
    import harness as h
    scenario(os.path.join(wd, 'sqlite'), '')
    if not available():
        h.log('PostgreSQL is not installed: the pgsql run is skipped')
        return
    db = Postgres(os.path.join(wd, 'pg'))
    db.start()
    scenario(os.path.join(wd, 'pgsql'), '\nsaga_store = { backend = "pgsql"; conninfo = %s; };\n'
             % h.conf_str(db.conninfo))
    db.stop()


class PgError(Exception):
    """An ErrorResponse: .fields maps the field code ('C' SQLSTATE, 'M'
    message, ...) to its text."""

    def __init__(self, fields):
        self.fields = fields
        self.sqlstate = fields.get('C', '')
        super().__init__('%s: %s (%s)' % (fields.get('S', 'ERROR'), fields.get('M', '?'),
                                          self.sqlstate))


class Conn:
    """A minimal PostgreSQL client: simple query protocol, text results,
    trust or cleartext/md5-less authentication only (enough for a private
    test cluster). Not thread-safe: one Conn per thread."""

    def __init__(self, path=None, host=None, port=5432, user='postgres', database='postgres',
                 timeout=30):
        if path:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        else:
            self.sock = socket.create_connection((host, port), timeout)
        self.buf = b''
        self.notifies = []
        self.params = {}
        self.status = 'I'
        body = struct.pack('!i', 196608)
        for k, v in (('user', user), ('database', database), ('client_encoding', 'UTF8'),
                     ('application_name', 'sagad-test')):
            body += k.encode() + b'\0' + v.encode() + b'\0'
        body += b'\0'
        self.sock.sendall(struct.pack('!i', len(body) + 4) + body)
        while True:
            t, data = self._msg()
            if t == b'R':
                code = struct.unpack('!i', data[:4])[0]
                if code != 0:
                    raise RuntimeError('authentication method %d not supported' % code)
            elif t == b'E':
                raise PgError(self._fields(data))
            elif t == b'Z':
                self.status = data.decode()
                break

    def close(self):
        try:
            self.sock.sendall(b'X\0\0\0\4')
        except OSError:
            pass
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def _recv(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise ConnectionError('PostgreSQL closed the connection')
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _msg(self):
        hdr = self._recv(5)
        t, n = hdr[:1], struct.unpack('!i', hdr[1:])[0]
        data = self._recv(n - 4)
        if t == b'A':       # NotificationResponse
            pid = struct.unpack('!i', data[:4])[0]
            chan, payload = data[4:].split(b'\0')[:2]
            self.notifies.append((pid, chan.decode(), payload.decode()))
        elif t == b'S':
            k, v = data.split(b'\0')[:2]
            self.params[k.decode()] = v.decode()
        return t, data

    @staticmethod
    def _fields(data):
        out = {}
        for part in data.split(b'\0'):
            if part:
                out[chr(part[0])] = part[1:].decode('utf-8', 'replace')
        return out

    def query(self, sql, all_results=False):
        """Run sql (several statements allowed). Returns the rows of the
        last statement that returned rows (lists of str or None), or with
        all_results a list of (command tag, rows) per statement. Raises
        PgError after the server is ready again."""
        data = sql.encode() + b'\0'
        self.sock.sendall(b'Q' + struct.pack('!i', len(data) + 4) + data)
        results, rows, err, last = [], [], None, None
        while True:
            t, data = self._msg()
            if t == b'T':
                rows = []
            elif t == b'D':
                n = struct.unpack('!h', data[:2])[0]
                pos, row = 2, []
                for _ in range(n):
                    ln = struct.unpack('!i', data[pos:pos + 4])[0]
                    pos += 4
                    if ln < 0:
                        row.append(None)
                    else:
                        row.append(data[pos:pos + ln].decode('utf-8', 'replace'))
                        pos += ln
                rows.append(row)
            elif t == b'C':
                tag = data.rstrip(b'\0').decode()
                results.append((tag, rows))
                if rows:
                    last = rows
                rows = []
            elif t == b'E':
                err = PgError(self._fields(data))
            elif t == b'Z':
                self.status = data.decode()
                break
        if err:
            raise err
        if all_results:
            return results
        return last if last is not None else []

    def scalar(self, sql):
        rows = self.query(sql)
        return rows[0][0] if rows else None

    def wait_notify(self, timeout):
        """Wait up to timeout for a notification (after LISTEN)."""
        deadline = time.time() + timeout
        while not self.notifies and time.time() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.time()))
            try:
                self._msg()
            except socket.timeout:
                break
        self.sock.settimeout(30)
        return self.notifies.pop(0) if self.notifies else None


def quote_literal(s):
    return "'" + s.replace("'", "''") + "'"


def bytea_literal(b):
    return "'\\x%s'::bytea" % b.hex()


class Postgres:
    """A private PostgreSQL cluster (see the module docstring). settings:
    extra postgresql.conf lines, e.g. {'client_connection_check_interval':
    '100ms'}."""

    def __init__(self, workdir, settings=None, fsync=True):
        self.workdir = os.path.abspath(workdir)
        self.data = os.path.join(self.workdir, 'pgdata')
        self.sockdir = os.path.join(self.workdir, 'pgsock')
        self.logfile = os.path.join(self.workdir, 'postgres.log')
        self.port = h.free_port()
        self.settings = dict(settings or {})
        self.fsync = fsync
        self.proc = None
        self._wd = None
        self._logf = None
        self.bindir = bindir()
        self.user = None
        if os.getuid() == 0:
            pw = pwd.getpwnam('postgres')
            self.user = (pw.pw_uid, pw.pw_gid)

    @property
    def conninfo(self):
        """For libpq (sagad's pgsql source): the unix socket."""
        return 'host=%s port=%d user=postgres dbname=postgres' % (self.sockdir, self.port)

    @property
    def tcp_conninfo(self):
        return 'host=127.0.0.1 port=%d user=postgres dbname=postgres' % self.port

    def _popen_user(self):
        if not self.user:
            return {}
        return dict(user=self.user[0], group=self.user[1], extra_groups=[])

    def _mkdir(self, path):
        os.makedirs(path, exist_ok=True)
        if self.user:
            os.chown(path, self.user[0], self.user[1])
        os.chmod(path, 0o700 if path == self.data else 0o755)

    def init(self):
        if os.path.exists(os.path.join(self.data, 'PG_VERSION')):
            return
        self._mkdir(self.data)
        self._mkdir(self.sockdir)
        h.log('initdb %s' % self.data)
        r = subprocess.run([os.path.join(self.bindir, 'initdb'), '-D', self.data, '-A', 'trust',
                            '-U', 'postgres', '-E', 'UTF8', '--locale=C', '--no-sync'],
                           cwd='/', stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, **self._popen_user())
        if r.returncode != 0:
            raise RuntimeError('initdb failed:\n%s' % r.stdout.decode(errors='replace'))
        conf = {
            'listen_addresses': "'127.0.0.1'",
            'port': str(self.port),
            'unix_socket_directories': quote_literal(self.sockdir),
            'max_connections': '100',
            'shared_buffers': '32MB',
            'fsync': 'on' if self.fsync else 'off',
            'logging_collector': 'off',
            'log_min_messages': 'warning',
            'log_line_prefix': "'%m [%p] '",
        }
        conf.update(self.settings)
        with open(os.path.join(self.data, 'postgresql.conf'), 'a') as f:
            f.write('\n# sagad tests\n')
            for k, v in conf.items():
                f.write('%s = %s\n' % (k, v))

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout=60):
        self.init()
        if self.running():
            raise RuntimeError('postgres already running')
        t0 = time.time()
        self._logf = open(self.logfile, 'ab')
        if self.user:
            os.chown(self.logfile, self.user[0], self.user[1])
        self.proc = subprocess.Popen([os.path.join(self.bindir, 'postgres'), '-D', self.data],
                                     cwd='/', stdin=subprocess.DEVNULL, stdout=self._logf,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     **self._popen_user())
        h._register(self)
        self._wd = h._watchdog(self.proc.pid)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError('postgres exited with %s at startup:\n%s'
                                   % (self.proc.returncode, h.tail(self.logfile, 30)))
            try:
                self.connect(timeout=2).close()
                break
            except (OSError, PgError, ConnectionError):
                pass
            if time.time() - t0 > timeout:
                raise RuntimeError('postgres not up within %ss:\n%s'
                                   % (timeout, h.tail(self.logfile, 30)))
            time.sleep(0.05)
        h.log('postgres up on port %d (%.1fs)' % (self.port, time.time() - t0))
        return self

    def _finish(self):
        h._stop_watchdog(self._wd)
        self._wd = None
        if self._logf:
            self._logf.close()
            self._logf = None
        h._unregister(self)

    def stop(self, mode='fast', timeout=60):
        """Shut down: mode 'smart' (SIGTERM), 'fast' (SIGINT: disconnects
        clients, rolls back), 'immediate' (SIGQUIT: crash-like)."""
        if not self.running():
            self._finish()
            return
        t0 = time.time()
        sig = {'smart': signal.SIGTERM, 'fast': signal.SIGINT,
               'immediate': signal.SIGQUIT}[mode]
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            h._kill_tree(self.proc)
        self._finish()
        h.log('postgres stopped (%s, %.1fs)' % (mode, time.time() - t0))

    def kill(self):
        if self.proc is not None:
            h._kill_tree(self.proc)
        self._finish()

    def restart(self, mode='fast', down_for=0):
        self.stop(mode)
        if down_for:
            time.sleep(down_for)
        self.start()

    def _cleanup(self):
        self.kill()

    def connect(self, database='postgres', timeout=30):
        return Conn(path=os.path.join(self.sockdir, '.s.PGSQL.%d' % self.port),
                    database=database, timeout=timeout)

    def schema(self, table='sagad_outbox'):
        """The shipped plugins/pgsql/schema.sql, for another table name."""
        with open(os.path.join(h.top_srcdir, 'plugins', 'pgsql', 'schema.sql')) as f:
            sql = f.read()
        return sql.replace('sagad_outbox', table)

    def create_outbox(self, table='sagad_outbox', conn=None):
        c = conn or self.connect()
        try:
            c.query(self.schema(table))
        finally:
            if conn is None:
                c.close()


class Writers:
    """n threads, each with its own connection, each running
    make_sql(writer, i) for i in range(count) as one transaction (one round
    trip). Records the commit time of every transaction."""

    def __init__(self, db, n, count, make_sql, rate=None, retry=False):
        self.db, self.n, self.count, self.make_sql = db, n, count, make_sql
        self.rate = rate          # per writer, transactions per second
        self.retry = retry        # reconnect and retry after errors (restart tests)
        self.commits = {}         # (writer, i) -> commit time (after COMMIT answered)
        self.errors = []
        self.threads = []
        self.lock = threading.Lock()

    def _run(self, w):
        c = None
        t0 = time.time()
        i = 0
        while i < self.count:
            if self.rate:
                due = t0 + i / self.rate
                d = due - time.time()
                if d > 0:
                    time.sleep(d)
            try:
                if c is None:
                    c = self.db.connect()
                c.query(self.make_sql(w, i))
                with self.lock:
                    self.commits[(w, i)] = time.time()
                i += 1
            except (PgError, OSError, ConnectionError) as e:
                with self.lock:
                    self.errors.append((w, i, str(e)))
                if c is not None:
                    try:
                        c.close()
                    except OSError:
                        pass
                    c = None
                if not self.retry:
                    return
                # Was it committed before the connection went? Ask.
                time.sleep(0.2)
                while True:
                    try:
                        c = self.db.connect()
                        break
                    except (OSError, PgError, ConnectionError):
                        time.sleep(0.2)
                if self.committed(c, w, i):
                    with self.lock:
                        self.commits[(w, i)] = time.time()
                    i += 1
        if c is not None:
            c.close()

    def committed(self, c, w, i):
        """Override for retry: was transaction (w, i) committed?"""
        return False

    def start(self):
        for w in range(self.n):
            t = threading.Thread(target=self._run, args=(w,), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def join(self, timeout=600):
        for t in self.threads:
            t.join(timeout)
        return self
