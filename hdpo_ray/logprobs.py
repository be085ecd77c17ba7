"""Per-sequence completion log-probs and entropy: one function for the reference and the policy.

Two costs dominate a naive implementation and both are avoided here:
- The full-vocabulary fp32 log-softmax over every position of the batch (at 150k vocabulary and 8k
  tokens that is 5 GB). We run the decoder once, keep only the hidden states that predict completion
  tokens, and project them onto the vocabulary `chunk_tokens` rows at a time. With gradients on, each
  chunk is checkpointed, so backward recomputes its logits instead of keeping them all alive.
- Compute on prompt and padding positions in the vocabulary projection, which is the largest matmul
  of a small model: prompt and padding rows never reach it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint


class CompletionStats(NamedTuple):
    logps: torch.Tensor  # (N,) sum of log p(token) over completion tokens
    entropy_sum: torch.Tensor  # (N,) sum of per-token entropies of the next-token distribution, detached
    num_tokens: torch.Tensor  # (N,) completion tokens per sequence


def _token_stats(
    lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (M, H), targets (M,) -> log p(target) (M,) and entropy (M,) (zeros unless with_entropy), fp32."""
    logits = lm_head(hidden).float()
    if softcap:  # Gemma-2 style final-logit soft-capping
        logits = softcap * torch.tanh(logits / softcap)
    # One fused log_softmax pass: on CPU it is ~30% cheaper than logsumexp, and entropy reuses it.
    log_p = torch.log_softmax(logits, dim=-1)
    token_logps = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(log_p.exp() * log_p).sum(-1) if with_entropy else torch.zeros_like(token_logps)
    return token_logps, entropy


def completion_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    completion_mask: torch.Tensor | None = None,
    *,
    position_ids: torch.Tensor | None = None,
    sequence_index: torch.Tensor | None = None,
    chunk_tokens: int = 1024,
    with_entropy: bool = True,
    num_chunks: int | None = None,
) -> CompletionStats:
    """Log-probs of the completion tokens of N sequences under a Hugging Face causal LM, in either layout of
    hdpo_ray.data.collate: padded (attention_mask) or packed (position_ids and sequence_index, no attention_mask).

    Args:
        model: a `PreTrainedModel` with a causal-LM head (`base_model` + `get_output_embeddings()`).
        input_ids: (R, T) token rows: one right-padded sequence per row (R = N), or several packed ones.
        attention_mask: padded layout: (R, T) 1 on real tokens, 0 on padding.
        completion_mask: (R, T) True on completion tokens (the targets), False on prompt and padding.
        position_ids: packed layout: (R, T) positions restarting at 0 for every sequence.
        sequence_index: packed layout: (R, T) the sequence (0..N-1) each position holds, -1 on padding.
        chunk_tokens: completion tokens projected onto the vocabulary at once.
        with_entropy: also compute per-token entropy (one more pass over the logits; the reference skips it).
        num_chunks: run the LM head exactly this many times (>= the chunks needed; extra chunks are
            empty). Under ZeRO-3 every call is a collective, so all ranks must agree on it.

    Returns:
        CompletionStats with logps (N,), entropy_sum (N,) and num_tokens (N,).
    """
    packed = position_ids is not None
    _check_layout(input_ids, attention_mask, completion_mask, position_ids, sequence_index)
    # Packed: no 2D mask, so that transformers reads the sequence boundaries from the restarting position ids.
    context = {"position_ids": position_ids} if packed else {"attention_mask": attention_mask}
    hidden = model.base_model(input_ids=input_ids, use_cache=False, **context).last_hidden_state

    # Position t predicts token t+1, so the rows we need are hidden[:, t] where completion_mask[:, t+1]; a packed
    # sequence starts with a prompt token, so no target crosses from one sequence into the next.
    target_mask = completion_mask[:, 1:].bool()
    rows = hidden[:, :-1][target_mask]  # (M, H)
    targets = input_ids[:, 1:][target_mask]  # (M,)
    if packed:
        seq_of_row = sequence_index[:, 1:][target_mask]
        n = int(sequence_index.max()) + 1
    else:
        seq_of_row = (
            torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(target_mask)[target_mask]
        )
        n = input_ids.shape[0]

    token_logps, token_entropy = _chunked_token_stats(model, rows, targets, chunk_tokens, with_entropy, num_chunks)
    zeros = torch.zeros(n, dtype=torch.float32, device=input_ids.device)
    if token_logps is None:  # no completion token at all: a zero that still reaches the graph
        logps, entropy_sum = zeros + 0.0 * hidden.sum(), zeros.clone()
    else:
        logps = zeros.index_add(0, seq_of_row, token_logps)
        entropy_sum = zeros.index_add(0, seq_of_row, token_entropy)
    return CompletionStats(logps, entropy_sum.detach(), torch.bincount(seq_of_row, minlength=n))


