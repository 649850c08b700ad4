"""An OpenTelemetry collector for the tests and the demo: an OTLP/HTTP
receiver on a free loopback port that decodes what it gets per the OTLP
specification (JSON encoding: resourceSpans with the resource's
attributes, scopeSpans, spans with hex trace and span ids and times as
decimal strings of nanoseconds) and keeps every span."""

import http.server
import json
import threading


class Collector:
    """OTLP/HTTP JSON receiver: POST /v1/traces. Each span as a dict with
    the process's service.name added; answers `status` (200 by default)."""

    def __init__(self):
        self.spans, self.requests, self.status = [], 0, 200
        self.lock = threading.Lock()
        col = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
                ok = (self.path == '/v1/traces' and
                      self.headers.get('Content-Type') == 'application/json')
                if ok and col.status == 200:
                    col.take(json.loads(body))
                st = col.status if ok else 400
                self.send_response(st)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', '2')
                self.end_headers()
                self.wfile.write(b'{}')

        self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take(self, doc):
        with self.lock:
            self.requests += 1
            for rs in doc['resourceSpans']:
                attrs = {a['key']: a['value'] for a in rs['resource']['attributes']}
                service = attrs['service.name']['stringValue']
                for ss in rs['scopeSpans']:
                    assert ss['scope']['name'] == 'sagad'
                    for s in ss['spans']:
                        span = dict(s, service=service,
                                    attrs={a['key']: list(a['value'].values())[0]
                                           for a in s.get('attributes', [])})
                        span['start'] = int(s['startTimeUnixNano']) / 1e9
                        span['end'] = int(s['endTimeUnixNano']) / 1e9
                        self.spans.append(span)

    def of_trace(self, tid):
        with self.lock:
            return [s for s in self.spans if s['traceId'] == tid]

    def stop(self):
        self.server.shutdown()

    def trees(self):
        """{trace id: [spans]}."""
        out = {}
        with self.lock:
            for s in self.spans:
                out.setdefault(s['traceId'], []).append(s)
        return out
