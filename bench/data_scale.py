"""Data path of `hdpo-ray train` at UltraFeedback's full size (61,135 pairs), built from the shipped sample.

    python bench/data_scale.py [--sizes 1000,10000,61135] [--reference-pass-sizes 1000] [--layouts one,many]
                               [--work DIR]

For each size N the 900 real pairs of hdpo_ray/assets/ultrafeedback/train_prefs-900.parquet are cycled to N
rows (real text unchanged, prompt_id made distinct per copy) and written as one parquet file ("one") and as
1000-row files in a folder ("many"). Each input is trained on by the real CLI, `hdpo-ray train`, in a
subprocess joined to one Ray head (2 CPUs) that this script starts and kills, for 2 optimizer steps on the
embedded demo's defaults (`hdpo-ray --help-config`, 2 workers):
  - stream: reference.cache_dir=null, the reference pool streams beside the training workers (every size and
    layout; with reference.num_cpus_per_actor=0.5 and train.cpus_per_worker=0.25, so that all fit in 2 CPUs);
  - cached: reference.cache_dir set, the whole reference pass runs first (--reference-pass-sizes, one file):
    reference pass seconds and pairs/s, reference-cache bytes per pair, and a projection to 61,135 pairs.
Every run tokenizes its whole input first; encode pairs/s is rows read / seconds from the encoded entry's
manifest.json. Memory is the resident set size (RSS) sampled every 0.25 s: the driver (the CLI process), the
Ray Train workers (RayTrainWorker) and the reference actors (ReferenceScorer); time to first step is from the
CLI's start to its first "step 1/" line. Printed: a markdown table, one row per run, and the driver's and
workers' peak RSS at the largest size over the smallest (stream mode, per layout; goal within 1.15).
Rows also go to WORK/data_scale.json, each run's log to WORK/runs/<run>.log.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray_processes import MB, REPO, MemorySampler, RayHead  # bench/ is sys.path[0] when run as a script

SAMPLE_DIR = REPO / "hdpo_ray" / "assets" / "ultrafeedback"
TRAIN_SAMPLE = SAMPLE_DIR / "train_prefs-900.parquet"
EVAL_FILE = SAMPLE_DIR / "test_prefs-100.parquet"
FULL_SIZE = 61135  # UltraFeedback binarized train_prefs
ROWS_PER_FILE = 1000
FIRST_STEP_MARK = "step 1/"
WORKER_MARK, REFERENCE_MARK = "RayTrainWorker", "ReferenceScorer"  # in Ray's process titles: ray::RayTrainWorker, ...
RSS_GOAL = 1.15
# Streaming holds workers, reference pool and Ray Data's 1 CPU at once: 3 CPUs with the tiny default's claims.
# These are the claims hdpo_ray's capacity check suggests for 2 CPUs (tests/unit/train/test_trainer_plan.py); threads
# stay as they were measured (2 per reference actor, a worker gets max(1, int(cpus_per_worker)) = 1).
STREAM_ON_TWO_CPUS = [
    "reference.cache_dir=null",
    "reference.num_cpus_per_actor=0.5",
    "reference.torch_threads=2",
    "train.cpus_per_worker=0.25",
]


# ---- inputs -------------------------------------------------------------------------------------------------


def cycled(sample: pa.Table, n: int) -> pa.Table:
    """n rows cycling the sample; copy k of a row gets prompt_id "<id>-<k>" so no two rows share an id."""
    index = np.arange(n, dtype=np.int64)
    table = sample.take(pa.array(index % sample.num_rows))
    copy = pa.array(index // sample.num_rows).cast(pa.string())
    ids = pc.binary_join_element_wise(table["prompt_id"], copy, "-")
    return table.set_column(table.schema.get_field_index("prompt_id"), "prompt_id", ids)


def write_input(table: pa.Table, work: Path, layout: str) -> tuple[str, int]:
    """(what to pass as data.train_files, number of files) for one layout; "many" is a folder, which
    expand_sources lists recursively."""
    if layout == "one":
        path = work / "inputs" / f"{table.num_rows}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        return str(path), 1
    folder = work / "inputs" / f"{table.num_rows}-many"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    starts = range(0, table.num_rows, ROWS_PER_FILE)
    for part, start in enumerate(starts):
        pq.write_table(table.slice(start, ROWS_PER_FILE), folder / f"part-{part:05d}.parquet")
    return str(folder), len(starts)


def build_inputs(work: Path, wanted: set[tuple[int, str]]) -> dict[tuple[int, str], tuple[str, int]]:
    sample = pq.read_table(TRAIN_SAMPLE)
    inputs = {}
    for size in sorted({size for size, _ in wanted}):
        table = cycled(sample, size)
        for layout in ("one", "many"):
            if (size, layout) in wanted:
                inputs[size, layout] = write_input(table, work, layout)
    return inputs


# ---- one run ------------------------------------------------------------------------------------------------


class LogReader(threading.Thread):
    """Copies the CLI's merged output to its log file and notes when the first training step is logged."""

    def __init__(self, stream, log_path: Path, started: float):
        super().__init__(daemon=True)
        self.stream, self.log_path, self.started = stream, log_path, started
        self.first_step_s: float | None = None

    def run(self) -> None:
        with open(self.log_path, "w") as log:
            for line in self.stream:
                if self.first_step_s is None and FIRST_STEP_MARK in line:
                    self.first_step_s = time.perf_counter() - self.started
                log.write(line)
                log.flush()


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "hdpo-ray"
    return [str(script)] if script.exists() else [sys.executable, "-m", "hdpo_ray"]


