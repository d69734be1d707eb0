"""The trusted evaluator: scores a run's frozen model from outside both of its sandboxes.

The training sandbox talks to it over two pipes (see `prepare._hand_off`):
the launcher sends `start` just before train.py's first line (the training
clock starts), and `evaluate_bpb` sends `ready` with the model frozen as
bytes (the clock stops). The training processes are then stopped, and the
snapshot goes to the evaluation sandbox (`trainer/eval_server.py`), which
answers every frame of windows with logits from a fresh process that loaded
the snapshot and nothing else. When the number is known, the evaluation
sandbox is gone, the training processes continue, and `done` carries the
number back to the script.

This side decides everything that matters for the number:
- the windows: always `prepare.eval_windows(val)`, whatever batch size the script passed;
- the windows: the same val bytes as token ids when the script used `subword.py`, with a tokenizer
  the harness builds itself from the script's settings, scored exactly in bits per byte;
- the frames: every window once, plus a quarter as many audit copies, shuffled into frames of
  FRAME_ROWS rows, so a row's neighbours are random windows and no copy shares a frame with
  its original;
- the loss: `prepare.sum_nats` over our own log-softmax of the returned logits;
- the audit (see `_compare`), with tolerances the harness sets, not the model;
- what the costliest frame took (the smaller of its processes' CPU time and its wall clock; wall
  clock on a GPU): a frame could train the snapshot before answering, so the runner counts it on
  the clock.

Frames are served by processes that cannot keep state from one frame to the
next, so a model cannot recognise a window it has seen, remember what it
answered, or learn from the windows it was shown: an audit copy is answered
by the same function of its own bytes as every other row.
"""
from __future__ import annotations

import builtins
import fcntl
import json
import os
import select
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from trainer import prepare

FRAME_ROWS = 128           # windows per frame (fewer for a large vocabulary): the evaluator's, never the script's B
FRAME_LOGIT_BYTES = 32 << 20  # a frame's logits at most (128 byte-level rows)
AUDIT_SHARE = 0.25         # of the windows, sent a second time with their suffix replaced (128 of 512 bytes rows)
# Allowed change of a log-probability between a window and its audit copy, in nats, before the first
# replaced byte. The same frozen model in a fresh process gives bit-identical float32 logits on a CPU
# (measured: 0.0); a GPU may pick other kernels for another batch. A model that uses the bytes after
# position t at t cannot gain more than the tolerance per byte and pass (see _compare).
TOLERANCE_NATS = {"cpu": 1e-3, "cuda": 2e-2}
LOGP_FLOOR = -30.0         # log-probs below this are compared as this: a byte that improbable costs 43 bits
MAX_HEADER_BYTES = 64 * 1024
PIPE_BYTES = 1 << 20       # the default maximum an unprivileged process may ask for
POLL_SECS = 0.2            # how often a blocked read or write checks for stop and the deadline


class ProtocolError(Exception):
    """A sandbox broke the hand-off protocol; the message is the reason shown to the user."""


class Stopped(Exception):
    """The run ended (or the harness stopped the evaluation) while we waited on a pipe."""


@dataclass
class Evaluation:
    """What the evaluator established; the runner turns it into the run's outcome."""

    started_at: float | None = None  # time.monotonic() of `start`: the training clock starts
    ready_at: float | None = None    # time.monotonic() of `ready`: the training clock stops
    val_bpb: float | None = None     # set only when every window was scored with finite logits and audited
    done_at: float | None = None     # time.monotonic() when the number was known
    max_frame_secs: float = 0.0      # the costliest frame: the smaller of its CPU and wall seconds (wall on a GPU)
    frames: int = 0
    reasons: list[str] = field(default_factory=list)  # why the number cannot be trusted


