"""Fixed module for pgolf-agent runs. READ-ONLY for the agent; `train.py` imports it.

Compatible with the reference "training-lab" service: the same constants,
`ByteTokenizer`, `make_dataloader` and `evaluate_bpb` signatures, so a
`train.py` written for that service runs unchanged.

`evaluate_bpb` always scores the same windows -- the first EVAL_TOKENS bytes of
val as rows of BOS + MAX_SEQ_LEN bytes -- whatever batch size is passed, and
computes the cross-entropy itself from the logits `model(x)` returns, never
from a loss the model computes. Inside the training sandbox it is a hand-off:
it serves the model to the trusted evaluator outside (windows in, logits out)
and returns the number that evaluator computed.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys

import torch
import torch.nn.functional as F

MAX_SEQ_LEN = 256        # context length (one token per byte)
EVAL_TOKENS = 2 * 65536  # bytes of val scored by evaluate_bpb
VOCAB_SIZE = 256         # byte-level: every byte value is a token
BOS_TOKEN = 0            # the null byte marks the start of a row
DEFAULT_TIME_BUDGET = 180

# Set only by the harness (the training service), which records the value it set.
TIME_BUDGET_ENV = "PGOLF_TIME_BUDGET"
DATA_DIR_ENV = "PGOLF_DATA_DIR"
HANDOFF_ENV = "PGOLF_EVAL_FDS"  # "read_fd,write_fd" of the pipes to the trusted evaluator


def _time_budget() -> float:
    raw = os.environ.get(TIME_BUDGET_ENV)
    if raw is None:
        return DEFAULT_TIME_BUDGET
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{TIME_BUDGET_ENV}={raw!r} is not a number of seconds") from None
    if not 0 < value <= DEFAULT_TIME_BUDGET:
        raise ValueError(f"{TIME_BUDGET_ENV}={raw} must be in (0, {DEFAULT_TIME_BUDGET}]: the harness may only lower it")
    print(f"prepare: TIME_BUDGET set to {value:g} s by the harness ({TIME_BUDGET_ENV})", file=sys.stderr)
    return int(value) if value.is_integer() else value


TIME_BUDGET = _time_budget()


def _data_dir() -> str:
    if os.environ.get(DATA_DIR_ENV):
        return os.environ[DATA_DIR_ENV]
    try:  # outside the sandbox: the user's verified cache
        from trainer.corpus import ensure_corpus
    except ImportError:
        raise RuntimeError(f"set {DATA_DIR_ENV} to the folder holding train.bin and val.bin, "
                           "or install pgolf-agent so the corpus cache can be found") from None
    return str(ensure_corpus().directory)


class ByteTokenizer:
    """Byte-level tokenizer: every byte value 0-255 is a token."""

    def __init__(self):
        self.vocab_size = VOCAB_SIZE
        self.bos_token_id = BOS_TOKEN

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def get_vocab_size(self) -> int:
        return self.vocab_size

    def get_bos_token_id(self) -> int:
        return self.bos_token_id


_SPLITS: dict[str, torch.Tensor] = {}


def load_split(split: str) -> torch.Tensor:
    """The split's byte stream as a 1-D uint8 tensor."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}: use 'train' or 'val'")
    if split not in _SPLITS:
        path = os.path.join(_data_dir(), f"{split}.bin")
        if not os.path.exists(path):
            if split == "val":
                raise FileNotFoundError(
                    "the val split is not available during training: the harness scores the model "
                    "itself when the script calls evaluate_bpb(model, B, device)")
            raise FileNotFoundError(f"{path} is missing: run `pgolf-agent data` to build the corpus cache")
        with open(path, "rb") as f:
            _SPLITS[split] = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    return _SPLITS[split]


def make_dataloader(B: int, T: int, split: str = "train", device: str = "cpu"):
    """Infinite iterator of (inputs, targets), each (B, T) int64.

    Every row is BOS followed by the next T bytes of the split's stream
    (wrapping at the end); inputs = row[:-1], targets = row[1:].
    """
    return stream_batches(lambda: load_split(split), B, T, BOS_TOKEN, device)


def stream_batches(load, B: int, T: int, bos: int, device: str = "cpu"):
    """Rows of `bos` + the next T ids of the stream `load()` returns, B at a time, wrapping at the end."""
    if not (isinstance(B, int) and B >= 1):
        raise ValueError(f"batch size B={B!r} must be a positive integer")
    if not (isinstance(T, int) and 1 <= T <= MAX_SEQ_LEN):
        raise ValueError(f"sequence length T={T!r} must be an integer in [1, MAX_SEQ_LEN={MAX_SEQ_LEN}]")
    data = load()  # after the argument checks, so a bad call fails before any loading

    def batches():
        n = len(data)
        pos = 0
        offsets = torch.arange(T)
        while True:
            starts = (pos + torch.arange(B) * T).unsqueeze(1)
            rows = torch.empty((B, T + 1), dtype=torch.long)
            rows[:, 0] = bos
            rows[:, 1:] = data[(starts + offsets) % n].long()
            pos = (pos + B * T) % n
            yield rows[:, :-1].to(device), rows[:, 1:].to(device)

    return batches()


# ---------------------------------------------------------------------------
# The metric (shared with the trusted evaluator)
# ---------------------------------------------------------------------------

