"""Bounded requests: recent turns verbatim, everything older folded into a compact state.

Over 50 runs a conversation outgrows any context window. Each request is the
compact state (run table, notes, best and working code), then as many of the
most recent turns as fit in `max_chars`. The task lives in the system prompt,
so the stable prefix (tools, system) is what prompt caching reuses. Nothing is
lost: the trajectory keeps every step.
"""
from __future__ import annotations

from typing import Callable

from agent.providers.base import AssistantMessage, Message, ToolResult, UserMessage


def message_chars(m: Message) -> int:
    if isinstance(m, AssistantMessage):
        return len(m.text) + sum(len(c.raw_arguments) + len(c.name) for c in m.tool_calls)
    return len(m.content)


class Context:
    def __init__(self, state: Callable[[], str], max_chars: int = 40_000, min_turns: int = 1):
        self.state = state
        self.max_chars = max_chars
        self.min_turns = min_turns
        self.history: list[Message] = []

    def add(self, message: Message) -> None:
        self.history.append(message)

    def notice(self, text: str) -> None:
        """Tell the model something from the harness without breaking user/assistant alternation."""
        if self.history and isinstance(self.history[-1], ToolResult):
            last = self.history[-1]
            self.history[-1] = last.model_copy(update={"content": f"{last.content}\n\n{text}"})
        elif self.history and isinstance(self.history[-1], UserMessage):
            last = self.history[-1]
            self.history[-1] = UserMessage(content=f"{last.content}\n\n{text}")
        else:
            self.history.append(UserMessage(content=text))

    def _turns(self) -> list[list[Message]]:
        """History split into turns, each starting at an assistant message."""
        turns: list[list[Message]] = []
        for m in self.history:
            if isinstance(m, AssistantMessage) or not turns:
                turns.append([m])
            else:
                turns[-1].append(m)
        return turns

    def messages(self) -> list[Message]:
        turns = [t for t in self._turns() if isinstance(t[0], AssistantMessage)]
        kept: list[list[Message]] = []
        used = 0
        for turn in reversed(turns):
            size = sum(message_chars(m) for m in turn)
            if len(kept) >= self.min_turns and used + size > self.max_chars:
                break
            kept.insert(0, turn)
            used += size
        folded = len(turns) - len(kept)
        head = f"# Current state\n{self.state()}"
        if folded:
            head += f"\n\n({folded} earlier turns are summarised by this state; the trajectory keeps them.)"
        return [UserMessage(content=head)] + [m for turn in kept for m in turn]
