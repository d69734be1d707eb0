"""A loopback stand-in for the Anthropic Messages, OpenAI Chat Completions and OpenAI Responses APIs.

The real SDKs talk to it over a socket, so tests run the same code as production:

    with StubLLMServer([{"text": "hi"}]) as stub:
        provider = make_provider("anthropic", base_url=stub.anthropic_base_url, api_key="dummy")
        # or make_provider("openai", base_url=stub.openai_base_url, api_key="dummy")
        provider.complete("system", [UserMessage(content="task")], [])
        stub.requests[0].body        # every request, in order, as parsed JSON

Routes: POST /v1/messages speaks the Anthropic wire, POST /v1/chat/completions the OpenAI wire,
POST /v1/responses the OpenAI Responses wire (request.api "anthropic", "openai", "responses").

Anthropic prompt caching is computed, not asserted: the request is read as a sequence of blocks
(tools, system, then message content), and a block with cache_control ends a prefix. A prefix an
earlier request ended with a breakpoint is in the cache; the longest one this request shares is
read, and what lies between it and this request's last breakpoint is written. Tokens are JSON
characters / 4. The Responses route checks what the real API refuses: a reasoning item without its
encrypted content (store=False), a reasoning item with nothing after it, and a function call sent
back without the reasoning item that came with it.

Script mode, StubLLMServer(script): each request takes the next step of the list. A step is a dict:

    reply   {"text": "...", "tool_calls": [{"name": "read_file", "arguments": {"path": "train.py"}}]}
            Both keys optional. Per call, "id" is optional, and "arguments" given as a str is sent
            verbatim (malformed JSON; on the Anthropic wire a non-object `input`).
            "usage": {"input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"}, with
            input_tokens counting every prompt token (default: request bytes / 4, reply chars / 4).
            "stop_reason": a wire value (default by whether there are tool calls).
            "thinking": "..." puts a signed thinking block first (Anthropic), a reasoning item with
            encrypted content first (Responses).
            "stop_reason" "max_output_tokens" on the Responses wire makes the response incomplete.
    error   {"status": 429, "retry_after": "1", "retry_after_ms": "250", "message": "...",
             "error_type": "...", "code": "...", "param": "..."}   all but "status" optional
    drop    {"drop": True}: close the connection without answering
    raw     {"raw": {...}}: send this JSON body with status 200, as it is

A request past the end of the script gets a 400 saying so (not retried, so the test fails fast).

Callback mode, StubLLMServer(handler=fn): fn(request: StubRequest) -> step, for every request.
StubRequest has .api ("anthropic" | "openai" | "responses"), .body, .headers, and .tool_results() /
.last_tool_result() read the same on both wires. A callback that raises answers 400 and is kept in
stub.errors, so the test can re-raise it.

    def next_step(request):
        result = request.last_tool_result()           # None on the first call
        return {"tool_calls": [{"name": "submit_run", "arguments": {...}}]}
"""
from __future__ import annotations

import hashlib
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
        if self.api == "responses":
            return [(i["call_id"], i["output"]) for i in self.body.get("input", [])
                    if isinstance(i, dict) and i.get("type") == "function_call_output"]
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
        self.cache: dict[str, int] = {}  # Anthropic prefix digest -> its tokens
        self.reasoning_of_call: dict[str, str] = {}  # Responses call_id -> the reasoning item issued with it
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
        return self.url + "/v1"  # the SDK appends /chat/completions or /responses

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
                "openai" if path.endswith("/chat/completions") else "responses" if path.endswith("/responses") else None
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
            if api == "responses" and (refusal := responses_refusal(stub, request.body)):
                return self._send(refusal[0], error_body(api, {"status": refusal[0], "message": refusal[1],
                                                                "param": "input"}))
            with stub._lock:
                if api == "anthropic":
                    body = anthropic_reply(step, request, anthropic_cache(stub, request.body))
                elif api == "responses":
                    body = responses_reply(step, request, stub)
                else:
                    body = openai_reply(step, request)
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
    prefix = "toolu_stub_" if api == "anthropic" else f"call_stub_{api[10:]}_" if api.startswith("responses_") \
        else "call_stub_"  # Responses call ids are unique across requests, as its reasoning links need
    return [(c.get("id") or f"{prefix}{i}", c["name"], c.get("arguments", {}))
            for i, c in enumerate(step.get("tool_calls", []))]


def _usage(step: Step, request: StubRequest) -> dict[str, int]:
    out_chars = len(step.get("text", "")) + len(json.dumps(step.get("tool_calls", [])))
    usage = {"input_tokens": request.size // 4 + 1, "output_tokens": out_chars // 4 + 1,
             "cache_read_tokens": 0, "cache_write_tokens": 0}
    return usage | step.get("usage", {})


