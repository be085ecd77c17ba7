"""hdpo_ray.data.cache on a local folder: an entry is read only with its whole manifest; anything less is rebuilt."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from hdpo_ray.data.cache import MANIFEST, build_or_read, cache_key, count_rows, read_manifest, read_table


def _builder(entry, calls: list, rows: int = 3):
    def build() -> dict:
        calls.append(1)
        pq.write_table(pa.table({"x": list(range(rows))}), f"{entry}/part-0.parquet")
        return {"key": "k", "rows": rows}

    return build


def test_an_entry_is_built_once_then_read(tmp_path):
    entry, calls = str(tmp_path / "encoded-k"), []
    assert build_or_read(entry, _builder(entry, calls)) == ({"key": "k", "rows": 3}, True)
    assert build_or_read(entry, _builder(entry, calls)) == ({"key": "k", "rows": 3}, False)
    assert calls == [1]
    assert not (tmp_path / "encoded-k" / f"{MANIFEST}.partial").exists()
    # the manifest beside the parquet files is not read as one of them
    assert count_rows(entry) == 3 and read_table(entry, ["x"])["x"].to_pylist() == [0, 1, 2]


def test_a_half_written_manifest_or_stale_parts_are_rebuilt_from_scratch(tmp_path):
    entry, calls = tmp_path / "reference-k", []
    entry.mkdir()
    pq.write_table(pa.table({"x": [9, 9, 9, 9]}), entry / "stale.parquet")  # left by an interrupted build
    (entry / MANIFEST).write_text('{"key": "k", "ro')  # cut off mid-write
    assert read_manifest(str(entry)) is None
    manifest, built = build_or_read(str(entry), _builder(str(entry), calls, rows=2))
    assert built and calls == [1] and json.loads((entry / MANIFEST).read_text()) == manifest
    assert sorted(p.name for p in entry.iterdir()) == [MANIFEST, "part-0.parquet"] and count_rows(str(entry)) == 2


def test_a_missing_entry_has_no_manifest_and_keys_are_stable(tmp_path):
    assert read_manifest(str(tmp_path / "nothing")) is None
    assert cache_key("a", 1, {"b": 2}) == cache_key("a", 1, {"b": 2}) != cache_key("a", 1, {"b": 3})
    assert len(cache_key("x")) == 20  # 10 bytes, hex
