"""Static check that a train.py does not carry the validation text, plainly or encoded.

The harness scores a run on the validation split itself, so a script that ships
(part of) that split inside its own source can "predict" it from memory instead
of learning: the researcher may paste text it knows by heart or saw in a log, or
hide it as base64/hex/zlib, a table of numbers, `\\x..` escapes, text packed into
non-ASCII characters, or comments that the script reads back with
`open(__file__)`. `CarriedDataIndex.find` reads the source (comments and strings
included) and returns one reason per finding; the caller marks the run
unverified when there is any. Two checks:

1. Validation text. Code and val are both reduced to their ASCII letters,
   lower-cased (everything else dropped), so re-wrapping, case, punctuation,
   spacing and string splitting do not hide a paste. Every 24-letter window of
   the code is looked up in a sorted table of the val's 24-letter window hashes,
   then extended exactly to its full length. Windows are hashed as *differences*
   of consecutive letters (mod 26), so a Caesar/ROT13 shift matches as well; the
   reversed letter stream is checked too.
   - MIN_MATCH = 24 letters: the shortest match that counts. Common phrases,
     names and stage directions ("enter king henry", "exeunt all but") are
     shorter; over the whole 3.4 M-letter train split, matches with val of >= 24
     letters cover about 0.08 % of the letters, and a 1,600-letter stretch of
     train never reaches 110 letters of them.
   - LONG_MATCH = 80 letters (about 100 bytes, two or three verse lines): one
     stretch this long is flagged on its own. The longest chance match between
     train and val is 46 letters (a scene heading, the only one over 40; no
     reversed or letter-shifted chance match at all), and a famous line quoted
     in a comment stays below 80 ("Some are born great, ... thrust upon 'em" is
     66 letters).
   - MAX_SHORT_TOTAL = 200 letters: shorter matches (24..79 letters) are summed;
     more than 200 letters in all (about 250 bytes of val, 0.05 % of it) is
     flagged, which catches val cut into many short pieces. Any 2 KB stretch of
     train stays far below it (at most ~110 letters); a 100 KB paste of train
     can reach it (Gutenberg headings and stage directions recur across plays).
   Unflagged code thus holds at most ~200 letters of val in matches of 24+
   letters, a few hundred bytes of a 505 KB split: val_bpb cannot move by more
   than about 0.001.

2. Opaque data. Legitimate training code has no reason to carry data blobs:
   its constants are hyper-parameters and at most small lookup tables. The
   whole text is scanned (it need not parse) for:
   - runs of hex, base64/base32 and base85/ascii85 alphabet characters of
     MIN_RUN = 200+ characters, measured after dropping quotes, whitespace, `+`,
     `#` and backslashes, so implicit or `+` concatenation, line continuations
     and comment lines do not split them. Prose and code squeezed this way also
     form long runs, so a run must also look random: hex by its alphabet alone
     (prose never stays inside 0-9a-f for 200 characters); base64/base85 by
     switching often between digits, upper and lower case (>= 0.45 of adjacent
     letter/digit pairs; base64/85 of val: >= 0.49 in 200 characters; CamelCase
     code: ~0.4) while using the alphabet evenly (entropy >= 0.75 of its
     maximum; random: >= 0.82); base32 by digits among capitals and nothing
     else. See `_looks_encoded` for the false-positive measurement;
   - runs of 64+ `\\x..`/octal/`\\u....` escapes;
   - list/tuple literals (or comma/space separated runs of numbers, also in
     strings and comments) with more than 256 numbers, and more than 1,000
     numeric literals in the file;
   - more than 500 non-ASCII characters (each can pack two bytes or more);
   - bytes literals longer than 256 bytes and integer literals over 256 bytes.
   Smaller pieces (encoded runs of 32+ characters, escape runs of 8+, number
   runs of 32+, bytes literals of 32+ bytes, non-ASCII characters beyond the
   first 100, trailing spaces/tabs at one bit each) are summed by the bytes
   they can carry; more than OPAQUE_BUDGET = 1,024 bytes in all is flagged, so
   a blob cannot be cut into pieces each under its own threshold.

What this does not catch: data in a form with no alphabet signature (English
words used as symbols, letters-only alphabets such as base26 or hex mapped to
a-p, spacing between tokens as bits, val cut into < 24-letter pieces
joined with filler letters), or data the script fetches at run time (the
sandbox's job). Reasons never quote more than QUOTE_CHARS characters of the
source, so they do not become a leak themselves.
"""
from __future__ import annotations

