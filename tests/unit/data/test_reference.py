"""The reference pool's actor class, called directly (as Ray Data calls it) on real pairs and the tiny Llama."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from hdpo_ray.config import EMBEDDED_MODEL, load_config
from hdpo_ray.data.collate import collate_pairs
from hdpo_ray.data.reference import PAIR_COLUMNS, ReferenceScorer, reference_dtype, reference_threads
from hdpo_ray.logprobs import completion_logprobs
from tests.helpers import real_pairs


@pytest.mark.parametrize("packing", [True, False])
def test_scorer_adds_the_reference_log_probs_of_each_pair(packing):
    pairs, pad_id = real_pairs(EMBEDDED_MODEL, 6, max_length=128)
    columns = {k: [getattr(p, k) for p in pairs] for k in PAIR_COLUMNS}
    batch = pa.table(columns | {"source_file": ["f.jsonl"] * 6})
    scorer = ReferenceScorer(EMBEDDED_MODEL, pad_id, chunk_tokens=64, dtype="float32", torch_threads=1, packing=packing)
    out = scorer(batch)
    # Only what training reads, pairs in order.
    assert out.column_names == [*PAIR_COLUMNS, "ref_chosen_logps", "ref_rejected_logps"]
    assert out.select(PAIR_COLUMNS).to_pylist() == batch.select(PAIR_COLUMNS).to_pylist()
    with torch.no_grad():
        expected = completion_logprobs(scorer.model, **collate_pairs(*columns.values(), pad_id)).logps
    got = torch.tensor(out["ref_chosen_logps"].to_pylist() + out["ref_rejected_logps"].to_pylist())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_reference_dtype_is_bf16_on_gpu_actors_only():
    assert reference_dtype(load_config()) == "float32"
    assert reference_dtype(load_config(overrides=["reference.num_gpus_per_actor=1"])) == "bfloat16"


def test_reference_threads_follow_the_actors_cpus_and_take_two_when_the_pass_runs_alone():
    def threads(*overrides: str) -> int:
        return reference_threads(load_config(overrides=list(overrides)))

    assert threads() == 2  # the demo: 1 CPU per actor, cached (the pass runs before training)
    assert threads("reference.cache_dir=null") == 1  # streaming beside the workers: what it reserves
    assert threads("reference.num_cpus_per_actor=16") == 16
    assert threads("reference.torch_threads=3", "reference.cache_dir=null") == 3
