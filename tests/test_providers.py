"""Anthropic and OpenAI providers through the real SDKs, against the loopback stub server."""
import time

import pytest

from agent.providers import DEFAULT_MODELS, make_provider
from agent.providers.base import (AssistantMessage, Conversation, NativeBlocks, ProviderError, RetryBudgetExhausted,
                                  ToolCall, ToolResult, ToolSpec, UserMessage)
from stub_llm_server import StubLLMServer

KINDS = ["anthropic", "openai"]
KEY_ENV = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}
TOOLS = [
    ToolSpec(name="read_file", description="Read a file.",
             parameters={"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}),
    ToolSpec(name="submit_run", description="Train the working train.py.",
             parameters={"type": "object", "properties": {"description": {"type": "string"}},
                         "required": ["description"]}),
]
TASK = [UserMessage(content="Lower val_bpb of train.py.")]


@pytest.fixture(autouse=True)
def no_provider_env(monkeypatch):
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "ANTHROPIC_CUSTOM_HEADERS",
                 "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_CUSTOM_HEADERS"):
        monkeypatch.delenv(name, raising=False)


class Retries(list):
    """An on_retry callback that remembers its calls."""

    def __call__(self, attempt, delay_s, error_text):
        self.append((attempt, delay_s, error_text))


def provider(kind, stub, **kw):
    kw = {"retry_budget_s": 2.0, "retry_base_delay_s": 0.01, "retry_max_delay_s": 0.2, **kw}
    return make_provider(kind, None, stub.base_url(kind), api_key="dummy-key", **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_tool_calls_and_usage(kind):
    step = {"text": "Reading the baseline first.",
            "tool_calls": [{"name": "read_file", "arguments": {"path": "train.py"}},
                           {"name": "read_file", "arguments": {"path": "prepare.py"}}],
            "usage": {"input_tokens": 5200, "output_tokens": 90, "cache_read_tokens": 4000,
                      "cache_write_tokens": 1100}}
    with StubLLMServer([step]) as stub:
        reply = provider(kind, stub).complete("You are a researcher.", TASK, TOOLS)
        sent = stub.requests[0].body
    assert reply.text == "Reading the baseline first."
    assert [(c.name, c.arguments, c.error) for c in reply.tool_calls] == [
        ("read_file", {"path": "train.py"}, None), ("read_file", {"path": "prepare.py"}, None)]
    assert len({c.id for c in reply.tool_calls}) == 2
    assert (reply.input_tokens, reply.output_tokens, reply.cache_read_tokens, reply.cache_write_tokens) == \
        (5200, 90, 4000, 1100)
    assert reply.model == DEFAULT_MODELS[kind]
    assert reply.stop_reason in ("tool_use", "tool_calls")
    assert reply.request_chars > len("You are a researcher.") and reply.duration_ms >= 0
    names = [t["name"] for t in sent["tools"]] if kind == "anthropic" else \
        [t["function"]["name"] for t in sent["tools"]]
    assert names == ["read_file", "submit_run"]
    assert not {"temperature", "top_p", "top_k"} & sent.keys()


@pytest.mark.parametrize("kind", KINDS)
def test_conversation_round_trip_on_the_wire(kind):
    script = [{"text": "Two reads.", "tool_calls": [{"name": "read_file", "arguments": {"path": "train.py"}},
                                                     {"name": "read_file", "arguments": {"path": "nope.py"}}]},
              {"text": "Done reading."}]
    with StubLLMServer(script) as stub:
        p = provider(kind, stub)
        first = p.complete("sys", TASK, TOOLS)
        a, b = first.tool_calls
        conversation = TASK + [first.to_message(),
                               ToolResult(tool_call_id=a.id, name=a.name, content="import torch"),
                               ToolResult(tool_call_id=b.id, name=b.name, content="no such file", is_error=True)]
        second = p.complete("sys", conversation, TOOLS)
        sent = stub.requests[1].body["messages"]
    assert second.text == "Done reading." and second.tool_calls == []
    if kind == "anthropic":
        assert [m["role"] for m in sent] == ["user", "assistant", "user"]
        assert sent[1]["content"] == [
            {"type": "text", "text": "Two reads."},
            {"type": "tool_use", "id": a.id, "name": "read_file", "input": {"path": "train.py"}},
            {"type": "tool_use", "id": b.id, "name": "read_file", "input": {"path": "nope.py"}}]
        # both results folded into one user turn, the error flag passed through
        assert sent[2]["content"] == [
            {"type": "tool_result", "tool_use_id": a.id, "content": "import torch", "is_error": False},
            {"type": "tool_result", "tool_use_id": b.id, "content": "no such file", "is_error": True}]
    else:
        assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool", "tool"]
        assert sent[2]["content"] == "Two reads."
        assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in sent[2]["tool_calls"]] == [
            (a.id, "read_file", '{"path": "train.py"}'), (b.id, "read_file", '{"path": "nope.py"}')]
        assert sent[3:] == [{"role": "tool", "tool_call_id": a.id, "content": "import torch"},
                            {"role": "tool", "tool_call_id": b.id, "content": "no such file"}]


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_tool_arguments_are_reported_not_raised(kind):
    step = {"tool_calls": [{"name": "submit_run", "arguments": '{"description": "wider MLP"'},
                           {"name": "read_file", "arguments": {"path": "train.py"}}]}
    with StubLLMServer([step]) as stub:
        reply = provider(kind, stub).complete("sys", TASK, TOOLS)
    bad, good = reply.tool_calls
    assert bad.arguments is None and bad.error and bad.raw_arguments == '{"description": "wider MLP"'
    assert good.arguments == {"path": "train.py"} and good.error is None


@pytest.mark.parametrize("kind, header, wait", [("anthropic", {"retry_after": "1"}, 1.0),
                                                ("openai", {"retry_after_ms": "250"}, 0.25)])
def test_rate_limit_waits_as_told_then_succeeds(kind, header, wait):
    retries = Retries()
    with StubLLMServer([{"status": 429, **header}, {"text": "ok"}]) as stub:
        started = time.monotonic()
        reply = provider(kind, stub, on_retry=retries).complete("sys", TASK, TOOLS)
    assert reply.text == "ok"
    assert [(n, d) for n, d, _ in retries] == [(1, wait)] and "429" in retries[0][2]
    assert time.monotonic() - started >= wait and reply.duration_ms >= wait * 1000


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("failure", [{"status": 500}, {"status": 529}, {"drop": True}])
def test_server_error_or_lost_connection_is_retried(kind, failure):
    retries = Retries()
    with StubLLMServer([failure, {"text": "ok"}]) as stub:
        reply = provider(kind, stub, on_retry=retries).complete("sys", TASK, TOOLS)
    assert reply.text == "ok" and len(retries) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_persistent_server_error_exhausts_the_budget_in_time(kind):
    retries = Retries()
    with StubLLMServer(handler=lambda request: {"status": 503}) as stub:
        started = time.monotonic()
        with pytest.raises(RetryBudgetExhausted, match="503") as caught:
            provider(kind, stub, retry_budget_s=0.6, on_retry=retries).complete("sys", TASK, TOOLS)
        elapsed = time.monotonic() - started
    assert caught.value.kind == "retry_budget"
    assert elapsed < 1.0 and len(retries) >= 3 and sum(d for _, d, _ in retries) <= 0.6
    assert len(stub.requests) == len(retries) + 1


@pytest.mark.parametrize("kind", KINDS)
def test_rejected_key_names_the_variable_and_is_not_retried(kind):
    retries = Retries()
    with StubLLMServer([{"status": 401, "message": "invalid x-api-key"}]) as stub:
        with pytest.raises(ProviderError) as caught:
            provider(kind, stub, on_retry=retries).complete("sys", TASK, TOOLS)
    assert not isinstance(caught.value, RetryBudgetExhausted)
    assert f"{KEY_ENV[kind]} was rejected (401): check the key" in str(caught.value)
    assert caught.value.kind == "auth" and len(stub.requests) == 1 and retries == []


@pytest.mark.parametrize("kind, step", [
    ("anthropic", {"status": 400, "message": "prompt is too long: 1050000 tokens > 1000000 maximum"}),
    ("openai", {"status": 400, "code": "context_length_exceeded", "message": "Input exceeds the context window."})])
def test_context_too_long_is_named(kind, step):
    with StubLLMServer([step]) as stub:
        with pytest.raises(ProviderError, match="too long for model") as caught:
            provider(kind, stub).complete("sys", TASK, TOOLS)
    assert caught.value.kind == "context_too_long"


@pytest.mark.parametrize("kind, step", [
    ("anthropic", {"status": 429, "code": "enforced_spend_limit_reached", "message": "spend limit reached"}),
    ("openai", {"status": 429, "error_type": "insufficient_quota", "message": "You exceeded your current quota"})])
def test_quota_is_not_waited_out(kind, step):
    with StubLLMServer([step]) as stub:
        with pytest.raises(ProviderError) as caught:
            provider(kind, stub).complete("sys", TASK, TOOLS)
    assert caught.value.kind == "quota" and len(stub.requests) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_model_names_the_model(kind):
    with StubLLMServer([{"status": 404, "message": "model: nope"}]) as stub:
        with pytest.raises(ProviderError, match="model 'nope-1' was not found"):
            make_provider(kind, "nope-1", stub.base_url(kind), "dummy-key").complete("sys", TASK, TOOLS)


@pytest.mark.parametrize("kind", KINDS)
def test_very_long_reply_is_returned_intact(kind):
    text = "".join(f"line {i}: ünïcode ✓\n" for i in range(10_000))
    assert len(text.encode()) > 200_000
    with StubLLMServer([{"text": text}]) as stub:
        reply = provider(kind, stub).complete("sys", TASK, TOOLS)
    assert reply.text == text


def test_anthropic_caches_tools_system_and_task():
    with StubLLMServer([{"text": "ok"}]) as stub:
        history = TASK + [AssistantMessage(text="Reading."), UserMessage(content="Go on.")]
        provider("anthropic", stub).complete("You are a researcher.", history, TOOLS)
        sent = stub.requests[0].body
    ephemeral = {"type": "ephemeral"}
    assert sent["system"] == [{"type": "text", "text": "You are a researcher.", "cache_control": ephemeral}]
    assert [t.get("cache_control") for t in sent["tools"]] == [None, ephemeral]
    assert sent["messages"][0]["content"] == [
        {"type": "text", "text": "Lower val_bpb of train.py.", "cache_control": ephemeral}]
    assert "cache_control" not in sent["messages"][2]["content"][0]
    assert sent["max_tokens"] == 8192


def test_anthropic_thinking_blocks_go_back_verbatim_to_the_same_model_only():
    step = {"thinking": "Check the learning rate first.",
            "tool_calls": [{"name": "read_file", "arguments": {"path": "train.py"}}]}
    with StubLLMServer([step, {"text": "ok"}, {"text": "ok"}]) as stub:
        p = provider("anthropic", stub)
        first = p.complete("sys", TASK, TOOLS)
        call = first.tool_calls[0]
        conversation = TASK + [first.to_message(), ToolResult(tool_call_id=call.id, name=call.name, content="x")]
        p.complete("sys", conversation, TOOLS)
        other = make_provider("anthropic", "claude-haiku-5-5", stub.anthropic_base_url, "dummy-key")
        other.complete("sys", conversation, TOOLS)
        same_model, other_model = (r.body["messages"][1]["content"] for r in stub.requests[1:])
    assert first.text == "" and first.native is not None
    assert same_model[0] == {"type": "thinking", "thinking": "Check the learning rate first.",
                             "signature": "stub-signature"}
    assert [b["type"] for b in other_model] == ["tool_use"]


def test_openai_request_shape_and_empty_reply():
    with StubLLMServer([{"raw": {"id": "x", "object": "chat.completion", "created": 0, "model": "local",
                                 "choices": []}}]) as stub:
        reply = provider("openai", stub).complete("sys", TASK, TOOLS)
        sent = stub.requests[0].body
    assert (reply.text, reply.tool_calls, reply.input_tokens, reply.stop_reason) == ("", [], 0, None)
    assert sent["max_completion_tokens"] == 8192 and "max_tokens" not in sent and "reasoning_effort" not in sent
    assert sent["tools"][0] == {"type": "function", "function": {
        "name": "read_file", "description": "Read a file.", "parameters": TOOLS[0].parameters}}


def test_openai_falls_back_to_no_reasoning_when_tools_need_it():
    refusal = {"status": 400, "param": "reasoning_effort", "message": "Function tools with reasoning_effort are "
               "not supported for gpt-6-sol in /v1/chat/completions. To use function tools, use /v1/responses "
               "or set reasoning_effort to 'none'."}
    retries = Retries()
    with StubLLMServer([refusal, {"text": "ok"}, {"text": "again"}]) as stub:
        p = provider("openai", stub, on_retry=retries)
        assert p.complete("sys", TASK, TOOLS).text == "ok"
        assert p.complete("sys", TASK, TOOLS).text == "again"
        efforts = [r.body.get("reasoning_effort") for r in stub.requests]
    assert efforts == [None, "none", "none"] and len(retries) == 1 and "reasoning_effort='none'" in retries[0][2]


def test_callback_mode_drives_a_session_on_both_wires():
    def next_step(request):
        result = request.last_tool_result()
        n = 0 if result is None else int(result) + 1
        if n == 3:
            return {"text": "done"}
        return {"tool_calls": [{"name": "submit_run", "arguments": {"description": str(n)}}]}

    for kind in KINDS:
        with StubLLMServer(handler=next_step) as stub:
            p = provider(kind, stub)
            conversation = list(TASK)
            while (reply := p.complete("sys", conversation, TOOLS)).tool_calls:
                call = reply.tool_calls[0]
                conversation += [reply.to_message(), ToolResult(tool_call_id=call.id, name=call.name,
                                                                content=call.arguments["description"])]
        assert reply.text == "done" and len(stub.requests) == 4 and stub.errors == []


@pytest.mark.parametrize("kind", KINDS)
def test_missing_key_fails_before_any_request(kind):
    with pytest.raises(ProviderError, match=f"set {KEY_ENV[kind]} or choose --agent search") as caught:
        make_provider(kind, None, None)
    assert caught.value.kind == "config"


def test_local_openai_server_needs_no_key_and_env_base_url_is_honoured(monkeypatch):
    with StubLLMServer([{"text": "from the local server"}]) as stub:
        monkeypatch.setenv("OPENAI_BASE_URL", stub.openai_base_url)
        reply = make_provider("openai", "qwen3-coder", None).complete("sys", TASK, TOOLS)
        auth = stub.requests[0].headers.get("authorization") or stub.requests[0].headers.get("Authorization")
    assert reply.text == "from the local server" and auth.startswith("Bearer ")


def test_unknown_provider_kind():
    with pytest.raises(ProviderError, match="unknown provider 'gemini'"):
        make_provider("gemini")


def test_conversation_serialises_to_json_and_back():
    conversation = [
        UserMessage(content="task"),
        AssistantMessage(text="thinking aloud", tool_calls=[
            ToolCall(id="c1", name="read_file", arguments={"path": "train.py"}, raw_arguments='{"path": "train.py"}'),
            ToolCall(id="c2", name="submit_run", arguments=None, raw_arguments="{oops", error="not JSON")],
            native=NativeBlocks(provider="anthropic", model="m", blocks=[{"type": "thinking", "thinking": "",
                                                                          "signature": "s"}])),
        ToolResult(tool_call_id="c1", name="read_file", content="import torch"),
        ToolResult(tool_call_id="c2", name="submit_run", content="could not read", is_error=True),
    ]
    data = Conversation.dump_json(conversation)
    assert Conversation.validate_json(data) == conversation
    assert [m["role"] for m in Conversation.dump_python(conversation)] == ["user", "assistant", "tool", "tool"]
