"""Which cluster the driver joins, checked before ray.init so that a dead one is named, not waited on."""

from __future__ import annotations

import socket

import pytest

from hdpo_ray.runtime import ClusterUnreachable, answers, connection_address
from tests.helpers import free_port


def _dead_address() -> str:
    return f"127.0.0.1:{free_port()}"  # a port that was just free: nothing listens there


@pytest.fixture
def record(tmp_path, monkeypatch):
    """Ray's record of the latest `ray start` on this machine, redirected to a file of this test."""
    import ray._common.utils

    path = tmp_path / "ray_current_cluster"
    monkeypatch.setattr(ray._common.utils, "get_ray_address_file", lambda temp_dir: str(path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return path


def test_a_recorded_head_that_died_gives_a_local_ray_said_in_one_line(record, caplog):
    dead = _dead_address()
    record.write_text(dead)
    with caplog.at_level("WARNING", logger="hdpo_ray"):
        assert connection_address() == "local"
    assert f"({dead}) does not answer: starting a local Ray instead" in caplog.text


def test_a_live_recorded_head_or_none_is_left_to_ray(record):
    assert connection_address() is None  # no record: Ray starts a local instance itself
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        record.write_text(f"127.0.0.1:{server.getsockname()[1]}")
        assert connection_address() is None  # Ray joins it, as `ray.init()` does


def test_a_dead_ray_address_is_refused_with_one_line(record, monkeypatch):
    dead = _dead_address()
    monkeypatch.setenv("RAY_ADDRESS", dead)
    with pytest.raises(ClusterUnreachable, match=rf"^RAY_ADDRESS={dead}: no Ray cluster answers there"):
        connection_address()
    assert answers("ray://head:10001") and answers("auto")  # forms Ray resolves itself are not probed