import ast
import bisect
import hashlib
import math
import re
import threading
import unicodedata
from collections import Counter

import numpy as np

# --- check 1: validation text -------------------------------------------------
MIN_MATCH = 24          # letters; see the module docstring for all thresholds
LONG_MATCH = 80
MAX_SHORT_TOTAL = 200
MAX_CANDIDATES = 8      # val places tried when extending one match (repeated val passages)
MAX_LISTED = 3          # long stretches named one by one; the rest are summed in one reason
QUOTE_CHARS = 24        # source characters quoted in a reason (val text must not leak through reasons)

# --- check 2: opaque data -----------------------------------------------------
MIN_RUN = 200           # characters of an encoded-alphabet run flagged on its own
MIN_COUNTED_RUN = 32    # shorter runs still count towards OPAQUE_BUDGET
MAX_ESCAPE_RUN = 64     # escapes in one run flagged on its own
MIN_COUNTED_ESCAPES = 8
MAX_LIST_NUMBERS = 256  # numbers in one list/tuple (or separated run)
MIN_COUNTED_NUMBERS = 32
MAX_NUMBERS = 1000      # numeric literals in the whole file
MAX_NON_ASCII = 500
FREE_NON_ASCII = 100    # a few dashes, arrows and accents in comments cost nothing
MAX_LITERAL_BYTES = 256  # one bytes literal, or one int literal's size
MIN_COUNTED_LITERAL = 32
OPAQUE_BUDGET = 1024    # bytes that all counted pieces together may carry

_UNVERIFIED_VAL = "code may not carry validation data, so this run is unverified"
_UNVERIFIED_DATA = "code may not carry embedded data, so this run is unverified"


# ==============================================================================
# Check 1: validation text
# ==============================================================================

_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)   # odd 64-bit multiplier; arithmetic wraps mod 2**64