class FramePipe:
    """Bounded frame I/O over a pair of non-blocking pipe fds that this object owns."""

    def __init__(self, read_fd: int, write_fd: int, deadline: float, stop: threading.Event, peer: str,
                 report_fd: int | None = None):
        self.rfd, self.wfd = read_fd, write_fd
        self.report = report_fd  # the evaluation server's own reports, which no frame can write to
        # a stalled peer must never block us past the deadline
        for fd in (read_fd, write_fd) + ((report_fd,) if report_fd is not None else ()):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
            try:  # a frame of logits is 16 MiB: fewer, larger transfers
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:
                pass
        self.deadline, self.stop, self.peer = deadline, stop, peer

    def close(self) -> None:
        for fd in (self.rfd, self.wfd, self.report):
            if fd is None:
                continue
            try:
                os.close(fd)
            except OSError:
                pass

    def send(self, header: dict, payload=b"") -> None:
        payload = memoryview(payload).cast("B")
        head = json.dumps({**header, "nbytes": len(payload)}).encode()
        for part in (struct.pack(">I", len(head)) + head, payload):
            view = memoryview(part)
            while view:
                self._wait(self.wfd, select.POLLOUT)
                try:
                    view = view[os.write(self.wfd, view):]
                except BlockingIOError:
                    continue
                except BrokenPipeError:
                    raise Stopped from None  # the peer is gone; the runner reports why

    def recv(self, *, max_payload: int = 0, eof_ok: bool = False,
             report: bool = False) -> tuple[dict, bytearray] | None:
        fd = self.report if report else self.rfd
        raw = self._read_exact(4, eof_ok=eof_ok, fd=fd)
        if raw is None:
            return None
        (size,) = struct.unpack(">I", raw)
        if size > MAX_HEADER_BYTES:
            raise ProtocolError(f"evaluation protocol violated: a {size}-byte frame header from the "
                                f"{self.peer} (the limit is {MAX_HEADER_BYTES})")
        try:
            header = json.loads(bytes(self._read_exact(size, fd=fd)))
        except ValueError:
            raise ProtocolError(f"evaluation protocol violated: a frame header from the {self.peer} "
                                "is not JSON") from None
        if not (isinstance(header, dict) and isinstance(header.get("op"), str)
                and isinstance(header.get("nbytes"), int) and 0 <= header["nbytes"] <= max_payload):
            raise ProtocolError(f"evaluation protocol violated: bad frame header from the {self.peer}: "
                                f"{str(header)[:200]}")
        return header, self._read_exact(header["nbytes"], fd=fd)

    def _read_exact(self, n: int, *, eof_ok: bool = False, fd: int | None = None) -> bytearray | None:
        fd = self.rfd if fd is None else fd
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            self._wait(fd, select.POLLIN)
            try:
                k = os.readv(fd, [view[got:]])
            except BlockingIOError:
                continue
            if k == 0:
                if eof_ok and got == 0:
                    return None
                raise ProtocolError(f"the {self.peer} closed the evaluation pipe in the middle of the evaluation")
            got += k
        return buf

    def _wait(self, fd: int, event: int) -> None:
        poller = select.poll()
        poller.register(fd, event)
        while True:
            if self.stop.is_set() or time.monotonic() >= self.deadline:
                raise Stopped
            if poller.poll(min(POLL_SECS, self.deadline - time.monotonic()) * 1000):
                return


@dataclass
class Windows:
    """What is scored: input rows, their targets, which targets count, and the bytes they stand for."""

    x: torch.Tensor      # (n, T) int64 ids
    y: torch.Tensor      # (n, T) int64 ids
    mask: torch.Tensor   # (n, T) bool: real targets (a subword span's last row is padded)
    n_bytes: int         # the val bytes the targets encode: bits per byte = nats / ln 2 / n_bytes
    vocab: int

    @classmethod
    def of_bytes(cls, val: torch.Tensor) -> "Windows":
        x, y = prepare.eval_windows(val)
        return cls(x, y, torch.ones_like(y, dtype=torch.bool), y.numel(), prepare.VOCAB_SIZE)

    @classmethod
    def of_subwords(cls, val: torch.Tensor, train: bytes, settings) -> "Windows":
        """The same val bytes, tokenized by a tokenizer the harness builds itself from the script's settings."""
        from trainer import subword

        if not isinstance(settings, dict):
            raise ProtocolError("evaluation protocol violated: the tokenizer settings are not an object")
        try:
            tok = subword.get_subword_tokenizer(settings.get("vocab_size"), settings.get("model_type"), train=train)
        except ValueError as exc:
            raise ProtocolError(f"the subword tokenizer the script asked for cannot be built: {exc}") from None
        if settings.get("sha256") != tok.sha256:
            raise ProtocolError("the script's subword tokenizer is not the one subword.get_subword_tokenizer builds "
                                f"for {settings.get('model_type')}-{settings.get('vocab_size')}: the harness scores "
                                "with its own, so the model must use that one")
        x, y, mask = subword.subword_eval_windows(tok, val)
        return cls(x, y, mask, int(tok.token_bytes[y[mask]].sum()), tok.vocab_size)


