"""Anthropic and OpenAI providers through the real SDKs, against the loopback stub server."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rich.console import Console

from agent.context import Context
from agent.model_calls import preflight
from agent.prices import PRICES, Price, UnknownPrice, known_price, price_for
from agent.providers import DEFAULT_MODELS, make_provider, openai_api
from agent.providers.base import (AssistantMessage, Conversation, NativeBlocks, ProviderError, RetryBudgetExhausted,
                                  ToolCall, ToolResult, ToolSpec, UserMessage)
from agent.providers.options import ModelOptions
from stub_llm_server import StubLLMServer

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["anthropic", "openai", "responses"]  # "openai" is Chat Completions, "responses" the Responses API
KEY_ENV = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY", "responses": "OPENAI_API_KEY"}
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
    """An on_retry callback that remembers its calls as (attempt, delay_s, error_text)."""

    def __call__(self, retry):
        assert retry.of >= retry.attempt
        self.append((retry.attempt, retry.delay_s, retry.error))


def provider(kind, stub, model=None, options=None, **kw):
    kw = {"retry_budget_s": 2.0, "retry_base_delay_s": 0.01, "retry_max_delay_s": 0.2, **kw}
    if kind == "responses":
        options = (options or ModelOptions()).model_copy(update={"openai_api": "responses"})
    wire = "anthropic" if kind == "anthropic" else "openai"
    return make_provider(wire, model, stub.base_url(wire), api_key="dummy-key", options=options, **kw)


def tool_names(kind, body):
    return [t["function"]["name"] if kind == "openai" else t["name"] for t in body["tools"]]


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
    assert reply.model == DEFAULT_MODELS["anthropic" if kind == "anthropic" else "openai"]
    assert reply.stop_reason in ("tool_use", "tool_calls", "completed")
    assert reply.request_chars > len("You are a researcher.") and reply.duration_ms >= 0
    assert tool_names(kind, sent) == ["read_file", "submit_run"]
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
        sent = stub.requests[1].body.get("messages") or stub.requests[1].body["input"]
    assert second.text == "Done reading." and second.tool_calls == []
    if kind == "responses":
        assert [i.get("type", "message") for i in sent] == [
            "message", "message", "function_call", "function_call", "function_call_output", "function_call_output"]
        assert [(i["call_id"], i["name"], i["arguments"]) for i in sent[2:4]] == [
            (a.id, "read_file", '{"path": "train.py"}'), (b.id, "read_file", '{"path": "nope.py"}')]
        assert sent[4:] == [{"type": "function_call_output", "call_id": a.id, "output": "import torch"},
                            {"type": "function_call_output", "call_id": b.id, "output": "no such file"}]
    elif kind == "anthropic":
        assert [m["role"] for m in sent] == ["user", "assistant", "user"]
        assert sent[1]["content"] == [
            {"type": "text", "text": "Two reads."},
            {"type": "tool_use", "id": a.id, "name": "read_file", "input": {"path": "train.py"}},
            {"type": "tool_use", "id": b.id, "name": "read_file", "input": {"path": "nope.py"}}]
        # both results folded into one user turn, the error flag passed through
        assert sent[2]["content"] == [
            {"type": "tool_result", "tool_use_id": a.id, "content": "import torch", "is_error": False},
            {"type": "tool_result", "tool_use_id": b.id, "content": "no such file", "is_error": True,
             "cache_control": {"type": "ephemeral"}}]  # the end of the history is cached
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
                                                ("openai", {"retry_after_ms": "250"}, 0.25),
                                                ("responses", {"retry_after": "0.3"}, 0.3)])
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


def test_retries_stop_at_the_attempt_limit_and_say_n_of_m():
    seen = []
    with StubLLMServer(handler=lambda request: {"status": 529, "retry_after": "0"}) as stub:
        with pytest.raises(RetryBudgetExhausted, match="gave up after 8 attempt"):
            provider("anthropic", stub, on_retry=seen.append).complete("sys", TASK, TOOLS)
        assert len(stub.requests) == 8
    assert [(r.attempt, r.of) for r in seen] == [(n, 8) for n in range(1, 8)] and "529" in seen[0].error


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
    ("openai", {"status": 400, "code": "context_length_exceeded", "message": "Input exceeds the context window."}),
    ("responses", {"status": 400, "code": "context_length_exceeded", "message": "Input exceeds the context window."})])
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
            provider(kind, stub, "nope-1").complete("sys", TASK, TOOLS)


@pytest.mark.parametrize("kind", KINDS)
def test_very_long_reply_is_returned_intact(kind):
    text = "".join(f"line {i}: ünïcode ✓\n" for i in range(10_000))
    assert len(text.encode()) > 200_000
    with StubLLMServer([{"text": text}]) as stub:
        reply = provider(kind, stub).complete("sys", TASK, TOOLS)
    assert reply.text == text


def conversation_of(turns: int, state: str = "runs: ...") -> list:
    """What the loop sends after `turns` turns: opening, the turns, the state last (agent/context.py)."""
    ctx = Context(lambda: state, max_chars=10**9)
    for n in range(turns):
        call = ToolCall(id=f"toolu_{n}", name="read_file", arguments={"path": "train.py"}, raw_arguments="{}")
        ctx.add(AssistantMessage(text=f"turn {n}", tool_calls=[call]))
        ctx.add(ToolResult(tool_call_id=call.id, name=call.name, content=f"code of turn {n} " * 50))
    return ctx.messages()


def test_anthropic_breakpoints_cover_tools_system_and_history_but_not_the_state():
    with StubLLMServer([{"text": "ok"}]) as stub:
        provider("anthropic", stub).complete("You are a researcher.", conversation_of(3), TOOLS)
        sent = stub.requests[0].body
    ephemeral = {"type": "ephemeral"}
    assert sent["system"] == [{"type": "text", "text": "You are a researcher.", "cache_control": ephemeral}]
    assert [t.get("cache_control") for t in sent["tools"]] == [None, ephemeral]
    marked = [(n, b) for n, m in enumerate(sent["messages"]) for b in m["content"] if "cache_control" in b]
    # the end of this request's history and of the previous one's: the last two tool results
    assert [(n, b["type"], b["tool_use_id"]) for n, b in marked] == [(4, "tool_result", "toolu_1"),
                                                                      (6, "tool_result", "toolu_2")]
    assert sent["messages"][-1]["content"][-1] == {"type": "text", "text": "# Current state\nruns: ..."}
    assert len(marked) + 2 <= 4 and sent["max_tokens"] == 8192  # the API allows four breakpoints


def test_anthropic_cache_is_read_back_turn_after_turn():
    """The stub caches the prefixes the breakpoints end and reads back the longest one: earned, not asserted."""
    with StubLLMServer(handler=lambda request: {"text": "ok"}) as stub:
        p = provider("anthropic", stub)
        replies = [p.complete("You are a researcher. " * 100, conversation_of(n, f"state {n}"), TOOLS)
                   for n in range(8)]
    assert replies[0].cache_read_tokens == 0 and replies[0].cache_write_tokens > 0
    for before, after in zip(replies, replies[1:]):
        # everything the previous request cached is read; only the new turn (and the state) are not
        assert after.cache_read_tokens == before.cache_read_tokens + before.cache_write_tokens
        assert after.input_tokens - after.cache_read_tokens < 600
    read = sum(r.cache_read_tokens for r in replies[1:]) / sum(r.input_tokens for r in replies[1:])
    assert read > 0.8


def test_anthropic_state_first_would_defeat_the_cache():
    """The stub's accounting can fail: with the changing state first, nothing after the system prompt is read."""
    with StubLLMServer(handler=lambda request: {"text": "ok"}) as stub:
        p = provider("anthropic", stub)
        replies = []
        for n in range(4):
            messages = conversation_of(n, f"state {n}")
            replies.append(p.complete("sys " * 400, [messages[-1].model_copy(update={"volatile": False})]
                                      + messages[1:-1], TOOLS))
    prefix = replies[0].cache_read_tokens + replies[0].cache_write_tokens  # tools + system + first state
    assert all(r.cache_read_tokens < prefix for r in replies[1:])


