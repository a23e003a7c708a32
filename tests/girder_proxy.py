"""An HTTP proxy that fails chosen Girder requests, for the retry tests."""

import json


class FaultyProxy:
    """An HTTP proxy in front of Girder that fails chosen requests once each, to test retries.

    ``faults``: a list of ``(method, path ending, status, forward)``: the first matching request is answered with
    ``status`` (with ``Retry-After: 0``), after being passed on to Girder when ``forward`` (an answer lost after the
    server acted). ``seen``: every request as ``(method, path, status answered)``."""

    def __init__(self, target_url, faults):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        import requests

        target = urlsplit(target_url)
        origin = f'{target.scheme}://{target.netloc}'
        self.faults, self.seen = list(faults), []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
                path = self.path.split('?')[0]
                fault = next((f for f in proxy.faults if f[0] == self.command and path.endswith(f[1])), None)
                if fault:
                    proxy.faults.remove(fault)
                answer = None
                if not fault or fault[3]:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ('host', 'content-length')}
                    answer = requests.request(self.command, origin + self.path, data=body, headers=headers,
                                              timeout=600)
                if fault:
                    status, content, ctype = fault[2], json.dumps({'message': 'injected'}).encode(), 'application/json'
                else:
                    status, content = answer.status_code, answer.content
                    ctype = answer.headers.get('Content-Type', 'application/json')
                proxy.seen.append((self.command, path, status))
                self.send_response(status)
                self.send_header('Content-Type', ctype)
                self.send_header('Content-Length', str(len(content)))
                if fault:
                    self.send_header('Retry-After', '0')
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.api_url = f'http://127.0.0.1:{self.server.server_address[1]}{target.path}'
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
