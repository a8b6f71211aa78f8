"""enwik8 (``--task enwik8 --data PATH``): the first 10^8 bytes of an English Wikipedia XML dump,
read byte by byte (vocabulary 256), split 90M / 5M / 5M bytes in file order; metric: bits per byte.

``PATH`` is the raw 100,000,000-byte file ``enwik8``, the ``enwik8.zip`` of the Hutter Prize page,
or a folder holding either. A zip is extracted once into the cache folder (``--cache-dir``); the
raw file is then memory-mapped, so processes share the operating system's page cache instead of
each holding a copy.

A file is accepted as enwik8 when it has exactly 10^8 bytes and starts with the MediaWiki export
header that enwik8 (the first 10^8 bytes of enwik9) starts with. No checksum is checked: the data
could not be obtained while writing this, so no checksum could be established honestly.

Each split is one document. Its first byte is predicted from the last byte of the split before it,
so every byte of valid and test is scored (train: every byte but the very first).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from expire_span.tasks.corpus import (
    ByteVocabulary,
    cache_root,
    file_identity,
    fingerprint,
    require_path,
)
from expire_span.tasks.streams import LanguageModelTask, NextTokenDocuments, StreamOptions

ENWIK8_BYTES = 100_000_000
ENWIK8_HEADER = b'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.3/"'
MEMBER = "enwik8"


def split_bounds(size: int) -> dict[str, tuple[int, int]]:
    """Byte ranges of the splits: the first 90%, the next 5%, the last 5%."""
    train_end, valid_end = size * 9 // 10, size * 19 // 20
    return {"train": (0, train_end), "valid": (train_end, valid_end), "test": (valid_end, size)}


def check_enwik8(path: Path) -> None:
    """Raise a ValueError naming the problem unless ``path`` looks like enwik8 (size, header)."""
    size = path.stat().st_size
    if size != ENWIK8_BYTES:
        raise ValueError(f"{path} has {size:,} bytes, enwik8 has exactly {ENWIK8_BYTES:,}: "
                         "this is not enwik8")
    with open(path, "rb") as handle:
        head = handle.read(len(ENWIK8_HEADER))
    if head != ENWIK8_HEADER:
        raise ValueError(f"{path} does not start with enwik8's XML header "
                         f"{ENWIK8_HEADER.decode()!r} (found {head[:40]!r}): this is not enwik8")


def locate_enwik8(data: str, cache_dir: str) -> Path:
    """The raw enwik8 file that ``data`` designates (extracting a zip once), checked."""
    path = require_path(data, "enwik8 data")
    if path.is_dir():
        candidates = [path / name for name in (MEMBER, f"{MEMBER}.zip") if (path / name).is_file()]
        if not candidates:
            raise FileNotFoundError(f"{path} holds neither enwik8 nor enwik8.zip")
        path = candidates[0]
    if zipfile.is_zipfile(path):
        path = _extract(path, cache_root(cache_dir))
    check_enwik8(path)
    return path


def _extract(archive_path: Path, cache: Path) -> Path:
    with zipfile.ZipFile(archive_path) as archive:
        if MEMBER not in archive.namelist():
            raise ValueError(f"{archive_path} holds no file named {MEMBER!r} "
                             f"(it holds {', '.join(archive.namelist()[:5]) or 'nothing'})")
        size = archive.getinfo(MEMBER).file_size
        if size != ENWIK8_BYTES:
            raise ValueError(f"{archive_path}: its {MEMBER} has {size:,} bytes, enwik8 has "
                             f"exactly {ENWIK8_BYTES:,}: this is not enwik8")
        target = cache / f"enwik8-{fingerprint(file_identity([archive_path]))}" / MEMBER
        if target.is_file() and target.stat().st_size == size:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".enwik8.")
        try:
            with os.fdopen(fd, "wb") as out, archive.open(MEMBER) as member:
                shutil.copyfileobj(member, out, length=1 << 22)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return target


@dataclass
class Enwik8Options(StreamOptions):
    data: str = ""
    """Path of enwik8, enwik8.zip, or a folder holding one of them."""


class Enwik8Task(LanguageModelTask):
    name = "enwik8"
    Options = Enwik8Options
    primary_metric = "bpb"

    options: Enwik8Options

    def __init__(self, options: Enwik8Options | None = None) -> None:
        super().__init__(options or Enwik8Options())
        self.path = locate_enwik8(self.options.data, self.options.cache_dir)
        self.vocabulary = self.text_codec(self.options)

    @classmethod
    def text_codec(cls, options: Enwik8Options) -> ByteVocabulary:
        return ByteVocabulary()

    @property
    def vocab_size(self) -> int:
        return self.vocabulary.size

    def load_documents(self, split: str) -> NextTokenDocuments:
        data = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, stop = split_bounds(len(data))[split]
        begin = max(start - 1, 0)  # the previous split's last byte: context for the first one
        return NextTokenDocuments(data[begin:stop], np.array([0, stop - begin]))
