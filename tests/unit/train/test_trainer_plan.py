"""Driver-side planning: resource fit (the Ray Data deadlock), the optimizer step count,
and how the pairs are dealt to the ranks."""

from __future__ import annotations

import pytest

from hdpo_ray.capacity import ResourceError
from hdpo_ray.config import load_config
from hdpo_ray.train.trainer import check_resources, total_optimizer_steps

TWO_CORES = {"CPU": 2.0}


def _config(*overrides):
    return load_config(None, list(overrides))


def test_default_fits_two_cores():
    check_resources(_config("train.num_workers=2", "train.cpus_per_worker=0.5"), TWO_CORES)


def test_workers_holding_every_cpu_are_refused_before_they_deadlock_ray_data():
    with pytest.raises(
        ResourceError,
        match=(
            r"training workers \(2 x 1 CPU\) \+ Ray Data \(1 x 1 CPU\) need 3 CPU, but the cluster has 2; lower "
            r"train.cpus_per_worker"
        ),
    ):
        check_resources(_config("train.num_workers=2", "train.cpus_per_worker=1"), TWO_CORES)


def test_reference_pool_must_leave_a_cpu_for_ray_data():
    with pytest.raises(
        ResourceError,
        match=(
            r"reference pool \(2 x 0.75 CPU\) \+ Ray Data \(1 x 1 CPU\) need 2.5 CPU, but the cluster has 2; lower "
            r"reference.num_actors"
        ),
    ):
        check_resources(_config("reference.num_actors=2", "reference.num_cpus_per_actor=0.75"), TWO_CORES)


def test_gpus_are_required_for_gpu_training_and_gpu_reference():
    with pytest.raises(
        ResourceError, match=r"training workers \(2 x 0.5 CPU, 1 GPU\) need 2 GPU, but the cluster has 0"
    ):
        check_resources(_config("train.use_gpu=true"), {"CPU": 16.0})
    with pytest.raises(ResourceError, match="reference pool"):
        check_resources(_config("reference.num_gpus_per_actor=1"), {"CPU": 16.0})
    check_resources(
        _config("train.use_gpu=true", "reference.num_gpus_per_actor=1", "reference.num_actors=2"),
        {"CPU": 16.0, "GPU": 2.0},
    )


def test_streaming_reference_must_fit_beside_the_workers():
    with pytest.raises(ResourceError, match="streams beside the training workers"):
        check_resources(_config("reference.cache_dir=null"), TWO_CORES)
    check_resources(
        _config("reference.cache_dir=null", "reference.num_cpus_per_actor=0.5", "train.cpus_per_worker=0.25"), TWO_CORES
    )


def test_steps_from_epochs_account_for_the_equal_split():
    # 896 pairs over 2 workers = 448 each; 4 per micro-batch = 112 micro-batches; accumulation 2 -> 56 steps per epoch
    assert (
        total_optimizer_steps(_config("train.per_device_batch_size=4", "train.gradient_accumulation_steps=2"), 896)
        == 56
    )
    assert total_optimizer_steps(_config("train.epochs=2.5"), 897) == 280  # 897 // 2 = 448 pairs per rank, 112 batches
    assert total_optimizer_steps(_config("train.max_steps=7"), 896) == 7
    with pytest.raises(ResourceError, match="make no optimizer step"):
        total_optimizer_steps(_config("train.gradient_accumulation_steps=8"), 10)


def _ranks_rows(dataset, world_size: int) -> list[list[int]]:
    """The rows each rank of Ray Train's equal split receives, consumed side by side as the workers do."""
    import threading

    splits, rows = dataset.streaming_split(world_size, equal=True), [[] for _ in range(world_size)]
    threads = [
        threading.Thread(target=lambda r=r: rows[r].extend(row["i"] for row in splits[r].iter_rows()))
        for r in range(world_size)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return rows


@pytest.mark.parametrize("layout", [[24], [5, 11, 8], [1] * 24])
def test_rank_blocks_deal_each_step_the_next_pairs_whatever_the_file_layout(ray_session, layout):
    """24 pairs, 2 ranks, 2 pairs per rank per step (per_device_batch_size 2): step s trains on pairs 4s..4s+3,
    rank 0 the first two, however the reference pass happened to cut its output into blocks."""
    import pyarrow as pa
    import ray.data

    from hdpo_ray.train.trainer import rank_blocks

    starts = [sum(layout[:k]) for k in range(len(layout))]
    dataset = ray.data.from_arrow(
        [pa.table({"i": list(range(start, start + n))}) for start, n in zip(starts, layout, strict=True)]
    )
    rows = _ranks_rows(rank_blocks(dataset, _config("train.per_device_batch_size=2").train), 2)
    assert rows == [[0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21], [2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23]]
