"""Bounded requests whose prefix stays put, so prompt caching reads it back.

Over 50 runs a conversation outgrows any context window. Each request is a fixed opening, the
kept turns verbatim, and last the compact state (run table, notes, best and working code). The
state changes on every call, so it goes at the end, as the freshest message, where it invalidates
nothing: everything before it is the previous request plus one turn, which is what prompt caching
(Anthropic's breakpoints, OpenAI's automatic prefix cache) reads back. When the kept turns pass
`max_chars`, the oldest are folded away in one step, down to half of it, rather than one turn per
call, so the prefix shifts once every many calls instead of on every call. The task lives in the
system prompt. Nothing is lost: the trajectory keeps every step.
"""
from __future__ import annotations

from typing import Callable

from agent.providers.base import AssistantMessage, Message, ToolResult, UserMessage

OPENING = ("Begin. The last message of every request is the current state of the session (run table, "
           "notes, best and working code); it replaces the states you saw before.")


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
        self.first_kept = 0  # index into the history's turns: all before it are folded into the state

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
        return [t for t in turns if isinstance(t[0], AssistantMessage)]

    def _fold(self, turns: list[list[Message]]) -> None:
        """Move the first kept turn forward when the kept turns outgrow max_chars: to half of it, at once."""
        sizes = [sum(message_chars(m) for m in turn) for turn in turns]
        if sum(sizes[self.first_kept:]) <= self.max_chars:
            return
        kept, used = len(turns), 0
        while kept > 0 and (len(turns) - kept < self.min_turns or used + sizes[kept - 1] <= self.max_chars // 2):
            kept -= 1
            used += sizes[kept]
        self.first_kept = kept

    def messages(self) -> list[Message]:
        turns = self._turns()
        self._fold(turns)
        state = f"# Current state\n{self.state()}"
        if self.first_kept:
            state += (f"\n\n({self.first_kept} earlier turns are summarised by this state; "
                      "the trajectory keeps them.)")
        return ([UserMessage(content=OPENING)] + [m for turn in turns[self.first_kept:] for m in turn]
                + [UserMessage(content=state, volatile=True)])
