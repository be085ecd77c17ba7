"""Read -> validate -> template/tokenize -> reference log-probs, as Ray Data passes with cached outputs.

Two cache entries, each a folder of parquet files plus a manifest.json written last (an entry without
its manifest is incomplete and is rebuilt, so an interrupted write is never read):
- `encoded-<key>`: every row read, tokenized or marked with skip_reason; the key hashes the data
  files' contents, the tokenizer, the chat template and the truncation settings. The report of what
  was read, skipped and truncated comes from this pass, so it counts every row of every file.
- `reference-<key>`: the valid pairs with ref_chosen_logps / ref_rejected_logps; the key adds a hash
  of the reference weights. A run (or every trial of a sweep) with the same inputs finds it and runs
  no reference forward pass. With `reference.cache_dir: null` the reference pool instead streams its
  output straight into training and nothing is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from hdpo_ray.config import Config, is_uri
from hdpo_ray.data.read import _filesystem, expand_sources, fingerprint_sources, read_raw_rows
from hdpo_ray.data.reference import add_reference_logprobs, reference_dtype
from hdpo_ray.data.template import encode_rows_fn

log = logging.getLogger("hdpo_ray")
PREP_VERSION = "2"  # bump when the encoded layout, the row order or tokenization rules change
MAX_EXAMPLES = 20
ROWS_PER_FILE = 4096  # cache entries are written in files of at least this many rows, not one per (small) block
READ_CPUS = (
    0.25  # parquet reads and writes are I/O: a small CPU claim lets them run beside the reference pool and the workers
)


class DataError(ValueError):
    """Input data the run cannot use; the message is one line for the user, `report` what was read."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


@dataclass
class PreparedSplit:
    dataset: Any  # lazy ray.data.Dataset of valid pairs with reference log-probs
    num_pairs: int
    report: dict[str, Any]
    reference_forward_pairs: int  # pairs the reference model scored in this run (0 on a cache hit)
    cache_entry: str | None


def _hash(*parts: Any) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=10).hexdigest()


def _cache_root(config: Config) -> str:
    root = config.reference.cache_dir or os.path.join(config.output_dir, "prepared")
    return root if is_uri(root) else os.path.abspath(os.path.expanduser(root))


