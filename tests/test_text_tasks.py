"""Language-modelling data tasks (text, pg19, enwik8): splits, vocabularies, book boundaries,
bits per character on a model of known probabilities, and bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import zipfile

import numpy as np
import pytest
import torch

from expire_span import MemoryTransformer, ModelConfig
from expire_span.cli import main
from expire_span.tasks import build_task
from expire_span.tasks import enwik8 as enwik8_module
from expire_span.training import RunConfig, Trainer, evaluate
from expire_span.training.evaluate import forget_restarted_rows

# ----------------------------------------------------------------------------- helpers


def write(path, text: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def sample_text(seed: int, length: int, alphabet: str = "abcdefgh ,.\n") -> str:
    rng = np.random.default_rng(seed)
    return "".join(rng.choice(list(alphabet), size=length))


def streamed_targets(task, split, rows=3, seq_len=5):
    """Scored targets of the evaluation stream, row after row (rows are consecutive slices)."""
    per_row = [[] for _ in range(rows)]
    for batch in task.eval_batches(split, rows, seq_len, 1):
        for r in range(rows):
            per_row[r] += batch.targets[r][batch.weights[r].bool()].tolist()
    return [t for row in per_row for t in row]


def tiny_model(vocab_size: int, **overrides) -> MemoryTransformer:
    torch.manual_seed(0)
    values = dict(vocab_size=vocab_size, d_model=16, n_layers=2, n_heads=2, block_len=4,
                  max_span=64, ramp=4, init_percentage=0.5)
    values.update(overrides)
    return MemoryTransformer(ModelConfig(**values)).eval()


# ----------------------------------------------------------------------------- text


@pytest.fixture
def corpus(tmp_path):
    """Three files: the test split ends inside the last one, characters 'Z' and 'é' appear only
    in the held-out part."""
    files = [write(tmp_path / "data" / "a.txt", sample_text(0, 300)),
             write(tmp_path / "data" / "b.txt", sample_text(1, 200)),
             write(tmp_path / "data" / "sub" / "c.txt", sample_text(2, 60) + "ZéZé" * 10)]
    write(tmp_path / "data" / ".hidden", "\xff not read")
    return files


def test_text_splits_cover_the_text_in_file_order(corpus, tmp_path):
    task = build_task("text", {"data": [str(tmp_path / "data")], "valid_fraction": 0.1,
                               "test_fraction": 0.2})
    texts = [f.read_text(encoding="utf-8") for f in corpus]
    whole = "".join(texts)
    ids = task.vocabulary.encode(whole)
    starts = np.cumsum([0] + [len(t) for t in texts[:-1]])
    train_end, valid_end = int(len(whole) * 0.7), int(len(whole) * 0.8)
    for split, (low, high) in {"train": (0, train_end), "valid": (train_end, valid_end),
                               "test": (valid_end, len(whole))}.items():
        # every character but the first of each file, each exactly once
        expected = [int(ids[i]) for i in range(low, high) if i not in starts]
        assert streamed_targets(task, split) == expected, split


def test_character_vocabulary_comes_from_the_training_split_with_an_unknown_symbol(
        corpus, tmp_path):
    task = build_task("text", {"data": [str(tmp_path / "data")]})
    assert set(task.options.vocab) == set("abcdefgh ,.\n")  # 'Z' and 'é' are held out
    assert task.vocab_size == len(task.options.vocab) + 1
    unknown = task.vocabulary.UNKNOWN
    assert unknown not in streamed_targets(task, "train")
    held_out = streamed_targets(task, "valid") + streamed_targets(task, "test")
    assert held_out.count(unknown) == 40  # the 40 held-out-only characters
    assert task.vocabulary.decode(task.vocabulary.encode("abZ")) == "ab\ufffd"


def test_the_vocabulary_travels_with_the_run(corpus, tmp_path):
    run = RunConfig.from_dict({"task": "text", "task_options": {"data": [str(tmp_path / "data")]},
                               "model": {"d_model": 16, "n_layers": 1, "n_heads": 2,
                                         "block_len": 8, "max_span": 16},
                               "train": {"steps": 2, "batch_size": 2, "seq_len": 8}})
    Trainer(run, tmp_path / "run", progress=False).fit()
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    vocab = recorded["task_options"]["vocab"]
    assert vocab and set(vocab) == set("abcdefgh ,.\n")
    # A changed file does not change the mapping of a saved run.
    write(corpus[0], "QQQ" + corpus[0].read_text(encoding="utf-8"))
    reloaded = RunConfig.from_dict(recorded).build_task()
    assert reloaded.options.vocab == vocab
    assert "Q" not in reloaded.options.vocab


def test_byte_level_text_reads_any_bytes(tmp_path):
    data = bytes(range(256)) * 3
    write(tmp_path / "blob.bin", data)
    task = build_task("text", {"data": [str(tmp_path / "blob.bin")], "level": "byte"})
    assert task.vocab_size == 256 and task.primary_metric == "bpb"
    targets = [t for split in ("train", "valid", "test") for t in streamed_targets(task, split)]
    assert targets == list(data[1:])


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"data": ["missing.txt"]}, FileNotFoundError, "text data not found"),
        ({"data": []}, ValueError, "--data is required"),
        ({"data": ["EMPTY"]}, ValueError, "empty folder"),
        ({"data": ["latin1.txt"]}, ValueError, "not valid UTF-8"),
        ({"data": ["ok.txt"], "level": "word"}, ValueError, "level must be one of"),
        ({"data": ["ok.txt"], "valid_fraction": 0.6, "test_fraction": 0.5}, ValueError,
         "sum to < 1"),
    ],
)
def test_text_bad_input(tmp_path, monkeypatch, options, error, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EMPTY").mkdir()
    write(tmp_path / "latin1.txt", "caf\xe9".encode("latin-1"))
    write(tmp_path / "ok.txt", "hello")
    with pytest.raises(error, match=message):
        build_task("text", options)


def test_cli_reports_bad_data_as_an_error(tmp_path, capsys):
    write(tmp_path / "latin1.txt", "caf\xe9".encode("latin-1"))
    for data, message in [(tmp_path / "nope", "not found"), (tmp_path / "latin1.txt", "UTF-8")]:
        code = main(["train", "--task", "text", "--data", str(data), "--out",
                     str(tmp_path / "run"), "--no-progress"])
        assert code == 1
        error = capsys.readouterr().err
        assert error.startswith("expire-span: error:") and message in error


# ----------------------------------------------------------------------------- bits per character


class BigramModel(MemoryTransformer):
    """A model whose next-token probabilities are a fixed table indexed by the current token
    (the Transformer still runs, so memory flows as usual)."""

    def __init__(self, config: ModelConfig, log_probs: torch.Tensor) -> None:
        super().__init__(config)
        self.log_probs = log_probs

    def forward(self, tokens, memory=None):
        out = super().forward(tokens, memory)
        return dataclasses.replace(out, logits=self.log_probs[tokens.long()])


@pytest.mark.parametrize("rows, seq_len", [(1, 16), (3, 5), (7, 4)])
def test_bits_per_character_of_a_model_with_known_probabilities(corpus, tmp_path, rows, seq_len):
    task = build_task("text", {"data": [str(tmp_path / "data")]})
    vocab_size = task.vocab_size
    probs = torch.distributions.Dirichlet(torch.ones(vocab_size)).sample((vocab_size,))
    model = BigramModel(ModelConfig(vocab_size=vocab_size, d_model=8, n_layers=1, n_heads=2,
                                    block_len=4, max_span=8), probs.log()).eval()
    # Independently: the valid split's characters from the raw text, each predicted from the
    # character before it (the first valid character from the last training one).
    texts = [f.read_text(encoding="utf-8") for f in corpus]
    whole = "".join(texts)
    file_starts = set(np.cumsum([0] + [len(t) for t in texts[:-1]]).tolist())
    low, high = int(len(whole) * 0.9), int(len(whole) * 0.95)
    chars = task.options.vocab

    def index(c):
        return chars.index(c) + 1 if c in chars else 0

    bits = [-math.log2(float(probs[index(whole[i - 1]), index(whole[i])]))
            for i in range(low, high) if i not in file_starts]
    metrics = evaluate(model, task, "valid", rows, seq_len, max_batches=1)
    assert metrics["positions"] == len(bits)
    assert metrics["bpc"] == pytest.approx(sum(bits) / len(bits), rel=1e-5)
    assert metrics["bpc"] == pytest.approx(metrics["loss"] / math.log(2))


# ----------------------------------------------------------------------------- PG-19


@pytest.fixture
def pg19(tmp_path):
    root = tmp_path / "pg19"
    write(root / "train" / "1.txt", sample_text(10, 120))
    write(root / "train" / "2.txt", sample_text(11, 90, "abcxyz \n"))
    write(root / "validation" / "3.txt", sample_text(12, 37) + "Ω")
    write(root / "validation" / "4.txt", sample_text(13, 23))
    write(root / "validation" / "5.txt", "Ωq" + sample_text(14, 41))
    write(root / "test" / "6.txt", sample_text(15, 30))
    return root


def test_pg19_vocabulary_and_unknown_symbol(pg19):
    task = build_task("pg19", {"data": str(pg19)})
    assert task.options.vocab == "".join(sorted(set("abcdefgh ,.\nxyz")))
    books = [(pg19 / "validation" / f"{n}.txt").read_text(encoding="utf-8") for n in (3, 4, 5)]
    expected = [int(i) for book in books for i in task.vocabulary.encode(book)[1:]]
    assert streamed_targets(task, "valid", rows=2, seq_len=4) == expected
    assert expected.count(0) == 2 and task.vocabulary.encode("Ω").tolist() == [0]


def _stream_logits(model, task, split, seq_len, honour_resets=True):
    """Logits of every scored position of ``split`` read as one row (so in file order)."""
    logits, memory = [], None
    for batch in task.eval_batches(split, 1, seq_len, 1):
        if honour_resets:
            memory = forget_restarted_rows(memory, batch)
        result = model(batch.tokens, memory)
        memory = result.memory
        logits.append(result.logits[0][batch.weights[0].bool()])
    return torch.cat(logits)


def test_no_memory_crosses_a_book_boundary(pg19):
    task = build_task("pg19", {"data": str(pg19)})
    documents = task.documents("valid")
    model = tiny_model(task.vocab_size)
    with torch.no_grad():
        streamed = _stream_logits(model, task, "valid", seq_len=8)
        carried = _stream_logits(model, task, "valid", seq_len=8, honour_resets=False)
        # Reference: each book read alone, from an empty memory, in one call.
        alone = [model(torch.from_numpy(documents.tokens[low:high - 1].astype(np.int64))[None])
                 .logits[0] for low, high in zip(documents.bounds[:-1], documents.bounds[1:],
                                                 strict=True)]
    assert len(alone) == 3
    torch.testing.assert_close(streamed, torch.cat(alone), atol=1e-5, rtol=1e-5)
    # The check has teeth: carrying memory across books changes the later books' predictions.
    first = len(alone[0])
    torch.testing.assert_close(carried[:first], streamed[:first], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(carried[first:], streamed[first:], atol=1e-3)


def test_the_trainer_forgets_a_row_where_a_new_book_starts(pg19, tmp_path):
    run = RunConfig.from_dict({"task": "pg19", "task_options": {"data": str(pg19)},
                               "model": {"d_model": 16, "n_layers": 1, "n_heads": 2,
                                         "block_len": 4, "max_span": 64},
                               "train": {"steps": 30, "batch_size": 3, "seq_len": 8,
                                         "eval_every": 100}})
    trainer = Trainer(run, tmp_path / "run", progress=False)
    seen = []
    original = trainer.task.batch

    def recording_batch(split, step, rows, seq_len):
        batch = original(split, step, rows, seq_len)
        seen.append(batch.reset.clone())
        return batch

    def check_memory(module, args):
        memory, reset = args[1], seen[-1]
        if module.training and memory is not None:
            sizes = memory.sizes
            assert (sizes[:, reset] == 0).all()  # forgotten where a book starts
            assert (sizes[:, ~reset] > 0).all()  # carried where the book goes on

    trainer.task.batch = recording_batch
    trainer.model.register_forward_pre_hook(check_memory)
    trainer.fit()
    resets = torch.stack(seen)
    assert resets[1:].any() and not resets[1:].all()


# ----------------------------------------------------------------------------- enwik8

HEADER = enwik8_module.ENWIK8_HEADER


@pytest.fixture
def small_enwik8(tmp_path, monkeypatch):
    """A stand-in with enwik8's layout at 1/50,000 of the size (the size is a module constant)."""
    monkeypatch.setattr(enwik8_module, "ENWIK8_BYTES", 2000)
    rng = np.random.default_rng(0)
    data = HEADER + bytes(rng.integers(0, 256, 2000 - len(HEADER), dtype=np.uint8))
    return write(tmp_path / "enwik8", data), data