def _letters(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower-case ASCII letters as 0..25, and their indices in `codes` (bytes or code points)."""
    low = codes | 0x20                      # A-Z -> a-z; nothing else lands in a-z
    mask = (low >= 97) & (low <= 122)
    return (low[mask] - 97).astype(np.uint8), np.flatnonzero(mask)


def _diffs(letters: np.ndarray) -> np.ndarray:
    # consecutive-letter differences mod 26: the same for the text and any Caesar shift of it
    return ((letters[1:].astype(np.int16) - letters[:-1]) % 26).astype(np.uint8)


def _window_hashes(d: np.ndarray, k: int) -> np.ndarray:
    n = len(d) - k + 1
    if n <= 0:
        return np.zeros(0, np.uint64)
    d = d.astype(np.uint64) + np.uint64(1)
    h = np.zeros(n, np.uint64)
    for j in range(k):
        h = h * _HASH_MULT + d[j:j + n]
    return h


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n, done, step = min(len(a), len(b)), 0, 64
    while done < n:
        stop = min(n, done + step)
        neq = np.flatnonzero(a[done:stop] != b[done:stop])
        if neq.size:
            return done + int(neq[0])
        done, step = stop, step * 2
    return n


class _Text:
    """One text's lines, for reasons."""

    def __init__(self, text: str):
        self.text = text
        self.codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
        self.newlines = np.flatnonzero(self.codes == 10)

    def line(self, offset: int) -> int:
        return int(np.searchsorted(self.newlines, offset, "left")) + 1

    def where(self, start: int, end: int) -> str:
        a, b = self.line(start), self.line(max(start, end - 1))
        return f"line {a}" if a == b else f"lines {a}-{b}"

    def quote(self, offset: int) -> str:
        snippet = " ".join(self.text[offset:offset + 4 * QUOTE_CHARS].split())[:QUOTE_CHARS]
        return snippet.replace('"', "'")


class CarriedDataIndex:
    """The val split's 24-letter windows, built once and reused for every check."""

    def __init__(self, val: bytes):
        self.val_sha256 = hashlib.sha256(val).hexdigest()
        self._letters, self._where = _letters(np.frombuffer(val, np.uint8))
        self._diffs = _diffs(self._letters)
        hashes = _window_hashes(self._diffs, MIN_MATCH - 1)
        self._order = np.argsort(hashes, kind="stable")   # val window positions, by hash
        self._sorted = hashes[self._order]

    def find(self, code: str, name: str = "train.py") -> list[str]:
        """Reasons the run must be unverified because `code` carries data; [] when clean."""
        return self.find_val_text(code, name) + find_opaque_data(code, name)

    # ------------------------------------------------------------------
    def find_val_text(self, code: str, name: str = "train.py") -> list[str]:
        # NFKD maps full-width and styled letters to ASCII ones (accents become separate marks, dropped below)
        text = _Text(code if code.isascii() else unicodedata.normalize("NFKD", code))
        letters, where = _letters(text.codes)
        n = len(letters)
        longs, shorts = [], []     # (first letter index in `letters`, length in letters, how, val bytes)
        for reverse in (False, True):
            seq = letters[::-1] if reverse else letters
            for start, length, how, p in self._matches(seq, reverse):
                first = n - start - length if reverse else start
                val_bytes = int(self._where[p + length - 1] - self._where[p]) + 1
                (longs if length >= LONG_MATCH else shorts).append((first, length, how, val_bytes))

        def span(first: int, length: int) -> tuple[int, int]:
            return int(where[first]), int(where[first + length - 1]) + 1

        reasons = []
        longs.sort()
        for first, length, how, val_bytes in longs[:MAX_LISTED]:
            a, b = span(first, length)
            reasons.append(
                f"{name} {text.where(a, b)} {'holds' if text.line(a) == text.line(b - 1) else 'hold'} "
                f"{length} letters ({val_bytes} bytes) of the validation text {how} "
                f"(starting \"{text.quote(a)}\"); {_UNVERIFIED_VAL}")
        if len(longs) > MAX_LISTED:
            rest = longs[MAX_LISTED:]
            reasons.append(
                f"{name} holds {len(rest)} more stretches of the validation text of {LONG_MATCH}+ letters "
                f"({sum(r[1] for r in rest)} letters in all, the first at line {text.line(span(*rest[0][:2])[0])}); "
                f"{_UNVERIFIED_VAL}")
        total = sum(s[1] for s in shorts)
        if total > MAX_SHORT_TOTAL:
            shorts.sort()
            a, _ = span(*shorts[0][:2])
            reasons.append(
                f"{name} holds {len(shorts)} pieces of the validation text of {MIN_MATCH}-{LONG_MATCH - 1} "
                f"letters each ({total} letters in all, more than {MAX_SHORT_TOTAL}; the first at line "
                f"{text.line(a)}, starting \"{text.quote(a)}\"); {_UNVERIFIED_VAL}")
        return reasons

    def _matches(self, letters: np.ndarray, reverse: bool) -> list[tuple[int, int, str, int]]:
        """Maximal exact matches (up to a Caesar shift) of >= MIN_MATCH letters: (start, length, how, val letter)."""
        k = MIN_MATCH - 1                      # diffs per window
        d = _diffs(letters)
        h = _window_hashes(d, k)
        if not len(h) or not len(self._sorted):
            return []
        pos = np.minimum(np.searchsorted(self._sorted, h), len(self._sorted) - 1)
        hit = np.flatnonzero(self._sorted[pos] == h)
        out = []
        i, j = 0, 0                            # greedy left-to-right over the hit windows
        while j < len(hit):
            i = int(hit[j])
            hi = int(np.searchsorted(self._sorted, h[i], "right"))
            best, best_p = 0, -1
            for p in self._order[int(pos[i]):min(hi, int(pos[i]) + MAX_CANDIDATES)]:
                m = _common_prefix(d[i:], self._diffs[p:])
                if m > best:
                    best, best_p = m, int(p)
            if best >= k:                      # else a hash collision
                shift = (int(letters[i]) - int(self._letters[best_p])) % 26
                how = "verbatim" if shift == 0 else f"letter-shifted by {shift} (a Caesar/ROT cipher)"
                if reverse:
                    how = "reversed" if shift == 0 else f"reversed and {how}"
                out.append((i, best + 1, how, best_p))
                nxt = i + best                 # a following match may share the boundary letter
            else:
                nxt = i + 1
            j = int(np.searchsorted(hit, nxt, "left"))
        return out


_CACHE: dict[str, CarriedDataIndex] = {}
_CACHE_LOCK = threading.Lock()


def index_for(val: bytes) -> CarriedDataIndex:
    """The index of `val`, built once per distinct val (keyed by its sha256)."""
    key = hashlib.sha256(val).hexdigest()
    with _CACHE_LOCK:
        index = _CACHE.get(key)
    if index is None:
        index = CarriedDataIndex(val)
        with _CACHE_LOCK:
            if len(_CACHE) >= 4:
                _CACHE.clear()
            _CACHE[key] = index
    return index


# ==============================================================================
# Check 2: opaque data
# ==============================================================================

_GAP = r"[\s'\"+\\#]"                # quotes, whitespace, `+`, backslash, `#`: concatenations, continuations, comments
_GAP_RE = re.compile(_GAP)
_ALPHABETS = [
    # (name, character class, bytes carried per character)
    ("hex", r"[0-9A-Fa-f]", 0.5),
    ("base64/base32-like", r"[A-Za-z0-9/=_\-]", 0.75),
    ("base85-like", r"[0-9A-Za-z!$%&()*\-;<=>?@^_`{|}~]", 0.8),   # without `+` and `#` (gap characters)
    ("ascii85-like", r"[!$-&(-*,-\[\]-u]", 0.8),   # '!'..'u' without the gap characters
]
_RUN_RES = [(kind, re.compile(f"{cls}(?:{_GAP}*{cls})*"), rate) for kind, cls, rate in _ALPHABETS]
_CLASS = np.zeros(256, np.uint8)      # 0 other, 1 digit, 2 upper, 3 lower
_CLASS[ord("0"):ord("9") + 1] = 1
_CLASS[ord("A"):ord("Z") + 1] = 2
_CLASS[ord("a"):ord("z") + 1] = 3
_WINDOW = 200
_B32_RE = re.compile(r"[A-Z2-7=]+")
_DIGIT_OR_UPPER_RE = re.compile(r"[0-9A-Z]")
_TRAILING_RE = re.compile(r"[ \t]+$", re.M)

_ESCAPE_RE = re.compile(r"\\(?:x[0-9A-Fa-f]{2}|[0-7]{1,3}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8})")
_NUMBER_RE = re.compile(
    r"(?<![\w.])(?:0[xX][0-9A-Fa-f_]+|0[oO][0-7_]+|0[bB][01_]+|(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d+)?[jJ]?)")
_NUMBER_SEP_RE = re.compile(r"[\s,;:()\[\]{}'\"+\-]+")
_BYTES_RE = re.compile(   # only when the source does not parse: a b-prefixed string literal
    r"(?<![\w])(?:[bB][rR]?|[rR][bB])"
    r"""(?:'''(?:\\.|[^\\])*?'''|\"\"\"(?:\\.|[^\\])*?\"\"\"|'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*")""",
    re.S)


def _entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _looks_encoded(kind: str, s: str) -> bool:
    """Whether a squeezed alphabet run looks like encoded data rather than prose or code.

    Encoded data switches often between digits, upper and lower case (base64/base85 of val, raw or zlib'd:
    at >= 0.49 of the adjacent letter/digit pairs in 200-character windows) and uses its alphabet evenly
    (entropy >= 0.82 of the maximum). Code and prose switch rarely: of ~520,000 windows (runs of 32+
    characters) in 3,000 files of the installed site-packages, 129 reached both 0.45 and 0.75, none of them
    100+ characters long: document IDs, hashes, base64 examples and a little CamelCase. Such short runs only
    count towards OPAQUE_BUDGET; on 32-character pieces of base64 the test still fires > 95 % of the time.
    """
    if kind == "hex":
        return _entropy(s) >= 2.0          # the alphabet is the signature; skip "000000..." rows
    # fast path: encoded data is >= 25 % digits and capitals (every class switch involves one); most code
    # runs have a handful, so demand 10 % of a window before doing the windowed arithmetic
    if len(_DIGIT_OR_UPPER_RE.findall(s)) < 0.1 * min(len(s), _WINDOW):
        return False
    size = 64 if kind.startswith("base64") else 85
    classes = _CLASS[np.frombuffer(s.encode("ascii", "replace"), np.uint8)]
    step = _WINDOW // 2
    for start in range(0, max(1, len(s) - step), step):  # windows: a blob may be glued to prose
        w, c = s[start:start + _WINDOW], classes[start:start + _WINDOW]
        both = (c[:-1] > 0) & (c[1:] > 0)
        pairs = int(np.sum(both))
        if pairs >= 16 and np.sum(both & (c[:-1] != c[1:])) >= 0.45 * pairs \
                and _entropy(w) >= 0.75 * math.log2(min(len(w), size)):
            return True
        # base32 (upper case and 2-7) switches less; its signature is digits among capitals and nothing else
        if kind.startswith("base64") and _B32_RE.fullmatch(w) and np.sum(c == 1) >= 0.05 * len(w) \
                and _entropy(w) >= 0.75 * math.log2(min(len(w), 32)):
            return True
    return False


class _Opaque:
    def __init__(self, name: str, text: _Text):
        self.name, self.text = name, text
        self.reasons: list[str] = []
        self.counted: Counter[str] = Counter()      # kind -> bytes it can carry, below the per-item limits
        self.flagged = np.zeros(len(text.text) + 1, bool)   # source characters already named in a reason
        self.number_list = False                    # a list/run of numbers was named
        self.counted_runs: list[tuple[int, int]] = []  # encoded runs already in `counted`

    def flag(self, start: int, end: int, what: str) -> None:
        self.flagged[start:end] = True
        where = self.text.where(start, end)
        verb = "holds" if where.startswith("line ") else "hold"
        self.reasons.append(f"{self.name} {where} {verb} {what}; {_UNVERIFIED_DATA}")

    def covered(self, start: int, end: int) -> bool:
        return bool(self.flagged[start:end].any())


def find_opaque_data(code: str, name: str = "train.py") -> list[str]:
    """Reasons `code` carries encoded or packed data (check 2); works on source that does not parse."""
    text = _Text(code)
    found = _Opaque(name, text)
    _scan_literals(code, found)
    _scan_escapes(code, found)
    _scan_runs(code, found)
    _scan_numbers(code, found)

    non_ascii = 0 if code.isascii() else int(np.count_nonzero(text.codes > 127))
    if non_ascii > MAX_NON_ASCII:
        found.reasons.append(
            f"{name} holds {non_ascii} non-ASCII characters (more than {MAX_NON_ASCII}; each can pack two or "
            f"more bytes of data); {_UNVERIFIED_DATA}")
    elif non_ascii > FREE_NON_ASCII:
        found.counted["non-ASCII characters"] += 2 * (non_ascii - FREE_NON_ASCII)

    if len(found.reasons) > MAX_LISTED + 1:   # one blob cut into many pieces: name a few, count the rest
        rest = len(found.reasons) - MAX_LISTED
        found.reasons[MAX_LISTED:] = [f"{name} holds {rest} more pieces of embedded data like these; "
                                      f"{_UNVERIFIED_DATA}"]
    trailing = sum(len(m.group()) for m in _TRAILING_RE.finditer(code))
    if trailing > 64:   # an editor leaves a few; thousands of them are a bit channel
        found.counted["trailing whitespace"] += trailing / 8
    total = sum(found.counted.values())
    if total > OPAQUE_BUDGET:
        parts = ", ".join(f"{kind} {round(v)}" for kind, v in found.counted.most_common() if v >= 1)
        found.reasons.append(
            f"{name} carries about {round(total)} bytes of data in smaller pieces ({parts}), more than the "
            f"{OPAQUE_BUDGET} bytes allowed in all; {_UNVERIFIED_DATA}")
    return found.reasons


def _scan_literals(code: str, found: _Opaque) -> None:
    """Big bytes/int literals and number lists, from the syntax tree; a regex fallback if it does not parse."""
    offsets = [0] + [m.end() for m in re.finditer("\n", code)]   # line starts, as _Text counts lines

    def at(line: int, col: int) -> int:
        # col_offset counts UTF-8 bytes: clamp it to the line so a non-ASCII line cannot shift the line number
        start = offsets[line - 1]
        stop = offsets[line] - 1 if line < len(offsets) else len(code)
        return min(start + col, stop)

    def span(node: ast.AST) -> tuple[int, int]:
        try:
            return at(node.lineno, node.col_offset), at(node.end_lineno, node.end_col_offset)
        except (IndexError, TypeError):
            return (0, 0)

    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        for m in _BYTES_RE.finditer(code):
            literal = m.group().lstrip("bBrR")
            size = len(literal) - (6 if literal[:3] in ("'''", '"""') else 2)
            if size > MAX_LITERAL_BYTES:
                found.flag(m.start(), m.end(), f"a bytes literal of about {size} characters "
                                               f"(more than {MAX_LITERAL_BYTES} bytes)")
            elif size >= MIN_COUNTED_LITERAL:
                found.counted["bytes/int literals"] += size
        return

    inner: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant):
            size = len(node.value) if isinstance(node.value, bytes) else (
                (abs(node.value).bit_length() + 7) // 8
                if isinstance(node.value, int) and not isinstance(node.value, bool) else 0)
            what = "a bytes literal" if isinstance(node.value, bytes) else "an integer literal"
            if size > MAX_LITERAL_BYTES:
                found.flag(*span(node), f"{what} of {size} bytes (more than {MAX_LITERAL_BYTES})")
            elif size >= MIN_COUNTED_LITERAL:
                found.counted["bytes/int literals"] += size
        elif isinstance(node, (ast.List, ast.Tuple, ast.Set, ast.Dict)) and id(node) not in inner:
            numbers = _count_numbers(node, inner)
            if numbers > MAX_LIST_NUMBERS:
                kind = type(node).__name__.lower()
                found.flag(*span(node), f"a {kind} literal of {numbers} numbers (more than {MAX_LIST_NUMBERS})")
                found.number_list = True


