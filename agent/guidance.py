"""A person steers a running session: text written to `guidance.md` in its folder reaches the researcher once.

"Once" is by file: before each model call the loop takes `guidance.md` if it holds any text, renames it
to `guidance-<n>.md` (n = 1, 2, ... in the order delivered) and hands its text over. The renamed file
stays as the record of what was delivered; a new `guidance.md` is new guidance. The rename comes
before the read, so text written while it is read lands in a fresh file and is delivered next time.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GUIDANCE_FILE = "guidance.md"
LABEL = "Guidance from the person running this session"  # how the researcher recognises it
MAX_CHARS = 20_000  # of one delivery; the file keeps the rest


@dataclass(frozen=True)
class Guidance:
    text: str
    file: Path  # guidance-<n>.md, where the delivered text stays

    def message(self) -> str:
        """What the researcher reads, labelled as the person's words rather than the harness's."""
        cut = f"\n[cut at {MAX_CHARS} characters; the rest is in {self.file.name}]" if len(self.text) > MAX_CHARS else ""
        return (f"## {LABEL} (written to {GUIDANCE_FILE}; delivered once)\n\n{self.text[:MAX_CHARS]}{cut}\n\n"
                "Take it into account from now on. It is advice from the person, not a tool result.")


def take_guidance(session_dir: Path) -> Guidance | None:
    """The person's new guidance, claimed (renamed) so it is delivered only once; None when there is none.

    An empty file is left in place: the person may be about to write into it.
    """
    path = Path(session_dir) / GUIDANCE_FILE
    try:
        if not path.read_text(encoding="utf-8", errors="replace").strip():
            return None
    except (FileNotFoundError, IsADirectoryError):
        return None
    n = 1
    while (Path(session_dir) / f"guidance-{n}.md").exists():
        n += 1
    taken = Path(session_dir) / f"guidance-{n}.md"
    path.rename(taken)
    return Guidance(taken.read_text(encoding="utf-8", errors="replace").strip(), taken)


def guidance_in(text: str) -> str | None:
    """The person's text inside a message the loop delivered, or None (for researchers that read messages)."""
    if LABEL not in text:
        return None
    body = text.split(LABEL, 1)[1].split("\n\n", 1)[-1]
    return body.split("\n\nTake it into account from now on.", 1)[0].strip()