def test_anthropic_thinking_budget_and_effort_on_the_wire():
    options = ModelOptions(thinking_budget=2048, reasoning_effort="high")
    with StubLLMServer([{"text": "ok"}, {"text": "ready"}]) as stub:
        p = provider("anthropic", stub, options=options)
        p.complete("sys", TASK, TOOLS)
        p.check(TOOLS)
        full, check = (r.body for r in stub.requests)
    assert full["thinking"] == {"type": "enabled", "budget_tokens": 2048} and full["max_tokens"] == 8192 + 2048
    assert full["output_config"] == {"effort": "high"}
    assert check["max_tokens"] == 2048 + 16 and check["thinking"] == full["thinking"]
    assert tool_names("anthropic", check) == ["read_file", "submit_run"]


def test_settings_a_wire_cannot_take_fail_before_any_request():
    with pytest.raises(ProviderError, match="--reasoning-effort none is not an Anthropic effort"):
        make_provider("anthropic", api_key="k", options=ModelOptions(reasoning_effort="none"))
    with pytest.raises(ProviderError, match="--thinking-budget is for Anthropic models"):
        make_provider("openai", api_key="k", options=ModelOptions(thinking_budget=2048))
    with pytest.raises(ValueError, match="--max-output-tokens 2000 leaves no room beyond --thinking-budget 4096"):
        ModelOptions(thinking_budget=4096, max_output_tokens=2000)


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
    assert sent["messages"][-1] == {"role": "user", "content": "Lower val_bpb of train.py."}


