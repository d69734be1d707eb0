"""How a session stopped, and the exit code of every command: declared here, listed by `--help` and the README."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from enum import Enum, IntEnum


class ExitCode(IntEnum):
    doc: str

    def __new__(cls, code: int, doc: str):
        member = int.__new__(cls, code)
        member._value_ = code
        member.doc = doc
        return member

    OK = 0, ("`run`: the budget is spent, the researcher called finish or a person stopped it at the approval prompt; "
             "`submit`: a verified run; others: done")
    ERROR = 1, "an unexpected error in the harness (the session's record is still written)"
    SETUP = 2, ("nothing started: a bad flag or file, not a session folder, no corpus, no API key, Ray or the "
                "sandbox unavailable, the session in use; `submit`: the run was refused (not charged)")
    LIMIT = 3, "`run`: stopped by --max-llm-calls, --max-cost or too many malformed model replies"
    API_FAILURE = 4, "`run`: the model's API failed and its retries ran out"
    NOT_VERIFIED = 5, ("`submit`: the run was charged but is not verified (crashed, timed out or flagged); `rerun`: "
                       "no rerun gave a score that counts")
    INVALID = 6, ("`export`: no verified run, so no submission; `export --check`: the file is not a submission "
                  "the arena accepts and verifies")
    INTERRUPTED = 130, "Ctrl-C (a run in flight is stopped and recorded `interrupted`; the record is written)"


def exit_codes_help() -> str:
    """The `--help` epilog."""
    return "exit codes:\n" + "\n".join(textwrap.fill(code.doc, 100, initial_indent=f"  {code.value:<4} ",
                                                     subsequent_indent=" " * 7) for code in ExitCode)


def exit_codes_table() -> str:
    """The README's table (a test keeps the two the same)."""
    return "| code | meaning |\n|---|---|\n" + "\n".join(f"| {code.value} | {code.doc} |" for code in ExitCode)


class StopKind(str, Enum):
    finished = "finished"          # the researcher called finish
    budget_spent = "budget_spent"  # no run or match time left
    limit = "limit"                # --max-llm-calls, --max-cost, malformed replies
    api_failure = "api_failure"
    stopped = "stopped"            # a person chose "stop" at the approval prompt
    interrupted = "interrupted"    # Ctrl-C
    error = "error"                # a bug in the harness


EXIT_CODES = {StopKind.finished: ExitCode.OK, StopKind.budget_spent: ExitCode.OK, StopKind.stopped: ExitCode.OK,
              StopKind.limit: ExitCode.LIMIT, StopKind.api_failure: ExitCode.API_FAILURE,
              StopKind.interrupted: ExitCode.INTERRUPTED, StopKind.error: ExitCode.ERROR}


@dataclass(frozen=True)
class SessionEnd:
    """Why a session stopped: the kind decides the exit code, the reason is for people."""

    kind: StopKind
    reason: str

    @property
    def exit_code(self) -> ExitCode:
        return EXIT_CODES[self.kind]

    def __str__(self) -> str:
        return self.reason
