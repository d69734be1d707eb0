"""The research loop: model call, tool calls, record, repeat, until a limit is raised.

Every model call and every tool call is written to the trajectory before the
next step. Limits end the loop as exceptions; the budget running out gives
the model one last turn to write its conclusions.
"""
from __future__ import annotations

import json
import time

from rich.markup import escape

from agent.context import Context
from agent.model_calls import call_event, turn_line, waiting_for
from agent.prices import Price
from agent.providers.base import ModelReply, Provider, ProviderError, ToolCall, ToolResult
from agent.tools import TOOL_NAMES, TOOL_SPECS, Finished, Toolbox, ToolFailure
from logs.trajectory import LLMCallEvent, SessionEvent, ToolCallEvent, Trajectory

FINAL_TURN_CALLS = 3  # model calls allowed after the budget is spent, to conclude


class LimitReached(Exception):
    """A limit that ends the loop cleanly; the message says which."""


class BudgetSpent(LimitReached):
    pass


class TooManyMalformed(LimitReached):
    pass


class CallLimit(LimitReached):
    pass


class CostLimit(LimitReached):
    pass


class AgentLoop:
    def __init__(self, provider: Provider, toolbox: Toolbox, trajectory: Trajectory, context: Context,
                 system: str, approval=None, max_llm_calls: int | None = None, max_cost_usd: float | None = None,
                 price: Price | None = None, max_malformed: int = 3, run_timeout: float = 210,
                 console=None):
        self.provider = provider
        self.tools = toolbox
        self.trajectory = trajectory
        self.context = context
        self.system = system
        self.approval = approval
        self.max_llm_calls = max_llm_calls
        self.max_cost_usd = max_cost_usd
        self.price = price
        self.max_malformed = max_malformed
        self.run_timeout = run_timeout
        self.console = console  # rich Console for a one-line account of each tool call, or None
        self.llm_calls = 0
        self.cost_usd = 0.0
        self.malformed = 0
        self.summary = ""

    # --- one step ------------------------------------------------------------
    def call_model(self) -> ModelReply:
        if self.max_llm_calls is not None and self.llm_calls >= self.max_llm_calls:
            raise CallLimit(f"--max-llm-calls {self.max_llm_calls} reached")
        messages = self.context.messages()
        started = time.monotonic()
        try:
            with waiting_for(self.console, self.provider.model):
                reply = self.provider.complete(self.system, messages, TOOL_SPECS)
        except ProviderError as exc:
            self.trajectory.append(LLMCallEvent(model=self.provider.model, error=str(exc),
                                                duration_ms=int((time.monotonic() - started) * 1000)))
            raise
        self.llm_calls += 1
        event = call_event(reply, self.provider.name, self.price,
                           tool_calls=[c.model_dump() for c in reply.tool_calls])
        self.cost_usd += event.metadata["cost_usd"] or 0.0
        self.trajectory.append(event)
        if self.console is not None:
            self.console.print(turn_line(reply, event.metadata["cost_usd"]))
        if self.max_cost_usd is not None and self.cost_usd > self.max_cost_usd:
            raise CostLimit(f"--max-cost ${self.max_cost_usd:.2f} exceeded (${self.cost_usd:.2f} spent)")
        return reply

    def run_tool(self, call: ToolCall) -> ToolResult:
        started = time.monotonic()
        output, error = "", None
        try:
            if call.error:
                raise ToolFailure(f"your call to {call.name} could not be read: {call.error}. Send valid JSON arguments.")
            if self.approval is not None:
                self.approval.check(call, self.tools)
            output = self.tools.execute(call.name, call.arguments or {})
        except ToolFailure as exc:
            error = str(exc)
        except Finished as done:
            self.summary = done.summary
            output = "session finished"
            self._record(call, output, None, started)
            raise
        text = (error or output) + "\n" + self.tools.budget_line()
        self._record(call, output, error, started)
        self._show(call, output, error)
        return ToolResult(tool_call_id=call.id, name=call.name, content=text, is_error=error is not None)

    def _record(self, call: ToolCall, output: str, error: str | None, started: float) -> None:
        self.trajectory.append(ToolCallEvent(
            tool=call.name, input=call.raw_arguments or json.dumps(call.arguments or {}), output=output or None,
            error=error, duration_ms=int((time.monotonic() - started) * 1000),
            metadata={"tool_call_id": call.id, **self._budget_meta()}))

    def _show(self, call: ToolCall, output: str, error: str | None) -> None:
        if self.console is None:
            return
        if error:
            self.console.print(f"  {call.name}: [yellow]{escape(error.splitlines()[0][:160])}[/yellow]")
        elif call.name == "submit_run" and output.startswith("{"):
            r = json.loads(output)
            bpb = f"{r['val_bpb']:.4f}" if r.get("val_bpb") is not None else "-"
            self.console.print(f"[bold]run {r['run_id']}[/bold] {r['status']} val_bpb {bpb}  "
                               f"{escape((call.arguments or {}).get('description', ''))[:100]}")
        elif call.name in ("write_note", "finish"):
            args = call.arguments or {}
            text = args.get("text") or args.get("summary") or ""
            self.console.print(f"  [dim]{call.name}: {escape(text[:200])}[/dim]")

    def _budget_meta(self) -> dict:
        s = self.tools.service.status()
        return {"runs_remaining": s.runs_remaining, "match_time_remaining_secs": round(s.match_time_remaining_secs, 1)}

    def step(self) -> None:
        reply = self.call_model()
        self.context.add(reply.to_message())  # keeps provider-native blocks (signed thinking)
        if not reply.tool_calls:
            self._malformed("Your reply had no tool call. Act through the tools; call finish when you are done.")
            return
        valid = False
        failed = None
        for call in reply.tool_calls:
            if failed is not None:  # later calls usually depend on the failed one
                self.context.add(ToolResult(tool_call_id=call.id, name=call.name, is_error=True,
                                            content=f"skipped: the earlier call to {failed} failed"))
                continue
            result = self.run_tool(call)
            self.context.add(result)
            valid |= call.error is None and call.name in TOOL_NAMES
            if result.is_error:
                failed = call.name
        if valid:
            self.malformed = 0
        else:
            self._malformed("None of your tool calls could be used; check the tool names and argument schemas.")

    def _malformed(self, hint: str) -> None:
        self.malformed += 1
        if self.malformed >= self.max_malformed:
            raise TooManyMalformed(f"{self.malformed} consecutive replies without a usable tool call")
        self.context.notice(hint)

    def budget_spent(self) -> str | None:
        s = self.tools.service.status()
        if s.runs_remaining <= 0:
            return "all runs are used"
        if s.match_time_remaining_secs < self.run_timeout:
            return "too little match time is left for another run"
        return None

    # --- the loop --------------------------------------------------------------
    def run(self) -> str:
        """Run until a limit; return why it stopped."""
        try:
            while (why := self.budget_spent()) is None:
                self.step()
            raise BudgetSpent(why)
        except Finished:
            return "finished: " + self.summary
        except BudgetSpent as spent:
            self.trajectory.append(SessionEvent(event="limit", detail={"reason": str(spent)}))
            return self._final_turn(str(spent))

    def _final_turn(self, why: str) -> str:
        self.context.notice(f"The budget is spent ({why}); no more runs can start. Record your conclusions "
                            "with write_note (kind 'conclusion'), then call finish with a short summary.")
        try:
            for _ in range(FINAL_TURN_CALLS):
                self.step()
        except Finished:
            return f"budget spent ({why}); finished: {self.summary}"
        except LimitReached as exc:
            return f"budget spent ({why}); then {exc}"
        return f"budget spent ({why})"
