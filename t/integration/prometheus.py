#!/usr/bin/env python3
"""The Prometheus rules and the Grafana dashboard against real processes.

promtool checks conf/prometheus/sagad-*.yml and runs their unit tests
(tests.yml). Then a real Prometheus (its own data directory, on a free
loopback port, 1 s scrapes and rule evaluation) scrapes two sagad
processes, each with a subscription, a saga and (one of them) an outbox
source, so that every metric family is there; a few messages are
published through each. Checked through Prometheus's query API: each
instance's sagad_accepted_total and delivered messages, recording rules,
no alert firing while all is well, and SagadBrokerDown firing for both
once the broker is stopped (a copy of the alert rules with every `for:`
cut to 2 s). Every metric named by a rule or by a dashboard expression is
one sagad exposes (or a recorded series), and every dashboard expression
is valid PromQL.

Skipped (77) when prometheus or promtool is not installed: t/lib/deps.sh
installs them (the Debian package prometheus).
"""

import json
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402

RULES_DIR = os.path.join(h.top_srcdir, 'conf', 'prometheus')
DASHBOARD = os.path.join(h.top_srcdir, 'conf', 'grafana', 'sagad-dashboard.json')
RULE_FILES = ('sagad-rules.yml', 'sagad-alerts.yml')
N = 3   # messages published through each sagad

SAGAS = '''
sagas = (
  { name = "order"; start = "events:order.created"; timeout = 60;
    steps = ( { name = "reserve"; command = "commands:stock.reserve";
                compensate = "commands:stock.release"; timeout = 30; } );
    completed = "events:order.done"; compensated = "events:order.undone"; }
);
'''