def _count_numbers(node: ast.AST, inner: set[int]) -> int:
    """Numbers in a display, nested displays included (they are then not counted again on their own)."""
    if isinstance(node, ast.Constant):
        return int(isinstance(node.value, (int, float, complex)) and not isinstance(node.value, bool))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return _count_numbers(node.operand, inner)
    if isinstance(node, (ast.List, ast.Tuple, ast.Set, ast.Dict)):
        inner.add(id(node))
        items = node.elts if not isinstance(node, ast.Dict) else [x for x in (*node.keys, *node.values) if x]
        return sum(_count_numbers(x, inner) for x in items)
    return 0


def _scan_runs(code: str, found: _Opaque) -> None:
    # escapes are reported as escapes: blank them out so "\x41\x42" is not also a base64-like "x41x42"
    code = _ESCAPE_RE.sub(lambda m: "\x00" * len(m.group()), code)
    candidates = []   # (squeezed length, start, end, kind, bytes per character)
    for kind, run_re, rate in _RUN_RES:
        for m in run_re.finditer(code):
            if m.end() - m.start() < MIN_COUNTED_RUN or found.covered(m.start(), m.end()):
                continue
            s = _GAP_RE.sub("", m.group())
            if len(s) >= MIN_COUNTED_RUN and _looks_encoded(kind, s):
                candidates.append((len(s), m.start(), m.end(), kind, rate))
    # one blob matches several alphabets (hex is inside base64, base64 inside base85): keep the longest reading
    by_kind: dict[str, list] = {}                  # one alphabet's runs are disjoint and in order
    for c in candidates:
        by_kind.setdefault(c[3], []).append(c)
    starts = {kind: [c[1] for c in cs] for kind, cs in by_kind.items()}
    kept = np.zeros(len(code) + 1, bool)
    for length, start, end, kind, rate in sorted(candidates, key=lambda c: (-c[0], c[1])):
        if kept[start:end].any():
            continue
        kept[start:end] = True
        # name it by the narrowest alphabet that reads nearly all of it ("hex", not "base64-like" plus `x=`)
        middle = (start + end) // 2                # a run reading 90 % of the blob covers its middle
        for other, cs in by_kind.items():
            i = bisect.bisect_right(starts[other], middle) - 1
            if i >= 0 and cs[i][2] > middle and cs[i][0] >= 0.9 * length:
                kind, rate = other, cs[i][4]
                break
        if length >= MIN_RUN:
            found.flag(start, end, f"a {length}-character run of {kind} text (about "
                                   f"{round(length * rate)} bytes of encoded data)")
        else:
            found.counted["encoded runs"] += length * rate
            found.counted_runs.append((start, end))


