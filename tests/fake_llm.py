"""A fake OpenAI-compatible chat-completions server on loopback, for the reply tests.

By default it answers with the answer of the first knowledge-base entry in the system prompt
(what a grounded model would say), or "I don't know" when the prompt lists none. Tests switch
it to fail, hang, talk garbage or ramble, and read back every request it got.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_FIRST_ENTRY = re.compile(r"\n\[1\] [^\n]*\n(.*?)(?:\n\[2\] |\Z)", re.S)


class FakeLLM:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.mode = "grounded"  # grounded | fail | slow | garbage | long
        self.delay = 0.0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with fake._lock:
                    fake.requests.append({"body": body, "authorization": self.headers.get("Authorization")})
                    mode, delay = fake.mode, fake.delay
                if mode == "slow":
                    time.sleep(delay)
                if mode == "fail":
                    self._send(503, {"error": {"message": "overloaded", "type": "server_error"}})
                elif mode == "garbage":
                    self._send(200, {"id": "x", "object": "chat.completion", "choices": []})
                elif mode == "long":
                    self._send(200, _completion("word " * 400))
                else:
                    system = body["messages"][0]["content"]
                    found = _FIRST_ENTRY.search(system)
                    self._send(200, _completion(found.group(1).strip() if found else "I don't know."))

            def _send(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1/chat/completions"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _completion(text: str) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
