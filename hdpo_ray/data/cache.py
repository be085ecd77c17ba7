"""A cache entry: a folder of parquet files (local or behind a URI) and a manifest.json written last.

An entry without a readable manifest is incomplete (a write cut off, a manifest half-written) and is
rebuilt from scratch, so an interrupted write is never read. The data flow keeps two kinds of entry
(hdpo_ray.data.prepare): `encoded-<key>` and `reference-<key>`; sweeps, entropy and eval read them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs

from hdpo_ray.config import Config, is_uri
from hdpo_ray.storage import filesystem

MANIFEST = "manifest.json"
READ_CPUS = 0.25  # parquet reads and writes are I/O: a small CPU claim lets them run beside the pool and workers


def cache_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts: what an entry was built from."""
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=10).hexdigest()


def cache_root(config: Config) -> str:
    """reference.cache_dir, or OUTPUT_DIR/prepared; local paths made absolute."""
    root = config.reference.cache_dir or os.path.join(config.output_dir, "prepared")
    return root if is_uri(root) else os.path.abspath(os.path.expanduser(root))


def read_manifest(entry: str) -> dict | None:
    """The entry's manifest, or None when the entry is missing or incomplete."""
    fs, path = filesystem(entry)
    try:
        with fs.open_input_stream(f"{path}/{MANIFEST}") as f:
            return json.loads(f.read())
    except (OSError, ValueError):  # absent, unreadable, or cut off mid-write (JSONDecodeError is a ValueError)
        return None


def write_manifest(entry: str, manifest: dict) -> None:
    """Written beside, then moved into place: a reader finds the whole manifest or none."""
    fs, path = filesystem(entry)
    partial = f"{path}/{MANIFEST}.partial"
    with fs.open_output_stream(partial) as f:
        f.write(json.dumps(manifest, indent=2).encode())
    fs.move(partial, f"{path}/{MANIFEST}")


def fresh_dir(entry: str) -> None:
    """Empty a half-written entry so its stale parquet files are not mixed into the new one."""
    fs, path = filesystem(entry)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
    fs.create_dir(path)


def build_or_read(entry: str, build: Callable[[], dict]) -> tuple[dict, bool]:
    """(manifest, built): the entry's manifest when complete, else the entry emptied, `build()` run to fill it
    and return its manifest, and that manifest written last."""
    manifest = read_manifest(entry)
    if manifest is not None:
        return manifest, False
    fresh_dir(entry)
    manifest = build()
    write_manifest(entry, manifest)
    return manifest, True


def read_entry(entry: str, num_blocks: int | None = None, num_cpus: float = READ_CPUS, concurrency: int | None = None):
    """A cache entry's parquet files as a Ray Dataset, in file order (how training cuts it into
    blocks: train.trainer.rank_blocks).

    num_blocks: cut the files into about this many blocks as they are read (inside the read tasks); None leaves
    it to Ray Data. Built after runtime.configure_ray_data (the V1 reader)."""
    import ray.data

    return ray.data.read_parquet(
        entry, file_extensions=["parquet"], num_cpus=num_cpus, override_num_blocks=num_blocks, concurrency=concurrency
    )


def parquet_dataset(entry: str):
    """The entry's parquet files as a pyarrow dataset (the manifest beside them is not one of them)."""
    import pyarrow.dataset as pads

    fs, path = filesystem(entry)
    return pads.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=True)


def read_table(entry: str, columns: list[str] | None = None):
    """The entry's rows as one Arrow table on this process (for small reads: reports, prompts)."""
    return parquet_dataset(entry).to_table(columns=columns)


def count_rows(entry: str) -> int:
    return parquet_dataset(entry).count_rows()
