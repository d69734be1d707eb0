"""The optional subword tokenizer: deterministic, cached, exact bits per byte."""
import math

import pytest
import sentencepiece as spm
import torch

from trainer import prepare, subword

VOCAB = 512


@pytest.fixture(scope="module", params=subword.MODEL_TYPES)
def tok(request, corpus, tmp_path_factory):
    """A small tokenizer of each model type, trained once into its own cache folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(subword.CACHE_ENV, str(tmp_path_factory.mktemp(f"subword-{request.param}")))
        yield subword.get_subword_tokenizer(VOCAB, request.param)


def model_type(tok) -> str:
    return tok.path.name.split("-")[0]


def val_text(n: int | None = None) -> str:
    return prepare.load_split("val")[:n].numpy().tobytes().decode()


@pytest.mark.slow
def test_training_is_deterministic(tok, tmp_path, monkeypatch):
    monkeypatch.setenv(subword.CACHE_ENV, str(tmp_path))
    again = subword.get_subword_tokenizer(VOCAB, model_type(tok))
    assert again.path.parent == tmp_path and again.path.name == tok.path.name
    assert again.path.read_bytes() == tok.path.read_bytes()


@pytest.mark.slow
def test_cache_hit_reuses_the_file(tok, monkeypatch):
    monkeypatch.setenv(subword.CACHE_ENV, str(tok.path.parent))
    before = tok.path.stat().st_mtime_ns

    def no_training(**_):
        raise AssertionError("the cached model should have been used")
    monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_training)
    again = subword.get_subword_tokenizer(VOCAB, model_type(tok))
    assert again.path == tok.path and tok.path.stat().st_mtime_ns == before
    assert again.model_proto == tok.model_proto


def test_cache_key_covers_everything_that_changes_the_model(monkeypatch):
    train = b"To be, or not to be\n"
    options = {**subword.TRAINER_OPTIONS, "vocab_size": VOCAB, "model_type": "unigram"}
    base = subword.model_file_name(options, train)
    assert base.startswith(f"unigram-{VOCAB}-")
    changed = {type(True): lambda v: not v, int: lambda v: v + 1, float: lambda v: v / 2, str: lambda v: v + "x"}
    for name, value in options.items():
        assert subword.model_file_name({**options, name: changed[type(value)](value)}, train) != base, name
    assert subword.model_file_name(options, train[:-1] + b"!") != base
    assert subword.model_file_name(options, train + b"\n") != base
    monkeypatch.setattr(subword, "SENTENCES", "whole text as one sentence")
    assert subword.model_file_name(options, train) != base
    monkeypatch.undo()
    monkeypatch.setattr(spm, "__version__", "0.0.1")
    assert subword.model_file_name(options, train) != base


def test_vocab_size_and_model_type_errors_name_the_fix(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv(subword.CACHE_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=r"too small.*use at least \d+"):
        subword.get_subword_tokenizer(300)
    with pytest.raises(ValueError, match="must be an integer"):
        subword.get_subword_tokenizer("1024")
    with pytest.raises(ValueError, match=r"too high.*<= \d+"):
        subword.get_subword_tokenizer(1_000_000, "bpe")
    with pytest.raises(ValueError, match="use one of"):
        subword.get_subword_tokenizer(1024, "word")
    assert not list(tmp_path.iterdir())


def test_cache_folder_falls_back_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(subword.CACHE_ENV, raising=False)
    monkeypatch.setenv("PGOLF_CACHE_DIR", str(tmp_path / "user"))
    assert subword.cache_dir() == tmp_path / "user" / "subword"
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("PGOLF_CACHE_DIR", str(tmp_path / "not-a-folder"))
    monkeypatch.chdir(tmp_path)
    assert subword.cache_dir() == tmp_path


@pytest.mark.slow
def test_token_bytes_are_exact(tok):
    assert tok.token_bytes.dtype == torch.long and tok.token_bytes.shape == (VOCAB,)
    for i in range(VOCAB):
        piece = tok._sp.id_to_piece(i)
        if tok._sp.is_byte(i):
            assert tok.token_bytes[i] == 1, piece
        elif not (tok._sp.is_control(i) or tok._sp.is_unknown(i)):
            assert tok.token_bytes[i] == len(piece.replace("\u2581", " ").encode()), piece
    assert tok.token_bytes[tok.get_bos_token_id()] == 0

    span = prepare.load_split("val")[:prepare.EVAL_TOKENS].numpy().tobytes()
    assert int(tok.token_bytes[tok.encode(span)].sum()) == len(span) == prepare.EVAL_TOKENS
    rare = ["naïve café", "日本語のテキスト", "emoji 🎭🗡️ and e\u0301", "Ω≈ç√∫ 12345 ½",
            "\ufffd is U+FFFD, \u2047 is the unknown mark", "<s> <unk> <0x41>",
            "\u2581 is not a space: a\u2581the \u2581\u2581", "\u3000ideographic and\u00a0no-break spaces",
            "tab\there\r\nnul\x00 del\x7f", "   leading and trailing   ", "\n\n", ""]
    for text in rare:
        ids = tok.encode(text)
        assert tok.get_bos_token_id() not in ids and subword.UNK_ID not in ids
        assert int(tok.token_bytes[ids].sum()) == len(text.encode()), text
        assert tok.decode(ids) == text
    raw = "café".encode()[:-1] + b"\xff\n"  # a character cut in half, and a byte that is never UTF-8
    assert int(tok.token_bytes[tok.encode(raw)].sum()) == len(raw)


@pytest.mark.slow
def test_round_trip_of_val(tok):
    text = val_text()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode(text.encode()) == ids
    assert len(ids) < len(text.encode()) / 1.5  # subwords, not bytes


@pytest.mark.slow
def test_dataloader_rows_are_bos_plus_next_T_tokens(tok):
    stream = tok.split_ids("train")
    assert stream.dtype == torch.long and stream is tok.split_ids("train")  # encoded once
    assert prepare.load_split("train")[:1000].numpy().tobytes().decode().startswith(tok.decode(stream[:200]))
    loader = subword.make_subword_dataloader(tok, 3, 16)
    for step in range(2):
        x, y = next(loader)
        assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.long
        for r in range(3):
            start = (step * 3 + r) * 16
            assert x[r, 0] == tok.get_bos_token_id()
            assert torch.equal(y[r], stream[start:start + 16])
            assert torch.equal(x[r, 1:], stream[start:start + 15])
    with pytest.raises(ValueError, match="MAX_SEQ_LEN"):
        subword.make_subword_dataloader(tok, 2, prepare.MAX_SEQ_LEN + 1)
    with pytest.raises(ValueError, match="unknown split"):
        subword.make_subword_dataloader(tok, 2, 8, "test")


class Uniform(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, x, targets=None):
        logits = torch.zeros(*x.shape, self.vocab)
        return logits, torch.tensor(0.0)  # a lying loss: never used


@pytest.mark.slow
def test_uniform_model_scores_log2_vocab_per_token(tok):
    x, y, mask = subword.subword_eval_windows(tok, prepare.load_split("val"))
    assert x.shape == y.shape == mask.shape and x.shape[1] == prepare.MAX_SEQ_LEN
    assert (x[:, 0] == tok.get_bos_token_id()).all() and torch.equal(x[:, 1:], y[:, :-1])
    n_tokens = int(mask.sum())
    assert tok.decode(y[mask]) == val_text(prepare.EVAL_TOKENS)
    expected = math.log2(VOCAB) * n_tokens / prepare.EVAL_TOKENS
    assert subword.evaluate_subword_bpb(Uniform(VOCAB), tok, 7) == pytest.approx(expected, rel=1e-6)  # float32 per token


@pytest.mark.slow
def test_evaluate_subword_bpb_does_not_depend_on_B(tok):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 16), torch.nn.Linear(16, VOCAB))
    model.train()
    scores = [subword.evaluate_subword_bpb(model, tok, B) for B in (1, 5, 64)]
    assert scores[0] == pytest.approx(scores[1], rel=1e-6) == pytest.approx(scores[2], rel=1e-6)
    assert model.training  # left as it was found


@pytest.mark.slow
def test_evaluate_subword_bpb_errors(tok):
    with pytest.raises(ValueError, match=rf"expected \(\d+, {prepare.MAX_SEQ_LEN}, {VOCAB}\)"):
        subword.evaluate_subword_bpb(Uniform(prepare.VOCAB_SIZE), tok, 8)  # a byte-level model


SUBWORD_RUN = """
import json, torch, torch.nn as nn
from subword import evaluate_subword_bpb, get_subword_tokenizer, make_subword_dataloader