def test_a_refused_setting_is_not_changed_behind_the_users_back():
    """Chat Completions refusing tools with reasoning: no silent retry with another effort; the flag is named."""
    refusal = {"status": 400, "param": "reasoning_effort", "message": "Function tools with reasoning_effort are "
               "not supported for gpt-6-sol in /v1/chat/completions. To use function tools, use /v1/responses "
               "or set reasoning_effort to 'none'."}
    retries = Retries()
    options = ModelOptions(reasoning_effort="high", openai_api="chat")
    with StubLLMServer([refusal]) as stub:
        with pytest.raises(ProviderError) as caught:
            preflight(provider("openai", stub, options=options, on_retry=retries), TOOLS, options.chosen(),
                      Console(quiet=True))
        efforts = [r.body.get("reasoning_effort") for r in stub.requests]
    assert efforts == ["high"] and retries == []
    assert caught.value.kind == "rejected_setting"
    assert str(caught.value).startswith("the model refused --reasoning-effort high and --openai-api chat: ")
    assert "Choose another value or leave the flag out" in str(caught.value)


def test_responses_request_shape():
    options = ModelOptions(reasoning_effort="low", max_output_tokens=4000)
    with StubLLMServer([{"text": "ok"}]) as stub:
        reply = provider("responses", stub, options=options).complete("You are a researcher.", TASK, TOOLS)
        sent = stub.requests[0]
    assert sent.path == "/v1/responses" and reply.text == "ok" and reply.stop_reason == "completed"
    body = sent.body
    assert body["instructions"] == "You are a researcher." and body["store"] is False
    assert body["include"] == ["reasoning.encrypted_content"] and body["reasoning"] == {"effort": "low"}
    assert body["max_output_tokens"] == 4000 and body["input"] == [{"role": "user", "content": TASK[0].content}]
    assert body["tools"][0] == {"type": "function", "name": "read_file", "description": "Read a file.",
                                "parameters": TOOLS[0].parameters, "strict": False}
    assert not {"temperature", "top_p", "previous_response_id"} & body.keys()


