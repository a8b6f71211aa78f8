"""Character-level PG-19 (``--task pg19 --data DIR``): books from Project Gutenberg; metric: bits
per character.

``DIR`` has the layout of the PG-19 release: ``train/``, ``validation/`` and ``test/`` folders of
``.txt`` books (UTF-8). The vocabulary is every character of the training books, in code-point
order, after an unknown symbol (id 0) that stands for characters the training books never use. It
is stored in the task options (``vocab``), so it is recorded in the run's ``config.json`` and in
every checkpoint: evaluation and generation map characters exactly as training did.

Each book is a document: memory is reset where a book starts, so nothing is carried from one book
into the next. A book's first character has no context and is not scored; every later character
is. Encoded books are cached (``--cache-dir``) and memory-mapped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from expire_span.tasks.corpus import (
    CharVocabulary,
    cache_root,
    cached_json,
    cached_tokens,
    count_characters,
    file_identity,
    fingerprint,
    list_files,
    read_text,
    require_path,
)
from expire_span.tasks.streams import LanguageModelTask, NextTokenDocuments, StreamOptions

SPLIT_FOLDERS = {"train": "train", "valid": "validation", "test": "test"}


@dataclass
class PG19Options(StreamOptions):
    data: str = ""
    """PG-19 folder holding train/, validation/ and test/ folders of .txt books."""
    vocab: str = ""
    """Characters of the vocabulary in id order (id 0 is the unknown symbol); built from the
    training books when empty, and recorded with the run so evaluation uses the same mapping."""


class PG19Task(LanguageModelTask):
    name = "pg19"
    Options = PG19Options
    primary_metric = "bpc"

    options: PG19Options

    def __init__(self, options: PG19Options | None = None) -> None:
        super().__init__(options or PG19Options())
        root = require_path(self.options.data, "PG-19 folder")
        if not root.is_dir():
            raise ValueError(f"{root} is not a folder; PG-19 is a folder of train/, validation/ "
                             "and test/ folders of .txt books")
        missing = [f"{name}/" for name in SPLIT_FOLDERS.values() if not (root / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"{root} lacks the PG-19 folder(s) {', '.join(missing)} "
                                    "(expected train/, validation/ and test/ of .txt books)")
        self.books: dict[str, list[Path]] = {}
        for split, name in SPLIT_FOLDERS.items():
            self.books[split] = list_files(root / name, ".txt")
            if not self.books[split]:
                raise ValueError(f"{root / name} holds no .txt book")
        if not self.options.vocab:
            chars = self._training_characters()
            if not chars:
                raise ValueError(f"the training books in {root / 'train'} are empty")
            self.options = dataclasses.replace(self.options, vocab=chars)
        self.vocabulary = self.text_codec(self.options)

    @classmethod
    def text_codec(cls, options: PG19Options) -> CharVocabulary:
        if not options.vocab:
            raise ValueError("pg19: the run records no character vocabulary")
        return CharVocabulary(options.vocab)

    @property
    def vocab_size(self) -> int:
        return self.vocabulary.size

    def _training_characters(self) -> str:
        books = self.books["train"]
        key = fingerprint(file_identity(books))
        path = cache_root(self.options.cache_dir) / f"pg19-vocab-{key}.json"

        def build() -> str:
            texts = (read_text(book) for book in tqdm(books, desc="pg19 vocabulary",
                                                      disable=None, leave=False))
            return CharVocabulary.from_counts(count_characters(texts)).chars

        return cached_json(path, build)

    def load_documents(self, split: str) -> NextTokenDocuments:
        books = self.books[split]
        key = fingerprint(file_identity(books), self.options.vocab)
        directory = cache_root(self.options.cache_dir) / f"pg19-{split}-{key}"

        def encoded():
            for book in tqdm(books, desc=f"encoding pg19 {split}", disable=None, leave=False):
                yield self.vocabulary.encode(read_text(book))

        tokens, bounds = cached_tokens(directory, encoded, self.vocabulary.dtype)
        return NextTokenDocuments(tokens, bounds)