def run_cli(overrides: list[str], log_path: Path, head: RayHead) -> dict:
    env = {**head.env, "PYTHONUNBUFFERED": "1"}  # head.env has RAY_ADDRESS; unbuffered: the step line's time is real
    started = time.perf_counter()
    proc = subprocess.Popen(
        [*cli_command(), "train", *overrides], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    sampler = MemorySampler(proc.pid, head, kept_marks=(WORKER_MARK, REFERENCE_MARK))
    reader = LogReader(proc.stdout, log_path, started)
    sampler.start()
    reader.start()
    try:
        code = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: the driver goes with us
            proc.kill()
            proc.wait()
        sampler.stopping.set()
        sampler.join()
        reader.join(timeout=30)
    return {
        "exit_code": code,
        "wall_s": time.perf_counter() - started,
        "first_step_s": reader.first_step_s,
        "driver_peak_mb": sampler.driver_peak,
        "worker_peak_mb": sampler.max_peak(WORKER_MARK),
        "reference_peak_mb": sampler.max_peak(REFERENCE_MARK),
        "ray_processes_peak_mb": sampler.named_peaks(),
    }


# ---- what the run wrote -------------------------------------------------------------------------------------


def manifests(cache_root: Path, prefix: str) -> list[tuple[Path, dict]]:
    return [
        (entry, json.loads((entry / "manifest.json").read_text()))
        for entry in sorted(cache_root.glob(f"{prefix}-*"))
        if (entry / "manifest.json").exists()
    ]


def train_encoded(cache_root: Path) -> tuple[Path, dict]:
    """The train split's encoded entry: the one whose files are not the eval file."""
    entries = [(entry, m) for entry, m in manifests(cache_root, "encoded") if str(EVAL_FILE) not in m["files"]]
    if len(entries) != 1:
        raise RuntimeError(f"expected one train encoded entry under {cache_root}, found {len(entries)}")
    return entries[0]


def train_reference(cache_root: Path, encoded_entry: Path) -> tuple[Path, dict]:
    entries = [(entry, m) for entry, m in manifests(cache_root, "reference") if Path(m["encoded"]) == encoded_entry]
    if len(entries) != 1:
        raise RuntimeError(f"expected one train reference entry under {cache_root}, found {len(entries)}")
    return entries[0]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(size: int, layout: str, mode: str, inputs: dict, work: Path, head: RayHead) -> dict:
    source, files = inputs[size, layout]
    name = f"{size}-{layout}-{mode}"
    output_dir = work / "runs" / name
    cache_dir = work / f"cache-{size}-{layout}"
    for stale in (output_dir, cache_dir):  # a warm cache would skip the very passes being measured
        shutil.rmtree(stale, ignore_errors=True)
    overrides = [
        f"output_dir={output_dir}",
        f"data.train_files=[{source}]",
        f"data.eval_files=[{EVAL_FILE}]",
        "train.max_steps=2",
        "train.logging_steps=1",
        "train.eval_steps=0",
        "train.save_steps=0",
        *(STREAM_ON_TWO_CPUS if mode == "stream" else [f"reference.cache_dir={cache_dir}"]),
    ]
    print(f"[data_scale] {name}: hdpo-ray train {shlex.join(overrides)}", file=sys.stderr, flush=True)
    log_path = output_dir.with_name(name + ".log")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    run = run_cli(overrides, log_path, head)
    if run["exit_code"] != 0:
        tail = log_path.read_text().splitlines()[-40:]
        print(
            f"[data_scale] {name} exited {run['exit_code']}; last 40 lines of {log_path}:\n" + "\n".join(tail),
            file=sys.stderr,
        )
        raise SystemExit(1)
    cache_root = output_dir / "prepared" if mode == "stream" else cache_dir  # see hdpo_ray/data/prepare.py _cache_root
    encoded_entry, encoded = train_encoded(cache_root)
    row = {
        "pairs": size,
        "layout": layout,
        "files": files,
        "mode": mode,
        "rows_read": encoded["report"]["read"],
        "valid_pairs": encoded["report"]["valid"],
        "encode_s": encoded["seconds"],
        "encode_pairs_per_s": encoded["report"]["read"] / encoded["seconds"],
    } | run
    if mode == "cached":
        entry, ref = train_reference(cache_root, encoded_entry)
        row |= {
            "reference_pairs": ref["pairs"],
            "reference_s": ref["seconds"],
            "reference_pairs_per_s": ref["pairs"] / ref["seconds"],
            "ref_cache_bytes_per_pair": dir_bytes(entry) / ref["pairs"],
        }
    print(f"[data_scale] {name}: exit 0 in {run['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return row


# ---- report -------------------------------------------------------------------------------------------------


def cell(value, fmt: str = ",.0f") -> str:
    return "-" if value is None else format(value, fmt)


def print_table(rows: list[dict]) -> None:
    print(
        "| pairs | layout | mode | encode pairs/s | reference pass s | ref-cache bytes/pair | driver peak RSS MB "
        "| max worker peak RSS MB | max reference actor peak RSS MB | time to first step s | wall s |"
    )
    print("|---:|---|---|" + "---:|" * 8)
    for r in rows:
        # "many" below 1000 pairs is a folder holding 1 file: the layout's name keeps the two rows apart
        layout = f"{r['layout']}: {r['files']} file{'s' if r['files'] > 1 else ''}"
        cells = [
            f"{r['pairs']:,}",
            layout,
            r["mode"],
            cell(r["encode_pairs_per_s"]),
            cell(r.get("reference_s"), ".1f"),
            cell(r.get("ref_cache_bytes_per_pair")),
            cell(r["driver_peak_mb"]),
            cell(r["worker_peak_mb"]),
            cell(r["reference_peak_mb"]),
            cell(r["first_step_s"], ".1f"),
            cell(r["wall_s"], ".1f"),
        ]
        print("| " + " | ".join(cells) + " |")


def rss_ratios(rows: list[dict]) -> list[dict]:
    """Peak RSS at the largest size over the smallest, per layout, stream mode: flat memory means the data streams."""
    out = []
    for layout in ("one", "many"):
        stream = sorted((r for r in rows if r["layout"] == layout and r["mode"] == "stream"), key=lambda r: r["pairs"])
        if len(stream) >= 2 and stream[0]["pairs"] != stream[-1]["pairs"]:
            small, large = stream[0], stream[-1]
            ratio = {
                "layout": layout,
                "small": small["pairs"],
                "large": large["pairs"],
                "driver": large["driver_peak_mb"] / small["driver_peak_mb"],
            }
            if small["worker_peak_mb"] and large["worker_peak_mb"]:
                ratio["worker"] = large["worker_peak_mb"] / small["worker_peak_mb"]
            out.append(ratio)
    return out


def projections(rows: list[dict]) -> list[dict]:
    return [
        {
            "from_pairs": r["pairs"],
            "pairs_per_s": r["reference_pairs_per_s"],
            "projected_reference_s": FULL_SIZE / r["reference_pairs_per_s"],
            "projected_ref_cache_mb": FULL_SIZE * r["ref_cache_bytes_per_pair"] / MB,
        }
        for r in rows
        if r["mode"] == "cached"
    ]


def print_summary(ratios: list[dict], projected: list[dict]) -> None:
    print()
    for p in projected:
        seconds = p["projected_reference_s"]
        print(
            f"projected: reference pass for {FULL_SIZE:,} pairs at {p['pairs_per_s']:.1f} pairs/s "
            f"(measured at {p['from_pairs']:,} pairs) = {seconds:,.0f} s ({seconds / 3600:.2f} h), "
            f"reference cache {p['projected_ref_cache_mb']:,.0f} MB"
        )
    for r in ratios:
        worker = f", worker {r['worker']:.2f}" if "worker" in r else ""
        sizes = f"{r['large']:,} / {r['small']:,} pairs"
        print(f"peak RSS {sizes} ({r['layout']} layout, stream): driver {r['driver']:.2f}{worker}")
    if ratios:
        print(f"goal: within {RSS_GOAL}")


# ---- main ---------------------------------------------------------------------------------------------------


def sizes_arg(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def planned_runs(args) -> list[tuple[int, str, str]]:
    """(size, layout, mode), smallest size first; the cached runs use the one-file layout."""
    runs = []
    for size in sorted(set(args.sizes) | set(args.reference_pass_sizes)):
        if size in args.sizes:
            runs += [(size, layout, "stream") for layout in ("one", "many") if layout in args.layouts]
        if size in args.reference_pass_sizes:
            runs.append((size, "one", "cached"))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=sizes_arg, default=[1000, 10000, FULL_SIZE], help="pairs per input, comma-separated"
    )
    parser.add_argument(
        "--reference-pass-sizes",
        type=sizes_arg,
        default=[1000],
        help="sizes that also get a cached (full reference pass) run",
    )
    parser.add_argument(
        "--layouts",
        type=lambda s: s.split(","),
        default=["one", "many"],
        help="one (a single parquet file), many (1000-row files)",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/hdpo-data-scale"))
    args = parser.parse_args()
    if not set(args.layouts) <= {"one", "many"}:
        parser.error("--layouts takes one, many or one,many")

    now = datetime.datetime.now().astimezone()
    print(f"`python {shlex.join(sys.argv)}`, {now:%Y-%m-%d %H:%M %Z}, {os.cpu_count()} cores\n", flush=True)
    work = args.work.resolve()
    runs = planned_runs(args)
    inputs = build_inputs(work, {(size, layout) for size, layout, _ in runs})
    head = RayHead()
    # SIGTERM ends the script through the finally below too, so that the Ray head never outlives it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        head.start()
        print(f"[data_scale] Ray head at {head.address}, temp dir {head.temp_dir}", file=sys.stderr, flush=True)
        rows = []
        for size, layout, mode in runs:
            rows.append(measure(size, layout, mode, inputs, work, head))
            # printed as measured: kept if a later run is cut short
            print(f"[data_scale] measured: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    finally:
        head.stop()
        if left := head.leftovers():
            print(f"[data_scale] processes of our Ray head still alive after SIGKILL: {left}", file=sys.stderr)
    ratios, projected = rss_ratios(rows), projections(rows)
    print_table(rows)
    print_summary(ratios, projected)
    (work / "data_scale.json").write_text(
        json.dumps(
            {
                "command": sys.argv,
                "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "rows": rows,
                "rss_ratios": ratios,
                "projections": projected,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
