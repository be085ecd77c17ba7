"""Reading files record by record: one bad line never hides the rest, row numbers are exact."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from hdpo_ray.data.read import SourceError, expand_sources, file_records, read_file_blocks
from hdpo_ray.models import ASSETS
from tests.helpers import data_file


def test_jsonl_bad_line_keeps_the_rest_readable(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{not json\n\n[1, 2]\n{"prompt": "d", "chosen": "e", '
        '"rejected": "f"}\n'
    )
    records = list(file_records(str(path)))
    assert [r[0] for r in records] == [1, 2, 4, 5]  # line numbers; the blank line 3 is no row
    assert records[1][1] is None and "not JSON" in records[1][2]
    assert json.loads(records[2][1]) == [1, 2]  # valid JSON, not an object: validation's call
    assert json.loads(records[3][1])["prompt"] == "d"


def test_parquet_rows_are_numbered_from_one_and_complete():
    path = ASSETS / "ultrafeedback/train_prefs-900.parquet"
    records = list(file_records(str(path)))
    assert len(records) == 900 and records[0][0] == 1 and records[-1][0] == 900
    first = json.loads(records[0][1])
    assert first["chosen"][0]["role"] == "user" and first["prompt"] == pq.read_table(path).column("prompt")[0].as_py()


def test_unreadable_file_becomes_one_error_row(tmp_path):
    from hdpo_ray.data.read import _records_or_error

    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not a parquet file")
    rows = list(_records_or_error(str(path)))
    assert len(rows) == 1 and rows[0][0] == 0 and rows[0][1] is None and rows[0][2].startswith("file could not be read")


def test_json_array_layout():
    records = list(file_records(str(data_file("llamafactory_dpo/dpo_en_demo-20.json"))))
    assert len(records) == 20 and "conversations" in json.loads(records[0][1])


def test_blocks_carry_file_and_row(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(json.dumps({"i": i}) for i in range(1200)) + "\n")
    blocks = list(read_file_blocks({"file": [str(path)]}))
    assert [b.num_rows for b in blocks] == [512, 512, 176]
    assert blocks[-1]["source_row"][-1].as_py() == 1200 and blocks[0]["source_file"][0].as_py() == str(path)


def test_expand_sources(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("b.jsonl", "a.parquet", "notes.txt"):
        (tmp_path / "d" / name).write_text("")
    assert expand_sources([str(tmp_path / "d")]) == [str(tmp_path / "d" / "a.parquet"), str(tmp_path / "d" / "b.jsonl")]
    assert expand_sources([str(tmp_path / "d" / "*.jsonl")]) == [str(tmp_path / "d" / "b.jsonl")]
    assert expand_sources([f"file://{tmp_path}/d/b.jsonl"]) == [f"file://{tmp_path}/d/b.jsonl"]
    assert expand_sources(["embedded:ultrafeedback/train_prefs-900.parquet"])[0].endswith("train_prefs-900.parquet")
    with pytest.raises(SourceError, match="matched no"):
        expand_sources([str(tmp_path / "missing.jsonl")])


def test_uri_through_pyarrow_filesystem(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    assert [r[0] for r in file_records(f"file://{path}")] == [1]