def test_responses_reasoning_items_go_back_with_their_calls():
    step = {"thinking": "The learning rate looks low.", "text": "Reading first.",
            "tool_calls": [{"name": "read_file", "arguments": {"path": "train.py"}}]}
    with StubLLMServer([step, {"text": "done"}, {"text": "never"}]) as stub:
        p = provider("responses", stub)
        first = p.complete("sys", TASK, TOOLS)
        call = first.tool_calls[0]
        result = ToolResult(tool_call_id=call.id, name=call.name, content="import torch")
        second = p.complete("sys", TASK + [first.to_message(), result], TOOLS)
        sent = stub.requests[1].body["input"]
        # Without its reasoning item the call is refused, as by the real API: the stub's check can fail.
        stripped = first.to_message().model_copy(update={"native": None})
        with pytest.raises(ProviderError, match="without its required 'reasoning' item"):
            p.complete("sys", TASK + [stripped, result], TOOLS)
    assert second.text == "done"
    assert [i.get("type") for i in sent[1:]] == ["reasoning", "message", "function_call", "function_call_output"]
    assert sent[1]["encrypted_content"].startswith("gAAA") and sent[1]["summary"][0]["text"] == step["thinking"]
    assert (sent[3]["call_id"], sent[3]["name"], sent[3]["arguments"]) == (call.id, "read_file",
                                                                           '{"path": "train.py"}')
    assert sent[4] == {"type": "function_call_output", "call_id": call.id, "output": "import torch"}


def test_responses_cut_short_by_max_output_tokens():
    step = {"stop_reason": "max_output_tokens", "tool_calls": [{"name": "submit_run", "arguments": '{"descr'}]}
    with StubLLMServer([step]) as stub:
        reply = provider("responses", stub).complete("sys", TASK, TOOLS)
    assert reply.stop_reason == "max_output_tokens" and reply.tool_calls[0].error


def test_the_openai_wire_is_chosen_by_the_server_and_can_be_overridden():
    assert openai_api("auto", None) == "responses" and openai_api("auto", "https://api.openai.com/v1") == "responses"
    assert openai_api("auto", "http://localhost:8000/v1") == "chat" and openai_api("chat", None) == "chat"
    assert openai_api("responses", "http://localhost:11434/v1") == "responses"
    assert type(make_provider("openai", api_key="k")).__name__ == "OpenAIResponsesProvider"
    assert type(make_provider("openai", base_url="http://localhost:8000/v1")).__name__ == "OpenAIChatProvider"


@pytest.mark.parametrize("kind", KINDS)
def test_preflight_is_one_small_call_with_the_tools(kind):
    with StubLLMServer([{"text": "ready"}]) as stub:
        reply = preflight(provider(kind, stub), TOOLS, [], Console(quiet=True))
        body = stub.requests[0].body
    assert reply.text == "ready" and len(stub.requests) == 1 and tool_names(kind, body) == ["read_file", "submit_run"]
    assert 16 in (body.get("max_tokens"), body.get("max_completion_tokens"), body.get("max_output_tokens"))


@pytest.mark.parametrize("kind", KINDS)
def test_preflight_stops_at_a_bad_key_an_unknown_model_or_no_server(kind):
    for step, match in (({"status": 401, "message": "invalid x-api-key"}, "was rejected \\(401\\)"),
                        ({"status": 404, "message": "model: nope"}, "was not found")):
        with StubLLMServer([step]) as stub:
            with pytest.raises(ProviderError, match=match):
                preflight(provider(kind, stub), TOOLS, ["--reasoning-effort low"], Console(quiet=True))
    with StubLLMServer([]) as stub:
        url = stub.url
    wire = "anthropic" if kind == "anthropic" else "openai"
    # Nothing listens there, or the name does not resolve: a wrong address does not pass with waiting,
    # so the first call stops at once (the retry budget of 60 s is never spent)
    for base in (url, "http://no-such-host.invalid:8000"):
        dead = make_provider(wire, None, base + ("" if wire == "anthropic" else "/v1"), "k", retry_budget_s=60,
                             retry_base_delay_s=5, options=ModelOptions(openai_api="responses" if kind == "responses"
                                                                        else "auto"))
        started = time.monotonic()
        with pytest.raises(ProviderError, match="no answer from .*check the host name and port") as failure:
            preflight(dead, TOOLS, [], Console(quiet=True))
        assert failure.value.kind == "unreachable" and time.monotonic() - started < 10


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
        make_provider("anthropic" if kind == "anthropic" else "openai", None, None)
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