def test_enwik8_split_is_90_5_5_in_file_order(small_enwik8):
    path, data = small_enwik8
    task = build_task("enwik8", {"data": str(path)})
    assert task.vocab_size == 256 and task.primary_metric == "bpb"
    assert streamed_targets(task, "train") == list(data[1:1800])
    assert streamed_targets(task, "valid") == list(data[1800:1900])  # every byte of the split
    assert streamed_targets(task, "test") == list(data[1900:2000])
    first = next(iter(task.eval_batches("valid", 1, 4, 1)))
    assert first.tokens[0, 0] == data[1799]  # predicted from the last training byte


def test_enwik8_zip_is_extracted_once_into_the_cache(small_enwik8, tmp_path):
    path, data = small_enwik8
    archive = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        handle.write(path, "enwik8")
    path.unlink()
    cache = tmp_path / "cache"
    task = build_task("enwik8", {"data": str(tmp_path), "cache_dir": str(cache)})
    assert task.path.parent.parent == cache and task.path.read_bytes() == data
    modified = task.path.stat().st_mtime_ns
    again = build_task("enwik8", {"data": str(archive), "cache_dir": str(cache)})
    assert again.path == task.path and again.path.stat().st_mtime_ns == modified
    assert streamed_targets(again, "test") == list(data[1900:])


