"""What model calls cost: one table of known prices, and the cost of a call with cached tokens priced apart.

Prices are USD per million tokens at standard rates for requests under the long-context threshold
(272K tokens for GPT-6, where rates double above it); sessions here stay far below it. Anthropic
prices 5-minute cache writes at 1.25x and reads at 0.1x input. OpenAI's GPT-6 family charges cache
writes too. `--price` overrides the table for a model it does not know or that changed its prices.
"""
from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from agent.providers.base import ProviderError


class Price(BaseModel):
    """USD per million tokens. Given as 2 numbers (input, output), cached tokens cost the input price."""

    input: float = Field(ge=0)
    cache_write: float = Field(ge=0)
    cache_read: float = Field(ge=0)
    output: float = Field(ge=0)

    @model_validator(mode="before")
    @classmethod
    def _from_numbers(cls, value):
        if isinstance(value, (list, tuple)):
            if len(value) == 2:
                return {"input": value[0], "cache_write": value[0], "cache_read": value[0], "output": value[1]}
            if len(value) == 4:
                return dict(zip(("input", "cache_write", "cache_read", "output"), value))
            raise ValueError(f"a price is 2 numbers (IN,OUT) or 4 (IN,CACHE_WRITE,CACHE_READ,OUT), got {len(value)}")
        return value

    def cost(self, input_tokens: int, cache_read_tokens: int, cache_write_tokens: int, output_tokens: int) -> float:
        """USD for one call; `input_tokens` counts every prompt token, cached ones included."""
        fresh = max(0, input_tokens - cache_read_tokens - cache_write_tokens)
        return (fresh * self.input + cache_read_tokens * self.cache_read + cache_write_tokens * self.cache_write
                + output_tokens * self.output) / 1e6


def _p(input: float, cache_write: float, cache_read: float, output: float) -> Price:
    return Price(input=input, cache_write=cache_write, cache_read=cache_read, output=output)


# Published standard prices, checked December 2026 (platform.claude.com model pages, developers.openai.com).
# A dated snapshot id (claude-haiku-4-5-20251001) takes the price of its model.
PRICES: dict[str, Price] = {
    "claude-sonnet-5-5": _p(2, 2.5, 0.2, 10),
    "claude-sonnet-5": _p(2, 2.5, 0.2, 10),
    "claude-opus-5-5": _p(4, 5, 0.4, 20),
    "claude-opus-5": _p(5, 6.25, 0.5, 25),
    "claude-sonnet-4-6": _p(3, 3.75, 0.3, 15),
    "claude-opus-4-6": _p(5, 6.25, 0.5, 25),
    "claude-sonnet-4-5": _p(3, 3.75, 0.3, 15),
    "claude-opus-4-5": _p(5, 6.25, 0.5, 25),
    "claude-haiku-4-5": _p(1, 1.25, 0.1, 5),
    "gpt-6-sol": _p(2, 2.5, 0.2, 10),
    "gpt-6.1-sol": _p(2, 2.5, 0.1, 10),
    "gpt-6.2-sol": _p(2, 2.5, 0.1, 10),
    "gpt-6-luna": _p(0.1, 0.125, 0.01, 0.5),
    "gpt-5": _p(1.25, 1.25, 0.125, 10),
    "gpt-5-mini": _p(0.25, 0.25, 0.025, 2),
}


def known_price(model: str) -> Price | None:
    """The table's price for `model`, matching a dated snapshot id to its model (longest matching name)."""
    names = [name for name in PRICES if model == name or model.startswith(name + "-")]
    return PRICES[max(names, key=len)] if names else None


class UnknownPrice(ProviderError):
    def __init__(self, message: str):
        super().__init__(message, kind="config")


def price_for(model: str, override: Price | None, needed: bool) -> Price | None:
    """`--price` if given, else the table's; raises UnknownPrice when a cost limit needs one and none is known."""
    price = override or known_price(model)
    if price is None and needed:
        raise UnknownPrice(f"--max-cost needs the prices of model '{model}', which the price table does not know: "
                           "add --price IN,OUT or --price IN,CACHE_WRITE,CACHE_READ,OUT (USD per million tokens)")
    return price
