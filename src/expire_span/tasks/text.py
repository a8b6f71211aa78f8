"""Any text (``--task text --data PATH...``): files or folders, read by character or by byte,
with held-out validation and test splits; metric: bits per character (or per byte).

The files (a folder is read recursively, in sorted order, skipping hidden entries) are taken in the
order given as one sequence of characters (``--level char``, UTF-8) or bytes (``--level byte``,
any content). The last ``test_fraction`` of it is the test split, the ``valid_fraction`` before it
the validation split, the rest the training split. Each file is a document: memory is reset where
a file starts. A file's first unit has no context and is not scored; a split that begins inside a
file predicts its first unit from the one before it, so every other unit is scored exactly once.

At character level the vocabulary is the training split's characters after an unknown symbol
(id 0); it is stored in the options (``vocab``) and so recorded with the run.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from expire_span.tasks.corpus import (
    ByteVocabulary,
    CharVocabulary,
    cache_root,
    cached_json,
    cached_tokens,
    file_identity,
    fingerprint,
    list_files,
    read_text,
    require_path,
)
from expire_span.tasks.streams import LanguageModelTask, NextTokenDocuments, StreamOptions

LEVELS = ("char", "byte")


@dataclass
class TextOptions(StreamOptions):
    data: list[str] = field(default_factory=list)
    """Text files or folders (folders are read recursively, in sorted order)."""
    level: str = "char"
    """``char``: characters of UTF-8 text; ``byte``: raw bytes (vocabulary 256)."""
    vocab: str = ""
    """Character level: the vocabulary in id order (id 0 is the unknown symbol); built from the
    training split when empty, and recorded with the run so evaluation uses the same mapping."""
    valid_fraction: float = 0.05
    """Share of the text (before the test part) held out for validation."""
    test_fraction: float = 0.05
    """Share of the text (its end) held out for testing."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.data, str):
            self.data = [self.data]
        if self.level not in LEVELS:
            raise ValueError(f"text: level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if self.level == "byte" and self.vocab:
            raise ValueError("text: vocab is for --level char; bytes always use all 256 values")
        if not (self.valid_fraction > 0 and self.test_fraction > 0
                and self.valid_fraction + self.test_fraction < 1):
            raise ValueError("text: valid_fraction and test_fraction must be > 0 and sum to < 1, "
                             f"got {self.valid_fraction} and {self.test_fraction}")


class TextTask(LanguageModelTask):
    name = "text"
    Options = TextOptions

    options: TextOptions

    def __init__(self, options: TextOptions | None = None) -> None:
        super().__init__(options or TextOptions())
        if not self.options.data:
            raise ValueError("text: --data is required: one or more text files or folders")
        self.files = []
        for item in self.options.data:
            path = require_path(item, "text data")
            found = list_files(path)
            if not found:
                raise ValueError(f"{path} is an empty folder: it holds no file to read")
            self.files.extend(found)
        self.primary_metric = "bpc" if self.options.level == "char" else "bpb"
        if self.options.level == "char" and not self.options.vocab:
            chars = self._training_characters()
            if not chars:
                raise ValueError(f"no text to train on in {', '.join(self.options.data)}")
            self.options = dataclasses.replace(self.options, vocab=chars)
        self.vocabulary = self.text_codec(self.options)
        self._tokens: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def text_codec(cls, options: TextOptions) -> CharVocabulary | ByteVocabulary:
        if options.level == "byte":
            return ByteVocabulary()
        if not options.vocab:
            raise ValueError("text: the run records no character vocabulary")
        return CharVocabulary(options.vocab)

    @property
    def vocab_size(self) -> int:
        return self.vocabulary.size

    def _split_range(self, split: str, total: int) -> tuple[int, int]:
        opts = self.options
        train_end = int(total * (1 - opts.valid_fraction - opts.test_fraction))
        valid_end = int(total * (1 - opts.test_fraction))
        return {"train": (0, train_end), "valid": (train_end, valid_end),
                "test": (valid_end, total)}[split]

    def _training_characters(self) -> str:
        opts = self.options
        key = fingerprint(file_identity(self.files), opts.valid_fraction, opts.test_fraction)

        def build() -> str:
            lengths = [len(read_text(path)) for path in self.files]  # also checks every file
            train_end = self._split_range("train", sum(lengths))[1]
            counts: Counter[str] = Counter()
            start = 0
            for path, length in zip(self.files, lengths, strict=True):
                if start >= train_end:
                    break
                counts.update(read_text(path)[: train_end - start])
                start += length
            return CharVocabulary.from_counts(counts).chars

        return cached_json(cache_root(opts.cache_dir) / f"text-vocab-{key}.json", build)

    def _encoded(self) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of all files, one after the other, and the file boundaries."""
        if self._tokens is None:
            opts = self.options
            key = fingerprint(file_identity(self.files), opts.level, opts.vocab)
            directory = cache_root(opts.cache_dir) / f"text-{key}"

            def encoded():
                for path in self.files:
                    if opts.level == "byte":
                        yield np.fromfile(path, dtype=np.uint8)
                    else:
                        yield self.vocabulary.encode(read_text(path))

            self._tokens = cached_tokens(directory, encoded, self.vocabulary.dtype)
        return self._tokens

    def load_documents(self, split: str) -> NextTokenDocuments:
        tokens, files = self._encoded()
        start, stop = self._split_range(split, int(files[-1]))
        inner = files[(files > start) & (files < stop)]
        # A split that begins inside a file predicts its first unit from the unit before it.
        begin = start - 1 if start > 0 and start not in files else start
        return NextTokenDocuments(tokens, np.concatenate([[begin], inner, [stop]]))