def _scan_escapes(code: str, found: _Opaque) -> None:
    runs: list[list[re.Match]] = []
    for m in _ESCAPE_RE.finditer(code):
        if runs and m.start() - runs[-1][-1].end() <= 4:   # quotes, `+` or a letter between escapes
            runs[-1].append(m)
        else:
            runs.append([m])
    for run in runs:
        if found.covered(run[0].start(), run[-1].end()):   # inside a bytes literal already named
            continue
        size = sum({"x": 1, "u": 2, "U": 3}.get(m.group()[1], 1) for m in run)
        if len(run) >= MAX_ESCAPE_RUN:
            found.flag(run[0].start(), run[-1].end(),
                       f"a run of {len(run)} \\x/octal/\\u escape sequences (about {size} bytes of data)")
        elif len(run) >= MIN_COUNTED_ESCAPES:
            found.counted["escape sequences"] += size


def _scan_numbers(code: str, found: _Opaque) -> None:
    numbers = list(_NUMBER_RE.finditer(code))
    run: list[re.Match] = []
    hex_runs = sorted(found.counted_runs)          # non-overlapping
    hex_starts = [a for a, _ in hex_runs]

    def in_hex_run(pos: int) -> bool:
        i = bisect.bisect_right(hex_starts, pos) - 1
        return i >= 0 and pos < hex_runs[i][1]

    def close(run: list[re.Match]) -> None:
        if len(run) < MIN_COUNTED_NUMBERS:
            return
        start, end = run[0].start(), run[-1].end()
        if len(run) > MAX_LIST_NUMBERS:
            if not found.covered(start, end):
                found.flag(start, end, f"a run of {len(run)} numbers (more than {MAX_LIST_NUMBERS})")
                found.number_list = True
        else:   # digits carry log(10)/log(256) bytes each; long numbers already counted as hex runs are not
            counted = [m for m in run if not in_hex_run(m.start())]
            found.counted["number tables"] += sum(len(m.group()) for m in counted) * math.log(10, 256)

    for m in numbers:
        if run and not _NUMBER_SEP_RE.fullmatch(code, run[-1].end(), m.start()):
            close(run)
            run = []
        run.append(m)
    close(run)
    if len(numbers) > MAX_NUMBERS and not found.number_list:
        found.reasons.append(
            f"{found.name} holds {len(numbers)} numeric literals (more than {MAX_NUMBERS}); {_UNVERIFIED_DATA}")
