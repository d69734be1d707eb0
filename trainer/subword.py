"""Optional SentencePiece subword tokenizer for runs that want subword tokens.

Copied beside `prepare.py` into every run's folder, so it needs only the
standard library, torch, sentencepiece and `prepare` (outside a run it also
uses `trainer.corpus`, when installed, to find the user cache). In a run's
train.py:

    from subword import get_subword_tokenizer, make_subword_dataloader, evaluate_subword_bpb
    tok = get_subword_tokenizer(1024)                 # trained on the train split, or read from the cache
    loader = make_subword_dataloader(tok, B, T)       # rows of BOS + the next T tokens of train
    ...
    val_bpb = evaluate_subword_bpb(model, tok, B)     # see "Scoring" below

Training is deterministic (one thread, every line of train in order, no
sampling, no normalisation), so the same settings always give the same model
file. Models are cached under a key made of everything that changes them: the
trainer options (vocab size and model type among them), how the train split
is cut into sentences, the train split's SHA-256 and size, and the
sentencepiece version. The cache folder is $PGOLF_SUBWORD_CACHE if set, else
the user cache (`trainer.corpus.cache_root()/subword`) when it is writable,
else the current directory -- inside the training sandbox the run's folder is
the only writable place, so each run trains its tokenizer again, on its own
training clock.

Bits per byte stay exact: `token_bytes[i]` is the number of UTF-8 bytes id i
adds to the decoded text (0 for BOS, 1 for each <0xNN> byte-fallback piece).
Every character outside the vocabulary is encoded as its bytes, as are U+2581
(SentencePiece's own mark for a space) and bytes that are not UTF-8, so
`token_bytes[encode(b)].sum() == len(b)` for any bytes b, and
`decode(encode(s)) == s` for any Unicode text s.

Scoring: `evaluate_subword_bpb` scores the same val bytes `prepare.evaluate_bpb`
scores, tokenized, exactly in bits per byte. Inside a harness run it is a
hand-off like `evaluate_bpb`: the trusted evaluator builds the same tokenizer
itself (from the settings and checked by the model file's SHA-256), sends
token windows and scores the logits over the vocabulary, under the same
audits. Outside the harness (tests, local experiments with the corpus cache)
it returns the in-process number.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch

if __package__:  # imported as trainer.subword
    from . import prepare
else:  # beside prepare.py in a run's folder
    import prepare

CACHE_ENV = "PGOLF_SUBWORD_CACHE"
MODEL_TYPES = ("unigram", "bpe")
UNK_ID, BOS_ID = 0, 1
N_BYTE_PIECES = 256

# Every option that shapes the model; all of them are part of the cache key.
TRAINER_OPTIONS = {
    "num_threads": 1,                    # one thread: EM sums in a fixed order
    "input_sentence_size": 0,            # 0 = every line, in order: no sampling ...
    "shuffle_input_sentence": False,     # ... and no shuffling
    "seed_sentencepiece_size": 1_000_000,
    "max_sentence_length": 1 << 16,      # longer lines would be dropped silently
    "character_coverage": 1.0,           # every character of train gets a piece
    "byte_fallback": True,               # anything else is encoded as its UTF-8 bytes
    "split_digits": True,
    "normalization_rule_name": "identity",  # no NFKC, so decode(encode(s)) == s
    "add_dummy_prefix": False,
    "remove_extra_whitespaces": False,
    "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": -1, "pad_id": -1,
}
# How the train split becomes sentences; part of the cache key.
SENTENCES = "train split as UTF-8, one sentence per line without its newline"

# Encoded as byte pieces, never by SentencePiece: bytes that are not UTF-8 (a character cut at a split
# edge), which arrive as surrogate escapes, and U+2581, which SentencePiece would read as a space.
_AS_BYTES = re.compile("([\udc80-\udcff\u2581]+)")


class SubwordTokenizer:
    """A SentencePiece model with a reserved BOS id and exact per-id byte counts."""

    def __init__(self, model_proto: bytes, path: Path | None = None, vocab_size: int | None = None,
                 model_type: str | None = None):
        self.model_proto = model_proto
        self.path = path  # the cache file, if the model was cached
        # what get_subword_tokenizer was asked for: the trusted evaluator builds the same from these
        self.settings = {"vocab_size": vocab_size, "model_type": model_type,
                         "sha256": hashlib.sha256(model_proto).hexdigest()}
        self.sha256 = self.settings["sha256"]
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_token_id = self._sp.bos_id()
        self._byte_id = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in range(N_BYTE_PIECES)]
        # Byte pieces count 1 each: alone they decode to U+FFFD, but consecutive ones join into characters
        self.token_bytes = torch.tensor(
            [1 if self._sp.is_byte(i) else len(self._sp.decode([i]).encode()) for i in range(self.vocab_size)],
            dtype=torch.long)
        self._splits: dict[str, torch.Tensor] = {}

    def encode(self, text: str | bytes) -> list[int]:
        if not isinstance(text, str):
            text = bytes(text).decode("utf-8", "surrogateescape")
        parts = _AS_BYTES.split(text)  # text, bytes, text, ...
        # Line by line: no piece holds a newline, so this is the whole text's encoding in bounded memory
        texts = [part.split("\n") for part in parts[0::2]]
        encoded = iter(self._sp.encode([line for lines in texts for line in lines]))
        ids: list[int] = []
        for k, lines in enumerate(texts):
            if k:
                ids += [self._byte_id[b] for b in parts[2 * k - 1].encode("utf-8", "surrogateescape")]
            for j in range(len(lines)):
                if j:
                    ids.append(self._byte_id[ord("\n")])
                ids += next(encoded)
        return ids

    def decode(self, ids) -> str:
        return self._sp.decode(ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids])

    def get_vocab_size(self) -> int:
        return self.vocab_size

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def split_ids(self, split: str) -> torch.Tensor:
        """The split's whole token stream as a 1-D int64 tensor, encoded once per tokenizer."""
        if split not in self._splits:
            data = prepare.load_split(split).numpy().tobytes()
            self._splits[split] = torch.tensor(self.encode(data), dtype=torch.long)
        return self._splits[split]