def test_price_table_and_cached_tokens_priced_apart():
    assert known_price("claude-haiku-4-5-20251001") == PRICES["claude-haiku-4-5"]
    assert known_price("gpt-6.1-sol") == PRICES["gpt-6.1-sol"] and known_price("gpt-6-sol") == PRICES["gpt-6-sol"]
    assert known_price("qwen3-coder") is None
    sonnet = PRICES["claude-sonnet-5-5"]
    # 100k prompt tokens of which 90k read from cache and 5k written: far below the full input price
    assert sonnet.cost(100_000, 90_000, 5_000, 1_000) == pytest.approx((5_000 * 2 + 90_000 * 0.2 + 5_000 * 2.5
                                                                        + 1_000 * 10) / 1e6)
    assert Price.model_validate([3, 15]).cost(1_000_000, 500_000, 0, 0) == pytest.approx(3.0)
    assert Price.model_validate((3, 3.75, 0.3, 15)).cache_read == 0.3
    with pytest.raises(ValueError, match="2 numbers"):
        Price.model_validate([1, 2, 3])
    assert price_for("qwen3-coder", None, needed=False) is None
    assert price_for("qwen3-coder", Price.model_validate([1, 2]), needed=True).output == 2
    with pytest.raises(UnknownPrice, match="--max-cost needs the prices of model 'qwen3-coder'.*--price IN,OUT"):
        price_for("qwen3-coder", None, needed=True)


@pytest.mark.parametrize("step, match", [({"status": 401, "message": "invalid x-api-key"}, "ANTHROPIC_API_KEY was"),
                                         ({"status": 404, "message": "model: nope"}, "was not found")])
def test_a_session_that_cannot_reach_its_model_starts_nothing(tmp_path, monkeypatch, step, match):
    from agent.session import Session, SessionSettings

    with StubLLMServer([step]) as stub:
        settings = SessionSettings(session_dir=tmp_path / "s", agent="anthropic", base_url=stub.anthropic_base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "bad-key")
        with pytest.raises(ProviderError, match=match):
            Session(settings, Console(quiet=True)).run()
    assert not (tmp_path / "s").exists()  # no folder that would block a retry with the same --session


def test_max_cost_for_a_model_without_a_price_is_refused_before_any_request(tmp_path, monkeypatch):
    from agent.session import Session, SessionSettings

    monkeypatch.setenv("OPENAI_API_KEY", "k")
    with StubLLMServer([]) as stub:
        settings = SessionSettings(session_dir=tmp_path / "s", agent="openai", model="qwen3-coder",
                                   base_url=stub.openai_base_url, max_cost_usd=1.0)
        with pytest.raises(ProviderError, match="add --price"):
            Session(settings, Console(quiet=True)).run()
        assert stub.requests == []
    assert not (tmp_path / "s").exists()


def test_cli_exits_non_zero_at_a_rejected_key(tmp_path):
    with StubLLMServer([{"status": 401, "message": "invalid x-api-key"}]) as stub:
        env = {**os.environ, "ANTHROPIC_API_KEY": "bad", "ANTHROPIC_BASE_URL": stub.anthropic_base_url}
        proc = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--agent", "anthropic", "--session",
                               str(tmp_path / "s"), "--thinking-budget", "2048"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        sent = stub.requests[0].body
    assert proc.returncode != 0 and "ANTHROPIC_API_KEY was rejected (401)" in proc.stderr
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 2048}  # the flag reached the wire
    assert not (tmp_path / "s").exists() and "run 0" not in proc.stdout