def eval_windows(val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed eval windows: the first EVAL_TOKENS bytes of val as rows of BOS + MAX_SEQ_LEN bytes."""
    if len(val) < EVAL_TOKENS:
        raise ValueError(f"val split has {len(val)} bytes, fewer than EVAL_TOKENS={EVAL_TOKENS}")
    body = val[:EVAL_TOKENS].long().view(-1, MAX_SEQ_LEN)
    rows = torch.cat([torch.full((body.shape[0], 1), BOS_TOKEN, dtype=torch.long), body], dim=1)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def logits_of(model, x: torch.Tensor, vocab_size: int = VOCAB_SIZE, caller: str = "evaluate_bpb") -> torch.Tensor:
    """model(x) as float32 logits of shape (n, T, vocab_size), or a clear error."""
    out = model(x)
    if isinstance(out, (tuple, list)):  # (logits, loss)-style models
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{caller}: model(x) returned {type(out).__name__}; it must return logits "
                        f"of shape (B, T, {vocab_size}) when called without targets")
    expected = (x.shape[0], x.shape[1], vocab_size)
    if tuple(out.shape) != expected:
        raise ValueError(f"{caller}: model(x) returned shape {tuple(out.shape)}, expected {expected} "
                         "(batch, time, vocab): return logits, not a loss or probabilities")
    return out.detach().float().cpu()


def sum_nats(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Total cross-entropy in nats, from our own log-softmax of the logits.

    Each position in float32 (within 1e-6 of float64, and four times faster), the sum in float64.
    """
    nats = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    return float(nats.double().sum())


def bpb(total_nats: float, n_bytes: int) -> float:
    return total_nats / (math.log(2) * n_bytes)


@torch.no_grad()
def evaluate_bpb(model, B: int, device: str = "cpu") -> float:
    """Bits per byte on the fixed val windows; B only sets the chunk size."""
    if os.environ.get(HANDOFF_ENV):
        return _hand_off(model, B, device)
    x, y = eval_windows(load_split("val"))
    was_training = getattr(model, "training", False)
    model.eval()
    chunk = max(1, int(B))
    total = 0.0
    for i in range(0, x.shape[0], chunk):
        total += sum_nats(logits_of(model, x[i:i + chunk].to(device)), y[i:i + chunk])
    if was_training:
        model.train()
    return bpb(total, y.numel())


# ---------------------------------------------------------------------------
# Hand-off to the trusted evaluator (inside the sandbox)
# ---------------------------------------------------------------------------
# Frames: 4-byte big-endian header length, a JSON header, then `nbytes` raw bytes.

def send_frame(fd: int, header: dict, payload=b"") -> None:
    """payload: bytes or any contiguous buffer (a numpy array is sent without a copy)."""
    payload = memoryview(payload).cast("B")
    head = json.dumps({**header, "nbytes": len(payload)}).encode()
    for view in (memoryview(struct.pack(">I", len(head)) + head), payload):
        while view:
            view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int) -> bytes:
    parts, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("evaluation pipe closed")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def recv_frame(fd: int) -> tuple[dict, bytes]:
    (size,) = struct.unpack(">I", _read_exact(fd, 4))
    header = json.loads(_read_exact(fd, size))
    return header, _read_exact(fd, header["nbytes"])


_handed_off = False


def _hand_off(model, B: int, device: str, tokenizer: dict | None = None) -> float:
    """Freeze the model as bytes, hand them to the trusted evaluator, and wait for its number.

    The `ready` frame stops the training clock; the evaluator scores the snapshot in a sandbox of its
    own, so nothing this process does afterwards can change the number. `tokenizer` (from
    subword.py) names the subword tokenizer the model reads; the evaluator builds its own copy.
    """
    global _handed_off
    rfd, wfd = (int(v) for v in os.environ[HANDOFF_ENV].split(","))
    if _handed_off:
        try:  # a second `ready` tells the evaluator, which flags the run
            send_frame(wfd, {"op": "ready"})
        except OSError:
            pass
        raise RuntimeError("evaluate_bpb may be called once per run")
    _handed_off = True
    snapshot = _snapshot(model)
    send_frame(wfd, {"op": "ready", "device": str(device), "batch": B, "tokenizer": tokenizer}, snapshot)
    header, _ = recv_frame(rfd)
    if header.get("op") != "done":
        raise RuntimeError(f"unexpected answer from the evaluator: {header.get('op')!r}")
    return float(header["val_bpb"])


def _snapshot(model) -> bytes:
    import cloudpickle

    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the module it compiled
    if hasattr(model, "eval"):
        model.eval()
    here = os.path.realpath(os.getcwd())
    for name, module in list(sys.modules.items()):  # helpers the script imported from its own folder
        path = os.path.realpath(getattr(module, "__file__", None) or "/")
        if name not in ("prepare", "subword", "__main__") and path.startswith(here + os.sep):
            cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(model)
    except Exception as exc:
        raise RuntimeError(
            f"evaluate_bpb could not freeze the model for the trusted evaluator ({type(exc).__name__}: {exc}); "
            "the model must be picklable with cloudpickle: keep data loaders, generators, open files and "
            "locks out of its attributes and of the globals its forward uses") from exc
