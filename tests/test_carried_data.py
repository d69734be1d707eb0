"""trainer.carried_data on the real val split: pasted or encoded val is flagged, honest scripts pass."""
import base64
import random
import re
import textwrap
import time
import zlib
from pathlib import Path

import pytest

from trainer import carried_data
from trainer.carried_data import CarriedDataIndex, find_opaque_data, index_for

BASELINE = (Path(__file__).resolve().parent.parent / "trainer" / "baseline_train.py").read_text()

# ~3 KB of ordinary English (not Shakespeare), as a researcher might write in a docstring
PROSE = """
This training script explores whether a small byte-level transformer can be made to learn faster by
changing how its learning rate evolves over the short time budget it is given. Earlier experiments showed
that the model spends most of the first minute learning which bytes are common, which spaces follow which
punctuation marks, and how long the typical word is; only after that does it begin to pick up on the
vocabulary itself. A warm-up that is too short makes the optimiser overshoot during that first phase,
while a warm-up that is too long wastes a noticeable share of a budget that is measured in seconds.

The approach taken here is deliberately conservative. We keep the architecture of the baseline, with its
rotary position embeddings and the small embeddings of recent bytes, and change one thing at a time. The
learning rate rises linearly for a few dozen steps and then decays along a cosine curve that reaches a tenth
of its peak value when the clock runs out. Weight decay applies only to matrices, because decaying the
layer norm gains and biases tends to hurt more than it helps at this scale.

We also looked at the batch size. Larger batches give smoother gradients but fewer steps, and on a machine
with two cores the number of steps matters a great deal. The sweet spot in our measurements sat between
eight and sixteen rows, with the longer context paying for itself only when the model was wide enough to
use it. Dropout was never useful: with so little training time the model cannot overfit, so anything that
slows learning down is a loss.

Several ideas did not work and are recorded here so that nobody tries them again without a new reason.
Tying the output projection to a separate matrix made the model larger without making it better. Replacing
the activation function with a gated variant cost more time per step than it saved in loss. Initialising
the embeddings from a frequency table of the training bytes gave a good start that faded within a minute.
Finally, a schedule that restarted the learning rate halfway through produced a visible bump in the loss
curve and a slightly worse final number.

What remains open is how far the same recipe scales. If the time budget doubled, would the best width
double as well, or would depth become the better use of the extra compute? The measurements so far suggest
that width wins at first and depth later, but the evidence is thin and noisy, and each run costs real
minutes. A careful sweep with two seeds per point would settle the question, and it is the natural next
experiment once the current changes have been checked against a fresh baseline run on a quiet machine.

A note on measurement: every number quoted above comes from the harness, which scores the model itself on
held-out text after training ends. The training loss printed by this script is only a guide, because it is
averaged over the batches seen during the last hundred steps and lags behind the model as it improves.
Comparisons between runs should therefore rely on the harness's number and on nothing else.
"""


@pytest.fixture(scope="module")
def val(corpus):
    return corpus.val_path.read_bytes()


@pytest.fixture(scope="module")
def train(corpus):
    return corpus.train_path.read_bytes()


@pytest.fixture(scope="module")
def index(val):
    return index_for(val)


def assert_no_val_leak(reasons, val):
    """No reason quotes more than 30 characters of val."""
    text = val.decode("utf-8", "replace")
    for reason in reasons:
        for i in range(max(0, len(reason) - 30)):
            assert reason[i:i + 31] not in text, f"reason leaks val text: {reason!r}"


def with_blob(name, blob):
    return BASELINE + f"\n{name} = {blob}\n"


# --------------------------------------------------------------------------- the index

def test_index_is_cached_and_quick_to_build(val):
    start = time.perf_counter()
    CarriedDataIndex(val)
    assert time.perf_counter() - start < 2.0
    assert index_for(val) is index_for(val)
    assert index_for(val).val_sha256 == carried_data.hashlib.sha256(val).hexdigest()


def test_find_on_100kb_is_fast(index):
    code = (BASELINE * 15)[:100_000]
    index.find(code)  # warm
    start = time.perf_counter()
    assert index.find(code) == []
    # budget is 200 ms on an idle machine (measured ~110 ms); this one is shared, hence the slack
    assert time.perf_counter() - start < 1.0


