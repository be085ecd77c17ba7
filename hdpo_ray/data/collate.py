"""Batches of pairs -> padded tensors for one concatenated forward pass (chosen rows, then rejected rows)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def collate_pairs(prompt_ids: Sequence[Sequence[int]], chosen_ids: Sequence[Sequence[int]], rejected_ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> 2B right-padded sequences, padded only to the longest sequence in this batch.

    Returns input_ids (2B, T) long, attention_mask (2B, T) long and completion_mask (2B, T) bool,
    where rows [0, B) are prompt+chosen and rows [B, 2B) prompt+rejected, and completion_mask is True
    exactly on the completion tokens.
    """
    if not (len(prompt_ids) == len(chosen_ids) == len(rejected_ids)):
        raise ValueError(f"{len(prompt_ids)} prompts, {len(chosen_ids)} chosen and {len(rejected_ids)} rejected completions")
    return collate_completions([*prompt_ids, *prompt_ids], [*chosen_ids, *rejected_ids], pad_id)


def collate_completions(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """N (prompt, completion) -> N right-padded prompt+completion rows (input_ids, attention_mask, completion_mask), each (N, T)."""
    sequences, starts = [], []
    for prompt, completion in zip(prompt_ids, completion_ids, strict=True):
        sequences.append(list(prompt) + list(completion))
        starts.append(len(prompt))
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (seq, start) in enumerate(zip(sequences, starts)):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
        completion_mask[row, start : len(seq)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
