#!/usr/bin/env python3
"""sagad's command line and configuration checking (no broker needed):
-n on every shipped example, FILE:LINE errors for bad files, -V, usage
errors, @include."""

import glob
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402

URL = 'amqp://guest:guest@127.0.0.1:5672/%2f'
ERR_LINE = re.compile(r'^(.+?):(\d+): (.+)$')


def run(args, timeout=20):
    r = subprocess.run([h.sagad_path()] + args, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    return r.returncode, r.stdout.decode(errors='replace'), r.stderr.decode(errors='replace')


def check_valid(path, what):
    rc, out, err = run(['-n', '-f', path])
    h.check(rc == 0, '%s: sagad -n exits 0' % what,
            'exit %d, stderr:\n%s' % (rc, err))


def error_lines(err, path):
    """The FILE:LINE: message lines of stderr that name path."""
    out = []
    for line in err.splitlines():
        m = ERR_LINE.match(line.strip())
        if m and os.path.basename(m.group(1)) == os.path.basename(path):
            out.append((int(m.group(2)), m.group(3)))
    return out


def line_of(text, needle):
    for i, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError('%r not in generated config' % needle)


def check_invalid(path, text, what, needle=None, words=(), nerrors=1):
    """text written to path must be refused: exit 1, a FILE:LINE: message
    line on stderr (at the line holding needle, when given), mentioning
    words."""
    with open(path, 'w') as f:
        f.write(text)
    rc, out, err = run(['-n', '-f', path])
    lines = error_lines(err, path)
    h.check(rc == 1, '%s: sagad -n exits 1' % what,
            'exit %d, stderr:\n%s' % (rc, err))
    h.check(len(lines) >= nerrors, '%s: %d FILE:LINE: message line(s) on stderr'
            % (what, nerrors), 'stderr was:\n%s' % err)
    if needle is not None:
        want = line_of(text, needle)
        h.check(any(n == want for n, _ in lines), '%s: error reported at line %d' % (what, want),
                'got %s' % lines)
    for w in words:
        h.check(any(w in msg for _, msg in lines), '%s: message mentions %r' % (what, w),
                'got %s' % lines)
    h.log('   stderr: %s' % err.strip().replace('\n', ' | '))


SAGA = ('sagas = ( { name = "order"; start = "events:order.placed";\n'
        '  steps = ( { name = "reserve"; command = "commands:stock.reserve"; } ); } );\n')


def check_saga_store(wd, bad):
    """saga_store: the defaults and pgsql are accepted; each wrong
    combination is refused at its line, and no message shows the password
    of the conninfo (sagad.conf(5) SAGA STORE)."""
    pw = 'pg-s3cret'
    secret = os.path.join(wd, 'pg.conninfo')
    with open(secret, 'w') as f:
        f.write('host=127.0.0.1 dbname=sagad password=%s\n' % pw)
    empty = os.path.join(wd, 'empty.conninfo')
    open(empty, 'w').close()
    ok = h.Sagad(wd, URL, name='sstore', conf_extra=SAGA).conf_text()
    for what, extra in (
            ('saga_store sqlite', 'saga_store = { backend = "sqlite"; };\n'),
            ('saga_store pgsql with conninfo',
             'saga_store = { backend = "pgsql"; conninfo = "host=db password=%s"; '
             'schema = "x"; relay_grace = 0.5; };\n' % pw),
            ('saga_store pgsql with conninfo_file',
             'saga_store = { backend = "pgsql"; conninfo_file = %s; };\n' % h.conf_str(secret))):
        path = os.path.join(wd, 'sstore-ok.conf')
        with open(path, 'w') as f:
            f.write(ok + extra)
        check_valid(path, what)

    def refused(what, extra, needle, words):
        check_invalid(bad, ok + 'saga_store = {\n' + extra + '};\n', what,
                      needle=needle, words=words)
        rc, out, err = run(['-n', '-f', bad])
        h.check(pw not in err and pw not in out, '%s: the password is not shown' % what, err)

    refused('saga_store: unknown backend', '  backend = "mysql";\n', 'mysql',
            ('backend must be "sqlite" or "pgsql"',))
    refused('saga_store: pgsql without conninfo', '  backend = "pgsql";\n', 'pgsql',
            ('needs conninfo or conninfo_file',))
    refused('saga_store: conninfo and conninfo_file',
            '  backend = "pgsql";\n  conninfo = "password=%s";\n  conninfo_file = %s;\n'
            % (pw, h.conf_str(secret)), 'conninfo_file', ('not both',))
    refused('saga_store: conninfo with sqlite', '  conninfo = "password=%s";\n' % pw,
            'conninfo', ('conninfo is for backend "pgsql"',))
    refused('saga_store: conninfo_file with sqlite',
            '  backend = "sqlite";\n  conninfo_file = %s;\n' % h.conf_str(secret),
            'conninfo_file', ('conninfo_file is for backend "pgsql"',))
    refused('saga_store: conninfo_file missing',
            '  backend = "pgsql";\n  conninfo_file = "%s/no-such";\n' % wd, 'conninfo_file',
            ('cannot read conninfo_file', 'No such file or directory'))
    refused('saga_store: conninfo_file empty',
            '  backend = "pgsql";\n  conninfo_file = %s;\n' % h.conf_str(empty), 'conninfo_file',
            ('is empty',))
    refused('saga_store: schema too long', '  schema = "%s";\n' % ('s' * 64), 'schema',
            ('schema must be 1 to 63 bytes',))
    refused('saga_store: relay_grace out of range', '  relay_grace = 0.1;\n', 'relay_grace',
            ('relay_grace',))
    nosaga = h.Sagad(wd, URL, name='sstore').conf_text()
    check_invalid(bad, nosaga + 'saga_store = {\n  backend = "pgsql";\n  conninfo = "host=db";\n};\n',
                  'saga_store: pgsql without sagas', needle='pgsql', words=('no sagas are defined',))


def check_tracing(wd, bad):
    """tracing: an endpoint and the defaults are accepted; a URL that is not
    http://, a sampling out of 0..1, a batch above the queue and a
    new_traces other than auto, always or never are refused at their line
    (sagad.conf(5) TRACING)."""
    ok = h.Sagad(wd, URL, name='trc').conf_text()
    path = os.path.join(wd, 'tracing-ok.conf')
    with open(path, 'w') as f:
        f.write(ok + 'tracing = { endpoint = "http://127.0.0.1:4318/v1/traces"; '
                'sampling = 0.25; new_traces = "never"; };\n')
    check_valid(path, 'tracing with an endpoint')
    with open(path, 'w') as f:
        f.write(ok + 'tracing = { new_traces = "always"; };\n')
    check_valid(path, 'tracing: new traces without an endpoint')
    for what, extra, needle, words in (
            ('tracing: https endpoint', '  endpoint = "https://collector/v1/traces";\n',
             'https', ('http://HOST',)),
            ('tracing: port out of range', '  endpoint = "http://h:99999/";\n', '99999',
             ('http://HOST',)),
            ('tracing: sampling above 1', '  sampling = 1.5;\n', 'sampling', ('between 0 and 1',)),
            ('tracing: batch above queue', '  queue = 10;\n  batch = 20;\n', 'tracing',
             ('batch is above queue',)),
            ('tracing: new_traces unknown', '  new_traces = "sometimes";\n', 'sometimes',
             ('"auto", "always" or "never"',))):
        check_invalid(bad, ok + 'tracing = {\n' + extra + '};\n', what, needle=needle,
                      words=words)


def main(wd):
    exe = h.sagad_path()
    h.check(os.access(exe, os.X_OK), '%s exists' % exe)

    # -V and usage errors
    rc, out, err = run(['-V'])
    h.check(rc == 0, 'sagad -V exits 0', 'exit %d: %s' % (rc, err))
    h.check(re.search(r'\d+\.\d+', out) is not None, 'sagad -V prints a version on stdout',
            'stdout %r, stderr %r' % (out, err))
    rc, out, err = run(['-Z'])
    h.check(rc == 2, 'sagad -Z (bad flag) exits 2', 'exit %d: %s' % (rc, err))
    h.check(err.strip() != '', 'bad flag: a message on stderr')
    rc, out, err = run(['-f'])
    h.check(rc == 2, 'sagad -f without FILE exits 2', 'exit %d: %s' % (rc, err))

    # the shipped examples
    shipped = sorted(glob.glob(os.path.join(h.top_srcdir, 'conf', '*.conf')))
    h.log('%d example configuration(s) in conf/' % len(shipped))
    for path in shipped:
        check_valid(path, 'conf/' + os.path.basename(path))

    # generated configurations
    d = h.Sagad(wd, URL, name='orders')
    base = d.conf_text()
    check_valid(d.conf, 'generated minimal config')
    full = h.Sagad(wd, URL, name='full', api_extra='max_message_bytes = 4096;',
                   store_extra='max_bytes = 10485760; dedup_window = 3600;',
                   conf_extra='outbox = { max_inflight = 64; retry_initial = 0.05; retry_max = 2; };')
    check_valid(full.conf, 'generated config with outbox/limits')
    noex = h.Sagad(wd, URL, name='noex', exchanges=None)
    check_valid(noex.conf, 'generated config without exchanges')

    bad = os.path.join(wd, 'bad.conf')
    check_invalid(bad, base + 'bogus_key = 1;\n', 'unknown top-level key',
                  needle='bogus_key', words=('bogus_key',))
    for group, text in (
            ('broker', base.replace('heartbeat = 2;', 'heartbeat = 2;\n  bogus_broker = 1;')),
            ('store', base.replace('store = {\n', 'store = {\n  bogus_store = "x";\n')),
            ('api', base.replace('api = {\n', 'api = {\n  bogus_api = true;\n'))):
        check_invalid(bad, text, 'unknown key in %s' % group, needle='bogus_' + group,
                      words=('bogus_' + group,))
    check_invalid(bad, base + 'outbox = {\n  max_inflight = 10;\n  bogus_outbox = 1;\n};\n',
                  'unknown key in outbox', needle='bogus_outbox', words=('bogus_outbox',))
    check_invalid(bad, base.replace('service = "orders";', 'service = 42;'),
                  'wrong type (service = 42)', needle='service = 42', words=('service',))
    check_invalid(bad, base.replace('heartbeat = 2;', 'heartbeat = "often";'),
                  'wrong type (heartbeat = "often")', needle='heartbeat', words=('heartbeat',))
    check_invalid(bad, base + 'outbox = { max_inflight = "many"; };\n',
                  'wrong type (outbox.max_inflight = "many")', needle='max_inflight',
                  words=('max_inflight',))
    check_invalid(bad, base.replace('service = "orders";\n', ''), 'missing service',
                  words=('service',))
    check_invalid(bad, base.replace(URL, 'http://guest:guest@127.0.0.1:5672/'),
                  'bad url scheme', needle='url =', words=('url',))
    check_invalid(bad, base + 'broken = {\n  x = 1\n', 'syntax error')
    check_invalid(bad, base + 'bogus_one = 1;\nbogus_two = 2;\n', 'two errors',
                  words=('bogus_one', 'bogus_two'), nerrors=2)
    check_invalid(bad, base.replace('type = "topic"; }', 'type = "fancy"; }', 1),
                  'bad exchange type', needle='fancy')

    check_saga_store(wd, bad)
    check_tracing(wd, bad)

    # @include: the exchanges and the outbox come from conf.d/*.conf
    inc = os.path.join(wd, 'inc')
    os.makedirs(os.path.join(inc, 'conf.d'))
    main_conf = os.path.join(inc, 'sagad.conf')
    head = h.Sagad(wd, URL, name='inc', exchanges=None).conf_text()
    with open(main_conf, 'w') as f:
        f.write(head + '@include "conf.d/*.conf"\n')
    with open(os.path.join(inc, 'conf.d', '10-exchanges.conf'), 'w') as f:
        f.write('exchanges = (\n  { name = "events"; type = "topic"; },\n'
                '  { name = "commands"; type = "direct"; }\n);\n')
    with open(os.path.join(inc, 'conf.d', '20-outbox.conf'), 'w') as f:
        f.write('outbox = { max_inflight = 32; };\n')
    # -n from another working directory: the include is relative to the file
    r = subprocess.run([h.sagad_path(), '-n', '-f', main_conf], cwd='/',
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)
    h.check(r.returncode == 0, '@include "conf.d/*.conf": sagad -n exits 0',
            'exit %d: %s' % (r.returncode, r.stderr.decode(errors='replace')))
    # an error inside an included file is reported with that file's name
    badinc = os.path.join(inc, 'conf.d', '30-bad.conf')
    with open(badinc, 'w') as f:
        f.write('# comment\nbogus_included = 1;\n')
    rc, out, err = run(['-n', '-f', main_conf])
    h.check(rc == 1, 'error in an included file: exit 1', 'exit %d: %s' % (rc, err))
    lines = error_lines(err, badinc)
    h.check(any(n == 2 for n, _ in lines), 'error in an included file: reported as '
            '30-bad.conf:2', 'stderr:\n%s' % err)
    os.unlink(badinc)

    # a missing file
    rc, out, err = run(['-n', '-f', os.path.join(wd, 'no-such.conf')])
    h.check(rc == 1, 'missing configuration file: exit 1', 'exit %d: %s' % (rc, err))
    h.check('no-such.conf' in err, 'missing configuration file: named on stderr', err)


h.run_test(main)