def test_enwik8_rejects_what_is_not_enwik8(small_enwik8, tmp_path):
    path, data = small_enwik8
    write(tmp_path / "short", data[:-1])
    write(tmp_path / "other", b"<html>" + data[6:])
    with pytest.raises(ValueError, match="1,999 bytes, enwik8 has exactly 2,000"):
        build_task("enwik8", {"data": str(tmp_path / "short")})
    with pytest.raises(ValueError, match="does not start with enwik8's XML header"):
        build_task("enwik8", {"data": str(tmp_path / "other")})
    with zipfile.ZipFile(tmp_path / "wrong.zip", "w") as handle:
        handle.writestr("enwik9", data)
    with pytest.raises(ValueError, match="holds no file named 'enwik8'"):
        build_task("enwik8", {"data": str(tmp_path / "wrong.zip")})
    with pytest.raises(FileNotFoundError, match="enwik8 data not found"):
        build_task("enwik8", {"data": str(tmp_path / "missing")})
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FileNotFoundError, match="neither enwik8 nor enwik8.zip"):
        build_task("enwik8", {"data": str(tmp_path / "emptydir")})
    with pytest.raises(ValueError, match="required"):
        build_task("enwik8", {})


def test_pg19_bad_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="PG-19 folder not found"):
        build_task("pg19", {"data": str(tmp_path / "nothing")})
    (tmp_path / "pg" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="validation/, test/"):
        build_task("pg19", {"data": str(tmp_path / "pg")})
    (tmp_path / "pg" / "validation").mkdir()
    (tmp_path / "pg" / "test").mkdir()
    write(tmp_path / "pg" / "train" / "1.txt", "abc")
    write(tmp_path / "pg" / "validation" / "2.txt", "abc")
    with pytest.raises(ValueError, match="test holds no .txt book"):
        build_task("pg19", {"data": str(tmp_path / "pg")})
    write(tmp_path / "pg" / "test" / "3.txt", b"\x80abc")
    write(tmp_path / "pg" / "train" / "4.txt", b"ab\xc3")
    with pytest.raises(ValueError, match="4.txt is not valid UTF-8"):
        build_task("pg19", {"data": str(tmp_path / "pg")})
