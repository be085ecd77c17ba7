"""Batches of pairs -> tensors for one concatenated forward pass (chosen sequences, then rejected ones).

Two layouts, both taken by `completion_logprobs` as keyword arguments:
- padded: one sequence per row, right-padded to the batch's longest (input_ids, attention_mask, completion_mask);
- packed: several sequences per row without padding between them (input_ids, position_ids, completion_mask,
  sequence_index). Position ids restart at 0 for every sequence, which is how transformers (sdpa/eager masks,
  flash-attention varlen) knows where one ends: attention never crosses sequences.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def collate_pairs(
    prompt_ids: Sequence[Sequence[int]],
    chosen_ids: Sequence[Sequence[int]],
    rejected_ids: Sequence[Sequence[int]],
    pad_id: int,
    *,
    packed: bool = False,
) -> dict[str, torch.Tensor]:
    """B pairs -> 2B sequences: sequences [0, B) are prompt+chosen and [B, 2B)
    prompt+rejected (see collate_completions)."""
    if not (len(prompt_ids) == len(chosen_ids) == len(rejected_ids)):
        raise ValueError(
            f"{len(prompt_ids)} prompts, {len(chosen_ids)} chosen and {len(rejected_ids)} rejected completions"
        )
    return collate_completions([*prompt_ids, *prompt_ids], [*chosen_ids, *rejected_ids], pad_id, packed=packed)


def collate_completions(
    prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int, *, packed: bool = False
) -> dict[str, torch.Tensor]:
    """N (prompt, completion) -> tensors for N prompt+completion sequences.

    Padded: input_ids (N, T) long, attention_mask (N, T) long, completion_mask (N, T) bool, T the longest sequence.
    Packed: input_ids, position_ids (R, L) long, completion_mask (R, L) bool and sequence_index (R, L) long
    (the sequence each position holds, -1 on the padding that ends a row short of L); R <= N rows of at most
    the longest sequence's length (pack_rows). completion_mask is True exactly on the completion tokens.
    """
    sequences, starts = [], []
    for prompt, completion in zip(prompt_ids, completion_ids, strict=True):
        sequences.append(list(prompt) + list(completion))
        starts.append(len(prompt))
    return _packed(sequences, starts, pad_id) if packed else _padded(sequences, starts, pad_id)


def _padded(sequences: list[list[int]], starts: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
        completion_mask[row, start : len(seq)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices per row, longest first, each row's total length <= capacity.

    Rows are not longer than the longest sequence when capacity is that length, so attention (quadratic in
    the row length) never costs more than in the padded layout, while the linear layers skip the padding.
    """
    if any(n > capacity for n in lengths):
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit a row of {capacity}")
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, room in enumerate(free) if room >= lengths[index]), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= lengths[index]
    return rows


def _packed(sequences: list[list[int]], starts: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    rows = pack_rows([len(s) for s in sequences], capacity=max(len(s) for s in sequences))
    width = max(sum(len(sequences[i]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    sequence_index = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for index in row:
            seq, n = sequences[index], len(sequences[index])
            input_ids[r, at : at + n] = torch.as_tensor(seq, dtype=torch.long)
            position_ids[r, at : at + n] = torch.arange(n)
            completion_mask[r, at + starts[index] : at + n] = True
            sequence_index[r, at : at + n] = index
            at += n
        # The tail is one more segment (positions from 0), so it attends only to itself; nothing reads it.
        position_ids[r, at:] = torch.arange(width - at)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "completion_mask": completion_mask,
        "sequence_index": sequence_index,
    }


def real_tokens(prompt_ids: Sequence[Sequence[int]], *completions: Sequence[Sequence[int]]) -> int:
    """Tokens of the sequences prompt+completion for every completion list (padding excluded), counted on the host."""
    return sum(
        len(p) + len(c) for completion_ids in completions for p, c in zip(prompt_ids, completion_ids, strict=True)
    )
