"""Read preference files into a Ray Dataset of raw rows, one row per line or record, never failing a file.

Each output row has `source_file`, `source_row` (1-based: the line number in a jsonl file, the record
number in parquet/json) and `raw`, the record as a JSON string, so files of different layouts and
schemas share one Arrow schema. A jsonl line that is not JSON becomes a row with `raw` = null and
`read_error` set, so one bad line never makes the whole file unreadable; validation decides what to do.

Sources: local files, folders and globs; any URI pyarrow reads (s3://, gs://, hdfs://) or fsspec
reads (hf://, ...); `embedded:NAME` for the data shipped in the package; and Hugging Face hub
dataset ids `owner/name:split` (resolved to the split's parquet files through hf://).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from hdpo_ray.config import DATA_SUFFIXES, is_uri, looks_like_hub_id
from hdpo_ray.errors import UserError
from hdpo_ray.storage import filesystem, update_with_file

ROWS_PER_BLOCK = 512
RAW_SCHEMA = pa.schema(
    [("source_file", pa.string()), ("source_row", pa.int64()), ("raw", pa.string()), ("read_error", pa.string())]
)


class SourceError(UserError, ValueError):
    """A data source that cannot be listed or opened; one line for the user."""


def _hub_patterns(spec: str) -> list[str]:
    """The hub's parquet layouts for one split: data/{split}-00000-of-N.parquet, {split}.parquet, {split}/*.parquet."""
    repo, _, split = spec.partition(":")
    split = split or "train"
    return [
        f"hf://datasets/{repo}/**/{split}-*.parquet",
        f"hf://datasets/{repo}/**/{split}.parquet",
        f"hf://datasets/{repo}/**/{split}/*.parquet",
    ]


def expand_sources(specs: list[str]) -> list[str]:
    """Turn file specs into a sorted list of data files (local paths or URIs); raises SourceError."""
    files: list[str] = []
    for spec in specs:
        if spec.startswith("embedded:"):
            path = Path(str(resources.files("hdpo_ray") / "assets" / spec.removeprefix("embedded:")))
            found = [str(path)] if path.is_file() else []
        elif is_uri(spec):
            found = _expand_remote(spec)
        elif looks_like_hub_id(spec) and not os.path.exists(spec):
            found = next((files for pattern in _hub_patterns(spec) if (files := _expand_remote(pattern))), [])
        else:
            local = os.path.expanduser(spec)
            if os.path.isdir(local):
                found = sorted(
                    p for p in glob.glob(os.path.join(local, "**", "*"), recursive=True) if p.endswith(DATA_SUFFIXES)
                )
            else:
                found = (
                    sorted(glob.glob(local)) if glob.has_magic(local) else ([local] if os.path.isfile(local) else [])
                )
        if not found:
            raise SourceError(f"data source {spec} matched no parquet/jsonl/json file")
        files.extend(found)
    return files