def _check_layout(input_ids, attention_mask, completion_mask, position_ids, sequence_index) -> None:
    """ValueError unless the tensors make one of the two layouts, all of one shape, with a prompt token first."""
    packed = position_ids is not None
    layout = (input_ids, completion_mask, *((position_ids, sequence_index) if packed else (attention_mask,)))
    if (
        completion_mask is None
        or any(t is None or t.shape != input_ids.shape for t in layout)
        or (packed and attention_mask is not None)
    ):
        shapes = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": completion_mask,
            "position_ids": position_ids,
            "sequence_index": sequence_index,
        }
        given = {k: tuple(v.shape) for k, v in shapes.items() if v is not None}
        raise ValueError(
            "need input_ids, completion_mask and either attention_mask (padded) or position_ids + sequence_index "
            f"(packed), all of one shape; got {given}"
        )
    if completion_mask[:, 0].any():
        raise ValueError("completion_mask is set on position 0: a completion token needs a prompt token before it")


def _chunked_token_stats(
    model: torch.nn.Module,
    rows: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int,
    with_entropy: bool,
    num_chunks: int | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """rows (M, H) hidden states, targets (M,) -> log p(target) (M,) and entropy (M,) through the LM head,
    chunk_tokens rows at a time (num_chunks calls when given); (None, None) when no chunk ran."""
    lm_head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    needed = -(-rows.shape[0] // chunk_tokens)
    if num_chunks is not None and num_chunks < needed:
        raise ValueError(
            f"num_chunks={num_chunks} cannot hold {rows.shape[0]} completion tokens at {chunk_tokens} per chunk"
        )
    num_chunks = needed if num_chunks is None else num_chunks
    # Keep at most one chunk of logits alive for backward: with several chunks, recompute each in backward.
    recompute = torch.is_grad_enabled() and num_chunks > 1
    token_logps, token_entropy = [], []
    for start in range(0, num_chunks * chunk_tokens, chunk_tokens):
        chunk = (
            lm_head,
            rows[start : start + chunk_tokens],
            targets[start : start + chunk_tokens],
            softcap,
            with_entropy,
        )
        logps, entropy = checkpoint(_token_stats, *chunk, use_reentrant=False) if recompute else _token_stats(*chunk)
        token_logps.append(logps)
        token_entropy.append(entropy)
    if not token_logps:
        return None, None
    return torch.cat(token_logps), torch.cat(token_entropy)


@torch.no_grad()
def packing_is_exact(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether this model gives packed sequences the log-probs it gives them padded (its attention reads the
    restarting position ids; transformers' Llama, Qwen2, Mistral, Gemma and most others do). Three short
    sequences, one forward pass per layout; every rank calls it once, so ZeRO-3's gathers stay in step.
    A model that attends across the boundary is off by about a nat; fp32 rounding by ~1e-6, bf16 by ~1e-2."""
    from hdpo_ray.data.collate import collate_completions

    ids = (torch.arange(12) % (model.config.vocab_size - 3) + 3).tolist()  # ordinary tokens of any vocabulary
    # 6, 3 and 3 tokens: the two short sequences share a row of 6.
    prompts, completions = [ids[:2], ids[6:7], ids[9:11]], [ids[2:6], ids[7:9], ids[11:12]]
    was_training = model.training
    model.eval()
    try:
        padded, packed = (
            completion_logprobs(
                model,
                **{k: v.to(device) for k, v in collate_completions(prompts, completions, 0, packed=p).items()},
                with_entropy=False,
            ).logps
            for p in (False, True)
        )
    finally:
        model.train(was_training)
    tolerance = 1e-4 if next(model.parameters()).dtype == torch.float32 else 5e-2
    return bool((padded - packed).abs().max() <= tolerance)


def use_packing(wanted: bool, model: torch.nn.Module, device: torch.device, name: str, announce: bool = True) -> bool:
    """train.packing for this process's model: on when wanted and exact, else padding (said once when announce)."""
    if not wanted:
        return False
    if packing_is_exact(model, device):
        return True
    if announce:
        print(f"[hdpo-ray] {padding_notice(name)}", flush=True)
    return False


def padding_notice(name: str) -> str:
    """What a user is told when train.packing is on and the model cannot pack exactly."""
    return f"train.packing: {name} attends across packed sequences, so its batches are padded instead"
