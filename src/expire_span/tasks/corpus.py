"""Text corpora on disk: finding files, decoding them with clear errors, character vocabularies,
and a cache of encoded token ids that every process memory-maps instead of holding a copy.

Cache entries are directories named by a hash of what they were built from (file paths, sizes and
modification times, the vocabulary, the options), written under a temporary name and renamed into
place, so an interrupted build leaves nothing half-written and concurrent builders agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

TOKENS_FILE = "tokens.bin"
BOUNDS_FILE = "bounds.npy"
META_FILE = "meta.json"


def cache_root(cache_dir: str) -> Path:
    """``cache_dir`` if given, else ``$XDG_CACHE_HOME/expire-span`` or ``~/.cache/expire-span``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "expire-span"


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-serialisable values (a cache key)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_identity(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """(resolved path, size, modification time) of each file: changes when a file does."""
    out = []
    for path in paths:
        stat = path.stat()
        out.append((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
    return out


def require_path(path: str | Path, what: str) -> Path:
    """``path`` as a Path, or a FileNotFoundError naming it and what it should have been."""
    if not str(path):
        raise ValueError(f"{what} is required (--data)")
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def list_files(path: Path, suffix: str | None = None) -> list[Path]:
    """``path`` itself if it is a file, else the files under it (recursively, sorted), skipping
    hidden files and folders; with ``suffix``, only names ending with it."""
    if path.is_file():
        return [path]
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and (suffix is None or name.endswith(suffix)):
                found.append(Path(root) / name)
    return found


def read_text(path: Path) -> str:
    """The file decoded as UTF-8; a ValueError naming the file and offset if it is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not valid UTF-8 text (byte {error.start}: {error.reason}); "
            "character-level tasks need UTF-8 (the text task also reads raw bytes: --level byte)"
        ) from None


class CharVocabulary:
    """Characters in id order; id 0 is the unknown symbol (any character not in the list)."""

    UNKNOWN = 0

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("the vocabulary lists a character twice")
        self.chars = chars
        codes = np.array([ord(c) for c in chars], dtype=np.int64)
        # Dense lookup from code point to id; the last slot (one past the largest) means unknown.
        self._ids = np.zeros(int(codes.max(initial=-1)) + 2, dtype=np.int64)
        self._ids[codes] = np.arange(1, len(chars) + 1)

    unknown_id = 0
    """Id of the unknown symbol (never a character to generate)."""

    @classmethod
    def from_counts(cls, counts: Counter[str]) -> CharVocabulary:
        return cls("".join(sorted(counts)))

    @property
    def size(self) -> int:
        return len(self.chars) + 1

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return np.uint16 if self.size <= 1 << 16 else np.uint32

    def encode(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64)
        return self._ids[np.minimum(codes, len(self._ids) - 1)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; the unknown symbol reads as U+FFFD."""
        return "".join(self.chars[i - 1] if i > 0 else "\ufffd" for i in ids)


class ByteVocabulary:
    """The 256 byte values."""

    size = 256
    dtype = np.uint8
    unknown_id = None

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def count_characters(texts: Iterable[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    return counts


def cached_json(path: Path, compute: Callable[[], Any]) -> Any:
    """The JSON value stored at ``path``, computed and stored first if absent."""
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(value, handle)
    os.replace(tmp, path)
    return value


def cached_tokens(
    directory: Path, pieces: Callable[[], Iterable[np.ndarray]], dtype: type
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of consecutive pieces (files, books) as one memory-mapped array, and the piece
    boundaries (``bounds[k]:bounds[k + 1]`` is piece ``k``). Built once into ``directory``."""
    if not (directory / META_FILE).is_file():
        _build_tokens(directory, pieces, dtype)
    meta = json.loads((directory / META_FILE).read_text())
    bounds = np.load(directory / BOUNDS_FILE)
    if meta["dtype"] != np.dtype(dtype).name or int(bounds[-1]) != meta["tokens"]:
        raise ValueError(f"the token cache {directory} is inconsistent; delete it to rebuild")
    if meta["tokens"] == 0:
        return np.zeros(0, dtype=dtype), bounds
    return np.memmap(directory / TOKENS_FILE, dtype=dtype, mode="r"), bounds


def _build_tokens(directory: Path, pieces: Callable[[], Iterable[np.ndarray]], dtype) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        bounds = [0]
        with open(tmp / TOKENS_FILE, "wb") as handle:
            for piece in pieces():
                handle.write(np.ascontiguousarray(piece, dtype=dtype).tobytes())
                bounds.append(bounds[-1] + len(piece))
        np.save(tmp / BOUNDS_FILE, np.asarray(bounds, dtype=np.int64))
        meta = {"dtype": np.dtype(dtype).name, "tokens": bounds[-1]}
        (tmp / META_FILE).write_text(json.dumps(meta))
        try:
            os.rename(tmp, directory)
        except OSError:  # another process finished first: use its copy
            if not (directory / META_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
