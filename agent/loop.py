"""The research loop: model call, tool calls, record, repeat, until a limit is raised.

Every model call and every tool call is written to the trajectory before the
next step. Limits end the loop as exceptions; the budget running out gives
the model one last turn to write its conclusions.
"""
from __future__ import annotations

import json
import time
import traceback

from rich.markup import escape

from agent.context import Context
from agent.guidance import take_guidance
from agent.model_calls import call_event, turn_line, waiting_for
from agent.prices import Price
from agent.providers.base import ModelReply, Provider, ProviderError, ToolCall, ToolResult, UserMessage
from agent.tools import TOOL_SPECS, Finished, Toolbox, ToolFailure, service_ended
from budget.models import RunResult, RunStatus
from logs.trajectory import LLMCallEvent, SessionEvent, ToolCallEvent, Trajectory

FINAL_TURN_CALLS = 3  # model calls allowed after the budget is spent, to conclude
# stop reasons that mean the reply hit the output-token limit (Anthropic, Chat Completions, Responses)
TRUNCATED_STOPS = {"max_tokens", "length", "max_output_tokens", "incomplete"}


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


class PersonStopped(LimitReached):
    """A person stopped the session at the approval prompt."""


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
        self.deliver_guidance()
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

    def deliver_guidance(self) -> None:
        """A person's new guidance.md reaches the model once, as a labelled user message, and is recorded."""
        guidance = take_guidance(self.tools.ws.session_dir)
        if guidance is None:
            return
        self.context.add(UserMessage(content=guidance.message()))
        self.trajectory.append(SessionEvent(event="guidance", detail={
            "file": guidance.file.name, "text": guidance.text, "to": self.provider.model}))
        if self.console is not None:
            self.console.print(f"guidance from {guidance.file.name} goes to {escape(self.provider.model)} with "
                               "this call")

    def run_tool(self, call: ToolCall) -> tuple[ToolResult, bool]:
        """Run one call; the result the model reads, and whether the call fitted a tool's declaration.

        Nothing a call does ends the session but `finish`: a bad call, a refusal, a failed handler and
        an unexpected exception in the harness all come back to the model as a tool error.
        """
        started = time.monotonic()
        output, error, usable, meta = None, None, False, {}
        try:
            tool, args = self.tools.parse(call)
            usable = True
            note = self.approval.check(tool, args, self.tools, call.id) if self.approval is not None else None
            output = tool.handler(self.tools, args)
            if note:  # the person edited the code: the model reads how, before the result
                output = output.model_copy(update={"text": f"{note}\n\n{output.text}"})
            if tool.starts_run and output.runs:
                meta["run_started"] = output.runs[0].run_id
        except ToolFailure as exc:
            error = str(exc)
        except PersonStopped:
            self._record(call, None, "not run: a person stopped the session", started, {})
            raise
        except Finished as done:
            self.summary = done.summary
            self._record(call, "session finished", None, started, {})
            raise
        except Exception as exc:  # noqa: BLE001 - a fault of the harness, not of the call: told, recorded, survived
            usable = False
            error = (f"{call.name} failed inside the harness ({type(exc).__name__}: {exc}); this is not a fault of "
                     "your arguments. Try again, or do something else.")
            meta["traceback"] = traceback.format_exc(limit=8)
        news = self.tools.news()  # results of background runs reach the model with the next tool result
        runs = (output.runs if output else []) + (news.runs if news else [])
        if runs:
            meta["run_ids"] = [r.run_id for r in runs]
        text = "\n\n".join(t for t in (error or output.text, news.text if news else "") if t)
        self._record(call, None if error else text, error and text, started, meta)
        self._show(call, error, runs)
        return ToolResult(tool_call_id=call.id, name=call.name, content=text + "\n" + self.tools.budget_line(),
                          is_error=error is not None), usable

    def _record(self, call: ToolCall, output: str | None, error: str | None, started: float, meta: dict) -> None:
        self.trajectory.append(ToolCallEvent(
            tool=call.name, input=call.raw_arguments or json.dumps(call.arguments or {}), output=output,
            error=error, duration_ms=int((time.monotonic() - started) * 1000),
            metadata={"tool_call_id": call.id, **self._budget_meta(), **meta}))

    def _show(self, call: ToolCall, error: str | None, runs: list[RunResult]) -> None:
        if self.console is None:
            return
        if error:
            self.console.print(f"  {call.name}: [yellow]{escape(error.splitlines()[0][:160])}[/yellow]")
        for r in runs:
            if r.status == RunStatus.running:
                self.console.print(f"[bold]run {r.run_id}[/bold] started  {escape(r.description[:100])}")
            else:
                bpb = f"{r.val_bpb:.4f}" if r.val_bpb is not None else "-"
                self.console.print(f"[bold]run {r.run_id}[/bold] {r.status.value} val_bpb {bpb}  "
                                   f"{escape(r.description[:100])}")
        if call.name in ("write_note", "finish") and not error:
            args = call.arguments or {}
            text = args.get("text") or args.get("summary") or ""
            self.console.print(f"  [dim]{call.name}: {escape(str(text)[:200])}[/dim]")

    def _budget_meta(self) -> dict:
        s = self.tools.service.status()
        return {"runs_remaining": s.runs_remaining, "match_time_remaining_secs": round(s.match_time_remaining_secs, 1)}

    def step(self) -> None:
        """One model call and its tool calls, in order.

        After a call fails, the later calls of the same reply are not run (each gets a tool error
        saying so): they were written expecting it to succeed, an edit before a run above all. A
        reply cut at the output-token limit has its last call cut too; it is answered, not run.
        """
        reply = self.call_model()
        self.context.add(reply.to_message())  # keeps provider-native blocks (signed thinking)
        cut = reply.stop_reason in TRUNCATED_STOPS
        if not reply.tool_calls:
            self._malformed("Your reply was cut at the output-token limit before it made a tool call; write less "
                            "before acting." if cut else
                            "Your reply had no tool call. Act through the tools; call finish when you are done.")
            return
        usable_any = False
        failed = None
        for i, call in enumerate(reply.tool_calls):
            if failed is not None:
                skipped = (f"not run: the earlier call to {failed} in this reply failed, and later calls usually "
                           "depend on it. Send this call again if it still applies.")
                self._record(call, None, skipped, time.monotonic(), {})
                self.context.add(ToolResult(tool_call_id=call.id, name=call.name, is_error=True, content=skipped))
                continue
            if cut and i == len(reply.tool_calls) - 1:
                call = call.model_copy(update={"error": (
                    "your reply reached the output-token limit in the middle of this call, so its arguments are "
                    "incomplete; send it again, shorter (edit_file with a small change rather than write_file)")})
            result, usable = self.run_tool(call)
            self.context.add(result)
            usable_any |= usable
            if result.is_error:
                failed = call.name
        if usable_any:
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
        if ended := service_ended(self.tools.service):
            return ended
        if s.runs_remaining <= 0:
            return "all runs are used"
        if s.match_time_remaining_secs < self.run_timeout:
            return "too little match time is left for another run"
        return None

    # --- the loop --------------------------------------------------------------
    def run(self) -> str:
        """Run until a limit; return why it stopped. Runs in flight always end (recorded) before it returns."""
        try:
            while (why := self.budget_spent()) is None:
                self.step()
            raise BudgetSpent(why)
        except Finished:
            return "finished: " + self.summary
        except BudgetSpent as spent:
            self.trajectory.append(SessionEvent(event="limit", detail={"reason": str(spent)}))
            return self._final_turn(str(spent), self._settle())
        except (LimitReached, ProviderError):
            self._settle()
            raise

    def _settle(self) -> str:
        """Wait for the runs still training (they are charged), drop queued submissions; what happened, as text."""
        if self.console is not None and (self.tools.in_flight or self.tools.queued):
            self.console.print("waiting for the runs in flight to finish before the session ends")
        news = self.tools.settle()
        if news is None:
            return ""
        self.trajectory.append(SessionEvent(event="settled", detail={"news": news.text[:5000]}))
        self._show(ToolCall(id="", name="settle", arguments={}, raw_arguments=""), None, news.runs)
        return news.text + "\n\n"

    def _final_turn(self, why: str, news: str = "") -> str:
        self.context.notice(f"{news}The budget is spent ({why}); no more runs can start. Record your conclusions "
                            "with write_note (kind 'conclusion'), then call finish with a short summary.")
        try:
            for _ in range(FINAL_TURN_CALLS):
                self.step()
        except Finished:
            return f"budget spent ({why}); finished: {self.summary}"
        except LimitReached as exc:
            return f"budget spent ({why}); then {exc}"
        return f"budget spent ({why})"
