"""A loopback stand-in for the Anthropic Messages and OpenAI Chat Completions APIs.

The real SDKs talk to it over a socket, so tests run the same code as production:

    with StubLLMServer([{"text": "hi"}]) as stub:
        provider = make_provider("anthropic", base_url=stub.anthropic_base_url, api_key="dummy")
        # or make_provider("openai", base_url=stub.openai_base_url, api_key="dummy")
        provider.complete("system", [UserMessage(content="task")], [])
        stub.requests[0].body        # every request, in order, as parsed JSON

Routes: POST /v1/messages speaks the Anthropic wire, POST /v1/chat/completions the OpenAI wire.

Script mode, StubLLMServer(script): each request takes the next step of the list. A step is a dict:

    reply   {"text": "...", "tool_calls": [{"name": "read_file", "arguments": {"path": "train.py"}}]}
            Both keys optional. Per call, "id" is optional, and "arguments" given as a str is sent
            verbatim (malformed JSON; on the Anthropic wire a non-object `input`).
            "usage": {"input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"}, with
            input_tokens counting every prompt token (default: request bytes / 4, reply chars / 4).
            "stop_reason": a wire value (default by whether there are tool calls).
            "thinking": "..." puts a signed thinking block first (Anthropic wire only).
    error   {"status": 429, "retry_after": "1", "retry_after_ms": "250", "message": "...",
             "error_type": "...", "code": "...", "param": "..."}   all but "status" optional
    drop    {"drop": True}: close the connection without answering
    raw     {"raw": {...}}: send this JSON body with status 200, as it is

A request past the end of the script gets a 400 saying so (not retried, so the test fails fast).

Callback mode, StubLLMServer(handler=fn): fn(request: StubRequest) -> step, for every request.
StubRequest has .api ("anthropic" | "openai"), .body, .headers, and .tool_results() /
.last_tool_result() read the same on both wires. A callback that raises answers 400 and is kept in
stub.errors, so the test can re-raise it.

    def next_step(request):
        result = request.last_tool_result()           # None on the first call
        return {"tool_calls": [{"name": "submit_run", "arguments": {...}}]}
"""
from __future__ import annotations

import json
import threading
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

Step = dict[str, Any]

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}


@dataclass
class StubRequest:
    api: str
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    size: int = 0

    def tool_results(self) -> list[tuple[str, str]]:
        """(tool_call_id, content) of every tool result in the conversation, in order."""
        out: list[tuple[str, str]] = []
        for m in self.body.get("messages", []):
            if self.api == "openai" and m.get("role") == "tool":
                out.append((m["tool_call_id"], m["content"]))
            elif self.api == "anthropic" and isinstance(m.get("content"), list):
                out += [(b["tool_use_id"], b["content"]) for b in m["content"] if b.get("type") == "tool_result"]
        return out

    def last_tool_result(self) -> str | None:
        results = self.tool_results()
        return results[-1][1] if results else None


class StubLLMServer:
    def __init__(self, script: list[Step] | None = None, handler: Callable[[StubRequest], Step] | None = None):
        if (script is None) == (handler is None):
            raise ValueError("give either a script or a handler")
        self.script = list(script or [])
        self.handler = handler
        self.requests: list[StubRequest] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._httpd.daemon_threads = True
        # A short poll interval, so leaving the `with` block takes milliseconds, not half a second.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.01,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def anthropic_base_url(self) -> str:
        return self.url  # the SDK appends /v1/messages

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"  # the SDK appends /chat/completions

    def base_url(self, api: str) -> str:
        return self.anthropic_base_url if api == "anthropic" else self.openai_base_url

    def __enter__(self) -> StubLLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def next_step(self, request: StubRequest) -> Step:
        with self._lock:
            self.requests.append(request)
            if self.handler is None:
                n = len(self.requests)
                if n > len(self.script):
                    return {"status": 400, "message": f"stub script exhausted: request {n}, "
                                                      f"script has {len(self.script)} steps"}
                return self.script[n - 1]
        try:
            return self.handler(request)
        except Exception as exc:  # noqa: BLE001 - reported to the test through self.errors
            self.errors.append(exc)
            return {"status": 400, "message": "stub handler raised: " + traceback.format_exc(limit=3)}


