"""Classical reference points: bits per byte that bzip2, xz and PPMd need for val, given train as prior context.

bpb(val | train) = 8 * (size(compress(train + val)) - size(compress(train))) / len(val).
PPMd runs through 7-Zip (`apt-get install p7zip-full`); it is skipped when 7z is missing.
"""
from __future__ import annotations

import bz2
import lzma
import shutil
import subprocess
import tempfile
from pathlib import Path

from trainer.corpus import ensure_corpus


def seven_zip_ppmd(data: bytes) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.txt", Path(tmp) / "out.7z"
        src.write_bytes(data)
        subprocess.run(["7z", "a", "-bd", "-m0=PPMd", "-mo=16", "-mmem=256m", str(out), str(src)],
                       check=True, capture_output=True)
        return out.stat().st_size


def conditional_bpb(compress, train: bytes, val: bytes) -> float:
    return 8 * (compress(train + val) - compress(train)) / len(val)


def main() -> dict[str, float]:
    c = ensure_corpus()
    train, val = c.train_path.read_bytes(), c.val_path.read_bytes()
    out = {
        "bzip2 -9": conditional_bpb(lambda d: len(bz2.compress(d, 9)), train, val),
        "xz -9e": conditional_bpb(lambda d: len(lzma.compress(d, preset=9 | lzma.PRESET_EXTREME)), train, val),
    }
    if shutil.which("7z"):
        out["PPMd (7z, order 16)"] = conditional_bpb(seven_zip_ppmd, train, val)
    for name, value in out.items():
        print(f"{name:22s} {value:.4f} bits/byte")
    if not shutil.which("7z"):
        print("PPMd: skipped (apt-get install p7zip-full)")
    return out


if __name__ == "__main__":
    main()
