"""Ray Data preparation on the session's Ray cluster: bad rows in both modes, reference pool, cache."""

from __future__ import annotations

import json

import pytest
import torch

from hdpo_ray.config import load_config
from hdpo_ray.data.prepare import DataError, PreparedSplit, encode_split, score_split
from tests.helpers import flat_pair_lines

GOOD = 10
BAD_LINES = {  # line content -> reason counted in the report
    "{not json": "not_json",
    "[1, 2]": "not_object",
    json.dumps({"prompt": "p", "chosen": "c"}): "missing_field",
    json.dumps({"prompt": "p", "chosen": None, "rejected": "r"}): "null_field",
    json.dumps({"prompt": "p", "chosen": "   ", "rejected": "r"}): "empty_content",
    json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}): "identical_completions",
    json.dumps(
        {
            "chosen": [{"role": "user", "content": "p"}, {"role": "robot", "content": "c"}],
            "rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}],
        }
    ): "unknown_role",
    json.dumps(
        {
            "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}],
        }
    ): "prompt_mismatch",
    json.dumps(
        {
            "prompt": "p",
            "chosen": [
                {"role": "user", "content": "p"},
                {"role": "assistant", "content": "c"},
                {"role": "user", "content": "c"},
            ],
            "rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}],
        }
    ): "not_ending_on_assistant",
    json.dumps({"prompt": "p", "chosen": [], "rejected": [{"role": "assistant", "content": "r"}]}): "no_assistant_turn",
    json.dumps({"prompt": 3, "chosen": "c", "rejected": "r"}): "bad_type",
}


def prepare_split(config, specs: list[str], split: str, *, stream: bool = True) -> PreparedSplit:
    """encode_split then score_split: one split from files to pairs with reference log-probs."""
    return score_split(config, encode_split(config, specs, split), stream=stream)


@pytest.fixture
def mixed_file(tmp_path):
    good = flat_pair_lines(GOOD)
    lines = good[:3] + list(BAD_LINES) + good[3:]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(tmp_path, files, *extra):
    return load_config(
        None,
        [
            f"output_dir={tmp_path}/out",
            f"reference.cache_dir={tmp_path}/cache",
            f"data.train_files={json.dumps([str(f) for f in files])}",
            "model.name_or_path=hdpo-ray/tiny-llama",  # the random tiny Llama: build_tiny_llama() below
            "data.max_length=64",
            "data.max_prompt_length=32",
            "reference.batch_size=4",
            *extra,
        ],
    )


def test_error_mode_names_file_line_and_problem(ray_session, tmp_path, mixed_file):
    config = _config(tmp_path, [mixed_file])
    with pytest.raises(DataError) as err:
        prepare_split(config, config.data.train_files, "train")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{mixed_file}, line 4: not_json: line is not JSON")
    assert f"{len(BAD_LINES)} invalid rows" in message and "data.on_invalid=skip" in message


def test_skip_mode_counts_every_reason_and_keeps_the_rest(ray_session, tmp_path, mixed_file):
    split = prepare_split(_config(tmp_path, [mixed_file], "data.on_invalid=skip"), [str(mixed_file)], "train")
    report = split.report
    assert report["read"] == GOOD + len(BAD_LINES) and report["valid"] == GOOD == split.num_pairs
    assert report["skipped"] == len(BAD_LINES)
    expected: dict[str, int] = {}
    for reason in BAD_LINES.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert report["skipped_by_reason"] == expected
    assert report["files"][str(mixed_file)]["skipped"] == len(BAD_LINES)
    assert [e["row"] for e in report["invalid_examples"]] == list(range(4, 4 + len(BAD_LINES)))
    assert report["truncated"] > 0  # real UltraFeedback pairs exceed 64 tokens
    rows = split.dataset.take_all()
    assert len(rows) == GOOD and all(r["ref_chosen_logps"] < 0 and r["ref_rejected_logps"] < 0 for r in rows)


def test_reference_logprobs_match_the_model_and_cache_hits(ray_session, tmp_path, small_pairs):
    from hdpo_ray.data.collate import collate_pairs
    from hdpo_ray.models import build_tiny_llama
    from tests.helpers import naive_completion_logprobs

    config = _config(tmp_path, [small_pairs], "data.on_invalid=skip")
    first = prepare_split(config, config.data.train_files, "train")
    assert first.reference_forward_pairs == first.num_pairs > 0
    rows = first.dataset.take_all()
    row = rows[0]
    batch = collate_pairs([row["prompt_ids"]], [row["chosen_ids"]], [row["rejected_ids"]], 50256)
    with torch.no_grad():
        expected = naive_completion_logprobs(build_tiny_llama(), **batch)
    assert torch.allclose(torch.tensor([row["ref_chosen_logps"], row["ref_rejected_logps"]]), expected, atol=1e-3)

    again = prepare_split(config, config.data.train_files, "train")
    assert again.reference_forward_pairs == 0 and again.cache_entry == first.cache_entry
    assert sorted(r["ref_chosen_logps"] for r in again.dataset.take_all()) == sorted(
        r["ref_chosen_logps"] for r in rows
    )


def test_any_changed_input_misses_the_cache(ray_session, tmp_path, small_pairs):
    from hdpo_ray.models import build_tiny_llama, load_tokenizer

    base = _config(tmp_path, [small_pairs], "data.on_invalid=skip")
    entry = prepare_split(base, base.data.train_files, "train").cache_entry

    longer = _config(tmp_path, [small_pairs], "data.on_invalid=skip", "data.max_length=80")
    assert prepare_split(longer, longer.data.train_files, "train").cache_entry != entry

    ref_dir = tmp_path / "other-ref"  # same architecture and tokenizer, one weight changed
    model = build_tiny_llama()
    with torch.no_grad():
        model.model.norm.weight[0] += 0.5
    model.save_pretrained(ref_dir)
    load_tokenizer("hdpo-ray/tiny-llama").save_pretrained(ref_dir)
    other_ref = _config(tmp_path, [small_pairs], "data.on_invalid=skip", f"model.ref_name_or_path={ref_dir}")
    changed = prepare_split(other_ref, other_ref.data.train_files, "train")
    assert changed.cache_entry != entry and changed.reference_forward_pairs == changed.num_pairs

    small_pairs.write_text("\n".join(small_pairs.read_text().splitlines()[:-1]) + "\n")  # one pair fewer
    edited = prepare_split(base, base.data.train_files, "train")
    assert edited.cache_entry != entry and edited.num_pairs == changed.num_pairs - 1


def test_streaming_mode_feeds_reference_logprobs_without_a_cache(ray_session, tmp_path, small_pairs):
    cached = _config(tmp_path, [small_pairs], "data.on_invalid=skip")
    streamed = _config(tmp_path, [small_pairs], "data.on_invalid=skip", "reference.cache_dir=null")
    a = sorted(
        r["ref_rejected_logps"] for r in prepare_split(cached, cached.data.train_files, "train").dataset.take_all()
    )
    split = prepare_split(streamed, streamed.data.train_files, "train")
    assert split.cache_entry is None
    b = sorted(r["ref_rejected_logps"] for r in split.dataset.take_all())
    assert a == pytest.approx(b, abs=1e-4)
