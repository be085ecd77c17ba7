"""hdpo_ray.storage: whole-or-absent writes and one filesystem call for paths and URIs."""

from __future__ import annotations

import hashlib

import pyarrow.fs as pafs

from hdpo_ray.storage import atomic_write, atomic_write_lines, filesystem, update_with_file


def test_atomic_writes_replace_the_file_and_leave_nothing_beside_it(tmp_path):
    target = tmp_path / "run.json"
    target.write_text("old")
    atomic_write(target, '{"status": "finished"}')
    atomic_write_lines(tmp_path / "rows.jsonl", (str(i) for i in range(3)))
    assert target.read_text() == '{"status": "finished"}' and (tmp_path / "rows.jsonl").read_text() == "0\n1\n2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl", "run.json"]


def test_local_paths_and_file_uris_name_the_same_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("x")
    local_fs, local = filesystem("a.txt")  # relative: made absolute
    uri_fs, from_uri = filesystem(f"file://{tmp_path}/a.txt")
    assert isinstance(local_fs, pafs.LocalFileSystem) and local == from_uri == str(tmp_path / "a.txt")
    assert uri_fs.get_file_info(from_uri).size == 1


def test_file_hashing_reads_every_byte(tmp_path):
    path = tmp_path / "big.bin"
    data = bytes(range(256)) * 40_000  # several 4 MiB blocks
    path.write_bytes(data)
    digest = hashlib.blake2b()
    update_with_file(digest, path)
    assert digest.hexdigest() == hashlib.blake2b(data).hexdigest()