def _entry_fs(entry: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a cache entry given as a URI or a local absolute path."""
    return _filesystem(entry if is_uri(entry) else f"file://{entry}")


def _read_manifest(entry: str) -> dict | None:
    fs, path = _entry_fs(entry)
    try:
        with fs.open_input_stream(f"{path}/manifest.json") as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError):
        return None


def _write_manifest(entry: str, manifest: dict) -> None:
    fs, path = _entry_fs(entry)
    with fs.open_output_stream(f"{path}/manifest.json") as f:
        f.write(json.dumps(manifest, indent=2).encode())


def _fresh_dir(entry: str) -> None:
    """Empty a half-written entry so its stale parquet files are not mixed into the new one."""
    fs, path = _entry_fs(entry)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
    fs.create_dir(path)


def summarize(entry: str) -> dict[str, Any]:
    """Rows read, valid, skipped (by reason) and truncated, per file and in total, from an encoded entry.

    Counted with Arrow group-bys over five small columns: the driver holds no Python object per row, so
    its memory does not grow with the dataset (only the first MAX_EXAMPLES invalid rows become dicts).
    """
    import pyarrow.dataset as pads

    fs, path = _entry_fs(entry)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(
        columns=["source_file", "source_row", "skip_reason", "skip_detail", "truncated"]
    )
    valid = pc.is_null(table["skip_reason"])
    counts = pa.table(
        {
            "source_file": table["source_file"],
            "valid": pc.cast(valid, pa.int64()),
            "truncated": pc.cast(pc.and_(valid, table["truncated"]), pa.int64()),
        }
    )
    per_file = (
        counts.group_by("source_file")
        .aggregate([("valid", "count"), ("valid", "sum"), ("truncated", "sum")])
        .to_pylist()
    )
    skipped = table.filter(pc.invert(valid))
    reasons = skipped.group_by(["source_file", "skip_reason"]).aggregate([("source_row", "count")]).to_pylist()
    files = {}
    for row in sorted(per_file, key=lambda r: r["source_file"]):
        read, good = row["valid_count"], row["valid_sum"]
        by_reason = {r["skip_reason"]: r["source_row_count"] for r in reasons if r["source_file"] == row["source_file"]}
        files[row["source_file"]] = {
            "read": read,
            "valid": good,
            "skipped": read - good,
            "truncated": row["truncated_sum"],
            "skipped_by_reason": by_reason,
        }
    total = {key: sum(f[key] for f in files.values()) for key in ("read", "valid", "skipped", "truncated")}
    by_reason: dict[str, int] = defaultdict(int)
    for stats in files.values():
        for reason, count in stats["skipped_by_reason"].items():
            by_reason[reason] += count
    first_invalid = (
        skipped.sort_by([("source_file", "ascending"), ("source_row", "ascending")]).slice(0, MAX_EXAMPLES).to_pylist()
    )
    examples = [
        {"file": r["source_file"], "row": r["source_row"], "reason": r["skip_reason"], "detail": r["skip_detail"]}
        for r in first_invalid
    ]
    return {**total, "skipped_by_reason": dict(by_reason), "files": files, "invalid_examples": examples}


def _row_name(file: str, row: int) -> str:
    return f"{file}, {'line' if file.endswith(('.jsonl', '.jsonl.gz')) else 'row'} {row}"


def _valid_only(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_null(table["skip_reason"]))


def _encode(config: Config, files: list[str], tokenizer, split: str) -> tuple[str, dict]:
    from hdpo_ray.models import tokenizer_fingerprint

    data = config.data
    key = _hash(
        PREP_VERSION,
        fingerprint_sources(files),
        tokenizer_fingerprint(tokenizer),
        data.max_length,
        data.max_prompt_length,
    )
    entry = f"{_cache_root(config)}/encoded-{key}"
    manifest = _read_manifest(entry)
    if manifest is None:
        start = time.perf_counter()
        _fresh_dir(entry)
        encode = encode_rows_fn(
            config.model.name_or_path,
            data.chat_template,
            data.max_length,
            data.max_prompt_length,
            config.model.trust_remote_code,
        )
        encoded = read_raw_rows(files).map_batches(encode, batch_format="pyarrow", batch_size=256)
        encoded.set_name(f"encode-{split}")  # the stage's name in the Ray dashboard's Data view
        encoded.write_parquet(entry, min_rows_per_file=ROWS_PER_FILE)
        manifest = {
            "key": key,
            "files": files,
            "report": summarize(entry),
            "seconds": round(time.perf_counter() - start, 2),
        }
        _write_manifest(entry, manifest)
    log.info(
        "%s data: %d rows read, %d valid, %d skipped, %d truncated (%s)",
        split,
        manifest["report"]["read"],
        manifest["report"]["valid"],
        manifest["report"]["skipped"],
        manifest["report"]["truncated"],
        entry,
    )
    return entry, manifest


@dataclass
class EncodedSplit:
    name: str  # "train" or "eval"
    entry: str  # the encoded-<key> cache entry
    manifest: dict[str, Any]

    @property
    def report(self) -> dict[str, Any]:
        return self.manifest["report"]


def encode_split(config: Config, specs: list[str], split: str) -> EncodedSplit:
    """Read, validate and tokenize one split (cached); raise DataError per data.on_invalid."""
    from hdpo_ray.models import load_tokenizer

    tokenizer = load_tokenizer(config.model.name_or_path, config.data.chat_template, config.model.trust_remote_code)
    entry, manifest = _encode(config, expand_sources(specs), tokenizer, split)
    report = manifest["report"]
    if report["skipped"] and config.data.on_invalid == "error":
        first = report["invalid_examples"][0]
        raise DataError(
            (
                f"{_row_name(first['file'], first['row'])}: {first['reason']}: {first['detail']} ({report['skipped']} "
                f"invalid rows in {split} data, listed in data_report.json; fix them or set data.on_invalid=skip)"
            ),
            {split: report},
        )
    if report["valid"] == 0:
        raise DataError(f"no valid pairs in {split} data {specs}: {report['skipped_by_reason']}", {split: report})
    return EncodedSplit(split, entry, manifest)


def configure_ray_data() -> None:
    """This process's Ray Data settings, set before it builds a dataset: no progress bars, warnings only,
    rows kept in order, and parquet read by Ray Data's V1 reader.

    In order: the cache entries hold the pairs in input order whatever the cluster (the reference pool's
    actors finish batches in any order), so training sees the same pairs in the same steps anywhere.

    Ray 2.60's V2 parquet reader lists files in a task holding one CPU that starts 32 FooterReader
    actors, each needing one more CPU to be scheduled. Where little CPU is free (a sweep's trials side
    by side, each worker reading the eval split, on a cluster the workers fill), the listing tasks hold
    every free CPU and their footer readers never start: the run hangs. V1 reads with READ_CPUS.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.use_datasource_v2 = False
    context.execution_options.preserve_order = True
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def read_entry(entry: str, num_blocks: int | None = None, num_cpus: float = READ_CPUS, concurrency: int | None = None):
    """A cache entry's parquet files as a Ray Dataset, in file order (how training cuts it into
    blocks: train.trainer.rank_blocks).

    num_blocks: cut the files into about this many blocks as they are read (inside the read tasks); None leaves
    it to Ray Data. Built after configure_ray_data (the V1 reader)."""
    import ray.data

    return ray.data.read_parquet(
        entry, file_extensions=["parquet"], num_cpus=num_cpus, override_num_blocks=num_blocks, concurrency=concurrency
    )


def _parquet_rows(entry: str) -> int:
    import pyarrow.dataset as pads

    fs, path = _entry_fs(entry)
    return pads.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=True).count_rows()