# --------------------------------------------------------------------------- honest scripts pass

def test_baseline_passes(index):
    assert index.find(BASELINE) == []


def test_famous_lines_in_comments_pass(index, val):
    lines = ["If music be the food of love, play on;",
             "Some are born great, some achieve greatness, and some have greatness thrust upon 'em."]
    assert all(re.sub(r"[^a-z]", "", line.lower())[:20] in re.sub(rb"[^a-z]", b"", val.lower()).decode()
               for line in lines)  # they really are in val
    code = BASELINE.replace("import json\n", "".join(f"# {line}\n" for line in lines) + "import json\n")
    assert index.find(code) == []


def test_long_english_docstring_passes(index):
    code = '"""' + PROSE + '"""\n' + BASELINE
    assert len(PROSE) > 3000
    assert index.find(code) == []


def test_ordinary_constants_and_small_tables_pass(index):
    table = "SCALE = [" + ", ".join(f"{0.5 + i / 100:.3f}" for i in range(64)) + "]\n"
    lut = "LUT = bytes(range(32)) + b'" + "0123456789abcdef" + "'\n"
    pin = 'EXPECTED_SHA256 = "93d1b7634835a511cfcbf25f9e9ee80d53c07420e39b7e937c623ece2e93ecdf"\n'
    misc = "ANSI_RED = '\\x1b[31m'\nNAN = float('nan')\nEPS = 1e-8\n# résumé — café → naïve\n"
    assert index.find(BASELINE + table + lut + pin + misc) == []


def test_train_text_is_not_val(index, train):
    pasted = with_blob("TEXT", '"""' + train[2_000_000:2_002_000].decode() + '"""')
    assert index.find_val_text(pasted) == []
    assert index.find(pasted) == []   # and it is plain text, so check 2 has nothing to say either


# --------------------------------------------------------------------------- check 1: val text

def test_verbatim_paste_is_flagged(index, val):
    code = with_blob("TEXT", '"""' + val[100_000:102_000].decode() + '"""')
    reasons = index.find(code)
    assert len(reasons) == 1
    first = len(BASELINE.splitlines()) + 2  # the blob's first line, after the baseline and a blank line
    assert "verbatim" in reasons[0] and f"lines {first}-" in reasons[0] and "unverified" in reasons[0]
    assert_no_val_leak(reasons, val)


def test_rewrapped_recased_comment_paste_is_flagged(index, val):
    words = " ".join(val[200_000:202_000].decode().split()).upper()
    comments = "\n".join("# " + line for line in textwrap.wrap(words, 47))
    code = BASELINE.replace("def lr_at(", comments + "\ndef lr_at(")
    reasons = index.find(code)
    assert reasons and "validation text verbatim" in reasons[0]
    assert_no_val_leak(reasons, val)


def test_caesar_shifted_and_reversed_pastes_are_flagged(index, val):
    piece = val[300_000:301_000].decode()
    lower = "abcdefghijklmnopqrstuvwxyz"
    shifted = lower[13:] + lower[:13]
    rot13 = piece.translate(str.maketrans(lower + lower.upper(), shifted + shifted.upper()))
    assert "letter-shifted by 13" in " ".join(index.find(with_blob("X", '"""' + rot13 + '"""')))
    assert "reversed" in " ".join(index.find(with_blob("X", '"""' + piece[::-1] + '"""')))


def test_many_short_pieces_are_flagged_by_their_total(index, val):
    letters = re.sub(rb"[^a-z]", b"", val.lower()).decode()
    rng = random.Random(0)
    pieces = [letters[o:o + 30] for o in sorted(rng.sample(range(0, len(letters) - 30, 1000), 20))]
    code = BASELINE + "".join(f"\n# note {n}: {p}\nz = {n}\n" for n, p in enumerate(pieces))
    reasons = index.find(code)
    assert len(reasons) == 1 and "pieces of the validation text" in reasons[0], reasons
    assert_no_val_leak(reasons, val)
    # a handful of such pieces (under 200 letters in all) is tolerated
    few = BASELINE + "".join(f"\n# {p}\n" for p in pieces[:5])
    assert index.find(few) == []


