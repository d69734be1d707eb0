"""The model settings a user may choose, declared once: each field is a CLI flag and an environment variable.

`--reasoning-effort` becomes PGOLF_REASONING_EFFORT, and so on (see `flag` and `env`). Nothing here is
changed behind the user's back: a value a model rejects stops the session before any run, naming the flag.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

DEFAULT_MAX_OUTPUT_TOKENS = 8192
ENV_PREFIX = "PGOLF_"


class ModelOptions(BaseModel):
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = Field(
        None, description="how hard the model thinks: OpenAI reasoning.effort, Anthropic output_config.effort "
                          "(low..max); default: the model's own")
    thinking_budget: int | None = Field(
        None, ge=1024, description="Anthropic extended thinking with this many tokens (models with manual "
                                   "thinking, e.g. claude-haiku-4-5; adaptive models such as Sonnet 5.x reject it)")
    max_output_tokens: int | None = Field(
        None, ge=16, description=f"longest reply in tokens, thinking included (default {DEFAULT_MAX_OUTPUT_TOKENS}, "
                                 "plus the thinking budget)")
    openai_api: Literal["auto", "responses", "chat"] = Field(
        "auto", description="OpenAI wire: the Responses API, or Chat Completions for compatible servers "
                            "(default auto: chat when --base-url is not api.openai.com)")

    @model_validator(mode="after")
    def _room_to_answer(self):
        if self.thinking_budget and self.max_output_tokens and self.max_output_tokens <= self.thinking_budget:
            raise ValueError(f"--max-output-tokens {self.max_output_tokens} leaves no room beyond --thinking-budget "
                             f"{self.thinking_budget}: raise --max-output-tokens or leave it out")
        return self

    @staticmethod
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    @staticmethod
    def env(name: str) -> str:
        return ENV_PREFIX + name.upper()

    def output_tokens(self) -> int:
        return self.max_output_tokens or DEFAULT_MAX_OUTPUT_TOKENS + (self.thinking_budget or 0)

    def chosen(self) -> list[str]:
        """The settings the user chose, as flags: what a rejection may be about."""
        return [f"{self.flag(name)} {value}" for name, value in self.model_dump(exclude_defaults=True).items()]