def _handler_class(stub: StubLLMServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs' connection pools expect

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            path = self.path.split("?")[0].rstrip("/")
            api = "anthropic" if path.endswith("/v1/messages") else \
                "openai" if path.endswith("/chat/completions") else None
            if api is None:
                return self._send(404, {"error": {"type": "not_found_error", "message": f"no route {path}"}})
            request = StubRequest(api, path, json.loads(raw), dict(self.headers), len(raw))
            step = stub.next_step(request)
            if step.get("drop"):
                self.close_connection = True  # the socket closes with nothing written
                return
            if "raw" in step:
                return self._send(200, step["raw"])
            if "status" in step:
                headers = {name: str(step[key]) for key, name in
                           (("retry_after", "retry-after"), ("retry_after_ms", "retry-after-ms")) if key in step}
                return self._send(step["status"], error_body(api, step), headers)
            body = anthropic_reply(step, request) if api == "anthropic" else openai_reply(step, request)
            self._send(200, body)

        def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

    return Handler


def _calls(step: Step, api: str) -> list[tuple[str, str, Any]]:
    """(id, name, arguments) of the step's tool calls, with ids in the wire's style."""
    prefix = "toolu_stub_" if api == "anthropic" else "call_stub_"
    return [(c.get("id") or f"{prefix}{i}", c["name"], c.get("arguments", {}))
            for i, c in enumerate(step.get("tool_calls", []))]


def _usage(step: Step, request: StubRequest) -> dict[str, int]:
    out_chars = len(step.get("text", "")) + len(json.dumps(step.get("tool_calls", [])))
    usage = {"input_tokens": request.size // 4 + 1, "output_tokens": out_chars // 4 + 1,
             "cache_read_tokens": 0, "cache_write_tokens": 0}
    return usage | step.get("usage", {})


def anthropic_reply(step: Step, request: StubRequest) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if "thinking" in step:
        content.append({"type": "thinking", "thinking": step["thinking"], "signature": "stub-signature"})
    if step.get("text"):
        content.append({"type": "text", "text": step["text"]})
    calls = _calls(step, "anthropic")
    content += [{"type": "tool_use", "id": i, "name": n, "input": a} for i, n, a in calls]
    u = _usage(step, request)
    return {"id": f"msg_stub_{len(request.body.get('messages', []))}", "type": "message", "role": "assistant",
            "model": request.body.get("model"), "content": content,
            "stop_reason": step.get("stop_reason", "tool_use" if calls else "end_turn"), "stop_sequence": None,
            "usage": {"input_tokens": u["input_tokens"] - u["cache_read_tokens"] - u["cache_write_tokens"],
                      "output_tokens": u["output_tokens"], "cache_read_input_tokens": u["cache_read_tokens"],
                      "cache_creation_input_tokens": u["cache_write_tokens"]}}


def openai_reply(step: Step, request: StubRequest) -> dict[str, Any]:
    calls = _calls(step, "openai")
    message: dict[str, Any] = {"role": "assistant", "content": step.get("text") or None}
    if calls:
        message["tool_calls"] = [{"id": i, "type": "function", "function": {
            "name": n, "arguments": a if isinstance(a, str) else json.dumps(a)}} for i, n, a in calls]
    u = _usage(step, request)
    return {"id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": request.body.get("model"),
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": step.get("stop_reason", "tool_calls" if calls else "stop")}],
            "usage": {"prompt_tokens": u["input_tokens"], "completion_tokens": u["output_tokens"],
                      "total_tokens": u["input_tokens"] + u["output_tokens"],
                      "prompt_tokens_details": {"cached_tokens": u["cache_read_tokens"],
                                                "cache_write_tokens": u["cache_write_tokens"]}}}


def error_body(api: str, step: Step) -> dict[str, Any]:
    status = step["status"]
    kind = step.get("error_type") or ERROR_TYPES.get(status, "api_error")
    message = step.get("message", f"stub error {status}")
    if api == "anthropic":
        error: dict[str, Any] = {"type": kind, "message": message}
        if step.get("code"):
            error["details"] = {"error_code": step["code"]}
        return {"type": "error", "error": error, "request_id": "req_stub"}
    return {"error": {"message": message, "type": kind, "param": step.get("param"), "code": step.get("code")}}