# --------------------------------------------------------------------------- check 2: opaque data

def test_base64_of_zlib_is_flagged(index, val):
    blob = base64.b64encode(zlib.compress(val[:20_000])).decode()
    wrapped = "(\n" + "\n".join(f'    "{blob[i:i + 76]}"' for i in range(0, len(blob), 76)) + "\n)"
    reasons = index.find(with_blob("DATA", wrapped))
    assert len(reasons) == 1 and "base64" in reasons[0] and "unverified" in reasons[0]


def test_other_encodings_are_flagged(index, val):
    chunk = val[50_000:52_000]
    for label, blob in [("hex", chunk.hex()), ("base32", base64.b32encode(chunk).decode()),
                        ("base85", base64.b85encode(zlib.compress(chunk)).decode())]:
        parts = " + \\\n    ".join(repr(blob[i:i + 60]) for i in range(0, len(blob), 60))
        reasons = index.find(with_blob("DATA", parts))
        assert reasons, label
        assert label[:4] in reasons[0], (label, reasons)


def test_hex_in_comments_is_flagged(index, val):
    # data kept in comments and read back with open(__file__)
    blob = val[:1500].hex()
    comments = "\n".join("# " + blob[i:i + 64] for i in range(0, len(blob), 64))
    code = BASELINE + "\n" + comments + "\nSELF = open(__file__).read()\n"
    reasons = index.find(code)
    assert reasons and "hex" in reasons[0]


def test_list_of_ints_is_flagged(index, val):
    reasons = index.find(with_blob("DATA", "[" + ", ".join(str(b) for b in val[:5000]) + "]"))
    assert len(reasons) == 1 and "list literal of 5000 numbers" in reasons[0]


def test_cjk_packing_is_flagged(index, val):
    data = val[:3000]
    packed = "".join(chr(0x4E00 + (data[i] << 8 | data[i + 1]) % 20_000) for i in range(0, len(data), 2))
    reasons = index.find(with_blob("DATA", repr(packed)))
    assert len(reasons) == 1 and "1500 non-ASCII characters" in reasons[0]


def test_escapes_and_bytes_literals_are_flagged(index, val):
    escaped = '"' + "".join(f"\\x{b:02x}" for b in val[:600]) + '"'
    assert "escape sequences" in index.find(with_blob("DATA", escaped))[0]
    octal = '"' + "".join(f"\\{b:03o}" for b in val[:600]) + '"'
    assert "escape sequences" in index.find(with_blob("DATA", octal))[0]
    blob = "b" + repr(val[:400].decode())
    reasons = index.find(with_blob("DATA", blob))
    assert any("bytes literal of 400 bytes" in r for r in reasons), reasons


def test_pieces_under_each_limit_add_up(index, val):
    blob = base64.b64encode(zlib.compress(val[:5000])).decode()
    pieces = [blob[i:i + 150] for i in range(0, 150 * 12, 150)]  # each under MIN_RUN, 1.3 KB in all
    code = BASELINE + "".join(f"\nP{n} = '{p}'\nx, y = {n}, {n}\n" for n, p in enumerate(pieces))
    reasons = index.find(code)
    assert len(reasons) == 1 and "smaller pieces" in reasons[0], reasons


def test_source_that_does_not_parse_is_still_scanned(index, val):
    code = "def broken(:\n" + f'DATA = "{val[:2000].hex()}"\n' + f"BLOB = b'{'Q' * 400}'\n"
    reasons = find_opaque_data(code)
    assert any("hex" in r for r in reasons) and any("bytes literal" in r for r in reasons)
    pasted = "def broken(:\n" + val[10_000:12_000].decode()
    assert "verbatim" in index.find(pasted)[0]


def test_reasons_never_quote_val(index, val):
    letters = re.sub(rb"[^a-z]", b"", val.lower()).decode()
    cases = [
        with_blob("T", '"""' + val[400_000:430_000].decode() + '"""'),   # many long stretches
        BASELINE + "".join(f"\n# {letters[o:o + 50]}\n" for o in range(0, 50_000, 5000)),
        val[:5000].decode().upper(),
    ]
    for code in cases:
        reasons = index.find(code)
        assert reasons
        assert_no_val_leak(reasons, val)
