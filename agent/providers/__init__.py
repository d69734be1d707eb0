"""Model providers behind one protocol (see base.py), and the one place default model ids live."""
from __future__ import annotations

import os
from urllib.parse import urlparse

from agent.providers.base import Provider, ProviderError
from agent.providers.options import ModelOptions

# Current mid-tier models that call tools well; gpt-6-sol goes through the Responses API, where
# function tools and reasoning combine.
DEFAULT_MODELS = {"anthropic": "claude-sonnet-5-5", "openai": "gpt-6-sol"}
KEY_ENV = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}
BASE_URL_ENV = {"anthropic": "ANTHROPIC_BASE_URL", "openai": "OPENAI_BASE_URL"}
LOCAL_SERVER_KEY = "not-needed"  # local OpenAI-compatible servers want some key, any key


def openai_api(choice: str, base_url: str | None) -> str:
    """`auto`: the Responses API at OpenAI itself, Chat Completions at any other server."""
    if choice != "auto":
        return choice
    return "chat" if base_url and urlparse(base_url).hostname != "api.openai.com" else "responses"


def make_provider(kind: str, model: str | None = None, base_url: str | None = None, api_key: str | None = None,
                  options: ModelOptions | None = None, **kw) -> Provider:
    """A provider for `kind` ("anthropic" | "openai"); raises ProviderError before any request if unusable.

    Key and base URL come from the arguments, else the environment. `options` are the user's model
    settings; `kw` goes to the provider: timeout_s, retry_budget_s, retry_base_delay_s,
    retry_max_delay_s, on_retry.
    """
    if kind not in DEFAULT_MODELS:
        raise ProviderError(f"unknown provider '{kind}': choose one of {', '.join(DEFAULT_MODELS)}", kind="config")
    base_url = base_url or os.environ.get(BASE_URL_ENV[kind]) or None
    api_key = api_key or os.environ.get(KEY_ENV[kind]) or None
    if api_key is None:
        if kind == "openai" and base_url:
            api_key = LOCAL_SERVER_KEY
        else:
            raise ProviderError(f"{KEY_ENV[kind]} is not set: set {KEY_ENV[kind]} or choose --agent search",
                                kind="config")
    options = options or ModelOptions()
    # The SDKs are imported only when asked for: importing both is slow, and most commands need neither.
    if kind == "anthropic":
        from agent.providers.anthropic_provider import AnthropicProvider
        return AnthropicProvider(model or DEFAULT_MODELS[kind], api_key, base_url, options=options, **kw)
    if openai_api(options.openai_api, base_url) == "chat":
        from agent.providers.openai_provider import OpenAIChatProvider
        return OpenAIChatProvider(model or DEFAULT_MODELS[kind], api_key, base_url, options=options, **kw)
    from agent.providers.openai_responses import OpenAIResponsesProvider
    return OpenAIResponsesProvider(model or DEFAULT_MODELS[kind], api_key, base_url, options=options, **kw)
