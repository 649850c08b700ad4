#!/usr/bin/env python3
"""Logs: values that come from outside (a Message-Id and a routing key given
to the publish API, a routing key with a newline consumed from the broker,
the text a service answers with when it fails or refuses, a row and a
database path read by the sqlite source plugin) cannot forge a field or a
line of sagad's logfmt output. Every line of the log is read
with a strict logfmt reader, and the hostile values must come back from it
byte for byte as the values of their own fields."""

import json
import os
import re
import sqlite3
import sys
import urllib.parse

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402

# Given to the publish API: a header value (visible ASCII: the API refuses
# spaces and HTTP has no newline in a header) and a percent-encoded routing
# key in the URL path.
MID_HTTP = 'mid"forged=1\\"level=error\\'
KEY_HTTP = 'log.refuse" level=error x=\\y'
KEY_HTTP_NL = 'log.refuse\nts=2026-01-01T00:00:00.000Z level=error msg="forged line"'
# Published on the broker directly: AMQP carries a newline in a routing key.
MID_AMQP = 'amqp" a=b \\\\ c'
KEY_AMQP = 'log.retry\nts=2026-01-01T00:00:00.000Z level=error msg="forged" x="'
# What the service answers with.
SAID = 'db down" level=error\nts=2026-01-01T00:00:00.000Z level=error msg="forged" \\'
# A row of a sqlite source (a plugin logs it through the host), in a file
# whose path has a quote, a space and a backslash.
MID_ROW = 'row" x=1\nts=2026-01-01T00:00:00.000Z level=error msg="forged" \\'
DB_NAME = 'out"box \\ x.db'

