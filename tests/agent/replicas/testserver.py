"""A tiny inference-server stand-in for the supervisor tests (stdlib only, starts in ~50 ms).

Serves /health and /metrics (vLLM names). Its behaviour comes from flags and from files in
``--control`` that a test writes while it runs:
  running    requests_running to report (drain tests)
  unhealthy  a pid: /health answers 503 while it is this process's pid (liveness tests)
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control", default="")
    parser.add_argument("--model", default="")
    parser.add_argument("--exit-at-start", type=int, default=None)
    parser.add_argument("--crash-after", type=float, default=None)
    parser.add_argument("--start-delay", type=float, default=0.0)
    parser.add_argument("--ignore-sigterm", action="store_true")
    # Start a helper in a session of its own: it leaves the replica's process group.
    parser.add_argument("--spawn-escapee", action="store_true")
    args = parser.parse_args()
    control = Path(args.control) if args.control else None
    print(f"testserver pid {os.getpid()} on {args.host}:{args.port} model={args.model}",
          flush=True)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.spawn_escapee:
        escapee = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"],
                                   start_new_session=True)
        print(f"escapee pid {escapee.pid}", flush=True)
    if args.exit_at_start is not None:
        print("fatal: cannot load model", flush=True)
        sys.exit(args.exit_at_start)
    time.sleep(args.start_delay)

    def read(name: str, default: str) -> str:
        if control is None:
            return default
        try:
            return (control / name).read_text().strip()
        except FileNotFoundError:
            return default

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                ok = read("unhealthy", "") != str(os.getpid())
                self._send(200 if ok else 503, b"ok" if ok else b"unhealthy")
            elif self.path == "/metrics":
                running = read("running", "0")
                body = ("# HELP vllm:num_requests_running Requests running.\n"
                        "# TYPE vllm:num_requests_running gauge\n"
                        f'vllm:num_requests_running{{model_name="m"}} {running}\n'
                        "# HELP vllm:num_requests_waiting Requests waiting.\n"
                        "# TYPE vllm:num_requests_waiting gauge\n"
                        'vllm:num_requests_waiting{model_name="m"} 0\n')
                self._send(200, body.encode())
            else:
                self._send(404, b"not found")

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *a: object) -> None:
            pass

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    if args.crash_after is not None:
        def crash() -> None:
            time.sleep(args.crash_after)
            print("boom: segfault in the fake engine", flush=True)
            os._exit(3)
        threading.Thread(target=crash, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
