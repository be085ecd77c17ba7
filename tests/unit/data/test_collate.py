"""Unit tests for hdpo_ray.data.collate: the padded layout (collate_pairs) and the packed one (pack_rows)."""

from __future__ import annotations

import pytest
import torch

from hdpo_ray.data.collate import collate_pairs, pack_rows, real_tokens

PAD = 99

PROMPTS = [[1, 2, 3], [4], [5, 6]]
CHOSEN = [[10, 11], [12, 13, 14, 15, 16], [17]]
REJECTED = [[20], [21, 22], [23, 24, 25, 26]]


@pytest.fixture
def batch():
    return collate_pairs(PROMPTS, CHOSEN, REJECTED, PAD)


def _rows():
    return [(p, c) for p, c in zip(PROMPTS, CHOSEN, strict=True)] + [
        (p, r) for p, r in zip(PROMPTS, REJECTED, strict=True)
    ]


def test_shapes_and_dtypes(batch):
    longest = max(len(p) + len(c) for p, c in _rows())
    assert longest == 6
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert batch[key].shape == (6, longest), key
    assert batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.long
    assert batch["completion_mask"].dtype == torch.bool


def test_chosen_rows_first_then_rejected(batch):
    for row, (prompt, completion) in enumerate(_rows()):
        seq = prompt + completion
        assert batch["input_ids"][row, : len(seq)].tolist() == seq, row
    # Row i and row B+i share the prompt.
    for i, prompt in enumerate(PROMPTS):
        assert (
            batch["input_ids"][i, : len(prompt)].tolist() == batch["input_ids"][3 + i, : len(prompt)].tolist() == prompt
        )


def test_attention_mask(batch):
    for row, (prompt, completion) in enumerate(_rows()):
        n = len(prompt) + len(completion)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (6 - n), row


def test_completion_mask(batch):
    for row, (prompt, completion) in enumerate(_rows()):
        expected = [False] * len(prompt) + [True] * len(completion) + [False] * (6 - len(prompt) - len(completion))
        assert batch["completion_mask"][row].tolist() == expected, row
    assert batch["completion_mask"].sum().item() == sum(len(c) for c in CHOSEN + REJECTED)
    assert not batch["completion_mask"][:, 0].any()


def test_padding_uses_pad_id(batch):
    padding = batch["attention_mask"] == 0
    assert padding.any()
    assert (batch["input_ids"][padding] == PAD).all()
    for row, (prompt, completion) in enumerate(_rows()):
        n = len(prompt) + len(completion)
        assert batch["input_ids"][row, n:].tolist() == [PAD] * (6 - n)


def test_width_is_batch_longest_not_global():
    out = collate_pairs([[1]], [[2]], [[3, 4]], 0)
    assert out["input_ids"].tolist() == [[1, 2, 0], [1, 3, 4]]
    assert out["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert out["completion_mask"].tolist() == [[False, True, False], [False, True, True]]


def test_accepts_tensors_and_tuples():
    out = collate_pairs([torch.tensor([1, 2])], [(3,)], [torch.tensor([4, 5])], 0)
    assert out["input_ids"].tolist() == [[1, 2, 3, 0], [1, 2, 4, 5]]


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        collate_pairs([[1], [2]], [[3]], [[4], [5]], 0)


@pytest.mark.parametrize(
    ("lengths", "capacity", "rows"),
    [
        ([2, 2, 2, 2], 4, [[0, 1], [2, 3]]),
        # longest first: 0 (3) opens row 0, 2 (2) opens row 1, 3 (2) fills row 1, 1 (1) fills row 0
        ([3, 1, 2, 2], 4, [[0, 1], [2, 3]]),
        # the batch below: 1 and 5 fill rows alone, 0 (5) and 3 (4) leave too little room for 2 and 4 (3 each)
        ([5, 6, 3, 4, 3, 6], 6, [[1], [5], [0], [3], [2, 4]]),
        ([7], 7, [[0]]),
    ],
)
def test_pack_rows_first_fit_decreasing(lengths, capacity, rows):
    assert pack_rows(lengths, capacity) == rows


def test_pack_rows_refuses_a_sequence_longer_than_a_row():
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([3, 5], 4)


def test_packed_layout_by_hand():
    # Sequences (chosen first): 0 = 1 2 3|10 11, 1 = 4|12 13 14 15 16, 2 = 5 6|17,
    # 3 = 1 2 3|20, 4 = 4|21 22, 5 = 5 6|23 24 25 26
    # ('|' ends the prompt). Rows of 6 (the longest): [1], [5], [0], [3], [2, 4], as pack_rows gives above.
    out = collate_pairs(PROMPTS, CHOSEN, REJECTED, PAD, packed=True)
    assert set(out) == {"input_ids", "position_ids", "completion_mask", "sequence_index"}
    assert out["input_ids"].tolist() == [
        [4, 12, 13, 14, 15, 16],
        [5, 6, 23, 24, 25, 26],
        [1, 2, 3, 10, 11, PAD],
        [1, 2, 3, 20, PAD, PAD],
        [5, 6, 17, 4, 21, 22],
    ]
    assert out["position_ids"].tolist() == [
        [0, 1, 2, 3, 4, 5],
        [0, 1, 2, 3, 4, 5],
        [0, 1, 2, 3, 4, 0],
        [0, 1, 2, 3, 0, 1],
        [0, 1, 2, 0, 1, 2],
    ]
    assert out["sequence_index"].tolist() == [[1] * 6, [5] * 6, [0] * 5 + [-1], [3] * 4 + [-1] * 2, [2, 2, 2, 4, 4, 4]]
    F, T = False, True
    assert out["completion_mask"].tolist() == [
        [F, T, T, T, T, T],
        [F, F, T, T, T, T],
        [F, F, F, T, T, F],
        [F, F, F, T, F, F],
        [F, F, T, F, T, T],
    ]
    assert out["completion_mask"].sum().item() == sum(len(c) for c in CHOSEN + REJECTED)


def test_real_tokens_counts_every_sequence_once():
    assert real_tokens(PROMPTS, CHOSEN, REJECTED) == 5 + 6 + 3 + 4 + 3 + 6
