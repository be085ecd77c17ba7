"""Unit tests for hdpo_ray.data.validate (row normalization and reason codes)."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections import Counter

import pyarrow.parquet as pq
import pytest

from hdpo_ray.data.validate import REASONS, ROLES, InvalidRow, Message, Pair, normalize_pair
from hdpo_ray.models import ASSETS
from tests.helpers import data_file, flat_pair_lines

# The same 1000 real UltraFeedback pairs in two layouts: flat strings (all 1000) and the conversational
# train_prefs layout (the package's embedded copy holds the first 900).
# Indices (0-based) of known-bad rows in the 1000-row sample.
IDENTICAL_ROWS = {306, 655, 910, 997}
EMPTY_ROWS = {478, 833}  # one completion is '' in the source data


@pytest.fixture(scope="module")
def flat_rows() -> list[dict]:
    return [json.loads(line) for line in flat_pair_lines(1000)]


@pytest.fixture(scope="module")
def prefs_rows() -> list[dict]:
    return pq.read_table(ASSETS / "ultrafeedback" / "train_prefs-900.parquet").to_pylist()


@pytest.fixture(scope="module")
def sharegpt_rows() -> list[dict]:
    return json.loads(data_file("llamafactory_dpo/dpo_en_demo-20.json").read_text(encoding="utf-8"))


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _asst(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _conv(**override) -> dict:
    row = {"prompt": "Hi?", "chosen": [_user("Hi?"), _asst("Hello!")], "rejected": [_user("Hi?"), _asst("Go away.")]}
    row.update(override)
    return row


def _flat(**override) -> dict:
    row = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}
    row.update(override)
    return row


def _sg(**override) -> dict:
    row = {
        "conversations": [{"from": "human", "value": "Hi?"}],
        "chosen": {"from": "gpt", "value": "Hello!"},
        "rejected": {"from": "gpt", "value": "Go away."},
    }
    row.update(override)
    return row


def _without(row: dict, key: str) -> dict:
    return {k: v for k, v in row.items() if k != key}


# ---------------------------------------------------------------- API surface


def test_reasons_and_roles() -> None:
    assert ROLES == frozenset({"system", "user", "assistant"})
    assert set(REASONS) == {
        "not_json",
        "not_object",
        "missing_field",
        "null_field",
        "bad_type",
        "empty_content",
        "unknown_role",
        "no_assistant_turn",
        "not_ending_on_assistant",
        "prompt_mismatch",
        "identical_completions",
        "unreadable_file",
        "template_error",
    }
    assert len(REASONS) == len(set(REASONS))


def test_invalid_row_str_and_attrs() -> None:
    err = InvalidRow("missing_field", "field 'chosen' is missing")
    assert isinstance(err, ValueError)
    assert (err.reason, err.detail) == ("missing_field", "field 'chosen' is missing")
    assert str(err) == "missing_field: field 'chosen' is missing"


def test_pair_is_frozen_and_prompt_messages() -> None:
    pair = normalize_pair(_conv())
    assert pair == Pair((Message("user", "Hi?"),), "Hello!", "Go away.")
    assert pair.prompt_messages() == [{"role": "user", "content": "Hi?"}]
    with pytest.raises(dataclasses.FrozenInstanceError):
        pair.chosen = "x"  # type: ignore[misc]


# ---------------------------------------------------------------- real rows


def test_real_flat_first_row(flat_rows: list[dict]) -> None:
    row = flat_rows[0]
    pair = normalize_pair(row)
    assert pair.prompt_messages() == [{"role": "user", "content": row["prompt"]}]
    assert (pair.chosen, pair.rejected) == (row["chosen"], row["rejected"])


def test_real_prefs_first_row(prefs_rows: list[dict]) -> None:
    row = prefs_rows[0]
    pair = normalize_pair(row)
    assert pair.prompt_messages() == [{"role": m["role"], "content": m["content"]} for m in row["chosen"][:-1]]
    assert pair.prompt[-1].role == "user"
    assert pair.chosen == row["chosen"][-1]["content"]
    assert pair.rejected == row["rejected"][-1]["content"]


def test_real_prefs_and_flat_agree(prefs_rows: list[dict], flat_rows: list[dict]) -> None:
    assert normalize_pair(prefs_rows[0]) == normalize_pair(flat_rows[0])


def test_real_sharegpt_first_row(sharegpt_rows: list[dict]) -> None:
    row = sharegpt_rows[0]
    pair = normalize_pair(row)
    assert pair.prompt_messages() == [{"role": "user", "content": row["conversations"][0]["value"]}]
    assert (pair.chosen, pair.rejected) == (row["chosen"]["value"], row["rejected"]["value"])


def _tally(rows: list[dict]) -> tuple[Counter, dict[str, set[int]]]:
    counts: Counter = Counter()
    where: dict[str, set[int]] = {}
    for i, row in enumerate(rows):
        try:
            normalize_pair(row)
            counts["ok"] += 1
        except InvalidRow as err:
            counts[err.reason] += 1
            where.setdefault(err.reason, set()).add(i)
    return counts, where


@pytest.mark.parametrize("fixture, rows_in_file", [("prefs_rows", 900), ("flat_rows", 1000)])
def test_real_sample_exactly_four_identical(fixture: str, rows_in_file: int, request: pytest.FixtureRequest) -> None:
    rows = request.getfixturevalue(fixture)
    assert len(rows) == rows_in_file
    counts, where = _tally(rows)
    identical, empty = {i for i in IDENTICAL_ROWS if i < rows_in_file}, {i for i in EMPTY_ROWS if i < rows_in_file}
    assert where["identical_completions"] == identical
    # The sample also holds two rows with an empty completion; everything else is valid.
    assert where["empty_content"] == empty
    assert counts == Counter(
        ok=rows_in_file - len(identical) - len(empty), identical_completions=len(identical), empty_content=len(empty)
    )


def test_real_sharegpt_all_valid(sharegpt_rows: list[dict]) -> None:
    assert _tally(sharegpt_rows)[0] == Counter(ok=len(sharegpt_rows))


# ---------------------------------------------------------------- accepted shapes


def test_conversational_prompt_from_str_field() -> None:
    row = _conv(prompt="Q", chosen=[_asst("A")], rejected=[_asst("B")])
    assert normalize_pair(row) == Pair((Message("user", "Q"),), "A", "B")


def test_conversational_prompt_from_message_list() -> None:
    prompt = [{"role": "system", "content": "Be nice."}, _user("Q")]
    pair = normalize_pair(_conv(prompt=prompt, chosen=[_asst("A")], rejected=[_asst("B")]))
    assert pair.prompt_messages() == prompt


def test_conversational_prompt_field_ignored_when_context_present() -> None:
    assert normalize_pair(_conv(prompt="something else")).prompt == (Message("user", "Hi?"),)
    assert normalize_pair(_without(_conv(), "prompt")).prompt == (Message("user", "Hi?"),)
    assert normalize_pair(_conv(prompt=None)).prompt == (Message("user", "Hi?"),)


def test_multi_turn_with_system() -> None:
    ctx = [{"role": "system", "content": "S"}, _user("u1"), _asst("a1"), _user("u2")]
    pair = normalize_pair(_conv(chosen=ctx + [_asst("A")], rejected=ctx + [_asst("B")]))
    assert pair.prompt_messages() == ctx
    assert (pair.chosen, pair.rejected) == ("A", "B")


def test_parquet_style_messages_key_order_and_extra_keys() -> None:
    chosen = [{"content": "Q", "role": "user", "name": "x"}, {"content": "A", "role": "assistant", "weight": 1}]
    rejected = [{"role": "user", "content": "Q"}, {"content": "B", "role": "assistant"}]
    row = _conv(chosen=chosen, rejected=rejected, prompt_id="p", messages=chosen, score_chosen=9.0)
    assert normalize_pair(row) == Pair((Message("user", "Q"),), "A", "B")


def test_completion_text_not_stripped() -> None:
    pair = normalize_pair(_flat(chosen="  A\n", rejected="B "))
    assert (pair.chosen, pair.rejected) == ("  A\n", "B ")
    # Identity is exact string equality: texts differing only in whitespace are a valid pair.
    assert normalize_pair(_flat(chosen="A", rejected="A ")).rejected == "A "


def test_sharegpt_roles_mapped() -> None:
    conv = [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "u1"},
        {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "u2"},
    ]
    pair = normalize_pair(_sg(conversations=conv))
    assert [m.role for m in pair.prompt] == ["system", "user", "assistant", "user"]


def test_input_not_mutated() -> None:
    row = _conv()
    before = copy.deepcopy(row)
    normalize_pair(row)
    assert row == before


# ---------------------------------------------------------------- rejected rows

BAD = [
    # (id, row, reason, text the detail must contain)
    ("not_object_list", [1, 2], "not_object", "row"),
    ("not_object_str", "x", "not_object", "row"),
    ("missing_chosen", _without(_flat(), "chosen"), "missing_field", "'chosen'"),
    ("missing_rejected_flat", _without(_flat(), "rejected"), "missing_field", "'rejected'"),
    ("missing_rejected_conv", _without(_conv(), "rejected"), "missing_field", "'rejected'"),
    ("missing_prompt_flat", _without(_flat(), "prompt"), "missing_field", "'prompt'"),
    (
        "missing_prompt_conv",
        _without(_conv(chosen=[_asst("A")], rejected=[_asst("B")]), "prompt"),
        "missing_field",
        "'prompt'",
    ),
    ("missing_role", _conv(chosen=[{"content": "Q"}, _asst("A")]), "missing_field", "chosen[0].role"),
    ("missing_content", _conv(rejected=[_user("Hi?"), {"role": "assistant"}]), "missing_field", "rejected[1].content"),
    ("missing_sg_value", _sg(chosen={"from": "gpt"}), "missing_field", "chosen.value"),
    ("null_chosen", _flat(chosen=None), "null_field", "'chosen'"),
    ("null_rejected", _conv(rejected=None), "null_field", "'rejected'"),
    ("null_prompt_conv", _conv(prompt=None, chosen=[_asst("A")], rejected=[_asst("B")]), "null_field", "'prompt'"),
    (
        "null_content",
        _conv(chosen=[_user("Hi?"), {"role": "assistant", "content": None}]),
        "null_field",
        "chosen[1].content",
    ),
    ("null_conversations", _sg(conversations=None), "null_field", "conversations"),
    ("bad_chosen_type", _flat(chosen=3), "bad_type", "'chosen'"),
    ("bad_rejected_type_flat", _flat(rejected=["x"]), "bad_type", "'rejected'"),
    ("bad_rejected_not_list", _conv(rejected="Go away."), "bad_type", "'rejected'"),
    ("bad_message_type", _conv(chosen=["Hi?", _asst("A")]), "bad_type", "chosen[0]"),
    (
        "bad_content_type",
        _conv(chosen=[_user("Hi?"), {"role": "assistant", "content": 5}]),
        "bad_type",
        "chosen[1].content",
    ),
    ("bad_role_type", _conv(chosen=[{"role": 1, "content": "Q"}, _asst("A")]), "bad_type", "chosen[0].role"),
    ("bad_prompt_type", _flat(prompt=7), "bad_type", "'prompt'"),
    (
        "prompt_not_ending_on_user",
        _conv(prompt=[_user("Q"), _asst("x")], chosen=[_asst("A")], rejected=[_asst("B")]),
        "bad_type",
        "prompt",
    ),
    (
        "context_not_ending_on_user",
        _conv(chosen=[_user("Q"), _asst("x"), _asst("A")], rejected=[_user("Q"), _asst("x"), _asst("B")]),
        "bad_type",
        "prompt",
    ),
    ("prompt_empty_list", _conv(prompt=[], chosen=[_asst("A")], rejected=[_asst("B")]), "bad_type", "prompt"),
    ("sg_conversations_not_list", _sg(conversations="Hi?"), "bad_type", "conversations"),
    (
        "sg_ends_on_gpt",
        _sg(conversations=[{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]),
        "bad_type",
        "conversations",
    ),
    ("sg_empty", _sg(conversations=[]), "bad_type", "conversations"),
    ("sg_chosen_not_dict", _sg(chosen="Hello!"), "bad_type", "chosen"),
    ("empty_prompt", _flat(prompt="  \n"), "empty_content", "'prompt'"),
    ("empty_chosen", _flat(chosen=""), "empty_content", "'chosen'"),
    ("empty_rejected_msg", _conv(rejected=[_user("Hi?"), _asst(" \t")]), "empty_content", "rejected[1].content"),
    ("empty_sg_value", _sg(conversations=[{"from": "human", "value": ""}]), "empty_content", "conversations[0].value"),
    (
        "unknown_role",
        _conv(chosen=[_user("Hi?"), {"role": "robot", "content": "A"}]),
        "unknown_role",
        "chosen[1].role is 'robot'; expected one of assistant, system, user",
    ),
    ("unknown_sg_from", _sg(conversations=[{"from": "bot", "value": "Q"}]), "unknown_role", "conversations[0].from"),
    ("sg_chosen_from_human", _sg(chosen={"from": "human", "value": "A"}), "unknown_role", "chosen"),
    ("sg_rejected_from_system", _sg(rejected={"from": "system", "value": "B"}), "unknown_role", "rejected"),
    ("no_assistant", _conv(chosen=[_user("Hi?")]), "no_assistant_turn", "'chosen'"),
    ("no_assistant_empty_list", _conv(rejected=[]), "no_assistant_turn", "'rejected'"),
    (
        "not_ending_on_assistant",
        _conv(rejected=[_user("Hi?"), _asst("x"), _user("more?")]),
        "not_ending_on_assistant",
        "'rejected'",
    ),
    ("prompt_mismatch", _conv(rejected=[_user("Bye?"), _asst("B")]), "prompt_mismatch", "'chosen' and 'rejected'"),
    ("prompt_mismatch_len", _conv(rejected=[_asst("B")]), "prompt_mismatch", "'chosen' and 'rejected'"),
    ("identical_flat", _flat(rejected="Hello!"), "identical_completions", "'chosen' and 'rejected'"),
    ("identical_conv", _conv(rejected=[_user("Hi?"), _asst("Hello!")]), "identical_completions", "'chosen'"),
    ("identical_sg", _sg(rejected={"from": "gpt", "value": "Hello!"}), "identical_completions", "'rejected'"),
]


@pytest.mark.parametrize(("row", "reason", "names"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_rows(row: object, reason: str, names: str) -> None:
    with pytest.raises(InvalidRow) as ei:
        normalize_pair(row)
    err = ei.value
    assert err.reason == reason, str(err)
    assert names in err.detail, err.detail
    assert str(err) == f"{reason}: {err.detail}"


def test_every_reason_is_covered() -> None:
    covered = {c[2] for c in BAD}
    # those three are set by the reader and the tokenizer stage
    assert covered == set(REASONS) - {
        "not_json",
        "unreadable_file",
        "template_error",
    }