def get_subword_tokenizer(vocab_size: int, model_type: str = "unigram", *, train: bytes | None = None) -> SubwordTokenizer:
    """A SentencePiece tokenizer trained on the train split (or `train`), from the cache when it is there."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported: use one of {MODEL_TYPES}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size={vocab_size!r} must be an integer")
    train = prepare.load_split("train").numpy().tobytes() if train is None else train
    text = train.decode("utf-8", "ignore")  # a character cut at the split edge cannot train anything
    n_chars = len(set(text) - {"\n"})
    smallest = 2 + N_BYTE_PIECES + n_chars  # UNK, BOS, the byte pieces and one piece per character
    if vocab_size < smallest:
        raise ValueError(f"vocab_size={vocab_size!r} is too small: it must hold UNK, BOS, the {N_BYTE_PIECES} "
                         f"byte pieces and the {n_chars} characters of the train split; use at least {smallest}")
    options = {**TRAINER_OPTIONS, "vocab_size": vocab_size, "model_type": model_type}
    folder = cache_dir()
    path = folder / model_file_name(options, train)
    if path.is_file():
        try:
            return SubwordTokenizer(path.read_bytes(), path, vocab_size, model_type)
        except (OSError, RuntimeError) as exc:
            print(f"subword: cached model {path} is unreadable ({exc}); training it again", file=sys.stderr)
    model = _train(text, options)
    try:
        _write_atomic(path, model)
    except OSError as exc:  # still usable, just not cached
        print(f"subword: could not cache the model in {folder} ({exc}); set {CACHE_ENV} to a writable folder",
              file=sys.stderr)
        path = None
    return SubwordTokenizer(model, path, vocab_size, model_type)


def model_file_name(options: dict, train: bytes) -> str:
    """The cached model's file name: its settings, then a hash of everything that changes the model."""
    key = json.dumps({"options": options, "sentences": SENTENCES, "sentencepiece": spm.__version__,
                      "train_sha256": hashlib.sha256(train).hexdigest(), "train_bytes": len(train)},
                     sort_keys=True)
    return f"{options['model_type']}-{options['vocab_size']}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.model"