class Prometheus:
    """A Prometheus server in workdir, stopped (by pid) by the harness's
    cleanup like h.Sagad and h.Broker."""

    def __init__(self, workdir, targets, rule_files):
        self.dir = os.path.join(workdir, 'prometheus')
        os.makedirs(os.path.join(self.dir, 'data'))
        self.port = h.free_port()
        self.conf = os.path.join(self.dir, 'prometheus.yml')
        self.logfile = os.path.join(self.dir, 'prometheus.log')
        with open(self.conf, 'w') as f:
            f.write('global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n'
                    'rule_files:\n%s'
                    'scrape_configs:\n  - job_name: sagad\n    static_configs:\n'
                    '      - targets: [%s]\n'
                    % (''.join('  - %s\n' % json.dumps(p) for p in rule_files),
                       ', '.join('"%s"' % t for t in targets)))
        self.proc = None
        self._wd = None

    def start(self, timeout=60):
        with open(self.logfile, 'ab') as logf:
            self.proc = subprocess.Popen(
                ['prometheus', '--config.file=' + self.conf,
                 '--storage.tsdb.path=' + os.path.join(self.dir, 'data'),
                 '--web.listen-address=127.0.0.1:%d' % self.port],
                cwd=self.dir, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                start_new_session=True)
        h._register(self)
        self._wd = h._watchdog(self.proc.pid)
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError('prometheus exited with %s:\n%s'
                                   % (self.proc.returncode, h.tail(self.logfile, 30)))
            try:
                with urllib.request.urlopen('http://127.0.0.1:%d/-/ready' % self.port,
                                            timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() - t0 > timeout:
                raise RuntimeError('prometheus not ready within %ss:\n%s'
                                   % (timeout, h.tail(self.logfile, 30)))
            time.sleep(0.2)
        h.log('prometheus up on 127.0.0.1:%d, pid %d (%.1fs)'
              % (self.port, self.proc.pid, time.time() - t0))

    def api(self, path, **params):
        url = 'http://127.0.0.1:%d/api/v1/%s' % (self.port, path)
        if params:
            url += '?' + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                doc = json.loads(r.read())
        except urllib.error.HTTPError as e:
            doc = json.loads(e.read())
        return doc

    def query(self, expr):
        """The instant vector of expr: [(labels, value)]; raises on an error."""
        doc = self.api('query', query=expr)
        if doc.get('status') != 'success':
            raise AssertionError('query %s: %s' % (expr, doc.get('error')))
        return [(s['metric'], float(s['value'][1])) for s in doc['data']['result']]

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                h._kill_tree(self.proc)
        h._stop_watchdog(self._wd)
        self._wd = None
        h._unregister(self)

    def _cleanup(self):
        self.stop()


# ---------------------------------------------------------------- names

STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
IDENT = re.compile(r'[A-Za-z_:][A-Za-z0-9_:]*')


def names_in(expr):
    """(sagad metric names, recorded series names) an expression reads;
    quoted strings (label values, regexes) left out."""
    idents = IDENT.findall(STRING.sub('""', expr))
    return ({i for i in idents if i.startswith('sagad_')},
            {i for i in idents if ':' in i})


def exposed_names(sagads):
    """The sample names in the /metrics output of these sagads."""
    out = set()
    for d in sagads:
        out |= {key.split('{', 1)[0] for key in d.metrics()}
    return out


def dashboard_exprs(doc):
    """Every PromQL expression in a Grafana dashboard: targets' expr,
    annotations' expr, query variables' query."""
    out = []

    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                if k == 'expr' and isinstance(x, str):
                    out.append(x)
                elif k == 'query' and v.get('type') == 'query':
                    out.append(x['query'] if isinstance(x, dict) else x)
                else:
                    walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
    walk(doc)
    return out


def as_promql(expr):
    """A dashboard expression as Prometheus takes it: Grafana's variables
    replaced, label_values(m, l) queried as m."""
    expr = expr.replace('$__rate_interval', '1m').replace('$__range', '5m')
    expr = re.sub(r'\$\w+', '.*', expr)
    m = re.match(r'^label_values\((.*),\s*\w+\)$', expr)
    return m.group(1) if m else expr


# ---------------------------------------------------------------- test

def promtool(*args):
    r = subprocess.run(['promtool'] + list(args), cwd=RULES_DIR, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    out = r.stdout.decode(errors='replace')
    h.check(r.returncode == 0, 'promtool %s' % ' '.join(args), out.strip()[-2000:])
    return out


def source_db(wd):
    path = os.path.join(wd, 'source.db')
    with open(os.path.join(h.top_srcdir, 'plugins', 'sqlite', 'schema.sql')) as f:
        schema = f.read()
    c = sqlite3.connect(path, isolation_level=None)
    c.executescript(schema)
    c.close()
    return path


def fast_alerts(wd):
    """A copy of the alert rules with every `for:` cut to 2 s."""
    with open(os.path.join(RULES_DIR, 'sagad-alerts.yml')) as f:
        text = f.read()
    text, n = re.subn(r'(?m)^(\s+for:\s*)\S+\s*$', r'\g<1>2s', text)
    h.check(n > 0, 'test copy of sagad-alerts.yml: %d `for:` cut to 2s' % n)
    path = os.path.join(wd, 'sagad-alerts-fast.yml')
    with open(path, 'w') as f:
        f.write(text)
    return path


def main(wd):
    # The name check itself: names in strings are no metrics, recorded
    # series are told apart from sagad's.
    h.check(names_in('rate(sagad_a_total{x="sagad_b"}[5m]) / on (saga) lvl:sagad_c:rate5m')
            == ({'sagad_a_total'}, {'lvl:sagad_c:rate5m'}),
            'names_in() finds metric and recorded names, not label values')
    h.log('== promtool')
    promtool('check', 'rules', *RULE_FILES)
    promtool('test', 'rules', 'tests.yml')
    with open(DASHBOARD) as f:
        dash = json.load(f)
    h.check(True, 'conf/grafana/sagad-dashboard.json parses')
    var_names = [v.get('name') for v in dash.get('templating', {}).get('list', [])]
    h.check('instance' in var_names and 'DS_PROMETHEUS' in var_names,
            'the dashboard has the variables DS_PROMETHEUS and instance', var_names)

    h.log('== two sagad processes on one broker')
    broker = h.Broker(wd)
    broker.start()
    svc = h.Service()
    sagads = []
    for name, extra in (('orders', 'sources = ( { plugin = "sqlite"; path = %s; } );\n'
                         % h.conf_str(source_db(wd))),
                        ('payments', '')):
        conf = ('subscriptions = ( { name = "inbox"; bind = [ "events:prom.%s.#" ]; '
                'deliver = "%s"; timeout = 5; } );\n' % (name, svc.url)) + SAGAS + extra
        d = h.Sagad(wd, broker.url, name=name, conf_extra=conf)
        d.start()
        sagads.append(d)
    instances = {d.name: '127.0.0.1:%d' % d.admin_port for d in sagads}

    h.log('== prometheus scraping both')
    prom = Prometheus(wd, instances.values(),
                      [os.path.join(RULES_DIR, 'sagad-rules.yml'), fast_alerts(wd)])
    prom.start()
    h.wait_until(lambda: len([v for _, v in prom.query('up{job="sagad"}') if v == 1]) == 2,
                 30, 'both sagad targets up in prometheus')
    h.check(True, 'both sagad targets are up (job "sagad")')

    for d in sagads:
        for i in range(N):
            st, doc, _ = d.publish('events', 'prom.%s.%d' % (d.name, i), b'{"n": %d}' % i,
                                   {'Content-Type': 'application/json'})
            h.check(st == 202, '%s: publish #%d answered 202' % (d.name, i), (st, doc))

    def per_instance(expr, want):
        """{sagad name: value} once every instance's value satisfies want."""
        def get():
            got = {lb.get('instance'): v for lb, v in prom.query(expr)}
            vals = {n: got.get(i) for n, i in instances.items()}
            return vals if all(v is not None and want(v) for v in vals.values()) else None
        try:
            return h.wait_until(get, 30, expr, interval=0.5)
        except AssertionError:
            raise AssertionError('%s: %r' % (expr, prom.query(expr)))

    vals = per_instance('sagad_accepted_total', lambda v: v == N)
    h.check(True, 'sagad_accepted_total is %d for each instance: %s' % (N, vals))
    vals = per_instance('sagad_delivered_total{subscription="inbox", outcome="success"}',
                        lambda v: v == N)
    h.check(True, 'sagad_delivered_total{outcome="success"} is %d for each instance' % N)
    vals = per_instance('instance:sagad_accepted:rate5m', lambda v: v > 0)
    h.check(True, 'recording rule instance:sagad_accepted:rate5m > 0 for each: %s' % vals)
    vals = per_instance('instance:sagad_publish_confirm_seconds:p99_5m',
                        lambda v: not math.isnan(v) and v > 0)
    h.check(True, 'recording rule instance:sagad_publish_confirm_seconds:p99_5m: %s' % vals)
    vals = per_instance('instance:sagad_store_usage:ratio', lambda v: 0 < v < 1)
    h.check(True, 'recording rule instance:sagad_store_usage:ratio: %s' % vals)
    vals = per_instance('sagad_store_max_bytes', lambda v: v == 1073741824)
    h.check(True, 'sagad_store_max_bytes is the default store.max_bytes (1 GiB)')

    h.log('== every metric the rules and the dashboard name is exposed')
    exposed = exposed_names(sagads)
    doc = prom.api('rules')
    rules = [r for g in doc['data']['groups'] for r in g['rules']]
    recorded = {r['name'] for r in rules if r['type'] == 'recording'}
    alerts = {r['name'] for r in rules if r['type'] == 'alerting'}
    h.check(len(recorded) >= 10 and len(alerts) >= 10,
            'prometheus loaded %d recording and %d alerting rules' % (len(recorded), len(alerts)))
    for what, exprs in (('rules', [r['query'] for r in rules]),
                        ('dashboard', dashboard_exprs(dash))):
        used, rec = set(), set()
        for e in exprs:
            m, r = names_in(e)
            used |= m
            rec |= r
        h.check(used and not used - exposed,
                'the %s name %d sagad metrics, each exposed by sagad' % (what, len(used)),
                'not exposed: %s' % sorted(used - exposed))
        h.check(not rec - recorded,
                'the %s read %d recorded series, each made by sagad-rules.yml' % (what, len(rec)),
                'not recorded: %s' % sorted(rec - recorded))
    bad = []
    for e in dashboard_exprs(dash):
        d = prom.api('query', query=as_promql(e))
        if d.get('status') != 'success':
            bad.append((e, d.get('error')))
    h.check(not bad, 'each of the dashboard\'s %d expressions is valid PromQL'
            % len(dashboard_exprs(dash)), bad)

    h.log('== alerts')
    time.sleep(4)   # past every shortened `for:`
    firing = prom.query('ALERTS{alertstate="firing"}')
    h.check(not firing, 'no alert fires while both sagad are well',
            [lb.get('alertname') for lb, _ in firing])
    broker.stop()

    def down_alerts():
        got = {lb.get('instance') for lb, _ in
               prom.query('ALERTS{alertname="SagadBrokerDown", alertstate="firing"}')}
        return got >= set(instances.values())
    h.wait_until(down_alerts, 60, 'SagadBrokerDown firing for both instances', interval=0.5)
    h.check(True, 'broker stopped: SagadBrokerDown fires for both instances')
    doc = prom.api('alerts')
    a = [x for x in doc['data']['alerts'] if x['labels'].get('alertname') == 'SagadBrokerDown'
         and x['labels'].get('instance') == instances['orders']][0]
    h.check(a['annotations'].get('runbook', '').startswith(
        'sagactl -s http://%s status' % instances['orders']),
        'its runbook names the sagactl command for that instance', a['annotations'])
    h.check(a['labels'].get('severity') == 'critical', 'SagadBrokerDown is critical')

    prom.stop()
    h.check(prom.proc.returncode is not None, 'prometheus stopped (pid %d)' % prom.proc.pid)
    svc.stop()


if __name__ == '__main__':
    missing = [p for p in ('prometheus', 'promtool') if shutil.which(p) is None]
    if missing:
        print('skipped: %s not installed (Debian package prometheus; t/lib/deps.sh installs it)'
              % ' and '.join(missing))
        sys.exit(77)
    h.run_test(main)