def anthropic_cache(stub: StubLLMServer, body: dict[str, Any]) -> dict[str, int]:
    """Usage of a Messages request under prompt caching: the longest earlier prefix is read, the rest
    up to the last breakpoint written, and this request's breakpoint prefixes join the cache."""
    blocks = [("tools", t) for t in body.get("tools", [])]
    system = body.get("system") or []
    blocks += [("system", b) for b in ([{"type": "text", "text": system}] if isinstance(system, str) else system)]
    for m in body.get("messages", []):
        content = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        blocks += [(m["role"], b) for b in content]
    digest, tokens, breakpoints = hashlib.sha256(), 0, []
    for role, block in blocks:
        text = json.dumps([role, {k: v for k, v in block.items() if k != "cache_control"}], sort_keys=True)
        digest.update(text.encode())
        tokens += len(text) // 4
        if "cache_control" in block:
            breakpoints.append((digest.hexdigest(), tokens))
    read = max((n for key, n in breakpoints if key in stub.cache), default=0)
    written = breakpoints[-1][1] - read if breakpoints else 0
    stub.cache.update(breakpoints)
    return {"input_tokens": tokens, "cache_read_tokens": read, "cache_write_tokens": written}


def anthropic_reply(step: Step, request: StubRequest, cached: dict[str, int]) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if "thinking" in step:
        content.append({"type": "thinking", "thinking": step["thinking"], "signature": "stub-signature"})
    if step.get("text"):
        content.append({"type": "text", "text": step["text"]})
    calls = _calls(step, "anthropic")
    content += [{"type": "tool_use", "id": i, "name": n, "input": a} for i, n, a in calls]
    u = _usage(step, request) | cached | step.get("usage", {})
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


def responses_refusal(stub: StubLLMServer, body: dict[str, Any]) -> tuple[int, str] | None:
    """The Responses API's answer to reasoning items handled wrongly, or None when the input is sound."""
    items = [i for i in body.get("input", []) if isinstance(i, dict)]
    seen: set[str] = set()
    for n, item in enumerate(items):
        if item.get("type") == "reasoning":
            if not item.get("encrypted_content") and body.get("store") is False:
                return 404, (f"Item with id '{item.get('id')}' not found. Items are not persisted when `store` is "
                             "set to false. Try again with `store` set to true, or remove this item from your input.")
            if n == len(items) - 1:
                return 400, (f"Item '{item.get('id')}' of type 'reasoning' was provided without its required "
                             "following item.")
            seen.add(item.get("id"))
        elif item.get("type") == "function_call":
            needed = stub.reasoning_of_call.get(item.get("call_id"))
            if needed and needed not in seen:
                return 400, (f"Item '{item.get('id')}' of type 'function_call' was provided without its required "
                             f"'reasoning' item: '{needed}'.")
    return None


def responses_reply(step: Step, request: StubRequest, stub: StubLLMServer) -> dict[str, Any]:
    n = len(stub.requests)
    output: list[dict[str, Any]] = []
    if "thinking" in step:
        output.append({"id": f"rs_stub_{n}", "type": "reasoning", "encrypted_content": f"gAAA-stub-{n}",
                       "summary": [{"type": "summary_text", "text": step["thinking"]}]})
    if step.get("text"):
        output.append({"id": f"msg_stub_{n}", "type": "message", "role": "assistant", "status": "completed",
                       "content": [{"type": "output_text", "text": step["text"], "annotations": []}]})
    for i, name, arguments in _calls(step, f"responses_{n}"):
        output.append({"id": f"fc_stub_{n}_{i}", "type": "function_call", "call_id": i, "name": name,
                       "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                       "status": "completed"})
        if "thinking" in step:
            stub.reasoning_of_call[i] = f"rs_stub_{n}"
    u = _usage(step, request)
    incomplete = step.get("stop_reason") == "max_output_tokens"
    return {"id": f"resp_stub_{n}", "object": "response", "created_at": 0, "model": request.body.get("model"),
            "status": "incomplete" if incomplete else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None, "error": None,
            "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": {"input_tokens": u["input_tokens"], "output_tokens": u["output_tokens"],
                      "total_tokens": u["input_tokens"] + u["output_tokens"],
                      "input_tokens_details": {"cached_tokens": u["cache_read_tokens"],
                                               "cache_write_tokens": u["cache_write_tokens"]},
                      "output_tokens_details": {"reasoning_tokens": 0}}}