@dataclass
class Row:
    """One row of a frame: window `window` as is (cut None), or its audit copy cut at `cut`."""

    window: int
    cut: int | None = None  # audit copies: bytes from here on come from window `donor`
    donor: int = 0


def plan_frames(x: torch.Tensor, rows: int, audits: int, g: torch.Generator) -> list[list[Row]]:
    """Every window of x (n, T) once and `audits` audit copies, shuffled into frames; no copy beside
    its original. A copy's donor differs from its window at the cut, so a model that reads the byte
    after position cut-1 gives itself away there."""
    n, t = x.shape
    chosen = torch.randperm(n, generator=g)[:audits].tolist()
    cuts = torch.randint(1, t + 1, (len(chosen),), generator=g).tolist()  # t: an identical copy
    donors = [_donor(x, w, c, g) for w, c in zip(chosen, cuts)]
    all_rows = [Row(w) for w in range(n)] + [Row(w, c, d) for w, c, d in zip(chosen, cuts, donors)]
    order = [all_rows[i] for i in torch.randperm(len(all_rows), generator=g).tolist()]
    frames = [order[i:i + rows] for i in range(0, len(order), rows)]

    def clash(frame: list[Row], row: Row, ignore: Row | None = None) -> bool:
        return any(o is not ignore and o is not row and o.window == row.window for o in frame)

    for f, frame in enumerate(frames):
        for i, row in enumerate(frame):
            while clash(frame, row):  # swap it with a row of another frame where neither clashes
                f2 = int(torch.randint(0, len(frames), (1,), generator=g))
                j = int(torch.randint(0, len(frames[f2]), (1,), generator=g))
                other = frames[f2][j]
                if f2 != f and not clash(frames[f2], row, ignore=other) and not clash(frame, other, ignore=row):
                    frame[i], frames[f2][j] = other, row
                    row = other
    return frames


def _donor(x: torch.Tensor, window: int, cut: int, g: torch.Generator, tries: int = 64) -> int:
    """Another window whose input at `cut` differs from this one's (any other one if none is found)."""
    n, t = x.shape
    for _ in range(tries):
        donor = (window + 1 + int(torch.randint(0, n - 1, (1,), generator=g))) % n
        if cut == t or x[donor, cut] != x[window, cut]:
            return donor
    return donor