def cache_dir() -> Path:
    """$PGOLF_SUBWORD_CACHE, else the user cache when writable, else the current directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    try:  # absent inside the sandbox, where the run's folder is the only writable place
        from trainer.corpus import cache_root
    except ImportError:
        return Path.cwd()
    folder = cache_root() / "subword"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return Path.cwd()
    return folder if os.access(folder, os.W_OK) else Path.cwd()


def _train(text: str, options: dict) -> bytes:
    start = time.monotonic()
    model = io.BytesIO()  # in memory: no file path ends up inside the model
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(text.split("\n")), model_writer=model,
                                       minloglevel=2, **options)
    except RuntimeError as exc:
        reason = str(exc).split("] ")[-1]
        raise ValueError(f"cannot train a {options['model_type']} tokenizer with vocab_size={options['vocab_size']} "
                         f"on this train split: {reason}") from exc
    print(f"subword: trained {options['model_type']} vocab {options['vocab_size']} "
          f"in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return model.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
        f.write(data)
    os.chmod(f.name, 0o644)  # readable like the corpus cache, not only by its writer
    os.replace(f.name, path)


def make_subword_dataloader(tok: SubwordTokenizer, B: int, T: int, split: str = "train", device: str = "cpu"):
    """Infinite iterator of (inputs, targets), each (B, T) int64, like prepare.make_dataloader.

    Every row is BOS followed by the next T tokens of the split's token stream
    (wrapping at the end); inputs = row[:-1], targets = row[1:].
    """
    return prepare.stream_batches(lambda: tok.split_ids(split), B, T, tok.get_bos_token_id(), device)


def subword_eval_windows(tok: SubwordTokenizer, val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed eval windows in tokens: (x, y, mask), each (n, MAX_SEQ_LEN).

    The span is exactly the bytes prepare.eval_windows scores (the first
    EVAL_TOKENS bytes of val), tokenized and cut into rows of BOS +
    MAX_SEQ_LEN tokens; the last row is padded and `mask` marks the real
    targets. The targets' token_bytes add up to the span's byte count.
    """
    span = prepare.eval_windows(val)[1].flatten().to(torch.uint8).numpy().tobytes()
    ids = torch.tensor(tok.encode(span), dtype=torch.long)
    counted = int(tok.token_bytes[ids].sum())
    if counted != len(span):
        raise RuntimeError(f"the eval span's {len(span)} bytes encode to tokens worth {counted} bytes: this "
                           "tokenizer's token_bytes are not exact, so its bits per byte would be wrong")
    bos = tok.get_bos_token_id()
    n_rows = -(-len(ids) // prepare.MAX_SEQ_LEN)
    y = torch.full((n_rows * prepare.MAX_SEQ_LEN,), bos, dtype=torch.long)
    y[:len(ids)] = ids
    mask = (torch.arange(len(y)) < len(ids)).view(n_rows, -1)
    y = y.view(n_rows, -1)
    x = torch.cat([torch.full((n_rows, 1), bos, dtype=torch.long), y[:, :-1]], dim=1)
    return x, y, mask


@torch.no_grad()
def evaluate_subword_bpb(model, tok: SubwordTokenizer, B: int, device: str = "cpu") -> float:
    """Bits per byte on the fixed val span, computed in-process; B only sets the chunk size."""
    if os.environ.get(prepare.HANDOFF_ENV):  # in a harness run: the trusted evaluator scores it
        return prepare._hand_off(model, B, device, tokenizer=tok.settings)
    x, y, mask = subword_eval_windows(tok, prepare.load_split("val"))
    was_training = getattr(model, "training", False)
    model.eval()
    chunk = max(1, int(B))
    total = 0.0
    for i in range(0, x.shape[0], chunk):
        logits = prepare.logits_of(model, x[i:i + chunk].to(device), tok.get_vocab_size(), "evaluate_subword_bpb")
        keep = mask[i:i + chunk]
        total += prepare.sum_nats(logits[keep], y[i:i + chunk][keep])
    if was_training:
        model.train()
    return prepare.bpb(total, int(tok.token_bytes[y[mask]].sum()))
