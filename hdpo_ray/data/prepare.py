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

import logging
import math
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from hdpo_ray.config import Config
from hdpo_ray.data.cache import READ_CPUS, build_or_read, cache_key, cache_root, count_rows, read_entry, read_table
from hdpo_ray.data.read import expand_sources, fingerprint_sources, read_raw_rows, row_name
from hdpo_ray.data.reference import add_reference_logprobs, reference_dtype
from hdpo_ray.data.template import encode_rows_fn
from hdpo_ray.errors import UserError

log = logging.getLogger("hdpo_ray")
PREP_VERSION = "2"  # bump when the encoded layout, the row order or tokenization rules change
MAX_EXAMPLES = 20
ROWS_PER_FILE = 4096  # cache entries are written in files of at least this many rows, not one per (small) block


class DataError(UserError, ValueError):
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


def summarize(entry: str) -> dict[str, Any]:
    """Rows read, valid, skipped (by reason) and truncated, per file and in total, from an encoded entry.

    Counted with Arrow group-bys over five small columns: the driver holds no Python object per row, so
    its memory does not grow with the dataset (only the first MAX_EXAMPLES invalid rows become dicts).
    """
    table = read_table(entry, columns=["source_file", "source_row", "skip_reason", "skip_detail", "truncated"])
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


def valid_only(table: pa.Table) -> pa.Table:
    """The rows of an encoded entry's table that validation kept (no skip_reason)."""
    return table.filter(pc.is_null(table["skip_reason"]))


def _encode(config: Config, files: list[str], tokenizer, split: str) -> tuple[str, dict]:
    from hdpo_ray.models import tokenizer_fingerprint

    data = config.data
    key = cache_key(
        PREP_VERSION,
        fingerprint_sources(files),
        tokenizer_fingerprint(tokenizer),
        data.max_length,
        data.max_prompt_length,
    )
    entry = f"{cache_root(config)}/encoded-{key}"

    def build() -> dict:
        start = time.perf_counter()
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
        return {
            "key": key,
            "files": files,
            "report": summarize(entry),
            "seconds": round(time.perf_counter() - start, 2),
        }

    manifest, _ = build_or_read(entry, build)
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
                f"{row_name(first['file'], first['row'])}: {first['reason']}: {first['detail']} ({report['skipped']} "
                f"invalid rows in {split} data, listed in data_report.json; fix them or set data.on_invalid=skip)"
            ),
            {split: report},
        )
    if report["valid"] == 0:
        raise DataError(f"no valid pairs in {split} data {specs}: {report['skipped_by_reason']}", {split: report})
    return EncodedSplit(split, entry, manifest)


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
    return pairs.map_batches(valid_only, batch_format="pyarrow", num_cpus=read_cpus, concurrency=read_tasks)


def _progress_display(context, shown: bool) -> None:
    """Ray Data's progress display (each operator's rows, rate and time) for the reference pass, on a terminal
    only; `context` is the dataset's own copy, taken when it was created."""
    context.enable_progress_bars = shown
    context.enable_rich_progress_bars = shown
    context.use_ray_tqdm = False


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

    key = cache_key(
        encoded.manifest["key"],
        model_fingerprint(config.model.reference),
        reference_dtype(config),
        config.model.trust_remote_code,
    )
    entry = f"{cache_root(config)}/reference-{key}"

    def build() -> dict:
        start = time.perf_counter()
        scored = add_reference_logprobs(valid, config, pad_id)
        scored.set_name(f"reference-{split}")
        _progress_display(scored.context, sys.stdout.isatty())
        scored.write_parquet(entry, min_rows_per_file=ROWS_PER_FILE, ray_remote_args={"num_cpus": READ_CPUS})
        written = count_rows(entry)
        if written != report["valid"]:  # e.g. parts written to node-local disks of other nodes
            raise DataError(
                f"reference pass wrote {written} of {report['valid']} pairs to {entry}; on a multi-node cluster "
                "reference.cache_dir must be shared storage (a URI or a shared mount)"
            )
        seconds = round(time.perf_counter() - start, 2)
        log.info("%s reference log-probs: %d pairs scored in %.1f s -> %s", split, report["valid"], seconds, entry)
        return {
            "key": key,
            "encoded": encoded.entry,
            "reference": config.model.reference,
            "pairs": report["valid"],
            "seconds": seconds,
            "id": uuid.uuid4().hex,
        }

    _, built = build_or_read(entry, build)
    if not built:
        log.info("%s reference log-probs: cache hit, no reference forward pass (%s)", split, entry)
    forward_pairs = report["valid"] if built else 0
    dataset = read_entry(entry)
    return PreparedSplit(dataset, report["valid"], report, forward_pairs, entry)