class TrustedEvaluator:
    """Serves one run's hand-off; `run` is meant for a thread. Owns both pipes and closes them."""

    def __init__(self, val: torch.Tensor, train: Callable[[], bytes], training: FramePipe, *,
                 start_server: Callable[[], FramePipe], freeze: Callable[[], None], thaw: Callable[[], None],
                 stop_server: Callable[[], None], seed: int, gpu: bool = False, max_snapshot_bytes: int = 1 << 30):
        self.val, self.train = val, train
        self.training = training
        self.start_server, self.freeze, self.thaw, self.stop_server = start_server, freeze, thaw, stop_server
        self.cpu_run = not gpu
        self.tolerance = TOLERANCE_NATS["cuda" if gpu else "cpu"]
        self.max_snapshot_bytes = max_snapshot_bytes
        self.seed = seed
        self.result = Evaluation()

    def stop(self) -> None:
        self.training.stop.set()

    def run(self) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # scoring on one core leaves the others to the frame computing meanwhile
        try:
            self._serve()
        except ProtocolError as exc:
            self.result.reasons.append(str(exc))
        except Stopped:
            pass
        except Exception as exc:  # a bug here must surface in the result, not vanish with the thread
            self.result.reasons.append(f"trusted evaluator failed: {type(exc).__name__}: {exc}")
        finally:
            torch.set_num_threads(threads)
            self.training.close()  # tells a script still waiting on us that no answer is coming

    def _serve(self) -> None:
        first = self.training.recv(eof_ok=True)
        if first is None:
            return  # the launcher never got as far as the script; the runner reports the exit
        if first[0]["op"] != "start":
            raise ProtocolError(f"evaluation protocol violated: expected `start`, got {first[0]['op']!r}")
        self.result.started_at = time.monotonic()
        frame = self.training.recv(eof_ok=True, max_payload=self.max_snapshot_bytes)
        if frame is None:
            return  # the script exited without calling evaluate_bpb; the runner says so
        header, snapshot = frame
        if header["op"] != "ready" or not header["nbytes"]:
            raise ProtocolError(f"evaluation protocol violated: expected `ready` with the model from "
                                f"evaluate_bpb, got {header['op']!r}")
        self.result.ready_at = time.monotonic()
        self.freeze()
        try:
            windows = (Windows.of_subwords(self.val, self.train(), header["tokenizer"]) if header.get("tokenizer")
                       else Windows.of_bytes(self.val))
            batch = header.get("batch")  # the script's B: how many rows the model gets per call, as in-process
            batch = min(max(batch, 1), FRAME_ROWS) if isinstance(batch, int) else FRAME_ROWS
            val_bpb = self._evaluate(windows, bytes(snapshot), str(header.get("device", "cpu"))[:64], batch)
        finally:
            self.result.done_at = time.monotonic()
            self.stop_server()
            self.thaw()
        self._answer(val_bpb)

    def _answer(self, val_bpb: float | None) -> None:
        self.training.send({"op": "done", "val_bpb": float("nan") if val_bpb is None else val_bpb})
        again = self.training.recv(eof_ok=True)  # anything after `done` is a second evaluation or a breach
        if again is None:
            return
        if again[0]["op"] == "ready":
            self.result.val_bpb = None
            self.result.reasons.append("evaluate_bpb was called more than once; a run may evaluate once, "
                                       "so the first number is not trusted either")
        else:
            self.result.reasons.append(f"evaluation protocol violated: unexpected {again[0]['op']!r} "
                                       "after the evaluation")

    def _evaluate(self, w: Windows, snapshot: bytes, device: str, batch: int) -> float | None:
        n, t = w.x.shape
        # a frame's logits stay near FRAME_LOGIT_BYTES whatever the vocabulary
        rows = max(8, min(FRAME_ROWS, FRAME_LOGIT_BYTES // (t * w.vocab * 4)))
        frames = plan_frames(w.x, rows, round(n * AUDIT_SHARE), torch.Generator().manual_seed(self.seed))
        audited = {r.window for frame in frames for r in frame if r.cut is not None}
        server = self.start_server()
        server.send({"op": "snapshot", "device": device, "batch": batch, "vocab": w.vocab}, snapshot)
        nats, pending = 0.0, {}
        self._request(server, w, frames[0])
        for k, frame in enumerate(frames):
            logits = self._receive(server, w, frame)
            if k + 1 < len(frames):  # the next frame computes while this one is scored
                self._request(server, w, frames[k + 1])
            if not torch.isfinite(logits).all():
                self.result.reasons.append(
                    "the model returned NaN or inf logits on the validation windows, so there is no val_bpb "
                    "(training probably diverged: lower the learning rate or clip gradients)")
                return None
            scored = [i for i, row in enumerate(frame) if row.cut is None]
            ids = [frame[i].window for i in scored]
            mask = w.mask[ids]
            nats += prepare.sum_nats(logits[scored][mask], w.y[ids][mask])
            for i, row in enumerate(frame):
                if row.window in audited:  # kept until the window and its copy have both been seen
                    both = pending.setdefault(row.window, {})
                    both["copy" if row.cut is not None else "scored"] = (row, logits[i].clone())
                    if len(both) == 2:
                        del pending[row.window]
                        (copy, copy_logits), (_, scored_logits) = both["copy"], both["scored"]
                        failure = _compare(scored_logits, copy_logits, copy.cut, copy.window, self.tolerance)
                        if failure:
                            self.result.reasons.append(failure)
                            return None
        self.result.val_bpb = prepare.bpb(nats, w.n_bytes)
        return self.result.val_bpb

    def _request(self, server: FramePipe, w: Windows, frame: list[Row]) -> None:
        x = torch.stack([w.x[r.window] if r.cut is None else
                         torch.cat([w.x[r.window][:r.cut], w.x[r.donor][r.cut:]]) for r in frame])
        dtype = torch.uint8 if w.vocab <= 256 else torch.int32
        self._sent_at = time.monotonic()
        server.send({"op": "forward", "shape": list(x.shape), "dtype": str(dtype).removeprefix("torch.")},
                    x.to(dtype).numpy())

    def _receive(self, server: FramePipe, w: Windows, frame: list[Row]) -> torch.Tensor:
        n, t = len(frame), w.x.shape[1]
        expected = n * t * w.vocab * 4
        header, payload = server.recv(max_payload=expected)
        if header["op"] == "error":
            kind = header.get("kind")
            builtin = isinstance(getattr(builtins, str(kind), None), type) and issubclass(getattr(builtins, kind), BaseException)
            raise ProtocolError(f"the model raised {kind if builtin else 'an exception'} during evaluation (its message "
                                "stays in the sandbox: it could carry validation text; a ValueError or TypeError usually "
                                "means model(x) did not return logits of shape (B, T, vocab)); call the model on a "
                                "training batch before evaluate_bpb to see the error in your own log")
        shape = [n, t, w.vocab]
        if header["op"] != "logits" or header.get("shape") != shape or header["nbytes"] != expected:
            raise ProtocolError(f"evaluation protocol violated: expected logits of shape {shape}, "
                                f"got {header['op']!r} {header.get('shape')!r}")
        wall = time.monotonic() - self._sent_at
        report, _ = server.recv(report=True)
        cpu = report.get("cpu_secs")
        if report["op"] != "frame" or not isinstance(cpu, (int, float)):
            raise ProtocolError(f"evaluation server: unexpected report {str(report)[:200]}")
        # The time a frame could have spent training: a busy machine stretches its wall clock but not its CPU
        # time, threads multiply its CPU time but not its wall clock, so the smaller of the two. (A GPU
        # works while its CPU thread waits: wall clock there.)
        self.result.frames += 1
        self.result.max_frame_secs = max(self.result.max_frame_secs, min(wall, cpu) if self.cpu_run else wall)
        return torch.frombuffer(payload, dtype=torch.float32).view(n, t, w.vocab)


def _compare(scored: torch.Tensor, copy: torch.Tensor, cut: int, window: int, tolerance: float) -> str | None:
    """Why a window and its audit copy disagree where they may not, or None.

    The copy holds the window's bytes before `cut` and another window's after it, in another
    frame among other neighbours. Position t may only use inputs 0..t of its own row, so the
    log-probs at positions before the cut must match. They are compared in absolute nats,
    floored at LOGP_FLOOR: huge logits on bytes that never occur move no tolerance. A model
    whose prediction at t moves with byte t+1 by less than the tolerance gains less than the
    tolerance per byte from it.
    """
    a = F.log_softmax(scored[:cut].double(), dim=-1).clamp(min=LOGP_FLOOR)
    b = F.log_softmax(copy[:cut].double(), dim=-1).clamp(min=LOGP_FLOOR)
    moved = (a - b).abs().amax(dim=-1)
    bad = (moved > tolerance).nonzero()
    if not len(bad):
        return None
    i = int(bad[0])
    kind, change = (("consistency", "sent again in another batch") if cut == scored.shape[0] else
                    ("causality", f"sent again in another batch with only the bytes from position {cut} on replaced"))
    return (f"{kind} audit failed: validation window {window}'s log-probs at position {i} moved by "
            f"{float(moved[i]):.3g} nats (tolerance {tolerance:g}) when it was {change}; position t may use only "
            "inputs 0..t of its own row (the model looks ahead, depends on other rows of its batch, or keeps state "
            "between calls)")


def load_val(data_dir) -> torch.Tensor:
    """The real val split, read by the harness (never by the sandbox)."""
    path = os.path.join(data_dir, "val.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run `pgolf-agent data` to build the corpus cache")
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
