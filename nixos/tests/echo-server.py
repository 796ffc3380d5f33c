"""The VM tests' HTTP endpoint: records every request as one JSON line, answers 200
(or the status named by a /status/NNN path)."""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(sys.argv[1])
RECORD = sys.argv[2]


class Recorder(BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length).decode("utf-8", "replace")
        with open(RECORD, "a", encoding="utf-8") as out:
            out.write(json.dumps({"path": self.path, "headers": dict(self.headers), "body": body}) + "\n")
        parts = self.path.strip("/").split("/")
        status = int(parts[1]) if len(parts) > 1 and parts[0] == "status" and parts[1].isdigit() else 200
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("0.0.0.0", PORT), Recorder).serve_forever()