def _valid_pairs(config: Config, encoded: EncodedSplit, *, streamed: bool):
    """The encoded entry's valid pairs, lazily, in blocks of about one reference batch cut as the files are read.

    Small blocks: the pool scores block by block, so every actor gets work and scored pairs move on as they
    come (a block of a whole file would reach training only once all of it is scored). Streamed into training,
    reading claims no CPU, one task at a time: a large input is read for as long as the pass lasts, and with
    reads claiming CPU, Ray Data's budget beside the pool and the workers (one CPU, as capacity checks) would
    never free the whole CPU that rank_blocks' repartition task asks for; tasks that claim nothing would
    otherwise be started without limit.
    """
    read_cpus, read_tasks = (0, 1) if streamed else (READ_CPUS, None)
    blocks = max(1, math.ceil(encoded.report["read"] / config.reference.batch_size))
    pairs = read_entry(encoded.entry, num_blocks=blocks, num_cpus=read_cpus, concurrency=read_tasks)
    return pairs.map_batches(_valid_only, batch_format="pyarrow", num_cpus=read_cpus, concurrency=read_tasks)


def score_split(config: Config, encoded: EncodedSplit, *, stream: bool = True) -> PreparedSplit:
    """Attach reference log-probs to the valid pairs of an encoded split, from the cache or the pool.

    With reference.cache_dir null and `stream`, the reference pool's output is returned lazily to be
    streamed into training. Eval data is never streamed (stream=False): Ray Train hands unsplit
    datasets to every worker, so a streamed eval split would start one reference pool per worker.
    """

    from hdpo_ray.models import load_tokenizer, model_fingerprint

    split, report = encoded.name, encoded.report
    pad_id = load_tokenizer(
        config.model.name_or_path, config.data.chat_template, config.model.trust_remote_code
    ).pad_token_id
    streamed = config.reference.cache_dir is None and stream
    valid = _valid_pairs(config, encoded, streamed=streamed)
    if streamed:
        scored = add_reference_logprobs(valid, config, pad_id)
        scored.set_name(f"reference-{split}")
        return PreparedSplit(scored, report["valid"], report, report["valid"], None)

    key = _hash(
        encoded.manifest["key"],
        model_fingerprint(config.model.reference),
        reference_dtype(config),
        config.model.trust_remote_code,
    )
    entry = f"{_cache_root(config)}/reference-{key}"
    ref_manifest = _read_manifest(entry)
    forward_pairs = 0
    if ref_manifest is None:
        start = time.perf_counter()
        _fresh_dir(entry)
        scored = add_reference_logprobs(valid, config, pad_id)
        scored.set_name(f"reference-{split}")
        scored.write_parquet(entry, min_rows_per_file=ROWS_PER_FILE, ray_remote_args={"num_cpus": READ_CPUS})
        written = _parquet_rows(entry)
        if written != report["valid"]:  # e.g. parts written to node-local disks of other nodes
            raise DataError(
                f"reference pass wrote {written} of {report['valid']} pairs to {entry}; on a multi-node cluster "
                "reference.cache_dir must be shared storage (a URI or a shared mount)"
            )
        forward_pairs = report["valid"]
        ref_manifest = {
            "key": key,
            "encoded": encoded.entry,
            "reference": config.model.reference,
            "pairs": forward_pairs,
            "seconds": round(time.perf_counter() - start, 2),
            "id": uuid.uuid4().hex,
        }
        _write_manifest(entry, ref_manifest)
        log.info(
            "%s reference log-probs: %d pairs scored in %.1f s -> %s",
            split,
            forward_pairs,
            ref_manifest["seconds"],
            entry,
        )
    else:
        log.info("%s reference log-probs: cache hit, no reference forward pass (%s)", split, entry)
    dataset = read_entry(entry)
    return PreparedSplit(dataset, report["valid"], report, forward_pairs, entry)


def prepare_split(config: Config, specs: list[str], split: str, *, stream: bool = True) -> PreparedSplit:
    """encode_split then score_split: one split from files to pairs with reference log-probs."""
    return score_split(config, encode_split(config, specs, split), stream=stream)
