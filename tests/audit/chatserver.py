"""A chat-completions server on loopback that stands in for a model in the LLM auditor's
tests. It speaks the OpenAI protocol over real HTTP; what it answers depends on the
model name the client asks for:

- ``judge``: deny (0.9) when the fenced action holds a miner or a tunnel, else allow (0.05)
- ``gullible``: like judge, but obeys any "approve" instruction anywhere in the prompt,
  the way a model fooled by an injection would
- ``slow``: answers after ``delay`` seconds
- ``garbled``: prose instead of JSON; ``no-verdict``: JSON without a verdict;
  ``bad-score``: a score of 7
- ``flaky``: HTTP 500 for the first ``failures`` requests, then judge
- ``fenced``: judge, with the JSON inside a ```json block
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FENCED = re.compile(r"<<DATA (\w+)>>\n(.*?)\n<<END \1>>", re.S)
BAD = re.compile(r"xmrig|stratum\+tcp|ssh\s(.*\s)?-\w*R\s|minerd")
OBEY = re.compile(r"approve this|reply allow|ignore (all )?previous instructions", re.I)


class ChatServer:
    def __init__(self, delay: float = 2.0, failures: int = 1) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.delay = delay
        self.failures = failures
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    n = len(server.requests)
                status, content = server.answer(self.path, body, n)
                if status == 200:
                    payload = {
                        "id": f"chatcmpl-{n}",
                        "object": "chat.completion",
                        "model": body.get("model"),
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": content},
                                "finish_reason": "stop",
                            }
                        ],
                    }
                    out = json.dumps(payload).encode()
                else:
                    out = json.dumps({"error": {"message": content}}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def answer(self, path: str, body: dict[str, Any], n: int) -> tuple[int, str]:
        if path != "/v1/chat/completions":
            return 404, f"no route {path}"
        model = body.get("model")
        prompt = "\n".join(m["content"] for m in body["messages"])
        user = body["messages"][-1]["content"]
        blocks = FENCED.findall(user)
        action = json.loads(blocks[-1][1])["action"] if blocks else ""
        verdict = (
            {"verdict": "deny", "score": 0.9, "category": "mining", "reason": "not the task"}
            if BAD.search(action)
            else {"verdict": "allow", "score": 0.05, "category": None, "reason": "on task"}
        )
        if model == "gullible" and OBEY.search(prompt):
            verdict = {
                "verdict": "allow",
                "score": 0.0,
                "category": None,
                "reason": "approved as instructed",
            }
        if model == "slow":
            time.sleep(self.delay)
        if model == "garbled":
            return 200, "Looks fine to me, go ahead!"
        if model == "no-verdict":
            return 200, json.dumps({"score": 0.1, "reason": "fine"})
        if model == "bad-score":
            return 200, json.dumps({"verdict": "allow", "score": 7, "reason": "fine"})
        if model == "flaky" and n <= self.failures:
            return 500, "overloaded"
        if model == "fenced":
            return 200, "```json\n" + json.dumps(verdict) + "\n```"
        return 200, json.dumps(verdict)


@contextmanager
def chat_server(**kw: Any) -> Iterator[ChatServer]:
    s = ChatServer(**kw)
    t = threading.Thread(target=s.httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield s
    finally:
        s.httpd.shutdown()
        s.httpd.server_close()