def _expand_remote(uri: str) -> list[str]:
    scheme = uri.split("://", 1)[0]
    try:
        if glob.has_magic(uri):
            import fsspec

            fs, pattern = fsspec.core.url_to_fs(uri)
            return sorted(f"{scheme}://{p}" for p in fs.glob(pattern) if p.endswith(DATA_SUFFIXES))
        fs, path = filesystem(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            listing = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            return sorted(f"{scheme}://{i.path}" for i in listing if i.path.endswith(DATA_SUFFIXES))
        return [uri] if info.type == pafs.FileType.File else []
    except Exception as err:  # network, credentials, unknown protocol: say which source and why
        raise SourceError(
            f"data source {uri} could not be listed: {type(err).__name__}: {str(err).splitlines()[0]}"
        ) from None


def fingerprint_sources(files: list[str]) -> list[tuple[str, int, str]]:
    """(file, size, content or version token) per file, for cache keys; local files are hashed."""
    import hashlib

    out = []
    for file in files:
        if is_uri(file):
            fs, path = filesystem(file)
            info = fs.get_file_info(path)
            out.append((file, info.size or 0, str(info.mtime_ns)))
        else:
            digest = hashlib.blake2b(digest_size=16)
            update_with_file(digest, file)
            out.append((file, os.path.getsize(file), digest.hexdigest()))
    return out


def _open(file: str):
    if is_uri(file):
        fs, path = filesystem(file)
        return fs.open_input_stream(path, compression=None)  # bytes as stored: .gz is decompressed by the reader
    return open(file, "rb")


def row_name(file: str, row: int) -> str:
    """How a user finds a row: "FILE, line N" in jsonl files, "FILE, row N" (the record number) in others."""
    return f"{file}, {'line' if file.endswith(('.jsonl', '.jsonl.gz')) else 'row'} {row}"


def file_records(file: str) -> Iterator[tuple[int, str | None, str | None]]:
    """(row number, JSON text or None, read error or None) for every record of one file."""
    if file.endswith(".parquet"):
        import pyarrow.parquet as pq

        row = 0
        with _open(file) as stream:
            for batch in pq.ParquetFile(stream).iter_batches(batch_size=ROWS_PER_BLOCK):
                for record in batch.to_pylist():
                    row += 1
                    yield row, json.dumps(record, ensure_ascii=False, default=str), None
    elif file.endswith((".jsonl", ".jsonl.gz")):
        with _open(file) as raw_stream:
            stream = gzip.GzipFile(fileobj=raw_stream) if file.endswith(".gz") else raw_stream
            for line_no, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8", errors="replace"), start=1):
                if not line.strip():
                    continue  # blank lines (a trailing newline) are not rows
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    yield line_no, None, f"line is not JSON ({err.msg} at column {err.colno})"
                    continue
                yield line_no, line.strip(), None
    else:  # .json: one JSON array of records (the LLaMA-Factory layout)
        with _open(file) as stream:
            try:
                records = json.load(io.TextIOWrapper(stream, encoding="utf-8"))
            except json.JSONDecodeError as err:
                yield 1, None, f"file is not JSON ({err.msg} at line {err.lineno})"
                return
        for row, record in enumerate(records if isinstance(records, list) else [records], start=1):
            yield row, json.dumps(record, ensure_ascii=False), None


def _records_or_error(file: str) -> Iterator[tuple[int, str | None, str | None]]:
    """file_records, but a file that cannot be opened or decoded ends in one error row (row 0) naming why."""
    try:
        yield from file_records(file)
    except (OSError, UnicodeDecodeError, pa.ArrowException) as err:
        yield 0, None, f"file could not be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"


def read_file_blocks(batch: dict) -> Iterator[pa.Table]:
    """Ray Data generator UDF: one input row names a file; yields its records in blocks."""
    for file in batch["file"]:
        columns: dict[str, list] = {name: [] for name in RAW_SCHEMA.names}
        for row, raw, error in _records_or_error(str(file)):
            for name, value in zip(RAW_SCHEMA.names, (str(file), row, raw, error), strict=True):
                columns[name].append(value)
            if len(columns["raw"]) == ROWS_PER_BLOCK:
                yield pa.table(columns, schema=RAW_SCHEMA)
                columns = {name: [] for name in RAW_SCHEMA.names}
        if columns["raw"]:
            yield pa.table(columns, schema=RAW_SCHEMA)


def read_raw_rows(files: list[str]):
    """A lazy Ray Dataset of raw rows from `files` (already expanded): one read task per file, cut into blocks of
    ROWS_PER_BLOCK rows, so that what comes next (tokenizing) spreads over every CPU even for a single big file."""
    import ray.data

    listing = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
    rows = listing.map_batches(read_file_blocks, batch_size=1, batch_format="pyarrow")
    return rows.repartition(target_num_rows_per_block=ROWS_PER_BLOCK)
