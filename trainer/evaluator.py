"""The trusted evaluator: scores a run's model from outside its sandbox.

Inside the sandbox `prepare.evaluate_bpb` is a hand-off (see `prepare._hand_off`):
the script sends `ready`, then answers every `forward` frame (uint8 windows of
shape [n, T]) with a `logits` frame (float32, [n, T, VOCAB_SIZE]). This side
holds the targets and decides everything that matters for the number:

- the windows: always `prepare.eval_windows(val)`, in FORWARD_ROWS-row frames
  whatever batch size the script passed;
- the loss: `prepare.sum_nats` over our own log-softmax of the returned logits;
- a causality audit (see `_audit`);
- the verdict, sent back as `done` so the script's `evaluate_bpb` returns it.

The child is treated as hostile: frame sizes are bounded before anything is
read, every read and write has a deadline, and nothing it sends is trusted
beyond the logits themselves.
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import struct
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from trainer import prepare

FORWARD_ROWS = 64          # windows per forward frame: the evaluator's, never the script's B
AUDIT_WINDOWS = 8          # windows re-sent with their suffix replaced by random bytes
# Allowed change of a log-probability, times (1 + its largest magnitude). Honest float32 noise measures 0.0
# on the baseline for both checks. Across batch sizes a GPU may pick other kernels: in bf16 that moves a logit
# by up to one ulp (about 0.4 % of its size), hence the looser consistency bound; reading other rows or later
# bytes moves predictions by O(1).
AUDIT_RTOL = 1e-3
CONSISTENCY_RTOL = 2e-2
MAX_HEADER_BYTES = 64 * 1024
POLL_SECS = 0.2            # how often a blocked read or write checks for stop and the deadline


class ProtocolError(Exception):
    """The child broke the hand-off protocol; the message is the reason shown to the user."""


class Stopped(Exception):
    """The run ended (or the harness stopped the evaluation) while we waited on the pipe."""


@dataclass
class Evaluation:
    """What the evaluator established; the runner turns it into a RunResult."""

    ready_at: float | None = None   # time.monotonic() when `ready` arrived: the end of the training clock
    val_bpb: float | None = None    # set only when every window was scored with finite logits
    reasons: list[str] = field(default_factory=list)  # why the number cannot be trusted


class TrustedEvaluator:
    """Serves one run's hand-off over two pipe fds, which it owns and closes; `run` is meant for a thread."""

    def __init__(self, val: torch.Tensor, read_fd: int, write_fd: int, deadline: float, *,
                 audit_seed: int, rows: int = FORWARD_ROWS, audit_windows: int = AUDIT_WINDOWS):
        self.x, self.y = prepare.eval_windows(val)
        self.rows = rows
        self.rfd, self.wfd = read_fd, write_fd
        for fd in (read_fd, write_fd):  # a stalled child must never block us past the deadline
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self.deadline = deadline
        self.result = Evaluation()
        self._stop = threading.Event()
        n, t = self.x.shape
        g = torch.Generator().manual_seed(audit_seed)
        self.audit_idx = torch.randperm(n, generator=g)[:audit_windows].tolist()
        self.audit_pos = torch.randint(1, t, (len(self.audit_idx),), generator=g).tolist()
        self.audit_noise = torch.randint(0, prepare.VOCAB_SIZE, (len(self.audit_idx), t), generator=g)

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        try:
            self._serve()
        except ProtocolError as exc:
            self.result.reasons.append(str(exc))
        except Stopped:
            pass
        except Exception as exc:  # a bug here must surface in the result, not vanish with the thread
            self.result.reasons.append(f"trusted evaluator failed: {type(exc).__name__}: {exc}")
        finally:  # closing tells a child still waiting on us that no answer is coming
            os.close(self.rfd)
            os.close(self.wfd)

    # -- the protocol ---------------------------------------------------------

    def _serve(self) -> None:
        header = self._recv_header(eof_ok=True)
        if header is None:
            return  # the script exited without calling evaluate_bpb; the runner says so
        if header["op"] != "ready" or header["nbytes"]:
            raise ProtocolError(f"evaluation protocol violated: expected `ready` from evaluate_bpb, "
                                f"got {header['op']!r}")
        self.result.ready_at = time.monotonic()

        total, kept = 0.0, {}
        for start in range(0, self.x.shape[0], self.rows):
            logits = self._forward(self.x[start:start + self.rows])
            if not torch.isfinite(logits).all():
                self.result.reasons.append(
                    "the model returned NaN or inf logits on the validation windows, so there is no val_bpb "
                    "(training probably diverged: lower the learning rate or clip gradients)")
                self._send({"op": "done", "val_bpb": float("nan")})
                return self._watch_after_done()
            total += prepare.sum_nats(logits, self.y[start:start + self.rows])
            for w in self.audit_idx:
                if start <= w < start + self.rows:
                    kept[w] = logits[w - start].clone()
        val_bpb = prepare.bpb(total, self.y.numel())
        self._audit(kept)
        self.result.val_bpb = val_bpb
        self._send({"op": "done", "val_bpb": val_bpb})
        self._watch_after_done()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t = x.shape
        self._send({"op": "forward", "shape": [n, t]}, x.to(torch.uint8).numpy().tobytes())
        expected = n * t * prepare.VOCAB_SIZE * 4
        header = self._recv_header(max_payload=expected)
        if header["op"] == "error":
            raise ProtocolError(f"the model raised during evaluation: {str(header.get('message'))[:500]}")
        shape = [n, t, prepare.VOCAB_SIZE]
        if header["op"] != "logits" or header.get("shape") != shape or header["nbytes"] != expected:
            raise ProtocolError(f"evaluation protocol violated: expected logits of shape {shape}, "
                                f"got {header['op']!r} {header.get('shape')!r}")
        payload = self._read_exact(expected)
        return torch.frombuffer(payload, dtype=torch.float32).view(n, t, prepare.VOCAB_SIZE)

    def _audit(self, kept: dict[int, torch.Tensor]) -> None:
        """Causality and consistency audit, sent after all scoring windows.

        Each audited window goes out twice in one frame: as is, and with every
        input byte from a random position p on replaced by random bytes. Logits
        at positions < p must not change (position t may only see inputs 0..t),
        and the unchanged copy must match what the same window gave while being
        scored: the output must not depend on the other rows of a batch, which
        hold other val text, including the text that follows the window.

        Why this order leaks no targets: every byte we send is either an input
        byte of a scoring window, which the model sees when that window is
        scored anyway, or a random byte; the one target per window that is
        never an input (its last byte) is never sent in any frame.
        """
        rows = []
        for j, (w, p) in enumerate(zip(self.audit_idx, self.audit_pos)):
            changed = self.x[w].clone()
            changed[p:] = self.audit_noise[j, p:]
            rows += [self.x[w], changed]
        logits = self._forward(torch.stack(rows))
        if not torch.isfinite(logits).all():
            self.result.reasons.append("the model returned NaN or inf logits on the audit windows")
            return
        logp = F.log_softmax(logits.double(), dim=-1)  # what is scored: a shift of all logits changes nothing
        for j, (w, p) in enumerate(zip(self.audit_idx, self.audit_pos)):
            same, changed = logp[2 * j], logp[2 * j + 1]
            moved = (same[:p] - changed[:p]).abs().amax(dim=-1)
            bad = (moved > AUDIT_RTOL * (1 + same[:p].abs().max())).nonzero()
            if len(bad):
                i = int(bad[0])
                self.result.reasons.append(
                    f"causality audit failed: logits at position {i} changed (log-probs by {float(moved[i]):.3g}) "
                    f"when only bytes from position {p} on changed (model looks ahead); "
                    "position t may only use inputs 0..t")
                return
            scored = F.log_softmax(kept[w].double(), dim=-1)
            drift = float((same - scored).abs().max())
            if drift > CONSISTENCY_RTOL * (1 + float(scored.abs().max())):
                self.result.reasons.append(
                    f"consistency audit failed: validation window {w} gave different predictions (log-probs by "
                    f"{drift:.3g}) in two batches; the model's output must not depend on the other rows of a batch")
                return

    def _watch_after_done(self) -> None:
        """Anything the child sends after `done` is a second evaluation attempt or a protocol breach."""
        header = self._recv_header(eof_ok=True, max_payload=0)
        if header is None:
            return
        if header["op"] == "ready":
            self.result.reasons.append("evaluate_bpb was called more than once; a run may evaluate once, "
                                       "so the first number is not trusted either")
        else:
            self.result.reasons.append(
                f"evaluation protocol violated: unexpected {header['op']!r} after the evaluation")

    # -- bounded frame I/O ------------------------------------------------------

    def _send(self, header: dict, payload: bytes = b"") -> None:
        head = json.dumps({**header, "nbytes": len(payload)}).encode()
        view = memoryview(struct.pack(">I", len(head)) + head + payload)
        while view:
            self._wait(self.wfd, select.POLLOUT)
            try:
                view = view[os.write(self.wfd, view):]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                raise Stopped from None  # the child is gone; the runner reports its exit

    def _recv_header(self, *, eof_ok: bool = False, max_payload: int = 0) -> dict | None:
        raw = self._read_exact(4, eof_ok=eof_ok)
        if raw is None:
            return None
        (size,) = struct.unpack(">I", raw)
        if size > MAX_HEADER_BYTES:
            raise ProtocolError(f"evaluation protocol violated: a {size}-byte frame header "
                                f"(the limit is {MAX_HEADER_BYTES})")
        try:
            header = json.loads(bytes(self._read_exact(size)))
        except ValueError:
            raise ProtocolError("evaluation protocol violated: a frame header is not JSON") from None
        if not (isinstance(header, dict) and isinstance(header.get("op"), str)
                and isinstance(header.get("nbytes"), int) and 0 <= header["nbytes"] <= max_payload):
            raise ProtocolError(f"evaluation protocol violated: bad frame header {str(header)[:200]}")
        if header["op"] != "logits" and header["nbytes"]:
            raise ProtocolError(f"evaluation protocol violated: {header['op']!r} frame with a payload")
        return header

    def _read_exact(self, n: int, *, eof_ok: bool = False) -> bytearray | None:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            self._wait(self.rfd, select.POLLIN)
            try:
                k = os.readv(self.rfd, [view[got:]])
            except BlockingIOError:
                continue
            if k == 0:
                if eof_ok and got == 0:
                    return None
                raise ProtocolError("the script closed the evaluation pipe in the middle of the evaluation")
            got += k
        return buf

    def _wait(self, fd: int, event: int) -> None:
        poller = select.poll()
        poller.register(fd, event)
        while True:
            if self._stop.is_set():
                raise Stopped
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise Stopped
            if poller.poll(min(POLL_SECS, left) * 1000):
                return


def load_val(data_dir) -> torch.Tensor:
    """The real val split, read by the harness (never by the sandbox)."""
    path = os.path.join(data_dir, "val.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run `pgolf-agent data` to build the corpus cache")
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)

