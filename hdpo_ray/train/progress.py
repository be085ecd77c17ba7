"""The driver's view of a training run: it follows the files the Train controller writes (metrics.jsonl,
events.jsonl in OUTPUT_DIR, on the driver's node) and shows them, so the terminal carries only what a user
acts on whatever Ray prints elsewhere.

On a terminal: one progress bar (steps, rate, ETA, latest loss/accuracy). Otherwise (a pipe, `ray job
logs`, a test): the `progress_line` of each logged step. Worker failures, restores and metrics sinks that
failed are printed as lines either way.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hdpo_ray.train.tracking import progress_line

POLL_S = 0.25


class RunDisplay:
    """Shows a run's new metrics rows and events while it trains; `with RunDisplay(...):` around fit()."""

    def __init__(self, output_dir: str, total_steps: int, *, tty: bool | None = None):
        self.metrics = JsonLinesFollower(Path(output_dir, "metrics.jsonl"))
        self.events = JsonLinesFollower(Path(output_dir, "events.jsonl"))
        self.events.read()  # an earlier driver of the same run showed these, and the steps below
        self.seen_steps = max((row.get("step", 0) for row in self.metrics.read()), default=0)
        self.total_steps = total_steps
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.started = time.time()
        self.first: tuple[int, float] | None = None  # (step, time) the ETA counts from
        self.bar = None
        self.broken = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, name="hdpo-ray-progress", daemon=True)

    def __enter__(self) -> RunDisplay:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.poll()  # whatever the last report wrote
        if self.bar is not None:
            self.bar.close()

    def _follow(self) -> None:
        while not self.stop.wait(POLL_S):
            self.poll()

    def poll(self) -> None:
        """Show what was written since the last poll. The display never ends a run: an error here (a file
        removed under it, a terminal gone) costs the display, and the files keep everything."""
        if self.broken:
            return
        try:
            self._poll()
        except Exception as err:  # noqa: BLE001
            self.broken = True
            print(f"[hdpo-ray] warning: the progress display stopped ({type(err).__name__}: {err})", flush=True)

    def _poll(self) -> None:
        for event in self.events.read():
            self._say(_event_line(event))
            if event.get("event") == "restored":
                self.first, self.seen_steps = None, event.get("from_step", 0)  # the ETA restarts from here
        for row in self.metrics.read():
            if row.get("step", 0) > self.seen_steps:
                self.seen_steps = row["step"]
                self._show(row)

    def _show(self, row: dict[str, Any]) -> None:
        now = time.time()
        self.first = self.first or (row["step"], now)
        done, since = row["step"] - self.first[0], now - self.first[1]
        eta = since / done * (self.total_steps - row["step"]) if done > 0 else float("nan")
        if not self.tty:
            print(progress_line(row, self.total_steps, now - self.started, eta), flush=True)
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(  # from this first step on: the rate leaves out the start-up before it
                total=self.total_steps,
                initial=row["step"],
                unit="step",
                desc="[hdpo-ray] training",
                ncols=shutil.get_terminal_size((100, 24)).columns or 100,  # a terminal may report 0 columns
                file=sys.stdout,
            )
        self.bar.update(row["step"] - self.bar.n)
        self.bar.set_postfix_str(_postfix(row), refresh=True)

    def _say(self, line: str) -> None:
        (self.bar.write if self.bar is not None else print)(line)
        sys.stdout.flush()


def _postfix(row: dict[str, Any]) -> str:
    parts = []
    if "loss" in row:
        parts += [
            f"loss {row['loss']:.4f}",
            f"acc {row['rewards/accuracies']:.2f}",
            f"{row['tokens_per_s']:,.0f} tok/s",
        ]
    if "eval/loss" in row:
        parts.append(f"eval acc {row['eval/rewards/accuracies']:.2f}")
    return ", ".join(parts)


def _event_line(event: dict[str, Any]) -> str:
    kind = event.get("event", "")
    if kind == "worker_failure":
        ranks = ", ".join(map(str, event.get("ranks", [])))
        errors = "; ".join(f"rank {r}: {e}" for r, e in event.get("errors", {}).items())
        return (
            f"[hdpo-ray] worker failure on rank {ranks} after step {event.get('last_step')} ({errors}); Ray Train "
            "restores the latest checkpoint if train.max_failures allows"
        )
    if kind == "restored":
        recovery = f" {event['recovery_s']:.1f} s after the failure" if "recovery_s" in event else ""
        again = event.get("steps_recomputed", 0)
        replay = f"; steps {event['from_step'] + 1}-{event['from_step'] + again} are trained again" if again else ""
        return f"[hdpo-ray] restored from the checkpoint at step {event['from_step']}{recovery}{replay}"
    if kind == "notice":
        return f"[hdpo-ray] {event.get('text', '')}"
    if kind.endswith("_error"):
        return (
            f"[hdpo-ray] warning: {kind.removesuffix('_error')} logging failed at step {event.get('step')} "
            f"({event.get('error')}); training goes on, metrics.jsonl has every row"
        )
    return f"[hdpo-ray] {json.dumps(event)}"


class JsonLinesFollower:
    """A JSON-lines file being appended to, read from where the last read stopped (its cost does not grow with
    the run). A rewritten file (metrics.jsonl without the rows of steps trained again: a new inode, or shorter)
    is read again from its start; a half-written last line waits for the next read, a torn one is skipped."""

    def __init__(self, path: Path):
        self.path, self.offset, self.inode = path, 0, None

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                stat = os.fstat(f.fileno())
                if stat.st_ino != self.inode or stat.st_size < self.offset:
                    self.inode, self.offset = stat.st_ino, 0
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        rows = []
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows
