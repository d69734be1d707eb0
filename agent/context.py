"""Bounded requests whose prefix stays put, so prompt caching reads it back.

Over 50 runs a conversation outgrows any context window. Each request is an opening with a
snapshot of the state (run table, notes, best and working code) taken when the kept turns began,
the kept turns verbatim, and last a brief fresh state (the run table now). Only that last message
changes from one call to the next, so everything before it is the previous request plus one turn:
what prompt caching (Anthropic's breakpoints, OpenAI's automatic prefix cache) reads back. When
the kept turns pass `max_chars`, the oldest are folded away in one step, down to half of it, and a
new snapshot is taken: the prefix shifts once every many calls instead of on every call. The task
lives in the system prompt. Nothing is lost: the trajectory keeps every step.
"""
from __future__ import annotations

from typing import Callable

from agent.providers.base import AssistantMessage, Message, ToolResult, UserMessage

OPENING = ("Begin. Below: the state of the session when the turns that follow began, then those turns; "
           "the last message is the current run table. Edits since the snapshot are in the turns "
           "(read_file shows the working train.py).")


def message_chars(m: Message) -> int:
    if isinstance(m, AssistantMessage):
        return len(m.text) + sum(len(c.raw_arguments) + len(c.name) for c in m.tool_calls)
    return len(m.content)


class Context:
    def __init__(self, state: Callable[[], str], max_chars: int = 200_000, min_turns: int = 1,
                 brief: Callable[[], str] | None = None):
        self.state = state
        self.brief = brief  # without one, the whole state goes last and no snapshot is taken
        self.snapshot: str | None = None
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
        """History split into turns, each starting at an assistant message (what came before the first reply,
        a person's guidance or a notice, is a turn of its own)."""
        turns: list[list[Message]] = []
        for m in self.history:
            if isinstance(m, AssistantMessage) or not turns:
                turns.append([m])
            else:
                turns[-1].append(m)
        return turns

    def _fold(self, turns: list[list[Message]]) -> bool:
        """Move the first kept turn forward when the kept turns outgrow max_chars: to half of it, at once."""
        sizes = [sum(message_chars(m) for m in turn) for turn in turns]
        if sum(sizes[self.first_kept:]) <= self.max_chars:
            return False
        kept, used = len(turns), 0
        while kept > 0 and (len(turns) - kept < self.min_turns or used + sizes[kept - 1] <= self.max_chars // 2):
            kept -= 1
            used += sizes[kept]
        self.first_kept = kept
        return True

    def messages(self) -> list[Message]:
        turns = self._turns()
        folded = self._fold(turns)
        summary = (f"\n\n({self.first_kept} earlier turns are summarised by this state; the trajectory keeps "
                   "them.)") if self.first_kept else ""
        if self.brief is None:
            opening, fresh = OPENING, f"# Current state\n{self.state()}{summary}"
        else:
            if self.snapshot is None or folded:
                self.snapshot = f"# State when the turns below began\n{self.state()}{summary}"
            opening, fresh = f"{OPENING}\n\n{self.snapshot}", f"# Current state\n{self.brief()}"
        return ([UserMessage(content=opening)] + [m for turn in turns[self.first_kept:] for m in turn]
                + [UserMessage(content=fresh, volatile=True)])
