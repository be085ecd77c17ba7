"""Unit tests for hdpo_ray.data.collate.collate_pairs."""

from __future__ import annotations

import pytest
import torch

from hdpo_ray.data.collate import collate_pairs

PAD = 99

PROMPTS = [[1, 2, 3], [4], [5, 6]]
CHOSEN = [[10, 11], [12, 13, 14, 15, 16], [17]]
REJECTED = [[20], [21, 22], [23, 24, 25, 26]]


@pytest.fixture
def batch():
    return collate_pairs(PROMPTS, CHOSEN, REJECTED, PAD)


def _rows():
    return [(p, c) for p, c in zip(PROMPTS, CHOSEN)] + [(p, r) for p, r in zip(PROMPTS, REJECTED)]


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
        assert batch["input_ids"][i, : len(prompt)].tolist() == batch["input_ids"][3 + i, : len(prompt)].tolist() == prompt


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