KEY_RE = re.compile(r'[A-Za-z0-9_.-]+')
BARE_RE = re.compile(r'[!#-<>-\[\]-~]+')      # printable ASCII but ' ', '"', '=', '\'
TS_RE = re.compile(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$')
ESCAPES = {'"': '"', '\\': '\\', 'n': '\n', 'r': '\r', 't': '\t'}


def parse_quoted(line, i):
    """The value of the quoted string starting at line[i] (a '"') and the
    index after its closing quote."""
    out = []
    i += 1
    while True:
        if i >= len(line):
            raise ValueError('unterminated quoted value')
        c = line[i]
        if c == '"':
            return ''.join(out), i + 1
        if ord(c) < 0x20 or ord(c) >= 0x7f:
            raise ValueError('raw byte 0x%02x inside a quoted value' % ord(c))
        if c == '\\':
            e = line[i + 1:i + 2]
            if e in ESCAPES:
                out.append(ESCAPES[e])
                i += 2
                continue
            if e == 'x' and re.match(r'[0-9a-f]{2}$', line[i + 2:i + 4]):
                out.append(chr(int(line[i + 2:i + 4], 16)))
                i += 4
                continue
            raise ValueError('unknown escape \\%s' % e)
        out.append(c)
        i += 1


def parse_logfmt(line):
    """Strict logfmt: ts=... level=... msg="..." and then ' key=value'
    fields, each key once. A dict of the fields (escapes undone), or
    ValueError."""
    fields = {}
    i = 0
    while i < len(line):
        if fields:
            if line[i] != ' ':
                raise ValueError('no space before field at %d' % i)
            i += 1
        m = KEY_RE.match(line, i)
        if not m or line[m.end():m.end() + 1] != '=':
            raise ValueError('bad key at %d' % i)
        key = m.group(0)
        if key in fields:
            raise ValueError('key %s twice' % key)
        i = m.end() + 1
        if line[i:i + 1] == '"':
            val, i = parse_quoted(line, i)
        else:
            m = BARE_RE.match(line, i)
            if not m:
                raise ValueError('bad bare value at %d' % i)
            val, i = m.group(0), m.end()
        fields[key] = val
    keys = list(fields)
    if keys[:3] != ['ts', 'level', 'msg']:
        raise ValueError('line does not start with ts, level, msg: %s' % keys[:3])
    if not TS_RE.match(fields['ts']) or fields['level'] not in ('error', 'warn', 'info',
                                                                'debug'):
        raise ValueError('bad ts or level')
    return fields


def read_log(d):
    """Every line sagad wrote, parsed; fails on the first that is not strict
    logfmt. Lines are split on '\\n' alone, as a log shipper would, and the
    harness's own start markers are left out."""
    with open(d.logfile, 'rb') as f:
        data = f.read()
    if not data.endswith(b'\n'):
        raise AssertionError('the log does not end with a whole line: %r' % data[-200:])
    out = []
    for n, raw in enumerate(data.split(b'\n')[:-1], 1):
        if raw.startswith(b'--- harness: '):
            continue
        try:
            out.append(parse_logfmt(raw.decode('ascii')))
        except (ValueError, UnicodeDecodeError) as e:
            raise AssertionError('log line %d is not strict logfmt (%s): %r' % (n, e, raw))
    return out


def behaviour(call):
    body = call['body']
    if body == b'refuse':
        return (404, SAID, {'Content-Type': 'text/plain'})
    if body == b'retry' and call['headers'].get('sagad-attempt') == '1':
        return (503, SAID, {'Content-Type': 'text/plain'})
    return 200


def sqlite_plugin():
    return any(d and os.path.exists(os.path.join(d, 'sqlite.so'))
               for d in os.environ.get('SAGAD_PLUGIN_DIR', '').split(':'))


def source_db(wd):
    """A sqlite source's database with one row sagad cannot publish (its
    headers are not a JSON object): the plugin logs its message id."""
    path = os.path.join(wd, DB_NAME)
    with open(os.path.join(h.top_srcdir, 'plugins', 'sqlite', 'schema.sql')) as f:
        schema = f.read()
    c = sqlite3.connect(path, isolation_level=None)
    c.executescript(schema)
    c.execute('INSERT INTO sagad_outbox (message_id, exchange, routing_key, headers, body) '
              'VALUES (?, ?, ?, ?, ?)', (MID_ROW, 'events', 'log.row', json.dumps([1]), 'x'))
    c.close()
    return path


def main(wd):
    broker = h.Broker(wd)
    broker.start()
    tool = h.AmqpTool()
    svc = h.Service(behaviour)
    conf = '''
subscriptions = (
  { name = "logs"; bind = [ "events:log.#" ]; deliver = "%s";
    timeout = 5; max_attempts = 3; retry_initial = 0.05; retry_max = 0.2;
    circuit_failures = 100; circuit_open = 1; }
);
''' % svc.url
    with_source = sqlite_plugin()
    if with_source:
        conf += 'sources = ( { plugin = "sqlite"; path = %s; } );\n' % h.conf_str(source_db(wd))
    else:
        h.log('the sqlite plugin is not built: no source in this run')
    d = h.Sagad(wd, broker.url, name='orders', conf_extra=conf)
    d.start()

    h.log('== hostile values through the publish API')
    st, doc, _ = d.publish('events', KEY_HTTP, b'refuse', {'Message-Id': MID_HTTP})
    h.check(st == 202, 'a Message-Id and a routing key with quotes and backslashes: 202', (st, doc))
    path = '/v1/publish/events/%s' % urllib.parse.quote(KEY_HTTP_NL, safe='')
    st, _, _ = d.request('POST', path, b'refuse', {'Message-Id': 'nl-1'})
    h.check(st in (202, 400), 'a percent-encoded newline in the routing key: %d' % st)

    h.log('== a routing key with a newline from the broker')
    tool.send(broker.url, 'events', KEY_AMQP, body='retry', message_id=MID_AMQP)

    def seen():
        lines = read_log(d)
        dead = [f for f in lines if f['msg'] == 'dead-lettered']
        retry = [f for f in lines if f['msg'] == 'delivery failed, retry scheduled']
        done = [c for c in svc.calls if c['body'] == b'retry' and c['answer'] == 200]
        rows = [f for f in lines if f['msg'] == 'row left in the table']
        return dead and retry and done and (rows or not with_source) and (dead, retry, rows)
    dead, retry, rows = h.wait_until(seen, 30, 'the refusal, the retry and the bad row in the log')

    h.check(d.stop() == 0, 'sagad stops cleanly')
    lines = read_log(d)
    h.check(len(lines) > 10, 'every one of the %d log lines is strict logfmt' % len(lines))

    refusal = 'refused by the service: ' + SAID
    h.check(any(f.get('message_id') == MID_HTTP and f.get('routing_key') == KEY_HTTP and
                f.get('error') == refusal and f.get('level') == 'warn' for f in dead),
            'the dead-letter line gives back the Message-Id, routing key and the '
            "service's text byte for byte", dead)
    h.check(any(f.get('message_id') == MID_AMQP and f.get('routing_key') == KEY_AMQP and
                f.get('error') == 'HTTP 503: ' + SAID for f in retry),
            'the retry line gives back the routing key with its newline and the '
            "service's text byte for byte", retry)
    if with_source:
        h.check(any(f.get('source') == 'sqlite' and f.get('message_id') == MID_ROW and
                    f.get('reason') == 'headers is not a JSON object' for f in rows),
                "a plugin's line gives back a row's message id byte for byte", rows)
        path = os.path.join(wd, DB_NAME)
        h.check(any(f['msg'] == 'relaying from SQLite' and f.get('path') == path
                    for f in lines), 'and the path of its database', path)
    forged = [f for f in lines if f['msg'].startswith('forged') or f.get('forged')]
    h.check(not forged, 'no forged line or field', forged)
    errors = [f for f in lines if f['level'] == 'error' and f['msg'] != 'row left in the table']
    h.check(not errors, 'no level=error line (none was forged either)', errors)


h.run_test(main)
