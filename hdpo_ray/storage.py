"""Files the package writes and reads: whole-or-absent writes, local paths and URIs behind one filesystem call,
and file hashing for cache keys."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from hdpo_ray.config import is_uri


def atomic_write(path: str | os.PathLike, text: str) -> None:
    """Write text to path through a temporary file beside it: a reader sees the old file or the new one, never half."""
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(text)
    os.replace(partial, target)


def atomic_write_lines(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """atomic_write for many lines (each without its newline), streamed: nothing holds the whole text."""
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    with open(partial, "w") as handle:
        for line in lines:
            handle.write(line + "\n")
    os.replace(partial, target)


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a URI any of pyarrow or fsspec reads (s3://, gs://, hf://, ...) or a local path."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))
    try:
        return pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        import fsspec  # protocols Arrow lacks (hf://, http://, ...) go through fsspec

        fs, path = fsspec.core.url_to_fs(location)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def update_with_file(digest, path: str | os.PathLike) -> None:
    """Feed a local file's bytes into a hashlib object, 4 MiB at a time."""
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