def train(tok):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    loader = make_subword_dataloader(tok, 8, 64)
    for _ in range(30):
        x, y = next(loader)
        loss = nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(); loss.backward(); opt.step()
    return model

if __name__ == "__main__":
    tok = get_subword_tokenizer(VOCAB, "MODEL_TYPE")
    print(json.dumps({"val_bpb": evaluate_subword_bpb(train(tok), tok, 8)}))
"""


@pytest.mark.slow
def test_a_subword_model_is_verified_by_the_trusted_evaluator(tok, corpus, tmp_path, monkeypatch):
    from trainer.sandbox import execute_run

    code = SUBWORD_RUN.replace("VOCAB", str(VOCAB)).replace("MODEL_TYPE", model_type(tok))
    monkeypatch.setenv(subword.CACHE_ENV, str(tok.path.parent))  # the harness builds (here: finds) its own copy
    result = execute_run(1, code, tmp_path / "run", data_dir=corpus.directory, time_budget=60, timeout=120)
    assert result.verified and result.status == "completed", result.reasons
    space: dict = {"__name__": "in_process", "make_subword_dataloader": subword.make_subword_dataloader}
    exec(code.split("if __name__")[0].replace("from subword import", "from trainer.subword import"), space)
    torch.set_num_threads(1)
    in_process = subword.evaluate_subword_bpb(space["train"](tok), tok, 8)
    assert result.val_bpb == pytest.approx(in_process, abs=1e-5)
    assert result.val_bpb < subword.evaluate_subword_bpb(Uniform(VOCAB), tok, 8) - 0.3  # trained: under uniform
